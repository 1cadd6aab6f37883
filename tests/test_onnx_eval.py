"""`daqkd eval FILE.onnx` on files that daqkd did not write: what is checked, what is refused, what is
named as unchecked. The models are built by hand: the logits are an image's three channel means, so
on images whose channel k is bright for class k, top-1 is 100 % by construction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper

from daqkd.cli import main


def channel_mean_model(path: Path, *, classes: int = 3, batch: int | str = "batch", channels: int = 3,
                       logits_type: int = TensorProto.FLOAT, label_output_first: bool = False,
                       logits_name: str = "logits", metadata: dict[str, str] | None = None) -> Path:
    """images uint8 (batch, channels, 8, 8) -> the channel means times a (channels, classes) matrix whose
    first min(channels, classes) columns are the identity."""
    weight = np.zeros((channels, classes), dtype=np.float32)
    for k in range(min(channels, classes)):
        weight[k, k] = 1.0
    nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x", "axes"], ["means"], keepdims=0),
             helper.make_node("MatMul", ["means", "weight"], ["scores"])]
    outputs = []
    if logits_type == TensorProto.FLOAT:
        nodes.append(helper.make_node("Identity", ["scores"], [logits_name]))
    else:
        nodes.append(helper.make_node("Cast", ["scores"], [logits_name], to=logits_type))
    outputs.append(helper.make_tensor_value_info(logits_name, logits_type, [batch, classes]))
    if label_output_first:
        nodes.append(helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0))
        outputs.insert(0, helper.make_tensor_value_info("label", TensorProto.INT64, [batch]))
    graph = helper.make_graph(
        nodes, "channel_means",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, [batch, channels, 8, 8])], outputs,
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
                     onnx.numpy_helper.from_array(weight, "weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    """7 test images per class (21: not a multiple of any batch below); channel k bright for class k."""
    labels = np.arange(21) % 3
    images = np.full((21, 8, 8, 3), 10, dtype=np.uint8)
    images[np.arange(21), :, :, labels] = 200
    path = tmp_path / "d.npz"
    np.savez(path, x_train=images, y_train=labels, x_test=images, y_test=labels, classes=np.array(["a", "b", "c"]))
    return path


@pytest.fixture()
def run_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """eval(model, data) -> (exit code, stdout, stderr, the --out report or None)."""
    def run(model: Path, data: Path) -> tuple[int, str, str, dict | None]:
        out = tmp_path / "report.json"
        out.unlink(missing_ok=True)
        code = main(["eval", str(model), "--data", str(data), "--out", str(out)])
        printed = capsys.readouterr()
        return code, printed.out, printed.err, json.loads(out.read_text()) if out.exists() else None
    return run


@pytest.mark.parametrize("batch", ["batch", 1, 4], ids=["dynamic", "fixed-1", "fixed-4"])
@pytest.mark.parametrize("label_output_first", [False, True], ids=["logits-only", "label-then-logits"])
def test_a_foreign_file_runs_and_says_what_went_unchecked(data: Path, tmp_path: Path, run_eval, batch: int | str,
                                                          label_output_first: bool) -> None:
    model = channel_mean_model(tmp_path / "m.onnx", batch=batch, label_output_first=label_output_first)
    code, out, err, report = run_eval(model, data)
    assert code == 0, err
    assert report["top1"] == 100.0 and report["images"] == 21
    assert (report["arch"], report["w_bits"], report["a_bits"], report["method"]) == (None, None, None, None)
    assert report["unchecked"] == ["class order (its outputs are taken as the data's 3 classes in order)",
                                   "architecture, normalization and bit widths (no daqkd metadata)"]
    assert out.startswith("model of unknown architecture and bit widths: top-1 100.00%"), out
    assert "W32A32" not in out and "?" not in out.splitlines()[0]
    notes = err.strip().splitlines()
    assert len(notes) == 2 and all(n.startswith(f"daqkd eval: note: {model} does not say its ") for n in notes), err


def test_a_daqkd_file_is_checked_and_reported_with_its_bit_widths(data: Path, tmp_path: Path, run_eval) -> None:
    metadata = {"arch": "resnet20", "normalize": "cifar10", "classes": json.dumps(["a", "b", "c"]),
                "quant": json.dumps({"method": "ewgs", "w_bits": 4, "a_bits": 4})}
    model = channel_mean_model(tmp_path / "m.onnx", metadata=metadata)
    code, out, err, report = run_eval(model, data)
    assert code == 0 and err == "" and report["unchecked"] == []
    assert out.startswith("resnet20 W4A4: top-1 100.00%"), out
    renamed = channel_mean_model(tmp_path / "r.onnx", metadata={**metadata, "classes": json.dumps(["a", "c", "b"])})
    code, _, err, _ = run_eval(renamed, data)
    assert code == 2 and "was exported for other classes than the data's" in err


@pytest.mark.parametrize("build,message", [
    ({"classes": 2}, "outputs 2 classes but the data has 3: pass the data set it was trained on"),
    ({"classes": 4}, "outputs 4 classes but the data has 3"),
    ({"logits_type": TensorProto.INT64}, ("output logits is tensor(int64) ['batch', 3]: daqkd eval scores float "
                                          "logits (batch, classes), not labels or integer scores")),
    ({"logits_type": TensorProto.INT64, "logits_name": "scores_int"},
     "has outputs scores_int tensor(int64) ['batch', 3]: daqkd eval needs one float (batch, classes) output"),
    ({"channels": 1}, "takes 1-channel images ['batch', 1, 8, 8]; daqkd feeds RGB (B, 3, H, W) uint8"),
    ({"metadata": {"arch": "resnet20", "quant": "4"}},
     "has damaged daqkd metadata (quant is '4', not an object with integer w_bits and a_bits"),
    ({"metadata": {"arch": "resnet20", "quant": json.dumps([4, 4])}}, "quant is '[4, 4]', not an object"),
    ({"metadata": {"arch": "resnet20", "quant": json.dumps({"method": "ewgs", "w_bits": "4", "a_bits": 4})}},
     "not an object with integer w_bits and a_bits"),
    ({"metadata": {"arch": "resnet20", "classes": json.dumps("abc")}}, "classes is 'abc', not a list of names"),
    ({"metadata": {"arch": json.dumps(3)}}, "arch is 3, not a name"),
], ids=["fewer-classes", "more-classes", "int64-logits", "int64-unnamed", "gray-input", "quant-string",
        "quant-list", "quant-string-bits", "classes-string", "arch-number"])
def test_files_that_cannot_be_scored_rightly_are_one_error_line(data: Path, tmp_path: Path, run_eval, build: dict,
                                                                message: str) -> None:
    model = channel_mean_model(tmp_path / "m.onnx", **build)
    code, _out, err, report = run_eval(model, data)
    assert code == 2 and report is None
    assert err.startswith("daqkd: error: ") and err.count("\n") == 1 and message in err, err


def test_a_dynamic_class_count_is_checked_on_the_logits(data: Path, tmp_path: Path, run_eval) -> None:
    """A (batch, classes) output whose width the signature leaves open is checked on the first call."""
    model = channel_mean_model(tmp_path / "m.onnx", classes=2)
    proto = onnx.load(str(model))
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "classes"
    onnx.save(proto, str(model))
    code, _, err, _ = run_eval(model, data)
    assert code == 2 and "outputs 2 classes but the data has 3" in err and err.count("\n") == 1, err
