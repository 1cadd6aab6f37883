"""Sweep-scale student throughput (issue 16): students of every candidate DA training side by side.

Each DA's W3A3 EWGS ResNet-20 student (KD from the shared FP ResNet-20, Adam, batch 256) trains
``--epochs`` epochs of ``--images`` train images in its own spawned process, ``--jobs`` at a time,
through `daqkd.train_student` (what `daqkd sweep` runs): the teacher's forward, the augmentation
and the optimizer are all inside the timed loop. The last epoch is timed (the first one holds
compilation and warm-up). Also, on the CPU and independent of --device:
- operator calls (aten ops at the top of the profiler's call tree) to augment one batch of 256, per DA;
- graph breaks of the training step's forward and backward under torch.compile (torch._dynamo.explain).

Last line, JSON:
- student_images_per_s: the aggregate rate of the timed epochs, jobs x (their images / their
  seconds, summed over students): the sum of the students' rates when all run at once, the
  sweep's serial rate with --jobs 1;
- wall_images_per_s: every image of every epoch / wall seconds from the first start to the last
  finish (compilation, evaluation and process starts included: a lower bound);
- per_da: {DA: {"images_per_s", "op_calls_per_batch"}}; graph_breaks; device.

    python benchmarks/gpu_throughput.py --device cpu --images 512 --epochs 1 --augs none+cutmix  # small
    python benchmarks/gpu_throughput.py --device cuda --jobs 9 --compile --augment-workers 1      # H200
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from daqkd.api import StudentOptions, train_student
from daqkd.augment import PAPER_CANDIDATES, Candidate, parse_candidates
from daqkd.data import ImageSet, load_data
from daqkd.distill import DistillTask, create_loss
from daqkd.models import NormalizedModel, create_model, parse_normalization
from daqkd.quant import QuantConfig, quantize_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10"
WEIGHTS = ROOT.parent / "shared" / "weights" / "cifar10" / "resnet20-12fca82f.th"
DEFAULT_AUGS = ",".join([*PAPER_CANDIDATES, "none"])


def op_calls_per_batch(aug: str, batch: int = 256, seeds: int = 3) -> int:
    """Top-level aten calls to augment ``batch`` random 32x32 images under ``aug`` on the CPU, the
    most over ``seeds`` draws (policies draw how many ops run)."""
    from torch.profiler import ProfilerActivity, profile

    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch) % 10
    candidate = Candidate(aug, 10)
    counts = []
    for seed in range(seeds):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            candidate(images, labels, torch.Generator().manual_seed(seed))
        counts.append(sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None))
    return max(counts)


def graph_breaks(method: str, w_bits: int, a_bits: int) -> int:
    """Graph breaks of the student step's forward (teacher, fake-quantized student, KD loss) and,
    through the autograd Functions, its backward, as `--compile` traces it."""
    norm = parse_normalization("cifar10")
    student = NormalizedModel(create_model("resnet20", 10), norm)
    quantize_model(student.model, QuantConfig(method, w_bits, a_bits))
    teacher = NormalizedModel(create_model("resnet20", 10), norm).eval()
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    student.eval()
    student(x)  # calibrate the quantizers
    student.train()
    task = DistillTask(create_loss("kd"), student, teacher)
    torch._dynamo.reset()
    return torch._dynamo.explain(task.__call__)(x, torch.arange(16) % 10).graph_break_count


def train_one(task: tuple[StudentOptions, tuple[ImageSet, ImageSet], int]) -> tuple[str, dict, int, float, float]:
    """(aug, last epoch's metrics, images trained, start, end) of one student (in a worker)."""
    options, data, threads = task
    torch.set_num_threads(threads)
    start = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        train_student(options, data)
    end = time.time()
    history = [json.loads(line) for line in (Path(options.out) / "metrics.jsonl").read_text().splitlines()]
    seen = len(history) * (len(data[0]) // options.batch_size) * options.batch_size
    return options.aug or "", history[-1], seen, start, end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--teacher", default=str(WEIGHTS),
                        help="a daqkd run or checkpoint, or published CIFAR-10 ResNet-20 weights (imagenet statistics)")
    parser.add_argument("--augs", default=DEFAULT_AUGS, help="the paper's 8 DAs with CutMix and the default none")
    parser.add_argument("--images", type=int, default=50_000, help="train images per epoch (the first per class)")
    parser.add_argument("--epochs", type=int, default=2, help="the last one is timed")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=1, help="students training at once")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="daqkd train --compile")
    parser.add_argument("--augment-workers", type=int, default=0, help="daqkd train --augment-workers")
    parser.add_argument("--method", default="ewgs")
    parser.add_argument("--bits", type=int, default=3)
    args = parser.parse_args()

    augs = parse_candidates(args.augs)
    torch.set_num_threads(1)  # operator counts and traces: one thread, like a worker
    calls = {aug: op_calls_per_batch(aug) for aug in augs}
    breaks = graph_breaks(args.method, args.bits, args.bits)

    train = load_data(args.data, None, "train", max(1, args.images // 10), None)
    test = load_data(args.data, None, "test", 10, None)  # evaluated once at the end; not timed
    for split in (train, test):
        split.images.share_memory_()
        split.labels.share_memory_()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = min(args.jobs, len(augs))
    threads = max(1, (cores - jobs * args.augment_workers) // jobs)
    daqkd_teacher = Path(args.teacher).is_dir() or args.teacher.endswith(".safetensors")  # carries its metadata
    published = {} if daqkd_teacher else {"arch": "resnet20", "normalize": "imagenet"}
    with tempfile.TemporaryDirectory() as tmp:
        tasks = [(StudentOptions(
            data=args.data, device=args.device, out=str(Path(tmp) / aug), epochs=args.epochs,
            batch_size=args.batch_size, aug=aug, optimizer="adam", lr=1e-3, weight_decay=5e-4,
            eval_every=args.epochs, augment_workers=args.augment_workers, compile=args.compile,
            teacher=args.teacher, **published, method=args.method,
            w_bits=args.bits, a_bits=args.bits, no_progress=True), (train, test), threads) for aug in augs]
        if jobs == 1:
            finished = [train_one(task) for task in tasks]
        else:
            from daqkd.sweep_runner import _StudentContext

            with _StudentContext().Pool(jobs, maxtasksperchild=1) as pool:
                finished = pool.map(train_one, tasks)
    device = str(torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    wall = max(f[4] for f in finished) - min(f[3] for f in finished)
    per_da = {aug: {"images_per_s": round(last["images_per_s"], 1), "op_calls_per_batch": calls[aug]}
              for aug, last, _, _, _ in finished}
    timed_images = sum(last["images_per_s"] * last["seconds"] for _, last, _, _, _ in finished)
    timed_seconds = sum(last["seconds"] for _, last, _, _, _ in finished)
    result = {
        "student_images_per_s": round(jobs * timed_images / timed_seconds, 1),
        "wall_images_per_s": round(sum(f[2] for f in finished) / wall, 1),
        "per_da": per_da, "graph_breaks": breaks, "device": device, "cores": cores, "jobs": jobs,
        "threads_per_student": threads, "compile": args.compile, "augment_workers": args.augment_workers,
        "images": len(train), "epochs": args.epochs, "batch_size": args.batch_size,
        "method": f"{args.method} W{args.bits}A{args.bits}",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
