#!/usr/bin/env bash
# Issue 29, experiment 1: the CIFAR-100 sweep of ../cifar100-resnet56-w4a4 completed to the paper's 16
# candidates. Same commit (9cd0d49, see COMMIT), same options; only --augs grows from the 8 CutMix
# candidates to all 16. runs/ starts with copies of the 18 finished runs' config.json and metrics.jsonl
# (the sweep reuses a run whose metrics reach the last epoch), and rank.json is a copy of
# ../cifar100-resnet56-w4a4/rank16.json, the 16-candidate pass of the same teacher, commit and seed.
# Resumable: rerun the same script (benchmarks/results/worktree.sh cifar100-resnet56-w4a4-16 start).
set -euo pipefail
cd "$(dirname "$0")"
DATA=../../../../shared/data/cifar100/cifar100.npz
TEACHER=../../../../shared/weights/cifar100/resnet56-f2eff4c8.pt
daqkd sweep --data $DATA --teacher $TEACHER --arch resnet56b --normalize cifar100-chenyaofo --method ewgs \
  --w-bits 4 --a-bits 4 --kd kd --gamma 1 --alpha 2 --temperature 4 --optimizer adam --lr 5e-4 --quant-lr 5e-6 \
  --weight-decay 5e-4 --batch-size 64 --augs all --default none --epochs 2 --seeds 2 --seed 0 --eval-every 2 \
  --out . --no-progress >> sweep.log 2>&1
