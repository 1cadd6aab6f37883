"""Where and how code runs: device choice, seeds, torch.compile, torch.distributed."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .errors import DaqkdError


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` force one.

    Under torchrun, ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK`` (one GPU per process, made the
    current device, as NCCL expects); a fixed ``cuda:N`` is refused when several processes share the
    node, since they would all land on one GPU."""
    distributed = dist.is_available() and dist.is_initialized()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DaqkdError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DaqkdError(f"--device {name} asked for CUDA, but no CUDA device is available: use --device cpu")
    if device.type == "cuda" and distributed:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if device.index is not None and local_processes > 1:
            raise DaqkdError(f"--device {name} under torchrun with {local_processes} processes on this node would put "
                             "them all on one GPU: pass --device cuda (process k takes cuda:k; choose the GPUs with "
                             "CUDA_VISIBLE_DEVICES)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DaqkdError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); under torchrun use at most that many "
                         "--nproc_per_node")
    if device.type == "cuda" and distributed:
        torch.cuda.set_device(device)
    return device


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby inputs give unrelated streams."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (part & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state = z ^ (z >> 31)
    return state >> 1


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return "RANK" in os.environ and "MASTER_ADDR" in os.environ


_joined_groups: list[object] = []  # the group init_distributed made, for close_distributed


def init_distributed() -> tuple[int, int]:
    """Join the process group when launched by torchrun, also as a group of one (the same DDP code
    path as several processes); (rank, world size)."""
    if launched_by_torchrun() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        _joined_groups.append(dist.group.WORLD)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def close_distributed() -> None:
    """Leave the process group :func:`init_distributed` joined, before the interpreter exits; a
    group the caller made itself (a notebook, a harness) stays. A gloo process that exits with its
    group alive can abort in the group's C++ threads during finalization ("terminate called without
    an active exception", SIGABRT, pytorch/pytorch#190489): torchrun then reports the run failed.
    Objects in reference cycles (a DDP model whose reducer holds the group, caught in the forward
    hooks of feature distillation) keep the group alive past destroy_process_group until the
    interpreter's last collection, so they are collected first: with --kd sp under 2 processes,
    5 of 25 runs aborted at exit without the collection, 0 of 30 with it."""
    if _joined_groups and dist.is_initialized() and dist.group.WORLD is _joined_groups[-1]:
        gc.collect()
        dist.destroy_process_group()
    _joined_groups.clear()


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size() -> int:
    """Processes in the torch.distributed group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GlobalBatchNormFunction(torch.autograd.Function):
    """Batch normalization with the statistics of the global batch (Ioffe & Szegedy 2015, as
    nn.SyncBatchNorm computes it): per channel, forward all-reduces sum(x) and the count, then
    sum((x - mean)^2) (two passes, as ATen's CPU kernel), backward all-reduces sum(g) and
    sum(g * x_hat) of every process's output gradient g, and
      dx = w invstd (g - sum(g) / N - x_hat sum(g x_hat) / N)
    with the global sums (each process's loss depends on every process's images through the
    statistics). Sums are float64 and x - mean is compensated (see forward): a plain float32
    version was 1 % off in the gradients of a ResNet-20 on real images, where a near-constant channel
    meets invstd ~ 1 / sqrt(eps). Weight and bias get this process's share (DDP averages them).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                module: nn.BatchNorm2d) -> torch.Tensor:  # type: ignore[override]
        dims = (0, 2, 3)
        view = (1, -1, 1, 1)
        sums = torch.cat([x.sum(dims, dtype=torch.float64), x.new_full((1,), x.numel() // x.shape[1],
                                                                        dtype=torch.float64)])
        dist.all_reduce(sums)
        count = float(sums[-1])
        mean = sums[:-1] / count
        # x - mean in two float32 steps (high and low part of the float64 mean): a channel whose
        # spread is 1e-5 of its mean would otherwise lose most digits of x_hat (ATen subtracts in
        # double on the CPU), and its invstd multiplies that error into the gradient
        mean_high = mean.to(x.dtype)
        mean_low = (mean - mean_high.double()).to(x.dtype)
        centred = (x - mean_high.view(view)) - mean_low.view(view)
        squares = centred.square().sum(dims, dtype=torch.float64)  # two passes, as ATen
        dist.all_reduce(squares)
        var = squares / count
        module.update_running_stats(mean, var, count)
        invstd = torch.rsqrt(var + eps).to(x.dtype)
        x_hat = centred * invstd.view(view)
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.count, ctx.has_bias = count, bias is not None
        y = x_hat if weight is None else x_hat * weight.view(1, -1, 1, 1)
        return y if bias is None else y + bias.view(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph: a second derivative would take the statistics as constants
            raise RuntimeError("the synchronized BatchNorm is differentiable once only: take second derivatives "
                               "on batches every process holds whole, inside daqkd.runtime.replicated_batches()")
        x_hat, invstd, weight = ctx.saved_tensors
        dims = (0, 2, 3)
        local = torch.cat([grad.sum(dims, dtype=torch.float64), (grad * x_hat).sum(dims, dtype=torch.float64)])
        grad_bias, grad_weight = local.chunk(2)
        total = local.clone()
        dist.all_reduce(total)
        mean_g, mean_g_xhat = (t.div(ctx.count).to(grad.dtype).view(1, -1, 1, 1) for t in total.chunk(2))
        scale = invstd if weight is None else invstd * weight
        grad_x = (grad - mean_g - x_hat * mean_g_xhat) * scale.view(1, -1, 1, 1)
        return (grad_x, None if weight is None else grad_weight.to(weight.dtype),
                grad_bias.to(grad.dtype) if ctx.has_bias else None, None, None)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch across the processes of
    torch.distributed, on any device and backend (gloo on CPU, NCCL on CUDA).

    torch's ``nn.SyncBatchNorm`` does this with fused CUDA kernels but refuses CPU tensors, where CI
    runs and where daqkd must behave as on a GPU; this is the same computation in plain torch ops
    (:class:`_GlobalBatchNormFunction`). The running variance takes the unbiased N / (N - 1) var, as
    nn.BatchNorm2d. Outside training mode, with one process or inside :func:`replicated_batches`, it is
    nn.BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1 or _replicated_batch_passes:
            return super().forward(x)
        if x.dtype in (torch.float16, torch.bfloat16):  # what autocast does for batch_norm
            x = x.float()
        return _GlobalBatchNormFunction.apply(x, self.weight, self.bias, self.eps, self)

    @torch.no_grad()
    def update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        if not self.track_running_stats or self.running_mean is None or self.running_var is None:
            return
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        unbiased = var * (count / max(count - 1, 1))
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


_replicated_batch_passes = 0  # > 0 inside replicated_batches()


@contextlib.contextmanager
def replicated_batches() -> Iterator[None]:
    """Forward passes in which every process holds the same whole batch (EWGS's Hessian delta takes
    the global training batches on each process): GlobalBatchNorm2d acts as nn.BatchNorm2d there.
    Its global statistics would be the local ones anyway, and nn.BatchNorm2d is differentiable twice,
    which _GlobalBatchNormFunction is not (its statistics enter its backward as constants and its
    all-reduce is not recorded), so a Hessian through it would differ from the single process's."""
    global _replicated_batch_passes
    _replicated_batch_passes += 1
    try:
        yield
    finally:
        _replicated_batch_passes -= 1


def synchronize_batchnorm(model: nn.Module) -> int:
    """Make every nn.BatchNorm2d of ``model`` a :class:`GlobalBatchNorm2d` in place (same parameters,
    buffers and state-dict keys, so checkpoints do not change); the number converted."""
    converted = 0
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d  # a subclass without state of its own
            converted += 1
    return converted


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the processes (itself with one process)."""
    if world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world_size()
