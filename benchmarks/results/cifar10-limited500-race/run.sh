#!/usr/bin/env bash
# Issue 30, measurement: the race against the full sweep, in the data-limited CIFAR-10 setting of
# ../cifar10-limited500-resnet20-w3a3 (its teacher, students and candidates) with a validation split.
# 1. the race (--race); 2. the full sweep in the same folder: it reuses every run the race trained
# (finished ones as they are, stopped ones resumed from their rung state, bit-identical to straight runs).
# Resumable: rerun (benchmarks/results/worktree.sh cifar10-limited500-race start).
set -euo pipefail
cd "$(dirname "$0")"
DATA=../../../../shared/data/cifar10
AUGS=none+cutmix,autoaugment-cifar10+cutmix,autoaugment-imagenet+cutmix,autoaugment-svhn+cutmix,randaugment+cutmix,trivialaugment+cutmix,augmix+cutmix,randomerasing+cutmix
COMMON=(--data $DATA --train-limit-per-class 500 --val-per-class 50 --teacher ../cifar10-limited500-resnet20-w3a3/teacher
        --method ewgs --w-bits 3 --a-bits 3 --ewgs-delta 0 --kd kd --gamma 1 --alpha 2 --temperature 4 --augs $AUGS
        --default none --epochs 30 --seeds 2 --seed 0 --eval-every 10 --out . --no-progress)
daqkd sweep "${COMMON[@]}" --race --rungs 1/9,1/3,1 --keep 1/3 >> race.log 2>&1
daqkd sweep "${COMMON[@]}" >> sweep.log 2>&1
