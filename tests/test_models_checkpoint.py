"""Model registry, normalization and checkpoint loading."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from daqkd.checkpoint import read_checkpoint, save_checkpoint
from daqkd.errors import DaqkdError
from daqkd.loading import load_model
from daqkd.models import NormalizedModel, create_model, parse_normalization
from daqkd.quant import QuantConfig, quantize_model


@pytest.mark.parametrize("arch,params", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet56", 0.85),
                                         ("resnet20b", 0.27), ("resnet110b", 1.73),
                                         ("vgg8", None), ("vgg13", None), ("mobilenetv2", None)])
def test_cifar_models(arch: str, params: float | None) -> None:
    model = create_model(arch, 10).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    if params is not None:  # He et al. 2016, Table 6
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, abs=0.01)


def test_torchvision_model_and_unknown_name() -> None:
    assert create_model("resnet18", 7)(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(DaqkdError, match="unknown --arch 'resnet21'"):
        create_model("resnet21", 10)


def test_normalization_parsing_and_wrapper() -> None:
    norm = parse_normalization("0.5,0.5,0.5:0.25,0.25,0.25")
    assert parse_normalization(norm.spec()) == norm
    seen = {}
    inner = torch.nn.Identity()
    inner.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    NormalizedModel(inner, norm)(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(seen["x"], torch.full((1, 3, 2, 2), 2.0))  # (1 - 0.5) / 0.25
    for bad in ("imagenet2", "1,2:3,4", "0,0,0:1,0,1"):
        with pytest.raises(DaqkdError, match="bad --normalize"):
            parse_normalization(bad)


def test_shared_weights_load_as_published(shared_resnet20: Path) -> None:
    state, meta = read_checkpoint(shared_resnet20)
    assert meta == {} and not any(k.startswith("module.") for k in state)
    model, info = load_model(shared_resnet20, arch="resnet20", normalize="imagenet", num_classes=10)
    assert info["arch"] == "resnet20"
    assert torch.equal(model.model.linear.weight, state["linear.weight"])


def test_nested_prefixed_and_safetensors_roundtrip(tmp_path: Path) -> None:
    model = create_model("resnet20", 3)
    nested = {"model": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 3}
    torch.save(nested, tmp_path / "nested.pt")
    loaded, _ = load_model(tmp_path / "nested.pt", arch="resnet20", normalize="cifar10", num_classes=3)
    assert torch.equal(loaded.model.conv1.weight, model.conv1.weight)
    save_checkpoint(tmp_path / "m.safetensors", model, {"arch": "resnet20", "normalize": "cifar100"})
    loaded, info = load_model(
        tmp_path / "m.safetensors", arch=None, normalize=None, num_classes=3
    )  # arch, norm from metadata
    assert info["normalize"] == parse_normalization("cifar100").spec()
    assert torch.equal(loaded.model.linear.bias, model.linear.bias)
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_errors(tmp_path: Path, shared_resnet20: Path) -> None:
    with pytest.raises(DaqkdError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.th")
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage")
    with pytest.raises(DaqkdError, match="cannot read .* weights-only"):
        read_checkpoint(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(DaqkdError, match="cannot read .* as safetensors"):
        read_checkpoint(tmp_path / "junk.safetensors")
    with open(tmp_path / "code.pt", "wb") as f:  # a pickle that would run code if unpickled
        pickle.dump(Path("/"), f)
    with pytest.raises(DaqkdError, match="pickled Python objects, which daqkd never unpickles .* re-save it"):
        read_checkpoint(tmp_path / "code.pt")
    with pytest.raises(DaqkdError, match="has 10 classes but the data has 100"):
        load_model(shared_resnet20, arch="resnet20", normalize="imagenet", num_classes=100)
    with pytest.raises(DaqkdError, match="does not fit --arch resnet32: keys .* missing"):
        load_model(shared_resnet20, arch="resnet32", normalize="imagenet", num_classes=10)
    with pytest.raises(DaqkdError, match="pass --normalize"):
        load_model(shared_resnet20, arch="resnet20", normalize=None, num_classes=10)
    with pytest.raises(DaqkdError, match="pass --arch"):
        load_model(shared_resnet20, arch=None, normalize="imagenet", num_classes=10)


def test_option_b_layout() -> None:
    model = create_model("resnet20b", 10)
    convs = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    # 1x1 stride-2 shortcuts where the shape changes (first block of stages 2 and 3) and nowhere else
    assert {n: s for n, s in convs.items() if "downsample" in n} == {
        "layer2.0.downsample.0": (32, 16, 1, 1), "layer3.0.downsample.0": (64, 32, 1, 1)}
    assert model.layer2[0].downsample[0].stride == (2, 2)
    assert isinstance(model.layer2[0].downsample[1], torch.nn.BatchNorm2d)
    assert isinstance(model.layer2[1].downsample, torch.nn.Identity) and model.head is model.fc
    assert not any("downsample" in k or "shortcut" in k for k in create_model("resnet20", 10).state_dict())
    # the shortcut is applied: zeroing the 1x1 weights changes the output
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    with torch.no_grad():
        model.layer2[0].downsample[0].weight.zero_()
    assert not torch.allclose(before, model(x))


def test_published_weights_go_through_every_command(tmp_path: Path, tiny_folder: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A plain state dict (no daqkd metadata) is evaluated, ranked with, fine-tuned from and distilled
    from once --arch and --normalize say what it is."""
    from daqkd.cli import main
    from daqkd.data import load_image_folder

    torch.manual_seed(0)
    published = create_model("resnet20b", 3).eval()
    torch.save({"state_dict": {"module." + k: v for k, v in published.state_dict().items()}}, tmp_path / "pub.pth")
    data = ["--data", str(tiny_folder)]
    foreign = ["--arch", "resnet20b", "--normalize", "cifar100-chenyaofo"]
    assert main(["eval", str(tmp_path / "pub.pth"), *data, *foreign, "--out", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    test = load_image_folder(tiny_folder, "test")
    mean = torch.tensor([0.5070, 0.4865, 0.4409]).view(1, 3, 1, 1)
    std = torch.tensor([0.2673, 0.2564, 0.2761]).view(1, 3, 1, 1)
    with torch.no_grad():  # naive reference: normalize by hand, run the bare model
        predicted = published((test.images.float() / 255 - mean) / std).argmax(1)
    assert report["top1"] == pytest.approx(100 * float((predicted == test.labels).float().mean()))
    assert report["arch"] == "resnet20b" and report["w_bits"] == 32

    assert main(["rank", *data, "--weights", str(tmp_path / "pub.pth"), *foreign, "--augs", "none,randaugment",
                 "--no-progress", "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["teacher"]["arch"] == "resnet20b"

    assert main(["teacher", *data, "--init", str(tmp_path / "pub.pth"), *foreign, "--epochs", "1",
                 "--batch-size", "12", "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    assert main(["train", *data, "--teacher", str(tmp_path / "pub.pth"), *foreign, "--aug", "none", "--w-bits", "4",
                 "--a-bits", "4", "--epochs", "1", "--batch-size", "12", "--out", str(tmp_path / "s"),
                 "--no-progress"]) == 0
    student = json.loads((tmp_path / "s" / "config.json").read_text())["args"]
    assert student["normalize"] == "cifar100-chenyaofo"
    from daqkd.loading import load_model as load
    model, info = load(tmp_path / "s", num_classes=3)
    assert info["arch"] == "resnet20b" and info["quant"]["w_bits"] == 4
    assert info["normalize"] == parse_normalization("cifar100-chenyaofo").spec()
    assert model.model.layer2[0].downsample[0].weight_quantizer.bits == 4  # the 1x1 shortcut is quantized
    capsys.readouterr()

    # a daqkd checkpoint knows its architecture and statistics: contradicting them is an error
    for extra, message in ((["--arch", "resnet20"], "is a resnet20b checkpoint, not --arch resnet20"),
                           (["--normalize", "imagenet"], "not --normalize imagenet")):
        assert main(["eval", str(tmp_path / "t"), *data, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert main(["eval", str(tmp_path / "pub.pth"), *data, "--arch", "resnet20", "--normalize", "cifar10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--arch resnet20b fits them" in err[0], err


def test_named_normalizations_say_whose_they_are() -> None:
    assert parse_normalization("cifar100-chenyaofo").mean == (0.5070, 0.4865, 0.4409)
    assert parse_normalization("cifar100-chenyaofo").std == (0.2673, 0.2564, 0.2761)
    assert parse_normalization("cifar100-authors") == parse_normalization("0.5071,0.4867,0.4408:0.2675,0.2565,0.2761")


def test_checkpoints_say_their_format_and_older_ones_load_where_nothing_changed(tmp_path: Path) -> None:
    """A checkpoint without a format entry is format 1: it loads unless it is a W32/A-k EWGS model,
    whose activations compute otherwise since format 2 (tested in the parametrized test below)."""
    from safetensors.torch import save_file

    from daqkd.checkpoint import FORMAT_VERSION

    model = create_model("resnet20", 3)
    save_checkpoint(tmp_path / "new.safetensors", model, {"arch": "resnet20", "normalize": "cifar10"})
    assert read_checkpoint(tmp_path / "new.safetensors")[1]["format"] == FORMAT_VERSION == 2
    for quant in ('null', '{"method": "ewgs", "w_bits": 3, "a_bits": 3}', ('{"method": "lsq", "w_bits": 32, '
                  '"a_bits": 4}')):
        quantized = create_model("resnet20", 3)
        if quant != "null":
            quantize_model(quantized, QuantConfig(**json.loads(quant)))
        save_file({k: v.contiguous() for k, v in quantized.state_dict().items()}, str(tmp_path / "old.safetensors"),
                  metadata={"daqkd": '{"arch": "resnet20", "normalize": "cifar10", "num_classes": 3, "quant": '
                            + quant + '}'})
        _, info = load_model(tmp_path / "old.safetensors")
        assert info.get("format", 1) == 1 and info["quant"] == (json.loads(quant) if quant != "null" else None)


@pytest.mark.parametrize("metadata,message", [
    ("{not json", "damaged daqkd metadata (not JSON"),
    ('["arch"]', "damaged daqkd metadata (a list"),
    ('{"arch": "resnet20", "normalize": "cifar10", "num_classes": "3"}', "num_classes is '3'"),
    ('{"arch": "resnet20", "normalize": "cifar10", "num_classes": -1}', "num_classes is -1"),
    (('{"arch": "resnet20", "normalize": "cifar10", "num_classes": 3, "quant": {"method": "ewgs", "w_bits": 2, '
     '"warp": 1}}'), "does not know (warp)"),
    ('{"arch": "resnet20", "normalize": "cifar10", "num_classes": 3, "format": "2"}', "format is '2'"),
    (('{"arch": "resnet20", "normalize": "cifar10", "num_classes": 3, "quant": {"method": "ewgs", "w_bits": 2, '
      '"ewgs_delta": "x"}}'), "damaged daqkd metadata (quant: "),
    # validate()'s lines name CLI flags; in a file they name the stored field
    (('{"arch": "resnet20", "normalize": "cifar10", "num_classes": 3, "quant": {"method": "ewgs", "w_bits": 9}}'),
     "damaged daqkd metadata (quant: w_bits must be an integer from 1 to 8"),
    (('{"arch": "resnet20", "normalize": "cifar10", "num_classes": 3, "quant": {"method": "ewgs", '
      '"ewgs_hessian_probes": 0}}'), "damaged daqkd metadata (quant: ewgs_hessian_probes must be a positive"),
    ('{"arch": "resnet20", "normalize": "cifar10", "num_classes": 3, "format": 3}', "newer daqkd (format 3"),
    # no format entry: written before 2026-11-29, when W32/A-k EWGS activations returned [0, 1] codes
    (('{"arch": "resnet20", "normalize": "cifar10", "num_classes": 3, "quant": {"method": "ewgs", "w_bits": 32, '
     '"a_bits": 4}}'), "W32/A4 EWGS model from before 2026-11-29"),
])
def test_damaged_metadata_gives_one_line(metadata: str, message: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str], tiny_folder: Path) -> None:
    from safetensors.torch import save_file

    from daqkd.cli import main

    model = create_model("resnet20", 3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"),
              metadata={"daqkd": metadata})
    assert main(["eval", str(tmp_path / "m.safetensors"), "--data", str(tiny_folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert any(fix in err[0] for fix in ("retrain", "upgrade daqkd")), err  # the line names the fix


def test_torn_last_metrics_line_is_an_unfinished_epoch(tmp_path: Path) -> None:
    from daqkd.rundir import finished_run, read_history

    lines = [json.dumps({"epoch": e, "test_top1": 50.0 + e, "test_top5": 90.0, "seconds": 1.0}) for e in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:17])  # killed while writing epoch 2
    assert [h["epoch"] for h in read_history(tmp_path)] == [1]
    assert finished_run(tmp_path, 2) is None and finished_run(tmp_path, 1)["top1"] == 51.0
    (tmp_path / "metrics.jsonl").write_text(lines[0][:10] + "\n" + lines[1] + "\n")
    with pytest.raises(DaqkdError, match="line 1 is not JSON"):
        read_history(tmp_path)


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync of the new file, then the rename, then fsync of the directory: a power loss leaves the
    old file or the new one, never an empty one."""
    import os

    from daqkd import rundir

    events: list[str] = []
    real_fsync, real_replace, real_open = os.fsync, os.replace, os.open
    opened: dict[int, str] = {}

    def record_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        opened[fd] = Path(path).name
        return fd

    monkeypatch.setattr(os, "open", record_open)
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(f"fsync {opened.get(fd, '?')}"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"replace {Path(b).name}"), real_replace(a, b)))
    (tmp_path / "run").mkdir()
    rundir.write_json_atomic(tmp_path / "run" / "config.json", {"a": 1})
    assert events[0].startswith("fsync config.json.") and events[0].endswith(".tmp")
    assert events[1:] == ["replace config.json", "fsync run"]
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"a": 1}


@pytest.mark.parametrize("code,fails", [("EINVAL", False), ("ENOTSUP", False), ("EIO", True)])
def test_a_directory_fsync_the_file_system_refuses_is_not_a_failed_write(
        code: str, fails: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Network and FUSE file systems may refuse fsync on a directory: the file is already renamed
    into place then, so only a real I/O error fails the write."""
    import errno
    import os
    import stat

    from daqkd import rundir

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    if fails:
        with pytest.raises(OSError, match=os.strerror(errno.EIO)):
            rundir.write_json_atomic(tmp_path / "config.json", {"a": 1})
    else:
        rundir.write_json_atomic(tmp_path / "config.json", {"a": 1})
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}  # renamed into place either way
    assert not list(tmp_path.glob("*.tmp"))
