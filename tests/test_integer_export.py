"""daqkd.integer_export: onnxruntime fuses every quantized convolution and residual addition into
integer kernels, and each quantizer lands on PyTorch's level except at rounding ties."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from daqkd import integer_export
from daqkd.cli import main
from daqkd.data import load_image_folder
from daqkd.errors import DaqkdError
from daqkd.integer_export import active, export_integer_onnx, input_grid
from daqkd.loading import load_model
from daqkd.models import NormalizedModel, create_model
from daqkd.models.normalize import NAMED_NORMALIZATIONS
from daqkd.quant import QuantConfig, Quantizer, quantize_model
from daqkd.quant.ewgs import EWGSQuantizer


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """200 real CIFAR-10 test images (20 per class), uint8."""
    from .conftest import CIFAR10

    assert CIFAR10.is_dir(), f"tests need the shared CIFAR-10 ImageFolder at {CIFAR10}"
    return load_image_folder(CIFAR10, "test", limit_per_class=20).images


def student(config: QuantConfig, images: torch.Tensor, arch: str = "resnet20") -> NormalizedModel:
    """The shared pretrained ResNet-20 (or a seeded option-B one), quantized and calibrated."""
    from .conftest import RESNET20

    if arch == "resnet20":
        model, _ = load_model(RESNET20, arch="resnet20", normalize="imagenet", num_classes=10)
    else:
        torch.manual_seed(0)
        model = NormalizedModel(create_model(arch, 10), NAMED_NORMALIZATIONS["imagenet"])
        with torch.no_grad():  # a trained network's BatchNorms: fresh ones fold to zero biases, which round exactly
            for bn in model.modules():
                if isinstance(bn, torch.nn.BatchNorm2d):
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.normal_(0.0, 0.1)
                    bn.running_mean.normal_(0.0, 0.1)
                    bn.running_var.uniform_(0.5, 1.5)
    model.eval()
    quantize_model(model.model, config)
    with torch.no_grad():
        model(images[:128])  # calibration: the quantizers initialize on their first batch
    return model


def session(path: Path, optimized: bool = True, keep: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if keep is not None:
        options.optimized_model_filepath = str(keep)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def optimized_ops(path: Path, tmp_path: Path) -> Counter:
    keep = tmp_path / "optimized.onnx"
    session(path, keep=keep)
    return Counter(node.op_type for node in onnx.load(str(keep)).graph.node)


def largest_pair_sums(optimized: onnx.ModelProto) -> dict[str, int]:
    """QLinearConv name -> 2 x its largest raw uint8 input code x its largest |int8 weight code|: the
    int16 sum of two u8 x s8 products that AVX2's vpmaddubsw saturates above 32767. The input's top is
    the max of the uint8 Clip that produces it (through layout Transposes), else 255."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in optimized.graph.initializer}
    producer = {out: node for node in optimized.graph.node for out in node.output}
    sums = {}
    for node in optimized.graph.node:
        if node.op_type != "QLinearConv":
            continue
        source = producer.get(node.input[0])
        while source is not None and source.op_type == "Transpose":
            source = producer.get(source.input[0])
        top = 255
        if source is not None and source.op_type == "Clip":
            top = int(values[source.input[2]])
        sums[node.name] = 2 * top * int(np.abs(values[node.input[3]].astype(np.int64)).max())
    return sums


@pytest.mark.parametrize("arch,residual_bits,requantization,convs,adds", [
    # every conv, the two option-A shortcuts as 0/1 convolutions, the identity convolution that keeps
    # the stem's codes out of NCHW; the 9 requantizations of a block's 8-bit input to its first conv's
    # bits as QLinearAdds of a constant
    ("resnet20", 8, "add", 18 + 2 + 1, 9 + 9),
    ("resnet20b", 8, "add", 18 + 2 + 1, 9 + 9 + 2),  # the two projection shortcuts, their inputs' requantizations
    # where some arithmetic of onnxruntime's QLinearAdd would miss the quantizer's codes: depthwise
    # 1x1 convolutions instead
    ("resnet20", 8, "depthwise", 18 + 2 + 9 + 1, 9),
    ("resnet20b", 8, "depthwise", 18 + 2 + 9 + 2 + 1, 9),
    ("resnet20", 32, "add", 9, 0),  # float residual stream: only the blocks' first convolutions
])
def test_onnxruntime_fuses_every_quantized_conv_and_addition(arch: str, residual_bits: int, requantization: str,
                                                             convs: int, adds: int, images: torch.Tensor,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = student(QuantConfig("ewgs", 4, 4, residual_bits=residual_bits), images, arch)
    if requantization == "depthwise":
        monkeypatch.setattr(integer_export, "qlinear_add_with_constant", lambda *args: [("sse2", np.full(256, -1))])
    report = export_integer_onnx(model, tmp_path / "int.onnx")
    ops = optimized_ops(tmp_path / "int.onnx", tmp_path)
    assert ops["QLinearConv"] == convs, ops
    # no integer kernel can saturate AVX2's int16 pair sums (this CPU has VNNI, which does not)
    pair_sums = largest_pair_sums(onnx.load(str(tmp_path / "optimized.onnx")))
    assert len(pair_sums) == convs and max(pair_sums.values()) <= 32767, pair_sums
    assert ops["QLinearAdd"] == adds, ops
    assert ops["Conv"] == 1  # the full-precision stem (FusedConv: the float second convolutions)
    assert ops["FusedConv"] == (0 if residual_bits == 8 else 9), ops
    if residual_bits == 8:  # float only at the ends: the stem's QuantizeLinear, the DequantizeLinear before pooling
        assert (ops["QuantizeLinear"], ops["DequantizeLinear"]) == (1, 1), ops
        assert ops["Transpose"] == 2, ops  # into NHWC after the stem, out of it before pooling: none in between
        # the requantized codes of a block's input end at 255, so that the kernel's saturation is their
        # clamp: the only Clips left are the tops of the blocks' first convolutions' outputs
        assert ops["Clip"] == 9, ops
        # the model's eval folds every kernel's bias as the file does, projections included
        assert all(layer.bias_in_eval and layer.bias_error < 1e-4 for layer in report.layers.values()
                   if layer.kernel == "integer"), report.layers
    kernels = Counter(layer.kernel for layer in report.layers.values())
    expected_integer = 18 + (2 if arch == "resnet20b" else 0) if residual_bits == 8 else 9
    assert kernels["integer"] == expected_integer, kernels
    weights = onnx.load(str(tmp_path / "int.onnx"))
    codes = [t for t in weights.graph.initializer if t.name.endswith("_weight_codes") and "shortcut" not in t.name]
    assert codes and all(t.data_type == onnx.TensorProto.INT8 for t in codes)


@pytest.mark.parametrize("method,bits", [("ewgs", 4), ("ewgs", 2), ("lsq", 3), ("pact", 3), ("dorefa", 2)])
def test_every_quantizer_lands_on_pytorchs_level_except_at_a_rounding_tie(method: str, bits: int,
                                                                          images: torch.Tensor,
                                                                          tmp_path: Path) -> None:
    """Layer by layer: PyTorch is fed onnxruntime's codes at every quantizer (teacher forcing), so each
    quantizer compares one layer's arithmetic. A code may differ only by one level, and only where
    PyTorch's value before rounding lies within the int32 bias's rounding error (or float noise) of
    a half level; the fused integer graph and the unoptimized QDQ graph are both checked."""
    model = student(QuantConfig(method, bits, bits, residual_bits=8), images)
    if method == "ewgs":  # trained EWGS moves the lower bounds off the calibrated min(x) = 0, both ways
        for i, quantizer in enumerate(m for m in model.modules() if isinstance(m, EWGSQuantizer) and not m.is_weight):
            quantizer.lower.data = quantizer.upper.data * (0.05 if (i + i // 2) % 2 else -0.2)
    report = export_integer_onnx(model, tmp_path / "int.onnx", expose_codes=True)
    if method == "ewgs":  # a lower bound above 0 can push a requantized code below 0: those keep their Clip
        shifted = [n for n in onnx.load(str(tmp_path / "int.onnx")).graph.node if n.name.endswith("_exposed")]
        assert 0 < len(shifted) < 9, len(shifted)
    tolerance = max(layer.bias_error for layer in report.layers.values()) + 1e-4
    assert tolerance < 2e-4  # the model's eval adds the kernel's bias rounding: what remains is float noise
    x = images[:64]
    quantizers = {name: m for name, m in model.model.named_modules() if isinstance(m, Quantizer)
                  and active(m) is not None and not m.is_weight}
    for optimized in (True, False):
        sess = session(tmp_path / "int.onnx", optimized)
        names = [o.name for o in sess.get_outputs()]
        compared = forced_comparison(model, quantizers, dict(zip(names, sess.run(None, {"images": x.numpy()}))), x)
        assert set(compared) == set(quantizers)
        for name, (value, ours, theirs) in compared.items():
            moved = ours != theirs
            assert np.abs(ours - theirs).max() <= 1, name
            assert moved.mean() < 0.01, (name, moved.mean())
            distance = np.abs(value[moved] - np.floor(value[moved]) - 0.5)
            assert (distance <= tolerance).all(), (name, distance.max(), tolerance)
            if name.endswith("conv1.act_quantizer"):  # requantized by a kernel checked on all 256 codes
                assert not moved.any(), name


@pytest.mark.parametrize("method,bits", [("ewgs", 2), ("lsq", 4)])
def test_eval_adds_the_kernels_bias_rounding_so_the_file_computes_what_pytorch_does(method: str, bits: int,
                                                                                  images: torch.Tensor,
                                                                                  tmp_path: Path) -> None:
    """With integer residuals the model's eval adds to each BatchNorm the int32 bias's rounding (at
    most half a step of x_scale x weight_scale), recomputed when a parameter changes and absent in
    training mode; free-running, PyTorch and onnxruntime then give the same logits."""
    from daqkd.integer_export import fold_quantized_conv, integer_convolutions

    model = student(QuantConfig(method, bits, bits, residual_bits=8), images)
    net = model.model
    x = images[64:128]
    with torch.no_grad():
        model(x)
    convs = integer_convolutions(net)
    assert len(convs) == 18
    for name, conv, bn, out, input_top in convs:
        in_grid, out_grid = input_grid(conv.act_quantizer, name), input_grid(out, name)
        folded = fold_quantized_conv(conv, bn, name, in_grid.out_scale, input_top, out_grid)
        correction = bn.kernel_bias.double().numpy()
        assert np.abs(correction).max() > 0, name  # the rounding is real, ...
        assert (np.abs(correction) <= folded.bias_scale / 2 * (1 + 1e-5)).all(), name  # ... and at most half a step
        assert np.allclose(folded.bias + correction, folded.kernel_bias(), rtol=0, atol=1e-6 * out_grid.scale)
    report = export_integer_onnx(model, tmp_path / "int.onnx")
    assert all(layer.bias_in_eval and layer.bias_error < 1e-4
               for layer in report.layers.values() if layer.kernel == "integer")
    theirs = session(tmp_path / "int.onnx").run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        ours = model(x).numpy()
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(ours).max()

    bn = convs[0][2]
    before = bn.kernel_bias.clone()
    with torch.no_grad():
        bn.bias.data += 0.37 * torch.from_numpy(fold_quantized_conv(
            convs[0][1], bn, "c", input_grid(convs[0][1].act_quantizer, "c").out_scale,
            convs[0][4], input_grid(convs[0][3], "c")).bias_scale)
        model(x[:2])
    assert not torch.equal(bn.kernel_bias, before)  # a .data change is seen, and the rounding follows it
    model.train()
    with torch.no_grad():
        model(x[:2])
    assert all("kernel_bias" not in m.__dict__ for m in net.modules())


def forced_comparison(model: torch.nn.Module, quantizers: dict[str, Quantizer], outputs: dict[str, np.ndarray],
                      x: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Run ``model`` on ``x`` with each quantizer's output replaced by onnxruntime's codes of it
    (``outputs``, named after the quantizer); per quantizer (PyTorch's value before rounding, its
    codes, onnxruntime's codes)."""
    compared, hooks = {}, []

    def force(module: Quantizer, args: tuple[torch.Tensor], out: torch.Tensor, name: str) -> torch.Tensor:
        grid = input_grid(module, name)
        value = ((args[0] - grid.shift) / grid.scale).double().numpy()  # float32, as the quantizers
        ours = (torch.round(out / grid.out_scale) + grid.zero_point).double().numpy()
        recomputed = np.clip(np.round(value), grid.qmin, grid.qmax) + grid.zero_point
        assert (recomputed != ours).mean() < 1e-5, name  # the model's codes are its value's rounding
        key = [n for n in outputs if n.startswith(name.replace(".", "_") + "_")]
        theirs = outputs[key[-1]].astype(np.float64)
        compared[name] = (value, ours, theirs)
        return (torch.from_numpy(theirs).float() - grid.zero_point) * grid.out_scale

    for name, module in quantizers.items():
        hooks.append(module.register_forward_hook(lambda m, a, o, name=name: force(m, a, o, name)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return compared


def test_what_cannot_run_in_integer_kernels_is_one_line(images: torch.Tensor, tmp_path: Path) -> None:
    cases = [
        (student(QuantConfig("ewgs", 8, 8, residual_bits=8), images),
         "layer1.0.conv1: its 8-bit weight codes reach +-255, beyond int8"),
        (student(QuantConfig("lsq", 8, 8, residual_bits=8), images),
         "8-bit inputs times 8-bit weights can overflow the int16 pair sums of AVX2 int8 kernels"),
        (NormalizedModel(quantize_model(create_model("vgg8", 10), QuantConfig("ewgs", 4, 4)),
                         NAMED_NORMALIZATIONS["imagenet"]), "--integer supports the CIFAR ResNets"),
    ]
    for model, message in cases:
        with pytest.raises(DaqkdError, match=re.escape(message)) as info:
            export_integer_onnx(model, tmp_path / "bad.onnx")
        assert "\n" not in str(info.value) and "export without --integer" in str(info.value)
        assert not (tmp_path / "bad.onnx").exists()


def test_cli_integer_export_and_refusals(tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = ["--data", str(tiny_folder), "--epochs", "1", "--batch-size", "8", "--no-progress", "--aug", "none"]
    assert main(["teacher", *common, "--arch", "resnet20", "--out", str(tmp_path / "teacher")]) == 0
    assert main(["train", *common, "--teacher", str(tmp_path / "teacher"), "--w-bits", "4", "--a-bits", "4",
                 "--residual-bits", "8", "--out", str(tmp_path / "student")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "student"), "--integer", "--out", str(tmp_path / "s.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "18 convolutions: integer in and out (QLinearConv)" in printed
    assert "9 residual additions: integer (QLinearAdd)" in printed
    for extra, message in ((["--fp"], "the --fp teacher has no integer form"),):
        assert main(["export", str(tmp_path / "student"), "--integer", *extra, "--out", str(tmp_path / "x.onnx")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert main(["export", str(tmp_path / "teacher"), "--integer", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "is a full-precision model: --integer exports quantized students" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def qlinear_add_session(scale_a: float, zero_a: int, constant: int, scale_b: float, zero_b: int, scale_c: float,
                        zero_c: int) -> ort.InferenceSession:
    """onnxruntime's com.microsoft QLinearAdd of a (256,) uint8 input and a one-element constant."""
    from onnx import TensorProto, helper

    inits = [helper.make_tensor("a_scale", TensorProto.FLOAT, [], [scale_a]),
             helper.make_tensor("a_zero", TensorProto.UINT8, [], [zero_a]),
             helper.make_tensor("b", TensorProto.UINT8, [1], [constant]),
             helper.make_tensor("b_scale", TensorProto.FLOAT, [], [scale_b]),
             helper.make_tensor("b_zero", TensorProto.UINT8, [], [zero_b]),
             helper.make_tensor("c_scale", TensorProto.FLOAT, [], [scale_c]),
             helper.make_tensor("c_zero", TensorProto.UINT8, [], [zero_c])]
    node = helper.make_node("QLinearAdd", ["a", "a_scale", "a_zero", "b", "b_scale", "b_zero", "c_scale", "c_zero"],
                            ["c"], domain="com.microsoft")
    graph = helper.make_graph([node], "qladd", [helper.make_tensor_value_info("a", TensorProto.UINT8, [256])],
                              [helper.make_tensor_value_info("c", TensorProto.UINT8, [256])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def this_cpu_has_avx2() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return " avx2" in flags


def test_qlinear_add_emulation_is_what_onnxruntime_computes() -> None:
    """onnxruntime's QLinearAdd output is exactly the emulation of this machine's kernel (AVX2's fused
    multiply-add where the CPU has AVX2, else SSE2's multiply and add), for random grids like a block's
    requantization (8-bit codes to a 2-4 bit grid, minus a lower bound) and for grids built so that the
    kernels differ: 103 x 0.19902913 is 20.5 + 6.7e-7 exactly but 20.5 in float32, so after subtracting 20
    the fused kernel rounds up to 1 and the unfused one to even, 0."""
    from daqkd.integer_export import qlinear_add_with_constant

    rng = np.random.default_rng(0)
    codes = np.arange(256, dtype=np.uint8)
    kernel = "avx2" if this_cpu_has_avx2() else "sse2"
    grids = [(0.1990291327238083, 0, 0, 20.0, 1, 1.0, 0), (0.3857142925262451, 0, 0, 40.0, 1, 1.0, 0)]
    for _ in range(100):
        constant, zero_b = [(0, 1), (1, 0), (0, 0)][int(rng.integers(0, 3))]
        grids.append((float(np.float32(rng.uniform(0.002, 0.05))), int(rng.integers(0, 3)), constant,
                      float(np.float32(rng.uniform(0.001, 0.5))), zero_b, float(np.float32(rng.uniform(0.05, 1.0))),
                      int(rng.integers(0, 256))))
    agreeing = 0
    for grid in grids:
        expected = qlinear_add_session(*grid).run(None, {"a": codes})[0].astype(np.int64)
        outputs = qlinear_add_with_constant(codes, *grid)
        assert all(np.array_equal(expected, out) for name, out in outputs if name == kernel), grid
        agreeing += all(np.array_equal(expected, out) for _, out in outputs)
    first = dict(qlinear_add_with_constant(codes, *grids[0]))
    assert (first["sse2"][103], first["avx2"][103]) == (0, 1)  # the built grids tell the kernels apart
    assert agreeing >= 50  # most grids have no code near a tie: there the add form is exact everywhere


def test_qlinear_add_emulation_rounds_ties_as_each_kernel_does() -> None:
    """Hand-computed: 0.5 x code, nothing added. A half rounds to even in the float kernels and away from
    zero in NEON's fixed point, so code 5 (2.5) gives 2 and 3, code 4 (2.0) only 2; at 2 x code, code 255
    saturates at 255."""
    from daqkd.integer_export import qlinear_add_with_constant

    outputs = qlinear_add_with_constant(np.arange(256), 0.5, 0, 0, 1.0, 0, 1.0, 0)
    assert {name: int(out[5]) for name, out in outputs} == {"sse2": 2, "avx2": 2, "portable": 2, "neon": 3}
    assert {int(out[4]) for _, out in outputs} == {2}
    assert {int(out[7]) for _, out in outputs} == {4}  # 3.5: to even and away from zero alike
    assert {int(out[255]) for _, out in qlinear_add_with_constant(np.arange(256), 2.0, 0, 0, 1.0, 0, 1.0, 0)} == {255}
