"""`daqkd export`: a run or checkpoint as an ONNX file (QDQ, opset 21)."""

from __future__ import annotations

import argparse
import shlex
from collections import Counter
from typing import Any

from ..api import ExportOptions, export_model
from ..integer_export import KERNELS, IntegerReport


def add_parser(subparsers: Any) -> None:
    e = subparsers.add_parser(
        "export", help="write a run or checkpoint as an ONNX file (integer weights, QDQ activations)",
        description="Write a trained model as ONNX (opset 21): quantized weights as 4- or 8-bit integer "
                    "initializers with DequantizeLinear, quantized inputs as QuantizeLinear -> Clip -> "
                    "DequantizeLinear; the uint8 image input is normalized inside the graph. Needs the export "
                    "extra: pip install 'daqkd[export]'. Check the file with: daqkd eval FILE.onnx --data D")
    e.add_argument("run", metavar="RUN|CKPT", help="a daqkd run directory or checkpoint (student or teacher)")
    e.add_argument("--out", metavar="FILE.onnx", help="the ONNX file to write (required)")
    e.add_argument("--fp", action="store_true",
                   help="export the full-precision teacher the student run RUN was distilled from")
    e.add_argument("--image-size", type=int, default=32, metavar="N",
                   help="side of the square images the file takes (default: 32)")
    e.add_argument("--integer", action="store_true",
                   help="CIFAR ResNets: a graph that onnxruntime runs in integer kernels (QLinearConv; QLinearAdd "
                        "for students trained with --residual-bits), BatchNorm folded; levels match the model's "
                        "except at rounding ties, widened by the int32 bias rounding it prints")
    e.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    report = export_model(ExportOptions.from_namespace(args))
    meta = report.metadata
    if isinstance(report, IntegerReport):
        return print_integer(report)
    kinds = Counter((layer["weight_bits"], layer.get("storage", "FLOAT"), layer["input_bits"])
                    for layer in report.layers.values())
    side = report.image_size
    print(f"wrote {report.path}: {report.file_bytes / 1e6:.3f} MB, opset 21, {meta['arch']}, "
          f"input uint8 (batch, 3, {side}, {side}), output logits (batch, {meta['num_classes']})")
    if not kinds:
        print("full precision: no quantized layers")
    for (w_bits, storage, a_bits), count in sorted(kinds.items(), key=lambda kv: -kv[1]):
        weights = "FP32 weights" if w_bits == 32 else f"{w_bits}-bit weights stored as {storage}"
        inputs = "FP32 inputs" if a_bits == 32 else f"{a_bits}-bit inputs (QuantizeLinear -> Clip -> DequantizeLinear)"
        print(f"  {count} layer{'s' if count > 1 else ''}: {weights}, {inputs}")
    print(f"check it: daqkd eval {shlex.quote(report.path)} --data DIR|FILE.npz")
    return 0


def print_integer(report: IntegerReport) -> int:
    meta, side = report.metadata, report.image_size
    print(f"wrote {report.path}: {report.file_bytes / 1e6:.3f} MB, opset 21, integer kernels, {meta['arch']}, "
          f"input uint8 (batch, 3, {side}, {side}), output logits (batch, {meta['num_classes']})")
    kinds = Counter(layer.kernel for layer in report.layers.values())
    for kernel, count in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {count} convolution{'s' if count > 1 else ''}: {KERNELS[kernel]}")
    adds = Counter(report.additions.values())
    if adds.get("integer"):
        print(f"  {adds['integer']} residual additions: integer (QLinearAdd)")
    if adds.get("float"):
        print(f"  {adds['float']} residual additions: float (train with --residual-bits 8 to make them integer)")
    biased = [layer for layer in report.layers.values() if layer.kernel == "integer"]
    worst = max((layer.bias_error for layer in biased), default=0.0)
    if biased and all(layer.bias_in_eval for layer in biased):
        print(f"  int32 biases: the model's eval adds the same rounding (within {worst:.1e} output levels)")
    elif biased:
        print(f"  int32 biases within {worst:.4f} output levels of the model's (the kernel's rounding; "
              "with --residual-bits the model's eval rounds them too)")
    print(f"check it: daqkd eval {shlex.quote(report.path)} --data DIR|FILE.npz")
    return 0
