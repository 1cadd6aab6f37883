"""ONNX export: each method at 2, 3, 4 and 8 bits computes in onnxruntime what it computes in PyTorch.

The reference is the PyTorch model in eval mode (eager quantizer kernels, see conftest). What is
compared, on 300 real CIFAR-10 test images through the pretrained ResNet-20 quantized without
training:
* every quantized input: onnxruntime's quantizer output against the PyTorch quantizer applied to
  onnxruntime's own input of that layer (same input, so any difference is the quantizer's own
  rounding): at most 1e-5 of the values may move, by one level at most (measured: none move);
* every weight: the dequantized weight in the graph against the fake-quantized PyTorch weight;
* the integer codes read back from the file's initializers: within the k-bit range, 4-bit types up
  to 4 bits;
* the logits and top-1 of the whole model. Convolutions and BatchNorm accumulate in a different
  order in onnxruntime (float32 rounding, ~1e-6 relative); a value that close to a rounding boundary
  lands one level away, and untrained low-bit nets amplify that (a 2-bit DoReFa ResNet-20 without
  QAT is at chance level). So top-1 must agree on >= 97 % of the images and where it does not,
  PyTorch's own top-2 margin was small compared with its logits; a trained student agrees on
  9,998 of 10,000 images (README, "Deploying").
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from daqkd.cli import main
from daqkd.data import load_image_folder
from daqkd.errors import DaqkdError
from daqkd.export import ExportedLayer, OnnxModel, export_form, export_onnx
from daqkd.loading import load_model
from daqkd.quant import QUANTIZERS, QuantConfig, quantize_model, quantized_layers
from daqkd.quant.base import Identity

BITS = (2, 3, 4, 8)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """300 real CIFAR-10 test images (30 per class), uint8."""
    from .conftest import CIFAR10

    assert CIFAR10.is_dir(), f"tests need the shared CIFAR-10 ImageFolder at {CIFAR10}"
    return load_image_folder(CIFAR10, "test", limit_per_class=30).images


def quantized_resnet20(config: QuantConfig, images: torch.Tensor) -> torch.nn.Module:
    from .conftest import RESNET20

    model, _ = load_model(RESNET20, arch="resnet20", normalize="imagenet", num_classes=10)
    model.eval()
    quantize_model(model.model, config)
    with torch.no_grad():
        model(images[:256])  # calibration: the quantizers initialize on their first batch
    return model


def quantizer_io(proto: onnx.ModelProto) -> list[tuple[str, str]]:
    """(input, output) value names of each activation quantizer in graph order: from the Sub or
    QuantizeLinear/GreaterOrEqual that starts it to the DequantizeLinear (or Add) that ends it."""
    initializers = {t.name for t in proto.graph.initializer}
    producer = {out: node for node in proto.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    pairs = []
    for node in proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "GreaterOrEqual") or node.input[0] in initializers:
            continue
        start = node.input[0]
        before = producer.get(start)
        if before is not None and before.op_type == "Sub" and before.input[1] in initializers:
            start = before.input[0]
        end = node
        while end.op_type != "DequantizeLinear":
            (end,) = consumers[end.output[0]]
        after = consumers[end.output[0]]
        if len(after) == 1 and after[0].op_type == "Add" and after[0].input[1] in initializers:
            end = after[0]
        pairs.append((start, end.output[0]))
    return pairs


def dequantized_weights(proto: onnx.ModelProto) -> dict[str, str]:
    """Code initializer name -> the value name of the float weight the graph makes from it."""
    initializers = {t.name for t in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            end = node.output[0]
            for other in proto.graph.node:
                if other.op_type == "Add" and end in other.input and other.input[1] in initializers:
                    end = other.output[0]
            out[node.input[0]] = end
    return out


def case_config(method: str, bits: int) -> QuantConfig:
    """Per-channel weights at 3 and 8 bits; first/last layers at 8 bits (at 4), like the others
    ("same", at 2, so the stem's signed input is quantized too), else FP."""
    first_last: str | int = {2: "same", 4: 8}.get(bits, "fp")
    return QuantConfig(method, bits, bits, per_channel=bits in (3, 8), first_last=first_last)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", sorted(QUANTIZERS))
def test_onnx_computes_what_pytorch_computes(method: str, bits: int, images: torch.Tensor, tmp_path: Path) -> None:
    model = quantized_resnet20(case_config(method, bits), images)
    path = tmp_path / "model.onnx"
    report = export_onnx(model, path, metadata={"classes": [f"c{i}" for i in range(10)], "w_bits": bits})
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {p.key: p.value for p in proto.metadata_props}["w_bits"] == str(bits)
    assert proto.opset_import[0].version == 21

    layers = quantized_layers(model.model)
    initializers = {t.name: t for t in proto.graph.initializer}
    for name, layer in layers.items():
        if isinstance(layer.weight_quantizer, Identity):
            continue
        k = layer.weight_quantizer.bits
        codes_tensor = initializers[f"model.{name}.weight_codes"]
        codes = numpy_helper.to_array(codes_tensor).astype(np.int64)
        grid = layer.weight_quantizer.grid(layer.weight.detach())
        if grid.qmin < 0:
            assert -(1 << (k - 1)) <= codes.min() and codes.max() <= (1 << (k - 1)) - 1, (name, k)
            expected_type = TensorProto.INT4 if k <= 4 else TensorProto.INT8
        else:
            assert 0 <= codes.min() and codes.max() <= (1 << k) - 1, (name, k)
            expected_type = TensorProto.UINT4 if k <= 4 else TensorProto.UINT8
        assert codes_tensor.data_type == expected_type, (name, k)
        assert len(np.unique(codes)) > 1
        assert report.layers[f"model.{name}"]["storage"] == TensorProto.DataType.Name(expected_type)

    # expose every quantizer's input and output and every dequantized weight as graph outputs
    pairs = quantizer_io(proto)
    weights = dequantized_weights(proto)
    extra = [name for pair in pairs for name in pair] + list(weights.values())
    for name in extra:
        proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    probe = tmp_path / "probe.onnx"
    onnx.save(proto, str(probe))
    session = OnnxModel(probe, optimization="none").session
    values = dict(zip(["logits", *extra], session.run(None, {"images": images.numpy()}), strict=True))

    act_quantizers = [m.act_quantizer for m in layers.values() if not isinstance(m.act_quantizer, Identity)]
    assert len(act_quantizers) == len(pairs)
    moved = total = 0
    for quantizer, (x_name, y_name) in zip(act_quantizers, pairs, strict=True):
        with torch.no_grad():
            expected = quantizer(torch.from_numpy(values[x_name]))
        levels = (expected - torch.from_numpy(values[y_name])).abs() / quantizer.grid().out_scale
        moved += int((levels > 1e-3).sum())
        total += levels.numel()
        assert float(levels.max()) <= 1 + 1e-3, "a quantized input moved by more than one level"
    assert moved <= 1e-5 * total, f"{moved} of {total} quantized inputs moved a level"

    for name, layer in layers.items():
        if isinstance(layer.weight_quantizer, Identity):
            continue
        with torch.no_grad():
            expected = layer.weight_quantizer(layer.weight)
        got = torch.from_numpy(values[weights[f"model.{name}.weight_codes"]])
        assert torch.allclose(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max())), name

    with torch.no_grad():
        reference = model(images)
    logits = torch.from_numpy(values["logits"])
    top_ref, top_onnx = reference.argmax(1), logits.argmax(1)
    differ = (top_ref != top_onnx).nonzero().flatten()
    assert len(differ) <= 0.03 * len(images), f"top-1 differs on {len(differ)} of {len(images)} images"
    scale = float(reference.abs().max())
    for i in differ.tolist():
        assert float(reference[i, top_ref[i]] - reference[i, top_onnx[i]]) < 0.5 * scale


def test_export_form_is_the_model_in_pytorch(images: torch.Tensor) -> None:
    """Each rewritten layer (custom ops, integer codes) gives the original layer's output on the same
    input, in PyTorch: the grid every method declares describes what it computes."""
    for method in sorted(QUANTIZERS):
        model = quantized_resnet20(QuantConfig(method, 3, 3, per_channel=method in ("lsq", "ewgs")), images)
        inputs: dict[str, torch.Tensor] = {}
        layers = quantized_layers(model.model)
        hooks = [layer.register_forward_pre_hook(
            lambda m, args, name=name, seen=inputs: seen.__setitem__(name, args[0])) for name, layer in layers.items()]
        with torch.no_grad():
            model(images[:32])
        for hook in hooks:
            hook.remove()
        exported = export_form(model)
        assert sum(isinstance(m, ExportedLayer) for m in exported.modules()) == 18
        for name, layer in layers.items():
            with torch.no_grad():
                expected, got = layer(inputs[name]), exported.model.get_submodule(name)(inputs[name])
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())), (method, name)


@pytest.mark.parametrize("method,first_last", [("lsq", "same"), ("dorefa", "same"), ("ewgs", "fp")])
def test_one_bit_layers_export(method: str, first_last: str, images: torch.Tensor, tmp_path: Path) -> None:
    """1 bit: LSQ's signed inputs (the stem's) use the binary levels {-s, +s} (GreaterOrEqual in the
    graph, since sign(0) = +1); codes are stored in 4-bit types."""
    model = quantized_resnet20(QuantConfig(method, 1, 1, first_last=first_last), images)
    report = export_onnx(model, tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert ("GreaterOrEqual" in ops) == (method == "lsq")
    assert {layer["storage"] for layer in report.layers.values() if layer["weight_range"]} == {"UINT4"}
    with torch.no_grad():
        reference = model(images[:100])
    logits = OnnxModel(tmp_path / "m.onnx", optimization="none")(images[:100])
    assert (reference.argmax(1) == logits.argmax(1)).float().mean() >= 0.97


def test_an_uncalibrated_model_is_refused(tmp_path: Path) -> None:
    from .conftest import RESNET20

    model, _ = load_model(RESNET20, arch="resnet20", normalize="imagenet", num_classes=10)
    quantize_model(model.model, QuantConfig("lsq", 4, 4))
    with pytest.raises(DaqkdError, match="never calibrated"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_an_image_size_the_model_cannot_take_is_one_error(tmp_path: Path) -> None:
    """VGG-8 max-pools 32x32 down to 1x1 five times: 8x8 images cannot pass, and nothing is written."""
    from daqkd.models import create_model
    from daqkd.models.normalize import NormalizedModel, parse_normalization

    model = NormalizedModel(create_model("vgg8", 10), parse_normalization("imagenet")).eval()
    with pytest.raises(DaqkdError, match=r"does not run on 8x8 images .*pass the --image-size it was trained on"):
        export_onnx(model, tmp_path / "m.onnx", image_size=8)
    assert list(tmp_path.iterdir()) == []
    assert export_onnx(model, tmp_path / "m.onnx", image_size=32).image_size == 32


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny teacher run and an EWGS W3A3 student of it (CLI, 1 epoch each)."""
    from .conftest import make_image_folder

    root = tmp_path_factory.mktemp("export_runs")
    data = make_image_folder(root / "data")
    common = ["--data", str(data), "--seed", "0", "--batch-size", "12", "--no-progress", "--epochs", "1"]
    assert main(["teacher", *common, "--arch", "resnet20", "--lr", "0.05", "--out", str(root / "teacher")]) == 0
    assert main(["train", *common, "--teacher", str(root / "teacher"), "--method", "ewgs", "--w-bits", "3",
                 "--a-bits", "3", "--out", str(root / "student")]) == 0
    return data, root / "teacher", root / "student"


def test_export_and_eval_from_the_command_line(trained_runs: tuple[Path, Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    data, teacher, student = trained_runs
    out = tmp_path / "a folder" / "student.onnx"
    out.parent.mkdir()
    assert main(["export", str(student), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "3-bit weights stored as UINT4" in printed and "18 layers" in printed
    hint = next(line for line in printed.splitlines() if line.startswith("check it: "))
    assert shlex.split(hint.removeprefix("check it: "))[:3] == ["daqkd", "eval", str(out)]  # pasteable: quoted
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["classes"]) == ["class_0", "class_1", "class_2"]
    assert (meta["w_bits"], meta["a_bits"], meta["method"], meta["arch"]) == ("3", "3", "ewgs", "resnet20")
    assert json.loads(meta["quant"])["method"] == "ewgs" and "uint8" in meta["input"]

    reports = {}
    for name, target, extra in (("torch", student, []), ("onnx", out, ["--onnx-optimization", "none"]),
                                ("onnx-all", out, [])):
        report_file = tmp_path / f"{name}.json"
        assert main(["eval", str(target), "--data", str(data), "--out", str(report_file), *extra]) == 0
        reports[name] = json.loads(report_file.read_text())
    printed = capsys.readouterr().out
    assert "run by onnxruntime, CPU, graph optimization none" in printed
    for name in ("onnx", "onnx-all"):
        assert reports[name]["top1"] == reports["torch"]["top1"]
        assert reports[name]["per_class_top1"] == reports["torch"]["per_class_top1"]
        assert reports[name]["loss"] == pytest.approx(reports["torch"]["loss"], rel=1e-3)
        assert (reports[name]["w_bits"], reports[name]["method"]) == (3, "ewgs")
    # 3-bit middle layers stored in 4 bits, the FP stem/head and BatchNorm in 32
    assert 5 < reports["onnx"]["size"]["compression"] < 8

    fp = tmp_path / "teacher.onnx"
    assert main(["export", str(student), "--fp", "--out", str(fp)]) == 0
    assert "full precision: no quantized layers" in capsys.readouterr().out
    fp_report = tmp_path / "fp.json"
    assert main(["eval", str(fp), "--data", str(data), "--out", str(fp_report)]) == 0
    assert main(["eval", str(teacher), "--data", str(data), "--out", str(tmp_path / "t.json")]) == 0
    assert json.loads(fp_report.read_text())["top1"] == json.loads((tmp_path / "t.json").read_text())["top1"]


@pytest.mark.parametrize("args,message", [
    (["export", "{student}"], "pass --out FILE.onnx"),
    (["export", "{student}", "--out", "{tmp}/m.pt"], "name the file FILE.onnx"),
    (["export", "{teacher}", "--fp", "--out", "{tmp}/m.onnx"], "names no teacher"),
    (["export", "{tmp}/nothing", "--out", "{tmp}/m.onnx"], "nothing"),
    (["export", "{student}", "--out", "{tmp}/m.onnx", "--image-size", "0"], "--image-size must be 1 to 4096"),
    (["export", "{student}", "--out", "{tmp}/m.onnx", "--image-size", "100000"],
     "--image-size must be 1 to 4096 (the export traces the model on a batch of that size), got 100000"),
    (["eval", "{tmp}/bad.onnx", "--data", "{data}"], "is not a valid ONNX model"),
    (["eval", "{tmp}/missing.onnx", "--data", "{data}"], "does not exist"),
    (["eval", "{onnx}", "--data", "{data}", "--arch", "resnet20"], "drop --arch"),
    (["eval", "{onnx}", "--data", "{other}"], "other classes than the data's"),
    (["eval", "{onnx}", "--data", "{big}"], "takes 32x32 images but the data's are 40x40"),
])
def test_export_errors_are_one_line(args: list[str], message: str, trained_runs: tuple[Path, Path, Path],
                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from .conftest import make_image_folder

    data, teacher, student = trained_runs
    onnx_file = tmp_path / "ok.onnx"
    fills = {"student": student, "teacher": teacher, "tmp": tmp_path, "data": data, "onnx": onnx_file}
    if "{onnx}" in args:
        assert main(["export", str(student), "--out", str(onnx_file)]) == 0
    if "{other}" in args:
        fills["other"] = make_image_folder(tmp_path / "other", classes=4, per_class=2, splits=("test",))
    if "{big}" in args:
        fills["big"] = make_image_folder(tmp_path / "big", per_class=2, size=(40, 40), splits=("test",))
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf")
    capsys.readouterr()
    assert main([a.format(**fills) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("daqkd: error:") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "m.onnx").exists()


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch, trained_runs: tuple[Path, Path, Path],
                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import builtins

    real_import = builtins.__import__

    def no_onnx(name: str, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxscript", "onnxruntime"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    monkeypatch.setattr("importlib.import_module", lambda name, *a: no_onnx(name))
    _, _, student = trained_runs
    assert main(["export", str(student), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'daqkd[export]'" in err and err.count("\n") == 1


def test_weight_codes_find_their_own_layer_by_whole_name() -> None:
    from daqkd.export import _owner_of

    layers = {"features_3": "features.3", "features_31": "features.31", "conv1": "conv1",
              "layer1_0_conv1": "layer1.0.conv1"}
    assert _owner_of("model.features.31.weight_codes", layers) == "features.31"
    assert _owner_of("p_model_features_3_weight_codes", layers) == "features.3"
    assert _owner_of("model.layer1.0.conv1.weight_codes", layers) == "layer1.0.conv1"
    assert _owner_of("model.conv1.weight_codes", layers) == "conv1"
    assert _owner_of("model.features.30.weight_codes", layers) is None
