"""`daqkd rank` under torchrun: two processes split the pass and all-reduce the statistics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_cli_rank import run_rank, tiny_teacher  # noqa: F401  (fixture)


def test_two_processes_match_one(tiny_folder: Path, tiny_teacher: Path, tmp_path: Path) -> None:  # noqa: F811
    args = ["--data", str(tiny_folder), "--weights", str(tiny_teacher), "--augs", "none,trivialaugment+cutmix",
            "--batch-size", "8", "--variance-group", "4", "--seed", "5"]
    single = run_rank(args, tmp_path / "one.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "daqkd.cli", "rank", *args, "--no-progress", "--out", str(tmp_path / "two.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    double = json.loads((tmp_path / "two.json").read_text())
    assert double["images"] == single["images"]
    one = {c["name"]: c for c in single["candidates"]}
    for c in double["candidates"]:
        for key in ("cmi", "centroid_ce", "ce", "accuracy", "score"):
            assert c[key] == pytest.approx(one[c["name"]][key], abs=1e-9), (c["name"], key)
        # shards are 16 and 20 images: groups of 4 never straddle them, so the variance matches too
        assert c["variance"] == pytest.approx(one[c["name"]]["variance"], abs=1e-9)
