"""Training-step cost of fake quantization: W2A2 ResNet-20, batch 128, CPU.

Step = forward, cross-entropy, backward, SGD step. For each method the median step time of
``--steps`` timed steps (after warm-up) is divided by the FP model's, measured interleaved in the
same process (the machine is noisy). ``--compile`` also times torch.compile'd models (FP compiled
too). The last line printed is one JSON object: ratio_<method> (goal <= 1.3), step seconds, and
the compiled ratios when asked.

torch.compile does not pay here: on the 2-core CPU (2026-11-27) the compiled FP step was slower
than eager (0.45 vs 0.32 s) and the compiled quantized models recompile on the quantizers' state
checks, so the quantizers are fused by hand into autograd functions instead (functional.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from daqkd.models import create_model
from daqkd.quant import QUANTIZERS, QuantConfig, quantize_model

METHODS = tuple(m for m in sorted(QUANTIZERS) if m != "ste")  # ste: dorefa without its weight transform


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, compiled: bool):
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        loss = nn.functional.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    variants: dict[str, object] = {}
    for compiled in ([False, True] if args.compile else [False]):
        suffix = "_compiled" if compiled else ""
        variants["fp" + suffix] = make_step(create_model("resnet20", 10).train(), x, y, compiled)
        for method in METHODS:
            model = quantize_model(create_model("resnet20", 10).train(),
                                   QuantConfig(method, args.bits, args.bits))
            model(x)  # calibrate outside the timing
            variants[method + suffix] = make_step(model, x, y, compiled)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in variants.values():  # warm up (and compile)
        step(); step()
    for _ in range(args.steps):
        for name, step in variants.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(v) for name, v in times.items()}
    figures: dict[str, object] = {"batch_size": args.batch_size, "bits": args.bits, "threads": torch.get_num_threads()}
    for name, seconds in medians.items():
        figures[f"step_s_{name}"] = round(seconds, 4)
    for name in variants:
        base = "fp_compiled" if name.endswith("_compiled") else "fp"
        if not name.startswith("fp"):
            figures[f"ratio_{name}"] = round(medians[name] / medians[base], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
