"""ONNX export of daqkd models (QDQ form, opset 21) and ONNX inference with onnxruntime.

Why not ``torch.onnx.export`` of the fake-quantized model as it is: the quantizers are autograd
functions, and torch's own lowering of ``fake_quantize_per_tensor_affine`` only accepts the 8-bit
ranges (0..255, -128..127, 0..127), so a 2-4 bit model either fails to export or exports as float.
Here every quantized layer is rewritten before tracing into two export-only custom ops with fake
kernels (``daqkd::quantize``, ``daqkd::dequantize``), which ``torch.onnx.export(dynamo=True)``
translates with onnxscript into standard operators:

* weights: the integer codes as an initializer, 4-bit types (INT4/UINT4, opset 21) up to 4 bits and
  INT8/UINT8 above, then ``DequantizeLinear`` (per tensor, or per output channel on axis 0), then
  ``Add(shift)`` where the grid is not symmetric around 0 (EWGS, DoReFa and STE weights sit on
  odd-level grids whose zero point would be a half-integer);
* inputs of a layer: ``[Sub(shift) ->] QuantizeLinear -> Clip(qmin, qmax) -> DequantizeLinear
  [-> Add(out_shift)]`` in an 8-bit container, clipped to the k-bit range (EWGS's interval lower
  bound and signed symmetric ranges are the shifts); 1-bit sign quantizers (LSQ's binary levels) are
  ``GreaterOrEqual(x, 0) -> Cast -> DequantizeLinear -> Add``, since their zero rounds up.

Each quantizer declares its grid (``Quantizer.grid``); weight codes are read back from the
fake-quantized weight and checked to sit on that grid, so the file computes what the PyTorch model
computes in eval mode, up to float rounding (a value within one ulp of a rounding boundary may land
one level away). The uint8 image input is normalized inside the graph; class names, bit widths and
the normalization are in the model's metadata (``metadata_props``).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import DaqkdError
from .errors import first_line as _first_line

OPSET = 21
INPUT_NAME, OUTPUT_NAME = "images", "logits"
EXTRA_HINT = "pip install 'daqkd[export]' (or pip install -e '.[export]' in a checkout)"


def require(module: str) -> Any:
    """Import one of the export extra's libraries, or one error line naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DaqkdError(f"ONNX export and evaluation need {module}, which is not installed: {EXTRA_HINT}") from exc


# --- export-only custom ops: what the graph computes, in torch (the fake kernels give shapes) ---

@torch.library.custom_op("daqkd::quantize", mutates_args=())
def quantize_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, out_scale: torch.Tensor,
                out_shift: torch.Tensor | None, qmin: int, qmax: int, binary: bool) -> torch.Tensor:
    """y = out_shift + out_scale * clamp(round((x - shift) / scale), qmin, qmax), or with the code
    [x >= 0] when ``binary``; x float32 of any shape, the rest 0-d (see quant.base.Grid)."""
    if binary:
        q = (x >= 0).to(x.dtype)
    else:
        q = torch.clamp(torch.round((x - shift if shift is not None else x) / scale), qmin, qmax)
    y = q * out_scale
    return y + out_shift if out_shift is not None else y


@quantize_op.register_fake
def _quantize_fake(x, scale, shift, out_scale, out_shift, qmin, qmax, binary):
    return torch.empty_like(x)


@torch.library.custom_op("daqkd::dequantize", mutates_args=())
def dequantize_op(codes: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """codes (C, ...) int8/uint8 -> codes * scale (+ shift) in float32; scale 0-d or (C,) (per output
    channel), shift None, 0-d or broadcastable to codes."""
    scale = scale.view(-1, *([1] * (codes.ndim - 1))) if scale.ndim else scale
    w = codes.to(torch.float32) * scale
    return w + shift if shift is not None else w


@dequantize_op.register_fake
def _dequantize_fake(codes, scale, shift):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def _translation_table() -> dict[Any, Any]:
    """onnxscript translations of the custom ops (imported only when exporting)."""
    import numpy as np

    ir = require("onnx_ir")
    op = require("onnxscript").opset21

    def constant(value: int, dtype: Any) -> Any:
        return op.Constant(value=ir.tensor(np.array(value, dtype=dtype)))

    def quantize(x, scale, shift, out_scale, out_shift, qmin: int, qmax: int, binary: bool):
        dtype = np.int8 if qmin < 0 else np.uint8
        if binary:
            q = op.Cast(op.GreaterOrEqual(x, op.CastLike(constant(0, np.float32), x)), to=ir.DataType.UINT8)
            dtype = np.uint8
        else:
            if shift is not None:
                x = op.Sub(x, shift)
            q = op.QuantizeLinear(x, scale, constant(0, dtype))
            q = op.Clip(q, constant(qmin, dtype), constant(qmax, dtype))
        y = op.DequantizeLinear(q, out_scale, constant(0, dtype))
        return op.Add(y, out_shift) if out_shift is not None else y

    def dequantize(codes, scale, shift):
        w = op.DequantizeLinear(codes, scale, axis=0)
        return op.Add(w, shift) if shift is not None else w

    return {torch.ops.daqkd.quantize.default: quantize, torch.ops.daqkd.dequantize.default: dequantize}


# --- the model rewritten for export ---

def weight_codes(fake_quantized: torch.Tensor, grid: Any) -> torch.Tensor:
    """The integer codes q of a fake-quantized weight (C, ...) on ``grid`` (w = out_shift + out_scale q),
    as int8 (qmin < 0) or uint8; an error if the weight is not on the grid (a quantizer whose
    ``grid`` does not describe its ``quantize``)."""
    view = (-1,) + (1,) * (fake_quantized.ndim - 1)
    scale = grid.out_scale.view(view) if grid.out_scale.ndim else grid.out_scale
    shift = 0.0
    if grid.out_shift is not None:
        shift = grid.out_shift.view(view) if grid.out_shift.ndim else grid.out_shift
    exact = (fake_quantized.double() - shift) / scale
    codes = exact.round()
    off_grid = float((codes - exact).abs().max()) if codes.numel() else 0.0
    if off_grid > 1e-2 or bool(codes.min() < grid.qmin) or bool(codes.max() > grid.qmax):
        raise DaqkdError(f"the quantized weights are not on their quantizer's grid (off by up to {off_grid:.3g} "
                         f"levels, codes {int(codes.min())}..{int(codes.max())} vs {grid.qmin}..{grid.qmax}): "
                         "this quantizer's grid() does not match its quantize()")
    return codes.to(torch.int8 if grid.qmin < 0 else torch.uint8)


def _owner_of(initializer: str, layers_by_key: dict[str, str]) -> str | None:
    """The layer whose weight codes ``initializer`` holds: its name, with '.' as '_', appears in the
    initializer's between name boundaries, the longest such (``features_3`` must not claim
    ``features_31_weight_codes``, nor ``conv1`` claim ``layer1_0_conv1_weight_codes``)."""
    name = initializer.replace(".", "_")
    matches = [key for key in layers_by_key if re.search(rf"(^|_){re.escape(key)}(_|$)", name)]
    return layers_by_key[max(matches, key=len)] if matches else None


class ExportedLayer(nn.Module):
    """A QuantConv2d/QuantLinear in export form: codes + grids as buffers, the custom ops in forward."""

    def __init__(self, layer: nn.Module) -> None:
        from .quant.base import Identity, QuantConv2d

        super().__init__()
        self.is_conv = isinstance(layer, QuantConv2d)
        if self.is_conv:
            self.stride, self.padding = layer.stride, layer.padding
            self.dilation, self.groups = layer.dilation, layer.groups
            if layer.padding_mode != "zeros":
                raise DaqkdError(f"padding mode {layer.padding_mode!r} is not supported by the ONNX export")
        weight = layer.weight.detach().float()
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        wq, aq = layer.weight_quantizer, layer.act_quantizer
        for quantizer in (wq, aq):
            if not isinstance(quantizer, Identity) and not quantizer.is_initialized:
                raise DaqkdError("the model's quantizers were never calibrated (no batch has been through it): "
                                 "export a trained run")
        self.weight_bits, self.input_bits = wq.bits, aq.bits
        self.weight_range: tuple[int, int] | None = None
        if isinstance(wq, Identity):
            self.register_buffer("weight", weight.clone())
        else:
            grid = wq.grid(weight)
            with torch.no_grad():
                codes = weight_codes(wq(weight), grid)
            self.weight_range = (grid.qmin, grid.qmax)
            self.register_buffer("weight_codes", codes)
            self.register_buffer("weight_scale", grid.out_scale.float().clone())
            shift = grid.out_shift
            if shift is not None and shift.ndim:
                shift = shift.view(-1, *([1] * (weight.ndim - 1)))
            self.register_buffer("weight_shift", None if shift is None else shift.float().clone())
        self.input_grid = None
        if not isinstance(aq, Identity):
            grid = aq.grid()
            self.input_grid = (grid.qmin, grid.qmax, grid.binary)
            scale = grid.scale if grid.scale is not None else grid.out_scale
            for name, value in (("input_scale", scale), ("input_shift", grid.shift),
                                ("input_out_scale", grid.out_scale), ("input_out_shift", grid.out_shift)):
                self.register_buffer(name, None if value is None else value.detach().float().reshape(()).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_grid is not None:
            qmin, qmax, binary = self.input_grid
            x = torch.ops.daqkd.quantize(x, self.input_scale, self.input_shift, self.input_out_scale,
                                         self.input_out_shift, qmin, qmax, binary)
        if self.weight_range is not None:
            weight = torch.ops.daqkd.dequantize(self.weight_codes, self.weight_scale, self.weight_shift)
        else:
            weight = self.weight
        if self.is_conv:
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, weight, self.bias)


def export_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (a NormalizedModel, on CPU, eval mode) with every quantized layer replaced
    by its :class:`ExportedLayer`; it computes what ``model`` computes in eval mode."""
    from .quant import quantized_layers

    model = copy.deepcopy(model).cpu().float().eval()
    for name, layer in quantized_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ExportedLayer(layer))
    return model


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote: the file, its size, and per quantized layer its bits and
    the storage type of its codes."""

    path: str
    file_bytes: int
    image_size: int
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def _code_type(qmin: int, qmax: int) -> int:
    """The smallest ONNX integer type that holds qmin..qmax (4-bit types need opset 21)."""
    from onnx import TensorProto

    if qmin >= 0:
        return TensorProto.UINT4 if qmax <= 15 else TensorProto.UINT8
    return TensorProto.INT4 if qmin >= -8 and qmax <= 7 else TensorProto.INT8


def export_onnx(model: nn.Module, path: str | Path, *, image_size: int = 32,
                metadata: dict[str, Any] | None = None) -> ExportReport:
    """Write ``model`` (a NormalizedModel taking (B, 3, H, W) uint8 images; quantized or FP) to
    ``path`` as an ONNX file: input ``images`` uint8 (batch, 3, image_size, image_size), output
    ``logits`` float32 (batch, classes); dynamic batch. ``metadata`` (JSON-able values) goes into
    metadata_props. The file is checked with onnx.checker and written atomically."""
    onnx = require("onnx")
    require("onnxscript")
    from .rundir import atomic_path

    exported = export_form(model)
    layers: dict[str, dict[str, Any]] = {}
    for name, module in exported.named_modules():
        if isinstance(module, ExportedLayer):
            layers[name] = {"weight_bits": module.weight_bits, "input_bits": module.input_bits,
                            "weight_range": module.weight_range}
    example = torch.randint(0, 256, (2, 3, image_size, image_size), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported(example)  # a clear error for a wrong image size before tracing
            program = torch.onnx.export(
                exported, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                custom_translation_table=_translation_table(), verbose=False, report=False)
    except RuntimeError as exc:
        raise DaqkdError(f"the model does not run on {image_size}x{image_size} images ({str(exc).splitlines()[0]}): "
                         "pass the --image-size it was trained on") from exc
    proto = program.model_proto
    _store_codes_narrow(proto, layers)
    for node in proto.graph.node:  # the exporter's debug records (Python stack traces, FX nodes): 2/3 of the file
        del node.metadata_props[:]
    del proto.graph.value_info[:]  # intermediate shapes, inferred again by any runtime
    props = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    del proto.metadata_props[:]
    for key, value in sorted(props.items()):
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "daqkd"
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return ExportReport(str(path), path.stat().st_size, image_size, layers, props)


def _store_codes_narrow(proto: Any, layers: dict[str, dict[str, Any]]) -> None:
    """Rewrite each weight-code initializer (exported as int8/uint8) in the smallest type its layer's
    grid needs, recording the type in ``layers``; codes are found as the DequantizeLinear inputs
    that are integer initializers."""
    from onnx import TensorProto, numpy_helper

    ml_dtypes = require("ml_dtypes")
    narrow_types = {TensorProto.INT4: ml_dtypes.int4, TensorProto.UINT4: ml_dtypes.uint4}

    initializers = {t.name: t for t in proto.graph.initializer}
    code_names = [n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"
                  and n.input[0] in initializers
                  and initializers[n.input[0]].data_type in (TensorProto.INT8, TensorProto.UINT8)]
    by_name = {name.replace(".", "_"): name for name in layers}
    for code_name in code_names:
        tensor = initializers[code_name]
        values = numpy_helper.to_array(tensor)
        owner = _owner_of(code_name, by_name)
        if owner is None or layers[owner]["weight_range"] is None:
            raise DaqkdError(f"internal error: weight codes {code_name} match no quantized layer")
        qmin, qmax = layers[owner]["weight_range"]
        data_type = _code_type(qmin, qmax)
        layers[owner]["storage"] = TensorProto.DataType.Name(data_type)
        if data_type != tensor.data_type:
            tensor.CopyFrom(numpy_helper.from_array(values.astype(narrow_types[data_type]), code_name))
            for infos in (proto.graph.value_info, proto.graph.input):  # stale 8-bit type annotations
                for info in infos:
                    if info.name == code_name:
                        info.type.tensor_type.elem_type = data_type


# --- running ONNX files ---

FLOAT_TENSOR_TYPES = ("tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)")


class OnnxModel(nn.Module):
    """An ONNX classifier run by onnxruntime's CPU provider, called like a NormalizedModel:
    (B, 3, H, W) uint8 images -> (B, classes) float32 logits (on the input's device).

    Files from elsewhere are checked as far as their signatures allow: one uint8 input (B, 3, H, W),
    and the logits are the output named ``logits``, else the only float (batch, classes) output. A
    fixed batch dimension is honoured by feeding that many images at a time (the last call padded).
    ``num_classes``, when given, is the width every call's logits must have.

    ``optimization``: onnxruntime's graph optimization level, ``all`` (its default, what a deployment
    runs), ``basic`` or ``none`` (the graph as written: the reference for equivalence tests).
    """

    LEVELS = ("none", "basic", "extended", "all")

    def __init__(self, path: str | Path, optimization: str = "all", threads: int = 0,
                 optimized_path: str | Path | None = None, num_classes: int | None = None) -> None:
        super().__init__()
        ort = require("onnxruntime")
        if optimization not in self.LEVELS:
            raise DaqkdError(f"unknown ONNX optimization level {optimization!r}: use {', '.join(self.LEVELS)}")
        level = ort.GraphOptimizationLevel
        options = ort.SessionOptions()
        options.graph_optimization_level = {"none": level.ORT_DISABLE_ALL, "basic": level.ORT_ENABLE_BASIC,
                                            "extended": level.ORT_ENABLE_EXTENDED,
                                            "all": level.ORT_ENABLE_ALL}[optimization]
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        if optimized_path is not None:
            options.optimized_model_filepath = str(optimized_path)
        if not Path(path).is_file():
            raise DaqkdError(f"{path} does not exist or is not a file: pass an ONNX file written by daqkd export")
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise DaqkdError(f"{path} is not a valid ONNX model ({_first_line(exc)}): pass a file written by "
                             "daqkd export") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or len(inputs[0].shape) != 4:
            signature = ", ".join(f"{i.name} {i.type} {list(i.shape)}" for i in inputs)
            raise DaqkdError(f"{path} takes {signature or 'no input'}, not one uint8 image batch (B, 3, H, W): "
                             "pass a file written by daqkd export")
        channels = inputs[0].shape[1]
        if isinstance(channels, int) and channels != 3:
            raise DaqkdError(f"{path} takes {channels}-channel images {list(inputs[0].shape)}; daqkd feeds RGB "
                             "(B, 3, H, W) uint8: export the model with a 3-channel input")
        self.input_name = inputs[0].name
        self.input_shape = inputs[0].shape
        batch = inputs[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        self.logits_index = self._logits_output(self.session.get_outputs())
        self.num_classes = num_classes
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def _logits_output(self, outputs: list[Any]) -> int:
        """Index of the logits among the outputs: the one named ``logits``, else the only float 2-D one."""
        named = [i for i, o in enumerate(outputs) if o.name == "logits"]
        candidates = named or [i for i, o in enumerate(outputs) if o.type in FLOAT_TENSOR_TYPES and len(o.shape) == 2]
        if len(candidates) != 1:
            signature = ", ".join(f"{o.name} {o.type} {list(o.shape)}" for o in outputs)
            raise DaqkdError(f"{self.path} has outputs {signature}: daqkd eval needs one float (batch, classes) "
                             "output, named logits when there are several")
        chosen = outputs[candidates[0]]
        if chosen.type not in FLOAT_TENSOR_TYPES or len(chosen.shape) != 2:
            raise DaqkdError(f"{self.path}'s output {chosen.name} is {chosen.type} {list(chosen.shape)}: daqkd eval "
                             "scores float logits (batch, classes), not labels or integer scores")
        width = chosen.shape[1]
        self.output_classes = width if isinstance(width, int) else None
        return candidates[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.uint8).contiguous().numpy()
        step = self.fixed_batch or max(len(array), 1)
        parts = []
        for start in range(0, len(array), step):
            chunk = array[start:start + step]
            if len(chunk) < step:  # a fixed batch: pad the last call, keep only the real images' logits
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk),) + chunk.shape[1:], chunk.dtype)])
            try:
                logits = self.session.run(None, {self.input_name: chunk})[self.logits_index]
            except Exception as exc:  # onnxruntime's own exception types
                raise DaqkdError(f"onnxruntime cannot run {self.path} on a {list(chunk.shape)} uint8 batch "
                                 f"({_first_line(exc)}): pass a file written by daqkd export") from exc
            if logits.ndim != 2 or len(logits) != len(chunk):
                raise DaqkdError(f"{self.path} returned logits of shape {list(logits.shape)} for {len(chunk)} "
                                 "images: daqkd eval needs (batch, classes)")
            parts.append(logits[:len(array) - start])
        logits = np.concatenate(parts) if parts else np.zeros((0, self.num_classes or 0), np.float32)
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise DaqkdError(f"{self.path} outputs {logits.shape[1]} classes but the data has {self.num_classes}: "
                             "pass the data set it was trained on")
        return torch.from_numpy(logits.astype(np.float32, copy=False)).to(images.device)

    def metadata_value(self, key: str, default: Any = None) -> Any:
        """A metadata entry, JSON-decoded where it is JSON."""
        if key not in self.metadata:
            return default
        try:
            return json.loads(self.metadata[key])
        except ValueError:
            return self.metadata[key]


def is_onnx_file(path: str | Path | None) -> bool:
    return path is not None and os.fspath(path).lower().endswith(".onnx")


def onnx_weight_bytes(path: str | Path) -> dict[str, float]:
    """Bytes of the file's initializers as stored (4-bit types packed two per byte) and at FP32."""
    onnx = require("onnx")
    from onnx import TensorProto

    bits = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT8: 8, TensorProto.UINT8: 8,
            TensorProto.FLOAT16: 16, TensorProto.BFLOAT16: 16}
    proto = onnx.load(str(path), load_external_data=False)
    stored = fp = 0.0
    for tensor in proto.graph.initializer:
        count = 1
        for d in tensor.dims:
            count *= d
        if count <= 1:  # scales and shifts of per-tensor grids
            continue
        stored += count * bits.get(tensor.data_type, 32) / 8
        fp += count * 4
    return {"bytes": stored, "fp32_bytes": fp, "compression": fp / max(stored, 1)}
