"""Speed of a custom per-image DA (PerImageDA around torchvision v2, image by image) against the
built-in batched DA of the same name, on the same cached uint8 images (one CPU thread by default).

Prints one JSON line: images/s of each and their ratio, per DA.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchvision.transforms import v2

from daqkd.augment import Candidate
from daqkd.augment.custom import PerImageDA
from daqkd.data import load_image_folder

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
TORCHVISION = {
    "randaugment": v2.RandAugment(),
    "trivialaugment": v2.TrivialAugmentWide(),
    "autoaugment-cifar10": v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
    "augmix": v2.AugMix(),
}


def images_per_s(candidate, images: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    start = time.perf_counter()
    for b in range(0, len(images), batch):
        candidate(images[b:b + batch], labels[b:b + batch], torch.Generator().manual_seed(b))
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit-per-class", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_image_folder(DATA, "train", args.limit_per_class)
    figures: dict[str, float | int] = {"images": len(data), "threads": args.threads}
    for name, policy in TORCHVISION.items():
        built_in = Candidate(name, data.num_classes)
        custom = PerImageDA(f"v2-{name}", v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), policy]))
        ours = images_per_s(built_in, data.images, data.labels, args.batch_size)
        theirs = images_per_s(custom, data.images, data.labels, args.batch_size)
        figures.update({f"{name}_builtin_images_per_s": round(ours), f"{name}_custom_images_per_s": round(theirs),
                        f"{name}_ratio": round(ours / theirs, 1)})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
