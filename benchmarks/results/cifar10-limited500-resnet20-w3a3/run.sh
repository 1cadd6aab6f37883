#!/usr/bin/env bash
# Issue 12, experiment 1: data-limited CIFAR-10 (500 train images per class, full test split).
# Resumable: rerun the same script; finished steps are skipped, interrupted ones resume.
# Run from this directory: bash run.sh (paths are relative to it).
set -euo pipefail
cd "$(dirname "$0")"
DATA=../../../../shared/data/cifar10
AUGS=none+cutmix,autoaugment-cifar10+cutmix,autoaugment-imagenet+cutmix,autoaugment-svhn+cutmix,randaugment+cutmix,trivialaugment+cutmix,augmix+cutmix,randomerasing+cutmix

# 1. Teacher: ResNet-20 from scratch on the 5,000 images.
TEACHER=(daqkd teacher --data $DATA --train-limit-per-class 500 --arch resnet20 --aug none+cutmix
         --epochs 160 --lr 0.1 --momentum 0.9 --weight-decay 5e-4 --batch-size 128 --eval-every 10 --seed 0
         --out teacher --no-progress)
RESUME=(); [ -f teacher/state.pt ] && RESUME=(--resume)
"${TEACHER[@]}" "${RESUME[@]}" >> teacher.log 2>&1
[ -f teacher-train.json ] || daqkd eval teacher --data $DATA --split train --limit-per-class 500 --out teacher-train.json > /dev/null
[ -f teacher-test.json ] || daqkd eval teacher --data $DATA --split test --out teacher-test.json > /dev/null

# 2. Students: rank the 8 candidates on the 5,000 images, train each and the default none, 3 seeds.
daqkd sweep --data $DATA --train-limit-per-class 500 --teacher teacher --method ewgs --w-bits 3 --a-bits 3 \
  --kd kd --gamma 1 --alpha 2 --temperature 4 --augs $AUGS --default none \
  --epochs 30 --seeds 3 --seed 0 --eval-every 10 --out . --no-progress >> sweep.log 2>&1
