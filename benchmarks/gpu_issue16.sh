#!/usr/bin/env bash
# Issue 16's device window in one command: check, measure, then the >= 100-epoch sweep, resumable.
#
#   benchmarks/gpu_issue16.sh DATA_DIR OUT_DIR BUDGET_SECONDS [EPOCHS]
#
# 1. gpu_throughput.py on 5,000 images, all 9 students side by side: plain, then --compile with
#    --augment-workers 1 (student_images_per_s, per-DA figures, graph breaks -> OUT/throughput-*.json;
#    GPU utilization every 250 ms -> OUT/gpu-util-*.csv, to decide on several students per process);
# 2. `daqkd rank` of the paper's 16 candidates on the 50,000 train images (goal < 60 s) -> OUT/rank16.json;
# 3. the CIFAR-10 ResNet-20 W3A3 sweeps (8 DAs with CutMix + none, EPOCHS, default 100, each; SWEEPS,
#    default "limited500-h200 full-h200": issue 12's data-limited experiment, then issue 16's sweep),
#    with the faster of the two settings, stopped (Ctrl-C, resumable) when the budget runs out. Each
#    sweep's metrics, configs, report and resume states (state.pt, a few MB each) are packed into
#    OUT/NAME.tar.gz; unpack the report into its results folder and commit the tarball there as
#    sweep.tar.gz: the next window resumes from it by itself.
#
# MEASURE=0 (with FASTER="--compile --augment-workers 1" or empty) skips straight to the sweep, for
# the windows after the first one. DEVICE=cpu IMAGES=300 LIMIT=10 runs every step small on a CPU.
# Step 0 is issue 17's GPU check: one `torchrun --nproc_per_node 1` student against a plain run.
set -euo pipefail
budget=$3 epochs=${4:-100}
start=$(date +%s)
mkdir -p "$2"
data=$(cd "$1" && pwd) out=$(cd "$2" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
# the sweeps store --data and --teacher and refuse to resume with other paths: the teachers are
# named relative to the repository (wherever the device machine puts it), DATA must be the same
# path in every window (e.g. /tmp/data/cifar10)
cd "$repo"
device=${DEVICE:-cuda} images=${IMAGES:-5000}
teacher=benchmarks/results/cifar10-resnet20-w3a3/teacher
export PYTHONPATH=$repo/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
sampler=""
stop_sampler() { [ -z "$sampler" ] || kill "$sampler" 2> /dev/null || true; }
trap stop_sampler EXIT
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
stop_sampler
sampler=$(sample compiled)
timeout 200 "${tp[@]}" --compile --augment-workers 1 2> "$out/throughput-compiled.err" | tail -1 \
  | tee "$out/throughput-compiled.json" || true
stop_sampler
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

# 3. The sweeps, in the order of SWEEPS, each with the time left: 8 DAs with CutMix + the default
# none, EPOCHS each, W3A3 EWGS ResNet-20, Hinton KD. Each resumes from the sweep.tar.gz committed in
# its results folder (the previous window's), and leaves OUT/NAME.tar.gz (metrics, configs, report,
# resume states) to unpack into that folder and commit.
#   limited500-h200: issue 12's experiment 1 (500 train images per class, its teacher and ranking), 3 seeds
#   full-h200:       issue 16's sweep on the 50,000 images, 1 seed
run_sweep() {
  local name=$1 results=$2 teacher=$3 rank=$4; shift 4
  local dir=$out/$name seconds settings=$faster stored rc=0
  mkdir -p "$dir"
  if [ ! -d "$dir/runs" ] && [ -f "benchmarks/results/$results/sweep.tar.gz" ]; then
    tar -C "$dir" -xzf "benchmarks/results/$results/sweep.tar.gz"
  fi
  [ -f "$dir/rank.json" ] || cp "$rank" "$dir/"
  # a resumed sweep keeps the compile setting its runs were made with (the sweep refuses to mix)
  stored=$(python3 -c 'import json, pathlib, sys
files = sorted(pathlib.Path(sys.argv[1]).glob("runs/*/config.json"))
print("" if not files else "compiled" if json.loads(files[0].read_text())["args"].get("compile") else "plain")' "$dir")
  [ "$stored" = compiled ] && settings="--compile --augment-workers 1"
  [ "$stored" = plain ] && settings=""
  echo "== 3. sweep $name: $epochs epochs, settings: ${settings:-plain}; $(left) s left"
  seconds=$(( $(left) - 30 ))  # 30 s to pack the results
  if [ "$seconds" -lt 60 ]; then echo "no time left for $name"; return 0; fi
  # shellcheck disable=SC2086  # $settings is a list of options
  timeout --signal=INT -k 20 "$seconds" python3 -m daqkd sweep --data "$data" --teacher "$teacher" --device "$device" \
    --method ewgs --w-bits 3 --a-bits 3 --kd kd --gamma 1 --alpha 2 --temperature 4 --default none \
    --augs none+cutmix,autoaugment-cifar10+cutmix,autoaugment-imagenet+cutmix,autoaugment-svhn+cutmix,randaugment+cutmix,trivialaugment+cutmix,augmix+cutmix,randomerasing+cutmix \
    --epochs "$epochs" --seed 0 --jobs 9 --save-every 200 --eval-every 10 --no-progress $settings --out "$dir" "$@" \
    2>&1 | tee -a "$out/$name.log" || rc=${PIPESTATUS[0]}
  case $rc in
    0) echo "sweep $name finished" ;;
    124|137) echo "sweep $name stopped at the budget: the next window resumes it" ;;
    *) echo "sweep $name FAILED (rc $rc): see $name.log" ;;
  esac
  if tar -C "$dir" --exclude='*.safetensors' --exclude=tensorboard -czf "$out/$name.tar.gz.tmp" .; then
    mv "$out/$name.tar.gz.tmp" "$out/$name.tar.gz" && rm -rf "$dir"
  else
    echo "packing $name failed: $dir kept"
  fi
}
limited=benchmarks/results/cifar10-limited500-resnet20-w3a3
for name in ${SWEEPS:-limited500-h200 full-h200}; do
  case $name in
    limited500-h200) run_sweep "$name" cifar10-limited500-resnet20-w3a3-h200 "$limited/teacher" "$limited/rank.json" \
                       --seeds 3 --train-limit-per-class "${LIMIT:-500}" ${LIMIT:+--limit-per-class $LIMIT} \
                       --ewgs-delta 0 ;;  # as planned: the CPU sweep's setup (fixed delta 0), only the epochs differ
    full-h200) run_sweep "$name" cifar10-resnet20-w3a3-h200-100ep "$teacher" \
                 benchmarks/results/cifar10-resnet20-w3a3/rank.json ${LIMIT:+--limit-per-class $LIMIT} ;;
    *) echo "unknown sweep $name (limited500-h200, full-h200)"; exit 2 ;;
  esac
done
echo "done in $(( $(date +%s) - start )) s"
