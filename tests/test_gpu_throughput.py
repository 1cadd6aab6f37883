"""benchmarks/gpu_throughput.py on the CPU, small: its JSON line and what it measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_throughput_runs_small_on_cpu(shared_cifar10: Path, shared_resnet20: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--device", "cpu", "--data",
         str(shared_cifar10), "--teacher", str(shared_resnet20), "--images", "64", "--batch-size", "16",
         "--epochs", "1", "--augs", "none,augmix+cutmix", "--jobs", "2"],
        check=False, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["jobs"] == 2 and result["images"] == 60
    assert result["graph_breaks"] == 0
    assert set(result["per_da"]) == {"none", "augmix+cutmix"}
    # the base crop + flip alone against AugMix's chains (see RESULTS.md for every DA)
    assert 10 < result["per_da"]["none"]["op_calls_per_batch"] < 100
    assert 1000 < result["per_da"]["augmix+cutmix"]["op_calls_per_batch"] < 3000
    rates = [v["images_per_s"] for v in result["per_da"].values()]
    assert all(r > 0 for r in rates) and result["student_images_per_s"] > 0
    assert result["wall_images_per_s"] < result["student_images_per_s"]  # start-up and evaluation included
