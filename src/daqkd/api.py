"""The Python API: typed options and the functions every ``daqkd`` command calls.

Each command has an options dataclass whose fields are its command-line options (the same names,
underscores for dashes, the same defaults), so a notebook and the CLI run the same code::

    import daqkd
    ranking = daqkd.rank_augmentations(daqkd.RankOptions(
        data="../shared/data/cifar10", weights="resnet20.th", arch="resnet20", normalize="imagenet",
        augs="none,randaugment", limit_per_class=50))
    teacher = daqkd.train_teacher(daqkd.TeacherOptions(data=..., arch="resnet20", epochs=10, out="runs/t"))
    student = daqkd.train_student(daqkd.StudentOptions(data=..., teacher="runs/t", w_bits=2, a_bits=2,
                                                       out="runs/w2a2"))
    report = daqkd.evaluate(daqkd.EvalOptions(run="runs/w2a2", data=...))

Teacher and student training share one run path (:func:`train_run`): run directory, config.json,
resume, data, the Trainer. :func:`run_sweep` (:mod:`daqkd.sweep_runner`) trains students from
:class:`SweepOptions`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple, Self, TypeVar

import torch

from .augment import check_candidate, parse_candidates
from .augment.custom import PerImageDA
from .checkpoint import RESUME_STATE_REMEDY, damaged_metadata, read_checkpoint, resolve_checkpoint
from .data import ImageSet, image_set_from_dataset, load_data, split_validation
from .distill import DistillConfig, DistillTask, create_loss
from .errors import DaqkdError
from .loading import flag_as_field, load_model, load_state_dict_strict, model_size_bytes
from .models import Normalization, NormalizedModel, create_model, parse_normalization
from .quant import QuantConfig, check_bits, quantize_model
from .quant.base import EWGS_HESSIAN_FIELDS
from .rank import (
    RankConfig,
    compile_pays,
    effective_group_size,
    rank_and_save,
    rank_candidates,
    variance_passes,
)
from .rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    RANK_FILE,
    STATE_FILE,
    check_output,
    same_option,
    store_python_scalars,
    stored_ranking,
    write_json_atomic,
)
from .runtime import init_distributed, is_main_process, select_device
from .train import TrainConfig, Trainer
from .train import evaluate as evaluate_model

Options = TypeVar("Options", bound="DataOptions")


class RunData(NamedTuple):
    """The images a training run reads: ``val`` is None without ``--val-per-class``."""

    train: ImageSet
    test: ImageSet
    val: ImageSet | None = None


class CommandOptions:
    """Options of one command, built from its argparse Namespace by the CLI or by hand in a notebook."""

    def __post_init__(self) -> None:
        store_python_scalars(self)  # type: ignore[arg-type]  (subclasses are dataclasses)
        check_option_types(self)

    @classmethod
    def from_namespace(cls, namespace: Any) -> Self:
        """The options of an argparse Namespace (or any object with these attributes); its
        ``explicit_options`` (the names the command line gave, if the CLI recorded them) are kept
        for :meth:`explicit`."""
        options = cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)})
        given = getattr(namespace, "explicit_options", None)
        if given is not None:
            options._explicit = frozenset(given)
        return options

    def explicit(self) -> frozenset[str]:
        """The options set on purpose: those the command line gave when it was recorded, else (built
        by hand) those that differ from the defaults. A value equal to the default is a choice too
        on a command line (``--resume --lr 0.1`` on a run stored with another LR)."""
        given = getattr(self, "_explicit", None)
        if given is not None:
            return given
        defaults = type(self)()
        return frozenset(f.name for f in fields(self) if getattr(self, f.name) != getattr(defaults, f.name))


def check_option_types(options: Any) -> None:
    """Every field of an options dataclass holds its annotated type, checked once when the options
    are made (the CLI's argparse types them already; a notebook may not): a path-like is taken as
    the ``str`` it names, an int as the ``float`` it equals; anything else (``epochs="1"``,
    ``epochs=1.5``, ``aug=["none"]``, a bool for a number) is one error naming the field, before
    any directory is made. A float field stores a float: 1 and 1.0 compare equal in a rerun's guard."""
    import typing

    hints = typing.get_type_hints(type(options))
    for item in fields(options):
        value = getattr(options, item.name)
        allowed = typing.get_args(hints[item.name]) or (hints[item.name],)
        if value is None and type(None) in allowed:
            continue
        if str in allowed and isinstance(value, os.PathLike):
            setattr(options, item.name, os.fspath(value))
            continue
        if bool in allowed:
            ok, expected = isinstance(value, bool), "True or False"
        elif int in allowed:
            ok, expected = isinstance(value, int) and not isinstance(value, bool), "a whole number"
        elif float in allowed:
            ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            if ok:
                setattr(options, item.name, float(value))
        else:
            ok, expected = isinstance(value, str), "a string" + (" or a path" if "data" in item.name or
                                                                  item.name in PATH_OPTIONS else "")
        if not ok:
            optional = " (or None)" if type(None) in allowed else ""
            raise DaqkdError(f"{type(options).__name__}.{item.name} must be {expected}{optional}, got {value!r} "
                             f"({type(value).__name__})")


@dataclass
class DataOptions(CommandOptions):
    """Where the images come from, and how a run is seeded and placed.

    data: an ImageFolder root (``train/``, ``test/``) or a ``.npz`` array archive; dataset: a
    torchvision data set name instead (needs a network); limit_per_class: the first K images of each
    class of every split read; device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """

    data: str | None = None
    dataset: str | None = None
    data_root: str = "~/.cache/daqkd"
    limit_per_class: int | None = None
    seed: int = 0
    device: str = "auto"

    def load(self, split: str, limit_per_class: int | None = None) -> ImageSet:
        limit = limit_per_class if limit_per_class is not None else self.limit_per_class
        return load_data(self.data, self.dataset, split, limit, self.data_root)


@dataclass
class TrainOptions(DataOptions):
    """A training run (teacher or student): optimization, schedule and run directory ``out``.

    Schedules are cosine to 0 after ``warmup_epochs``; ``eval_every`` tests every N epochs and
    after the last; ``train_limit_per_class`` limits the train split only (data-limited runs);
    ``augment_workers`` CPU processes augment batches ahead of the step (the same pixels);
    ``compile`` runs the step's forward and backward as compiled graphs (no graph breaks);
    ``val_per_class`` holds K images of each class out of the train split (drawn by ``val_seed``,
    default ``seed``) and reports their top-1 as ``val_top1`` beside the test figures;
    ``stop_at_epoch`` stops after that epoch of the ``epochs``-long schedule (``resume`` goes on).
    """

    out: str | None = None
    epochs: int = 1
    batch_size: int = 256
    aug: str | None = None
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    no_amp: bool = False
    save_every: int = 0
    eval_every: int = 1
    augment_workers: int = 0
    compile: bool = False
    train_limit_per_class: int | None = None
    val_per_class: int | None = None
    val_seed: int | None = None
    stop_at_epoch: int | None = None
    resume: bool = False
    no_progress: bool = False

    def train_config(self, aug: str, quant_lr: float = 1e-5) -> TrainConfig:
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise DaqkdError(f"--{name.replace('_', '-')} must be at least 1")
        if self.val_per_class is not None and self.val_per_class < 1:
            raise DaqkdError(f"--val-per-class must be at least 1, got {self.val_per_class}")
        for name in ("lr", "weight_decay", "momentum", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise DaqkdError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.stop_at_epoch is not None and not 1 <= self.stop_at_epoch <= self.epochs:
            raise DaqkdError(f"--stop-at-epoch must be an epoch of the schedule, 1 to --epochs {self.epochs}, "
                             f"got {self.stop_at_epoch}")
        if self.augment_workers < 0:
            raise DaqkdError(f"--augment-workers must be 0 (augment in the training process) or more, got "
                             f"{self.augment_workers}")
        return TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, aug=aug, optimizer=self.optimizer, lr=self.lr,
            momentum=self.momentum, weight_decay=self.weight_decay, quant_lr=quant_lr,
            warmup_epochs=self.warmup_epochs, seed=self.seed, save_every=self.save_every,
            eval_every=self.eval_every, amp=not self.no_amp, augment_workers=self.augment_workers,
            compile=self.compile, stop_at_epoch=self.stop_at_epoch,
        )

    def load_splits(self) -> RunData:
        """The run's images: train (less the validation images, then ``train_limit_per_class``),
        test, and the validation split when ``val_per_class`` is set."""
        if self.val_per_class is None:
            return RunData(self.load("train", self.train_limit_per_class), self.load("test"))
        train, val = split_validation(self.load("train"), self.val_per_class, self.validation_seed,
                                      self.train_limit_per_class)
        return RunData(train, self.load("test"), val)

    @property
    def validation_seed(self) -> int:
        return self.seed if self.val_seed is None else self.val_seed


@dataclass
class TeacherOptions(TrainOptions):
    """`daqkd teacher`: a full-precision model ``arch`` trained from scratch or fine-tuned from
    ``init`` (a daqkd checkpoint or published weights; then ``normalize`` names their statistics)."""

    arch: str | None = None
    init: str | None = None
    normalize: str | None = None
    label_smoothing: float = 0.0
    aug: str | None = "none+cutmix"


@dataclass
class StudentOptions(TrainOptions):
    """`daqkd train`: QAT + KD of a low-bit student from ``teacher``.

    The student (``arch``, default the teacher's, starting from its weights; else ``init``) is
    quantized by ``method`` at ``w_bits``/``a_bits`` (``first_last``: fp, same or a bit width;
    ``ewgs_delta``: a number or "hessian", re-estimated every ``ewgs_delta_every`` epochs from
    ``ewgs_hessian_batches`` batches with ``ewgs_hessian_probes`` probes each; ``residual_bits``
    below 32 also quantizes the residual stream, see QuantConfig) and distilled with
    loss ``kd`` (CE weight ``gamma``, KD weight ``alpha``, ``temperature``; feature losses: weight
    ``beta``, comma-separated module names ``kd_layers``). ``aug`` "auto" ranks ``augs`` with the
    teacher and trains with the top one; "race" races ``augs`` and ``none`` on the validation split
    (``val_per_class``; rungs ``rungs``, ``keep`` going on, :mod:`daqkd.race`) in RUN/race and
    keeps the winner's run as RUN. Published teacher weights need ``normalize`` and
    ``teacher_arch`` (default ``arch``).
    """

    teacher: str | None = None
    arch: str | None = None
    teacher_arch: str | None = None
    normalize: str | None = None
    init: str | None = None
    method: str = "ewgs"
    w_bits: int = 2
    a_bits: int = 2
    per_channel: bool = False
    first_last: str = "fp"
    ewgs_delta: str = "hessian"
    ewgs_delta_every: int = 10
    ewgs_hessian_batches: int = 3
    ewgs_hessian_probes: int = 4
    residual_bits: int = 32
    kd: str = "kd"
    gamma: float = 1.0
    alpha: float = 2.0
    temperature: float = 4.0
    beta: float | None = None
    kd_layers: str | None = None
    augs: str = "all"
    quant_lr: float = 1e-5
    rungs: str = "1/9,1/3,1"
    keep: str = "1/3"
    aug: str | None = "auto"
    optimizer: str = "adam"
    lr: float = 1e-3

    def train_config(self, aug: str, quant_lr: float = 1e-5) -> TrainConfig:
        """:meth:`TrainOptions.train_config`, with the student's own numbers checked first: a NaN loss
        at step 1 (``temperature`` 0) or an optimizer's ValueError (a negative ``quant_lr``) would
        otherwise come after the teacher and the data are loaded."""
        for name in ("quant_lr", "gamma", "alpha"):
            if getattr(self, name) < 0:
                raise DaqkdError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.beta is not None and self.beta < 0:
            raise DaqkdError(f"--beta must be 0 or more, got {self.beta}")
        if not self.temperature > 0:
            raise DaqkdError(f"--temperature must be above 0 (KD divides the logits by it), got {self.temperature}")
        return super().train_config(aug, quant_lr)

    def quant_config(self) -> QuantConfig:
        if self.ewgs_delta == "hessian":
            delta = None
        else:
            try:
                delta = float(self.ewgs_delta)
            except ValueError as exc:
                raise DaqkdError(f"--ewgs-delta must be a number or 'hessian', got {self.ewgs_delta!r}") from exc
        first_last: str | int = self.first_last
        if first_last not in ("fp", "same"):
            first_last = check_bits("--first-last", int(first_last) if str(first_last).isdigit() else first_last)
        quant = QuantConfig(method=self.method, w_bits=self.w_bits, a_bits=self.a_bits, per_channel=self.per_channel,
                            first_last=first_last, ewgs_delta=delta, ewgs_delta_every=self.ewgs_delta_every,
                            ewgs_hessian_batches=self.ewgs_hessian_batches,
                            ewgs_hessian_probes=self.ewgs_hessian_probes, residual_bits=self.residual_bits)
        quant.validate()
        return quant


@dataclass
class SweepOptions(StudentOptions):
    """`daqkd sweep`: rank ``augs`` once, train a student per candidate and seed (``seeds`` of them
    from ``seed``) plus the ``default`` DA, and report whether the ranking predicted them.
    ``jobs`` students train at once in their own processes (default: one per device of ``devices``,
    else 1), placed round-robin on ``devices`` (``"0,1"`` or ``"cuda:0,cuda:1"``; default: ``device``);
    ``shard`` ``"K/N"`` trains only every N-th student from the K-th (one sweep per node sharing
    ``out``); ``report_only`` rebuilds the outputs; ``race`` races the candidates on the
    validation split instead of training all of them (``rungs``, ``keep``; :mod:`daqkd.race`)."""

    aug: str | None = None
    race: bool = False
    seeds: int = 1
    default: str | None = None
    controls: str = "basic"
    report_only: bool = False
    jobs: int | None = None
    devices: str | None = None
    shard: str | None = None

    def student(self, **changes: Any) -> StudentOptions:
        """The options of one of the sweep's students (its own fields as given, ``changes`` on top)."""
        return StudentOptions(**{**{f.name: getattr(self, f.name) for f in fields(StudentOptions)}, **changes})


@dataclass
class RankOptions(DataOptions):
    """`daqkd rank`: rank ``augs`` for the teacher ``weights`` on one ``split`` (see
    :class:`daqkd.rank.RankConfig` for the ranking options)."""

    weights: str | None = None
    arch: str | None = None
    normalize: str | None = None
    crop_size: int = 224
    split: str = "train"
    augs: str = "all"
    score: str = "paper"
    controls: str = "basic"
    cmi_weight: float = 1.0
    repeats: int = 1
    variance_group: int = 1000
    variance_paired: bool = False
    variance_protocol: str = "single"
    mix_group: int = 8
    batch_size: int = 256
    compile: str = "auto"
    out: str | None = None
    no_progress: bool = False


@dataclass
class EvalOptions(DataOptions):
    """`daqkd eval`: top-1, top-5, per-class top-1, loss and size of ``run`` (a run directory, a daqkd
    checkpoint, or published weights with ``arch`` and ``normalize``) on ``split``."""

    run: str | None = None
    arch: str | None = None
    normalize: str | None = None
    split: str = "test"
    out: str | None = None
    onnx_optimization: str = "all"


@dataclass
class ExportOptions(CommandOptions):
    """`daqkd export`: ``run`` (a run directory or daqkd checkpoint) as the ONNX file ``out``; with
    ``fp`` the full-precision teacher the run was distilled from instead; ``image_size``: the side of
    the square uint8 images the file takes (the batch size stays free); ``integer``: the integer-kernel
    graph of :mod:`daqkd.integer_export` (CIFAR ResNets) instead of the QDQ mirror of the model."""

    run: str | None = None
    out: str | None = None
    fp: bool = False
    image_size: int = 32
    integer: bool = False


def data_statistics(data: ImageSet) -> Normalization:
    """Per-channel mean and std over every pixel of the images (scaled to [0, 1]); images of
    different sizes weigh by their pixel counts. Accumulated in float64 one chunk at a time."""
    images = data.images if isinstance(data.images, list) else list(data.images.split(1024))
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for chunk in images:
        x = chunk.double().div(255.0).reshape(-1, 3, chunk.shape[-2] * chunk.shape[-1])
        total += x.sum(dim=(0, 2))
        squares += x.square().sum(dim=(0, 2))
        count += x.shape[0] * x.shape[2]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    return Normalization(tuple(mean.tolist()), tuple(std.tolist()))  # type: ignore[arg-type]


# Options a resumed run takes from the command that resumes it; every other option comes from
# RUN/config.json, and giving it another value with --resume is an error naming it.
RESUME_KEEPS = ("resume", "out", "no_progress", "device", "save_every", "eval_every", "augment_workers",
                "stop_at_epoch")
# Stored paths relative to the directory the run started in (config.json's cwd).
PATH_OPTIONS = ("data", "data_root", "teacher", "init", "weights")


def prepare_run(options: Options, command: str) -> tuple[Options, Path]:
    """The options a run uses and its directory, checked, nothing written: with ``resume``, the
    options stored in RUN/config.json, except RESUME_KEEPS, which the resuming command may change."""
    if options.out is None:
        raise DaqkdError("pass --out RUN (the run directory)")
    check_output(options.out, "directory")
    run = Path(options.out)
    config_file = run / CONFIG_FILE
    if options.resume:
        if not config_file.is_file():
            raise DaqkdError(f"--resume: {run} has no config.json: pass the directory of an earlier run")
        try:
            saved = json.loads(config_file.read_text())
            stored, stored_command = saved["args"], saved.get("command", command)
        except (ValueError, KeyError, TypeError) as exc:
            raise DaqkdError(f"--resume: {config_file} is damaged ({exc}): the run cannot be resumed") from exc
        if stored_command != command:
            raise DaqkdError(f"{run} is a `daqkd {stored_command}` run: resume it with daqkd {stored_command} "
                             f"--resume --out {run}")
        if command == "train" and legacy_hessian_sample(stored):
            raise DaqkdError(f"{run} trains EWGS with the Hessian delta from {LEGACY_HESSIAN_SAMPLE}, which this "
                             "daqkd no longer runs: finish it with the daqkd it started with, or start a new run")
        names = {f.name for f in fields(options)}
        start = saved.get("cwd") if isinstance(saved.get("cwd"), str) else os.getcwd()
        changed = [name for name in sorted(options.explicit() & names - set(RESUME_KEEPS)) if name in stored
                   and not same_option(getattr(options, name), stored[name], start, name in PATH_OPTIONS)]
        if changed:
            listed = ", ".join(f"--{n.replace('_', '-')} {getattr(options, n)!r} (stored {stored[n]!r})"
                               for n in changed)
            raise DaqkdError(f"--resume continues {run} with its stored options; {listed} would change the run: drop "
                             f"{'it' if len(changed) == 1 else 'them'}, or start a new run in another --out")
        if Path(start) != Path.cwd():  # resumed from elsewhere: paths stay the run's
            stored = {k: str(Path(start) / v) if k in PATH_OPTIONS and isinstance(v, str) and
                      not Path(v).expanduser().is_absolute() else v for k, v in stored.items()}
        options = replace(options, **{k: v for k, v in stored.items() if k in names and k not in RESUME_KEEPS})
        if isinstance(options, StudentOptions):
            try:
                options.quant_config()
            except DaqkdError as exc:  # its line names a CLI flag, which the resuming command did not pass
                raise damaged_metadata(config_file, flag_as_field(str(exc)), RESUME_STATE_REMEDY) from exc
    elif (run / STATE_FILE).exists():
        raise DaqkdError(f"{run} already holds a run: pass --resume to continue it, or another --out")
    return options, run


# EWGS's Hessian sample, stored in config.json since 2026-12-06; a Hessian EWGS run stored without
# them took 2 batches of at most 64 images and 1 probe, which this daqkd no longer runs.
HESSIAN_OPTIONS = EWGS_HESSIAN_FIELDS
LEGACY_HESSIAN_SAMPLE = "2 batches of <= 64 images x 1 probe (before 2026-12-06)"


def uses_hessian_delta(stored: dict[str, Any]) -> bool:
    """Whether stored options train EWGS with the Hessian delta (the only runs the sample changes)."""
    return stored.get("method") == "ewgs" and stored.get("ewgs_delta") == "hessian"


def legacy_hessian_sample(stored: dict[str, Any]) -> bool:
    """A Hessian EWGS run whose config.json predates the configurable sample."""
    return uses_hessian_delta(stored) and "ewgs_hessian_probes" not in stored


def write_run_config(options: Options, run: Path, command: str) -> None:
    """RUN/config.json: the options (enough to rerun or resume), the command, argv and the working
    directory that relative paths in them (--data, --teacher) are relative to."""
    run.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_json_atomic(run / CONFIG_FILE, {"command": command, "args": asdict(options), "argv": sys.argv[1:],
                                              "cwd": os.getcwd()})


def train_run(options: TrainOptions, command: str, data: RunData | tuple[ImageSet, ...] | None,
              build: Any) -> Trainer:
    """The run path teacher and student share: check the options, load the data, let ``build(options,
    train, device, run)`` make (model, loss, aug, metadata, teacher, quantizer LR), build the Trainer,
    and only then write RUN/config.json (a failed command leaves no half-made run); train (resuming if asked) and
    return the Trainer."""
    init_distributed()
    options, run = prepare_run(options, command)
    config = options.train_config(options.aug or "none")  # checks epochs, batch size, eval_every
    device = select_device(options.device)
    torch.manual_seed(options.seed)
    train, test, val = RunData(*data) if data is not None else options.load_splits()
    if not options.resume:  # what a run killed before its first state left: this run starts over
        for stale in (run / METRICS_FILE, run / RANK_FILE):
            stale.unlink(missing_ok=True)
    existed = run.exists()
    try:  # build checks the models (--aug auto then writes rank.json); the Trainer, the batch split and --compile
        model, loss, aug, metadata, teacher, quant_lr = build(options, train, device, run)
        config = replace(config, aug=aug, quant_lr=quant_lr)
        trainer = Trainer(model, loss, train, test, config, run, device, metadata,
                          teacher=teacher, progress=not options.no_progress, val_data=val)
    except DaqkdError:
        if not existed and is_main_process():  # all it holds is this command's (a ranking at most)
            shutil.rmtree(run, ignore_errors=True)
        raise
    if not options.resume:
        write_run_config(options, run, command)
    if options.resume:
        trainer.resume()
    elif teacher is None:
        before = evaluate_model(model.to(device), test, device)  # every process: it is sharded
        if is_main_process():
            print(f"daqkd {command}: {metadata['arch']} on {len(train):,} images, start test top-1 "
                  f"{before['top1']:.2f}%", flush=True)
    trainer.fit()
    return trainer


def _build_teacher(options: TeacherOptions, train: ImageSet, device: torch.device, run: Path) -> tuple:
    if options.arch is None:
        raise DaqkdError("pass --arch (the teacher's architecture)")
    check_candidate(options.aug or "none")
    if options.init:
        model, info = load_model(options.init, arch=options.arch, normalize=options.normalize,
                                 num_classes=train.num_classes, classes=train.classes)
        if info["quant"]:
            raise DaqkdError(f"--init {options.init} is a quantized student: a teacher starts from "
                             "full-precision weights")
    else:
        norm = parse_normalization(options.normalize) if options.normalize else data_statistics(train)
        model = NormalizedModel(create_model(options.arch, train.num_classes), norm)
    metadata = {"arch": options.arch, "classes": train.classes, "num_classes": train.num_classes,
                "normalize": model.normalization.spec(), "quant": None, "kind": "teacher"}
    loss = create_loss("none", DistillConfig(label_smoothing=options.label_smoothing))
    return model, loss, options.aug or "none", metadata, None, 1e-5


def train_teacher(options: TeacherOptions, data: RunData | tuple[ImageSet, ...] | None = None) -> Trainer:
    """Train or fine-tune a full-precision model into ``options.out``; returns the finished Trainer
    (``best_top1``, ``history``). ``data`` = (train, test[, val]) already loaded, else from the options."""
    if options.arch is None and not options.resume:
        raise DaqkdError("pass --arch (the teacher's architecture)")
    return train_run(options, "teacher", data, _build_teacher)


def load_teacher(options: StudentOptions, num_classes: int,
                 classes: list[str] | None = None) -> tuple[NormalizedModel, dict[str, Any]]:
    """The teacher of a student: a daqkd checkpoint, or published weights whose architecture is
    ``teacher_arch`` (else ``arch``) and whose statistics are ``normalize``."""
    if options.teacher is None:
        raise DaqkdError("pass --teacher RUN (the teacher's run directory or checkpoint)")
    return load_model(options.teacher, arch=options.teacher_arch, normalize=options.normalize,
                      num_classes=num_classes, fallback_arch=options.arch, classes=classes)


def _build_student(options: StudentOptions, train: ImageSet, device: torch.device, run: Path) -> tuple:
    teacher, teacher_meta = load_teacher(options, train.num_classes, train.classes)
    arch = options.arch or teacher_meta["arch"]
    quant = options.quant_config()
    aug = options.aug or "auto"
    candidates = parse_candidates(options.augs) if aug == "auto" else [check_candidate(aug)]
    student = create_model(arch, train.num_classes)
    if arch == teacher_meta["arch"] and not options.init:
        student.load_state_dict(teacher.model.state_dict())
    elif options.init:
        state, _ = read_checkpoint(resolve_checkpoint(options.init))
        load_state_dict_strict(student, state, options.init, arch)
    quantize_model(student, quant)
    model = NormalizedModel(student, teacher.normalization)
    layers = tuple(name.strip() for name in options.kd_layers.split(",") if name.strip()) if options.kd_layers else ()
    loss = create_loss(options.kd, DistillConfig(gamma=options.gamma, alpha=options.alpha,
                                                 temperature=options.temperature, beta=options.beta, layers=layers))
    DistillTask(loss, model, teacher).close()  # the layers a feature loss needs exist in both models
    if aug == "auto":  # last: a ranking takes minutes, and every check above takes none
        rank_file = run / RANK_FILE
        ranking = stored_ranking(rank_file, candidates)  # a resumed run keeps the pick it trains with
        if ranking is None:
            ranking = rank_and_save(teacher, train, candidates, options.seed, device, rank_file, is_main_process())
        aug = ranking["selected"]
        if is_main_process():
            print(f"--aug auto: the metric selected {aug} (ranking in {rank_file})", flush=True)
    metadata = {"arch": arch, "classes": train.classes, "num_classes": train.num_classes,
                "normalize": teacher.normalization.spec(), "quant": asdict(quant), "kind": "student",
                "teacher": str(options.teacher), "aug": aug, "kd": options.kd}
    return model, loss, aug, metadata, teacher, options.quant_lr


def train_student(options: StudentOptions, data: RunData | tuple[ImageSet, ...] | None = None) -> Trainer:
    """QAT + KD of a low-bit student into ``options.out``; returns the finished Trainer."""
    if options.teacher is None and not options.resume:
        raise DaqkdError("pass --teacher RUN (the teacher's run directory or checkpoint)")
    if not options.resume:
        options.quant_config()  # bits, method, --first-last, --ewgs-delta: before anything is loaded
    if options.aug == "race" and options.out is not None and not (Path(options.out) / CONFIG_FILE).is_file():
        return _race_student(options, data)
    return train_run(options, "train", data, _build_student)


def _race_student(options: StudentOptions, data: RunData | tuple[ImageSet, ...] | None) -> Trainer:
    """`daqkd train --aug race`: race ``augs`` and the default (one seed, ``options.seed``) in
    RUN/race, copy the winner's run into RUN, and return it (resumed: nothing left to train).
    Rerunning the command continues an interrupted race."""
    from .sweep_runner import run_sweep as sweep

    if data is not None:  # the race's sweep loads options.data itself, once per student and rung
        raise DaqkdError("aug='race' reads its images from options.data (a folder or .npz), not from data=: "
                         "pass data=None and set data in the options")
    run = Path(options.out)  # type: ignore[arg-type]  (checked by the caller)
    check_output(run, "directory")
    race_dir = run / "race"
    sweep_options = SweepOptions(**{**{f.name: getattr(options, f.name) for f in fields(StudentOptions)},
                                    "aug": None, "race": True, "seeds": 1, "out": str(race_dir), "resume": False,
                                    "stop_at_epoch": None})
    report = sweep(sweep_options)
    winner = report["winner"]["aug"]
    source = race_dir / "runs" / f"{winner}-seed{options.seed}"
    if is_main_process():
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, run / item.name)
        print(f"daqkd train --aug race: {winner} won; its run is copied into {run} (the race in {race_dir})",
              flush=True)
    return train_run(replace(options, aug=winner, resume=True, stop_at_epoch=None), "train", data, _build_student)


def rank_augmentations(options: RankOptions, progress: Any = None, *, custom: Sequence[PerImageDA] = (),
                       data: ImageSet | Any = None) -> dict[str, Any]:
    """Rank ``options.augs`` for the teacher; the report (also written to ``options.out`` if set).

    ``custom``: more candidates, per-image callables wrapped in :class:`~daqkd.augment.custom.PerImageDA`
    (slower than the built-in batched DAs); ``options.augs`` may then be "" for none of the built-in
    ones. ``data``: an ImageSet or a torch Dataset of (uint8 image, label) instead of
    ``options.data``. ``progress(name, done, total)`` is called during each pass.
    """
    augs: list[Any] = (parse_candidates(options.augs) if options.augs else []) + list(custom)
    if not augs:
        raise DaqkdError("no candidate to rank: pass --augs or custom DAs")
    for name, value, low in (("--repeats", options.repeats, 1), ("--batch-size", options.batch_size, 1),
                             ("--variance-group", options.variance_group, 1), ("--mix-group", options.mix_group, 0)):
        if value < low:
            raise DaqkdError(f"{name} must be at least {low}, got {value}")
    if options.weights is None:
        raise DaqkdError("pass --weights (the teacher's checkpoint)")
    if options.out:
        check_output(options.out, "file")
    init_distributed()
    device = select_device(options.device)
    torch.manual_seed(options.seed)
    if data is None:
        data = options.load(options.split)
    elif not isinstance(data, ImageSet):
        data = image_set_from_dataset(data)
    model, info = load_model(options.weights, arch=options.arch, normalize=options.normalize,
                             num_classes=data.num_classes, classes=data.classes)
    config = RankConfig(
        augs=augs, batch_size=options.batch_size, seed=options.seed, repeats=options.repeats,
        cmi_weight=options.cmi_weight, score=options.score, variance_group=options.variance_group,
        variance_paired=options.variance_paired, authors=options.controls == "all",
        variance_protocol=options.variance_protocol, mix_group=options.mix_group,
    )
    passes = 1 + config.computes_authors + variance_passes(
        config, len(data), effective_group_size(config.variance_group, len(data)))
    forwards = len(data) * len(augs) * options.repeats * passes * (2 if config.paired else 1)
    compiled = options.compile == "on" or (options.compile == "auto" and compile_pays(forwards))
    if is_main_process():
        print(f"daqkd rank: {len(data):,} {options.split} images, {data.num_classes} classes from {data.source}; "
              f"teacher {info['arch']} on {device}{' (compiled)' if compiled else ''}; "
              f"{len(augs)} candidates x {options.repeats * passes} pass(es)", flush=True)
    report = rank_candidates(model, data, config, device, compiled, progress, options.crop_size)
    report["split"] = options.split
    report["teacher"] = {k: info[k] for k in ("arch", "weights", "normalize", "quant")}
    report["data"] = data.source
    report["device"] = str(device)
    if options.out and is_main_process():
        write_json_atomic(options.out, report)
    return report


def evaluate(options: EvalOptions) -> dict[str, Any]:
    """Evaluate a run, checkpoint or published weights on ``options.split``; the report (also
    written to ``options.out`` if set)."""
    device = select_device(options.device)
    if options.data is None and options.dataset is None:
        raise DaqkdError("pass --data DIR|FILE.npz (or --dataset) with the test images")
    if options.run is None:
        raise DaqkdError("pass the run directory or checkpoint to evaluate")
    if options.out:
        check_output(options.out, "file")
    from .export import is_onnx_file

    if is_onnx_file(options.run):
        return _evaluate_onnx(options)
    test = options.load(options.split)
    model, meta = load_model(options.run, arch=options.arch, normalize=options.normalize,
                             num_classes=test.num_classes, classes=test.classes)
    model.to(device)
    metrics = evaluate_model(model, test, device)
    quant = meta.get("quant")
    report = {"run": str(options.run), "arch": meta["arch"], "normalize": meta["normalize"], "data": test.source,
              "split": options.split, "images": len(test),
              "w_bits": quant["w_bits"] if quant else 32, "a_bits": quant["a_bits"] if quant else 32,
              "method": quant["method"] if quant else None, **metrics, "size": model_size_bytes(model.model)}
    if options.out:
        write_json_atomic(options.out, report)
    return report


ONNX_METADATA_REMEDY = "export it again with daqkd export"


def _evaluate_onnx(options: EvalOptions) -> dict[str, Any]:
    """:func:`evaluate` for an ONNX file run by onnxruntime (CPU). A file from :func:`export_model`
    carries its classes, architecture and bit widths, which are checked and reported; for any other
    file the report's ``unchecked`` names what could not be checked, and they are reported as None."""
    from .export import OnnxModel, onnx_weight_bytes

    for name in ("arch", "normalize"):
        if getattr(options, name) is not None:
            raise DaqkdError(f"an ONNX file carries its architecture and normalization: drop --{name}")
    model = OnnxModel(options.run, optimization=options.onnx_optimization)
    info = _onnx_metadata(model)
    test = options.load(options.split)
    model.num_classes = test.num_classes
    classes = info["classes"]
    if classes is not None and list(classes) != list(test.classes):
        raise DaqkdError(f"{options.run} was exported for other classes than the data's ({len(classes)} classes, "
                         f"first {classes[:3]}; the data's: {test.classes[:3]}): pass the data set it was trained on")
    if model.output_classes is not None and model.output_classes != test.num_classes:
        raise DaqkdError(f"{options.run} outputs {model.output_classes} classes but the data has "
                         f"{test.num_classes}: pass the data set it was trained on")
    side = model.input_shape[2:]
    sizes = {tuple(t.shape[-2:]) for t in (test.images if isinstance(test.images, list) else [test.images[:1]])}
    if all(isinstance(d, int) for d in side) and sizes != {tuple(side)}:
        raise DaqkdError(f"{options.run} takes {side[0]}x{side[1]} images but the data's are "
                         f"{', '.join(f'{h}x{w}' for h, w in sorted(sizes))}: export it again with --image-size")
    unchecked = []
    if classes is None:
        unchecked.append(f"class order (its outputs are taken as the data's {test.num_classes} classes in order)")
    if info["arch"] is None:
        unchecked.append("architecture, normalization and bit widths (no daqkd metadata)")
    metrics = evaluate_model(model, test, torch.device("cpu"))
    size = {**onnx_weight_bytes(options.run), "file_bytes": Path(options.run).stat().st_size}
    described = {k: v for k, v in info.items() if k != "classes"}  # the data's names are in per_class_top1
    report = {"run": str(options.run), **described, "data": test.source, "split": options.split,
              "images": len(test), "runtime": f"onnxruntime, CPU, graph optimization {options.onnx_optimization}",
              **metrics, "size": size, "unchecked": unchecked}
    if options.out:
        write_json_atomic(options.out, report)
    return report


def _onnx_metadata(model: Any) -> dict[str, Any]:
    """arch, normalize, classes, w_bits, a_bits and method from an ONNX file's daqkd metadata; all
    None for a file without it (no ``arch``). A daqkd file's entries must be what export wrote."""
    path = model.path
    arch = model.metadata_value("arch")
    if arch is None:
        return {"arch": None, "normalize": None, "classes": None, "w_bits": None, "a_bits": None, "method": None}
    if not isinstance(arch, str):
        raise damaged_metadata(path, f"arch is {arch!r}, not a name", ONNX_METADATA_REMEDY)
    normalize = model.metadata_value("normalize")
    if normalize is not None and not isinstance(normalize, str):
        raise damaged_metadata(path, f"normalize is {normalize!r}, not a name", ONNX_METADATA_REMEDY)
    classes = model.metadata_value("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        raise damaged_metadata(path, f"classes is {str(classes)[:60]!r}, not a list of names", ONNX_METADATA_REMEDY)
    quant = model.metadata_value("quant")
    if quant is None:
        return {"arch": arch, "normalize": normalize, "classes": classes, "w_bits": 32, "a_bits": 32, "method": None}
    bits_ok = isinstance(quant, dict) and all(
        isinstance(quant.get(k), int) and not isinstance(quant.get(k), bool) for k in ("w_bits", "a_bits"))
    if not bits_ok or not isinstance(quant.get("method"), str):
        raise damaged_metadata(path, f"quant is {str(quant)[:60]!r}, not an object with integer w_bits and a_bits "
                               "and a method name", ONNX_METADATA_REMEDY)
    return {"arch": arch, "normalize": normalize, "classes": classes, "w_bits": quant["w_bits"],
            "a_bits": quant["a_bits"], "method": quant["method"]}


def teacher_of(run: str | Path) -> Path:
    """The teacher checkpoint a student run was distilled from, from RUN/config.json (its --teacher,
    relative to the directory the run was started in)."""
    config_file = Path(run) / CONFIG_FILE
    if not config_file.is_file():
        raise DaqkdError(f"--fp needs a student's run directory (its config.json names the teacher); {run} has none")
    try:
        config = json.loads(config_file.read_text())
        teacher = config["args"]["teacher"]
    except (ValueError, KeyError, TypeError):
        raise DaqkdError(f"{config_file} names no teacher: --fp exports the teacher of a student run") from None
    if not isinstance(teacher, str):
        raise DaqkdError(f"{config_file} names no teacher: --fp exports the teacher of a student run")
    bases = [Path(config["cwd"])] if isinstance(config.get("cwd"), str) else []
    for base in [*bases, Path.cwd()]:
        if (base / teacher).exists():
            return base / teacher
    tried = ", ".join(map(str, [*bases, Path.cwd()]))
    raise DaqkdError(f"the teacher {teacher!r} of {run} is not found (relative to {tried}): export the teacher's "
                     "run directly")


# the export traces a (2, 3, N, N) batch: 4096 is 100 MB of uint8 images, and far beyond any CNN classifier's
# input; 100,000 would be 60 GB, an allocation failure with a traceback instead of a line
MAX_EXPORT_IMAGE_SIZE = 4096


def export_model(options: ExportOptions) -> Any:
    """Write ``options.run`` (or its teacher with ``fp``) as an ONNX file; the
    :class:`daqkd.export.ExportReport`. Needs the ``export`` extra (onnx, onnxruntime, onnxscript)."""
    from . import __version__
    from .export import export_onnx, require

    if options.run is None:
        raise DaqkdError("pass the run directory or checkpoint to export")
    if not options.out:
        raise DaqkdError("pass --out FILE.onnx")
    if not str(options.out).lower().endswith(".onnx"):
        raise DaqkdError(f"--out {options.out}: name the file FILE.onnx")
    if not 1 <= options.image_size <= MAX_EXPORT_IMAGE_SIZE:
        raise DaqkdError(f"--image-size must be 1 to {MAX_EXPORT_IMAGE_SIZE} (the export traces the model on a batch "
                         f"of that size), got {options.image_size}")
    if options.integer and options.fp:
        raise DaqkdError("--integer exports a quantized student; the --fp teacher has no integer form: drop one")
    check_output(options.out, "file")
    require("onnx"), require("onnxscript")  # before minutes of loading and tracing
    source = teacher_of(options.run) if options.fp else Path(options.run)
    _, meta = read_checkpoint(resolve_checkpoint(source))
    if "arch" not in meta:
        raise DaqkdError(f"{source} is not a daqkd checkpoint (no architecture or classes in it): export a daqkd run "
                         "or checkpoint (published weights: fine-tune them with daqkd teacher --init first)")
    model, info = load_model(source)
    quant = info.get("quant")
    metadata = {
        "producer": f"daqkd {__version__}", "source": str(source), "arch": info["arch"],
        "classes": info.get("classes"), "num_classes": info["num_classes"], "normalize": info["normalize"],
        "input": f"images: uint8 RGB (batch, 3, {options.image_size}, {options.image_size}) in [0, 255], "
                 "normalized inside the graph",
        "output": "logits: float32 (batch, classes)", "quant": quant,
        "w_bits": quant["w_bits"] if quant else 32, "a_bits": quant["a_bits"] if quant else 32,
        "method": quant["method"] if quant else None,
    }
    if options.integer:
        from .integer_export import export_integer_onnx

        if not quant:
            raise DaqkdError(f"{source} is a full-precision model: --integer exports quantized students")
        return export_integer_onnx(model, options.out, image_size=options.image_size, metadata=metadata)
    return export_onnx(model, options.out, image_size=options.image_size, metadata=metadata)


def run_sweep(options: SweepOptions) -> dict[str, Any]:
    """Run (or resume) a sweep into ``options.out``; the analysis (see :func:`daqkd.sweep.analyze`)."""
    from .sweep_runner import run_sweep as run

    return run(options)
