#!/usr/bin/env bash
# The CUDA checks, then the issue-5 sweep (8 DAs + CutMix, W3A3 EWGS ResNet-20, KD) on one GPU with
# all 8 students side by side (`daqkd sweep --jobs 8`), sized to a wall-clock budget.
#
#   benchmarks/gpu_sweep.sh DATA_DIR OUT_DIR BUDGET_SECONDS
#
# The epoch count is the largest that fits the budget, from a 3-epoch probe of the same 8-way
# setting on 2,000 images. The ranking is the committed CPU one (same teacher, data and seed;
# benchmarks/gpu_check.py checks that the metric and the DAs give on CUDA what they give on CPU).
set -euo pipefail
data=$1 out=$2 budget=$3
start=$(date +%s)
repo=$(cd "$(dirname "$0")/.." && pwd)
cpu_sweep=$repo/benchmarks/results/cifar10-resnet20-w3a3
export PYTHONPATH=$repo/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# eager quantizer kernels: compiling them in 8 processes would cost more than it saves here
export DAQKD_FUSED_KERNELS=0
daqkd() { python3 -m daqkd "$@"; }
mkdir -p "$out"
nvidia-smi -L || true
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"

echo "== gpu_check"
DAQKD_FUSED_KERNELS=auto timeout 150 python3 "$repo/benchmarks/gpu_check.py" --data "$data" \
  | tee "$out/gpu_check.log" || echo "gpu_check FAILED (rc ${PIPESTATUS[0]}), the sweep still runs"

sweep_args=(--data "$data" --teacher "$cpu_sweep/teacher" --method ewgs --w-bits 3 --a-bits 3
  --kd kd --gamma 1 --alpha 2 --temperature 4
  --augs none+cutmix,autoaugment-cifar10+cutmix,autoaugment-imagenet+cutmix,autoaugment-svhn+cutmix,randaugment+cutmix,trivialaugment+cutmix,augmix+cutmix,randomerasing+cutmix
  --seed 0 --jobs 8 --no-amp --no-progress)

echo "== probe: 8 students side by side on 2,000 images, 3 epochs"
probe=/tmp/daqkd-probe
rm -rf "$probe" && mkdir -p "$probe" && cp "$cpu_sweep/rank.json" "$probe/"
daqkd sweep "${sweep_args[@]}" --limit-per-class 200 --epochs 3 --out "$probe" > "$out/probe.log" 2>&1 \
  || { cat "$out/probe.log"; cat "$probe"/runs/*/train.log | tail -40; exit 1; }
elapsed=$(( $(date +%s) - start ))
epochs=$(python3 - "$probe" "$budget" "$elapsed" <<'EOF'
import json, pathlib, sys
probe, budget, elapsed = pathlib.Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
# the slowest student's last (warm) probe epoch, scaled from 2,000 to 50,000 images; its test
# pass (10,000 images) costs about a fifth of a training pass over as many images
per_image = max(json.loads(f.read_text().splitlines()[-1])["seconds"] / 2000 for f in probe.glob("runs/*/metrics.jsonl"))
epoch = per_image * (50_000 + 10_000 / 5)
left = budget - elapsed - 60  # start-up, data loading, the report
print(max(1, int(0.85 * left / epoch)))
print(f"probe: {epoch:.1f} s per full epoch per student, {left:.0f} s left", file=sys.stderr)
EOF
)
echo "== sweep: $epochs epochs per student"
sweep=/tmp/daqkd-gpu-sweep  # packed into OUT/sweep.tar.gz at the end (metrics, configs, logs, report)
rm -rf "$sweep" && mkdir -p "$sweep" && cp "$cpu_sweep/rank.json" "$sweep/"
left=$(( budget - ($(date +%s) - start) - 10 ))
timeout --signal=INT "$left" python3 -m daqkd sweep "${sweep_args[@]}" --epochs "$epochs" --out "$sweep" \
  2>&1 | tee "$out/sweep.log" || echo "sweep stopped (rc ${PIPESTATUS[0]})"
tar -C "$sweep" --exclude=state.pt --exclude='*.safetensors' --exclude=tensorboard -czf "$out/sweep.tar.gz" .
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv || true
echo "done in $(( $(date +%s) - start )) s"
