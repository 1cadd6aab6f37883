"""Speed of `daqkd rank` against teacher-only inference, and against the reference procedure.

ResNet-20 (shared weights) on the train images of ../shared/data/cifar10 (all 50,000 by default).
Figures:
- teacher_images_per_s: the teacher alone on the cached clean images, same batching and device;
- rank_images_per_s_{none,autoaugment_cifar10}: a full ranking pass (augmentation, forward,
  statistics); ratio_* = ranking / teacher-only (goal >= 0.8);
- all_seconds (with --all): wall time of ranking the paper's 16 candidates (goal < 12 min);
- reference_ratio: wall time of the authors' procedure (a pass for the centroids, a second pass
  for the scores, ten more for the variance, predictions stored) / ours, measured on
  --reference-limit images per class.

The last line printed is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from daqkd.augment import PAPER_CANDIDATES, Candidate
from daqkd.data import load_image_folder
from daqkd.loading import load_model
from daqkd.rank import RankConfig, TeacherRunner, rank_candidates
from daqkd.runtime import mix_seed, select_device

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10"
WEIGHTS = ROOT.parent / "shared" / "weights" / "cifar10" / "resnet20-12fca82f.th"


def teacher_only(runner: TeacherRunner, images: torch.Tensor, batch_size: int) -> float:
    """Images/s of the teacher alone over the cached images, in a seeded shuffled order."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for b in range(0, len(images), batch_size):
        runner(images[order[b:b + batch_size]])
    return len(images) / (time.perf_counter() - start)


@torch.inference_mode()
def reference_procedure(runner: TeacherRunner, images: torch.Tensor, labels: torch.Tensor, name: str,
                        batch_size: int, num_classes: int) -> float:
    """Seconds for the authors' procedure on one candidate: pass 1 stores predictions and forms the
    centroids, pass 2 (fresh draws) scores KL to them, ten more passes give the variance."""
    candidate = Candidate(name, num_classes)
    start = time.perf_counter()

    def one_pass(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        probs, targets = [], []
        for b in range(0, len(images), batch_size):
            g = torch.Generator().manual_seed(mix_seed(seed, b))
            x, t = candidate(images[b:b + batch_size], labels[b:b + batch_size], g)
            probs.append(torch.softmax(runner(x).double(), 1))
            targets.append(t if t.ndim == 2 else torch.nn.functional.one_hot(t, num_classes).double())
        return torch.cat(probs), torch.cat(targets).double()

    p, t = one_pass(1)
    centroids = (t.T @ p) / t.sum(0)[:, None]
    p, t = one_pass(2)
    _kl = (p * (p.clamp_min(1e-300).log() - (t @ centroids).clamp_min(1e-300).log())).sum(1).mean()
    means = torch.stack([one_pass(3 + k)[0].mean(0) for k in range(10)])
    _variance = means.std(0).mean()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit-per-class", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--compile", choices=("on", "off"), default="on")
    parser.add_argument("--all", action="store_true", help="also time --augs all (16 candidates)")
    parser.add_argument("--reference-limit", type=int, default=100, help="images per class for the reference")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = select_device(args.device)
    t0 = time.perf_counter()
    data = load_image_folder(DATA, "train", args.limit_per_class)
    decode_s = time.perf_counter() - t0
    model, _ = load_model(WEIGHTS, arch="resnet20", normalize="imagenet", num_classes=10)
    compiled = args.compile == "on"
    runner = TeacherRunner(model, device, args.batch_size, compiled)
    t0 = time.perf_counter()
    runner(data.images[: args.batch_size])  # compile / warm up
    warmup_s = time.perf_counter() - t0
    figures: dict[str, object] = {
        "images": len(data), "device": str(device), "compiled": compiled, "threads": torch.get_num_threads(),
        "decode_seconds": round(decode_s, 2), "warmup_seconds": round(warmup_s, 2),
    }
    teacher_before = teacher_only(runner, data.images, args.batch_size)
    print(f"teacher only: {teacher_before:.0f} img/s", file=sys.stderr, flush=True)

    def ranking(augs: list[str], images=data) -> dict:
        config = RankConfig(augs=augs, batch_size=args.batch_size)
        return rank_candidates(runner.model, images, config, device, runner=runner)

    report = ranking(["none", "autoaugment-cifar10"])
    # the machine is noisy: take the faster of two teacher-only passes, bracketing the ranking
    teacher = max(teacher_before, teacher_only(runner, data.images, args.batch_size))
    figures["teacher_images_per_s"] = round(teacher, 1)
    for row in report["candidates"]:
        key = row["name"].replace("-", "_")
        figures[f"rank_images_per_s_{key}"] = round(row["images_per_s"], 1)
        figures[f"ratio_{key}"] = round(row["images_per_s"] / teacher, 3)
        print(f"{row['name']}: {row['images_per_s']:.0f} img/s", file=sys.stderr, flush=True)
    if args.all:
        t0 = time.perf_counter()
        ranking(PAPER_CANDIDATES)
        figures["all_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"--augs all: {figures['all_seconds']} s", file=sys.stderr, flush=True)

    subset = load_image_folder(DATA, "train", args.reference_limit)
    name = "autoaugment-cifar10+cutmix"
    ref_s = reference_procedure(runner, subset.images, subset.labels, name, args.batch_size, 10)
    ours_s = ranking([name], subset)["candidates"][0]["seconds"]
    figures["reference_images"] = len(subset)
    figures["reference_seconds"] = round(ref_s, 2)
    figures["ours_seconds_same_images"] = round(ours_s, 2)
    figures["reference_ratio"] = round(ref_s / ours_s, 2)
    figures["machine"] = f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
