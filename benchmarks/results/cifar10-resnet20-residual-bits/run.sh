#!/usr/bin/env bash
# Issue 31, item 3: what --residual-bits 8 (the residual stream fake-quantized with LSQ at 8 bits, so
# that the whole ResNet exports to integer kernels) costs in accuracy. W4A4 and W2A2 EWGS ResNet-20
# students, each with and without it, from the same fine-tuned CIFAR-10 teacher; seed 0, then seed 1.
# Resumable: rerun (benchmarks/results/worktree.sh cifar10-resnet20-residual-bits start).
set -euo pipefail
cd "$(dirname "$0")"
DATA=../../../../shared/data/cifar10
COMMON=(--data $DATA --teacher ../cifar10-resnet20-w3a3/teacher --method ewgs --ewgs-delta 0 --kd kd --gamma 1
        --alpha 2 --temperature 4 --aug none --epochs 3 --batch-size 256 --no-progress)
for seed in 0 1; do
  for bits in 4 2; do
    for residual in 32 8; do
      run=runs/w${bits}a${bits}-r${residual}-seed$seed
      [ -f $run/test.json ] && continue
      RESUME=(); [ -f $run/state.pt ] && RESUME=(--resume)
      echo "-- $run" >> sweep.log
      daqkd train "${COMMON[@]}" --w-bits $bits --a-bits $bits --residual-bits $residual --seed $seed \
        --out $run "${RESUME[@]}" >> train.log 2>&1
      daqkd eval $run --data $DATA --split test --out $run/test.json > /dev/null
      echo "$(basename $run) finished: top-1 $(python3 -c "import json; print(json.load(open('$run/test.json'))['top1'])")" >> sweep.log
    done
  done
done
