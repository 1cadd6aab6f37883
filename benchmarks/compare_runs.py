"""How far apart two runs ended: max |weight difference| over their last.safetensors and their last
train losses (issue 17's check of a `torchrun --nproc_per_node 1` run against a plain one).

    python benchmarks/compare_runs.py RUN_A RUN_B
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file


def main() -> None:
    runs = [Path(a) for a in sys.argv[1:3]]
    a, b = (load_file(run / "last.safetensors") for run in runs)
    if set(a) != set(b):
        raise SystemExit(f"the runs hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    losses = [json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"] for run in runs]
    print(json.dumps({"max_abs_weight_diff": diff, "train_loss": losses, "runs": [str(r) for r in runs]}))


if __name__ == "__main__":
    main()
