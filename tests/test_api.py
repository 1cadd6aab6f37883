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


@pytest.mark.parametrize(("changes", "message"), [
    ({"epochs": "1"}, "StudentOptions.epochs must be a whole number, got '1' (str)"),
    ({"epochs": 1.5}, "StudentOptions.epochs must be a whole number, got 1.5 (float)"),
    ({"batch_size": "10"}, "StudentOptions.batch_size must be a whole number, got '10' (str)"),
    ({"seed": "0"}, "StudentOptions.seed must be a whole number, got '0' (str)"),
    ({"lr": "abc"}, "StudentOptions.lr must be a number, got 'abc' (str)"),
    ({"aug": ["none"]}, "StudentOptions.aug must be a string (or None), got ['none'] (list)"),
    ({"no_amp": 1}, "StudentOptions.no_amp must be True or False, got 1 (int)"),
    ({"w_bits": True}, "StudentOptions.w_bits must be a whole number, got True (bool)"),
])
def test_options_check_their_types_before_anything_is_made(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(DaqkdError) as error:
        daqkd.StudentOptions(data="d", teacher="t", out=str(tmp_path / "run"), **changes)
    assert str(error.value) == message
    assert not (tmp_path / "run").exists()


def test_options_take_paths_numpy_scalars_and_ints_for_floats(tmp_path: Path) -> None:
    options = daqkd.StudentOptions(data=tmp_path / "data", out=tmp_path / "run", epochs=np.int64(3), lr=1)
    assert options.data == str(tmp_path / "data") and options.out == str(tmp_path / "run")
    assert options.epochs == 3 and type(options.epochs) is int and options.lr == 1.0 and type(options.lr) is float
    assert daqkd.SweepOptions(seeds=2, val_per_class=np.int32(5)).val_per_class == 5


@pytest.mark.parametrize(("extra", "message"), [
    (["--lr", "-1"], "--lr must be 0 or more, got -1.0"),
    (["--quant-lr=-1e-5"], "--quant-lr must be 0 or more, got -1e-05"),
    (["--weight-decay", "-1"], "--weight-decay must be 0 or more, got -1.0"),
    (["--temperature", "0"], "--temperature must be above 0 (KD divides the logits by it), got 0.0"),
    (["--alpha", "-2"], "--alpha must be 0 or more, got -2.0"),
])
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_bad_numbers_give_one_line_and_no_run_directory(tmp_path: Path, tiny_folder: Path,
                                                        capsys: pytest.CaptureFixture[str], extra: list[str],
                                                        message: str, command: str) -> None:
    out = tmp_path / "run"
    args = [command, "--data", str(tiny_folder), "--teacher", str(tmp_path / "teacher"), "--out", str(out), *extra]
    assert main(args + (["--aug", "none"] if command == "train" else ["--augs", "none"])) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"daqkd: error: {message}" and not out.exists()
