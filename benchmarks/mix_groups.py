"""Spread of a CutMix candidate's score across seeds by CutMix mixing group (issue 10).

Ranks none+cutmix on the first 20 train images per class of ../shared/data/cifar10 (one batch of
200) with the shared ResNet-20 at seeds 0..N-1, for each --groups value (0: one draw per batch),
and prints the mean score, its standard deviation across seeds and the mean jackknife SE. The last
line is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--groups", default="0,32,8")
    parser.add_argument("--limit-per-class", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_image_folder(DATA, "train", args.limit_per_class)
    model, _ = load_model(WEIGHTS, arch="resnet20", normalize="imagenet", num_classes=10)
    device = torch.device("cpu")
    runner = TeacherRunner(model, device, 256, False)
    figures = {}
    for group in (int(g) for g in args.groups.split(",")):
        scores, ses = [], []
        for seed in range(args.seeds):
            config = RankConfig(augs=["none+cutmix"], seed=seed, mix_group=group)
            row = rank_candidates(model, data, config, device, runner=runner)["candidates"][0]
            scores.append(row["score"])
            ses.append(row["score_se"])
        figures[f"group_{group}"] = {"mean": round(statistics.fmean(scores), 4),
                                     "std": round(statistics.stdev(scores), 4),
                                     "mean_se": round(statistics.fmean(ses), 4)}
        print(f"group {group}: {figures[f'group_{group}']}", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
