"""Training throughput: a W2A2 EWGS + KD ResNet-20 epoch against an FP epoch and the data pipeline.

On the train images of ../shared/data/cifar10 (all 50,000 by default), batch 256, Adam, DA
autoaugment-cifar10+cutmix, teacher = the shared FP ResNet-20 (its forward is part of the student's
step). Figures (last line, JSON):
- images_per_s: student training images/s (forward, KD loss with the teacher, backward, steps);
- ratio_to_fp: student epoch time / FP epoch time (plain CE, same data and DA; goal <= 1.5);
- data_ratio: data-pipeline-only images/s (cached batch + augmentation) / student images/s (goal >= 3).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from daqkd.augment import Candidate
from daqkd.data import load_image_folder
from daqkd.distill import create_loss
from daqkd.loading import load_model
from daqkd.quant import QuantConfig, quantize_model
from daqkd.runtime import mix_seed, select_device
from daqkd.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10"
WEIGHTS = ROOT.parent / "shared" / "weights" / "cifar10" / "resnet20-12fca82f.th"
AUG = "autoaugment-cifar10+cutmix"


def pipeline_images_per_s(data, batch_size: int, device: torch.device) -> float:
    candidate = Candidate(AUG, data.num_classes)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for b in range(len(data) // batch_size):
        idx = order[b * batch_size:(b + 1) * batch_size]
        candidate(data.take(idx).to(device), data.labels[idx].to(device), torch.Generator().manual_seed(mix_seed(0, b)))
    return (len(data) // batch_size * batch_size) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit-per-class", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = select_device(args.device)
    train = load_image_folder(DATA, "train", args.limit_per_class)
    test = load_image_folder(DATA, "test", 10)  # evaluation is not timed; keep it short
    config = TrainConfig(epochs=1, batch_size=args.batch_size, aug=AUG, optimizer="adam", lr=1e-3, quant_lr=1e-5)
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("fp", "student"):
            model, info = load_model(WEIGHTS, arch="resnet20", normalize="imagenet", num_classes=10)
            teacher = None
            if name == "student":
                teacher, _ = load_model(WEIGHTS, arch="resnet20", normalize="imagenet", num_classes=10)
                quantize_model(model.model, QuantConfig("ewgs", 2, 2))
            trainer = Trainer(model, create_loss("kd" if teacher is not None else "none"), train, test, config,
                              Path(tmp) / name, device, info, teacher=teacher, progress=False)
            record = trainer.fit()
            seconds[name] = record["seconds"]
            print(f"{name}: {record['images_per_s']:.0f} img/s", flush=True)
    pipeline = pipeline_images_per_s(train, args.batch_size, device)
    trained = (len(train) // args.batch_size) * args.batch_size
    student_ips = trained / seconds["student"]
    print(json.dumps({
        "images": trained, "device": str(device), "threads": torch.get_num_threads(),
        "images_per_s": round(student_ips, 1), "fp_images_per_s": round(trained / seconds["fp"], 1),
        "ratio_to_fp": round(seconds["student"] / seconds["fp"], 3),
        "pipeline_images_per_s": round(pipeline, 1), "data_ratio": round(pipeline / student_ips, 2),
    }))


if __name__ == "__main__":
    main()
