#!/usr/bin/env bash
# Issue 16's device window in one command: check, measure, then the >= 100-epoch sweep, resumable.
#
#   benchmarks/gpu_issue16.sh DATA_DIR OUT_DIR BUDGET_SECONDS [EPOCHS]
#
# 1. gpu_throughput.py on 5,000 images, all 9 students side by side: plain, then --compile with
#    --augment-workers 1 (student_images_per_s, per-DA figures, graph breaks -> OUT/throughput-*.json;
#    GPU utilization every 250 ms -> OUT/gpu-util-*.csv, to decide on several students per process);
# 2. `daqkd rank` of the paper's 16 candidates on the 50,000 train images (goal < 60 s) -> OUT/rank16.json;
# 3. the CIFAR-10 ResNet-20 W3A3 sweep, 8 DAs with CutMix + none, EPOCHS (default 100) each, with the
#    faster of the two settings, stopped (Ctrl-C, resumable) when the budget runs out. Its metrics,
#    configs, report and every run's resume state (state.pt, a few MB each) are packed into
#    OUT/sweep.tar.gz; commit it, and the next window runs this again with RESUME_FROM=that file.
#
# MEASURE=0 (with FASTER="--compile --augment-workers 1" or empty) skips straight to the sweep, for
# the windows after the first one. DEVICE=cpu IMAGES=300 LIMIT=10 runs every step small on a CPU.
# Step 0 is issue 17's GPU check: one `torchrun --nproc_per_node 1` student against a plain run.
set -euo pipefail
data=$1 out=$2 budget=$3 epochs=${4:-100}
start=$(date +%s)
repo=$(cd "$(dirname "$0")/.." && pwd)
device=${DEVICE:-cuda} images=${IMAGES:-5000}
teacher=$repo/benchmarks/results/cifar10-resnet20-w3a3/teacher
export PYTHONPATH=$repo/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$out"
left() { echo $(( budget - ($(date +%s) - start) )); }
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
  | tee "$out/device.txt"

faster=${FASTER:-}
if [ "${MEASURE:-1}" = 1 ]; then
echo "== 0. issue 17: one torchrun process against a plain run (W4A4 student, 5 steps)"
ddp=(--data "$data" --teacher "$teacher" --method ewgs --w-bits 4 --a-bits 4 --limit-per-class 50 --epochs 1
  --batch-size 100 --aug none+cutmix --device "$device" --no-progress)
timeout 90 python3 -m daqkd train "${ddp[@]}" --out "$out/ddp-plain" > "$out/ddp.log" 2>&1 \
  && timeout 90 torchrun --nproc_per_node 1 -m daqkd train "${ddp[@]}" --out "$out/ddp-torchrun" >> "$out/ddp.log" 2>&1 \
  && python3 "$repo/benchmarks/compare_runs.py" "$out/ddp-plain" "$out/ddp-torchrun" | tee "$out/ddp-compare.txt" \
  || echo "ddp check failed: see ddp.log"
rm -f "$out"/ddp-*/*.safetensors "$out"/ddp-*/state.pt

echo "== 1. throughput, plain and compiled with augmentation workers ($images images, 2 epochs, 9 students)"
tp=(python3 "$repo/benchmarks/gpu_throughput.py" --data "$data" --teacher "$teacher" --device "$device" --images "$images"
  --epochs 2 --jobs 9)
# GPU utilization beside each measurement (every 250 ms): near 100 % with 9 student processes means
# the device is busy and several students per process cannot gain much; far below it means the
# processes starve it (launch-bound or time-sliced), which students sharing one process would address
sample() { command -v nvidia-smi > /dev/null && { nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used \
  --format=csv -lms 250 > "$out/gpu-util-$1.csv" 2> /dev/null & echo $!; } || echo ""; }
sampler=$(sample plain)
timeout 120 "${tp[@]}" 2> "$out/throughput-plain.err" | tail -1 | tee "$out/throughput-plain.json" || true
[ -z "$sampler" ] || kill "$sampler" 2> /dev/null || true
sampler=$(sample compiled)
timeout 200 "${tp[@]}" --compile --augment-workers 1 2> "$out/throughput-compiled.err" | tail -1 \
  | tee "$out/throughput-compiled.json" || true
[ -z "$sampler" ] || kill "$sampler" 2> /dev/null || true
faster=$(python3 - "$out" <<'EOF'
import json, pathlib, sys
rates = {}
for name in ("plain", "compiled"):
    try:
        rates[name] = json.loads((pathlib.Path(sys.argv[1]) / f"throughput-{name}.json").read_text())["student_images_per_s"]
    except (OSError, ValueError, KeyError):
        rates[name] = 0.0
print("--compile --augment-workers 1" if rates["compiled"] > rates["plain"] else "")
print(f"plain {rates['plain']:.0f} img/s, compiled {rates['compiled']:.0f} img/s", file=sys.stderr)
EOF
)

echo "== 2. ranking the paper's 16 candidates on the train split"
rank_start=$(date +%s)
timeout 120 python3 -m daqkd rank --data "$data" --weights "$teacher" --augs all --device "$device" ${LIMIT:+--limit-per-class $LIMIT} \
  --no-progress --out "$out/rank16.json" > "$out/rank16.log" 2>&1 || echo "rank failed: see rank16.log"
echo "rank: $(( $(date +%s) - rank_start )) s wall (the report's own timing is in rank16.json)"
fi

echo "== 3. sweep: $epochs epochs, settings: ${faster:-plain}; $(left) s left"
sweep=$out/sweep
mkdir -p "$sweep"
[ -n "${RESUME_FROM:-}" ] && tar -C "$sweep" -xzf "$RESUME_FROM"  # the last window's sweep.tar.gz
[ -f "$sweep/rank.json" ] || cp "$repo/benchmarks/results/cifar10-resnet20-w3a3/rank.json" "$sweep/"
sweep_seconds=$(( $(left) - 30 ))  # 30 s to pack the results
if [ "$sweep_seconds" -lt 60 ]; then echo "no time left for the sweep"; exit 0; fi
# shellcheck disable=SC2086  # $faster is a list of options
timeout --signal=INT -k 20 "$sweep_seconds" python3 -m daqkd sweep --data "$data" --teacher "$teacher" --device "$device" \
  --method ewgs --w-bits 3 --a-bits 3 --kd kd --gamma 1 --alpha 2 --temperature 4 \
  --augs none+cutmix,autoaugment-cifar10+cutmix,autoaugment-imagenet+cutmix,autoaugment-svhn+cutmix,randaugment+cutmix,trivialaugment+cutmix,augmix+cutmix,randomerasing+cutmix \
  --epochs "$epochs" --seed 0 --jobs 9 --save-every 200 --no-progress $faster --out "$sweep" ${LIMIT:+--limit-per-class $LIMIT} \
  2>&1 | tee -a "$out/sweep.log" || echo "sweep stopped (rc ${PIPESTATUS[0]}): resumable"
tar -C "$sweep" --exclude='*.safetensors' --exclude=tensorboard -czf "$out/sweep.tar.gz.tmp" . \
  && mv "$out/sweep.tar.gz.tmp" "$out/sweep.tar.gz" && rm -rf "$sweep"
echo "done in $(( $(date +%s) - start )) s"
