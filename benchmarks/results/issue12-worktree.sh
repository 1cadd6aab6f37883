#!/usr/bin/env bash
# Run issue 12's experiment 2 (CIFAR-100) from its fixed commit in a fresh checkout, and copy its
# finished outputs back. A checkout holds only committed results (no resume states), so:
#   bash benchmarks/results/issue12-worktree.sh start   # worktree at 9cd0d49 beside the repo, the committed
#                                                       # results copied in, run.sh started in the background
#   bash benchmarks/results/issue12-worktree.sh sync    # finished runs and outputs copied back to commit
# Both experiments finished on 2026-12-06 (start now finds nothing left to run; this script is the record of
# how experiment 2 ran across sessions). Experiment 1 (cifar10-limited500) is not run by it.
set -euo pipefail
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
WT=${ISSUE12_WORKTREE:-$(dirname "$REPO")/wt-issue12}
EXP=benchmarks/results/cifar100-resnet56-w4a4
case "${1:-}" in
  start)
    [ -d "$WT" ] || git -C "$REPO" worktree add -q --detach "$WT" 9cd0d49
    for f in teacher-test.json rank16.json rank16.log rank.json sweep.log results.json report.md scatter.png; do
      if [ -f "$REPO/$EXP/$f" ] && [ ! -f "$WT/$EXP/$f" ]; then cp -a "$REPO/$EXP/$f" "$WT/$EXP/$f"; fi
    done
    # a rank16.log without rank16.json is an interrupted ranking: it starts again
    if [ -d "$REPO/$EXP/runs" ]; then mkdir -p "$WT/$EXP/runs" && cp -an "$REPO/$EXP/runs/." "$WT/$EXP/runs/"; fi
    cd "$WT/$EXP"
    PYTHONPATH="$WT/src" setsid nohup nice -n 19 bash run.sh >> "$WT/issue12.log" 2>&1 < /dev/null &
    echo "started in $WT/$EXP (log: sweep.log, rank16.log; $WT/issue12.log)";;
  sync)
    for f in teacher-test.json rank16.json rank16.log rank.json sweep.log results.json report.md scatter.png; do
      if [ -f "$WT/$EXP/$f" ]; then cp -a "$WT/$EXP/$f" "$REPO/$EXP/$f"; fi
    done
    if [ -d "$WT/$EXP/runs" ]; then
      for run in "$WT/$EXP"/runs/*/; do
        name=$(basename "$run")
        if grep -q "^$name finished" "$WT/$EXP/sweep.log"; then  # finished: config and metrics, not weights
          mkdir -p "$REPO/$EXP/runs/$name" && cp -a "$run/config.json" "$run/metrics.jsonl" "$REPO/$EXP/runs/$name/"
          echo "synced $name"
        fi
      done
    fi;;
  *) echo "usage: $0 start|sync" >&2; exit 2;;
esac
