"""ONNX export: file size and onnxruntime CPU latency of quantized ResNet-20s against the FP export.

The shared pretrained CIFAR-10 ResNet-20 (../shared/weights), quantized with each ``--configs``
entry and calibrated on 256 real test images (no training: sizes and latency do not depend on it),
is exported beside the FP model itself. An entry is METHOD:WxAy[Rr][:int]: per-tensor, FP stem and
head as in the paper, ``Rr`` the residual stream at r bits (``--residual-bits``), ``:int`` the
integer-kernel graph (``daqkd export --integer``) instead of the QDQ one. For each file: its size,
and the median latency of ``--repeats`` runs at each ``--batches`` size in onnxruntime's CPU
provider, with all graph optimizations (what a deployment runs) and with none (unless
``--no-unoptimized``), the files interleaved in one process, one batch size at a time (the machine is
noisy: compare ratios). Whether
integer kernels ran is read from the optimized graph onnxruntime writes: QLinearConv,
ConvInteger or MatMulInteger nodes mean integer arithmetic; QuantizeLinear/DequantizeLinear left
in the graph mean float convolutions with explicit (de)quantization around them.

The last line printed is one JSON object: per config size_ratio (file bytes / FP file bytes),
latency ratios to FP at each batch size (optimizations on), and the integer op counts.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from daqkd.data import load_image_folder
from daqkd.export import export_onnx
from daqkd.integer_export import export_integer_onnx
from daqkd.loading import load_model
from daqkd.quant import QuantConfig, quantize_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
INTEGER_OPS = ("QLinearConv", "QLinearAdd", "ConvInteger", "MatMulInteger", "QLinearMatMul", "MatMulNBits",
               "DynamicQuantizeLinear")


def build(config: str | None, images: torch.Tensor) -> torch.nn.Module:
    model, _ = load_model(SHARED / "weights/cifar10/resnet20-12fca82f.th", arch="resnet20", normalize="imagenet",
                          num_classes=10)
    model.eval()
    if config is not None:
        method, bits = config.split(":")[:2]
        bits, _, residual = bits.lstrip("W").partition("R")
        w_bits, a_bits = (int(b) for b in bits.split("A"))
        quantize_model(model.model, QuantConfig(method, w_bits, a_bits, residual_bits=int(residual or 32)))
        with torch.no_grad():
            model(images[:256])
    return model


def session(path: Path, optimized: bool, threads: int, save_to: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="ewgs:W2A2,ewgs:W4A4,lsq:W8A8,ewgs:W4A4:int,ewgs:W4A4R8:int,"
                                              "ewgs:W2A2R8:int")
    parser.add_argument("--batches", default="1,64", help="batch sizes timed (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per file and batch size")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    parser.add_argument("--no-unoptimized", action="store_true",
                        help="time only the optimized sessions (what a deployment runs), not the unoptimized too")
    args = parser.parse_args()
    images = load_image_folder(SHARED / "data/cifar10", "test", limit_per_class=26).images[:256]
    sizes = [int(b) for b in args.batches.split(",")]
    images = images.repeat(max(1, -(-max(sizes) // len(images))), 1, 1, 1)
    batches = {b: images[:b].numpy() for b in sizes}
    names = ["fp", *args.configs.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench_export_"))
    files, integer_ops, graph_ops = {}, {}, {}
    for name in names:
        path = tmp / f"{name.replace(':', '_')}.onnx"
        model = build(None if name == "fp" else name, images)
        if name.endswith(":int"):
            export_integer_onnx(model, path)
        else:
            export_onnx(model, path)
        files[name] = path
        optimized = tmp / f"{path.stem}.opt.onnx"
        session(path, True, args.threads, optimized)
        ops = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
        integer_ops[name] = {op: ops[op] for op in INTEGER_OPS if ops[op]}
        graph_ops[name] = {op: ops[op] for op in ("QuantizeLinear", "DequantizeLinear", "Conv", "FusedConv", "Clip",
                                                  "Transpose") if ops[op]}
        graph_ops[name]["nodes"] = sum(ops.values())
    levels = (True,) if args.no_unoptimized else (True, False)
    sessions = {(name, opt): session(files[name], opt, args.threads) for name in names for opt in levels}
    times: dict[tuple[str, bool, int], list[float]] = {key + (b,): [] for key in sessions for b in batches}
    # one batch size at a time, the files interleaved within it: every file sees the same machine
    # state, and a batch-1 run never follows a batch-64 one that has just flushed the caches (which
    # cost batch 1 ~15 % in an earlier version that interleaved the sizes too)
    for size, batch in batches.items():
        for s in sessions.values():  # warm-up
            s.run(None, {"images": batch})
        for _ in range(args.repeats):
            for (name, opt), s in sessions.items():
                start = time.perf_counter()
                s.run(None, {"images": batch})
                times[(name, opt, size)].append(time.perf_counter() - start)
    median = {key: statistics.median(v) for key, v in times.items()}
    fp_bytes = files["fp"].stat().st_size
    print(f"{'model':<12} {'file KB':>8} {'size/FP':>8} " + " ".join(
        f"{f'b{b} {o} ms':>13}" for b in batches for o in ('opt', 'noopt')[:len(levels)])
        + "  integer ops / QDQ ops (optimized)")
    result: dict[str, object] = {"machine": platform.processor() or platform.machine(),
                                 "onnxruntime": ort.__version__, "threads": args.threads, "repeats": args.repeats}
    for name in names:
        size = files[name].stat().st_size
        cells = " ".join(f"{1000 * median[(name, o, b)]:13.3f}" for b in batches for o in levels)
        print(f"{name:<12} {size / 1e3:8.1f} {size / fp_bytes:8.3f} {cells}  {integer_ops[name] or 'none'} / "
              f"{graph_ops[name]}")
        result[name] = {
            "file_bytes": size, "size_ratio": round(size / fp_bytes, 4),
            **{f"latency_ratio_b{b}": round(median[(name, True, b)] / median[("fp", True, b)], 3) for b in batches},
            **{f"ms_b{b}": round(1000 * median[(name, True, b)], 3) for b in batches},
            "integer_ops": integer_ops[name], "qdq_ops": graph_ops[name],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
