#!/usr/bin/env bash
# Issue 12, experiment 2: CIFAR-100 with the published ResNet-56 (option B) as teacher.
# Resumable: rerun the same script; finished steps are skipped, interrupted ones resume.
set -euo pipefail
cd "$(dirname "$0")"
DATA=../../../../shared/data/cifar100/cifar100.npz
TEACHER=../../../../shared/weights/cifar100/resnet56-f2eff4c8.pt
FOREIGN=(--arch resnet56b --normalize cifar100-chenyaofo)
AUGS=none+cutmix,autoaugment-cifar10+cutmix,autoaugment-imagenet+cutmix,autoaugment-svhn+cutmix,randaugment+cutmix,trivialaugment+cutmix,augmix+cutmix,randomerasing+cutmix

# 1. The teacher as published (72.63 % expected) and the paper's 16 candidates on all 50,000 images.
[ -f teacher-test.json ] || daqkd eval $TEACHER "${FOREIGN[@]}" --data $DATA --out teacher-test.json > /dev/null
[ -f rank16.json ] || daqkd rank --data $DATA --weights $TEACHER "${FOREIGN[@]}" --augs all --seed 0 \
  --out rank16.json --no-progress > rank16.log 2>&1

# 2. W4A4 EWGS ResNet-56 students from the teacher's weights, the paper's CIFAR-100 settings, 2 seeds.
daqkd sweep --data $DATA --teacher $TEACHER "${FOREIGN[@]}" --method ewgs --w-bits 4 --a-bits 4 \
  --kd kd --gamma 1 --alpha 2 --temperature 4 --optimizer adam --lr 5e-4 --quant-lr 5e-6 --weight-decay 5e-4 \
  --batch-size 64 --augs $AUGS --default none --epochs 2 --seeds 2 --seed 0 --eval-every 2 \
  --out . --no-progress >> sweep.log 2>&1
