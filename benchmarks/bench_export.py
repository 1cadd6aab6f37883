"""ONNX export: file size and onnxruntime CPU latency of quantized ResNet-20s against the FP export.

The shared pretrained CIFAR-10 ResNet-20 (../shared/weights), quantized with each ``--configs``
entry (METHOD:WxAy, per-tensor, FP stem and head as in the paper) and calibrated on 256 real test
images (no training: sizes and latency do not depend on it), is exported with ``daqkd.export``,
beside the FP model itself. For each file: its size, and the median latency of ``--repeats`` runs at
batch 1 and 256 in onnxruntime's CPU provider, with all graph optimizations (what a deployment
runs) and with none, interleaved in one process (the machine is noisy: compare ratios). Whether
integer kernels ran is read from the optimized graph onnxruntime writes: QLinearConv,
ConvInteger or MatMulInteger nodes mean integer arithmetic; QuantizeLinear/DequantizeLinear left
in the graph mean float convolutions with explicit (de)quantization around them.

The last line printed is one JSON object: per config size_ratio (file bytes / FP file bytes),
latency ratios to FP at batch 1 and 256 (optimizations on), and the integer op counts.
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
from daqkd.loading import load_model
from daqkd.quant import QuantConfig, quantize_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
INTEGER_OPS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "MatMulNBits", "DynamicQuantizeLinear")


def build(config: str | None, images: torch.Tensor) -> torch.nn.Module:
    model, _ = load_model(SHARED / "weights/cifar10/resnet20-12fca82f.th", arch="resnet20", normalize="imagenet",
                          num_classes=10)
    model.eval()
    if config is not None:
        method, bits = config.split(":")
        w_bits, a_bits = (int(b) for b in bits.lstrip("W").split("A"))
        quantize_model(model.model, QuantConfig(method, w_bits, a_bits))
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
    parser.add_argument("--configs", default="ewgs:W2A2,ewgs:W3A3,ewgs:W4A4,lsq:W8A8")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per file and batch size")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    args = parser.parse_args()
    images = load_image_folder(SHARED / "data/cifar10", "test", limit_per_class=26).images[:256]
    batches = {1: images[:1].numpy(), 256: images.numpy()}
    names = ["fp", *args.configs.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench_export_"))
    files, integer_ops, graph_ops = {}, {}, {}
    for name in names:
        path = tmp / f"{name.replace(':', '_')}.onnx"
        export_onnx(build(None if name == "fp" else name, images), path)
        files[name] = path
        optimized = tmp / f"{path.stem}.opt.onnx"
        session(path, True, args.threads, optimized)
        ops = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
        integer_ops[name] = {op: ops[op] for op in INTEGER_OPS if ops[op]}
        graph_ops[name] = {op: ops[op] for op in ("QuantizeLinear", "DequantizeLinear", "Conv", "Clip") if ops[op]}
    sessions = {(name, opt): session(files[name], opt, args.threads) for name in names for opt in (True, False)}
    times: dict[tuple[str, bool, int], list[float]] = {key + (b,): [] for key in sessions for b in batches}
    for s in sessions.values():  # warm-up
        for batch in batches.values():
            s.run(None, {"images": batch})
    for _ in range(args.repeats):  # interleaved: every file sees the same machine state
        for (name, opt), s in sessions.items():
            for size, batch in batches.items():
                start = time.perf_counter()
                s.run(None, {"images": batch})
                times[(name, opt, size)].append(time.perf_counter() - start)
    median = {key: statistics.median(v) for key, v in times.items()}
    fp_bytes = files["fp"].stat().st_size
    print(f"{'model':<12} {'file KB':>8} {'size/FP':>8} " + " ".join(
        f"{f'b{b} {o} ms':>13}" for b in batches for o in ('opt', 'noopt')) + "  integer ops / QDQ ops (optimized)")
    result: dict[str, object] = {"machine": platform.processor() or platform.machine(),
                                 "onnxruntime": ort.__version__, "threads": args.threads, "repeats": args.repeats}
    for name in names:
        size = files[name].stat().st_size
        cells = " ".join(f"{1000 * median[(name, o, b)]:13.3f}" for b in batches for o in (True, False))
        print(f"{name:<12} {size / 1e3:8.1f} {size / fp_bytes:8.3f} {cells}  {integer_ops[name] or 'none'} / "
              f"{graph_ops[name]}")
        result[name] = {
            "file_bytes": size, "size_ratio": round(size / fp_bytes, 4),
            "latency_ratio_b1": round(median[(name, True, 1)] / median[("fp", True, 1)], 3),
            "latency_ratio_b256": round(median[(name, True, 256)] / median[("fp", True, 256)], 3),
            "ms_b1": round(1000 * median[(name, True, 1)], 3), "ms_b256": round(1000 * median[(name, True, 256)], 2),
            "integer_ops": integer_ops[name], "qdq_ops": graph_ops[name],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
