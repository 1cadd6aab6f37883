#!/usr/bin/env bash
# Issue 29, experiment 2's pilot: one epoch of the default's W2A2 student, timed, and the teacher's test top-1.
set -euo pipefail
cd "$(dirname "$0")"
DATA=../../../../shared/data/cifar100/cifar100.npz
TEACHER=../../../../shared/weights/cifar100/resnet32-e36a0629.pt
[ -f teacher-test.json ] || daqkd eval $TEACHER --arch resnet32b --normalize cifar100-chenyaofo --data $DATA --out teacher-test.json > /dev/null
daqkd train --data $DATA --teacher $TEACHER --arch resnet32b --normalize cifar100-chenyaofo --method ewgs \
  --w-bits 2 --a-bits 2 --kd kd --gamma 1 --alpha 2 --temperature 4 --optimizer adam --lr 5e-4 --quant-lr 5e-6 \
  --weight-decay 5e-4 --batch-size 64 --aug none --epochs 1 --seed 0 --out pilot --no-progress > pilot.log 2>&1
