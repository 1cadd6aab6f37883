"""How exactly an integer ONNX file (daqkd export --integer) computes what its trained model computes.

For each run: exports it with ``--integer`` to a temporary file, then classifies the split with
PyTorch in float32 (what ``daqkd eval RUN`` reports), PyTorch in float64, and the file in onnxruntime
(one thread, all optimizations). Prints each top-1 and how many predictions each pair disagrees on.
The float64 model is the control: where PyTorch's float32 and float64 disagree as often as PyTorch
and the file do, the remaining gap is the model's sensitivity to float rounding (a one-level move in
an early 8-bit residual cascades through the later low-bit layers), not the export's.

    python benchmarks/integer_exactness.py RUN [RUN ...] --data ../shared/data/cifar10 [--split test]

The last line is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def predictions(run: str, data: str, split: str, limit: int | None, batch: int = 250) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    from daqkd.data import load_data
    from daqkd.integer_export import export_integer_onnx
    from daqkd.loading import load_model

    model, _ = load_model(run)
    model.eval()
    images = load_data(data, None, split, limit)
    x, labels = images.images, images.labels.numpy()
    out: dict[str, np.ndarray] = {"labels": labels}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "int.onnx"
        export_integer_onnx(model, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        out["onnx"] = np.concatenate([session.run(None, {"images": x[i:i + batch].numpy()})[0].argmax(1)
                                      for i in range(0, len(x), batch)])
    with torch.no_grad():
        for name, dtype in (("pytorch_fp32", torch.float32), ("pytorch_fp64", torch.float64)):
            model.to(dtype)
            out[name] = np.concatenate([model(x[i:i + batch]).argmax(1).numpy() for i in range(0, len(x), batch)])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="daqkd run directories of integer-exportable students")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit-per-class", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print("| run | PyTorch fp32 | PyTorch fp64 | ONNX file | fp32 vs file | fp32 vs fp64 | fp64 vs file |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        p = predictions(run, args.data, args.split, args.limit_per_class)
        top1 = {k: float((p[k] == p["labels"]).mean() * 100) for k in ("pytorch_fp32", "pytorch_fp64", "onnx")}
        differ = {"fp32_vs_file": int((p["pytorch_fp32"] != p["onnx"]).sum()),
                  "fp32_vs_fp64": int((p["pytorch_fp32"] != p["pytorch_fp64"]).sum()),
                  "fp64_vs_file": int((p["pytorch_fp64"] != p["onnx"]).sum())}
        rows.append({"run": run, "images": len(p["labels"]), "top1": top1, "predictions_differ": differ})
        print(f"| {Path(run).name} | {top1['pytorch_fp32']:.2f} | {top1['pytorch_fp64']:.2f} | {top1['onnx']:.2f} | "
              f"{differ['fp32_vs_file']} | {differ['fp32_vs_fp64']} | {differ['fp64_vs_file']} |", flush=True)
    print(json.dumps({"split": args.split, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
