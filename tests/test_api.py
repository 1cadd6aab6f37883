"""The Python API: the same results as the CLI, custom per-image DAs, torch Datasets, the README example."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

import daqkd
from daqkd.augment.custom import PerImageDA
from daqkd.cli import main
from daqkd.data import load_image_folder
from daqkd.errors import DaqkdError

from .conftest import REPO, SHARED


def _history(run: Path) -> list[dict]:
    timing = ("seconds", "images_per_s")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_and_api_give_identical_runs(tmp_path: Path, tiny_folder: Path) -> None:
    common = {"data": str(tiny_folder), "seed": 3, "epochs": 2, "batch_size": 12, "no_progress": True}
    assert main(["teacher", "--data", str(tiny_folder), "--seed", "3", "--epochs", "2", "--batch-size", "12",
                 "--arch", "resnet20", "--lr", "0.05", "--out", str(tmp_path / "cli-t"), "--no-progress"]) == 0
    daqkd.train_teacher(daqkd.TeacherOptions(**common, arch="resnet20", lr=0.05, out=str(tmp_path / "api-t")))
    assert main(["train", "--data", str(tiny_folder), "--seed", "3", "--epochs", "2", "--batch-size", "12",
                 "--teacher", str(tmp_path / "cli-t"), "--method", "lsq", "--w-bits", "3", "--a-bits", "3",
                 "--aug", "randaugment+cutmix", "--out", str(tmp_path / "cli-s"), "--no-progress"]) == 0
    # a notebook's numpy numbers: the same run, stored as Python numbers (JSON cannot hold numpy's)
    daqkd.train_student(daqkd.StudentOptions(**common, teacher=str(tmp_path / "api-t"), method="lsq",
                                             w_bits=np.int64(3), a_bits=np.int32(3), aug="randaugment+cutmix",
                                             out=str(tmp_path / "api-s")))
    for kind in ("t", "s"):
        cli, api = tmp_path / f"cli-{kind}", tmp_path / f"api-{kind}"
        assert _history(cli) == _history(api)
        a, b = daqkd.loading.load_model(cli)[0].state_dict(), daqkd.loading.load_model(api)[0].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        paths = {"out": None, "teacher": None}  # the only options that differ: the two runs' directories
        stored = [json.loads((run / "config.json").read_text())["args"] | paths for run in (cli, api)]
        assert stored[0] == stored[1]


class Shift(torch.nn.Module):
    """A per-image DA with its own random draw: roll the image by a random offset."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.roll(int(torch.randint(-8, 9, (1,))), dims=-1)


def test_custom_per_image_da(tmp_path: Path, tiny_folder: Path) -> None:
    da = PerImageDA("shift", Shift())
    images = load_image_folder(tiny_folder).images[:8]
    same = images[:1].expand(8, -1, -1, -1)
    first = da(same, torch.zeros(8), torch.Generator().manual_seed(1))[0]
    assert len({tuple(x.flatten().tolist()) for x in first}) > 1  # one draw per image, not per batch
    again = da(same, torch.zeros(8), torch.Generator().manual_seed(1))[0]
    assert torch.equal(first, again)  # the seed fixes the draws
    # naive reference: the global RNG seeded as PerImageDA documents, the callable image by image
    seed = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(1)))
    torch.manual_seed(seed)
    assert torch.equal(first, torch.stack([Shift()(im) for im in same]))

    options = daqkd.RankOptions(data=str(tiny_folder), weights=str(tmp_path / "t.safetensors"), augs="none",
                                batch_size=12, variance_group=4, no_progress=True)
    torch.manual_seed(0)
    model = daqkd.models.create_model("resnet20", 3)
    daqkd.checkpoint.save_checkpoint(tmp_path / "t.safetensors", model, {"arch": "resnet20", "normalize": "cifar10"})
    both = daqkd.rank_augmentations(options, custom=[da])
    alone = daqkd.rank_augmentations(options)
    assert {c["name"] for c in both["candidates"]} == {"none", "shift"}
    none_both = next(c for c in both["candidates"] if c["name"] == "none")
    assert none_both["score"] == alone["candidates"][0]["score"]  # the built-in's figures are unchanged
    assert both["config"]["augs"] == ["none", "shift"]

    class Folder(torch.utils.data.Dataset):  # the same images as a torch Dataset
        def __init__(self) -> None:
            self.data = load_image_folder(tiny_folder)
            self.classes = self.data.classes

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return self.data.images[i], int(self.data.labels[i])

    from_dataset = daqkd.rank_augmentations(options, data=Folder())
    assert from_dataset["candidates"][0]["score"] == alone["candidates"][0]["score"]

    with pytest.raises(DaqkdError, match="built-in candidate's name"):
        PerImageDA("none", Shift())
    with pytest.raises(DaqkdError, match="must return uint8"):
        PerImageDA("float", v2.ToDtype(torch.float32, scale=True))(images, torch.zeros(8), torch.Generator())


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert 'Path("../shared")' in code
    monkeypatch.chdir(tmp_path)
    code = code.replace('Path("../shared")', f"Path({str(SHARED)!r})")
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102  (our own README's example, run as a user would)
    printed = capsys.readouterr().out
    assert "crop-flip-jitter" in printed and "W4A4 top-1" in printed
    assert (tmp_path / "runs" / "api-student" / "model.safetensors").is_file()
    torch_top1 = re.search(r"W4A4 top-1 ([0-9.]+)%", printed).group(1)
    assert f"top-1 {torch_top1}%" in printed.split("ONNX")[1]  # the exported file agrees on these 100 images
    assert os.getcwd() == str(tmp_path)
