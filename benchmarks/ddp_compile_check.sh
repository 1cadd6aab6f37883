#!/usr/bin/env bash
# README's claim that `--compile` under torchrun trains the eager run's weights, measured: a W3A3
# EWGS student (the CIFAR-10 ResNet-20 teacher of benchmarks/results, 100 images, 2 steps of 50)
# trained by one process with 1 thread and with the default threads (the float-rounding scale: a
# rounding difference moves a 3-bit activation a whole level), under torchrun with N processes
# eagerly, and with --compile. benchmarks/compare_runs.py gives each pair's max |weight difference|
# and last train losses; the last line is one JSON object of all pairs.
#
#   bash benchmarks/ddp_compile_check.sh OUT_DIR [NPROC (2)] [DEVICE (cpu)]
#
# On a CPU the compilation takes minutes per process.
set -euo pipefail
mkdir -p "$1"
out=$(cd "$1" && pwd) nproc=${2:-2} device=${3:-cpu}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export PYTHONPATH=$repo/src${PYTHONPATH:+:$PYTHONPATH}
args=(train --data ../shared/data/cifar10 --teacher benchmarks/results/cifar10-resnet20-w3a3/teacher --method ewgs
  --w-bits 3 --a-bits 3 --limit-per-class 10 --epochs 1 --batch-size 50 --aug none+cutmix --seed 0 --device "$device"
  --no-progress)
rm -rf "$out"/plain "$out"/plain-1-thread "$out"/ddp-eager "$out"/ddp-compiled
python3 -m daqkd "${args[@]}" --out "$out/plain" > "$out/check.log" 2>&1
OMP_NUM_THREADS=1 python3 -m daqkd "${args[@]}" --out "$out/plain-1-thread" >> "$out/check.log" 2>&1
torchrun --nproc_per_node "$nproc" -m daqkd "${args[@]}" --out "$out/ddp-eager" >> "$out/check.log" 2>&1
torchrun --nproc_per_node "$nproc" -m daqkd "${args[@]}" --compile --out "$out/ddp-compiled" >> "$out/check.log" 2>&1
pairs=("plain plain-1-thread" "plain ddp-eager" "ddp-eager ddp-compiled")
for pair in "${pairs[@]}"; do
  set -- $pair
  python3 benchmarks/compare_runs.py "$out/$1" "$out/$2" | tee -a "$out/pairs.jsonl"
done
python3 - "$out/pairs.jsonl" "$nproc" "$device" <<'PYEOF'
import json
import sys
from pathlib import Path

lines = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines()[-3:]]
names = ["plain_vs_1_thread", "plain_vs_ddp_eager", "ddp_eager_vs_ddp_compiled"]
print(json.dumps({"nproc": int(sys.argv[2]), "device": sys.argv[3],
                  **{f"{n}_max_abs_weight_diff": p["max_abs_weight_diff"] for n, p in zip(names, lines)},
                  **{f"{n}_train_loss": p["train_loss"] for n, p in zip(names, lines)}}))
PYEOF
