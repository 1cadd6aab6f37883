"""The training loop shared by `daqkd teacher` (FP) and `daqkd train` (QAT + KD student).

Batches come from the uint8 images cached in RAM and are augmented on the model's device by the
same per-image batched DAs as the ranking (cheap next to a training step, so data never starves
it). Every random draw comes from generators seeded by (seed, epoch, batch), so a run is
deterministic and a resumed run continues exactly: `RUN/state.pt` (written atomically every epoch
and every ``save_every`` steps) holds model, optimizers, schedulers, RNG state and position.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .augment import Candidate
from .checkpoint import FORMAT_VERSION, RESUME_STATE_REMEDY, check_format, save_checkpoint, write_failed
from .data import ImageSet
from .distill import DistillLoss, DistillTask
from .errors import DaqkdError
from .quant import split_parameters
from .rundir import BEST_FILE, LAST_FILE, STATE_FILE, append_history, atomic_path, remove_partial_files, write_history
from .runtime import all_reduce_mean, is_main_process, mix_seed, synchronize_batchnorm, world_size


@dataclass
class TrainConfig:
    """Optimization settings; recorded in RUN/config.json."""

    epochs: int = 1
    batch_size: int = 256
    aug: str = "none"
    optimizer: str = "sgd"  # "sgd" (momentum) or "adam" for the model's weights
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    quant_lr: float = 1e-5  # quantizer parameters (intervals, steps): Adam, own cosine schedule
    quant_weight_decay: float = 0.0
    pact_weight_decay: float = 1e-4  # L2 on PACT's clipping levels
    warmup_epochs: float = 0.0
    seed: int = 0
    save_every: int = 0  # also checkpoint every N steps (0: at epoch ends only)
    eval_batch_size: int = 500
    eval_every: int = 1  # test evaluation every N epochs and after the last one
    amp: bool = True  # bf16 autocast for training steps on CUDA (evaluation is always float32)
    augment_workers: int = 0  # augment batches ahead in this many CPU worker processes (0: in the step's process)
    compile: bool = False  # the step's forward and backward as one torch.compile graph each (fullgraph)
    stop_at_epoch: int | None = None  # stop after this epoch of the schedule (evaluated there); resume goes on


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor: linear warmup to 1, then cosine to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizers(model: nn.Module, config: TrainConfig, steps_per_epoch: int) -> list[tuple[Any, Any]]:
    """(optimizer, scheduler) pairs: the model's weights, and (if any) the quantizers' parameters.

    The quantizers' own parameters (EWGS intervals, LSQ steps) take Adam at ``quant_lr``, as the
    EWGS authors train theirs. PACT's clipping levels instead train with the weights, at the model's
    LR with their own L2 (``pact_weight_decay``), as in Choi et al. 2018: they start at 10, far
    above a BN + ReLU activation, and Adam at 1e-5 would move them by ~1e-5 a step."""
    groups = split_parameters(model)
    main_groups: list[dict[str, Any]] = [{"params": groups.model}]
    if groups.quantizer_decay:
        main_groups.append({"params": groups.quantizer_decay, "weight_decay": config.pact_weight_decay})
    if config.optimizer == "sgd":
        main = torch.optim.SGD(main_groups, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=False)
    elif config.optimizer == "adam":
        main = torch.optim.Adam(main_groups, lr=config.lr, weight_decay=config.weight_decay)
    else:
        raise DaqkdError(f"unknown optimizer {config.optimizer!r}: use sgd or adam")
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    pairs = [(main, torch.optim.lr_scheduler.LambdaLR(main, cosine_with_warmup(total, warmup)))]
    if groups.quantizer:
        quant = torch.optim.Adam(groups.quantizer, lr=config.quant_lr, weight_decay=config.quant_weight_decay)
        pairs.append((quant, torch.optim.lr_scheduler.LambdaLR(quant, cosine_with_warmup(total, warmup))))
    return pairs


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, device: torch.device, batch_size: int = 500) -> dict[str, Any]:
    """top1, top5 (%), mean CE loss and per-class top-1 (%) on clean images (the identity view).

    Under torch.distributed each process evaluates every world-th image and the sums are all-reduced:
    the figures are those of the whole set, computed once."""
    was_training = model.training
    model.eval()
    view = Candidate("identity", data.num_classes)
    rank, world = (dist.get_rank(), world_size()) if world_size() > 1 else (0, 1)
    shard = torch.arange(rank, len(data), world)
    correct1 = correct5 = 0
    loss_sum = 0.0
    per_class_correct = torch.zeros(data.num_classes)
    per_class_total = torch.zeros(data.num_classes)
    for start in range(0, len(shard), batch_size):
        idx = shard[start:start + batch_size]
        images = data.take(idx)
        if isinstance(images, torch.Tensor):
            images = images.to(device)
        x = view.base_view(images, torch.Generator()).to(device)  # mixed sizes are cropped on the CPU
        labels = data.labels[idx].to(device)
        # float32, whatever training used: the figure reported is the model's, not its bf16 twin's
        logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(min(5, data.num_classes), dim=1).indices
        hit1 = (top[:, 0] == labels)
        correct1 += int(hit1.sum())
        correct5 += int((top == labels[:, None]).any(dim=1).sum())
        per_class_correct.index_add_(0, labels.cpu(), hit1.float().cpu())
        per_class_total.index_add_(0, labels.cpu(), torch.ones(len(labels)))
    model.train(was_training)
    if world > 1:
        sums = torch.cat([torch.tensor([correct1, correct5, loss_sum], dtype=torch.float64),
                          per_class_correct.double(), per_class_total.double()])
        if dist.get_backend() == "nccl":
            sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
        correct1, correct5, loss_sum = int(sums[0]), int(sums[1]), float(sums[2])
        per_class_correct, per_class_total = sums[3:3 + data.num_classes], sums[3 + data.num_classes:]
    n = len(data)
    return {
        "top1": 100.0 * correct1 / n,
        "top5": 100.0 * correct5 / n,
        "loss": loss_sum / n,
        "per_class_top1": {c: (100.0 * float(per_class_correct[i] / per_class_total[i])
                               if per_class_total[i] > 0 else None)
                           for i, c in enumerate(data.classes)},
    }


class AugmentedBatches(torch.utils.data.Dataset):
    """Batches ``first``, ``first + 1``, ... of an epoch, augmented on the CPU: what a DataLoader's
    worker processes compute ahead of the training step (``TrainConfig.augment_workers``).

    Batch b is the images ``order[b * batch_size:(b + 1) * batch_size]`` under the generator seeded
    with (seed, epoch, b), exactly as in the training process: a worker changes where the pixels are
    computed, not which. Items: (images (B, 3, S, S) uint8, targets (B,) or (B, classes)).
    """

    def __init__(self, data: ImageSet, candidate: Candidate, order: torch.Tensor, batch_size: int,
                 seed: int, epoch: int, first: int, steps: int) -> None:
        self.data, self.candidate, self.order = data, candidate, order
        self.batch_size, self.seed, self.epoch, self.first, self.steps = batch_size, seed, epoch, first, steps

    def __len__(self) -> int:
        return self.steps - self.first

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.first + i
        idx = self.order[b * self.batch_size:(b + 1) * self.batch_size]
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, b))
        return self.candidate(self.data.take(idx), self.data.labels[idx], generator)


# torch.compile's backend for --compile (environment: DAQKD_COMPILE_BACKEND, e.g. "aot_eager" to tell
# a tracing problem from a code-generation one); tests trace with "aot_eager" (the same graphs, run
# by ATen) because inductor's code generation takes minutes on a 2-core CPU.
COMPILE_BACKEND = os.environ.get("DAQKD_COMPILE_BACKEND", "inductor")


def compile_step(task: DistillTask, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor],
                                                                     dict[str, torch.Tensor]]:
    """The training step's forward (teacher, student with its fake quantizers, loss) compiled as one
    graph, and through AOTAutograd its backward as another; on CUDA replayed as CUDA graphs
    ("reduce-overhead"). ``fullgraph``: a graph break is an error naming the fix, not a silent
    slowdown. The optimizer step stays eager: torch.optim breaks the graph around ``step()`` by
    design (pytorch#104053), so it would be a graph of its own, it needs tensor learning rates to
    avoid a recompilation per LR value, and tracing Adam over a ResNet-20's ~70 tensors took 2.5
    minutes on our 2-core CPU (aot_eager, weights 6e-4 apart from eager after 5 steps; one by-hand
    trial on 2026-11-29, beside other work), to replace about ten multi-tensor kernel launches per
    step on CUDA (foreach Adam) with one or two (not measured).

    Under torch.distributed the student is DDP-wrapped, and DDP's forward (its bucket bookkeeping)
    runs eagerly by design: the step compiles as the graphs around it plus the student's own
    graphs, split at DDP's gradient buckets (Dynamo's DDPOptimizer) so that all-reduces overlap
    the backward, as ``torch.compile(DDP(model))`` does in timm and torchvision's references. No
    CUDA graphs there: with DDP's hooks they are known to fail or slow down (pytorch#113809,
    pytorch#139207, BatchNorm's mutated buffers), and no GPU run of ours has shown otherwise."""
    distributed = dist.is_initialized()
    cuda_graphs = device.type == "cuda" and COMPILE_BACKEND == "inductor" and not distributed
    try:
        compiled = torch.compile(task.__call__, fullgraph=not distributed, backend=COMPILE_BACKEND,
                                 mode="reduce-overhead" if cuda_graphs else None)
    except torch._dynamo.exc.InvalidBackend as exc:
        known = ", ".join(name for name in torch._dynamo.list_backends(exclude_tags=())  # debug ones too (aot_eager)
                          if "TESTING" not in name)
        raise DaqkdError(f"DAQKD_COMPILE_BACKEND={COMPILE_BACKEND!r} is not a torch.compile backend: use one of "
                         f"{known}") from exc

    def step(x: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        try:
            return compiled(x, targets)
        except torch._dynamo.exc.Unsupported as exc:
            reason = str(exc).strip().splitlines()[0]
            raise DaqkdError(f"--compile: the training step does not compile as one graph ({reason}); run without "
                             "--compile") from exc

    return step


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA when ``enabled``, nothing on CPU (bf16 is slow on CPUs without
    AMX/AVX512-BF16). The quantizers compute in float32 inside it (quant.base.Quantizer)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@dataclass
class Trainer:
    """Trains ``model`` (a NormalizedModel) on ``train_data`` with ``loss``; writes into ``run_dir``.

    ``metadata`` goes into every saved checkpoint (arch, classes, normalization, quantization).
    """

    model: nn.Module
    loss: DistillLoss
    train_data: ImageSet
    test_data: ImageSet
    config: TrainConfig
    run_dir: Path
    device: torch.device
    metadata: dict[str, Any]
    teacher: nn.Module | None = None
    progress: bool = True
    on_step: Callable[[int], None] | None = None  # called after every optimizer step (tests)
    val_data: ImageSet | None = None  # held out of the train split: evaluated with the test split, picks best
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_top1: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    # the running epoch's sums of loss terms (x images), images seen and seconds, saved with the state
    # so that an epoch resumed mid-way logs the same train figures as an uninterrupted one
    epoch_sums: dict[str, float] = field(default_factory=dict)
    epoch_seen: int = 0
    epoch_seconds: float = 0.0
    # read the step's loss terms on the host every N steps (0: every step on CPU, where reading
    # costs nothing, every 50 on CUDA, where each read waits for the GPU to drain its queue and
    # leaves it idle while the next step is prepared); a non-finite loss is still reported with the
    # step it appeared at, and nothing is saved before the steps up to it are read
    sync_every: int = 0

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model.to(self.device).to(memory_format=torch.channels_last).train()
        if self.teacher is not None:
            self.teacher.to(self.device).to(memory_format=torch.channels_last).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if self.config.batch_size % self.world:
            raise DaqkdError(f"--batch-size {self.config.batch_size} does not split evenly into {self.world} "
                             f"processes: use a multiple of {self.world} (each process takes the same share of "
                             "every batch)")
        if self.world > 1:  # BatchNorm normalizes with the global batch's statistics, as in one process
            synchronize_batchnorm(self.model)
        self.steps_per_epoch = max(1, len(self.train_data) // self.config.batch_size)
        self.candidate = Candidate(self.config.aug, self.train_data.num_classes)
        self._calibrate()
        self.optimizers = build_optimizers(self.model, self.config, self.steps_per_epoch)
        self.forward_model = self.model
        if dist.is_initialized():  # also a group of one (torchrun --nproc_per_node 1): the same DDP code path
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.task = DistillTask(self.loss, self.model, self.teacher, self.forward_model)
        self.forward_step: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] = self.task
        if self.config.compile:
            self.forward_step = compile_step(self.task, self.device)
        if not self.sync_every:
            self.sync_every = 1 if self.device.type == "cpu" else 50
        self._unread: list[tuple[int, int, int, torch.Tensor]] = []  # (step in epoch, global step, images, terms)
        self._term_names: list[str] = []
        self._bar: Any = None  # the epoch's progress bar, if shown
        self.writer = None
        self._epoch_start: float | None = None

    def _calibrate(self) -> None:
        """Quantizers initialize from the first batch they see: give them a fixed one before the
        optimizers are built, in train mode (BatchNorm normalizes with the batch's statistics, as in
        every training step after it; the EWGS authors' init_quant_model does the same), with the
        BatchNorm running statistics restored afterwards. In eval mode a student that does not start
        from the teacher's weights would calibrate on fresh running statistics (mean 0, var 1),
        whose activations training never sees."""
        from .quant import Quantizer

        if not any(isinstance(m, Quantizer) and not bool(m.initialized) for m in self.model.modules()):
            return
        idx = torch.arange(min(len(self.train_data), self.config.batch_size))
        images, _ = self._batch(idx, torch.Generator().manual_seed(mix_seed(self.config.seed, 2**32)))
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
        self.model.train()
        with torch.no_grad():
            self.model(images)
        for module, state in zip(norms, saved):
            module.load_state_dict(state)

    def _batch(self, idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.train_data.take(idx)
        if isinstance(images, torch.Tensor):
            images = images.to(self.device, non_blocking=True)
        labels = self.train_data.labels[idx].to(self.device)
        x, targets = self.candidate(images, labels, generator)
        # a list of mixed sizes is cropped on the CPU: its batch (and CutMix's targets) move here
        x, targets = x.to(self.device, non_blocking=True), targets.to(self.device)
        return x.contiguous(memory_format=torch.channels_last), targets

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizers": [o.state_dict() for o, _ in self.optimizers],
            "schedulers": [s.state_dict() for _, s in self.optimizers],
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "best_top1": self.best_top1, "history": self.history, "format": FORMAT_VERSION,
            "epoch_sums": self.epoch_sums, "epoch_seen": self.epoch_seen,
            "epoch_seconds": self.epoch_seconds + (time.perf_counter() - self._epoch_start
                                                   if self._epoch_start is not None else 0.0),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["optimizers"]) != len(self.optimizers) or len(state["schedulers"]) != len(self.optimizers):
            raise ValueError(f"it holds {len(state['optimizers'])} optimizer(s), this run builds "
                             f"{len(self.optimizers)}")
        self.model.load_state_dict(state["model"])
        for (optimizer, scheduler), o_state, s_state in zip(self.optimizers, state["optimizers"], state["schedulers"]):
            optimizer.load_state_dict(o_state)
            scheduler.load_state_dict(s_state)
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best_top1 = state["global_step"], state["best_top1"]
        self.history = list(state["history"])
        self.epoch_sums = dict(state.get("epoch_sums", {}))
        self.epoch_seen = int(state.get("epoch_seen", 0))
        self.epoch_seconds = float(state.get("epoch_seconds", 0.0))
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def save_state(self) -> None:
        self._read_terms()  # the state holds only steps whose loss was read and found finite
        if not is_main_process():
            return
        with atomic_path(self.run_dir / STATE_FILE) as tmp:
            try:
                torch.save(self.state_dict(), tmp)
            except RuntimeError as exc:  # torch reports a full disk as an "enforce fail" RuntimeError
                raise write_failed(self.run_dir / STATE_FILE, exc) from exc

    def resume(self) -> bool:
        """Continue from RUN/state.pt if present; True if resumed."""
        path = self.run_dir / STATE_FILE
        if is_main_process():
            remove_partial_files(self.run_dir)
        if not path.is_file():
            if is_main_process():
                write_history(self.run_dir, [])  # killed before its first state: the run starts over
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DaqkdError(f"cannot read {path} ({type(exc).__name__}): the run's state is damaged; "
                             + RESUME_STATE_REMEDY) from exc
        check_format(path, state.get("format", 1) if isinstance(state, dict) else 1, self.metadata.get("quant"),
                     RESUME_STATE_REMEDY)
        try:
            self.load_state_dict(state)
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:  # another layout: other keys, groups, sizes
            raise DaqkdError(f"{path} does not fit this run ({type(exc).__name__}: {str(exc).splitlines()[0]}): "
                             "it was written by another daqkd version or run; resume with that version, or "
                             "start a new run directory") from exc
        if is_main_process():
            # the log holds exactly the epochs the state has finished: a kill between a log line
            # and the state save would otherwise leave that epoch twice
            write_history(self.run_dir, self.history)
        return True

    # -- loop ----------------------------------------------------------------------------------
    @property
    def last_epoch(self) -> int:
        """The epoch this process trains to: ``config.epochs``, or ``stop_at_epoch`` before it."""
        stop = self.config.stop_at_epoch
        return self.config.epochs if stop is None else min(stop, self.config.epochs)

    @property
    def selection_split(self) -> str:
        """The split whose top-1 picks RUN/best: the validation split if the run holds one out."""
        return "val" if self.val_data is not None else "test"

    def fit(self) -> dict[str, Any]:
        """Train until ``config.epochs`` (or ``stop_at_epoch``); returns the last epoch's metrics."""
        if is_main_process() and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        last: dict[str, Any] = self.history[-1] if self.history else {}
        while self.epoch < self.last_epoch:
            last = self._train_epoch()
        if self.writer is not None:
            self.writer.close()
        return last

    def _train_epoch(self) -> dict[str, Any]:
        config, epoch = self.config, self.epoch
        order = torch.randperm(
            len(self.train_data), generator=torch.Generator().manual_seed(mix_seed(config.seed, epoch))
        )
        bar = None
        if self.progress and is_main_process():
            from tqdm import tqdm

            bar = tqdm(
                total=self.steps_per_epoch,
                initial=self.step_in_epoch,
                desc=f"epoch {epoch + 1}/{config.epochs}",
                unit="batch",
                leave=False,
                dynamic_ncols=True,
            )
        if self.step_in_epoch == 0:
            self.epoch_sums, self.epoch_seen, self.epoch_seconds = {}, 0, 0.0
        start = self._epoch_start = time.perf_counter()
        self._bar = bar
        self._epoch_hooks(order)
        batches = self._augmented_batches(order)
        try:
            for b in range(self.step_in_epoch, self.steps_per_epoch):
                x, targets = next(batches)
                if self.world > 1:  # each process takes its share of the global batch
                    x, targets = x[self.rank::self.world], targets[self.rank::self.world]
                terms = self._step(x, targets)  # means over the global batch, on the device
                self.step_in_epoch = b + 1
                self.global_step += 1
                self._unread.append((b, self.global_step, len(x) * self.world, terms))
                if len(self._unread) >= self.sync_every:
                    self._read_terms()
                if bar is not None:
                    bar.update(1)
                if config.save_every and self.global_step % config.save_every == 0:
                    self.save_state()
                if self.on_step is not None:
                    self.on_step(self.global_step)
            self._read_terms()
        finally:
            self._unread.clear()
            self._bar = None
            batches.close()  # stops augmentation workers at once on an error or Ctrl-C
        sums, seen = self.epoch_sums, self.epoch_seen
        if bar is not None:
            bar.close()
        seconds = self.epoch_seconds + time.perf_counter() - start
        self._epoch_start = None
        # the test pass costs as much as 2 epochs of a data-limited run: --eval-every skips it
        evaluated = (epoch + 1) % max(1, config.eval_every) == 0 or epoch + 1 in (config.epochs, self.last_epoch)
        metrics = evaluate(self.model, self.test_data, self.device, config.eval_batch_size) if evaluated else {}
        held_out = (evaluate(self.model, self.val_data, self.device, config.eval_batch_size)
                    if evaluated and self.val_data is not None else None)
        record = {
            "epoch": epoch + 1, "step": self.global_step,
            **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
            **({"test_top1": metrics["top1"], "test_top5": metrics["top5"], "test_loss": metrics["loss"]}
               if evaluated else {}),
            **({"val_top1": held_out["top1"], "val_top5": held_out["top5"], "val_loss": held_out["loss"]}
               if held_out is not None else {}),
            "lr": self.optimizers[0][0].param_groups[0]["lr"], "seconds": seconds,
            "images_per_s": seen / max(seconds, 1e-9),
        }
        self.epoch, self.step_in_epoch = epoch + 1, 0
        self.history.append(record)
        if is_main_process():
            append_history(self.run_dir, record)
            if self.writer is not None and evaluated:
                for k in ("test_top1", "test_top5", "test_loss", "val_top1", "val_top5", "val_loss"):
                    if k in record:
                        self.writer.add_scalar(k.replace("_", "/", 1), record[k], epoch + 1)
            meta = {**self.metadata, "epoch": epoch + 1, "test_top1": metrics.get("top1"),
                    "test_top5": metrics.get("top5"),
                    **({"val_top1": held_out["top1"]} if held_out is not None else {})}
            save_checkpoint(self.run_dir / LAST_FILE, self.model.model, meta)
            # with a validation split the best epoch is chosen on it: no choice reads the test split
            chosen_by = held_out if held_out is not None else metrics
            if evaluated and chosen_by["top1"] > self.best_top1:
                self.best_top1 = chosen_by["top1"]
                save_checkpoint(self.run_dir / BEST_FILE, self.model.model, meta)
            tested = (f"test top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%" if evaluated
                      else f"(test every {config.eval_every} epochs)")
            if held_out is not None:
                tested += f"  val top-1 {held_out['top1']:.2f}%"
            print(f"epoch {epoch + 1}/{config.epochs}: loss {record.get('train_loss', float('nan')):.4f}  {tested}  "
                  f"({record['images_per_s']:.0f} img/s)", flush=True)
        self.save_state()
        return record

    def _augmented_batches(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from ``step_in_epoch`` on, on the device: augmented here, one at a
        time, or ``augment_workers`` batches ahead in worker processes (:class:`AugmentedBatches`)."""
        config = self.config
        if config.augment_workers < 1:
            for b in range(self.step_in_epoch, self.steps_per_epoch):
                idx = order[b * config.batch_size:(b + 1) * config.batch_size]
                yield self._batch(idx, torch.Generator().manual_seed(mix_seed(config.seed, self.epoch, b)))
            return
        import multiprocessing

        batches = AugmentedBatches(self.train_data, self.candidate, order, config.batch_size, config.seed,
                                   self.epoch, self.step_in_epoch, self.steps_per_epoch)
        # fork shares the cached images with the workers instead of pickling them to each; the
        # workers compute on CPU tensors only, so a CUDA context in this process is not touched
        context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False,
                                             num_workers=config.augment_workers, prefetch_factor=2,
                                             pin_memory=self.device.type == "cuda", multiprocessing_context=context,
                                             generator=torch.Generator().manual_seed(0))  # not the global RNG
        for x, targets in loader:
            yield (x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last),
                   targets.to(self.device, non_blocking=True))

    def _step(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns the loss terms (named in ``_term_names``) as one float32 tensor
        on the device, not yet read (see ``sync_every``)."""
        with autocast(self.device, self.config.amp):
            terms = self.forward_step(x, targets)
        self._term_names = list(terms)
        # every process sees the global batch's terms (equal shares: the mean of the shards' means),
        # so all of them stop together on a non-finite loss instead of one waiting in the next all-reduce
        values = all_reduce_mean(torch.stack([v.detach().float() for v in terms.values()]))
        for optimizer, _ in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        for optimizer, scheduler in self.optimizers:
            optimizer.step()
            scheduler.step()
        return values

    def _read_terms(self) -> None:
        """Read the unread steps' loss terms (one device sync), stop at the first non-finite loss, and
        add them to the epoch's sums in step order (the same sums whatever ``sync_every`` is)."""
        if not self._unread:
            return
        rows = torch.stack([terms for *_, terms in self._unread]).tolist()
        unread, self._unread = self._unread, []
        for (b, global_step, images, _), row in zip(unread, rows, strict=True):
            terms = dict(zip(self._term_names, row, strict=True))
            if not math.isfinite(terms["loss"]):
                raise DaqkdError(
                    f"the loss became {terms['loss']} at epoch {self.epoch + 1}, step {b + 1}; "
                    + (f"the last good state is {self.run_dir / STATE_FILE}" if (self.run_dir / STATE_FILE).is_file()
                       else "no checkpoint was written yet")
                    + ": check the data and the teacher, or start a new run (another --out) with lower learning "
                    "rates (--lr, --quant-lr)")
            for k, v in terms.items():
                self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v * images
            self.epoch_seen += images
            if self.writer is not None and global_step % 50 == 0:
                for k, v in terms.items():
                    self.writer.add_scalar(f"train/{k}", v, global_step)
        if self._bar is not None and self._epoch_start is not None:
            rate = self.epoch_seen / max(time.perf_counter() - self._epoch_start, 1e-9)
            self._bar.set_postfix(loss=f"{terms['loss']:.3f}", img_s=f"{rate:.0f}")

    def _epoch_hooks(self, order: torch.Tensor) -> None:
        """Each quantizer class's ``on_epoch_start`` (EWGS's Hessian delta), at an epoch's start; the
        batches it may ask for are the epoch's first ones (global batches, the same on every process,
        augmented with their own seeds)."""
        from .quant import Quantizer

        if self.step_in_epoch:
            return
        classes = {type(m): None for m in self.model.modules() if isinstance(m, Quantizer)}

        def sample_batches(count: int, max_images: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            batches = []
            for b in range(min(count, self.steps_per_epoch)):
                idx = order[b * self.config.batch_size:(b + 1) * self.config.batch_size][:max_images]
                generator = torch.Generator().manual_seed(mix_seed(self.config.seed, self.epoch, b))
                batches.append(self._batch(idx, generator))
            return batches

        for cls in classes:
            cls.on_epoch_start(self.model, self.epoch, sample_batches)
