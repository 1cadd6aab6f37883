"""Model registry, normalization and checkpoint loading."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from daqkd.checkpoint import load_classifier, read_checkpoint, save_checkpoint
from daqkd.errors import DaqkdError
from daqkd.models import NormalizedModel, create_model, parse_normalization


@pytest.mark.parametrize("arch,params", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet56", 0.85),
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
    model, info = load_classifier(shared_resnet20, "resnet20", 10, "imagenet")
    assert info["arch"] == "resnet20"
    assert torch.equal(model.model.linear.weight, state["linear.weight"])


def test_nested_prefixed_and_safetensors_roundtrip(tmp_path: Path) -> None:
    model = create_model("resnet20", 3)
    nested = {"model": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 3}
    torch.save(nested, tmp_path / "nested.pt")
    loaded, _ = load_classifier(tmp_path / "nested.pt", "resnet20", 3, "cifar10")
    assert torch.equal(loaded.model.conv1.weight, model.conv1.weight)
    save_checkpoint(tmp_path / "m.safetensors", model, {"arch": "resnet20", "normalize": "cifar100"})
    loaded, info = load_classifier(tmp_path / "m.safetensors", None, 3, None)  # arch, norm from metadata
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
    with pytest.raises(DaqkdError, match="weights-only"):
        read_checkpoint(tmp_path / "code.pt")
    with pytest.raises(DaqkdError, match="has 10 classes but the data has 100"):
        load_classifier(shared_resnet20, "resnet20", 100, "imagenet")
    with pytest.raises(DaqkdError, match="does not fit --arch resnet32: keys .* missing"):
        load_classifier(shared_resnet20, "resnet32", 10, "imagenet")
    with pytest.raises(DaqkdError, match="pass --normalize"):
        load_classifier(shared_resnet20, "resnet20", 10, None)
    with pytest.raises(DaqkdError, match="pass --arch"):
        load_classifier(shared_resnet20, None, 10, "imagenet")
