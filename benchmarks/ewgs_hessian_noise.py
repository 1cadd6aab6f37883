"""How noisy is daqkd's Hessian-based EWGS delta, and what would the authors' estimate cost?

EWGS (Lee et al., CVPR 2021, sec. 3.3) sets each quantizer's delta = max(0, (Tr(H) / N) / (3 std(g))),
Tr(H) by Hutchinson's estimator. The authors' update_grad_scales takes 3 training batches and, per
layer, up to 50 Rademacher probes (stopping at a relative change < 1e-3); the trainer here takes
2 batches of 64 images and 1 probe shared by all layers (one Hessian-vector product per batch).

This script, on a W3A3 EWGS ResNet-20 made from the published CIFAR-10 weights (intervals from
one batch, as training starts) and real training images (train mode, as the trainer), computes a
reference delta per quantizer (``--reference``, BxSxP: B batches of S images, P probes shared by
all layers), then repeats each estimator of ``--configs`` ``--repeats`` times with fresh batches
and probes, and reports one estimate's root-mean-square error against the reference, relative to
it (median over quantizers), the share of estimates clipped to 0, and the seconds per estimate. It
also times one per-layer Hessian-vector product (the authors' unit of work). The last line is one
JSON object of these figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from daqkd.data import load_image_folder
from daqkd.loading import load_model
from daqkd.quant import QuantConfig, kernels, quantize_model
from daqkd.quant.ewgs import EWGSQuantizer, hessian_delta_estimates


def per_layer_hvp_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers: int) -> float:
    """Median seconds of one Hessian-vector product restricted to one quantizer's output (the
    authors' inner loop), over the first ``layers`` quantizers."""
    quantizers = [m for m in model.modules() if isinstance(m, EWGSQuantizer) and m.hessian_delta]
    for m in quantizers:
        m.capture = []
    try:
        with kernels.eager_kernels():  # differentiated twice: compiled backwards refuse create_graph
            loss = nn.functional.cross_entropy(model(x), y)
            outputs = [t for m in quantizers for t in m.capture]
            grads = torch.autograd.grad(loss, outputs, create_graph=True)
            times = []
            for i in range(min(layers, len(outputs))):
                v = torch.randint_like(outputs[i], 2) * 2 - 1
                start = time.perf_counter()
                torch.autograd.grad(grads[i], outputs[i], grad_outputs=v, retain_graph=True)
                times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        for m in quantizers:
            m.capture = None


def parse_config(text: str) -> tuple[int, int, int]:
    """'BxSxP': B batches of S images, P probes each."""
    batches, size, probes = (int(v) for v in text.lower().split("x"))
    return batches, size, probes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10")
    parser.add_argument("--weights", default="../shared/weights/cifar10/resnet20-12fca82f.th")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--images-per-class", type=int, default=100)
    parser.add_argument("--configs", default="2x64x1,3x256x1,3x256x4",
                        help="estimators to repeat, each BxSxP: B batches of S images, P probes per batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference", default="6x128x8", help="the reference estimate, BxSxP")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = load_image_folder(args.data, "train", limit_per_class=args.images_per_class)
    images, labels = data.images, data.labels
    model, _ = load_model(args.weights, arch="resnet20", normalize="imagenet", num_classes=len(data.classes))
    model = quantize_model(model, QuantConfig("ewgs", args.bits, args.bits, ewgs_delta=None))
    model.train()
    model(images[torch.randperm(len(labels))[:128]])  # intervals from one batch, as a run starts
    loss_fn = nn.functional.cross_entropy

    def estimate(batches: int, size: int, probes: int) -> tuple[dict[str, float], list[dict[str, float]]]:
        """Unclipped mean over batches (then clipped, as the trainer), and each batch's figures."""
        per_batch = []
        for _ in range(batches):
            idx = torch.randperm(len(labels))[:size]
            per_batch.append(hessian_delta_estimates(model, loss_fn, images[idx], labels[idx], probes=probes))
        return {n: max(0.0, statistics.mean(b[n] for b in per_batch)) for n in per_batch[0]}, per_batch

    start = time.perf_counter()
    reference, ref_batches = estimate(*parse_config(args.reference))
    ref_seconds = time.perf_counter() - start
    ref_se = {n: statistics.stdev(b[n] for b in ref_batches) / len(ref_batches) ** 0.5 for n in reference}
    positive = [n for n, v in reference.items() if v > 0]

    results = {}
    for text in args.configs.split(","):
        config = parse_config(text)
        start = time.perf_counter()
        draws = [estimate(*config)[0] for _ in range(args.repeats)]
        seconds = (time.perf_counter() - start) / args.repeats
        # per quantizer: root-mean-square error of one estimate against the reference, relative to it
        rel_rmse = [statistics.mean((d[n] - reference[n]) ** 2 for d in draws) ** 0.5 / reference[n] for n in positive]
        zero_share = statistics.mean(d[n] == 0.0 for d in draws for n in positive)
        results[text] = {"median_relative_rmse": statistics.median(rel_rmse), "share_clipped_to_zero": zero_share,
                         "seconds_per_estimate": seconds}
        print(f"{text:>10s}: relative RMSE median {statistics.median(rel_rmse):.2f} "
              f"(quartiles {statistics.quantiles(rel_rmse, n=4)[0]:.2f}-{statistics.quantiles(rel_rmse, n=4)[2]:.2f}), "
              f"clipped to 0 {zero_share:.0%}, {seconds:.1f} s per estimate", flush=True)

    idx = torch.randperm(len(labels))[:256]
    layer_seconds = per_layer_hvp_seconds(model, images[idx], labels[idx], layers=6)
    ref_rel_se = statistics.median(ref_se[n] / reference[n] for n in positive)
    authors_seconds = 3 * 50 * len(reference) * layer_seconds
    print(f"reference {args.reference}: {ref_seconds:.0f} s, median relative SE {ref_rel_se:.2f}; "
          f"one per-layer product at 256 images {layer_seconds:.2f} s: the authors' update "
          f"(3 batches x 50 probes x {len(reference)} quantizers) ~{authors_seconds / 3600:.1f} h")
    print(json.dumps({
        "quantizers": len(reference), "reference": args.reference, "reference_seconds": ref_seconds,
        "reference_median_relative_se": ref_rel_se, "layers_with_positive_reference": len(positive),
        "configs": results, "per_layer_hvp_seconds_batch256": layer_seconds,
        "authors_update_seconds_extrapolated": authors_seconds,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
