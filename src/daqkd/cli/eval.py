"""`daqkd eval`: evaluate a run, a daqkd checkpoint or published weights."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..api import EvalOptions, evaluate
from .common import add_data_args, add_foreign_args


def add_parser(subparsers: Any) -> None:
    e = subparsers.add_parser("eval", help="evaluate a run directory or checkpoint")
    e.add_argument("run", metavar="RUN|FILE", help="a daqkd run directory or checkpoint, published weights "
                   "(with --arch and --normalize), or an ONNX file from daqkd export (run by onnxruntime)")
    add_data_args(e)
    add_foreign_args(e.add_argument_group("published weights"))
    e.add_argument("--out", metavar="FILE", help="write the report as JSON")
    e.add_argument("--onnx-optimization", choices=("none", "basic", "extended", "all"), default="all",
                   help="onnxruntime's graph optimizations for an ONNX file (default: all, as deployed; none runs "
                        "the graph as written)")
    e.set_defaults(func=cmd_eval, split="test")


def cmd_eval(args: argparse.Namespace) -> int:
    report = evaluate(EvalOptions.from_namespace(args))
    size, metrics = report["size"], report
    for what in report.get("unchecked", []):
        print(f"daqkd eval: note: {report['run']} does not say its {what}: unchecked", file=sys.stderr)
    model = (f"{report['arch']} W{report['w_bits']}A{report['a_bits']}" if report["arch"] is not None
             else "model of unknown architecture and bit widths")
    print(f"{model}: top-1 {metrics['top1']:.2f}%  "
          f"top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  on {report['images']:,} {report['split']} images")
    if "runtime" in report:
        print(f"run by {report['runtime']}; weights stored in {size['bytes'] / 1e6:.3f} MB vs "
              f"{size['fp32_bytes'] / 1e6:.3f} MB as FP32 ({size['compression']:.1f}x), "
              f"file {size['file_bytes'] / 1e6:.3f} MB")
    else:
        print(f"model size {size['bytes'] / 1e6:.3f} MB at its bit widths vs {size['fp32_bytes'] / 1e6:.3f} MB FP32 "
              f"({size['compression']:.1f}x)")
    for name, acc in metrics["per_class_top1"].items():
        print(f"  {name:<20} {acc:6.2f}%" if acc is not None else f"  {name:<20}    n/a (no test images)")
    return 0
