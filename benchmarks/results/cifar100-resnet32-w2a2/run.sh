#!/usr/bin/env bash
# Issue 29, experiment 2: CIFAR-100, the published ResNet-32 (option B) as teacher, W2A2 EWGS ResNet-32b students
# from its weights, the paper's 16 candidates, 3 epochs, seeds 0 and 1, at the commit in COMMIT.
# Resumable: rerun the same script (benchmarks/results/worktree.sh cifar100-resnet32-w2a2 start).
set -euo pipefail
cd "$(dirname "$0")"
DATA=../../../../shared/data/cifar100/cifar100.npz
TEACHER=../../../../shared/weights/cifar100/resnet32-e36a0629.pt
[ -f teacher-test.json ] || daqkd eval $TEACHER --arch resnet32b --normalize cifar100-chenyaofo --data $DATA --out teacher-test.json > /dev/null
daqkd sweep --data $DATA --teacher $TEACHER --arch resnet32b --normalize cifar100-chenyaofo --method ewgs \
  --w-bits 2 --a-bits 2 --kd kd --gamma 1 --alpha 2 --temperature 4 --optimizer adam --lr 5e-4 --quant-lr 5e-6 \
  --weight-decay 5e-4 --batch-size 64 --augs all --default none --epochs 3 --seeds 2 --seed 0 --eval-every 3 \
  --out . --no-progress >> sweep.log 2>&1
