#!/usr/bin/env bash
# Run one experiment folder's run.sh from the fixed commit named in its COMMIT file, in a git worktree
# beside the repository, and copy finished outputs back for a commit. A checkout holds only committed
# results (configs, metrics, reports; no weights or resume states), so `start` copies them in and the
# experiment's run.sh skips what is finished and restarts an interrupted student from scratch, or resumes
# it from its epoch state when the worktree still has one.
#   bash benchmarks/results/worktree.sh EXPERIMENT start   # e.g. cifar100-resnet56-w4a4-16
#   bash benchmarks/results/worktree.sh EXPERIMENT sync    # finished runs and outputs copied back
#   bash benchmarks/results/worktree.sh EXPERIMENT status  # running or not, runs finished
# Environment: THREADS (torch threads of the experiment, default 1, so that two experiments share the
# 2 cores without waiting on each other's threads).
set -euo pipefail
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
NAME=${1:?usage: $0 EXPERIMENT start|sync|status}
EXP=benchmarks/results/$NAME
[ -f "$REPO/$EXP/COMMIT" ] || { echo "$0: $REPO/$EXP/COMMIT is missing (the commit the experiment runs at)" >&2; exit 2; }
COMMIT=$(tr -d '[:space:]' < "$REPO/$EXP/COMMIT")
WT=$(dirname "$REPO")/wt-$NAME
OUTPUTS=(COMMIT run.sh teacher-test.json rank.json rank.log pilot.json sweep.log results.json report.md scatter.png
         race.json race.md race.log)
case "${2:-}" in
  start)
    if [ -f "$WT/experiment.pid" ] && kill -0 "$(cat "$WT/experiment.pid")" 2> /dev/null; then
      echo "$NAME is already running"; exit 0
    fi
    [ -d "$WT" ] || git -C "$REPO" worktree add -q --detach "$WT" "$COMMIT"
    mkdir -p "$WT/$EXP"
    for f in "${OUTPUTS[@]}"; do
      if [ -f "$REPO/$EXP/$f" ] && [ ! -f "$WT/$EXP/$f" ]; then cp -a "$REPO/$EXP/$f" "$WT/$EXP/$f"; fi
    done
    if [ -d "$REPO/$EXP/runs" ]; then mkdir -p "$WT/$EXP/runs" && cp -an "$REPO/$EXP/runs/." "$WT/$EXP/runs/"; fi
    cd "$WT/$EXP"
    OMP_NUM_THREADS=${THREADS:-1} PYTHONPATH="$WT/src" setsid nohup nice -n 19 bash run.sh >> "$WT/experiment.log" 2>&1 < /dev/null &
    echo $! > "$WT/experiment.pid"
    echo "started $NAME at $COMMIT in $WT/$EXP (logs: sweep.log there, $WT/experiment.log)";;
  sync)
    for f in "${OUTPUTS[@]}"; do
      if [ -f "$WT/$EXP/$f" ]; then cp -a "$WT/$EXP/$f" "$REPO/$EXP/$f"; fi
    done
    if [ -d "$WT/$EXP/runs" ]; then
      for run in "$WT/$EXP"/runs/*/; do
        name=$(basename "$run")
        if [ -f "$WT/$EXP/sweep.log" ] && grep -q "^$name finished" "$WT/$EXP/sweep.log" \
           && [ ! -f "$REPO/$EXP/runs/$name/metrics.jsonl" ]; then  # config and metrics, not weights
          mkdir -p "$REPO/$EXP/runs/$name" && cp -a "$run/config.json" "$run/metrics.jsonl" "$REPO/$EXP/runs/$name/"
          if [ -f "$run/test.json" ]; then cp -a "$run/test.json" "$REPO/$EXP/runs/$name/"; fi  # a run's own eval
          echo "synced $name"
        fi
        # a race's runs stop at rungs: their metrics up to the last rung reached are results too
        if [ -f "$WT/$EXP/race.json" ] && [ -f "$run/metrics.jsonl" ] \
           && ! cmp -s "$run/metrics.jsonl" "$REPO/$EXP/runs/$name/metrics.jsonl"; then
          mkdir -p "$REPO/$EXP/runs/$name" && cp -a "$run/config.json" "$run/metrics.jsonl" "$REPO/$EXP/runs/$name/"
          echo "synced $name ($(wc -l < "$run/metrics.jsonl") epochs)"
        fi
      done
    fi;;
  status)
    if [ -f "$WT/experiment.pid" ] && kill -0 "$(cat "$WT/experiment.pid")" 2> /dev/null; then
      echo "$NAME: running (pid $(cat "$WT/experiment.pid"))"
    else echo "$NAME: not running"; fi
    [ -f "$WT/$EXP/sweep.log" ] && grep -c " finished: top-1" "$WT/$EXP/sweep.log" | sed 's/^/runs finished this sweep: /' || true;;
  *) echo "usage: $0 EXPERIMENT start|sync|status" >&2; exit 2;;
esac
