"""CUDA checks that CI cannot run (it has no GPU): the code gives on the GPU what it gives on the CPU.

    python benchmarks/gpu_check.py            # on a CUDA machine; exits 1 on the first failed check

1. Quantizers: every quantizer of a W3A3 ResNet-20 of each method, calibrated on the CPU and
   copied to the GPU, gives the CPU's outputs and gradients on the same real activations, with
   eager and with compiled kernels; a bf16-autocast training step (what CUDA training runs) has
   finite gradients and float32 quantizer math.
2. Augmentation: every DA draws the same per-image parameters on both devices (the generator is a
   CPU one), so the CUDA batch equals the CPU batch up to interpolation ties, and it is random
   per image (64 copies of one image give many different outputs).
3. Metric: the statistics accumulated on the GPU equal those on the CPU (float64).
4. Mixed image sizes (the large-image path crops on the CPU): a teacher trains an epoch, evaluates
   and ranks two candidates on the GPU.

The last line printed is one JSON object of the measured figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from daqkd.augment import Candidate, parse_candidates
from daqkd.data import load_data
from daqkd.loading import load_model
from daqkd.metric import DAStatistics
from daqkd.quant import QUANTIZERS, QuantConfig, Quantizer, kernels, quantize_model

METHODS = tuple(m for m in sorted(QUANTIZERS) if m != "ste")  # ste: dorefa without its weight transform
TEACHER = Path(__file__).resolve().parent / "results" / "cifar10-resnet20-w3a3" / "teacher" / "model.safetensors"
failures: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def quantizer_inputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every quantizer of ``model`` in one forward pass of ``x``."""
    inputs: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_hook(lambda m, i, o, name=name: inputs.setdefault(name, i[0].detach().clone()))
               for name, module in model.named_modules() if isinstance(module, Quantizer)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return inputs


def quantizer_pass(quantizer: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> list[torch.Tensor]:
    """[output, dL/dx, dL/dparam...] on the CPU, for L = sum(output * upstream)."""
    quantizer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = quantizer(x)
    (out * upstream).sum().backward()
    return [out.detach().cpu(), x.grad.cpu()] + [
        p.grad.detach().cpu() for p in quantizer.parameters() if p.grad is not None]


def check_quantizers(device: torch.device, teacher: str, x: torch.Tensor, y: torch.Tensor, figures: dict) -> None:
    """Each quantizer of a W3A3 ResNet-20, fed the same (real) tensor on both devices.

    Compared layer by layer rather than by the model's logits: a quantized network amplifies any
    difference (one activation rounded the other way in an early layer, from a 1-ulp difference
    in a convolution, changes the logits by percent), so the end-to-end view cannot tell a bug
    from float noise. x: (N, 3, 32, 32) uint8 images, y: (N,) labels.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    for method in METHODS:
        torch.manual_seed(0)
        model, _ = load_model(teacher, num_classes=10)
        quantize_model(model.model, QuantConfig(method=method, w_bits=3, a_bits=3))
        kernels.set_fused_kernels("0")
        model.eval()
        inputs = quantizer_inputs(model, x)  # the first pass also calibrates the quantizers (CPU)
        model.train()
        modules = dict(model.named_modules())
        worst = {"0": [0.0, 0.0, 0.0], "1": [0.0, 0.0, 0.0]}  # output flips, dx mismatch, param rel err
        for name, tensor in inputs.items():
            upstream = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(len(name)))
            kernels.set_fused_kernels("0")
            ref = quantizer_pass(modules[name], tensor, upstream)
            gpu_quantizer = copy.deepcopy(modules[name]).to(device)
            for mode in ("0", "1"):
                kernels.set_fused_kernels(mode)
                got = quantizer_pass(gpu_quantizer, tensor.to(device), upstream.to(device))
                flips = (got[0] - ref[0]).abs().gt(1e-5 * ref[0].abs().max()).float().mean().item()
                dx = (~torch.isclose(got[1], ref[1], rtol=1e-4, atol=1e-7)).float().mean().item()
                param = max([((g - r).norm() / r.norm().clamp_min(1e-12)).item() for g, r in zip(got[2:], ref[2:])],
                            default=0.0)
                worst[mode] = [max(a, b) for a, b in zip(worst[mode], (flips, dx, param))]
        for mode, (flips, dx, param) in worst.items():
            figures[f"{method}_fused{mode}_worst"] = {
                "output_flips": flips,
                "dx_mismatch": dx,
                "param_grad_rel_err": param,
            }
            check(
                f"{method} fused={mode} CUDA vs CPU, {len(inputs)} quantizers",
                flips < 1e-3 and dx < 1e-3 and param < 1e-3,
                f"worst layer: outputs differing {flips:.1e}, dL/dx differing {dx:.1e}, "
                f"parameter gradients rel err {param:.1e}",
            )
        check_autocast(method, model.to(device), x.to(device), y.to(device), figures)


def check_autocast(method: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, figures: dict) -> None:
    """A bf16-autocast training step (what CUDA training runs): finite, float32 quantizer math."""
    kernels.set_fused_kernels("auto")
    dtypes = set()
    handles = [m.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
               for m in model.modules() if isinstance(m, Quantizer)]
    with torch.no_grad():
        reference = model(x).float()
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        logits = model(x).float()
    F.cross_entropy(logits, y).backward()
    for h in handles:
        h.remove()
    grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    agree = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
    figures[f"{method}_bf16_argmax_agreement_with_fp32"] = agree
    check(
        f"{method} bf16 autocast step",
        grads_finite and bool(torch.isfinite(logits).all()) and dtypes == {torch.float32},
        f"finite gradients {grads_finite}, quantizer outputs {sorted(str(d) for d in dtypes)}, "
        f"argmax agreement with float32 {agree:.3f}",
    )


def check_augment(device: torch.device, figures: dict) -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (64,), generator=g)
    same = images[:1].expand(64, -1, -1, -1).contiguous()
    for name in parse_candidates("all"):
        candidate = Candidate(name, 10)
        cpu_x, cpu_t = candidate(images, labels, torch.Generator().manual_seed(7))
        gpu_x, gpu_t = candidate(images.to(device), labels.to(device), torch.Generator().manual_seed(7))
        equal = (gpu_x.cpu() == cpu_x).float().mean().item()
        targets_equal = torch.allclose(gpu_t.cpu().float(), cpu_t.float())
        copies, _ = candidate(same.to(device), labels.to(device), torch.Generator().manual_seed(8))
        distinct = len({tuple(im.flatten().tolist()) for im in copies.cpu()[:, :, ::4, ::4]})
        figures[f"aug_{name}_equal_fraction"] = equal
        figures[f"aug_{name}_distinct_of_64"] = distinct
        check(f"augment {name}", gpu_x.device.type == device.type and equal > 0.98 and targets_equal and distinct >= 16,
              f"CUDA == CPU on {100 * equal:.2f}% of pixels, targets equal {targets_equal}, "
              f"{distinct}/64 distinct views of one image")


def check_metric(device: torch.device, figures: dict) -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5000, 10, generator=g) * 3
    targets = torch.randint(0, 10, (5000,), generator=g)
    results = []
    for dev in (torch.device("cpu"), device):
        stats = DAStatistics(10, group_size=500, device=dev)
        for start in range(0, 5000, 1000):
            stats.update(logits[start:start + 1000].to(dev), targets[start:start + 1000].to(dev))
        results.append(stats.compute())
    worst = max(
        abs(results[0][k] - results[1][k]) for k in results[0] if k != "variance" or results[0][k] == results[0][k]
    )
    figures["metric_max_abs_diff"] = worst
    check("metric CUDA vs CPU", worst < 1e-6, f"largest difference of a figure {worst:.2e}")


def check_mixed_sizes(device: torch.device, figures: dict) -> None:
    import tempfile

    from daqkd.api import TeacherOptions, train_teacher
    from daqkd.data import ImageSet
    from daqkd.models import NormalizedModel, create_model, parse_normalization
    from daqkd.rank import RankConfig, rank_candidates

    g = torch.Generator().manual_seed(3)
    sizes = [(40, 48), (48, 40), (56, 56)] * 8
    images = [torch.randint(0, 256, (3, *s), dtype=torch.uint8, generator=g) for s in sizes]
    data = ImageSet(images, torch.arange(24) % 3, ["a", "b", "c"], "mixed sizes")
    try:
        with tempfile.TemporaryDirectory() as out:
            trainer = train_teacher(TeacherOptions(arch="resnet20", aug="none+cutmix", batch_size=12, epochs=1,
                                                   device=str(device), out=out, no_progress=True),
                                    data=(data, data))
            teacher = NormalizedModel(create_model("resnet20", 3), parse_normalization("cifar10"))
            report = rank_candidates(teacher, data, RankConfig(augs=["none", "none+cutmix"], batch_size=12), device,
                                     crop_size=32)
        ok, detail = len(report["candidates"]) == 2, f"top-1 {trainer.history[-1]['test_top1']:.1f}%, ranked 2"
    except Exception as exc:  # noqa: BLE001  (any failure is this check's result; the script goes on)
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    figures["mixed_sizes_ok"] = ok
    check("mixed image sizes train, evaluate and rank on the device", ok, detail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the device to compare with the CPU")
    parser.add_argument("--teacher", default=str(TEACHER), help="trained CIFAR-10 model for the quantizer checks")
    parser.add_argument("--data", help="CIFAR-10 ImageFolder: its first test images (default: random images)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine (or --device cpu to smoke-test)")
        return 2
    figures: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__}
    check_metric(device, figures)
    check_augment(device, figures)
    check_mixed_sizes(device, figures)
    if args.data:
        test = load_data(args.data, None, "test", limit_per_class=7)
        x, y = test.images, test.labels
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (70,), generator=g)
    check_quantizers(device, args.teacher, x, y, figures)
    figures["failures"] = failures
    print(json.dumps(figures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
