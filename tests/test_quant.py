"""Quantizers: levels, closed-form values, gradients, model surgery, calibration, training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from daqkd.data import load_image_folder
from daqkd.errors import DaqkdError
from daqkd.loading import load_model
from daqkd.models import create_model
from daqkd.quant import (
    QUANTIZERS,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    quantize_model,
    quantized_layers,
    split_parameters,
    update_ewgs_delta,
)
from daqkd.quant.base import make_quantizer
from daqkd.quant.ewgs import EWGSQuantize, EWGSQuantizer
from daqkd.quant.functional import mse_clip, pass_between
from daqkd.quant.lsq import LSQQuantizer
from daqkd.quant.pact import PACTActivationQuantizer

METHODS = sorted(QUANTIZERS)  # every registered method, a new one included


def initialized(q, x: torch.Tensor):
    q(x)  # the first call calibrates
    return q


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("method", METHODS)
def test_at_most_two_to_the_bits_levels(method: str, bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    config = QuantConfig(method=method, w_bits=bits, a_bits=bits)
    weight = torch.randn(32, 16, 3, 3, generator=g) * 0.1
    for per_channel in (None, 32):
        wq = initialized(make_quantizer(config, bits, True, per_channel), weight)
        out = wq(weight)
        levels = [len(torch.unique(o)) for o in out] if per_channel else [len(torch.unique(out))]
        assert max(levels) <= 2 ** bits, (method, bits, per_channel, max(levels))
    for act in (torch.rand(64, 8, 4, 4, generator=g) * 3, torch.randn(64, 8, 4, 4, generator=g)):
        aq = initialized(make_quantizer(config, bits, False, None), act)
        assert len(torch.unique(aq(act))) <= 2 ** bits
        assert bool(aq.signed) == bool((act < 0).any())


def test_dorefa_values_and_gradients() -> None:
    w = torch.tensor([-1.0, -0.2, 0.1, 0.5, 2.0], requires_grad=True)
    q = make_quantizer(QuantConfig(method="dorefa"), 2, True, None)
    out = q(w)
    m = max(abs(math.tanh(v)) for v in w.tolist())
    expected = [2 * round(3 * (math.tanh(v) / (2 * m) + 0.5)) / 3 - 1 for v in w.tolist()]
    assert out.tolist() == pytest.approx(expected)
    x = torch.tensor([[-0.5, 0.1, 0.2, 0.5, 0.9, 1.5]], requires_grad=True)
    a = initialized(make_quantizer(QuantConfig(method="dorefa"), 2, False, None), x.detach().abs())
    y = a(x)
    assert y.tolist()[0] == pytest.approx([0, 0, 1 / 3, 2 / 3, 1, 1])  # round(1.5) = 2 (half to even)
    y.sum().backward()
    assert x.grad.tolist()[0] == [0, 1, 1, 1, 1, 0]  # straight through inside [0, 1]
    binary = make_quantizer(QuantConfig(method="dorefa"), 1, True, None)(w.detach())
    assert binary.tolist() == pytest.approx([-0.76, -0.76, 0.76, 0.76, 0.76])  # sign(w) * mean|w|


def test_pact_values_and_gradients() -> None:
    q = PACTActivationQuantizer(2, alpha=1.0)
    q(torch.ones(1))  # calibrate: unsigned
    x = torch.tensor([-1.0, 0.2, 0.5, 0.9, 3.0], requires_grad=True)
    y = q(x)
    assert y.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1, 1])
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert x.grad.tolist() == [0, 2, 3, 4, 0]  # 1 on [0, alpha)
    assert q.alpha.grad.item() == pytest.approx(5.0)  # 1 where x >= alpha (eq. 3)
    signed = PACTActivationQuantizer(2, alpha=1.0)
    signed(torch.tensor([-1.0]))
    xs = torch.tensor([-2.0, 0.3, 1.5], requires_grad=True)
    ys = signed(xs)
    ys.sum().backward()
    assert signed.alpha.grad.item() == pytest.approx(0.0)  # -1 below -alpha, +1 above alpha
    assert ys.tolist() == pytest.approx([-1, 1 / 3, 1])


def test_lsq_values_and_gradients() -> None:
    q = LSQQuantizer(2, is_weight=False)
    q(torch.ones(1, 5))  # calibrate (unsigned), then set the step by hand
    q.step.data.fill_(0.5)
    x = torch.tensor([[-0.3, 0.2, 0.4, 1.0, 2.0]], requires_grad=True)
    y = q(x)
    assert y.tolist()[0] == pytest.approx([0, 0, 0.5, 1.0, 1.5])
    y.sum().backward()
    assert x.grad.tolist()[0] == [0, 1, 1, 1, 0]
    # d/ds: below -> -Q_N = 0; round(v/s) - v/s = -0.4, 0.2, 0; above -> Q_P = 3; times 1/sqrt(N Q_P)
    assert q.step.grad.item() == pytest.approx((0 - 0.4 + 0.2 + 0 + 3) / math.sqrt(5 * 3))
    w = torch.tensor([0.1, -0.3, 0.25, 0.9], requires_grad=True)
    wq = LSQQuantizer(2, is_weight=True)
    wq(w.detach())
    assert wq.step.item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(1))  # init 2 mean|v| / sqrt(Q_P)
    wq.step.data.fill_(0.2)
    out = wq(w)  # signed 2 bits: Q_N = 2, Q_P = 1
    assert out.tolist() == pytest.approx([0.0, -0.4, 0.2, 0.2])
    out.sum().backward()
    # v/s = 0.5, -1.5, 1.25, 4.5 -> inside, inside, above, above
    assert w.grad.tolist() == [1, 1, 0, 0]
    assert wq.step.grad.item() == pytest.approx((0 - 0.5 + (-2 + 1.5) + 1 + 1) / math.sqrt(4 * 1))


def test_ewgs_values_gradients_and_init() -> None:
    q = EWGSQuantizer(2, is_weight=True, delta=0.5)
    w = torch.tensor([-2.0, -0.5, 0.1, 0.4, 1.5], requires_grad=True)
    q(w.detach())
    assert q.upper.item() == pytest.approx(3 * w.std().item()) and q.lower.item() == pytest.approx(-3 * w.std().item())
    q.lower.data.fill_(-1.0)
    q.upper.data.fill_(1.0)
    q.output_scale.data.fill_(1.0)
    out = q(w)
    n = [0.0, 0.25, 0.55, 0.7, 1.0]
    levels = [round(3 * v) / 3 for v in n]
    assert out.tolist() == pytest.approx([2 * v - 1 for v in levels])
    upstream = torch.tensor([1.0, -1.0, 2.0, 1.0, 1.0])
    out.backward(upstream)
    # d out/d q = 2; EWGS: g (1 + delta sign(g) (n - q)); d n/d w = 1/(u - l) inside [0, 1]
    inside = [0, 1, 1, 1, 0]  # n(-2) = -0.5 and n(1.5) = 1.25 are clipped
    expected = [inside[i] * 2 * g * (1 + 0.5 * math.copysign(1, g) * (n[i] - levels[i])) / 2
                for i, g in enumerate(upstream.tolist())]
    assert w.grad.tolist() == pytest.approx(expected)
    x = torch.rand(16, 4, 5, 5) * 2
    a = EWGSQuantizer(3, is_weight=False)
    a(x)
    assert a.upper.item() == pytest.approx(3 * x.std().item() / math.sqrt(1 - 2 / math.pi))
    assert a.lower.item() == pytest.approx(x.min().item())


def naive_ewgs(x, lower, upper, levels, delta):
    """EWGS written as a chain of autograd ops, the discretizer's scaled gradient by a hook."""
    n = ((x - lower) / (upper - lower)).clamp(0, 1)
    q_value = torch.round(n * (levels - 1)) / (levels - 1)
    q = n + (q_value - n).detach()
    residual = (n - q_value).detach()
    if q.requires_grad:
        q.register_hook(lambda g: g * (1 + delta * torch.sign(g) * residual))
    return q


@pytest.mark.parametrize("delta", [0.0, 0.3])
@pytest.mark.parametrize("per_channel", [False, True])
def test_ewgs_gradients_equal_the_naive_chain(delta: float, per_channel: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)  # float64: the sums cancel
    upstream = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    shape = (4, 1, 1, 1) if per_channel else ()
    lower0 = -0.8 - 0.1 * torch.rand(shape, generator=g, dtype=torch.float64)
    upper0 = 0.9 + 0.1 * torch.rand(shape, generator=g, dtype=torch.float64)
    grads = []
    for fused in (True, False):
        xi, lower, upper = (t.clone().requires_grad_() for t in (x, lower0, upper0))
        if fused:
            delta_arg = None if delta == 0 else torch.tensor(delta, dtype=torch.float64)
            out = EWGSQuantize.apply(xi, lower, upper, 4, delta_arg)
        else:
            out = naive_ewgs(xi, lower, upper, 4, delta)
        out.backward(upstream)
        grads.append((out.detach(), xi.grad, lower.grad, upper.grad))
    for fused, naive in zip(*grads):
        torch.testing.assert_close(fused, naive, rtol=1e-9, atol=1e-12)
    assert grads[0][2].abs().sum() > 0 and grads[0][3].abs().sum() > 0


def test_ewgs_output_scale_calibration() -> None:
    """alpha = mean|FP out| / mean|quantized out| is fitted without the bias (it scales the weights)."""
    torch.manual_seed(0)
    layer = quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 2, 3)),
                           QuantConfig("ewgs", 2, 2))[1]
    x = torch.rand(8, 4, 9, 9)
    fp = nn.functional.conv2d(x, layer.weight)
    out = layer(x) - layer.bias.view(1, -1, 1, 1)
    assert out.abs().mean().item() == pytest.approx(fp.abs().mean().item(), rel=1e-5)


def test_ewgs_signed_inputs_keep_their_zero_point() -> None:
    """Inputs that can be negative are mapped back to [l, u], so a zero input stays ~0."""
    q = EWGSQuantizer(8, is_weight=False, init="mse")
    x = torch.linspace(-2, 2, 401)
    out = q(x)
    assert bool(q.signed)
    assert out[200].abs().item() < 0.01  # x = 0
    assert (out - x).abs().max().item() < 0.01


@pytest.mark.parametrize("flush_denormal", [False, True])
@pytest.mark.parametrize("low, high", [(0.0, 1.0), (-0.75, 0.5), (-1.0, 0.0), (torch.finfo(torch.float32).tiny, 1.0),
                                       (-1.0, -torch.finfo(torch.float32).tiny)])
def test_clip_gradient_passes_on_both_bounds(low: float, high: float, flush_denormal: bool) -> None:
    """The CPU path (hardtanh_backward, exclusive bounds moved one float out) equals the mask
    low <= x <= high, bounds included, also where the CPU flushes denormals: the float below 0 is
    one."""
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor([low - 1e-3, low, low + 1e-7, 0.0, -0.0, -tiny, tiny, high - 1e-7, high, high + 1e-3])
    grad = torch.arange(1.0, len(x) + 1)
    expected = grad.where((x >= low) & (x <= high), 0)
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        got = pass_between(grad, x, low, high)
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(got, expected), (got, expected)


def test_mse_clip() -> None:
    # values on the 2-bit grid of [0, 1] are represented exactly at c = 1
    assert mse_clip(torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]), 2, signed=False).item() == pytest.approx(1.0)
    # one outlier: clipping it beats spending the levels on it
    x = torch.cat([torch.linspace(-1, 1, 1000), torch.tensor([20.0])])
    c = mse_clip(x, 2, signed=True).item()
    assert 0.5 < c < 5
    naive = lambda c: ((torch.round((x.clamp(-c, c) + c) / (2 * c / 3)) * (2 * c / 3) - c) - x).square().sum()
    assert naive(c) <= min(naive(20 * k / 100) for k in range(1, 101)) + 1e-4
    # per channel: one range per row
    w = torch.stack([torch.linspace(-1, 1, 64), torch.linspace(-3, 3, 64)])
    per_row = mse_clip(w, 8, signed=True, dims=(1,))
    assert per_row.shape == (2, 1) and per_row[1].item() == pytest.approx(3 * per_row[0].item(), rel=0.05)
    # a large tensor is searched in chunks of candidates: same answer as row by row
    big = torch.randn(200, 1000, generator=torch.Generator().manual_seed(0))
    rows = torch.stack([mse_clip(r, 3, signed=True) for r in big])
    torch.testing.assert_close(mse_clip(big, 3, signed=True, dims=(1,)).squeeze(1), rows)
    # a large activation is subsampled across its columns, not down one (a power-of-two stride over
    # (N, C, 32, 32) lands on column 0 only): zero there (the padded border), ~U(0, 2) elsewhere
    act = torch.rand(256, 16, 32, 32, generator=torch.Generator().manual_seed(1)) * 2
    act[..., 0] = 0
    assert 1.0 < mse_clip(act, 3, signed=False).item() <= 2.0
    # 56 columns (ImageNet-style stages): the odd stride 49 would land on every 7th column only
    act = torch.rand(64, 16, 56, 56, generator=torch.Generator().manual_seed(2)) * 2
    act[..., ::7] = 0
    assert act.numel() // (1 << 16) == 49
    assert 1.0 < mse_clip(act, 3, signed=False).item() <= 2.0


def test_quantize_model_policies_and_shapes() -> None:
    for model in (create_model("resnet20", 10), torchvision.models.mobilenet_v2(num_classes=10)):
        x = torch.randn(2, 3, 32, 32)
        model.eval()
        fp_shape = model(x).shape
        quantize_model(model, QuantConfig("lsq", 4, 4))
        assert model(x).shape == fp_shape
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert type(layers[0]) is nn.Conv2d and type(layers[-1]) is nn.Linear  # "fp"
        assert all(isinstance(m, (QuantConv2d, QuantLinear)) for m in layers[1:-1])
    model = quantize_model(create_model("resnet20", 10), QuantConfig("ewgs", 2, 3, first_last=8))
    assert model.conv1.weight_quantizer.bits == 8 and model.linear.act_quantizer.bits == 8
    assert model.layer2[0].conv1.weight_quantizer.bits == 2 and model.layer2[0].conv1.act_quantizer.bits == 3
    same = quantize_model(create_model("resnet20", 10), QuantConfig("dorefa", 2, 2, first_last="same"))
    assert same.conv1.weight_quantizer.bits == 2 and isinstance(same.linear, QuantLinear)
    assert len(quantized_layers(same)) == 20  # 19 convs + the linear head; shortcuts have no parameters
    # option B: the two 1x1 shortcut convolutions are quantized like the others; --first-last
    # covers only the stem and the head
    b = quantize_model(create_model("resnet20b", 10), QuantConfig("ewgs", 3, 4, first_last=8))
    assert len(quantized_layers(b)) == 22
    assert b.conv1.weight_quantizer.bits == 8 and b.fc.weight_quantizer.bits == 8
    for stage in (b.layer2, b.layer3):
        shortcut = stage[0].downsample[0]
        assert (shortcut.weight_quantizer.bits, shortcut.act_quantizer.bits) == (3, 4)
    b.eval()
    assert b(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("bad,message", [
    ({"method": "lsqq"}, "unknown quantization method 'lsqq'"),
    ({"w_bits": 0}, "--w-bits must be an integer from 1 to 8, or 32"),
    ({"a_bits": 9}, "--a-bits must be"),
    ({"a_bits": 2.5}, "--a-bits must be"),
    ({"first_last": 16}, "first_last must be"),
    ({"ewgs_hessian_probes": 0}, "--ewgs-hessian-probes must be a positive integer, got 0"),
    ({"ewgs_hessian_batches": 1.5}, "--ewgs-hessian-batches must be a positive integer"),
    ({"ewgs_delta_every": True}, "--ewgs-delta-every must be a positive integer"),
    ({"residual_bits": 16}, "--residual-bits must be an integer from 1 to 8, or 32"),
])
def test_bad_config_gives_one_clear_line(bad: dict, message: str) -> None:
    with pytest.raises(DaqkdError, match=message) as info:
        quantize_model(create_model("resnet20", 10), QuantConfig(**bad))
    assert "\n" not in str(info.value)


def test_numpy_numbers_are_stored_as_python_numbers() -> None:
    """A notebook's numpy scalars: accepted, and stored so that checkpoint metadata (JSON) can hold them."""
    import dataclasses
    import json

    import numpy as np

    config = QuantConfig(np.str_("ewgs"), np.int64(3), np.int32(4), per_channel=np.bool_(True),
                         first_last=np.int64(8), ewgs_delta=np.float32(0.5), ewgs_hessian_probes=np.uint8(2),
                         pact_alpha=np.float16(6))
    config.validate()
    assert [type(getattr(config, f)) for f in ("w_bits", "a_bits", "first_last", "ewgs_hessian_probes")] == [int] * 4
    assert type(config.ewgs_delta) is float and type(config.pact_alpha) is float and config.per_channel is True
    assert json.loads(json.dumps(dataclasses.asdict(config)))["w_bits"] == 3
    with pytest.raises(DaqkdError, match="--w-bits must be an integer"):
        QuantConfig(w_bits=np.bool_(True)).validate()  # a boolean is no bit width, numpy's neither
    with pytest.raises(DaqkdError, match="--a-bits must be an integer"):
        QuantConfig(a_bits=np.float64(4.0)).validate()
    with pytest.raises(DaqkdError, match="per_channel must be True or False, got 1"):
        QuantConfig(per_channel=1).validate()
    with pytest.raises(DaqkdError, match="--ewgs-delta must be a number >= 0"):
        QuantConfig(ewgs_delta=np.bool_(False)).validate()


def test_quantizer_state_travels_in_the_state_dict() -> None:
    torch.manual_seed(0)
    config = QuantConfig("lsq", 3, 3, per_channel=True)
    model = quantize_model(create_model("resnet20", 10), config).eval()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    state = model.state_dict()
    assert "layer1.0.conv1.weight_quantizer.step" in state and "layer1.0.conv1.act_quantizer.signed" in state
    fresh = quantize_model(create_model("resnet20", 10), config).eval()
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), expected)  # no re-calibration on the first batch
    assert state["layer1.0.conv1.weight_quantizer.step"].shape == (16,)


def test_parameter_groups() -> None:
    for method, n_quant, n_decay in (("ewgs", 5 * 18, 0), ("lsq", 2 * 18, 0), ("pact", 0, 18), ("dorefa", 0, 0)):
        model = quantize_model(create_model("resnet20", 10), QuantConfig(method, 2, 2))
        model(torch.randn(2, 3, 32, 32))
        groups = split_parameters(model)
        assert (len(groups.quantizer), len(groups.quantizer_decay)) == (n_quant, n_decay), method
        assert len(groups.model) == len(list(create_model("resnet20", 10).parameters()))


def test_ewgs_activations_beside_full_precision_weights_keep_their_scale() -> None:
    """W32/A4 EWGS: without a weight quantizer's calibrated alpha to absorb the activations' (u - l),
    they return l + (u - l) q; unsigned [0, 1] codes shrank every layer's output (the random-init
    ResNet-20 below: logits at 6 % of the FP model's, cosine 0.63). The grid says the same."""
    torch.manual_seed(0)
    fp = create_model("resnet20", 10).eval()
    x = torch.relu(torch.randn(64, 3, 32, 32))
    model = quantize_model(create_model("resnet20", 10), QuantConfig("ewgs", 32, 4))
    model.load_state_dict(fp.state_dict(), strict=False)
    model.eval()
    with torch.no_grad():
        model(x)  # calibrates
        out, ref = model(x), fp(x)
    assert 0.8 < float(out.abs().mean() / ref.abs().mean()) < 1.25
    assert float(nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)) > 0.99
    act = model.layer1[0].conv2.act_quantizer
    a = torch.relu(torch.randn(4, 16, 8, 8)) * 2
    grid = act.grid()
    codes = ((a - grid.shift) / grid.scale).round().clamp(grid.qmin, grid.qmax)
    torch.testing.assert_close(act(a), grid.out_shift + grid.out_scale * codes, atol=1e-5, rtol=0)


def test_pact_alpha_trains_with_the_weights_and_the_intervals_with_their_own_adam() -> None:
    """PACT's alpha at the model's LR with its own L2 (Choi et al. 2018); EWGS/LSQ quantizer
    parameters in a separate Adam at quant_lr (the EWGS authors')."""
    from daqkd.train import TrainConfig, build_optimizers

    config = TrainConfig(epochs=1, lr=0.1, quant_lr=1e-5, weight_decay=5e-4)
    pact = quantize_model(create_model("resnet20", 10), QuantConfig("pact", 2, 2))
    pact(torch.randn(2, 3, 32, 32))
    (main, _), = build_optimizers(pact, config, steps_per_epoch=10)
    alphas = split_parameters(pact).quantizer_decay
    assert [len(g["params"]) for g in main.param_groups] == [len(split_parameters(pact).model), 18]
    assert main.param_groups[1]["params"] == alphas
    assert (main.param_groups[1]["lr"], main.param_groups[1]["weight_decay"]) == (0.1, config.pact_weight_decay)
    ewgs = quantize_model(create_model("resnet20", 10), QuantConfig("ewgs", 2, 2))
    ewgs(torch.randn(2, 3, 32, 32))
    (main, _), (quant, _) = build_optimizers(ewgs, config, steps_per_epoch=10)
    assert isinstance(quant, torch.optim.Adam) and quant.param_groups[0]["lr"] == 1e-5
    assert len(main.param_groups) == 1 and main.param_groups[0]["weight_decay"] == 5e-4


@pytest.mark.parametrize("method,init", [("ewgs", "mse"), ("lsq", "paper"), ("ste", "paper")])
def test_w8a8_resnet20_keeps_fp_accuracy(method: str, init: str, shared_cifar10: Path, shared_resnet20: Path) -> None:
    """Calibrated 8-bit quantizers lose < 1 point and keep >= 95% of the predictions. EWGS needs its
    "mse" initialization for that: the authors' 3-sigma intervals clip the large weights (checked
    below). DoReFa and PACT are left out by design: their weights are tanh-normalized to [-1, 1] (and
    PACT clips at alpha = 10), so a pretrained model needs training before it works again; the
    tests above pin their formulas instead."""
    data = load_image_folder(shared_cifar10, "test", limit_per_class=100)
    model, _ = load_model(shared_resnet20, arch="resnet20", normalize="imagenet", num_classes=10)
    model.eval()
    with torch.no_grad():
        fp_pred = model(data.images).argmax(1)
        quantize_model(model.model, QuantConfig(method, 8, 8, ewgs_init=init))
        model(data.images[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:256]])  # calibrate
        q_pred = model(data.images).argmax(1)
    fp_top1 = (fp_pred == data.labels).float().mean().item()
    q_top1 = (q_pred == data.labels).float().mean().item()
    assert fp_top1 > 0.75
    assert q_top1 > fp_top1 - 0.01, (fp_top1, q_top1)
    assert (q_pred == fp_pred).float().mean().item() >= 0.95
    if method == "ewgs":
        paper = EWGSQuantizer(8, is_weight=True)
        w = model.model.layer1[0].conv1.weight
        paper(w)
        assert paper.upper.item() == pytest.approx(3 * w.std().item()) and paper.upper.item() < w.abs().max().item()


@pytest.mark.parametrize("method", METHODS)
def test_w2a2_trains(method: str) -> None:
    torch.manual_seed(0)
    model = quantize_model(create_model("resnet20", 10), QuantConfig(method, 2, 2))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    model(x)  # calibrate
    groups = split_parameters(model)
    optimizer = torch.optim.Adam([{"params": groups.model, "lr": 3e-3},
                                  {"params": groups.quantizer + groups.quantizer_decay, "lr": 1e-3}])
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-5:]) < 0.7 * losses[0], (method, losses[0], losses[-5:])


def test_ewgs_hessian_delta() -> None:
    torch.manual_seed(0)
    model = quantize_model(create_model("resnet20", 10), QuantConfig("ewgs", 2, 2, ewgs_delta=None))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    model(x)
    deltas = update_ewgs_delta(model, nn.functional.cross_entropy, [(x, y)], probes=2)
    assert len(deltas) == 2 * 18
    assert all(math.isfinite(d) and d >= 0 for d in deltas.values())
    assert any(d > 0 for d in deltas.values())
    layer = model.layer1[0].conv1
    assert float(layer.act_quantizer.delta) == pytest.approx(deltas["layer1.0.conv1.act_quantizer"])
    fixed = quantize_model(create_model("resnet20", 10), QuantConfig("ewgs", 2, 2, ewgs_delta=0.1))
    assert update_ewgs_delta(fixed, nn.functional.cross_entropy, [(x, y)]) == {}


def test_hessian_delta_is_clipped_after_averaging_and_runs_without_compiled_kernels(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """delta = max(0, mean over batches), as the EWGS authors' update_grad_scales (clipping each batch
    first biases it upward); the twice-differentiated pass never enters a compiled kernel, whose
    backward refuses create_graph (with kernels on, as outside the tests, it crashed)."""
    from daqkd.quant import kernels
    from daqkd.quant.ewgs import hessian_delta_estimates

    torch.manual_seed(0)
    model = quantize_model(create_model("resnet20", 10), QuantConfig("ewgs", 2, 2, ewgs_delta=None))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    model(batches[0][0])

    def no_compiled_kernel(*args):
        raise AssertionError("a compiled kernel ran inside the Hessian pass")

    monkeypatch.setitem(kernels._state, "mode", "1")
    monkeypatch.setattr(kernels, "run_fused", no_compiled_kernel)
    torch.manual_seed(5)  # the probes' draws, replayed below
    first, second = (hessian_delta_estimates(model, nn.functional.cross_entropy, x, y) for x, y in batches)
    torch.manual_seed(5)
    deltas = update_ewgs_delta(model, nn.functional.cross_entropy, batches)
    assert any((first[n] < 0) != (second[n] < 0) for n in first)  # where the order of clip and mean matters
    for name, delta in deltas.items():
        assert delta == pytest.approx(max(0.0, (first[name] + second[name]) / 2), rel=1e-6, abs=1e-12), name


@pytest.mark.parametrize("delta", [None, 0.3])
def test_compiled_kernels_equal_the_eager_ones(delta: float | None) -> None:
    """The torch.compile'd kernels (per-tensor activations) give the eager functions' values and
    gradients; the rest of the suite runs eager (conftest) to skip the compilation."""
    from daqkd.quant import kernels
    from daqkd.quant.functional import ClipQuantize

    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, 32, 32, generator=g)  # 131,072 elements: above kernels.MIN_ELEMENTS
    upstream = torch.randn(x.shape, generator=g)
    results = {}
    for mode in ("0", "1"):
        kernels.set_fused_kernels(mode)
        try:
            xi = x.clone().requires_grad_()
            lower, upper = torch.tensor(-0.7, requires_grad=True), torch.tensor(1.1, requires_grad=True)
            d = None if delta is None else torch.tensor(delta)
            out = EWGSQuantize.apply(xi, lower, upper, 8, d)
            xc = x.clone().requires_grad_()
            alpha = torch.tensor(1.2, requires_grad=True)
            clipped = ClipQuantize.apply(xc, -alpha, alpha, 4)
            (out * upstream).sum().backward()
            (clipped * upstream).sum().backward()
            results[mode] = [out, xi.grad, lower.grad, upper.grad, clipped, xc.grad, alpha.grad]
        finally:
            kernels.set_fused_kernels("0")
    for index in (0, 4):  # values: equal but for (rare) ties at a rounding boundary, 1 ulp apart
        assert (results["1"][index] != results["0"][index]).float().mean().item() < 1e-4
    for eager, fused in zip(results["0"][1:4] + results["0"][5:], results["1"][1:4] + results["1"][5:]):
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_quantizers_compute_in_float32_under_autocast(method: str) -> None:
    """bf16 inputs (autocast on CUDA) are quantized in float32: computing (x - l) / s in bf16 moved
    half of a W3A3 ResNet-20's activations across a level boundary (benchmarks/gpu_check.py)."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 8, 16, 16, generator=g) * 2).relu().bfloat16()
    q = initialized(make_quantizer(QuantConfig(method=method), 3, False, None), x.float())
    reference = q(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, reference)


def test_quantizer_flags_follow_the_state_dict() -> None:
    """initialized / signed are read from the buffers once (a GPU sync each), and again after a load."""
    x = torch.randn(2, 4, 8, 8)
    source = initialized(make_quantizer(QuantConfig(method="lsq"), 2, False, None), x)
    target = make_quantizer(QuantConfig(method="lsq"), 2, False, None)
    assert not target.is_initialized and not target.is_signed
    target.load_state_dict(source.state_dict())
    assert target.is_initialized and target.is_signed
    step = target.step.detach().clone()
    target(x.abs() * 100)  # no re-initialization from this very different tensor
    assert torch.equal(target.step.detach(), step)


@pytest.mark.parametrize("arch", ["resnet20", "resnet20b"])
def test_residual_bits_put_every_tensor_a_block_adds_or_reads_on_an_integer_grid(arch: str) -> None:
    """--residual-bits 8: the stem output, each block's residual branch, projection shortcut and output
    are multiples of their LSQ step with codes in 8 bits (unsigned after a ReLU, signed after a
    BatchNorm), so each addition adds integers; the default leaves the stream in float."""
    torch.manual_seed(0)
    model = create_model(arch, 10)
    plain_keys = set(quantize_model(create_model(arch, 10), QuantConfig("ewgs", 4, 4)).state_dict())
    quantize_model(model, QuantConfig("ewgs", 4, 4, residual_bits=8))
    x = torch.randn(8, 3, 32, 32)
    model(x)  # calibration
    model.eval()
    seen: dict[str, torch.Tensor] = {}
    quantizers = {n: m for n, m in model.named_modules() if n.endswith(("stem_quantizer", "residual_quantizer",
                                                                        "output_quantizer", "shortcut_quantizer"))}
    for name, module in quantizers.items():
        if isinstance(module, LSQQuantizer):
            module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, out.detach()))
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    blocks = 9
    expected = 1 + 2 * blocks + (2 if arch.endswith("b") else 0)
    assert len(seen) == expected, sorted(seen)
    for name, out in seen.items():
        quantizer = quantizers[name]
        codes = out / quantizer.step
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
        low, high = (-128, 127) if quantizer.is_signed else (0, 255)
        assert low <= int(codes.round().min()) and int(codes.round().max()) <= high, name
        assert quantizer.is_signed == name.endswith(("residual_quantizer", "shortcut_quantizer")), name
    assert set(model.state_dict()) - plain_keys == {f"{n}.{k}" for n in seen for k in ("step", "initialized", "signed")}


def test_residual_bits_need_a_model_that_places_them() -> None:
    message = "--residual-bits is implemented for the CIFAR ResNets, not CifarVGG: drop --residual-bits"
    with pytest.raises(DaqkdError, match=message) as info:
        quantize_model(create_model("vgg11", 10), QuantConfig("ewgs", 4, 4, residual_bits=8))
    assert "\n" not in str(info.value)
