"""`daqkd teacher`, `daqkd train` and `daqkd eval`: FP teacher, QAT + KD student, evaluation."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .augment import parse_candidates
from .checkpoint import (
    load_model,
    load_state_dict_strict,
    model_size_bytes,
    read_checkpoint,
    resolve_checkpoint,
    write_json_atomic,
)
from .cli import ARCH_HELP, add_foreign_args
from .data import ImageSet, load_data
from .distill import LOSSES, DistillConfig, create_loss
from .errors import DaqkdError
from .models import (
    NAMED_NORMALIZATIONS,
    Normalization,
    NormalizedModel,
    create_model,
    parse_normalization,
)
from .quant import QUANTIZERS, QuantConfig, check_bits, quantize_model
from .rank import rank_and_save
from .runtime import init_distributed, is_main_process, select_device
from .train import BEST_FILE, TrainConfig, Trainer, evaluate


def add_optim_args(parser: argparse.ArgumentParser, *, lr: float, optimizer: str, aug: str | None) -> None:
    g = parser.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=256)
    if aug is not None:
        g.add_argument(
            "--aug", default=aug, help="a DA name (see daqkd rank --help)" + (", or 'auto'" if aug == "auto" else "")
        )
    g.add_argument("--optimizer", default=optimizer, choices=("sgd", "adam"))
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--warmup-epochs", type=float, default=0.0)
    g.add_argument("--no-amp", action="store_true",
                   help="train in float32 on CUDA (default: bf16 autocast; quantizers and evaluation are float32)")
    g.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    g.add_argument("--eval-every", type=int, default=1, metavar="N",
                   help="evaluate on the test split every N epochs and after the last (default %(default)s)")
    g.add_argument("--train-limit-per-class", type=int, metavar="K",
                   help="first K train images of each class, the test split untouched (data-limited training; "
                        "--limit-per-class limits both)")
    g.add_argument("--out", required=True, metavar="RUN", help="run directory")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--no-progress", action="store_true")


def add_parsers(subparsers: Any, add_data_args) -> None:
    t = subparsers.add_parser("teacher", help="train or fine-tune a full-precision model")
    add_data_args(t, split=False)
    t.add_argument("--arch", required=True, help=ARCH_HELP)
    t.add_argument(
        "--init",
        metavar="RUN|FILE",
        help="start from these weights (fine-tuning): a daqkd run or checkpoint, "
        "or published weights (then --normalize names their statistics)",
    )
    t.add_argument("--normalize", help="input statistics: " + ", ".join(NAMED_NORMALIZATIONS) + " or m1,m2,m3:s1,s2,s3 "
                   "(default: from a daqkd --init, else the data's own)")
    t.add_argument("--label-smoothing", type=float, default=0.0)
    add_optim_args(t, lr=0.1, optimizer="sgd", aug="none+cutmix")
    t.set_defaults(func=cmd_teacher)

    s = subparsers.add_parser("train", help="QAT + KD of a low-bit student from a teacher")
    add_data_args(s, split=False)
    add_student_args(s)
    add_optim_args(s, lr=1e-3, optimizer="adam", aug="auto")
    s.set_defaults(func=cmd_train)

    e = subparsers.add_parser("eval", help="evaluate a run directory or checkpoint")
    e.add_argument("run", metavar="RUN|FILE", help="a daqkd run directory or checkpoint, or published weights "
                   "(with --arch and --normalize)")
    add_data_args(e)
    add_foreign_args(e.add_argument_group("published weights"))
    e.add_argument("--out", metavar="FILE", help="write the report as JSON")
    e.set_defaults(func=cmd_eval, split="test")


def add_student_args(s: argparse.ArgumentParser, teacher_required: bool = True) -> None:
    """The student's options, shared by `daqkd train` and `daqkd sweep`."""
    s.add_argument("--teacher", required=teacher_required, metavar="RUN|FILE",
                   help="a daqkd teacher run or checkpoint, or published weights (with --normalize, and --teacher-arch "
                        "or --arch)")
    s.add_argument("--arch", help="student architecture (default: the teacher's; it then starts from its weights)")
    s.add_argument("--teacher-arch", help="architecture of published --teacher weights (default: --arch)")
    s.add_argument(
        "--normalize",
        help="input statistics of published --teacher weights ("
        + ", ".join(NAMED_NORMALIZATIONS)
        + " or m1,m2,m3:s1,s2,s3); the student uses the teacher's",
    )
    s.add_argument("--init", metavar="RUN|FILE", help="student weights when the architectures differ")
    s.add_argument("--method", default="ewgs", choices=sorted(QUANTIZERS))
    s.add_argument("--w-bits", type=int, default=2)
    s.add_argument("--a-bits", type=int, default=2)
    s.add_argument("--per-channel", action="store_true")
    s.add_argument("--first-last", default="fp", help="fp, same, or a bit width (e.g. 8)")
    s.add_argument("--ewgs-delta", default="0", help="a fixed delta, or 'hessian'")
    s.add_argument("--kd", default="kd", choices=sorted(LOSSES))
    s.add_argument("--gamma", type=float, default=1.0, help="CE weight")
    s.add_argument("--alpha", type=float, default=2.0, help="KD weight")
    s.add_argument("--temperature", type=float, default=4.0)
    s.add_argument("--augs", default="all", help="candidates for --aug auto")
    s.add_argument("--quant-lr", type=float, default=1e-5)


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


def load_train_test(args: argparse.Namespace) -> tuple[ImageSet, ImageSet]:
    train_limit = getattr(args, "train_limit_per_class", None) or args.limit_per_class
    train = load_data(args.data, args.dataset, "train", train_limit, args.data_root)
    test = load_data(args.data, args.dataset, "test", args.limit_per_class, args.data_root)
    return train, test


def train_config(args: argparse.Namespace, aug: str) -> TrainConfig:
    for name in ("epochs", "batch_size", "eval_every"):
        if getattr(args, name, 1) < 1:
            raise DaqkdError(f"--{name.replace('_', '-')} must be at least 1")
    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, aug=aug, optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, quant_lr=getattr(args, "quant_lr", 1e-5),
        warmup_epochs=args.warmup_epochs, seed=args.seed, save_every=args.save_every,
        eval_every=getattr(args, "eval_every", 1),
        amp=not getattr(args, "no_amp", False),
    )


def prepare_run(args: argparse.Namespace, command: str) -> Path:
    """Create the run directory and write config.json; with --resume, reuse the stored config."""
    run = Path(args.out)
    config_file = run / "config.json"
    if args.resume:
        if not config_file.is_file():
            raise DaqkdError(f"--resume: {run} has no config.json: pass the directory of an earlier run")
        stored = json.loads(config_file.read_text())["args"]
        keep = {"resume": True, "out": args.out, "no_progress": args.no_progress, "device": args.device}
        vars(args).update({**stored, **keep})
    elif (run / "state.pt").exists():
        raise DaqkdError(f"{run} already holds a run: pass --resume to continue it, or another --out")
    run.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        saved = {k: v for k, v in vars(args).items() if k != "func"}
        write_json_atomic(config_file, {"command": command, "args": saved, "argv": sys.argv[1:]})
    return run


def cmd_teacher(args: argparse.Namespace) -> int:
    init_distributed()
    run = prepare_run(args, "teacher")
    device = select_device(args.device)
    torch.manual_seed(args.seed)
    train, test = load_train_test(args)
    parse_candidates(args.aug)
    if args.init:
        model, info = load_model(args.init, arch=args.arch, normalize=args.normalize, num_classes=train.num_classes)
        if info["quant"]:
            raise DaqkdError(f"--init {args.init} is a quantized student: a teacher starts from full-precision weights")
    else:
        norm = parse_normalization(args.normalize) if args.normalize else data_statistics(train)
        model = NormalizedModel(create_model(args.arch, train.num_classes), norm)
        info = {"arch": args.arch, "normalize": norm.spec()}
    metadata = {"arch": args.arch, "classes": train.classes, "num_classes": train.num_classes,
                "normalize": info["normalize"], "quant": None, "kind": "teacher"}
    loss = create_loss("none", DistillConfig(label_smoothing=args.label_smoothing))
    trainer = Trainer(model, loss, train, test, train_config(args, args.aug), run, device, metadata,
                      progress=not args.no_progress)
    if args.resume:
        trainer.resume()
    else:
        before = evaluate(model.to(device), test, device)
        if is_main_process():
            print(
                f"daqkd teacher: {args.arch} on {len(train):,} images, start test top-1 {before['top1']:.2f}%",
                flush=True,
            )
    trainer.fit()
    if is_main_process():
        print(f"best test top-1 {trainer.best_top1:.2f}% -> {run / BEST_FILE}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    train_student(args)
    return 0


def train_student(args: argparse.Namespace, data: tuple[ImageSet, ImageSet] | None = None) -> Trainer:
    """`daqkd train` with its parsed arguments; ``data`` = (train, test) already loaded (sweeps)."""
    init_distributed()
    run = prepare_run(args, "train")
    device = select_device(args.device)
    torch.manual_seed(args.seed)
    train, test = data if data is not None else load_train_test(args)
    teacher, teacher_meta = load_teacher(args, train.num_classes)
    arch = args.arch or teacher_meta["arch"]
    delta = None if args.ewgs_delta == "hessian" else float(args.ewgs_delta)
    first_last: str | int = args.first_last if args.first_last in ("fp", "same") else check_bits(
        "--first-last", int(args.first_last) if args.first_last.isdigit() else args.first_last)
    quant = QuantConfig(method=args.method, w_bits=args.w_bits, a_bits=args.a_bits, per_channel=args.per_channel,
                        first_last=first_last, ewgs_delta=delta)
    quant.validate()
    aug = args.aug
    if aug == "auto":
        rank_file = run / "rank.json"
        if rank_file.is_file():
            aug = json.loads(rank_file.read_text())["selected"]
        else:
            aug = rank_and_save(teacher, train, parse_candidates(args.augs), args.seed, device, rank_file,
                                is_main_process())["selected"]
        if is_main_process():
            print(f"--aug auto: the metric selected {aug} (ranking in {rank_file})", flush=True)
    parse_candidates(aug)
    student = create_model(arch, train.num_classes)
    if arch == teacher_meta["arch"] and not args.init:
        student.load_state_dict(teacher.model.state_dict())
    elif args.init:
        state, _ = read_checkpoint(resolve_checkpoint(args.init))
        load_state_dict_strict(student, state, args.init, arch)
    quantize_model(student, quant)
    model = NormalizedModel(student, teacher.normalization)
    metadata = {"arch": arch, "classes": train.classes, "num_classes": train.num_classes,
                "normalize": teacher.normalization.spec(), "quant": asdict(quant), "kind": "student",
                "teacher": str(args.teacher), "aug": aug, "kd": args.kd}
    loss = create_loss(args.kd, DistillConfig(gamma=args.gamma, alpha=args.alpha, temperature=args.temperature))
    trainer = Trainer(model, loss, train, test, train_config(args, aug), run, device, metadata,
                      teacher=teacher, progress=not args.no_progress)
    if args.resume:
        trainer.resume()
    trainer.fit()
    if is_main_process():
        print(f"best test top-1 {trainer.best_top1:.2f}% -> {run / BEST_FILE}")
    return trainer


def load_teacher(args: argparse.Namespace, num_classes: int) -> tuple[NormalizedModel, dict[str, Any]]:
    """The --teacher of `daqkd train`/`sweep`: a daqkd checkpoint, or published weights whose
    architecture is --teacher-arch (else --arch) and whose statistics are --normalize."""
    model, info = load_model(args.teacher, arch=getattr(args, "teacher_arch", None),
                             normalize=getattr(args, "normalize", None), num_classes=num_classes,
                             fallback_arch=args.arch)
    return model, info


def cmd_eval(args: argparse.Namespace) -> int:
    device = select_device(args.device)
    if args.data is None and args.dataset is None:
        raise DaqkdError("pass --data DIR|FILE.npz (or --dataset) with the test images")
    test = load_data(args.data, args.dataset, args.split, args.limit_per_class, args.data_root)
    model, meta = load_model(args.run, arch=args.arch, normalize=args.normalize, num_classes=test.num_classes)
    model.to(device)
    metrics = evaluate(model, test, device)
    size = model_size_bytes(model.model)
    quant = meta.get("quant")
    report = {"run": str(args.run), "arch": meta["arch"], "normalize": meta["normalize"], "data": test.source,
              "split": args.split, "images": len(test),
              "w_bits": quant["w_bits"] if quant else 32, "a_bits": quant["a_bits"] if quant else 32,
              "method": quant["method"] if quant else None, **metrics, "size": size}
    print(f"{meta['arch']} W{report['w_bits']}A{report['a_bits']}: top-1 {metrics['top1']:.2f}%  "
          f"top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  on {len(test):,} {args.split} images")
    print(f"model size {size['bytes'] / 1e6:.3f} MB at its bit widths vs {size['fp32_bytes'] / 1e6:.3f} MB FP32 "
          f"({size['compression']:.1f}x)")
    for name, acc in metrics["per_class_top1"].items():
        print(f"  {name:<20} {acc:6.2f}%")
    if args.out:
        write_json_atomic(args.out, report)
    return 0
