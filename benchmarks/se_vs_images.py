"""How the ranking's uncertainty shrinks with the number of images (issue 10).

Ranks --augs with the shared CIFAR-10 ResNet-20 on the first K train images per class of
../shared/data/cifar10 for each K in --sizes (seed 0) and prints, per K, each candidate's score
jackknife SE, the gap of the runner-up with its paired SE and the verdict. The last line is one
JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from daqkd.data import load_image_folder
from daqkd.loading import load_model
from daqkd.rank import RankConfig, TeacherRunner, rank_candidates

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10"
WEIGHTS = ROOT.parent / "shared" / "weights" / "cifar10" / "resnet20-12fca82f.th"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,20,50,100,200")
    parser.add_argument("--augs", default="none,autoaugment-cifar10,randaugment,none+cutmix")
    args = parser.parse_args()
    model, _ = load_model(WEIGHTS, arch="resnet20", normalize="imagenet", num_classes=10)
    device = torch.device("cpu")
    runner = TeacherRunner(model, device, 256, False)
    figures = {}
    for k in (int(s) for s in args.sizes.split(",")):
        data = load_image_folder(DATA, "train", k)
        report = rank_candidates(model, data, RankConfig(augs=args.augs.split(",")), device, runner=runner)
        stability = report["stability"]
        figures[str(k)] = {
            "images": len(data),
            "score_se": {c["name"]: round(c["score_se"], 4) for c in report["candidates"]},
            "selected": stability["selected"], "runner_up": stability["runner_up"],
            "gap": round(stability["gap"], 4), "gap_se": round(stability["gap_se"], 4),
            "verdict": stability["verdict"],
        }
        print(f"{k} per class: {figures[str(k)]}", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
