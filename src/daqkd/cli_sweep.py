"""`daqkd sweep`: rank the candidate DAs once, train one student per (DA, seed), report whether
the ranking predicted the students' accuracy (results.json, report.md, scatter.png).

Resumable: the ranking is kept in OUT/rank.json, each student in OUT/runs/<DA>-seed<S>/; a finished
run is never repeated, a killed one resumes from its last checkpoint, and the outputs are
rewritten after every run, so a partial sweep always has a current report.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shlex
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .augment import parse_candidates
from .checkpoint import load_run_model, write_json_atomic
from .cli_train import add_optim_args, add_student_args, load_train_test, train_student
from .data import ImageSet
from .errors import DaqkdError
from .rank import rank_and_save
from .runtime import init_distributed, is_main_process, select_device
from .sweep import analyze, report_markdown, scatter_plot


def add_parser(subparsers: Any, add_data_args) -> None:
    p = subparsers.add_parser(
        "sweep", help="train a student per candidate DA and test whether the ranking predicts accuracy",
        description="Rank --augs once with the teacher, train one student per candidate and seed "
                    "(the options of `daqkd train`), and write results.json, report.md and scatter.png.")
    add_data_args(p)
    add_student_args(p)
    add_optim_args(p, lr=1e-3, optimizer="adam", aug=None)
    p.add_argument("--seeds", type=int, default=1, help="students per DA, seeds --seed .. --seed+S-1")
    p.add_argument("--jobs", type=int, default=1,
                   help="students trained at once, each in its own process logging to RUN/train.log "
                        "(a small student leaves a large GPU mostly idle)")
    p.set_defaults(func=cmd_sweep)


def run_name(aug: str, seed: int) -> str:
    return f"{aug}-seed{seed}"


def finished_run(run: Path, epochs: int) -> dict[str, Any] | None:
    """The results of a run that reached its last epoch, else None."""
    metrics_file = run / "metrics.jsonl"
    if not metrics_file.is_file():  # metrics, not weights: committed sweeps keep only the former
        return None
    history = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not history or history[-1]["epoch"] < epochs:
        return None
    return {"top1": history[-1]["test_top1"], "top5": history[-1]["test_top5"],
            "best_top1": max(h["test_top1"] for h in history),
            "train_seconds": sum(h["seconds"] for h in history), "epochs": history[-1]["epoch"]}


def train_in_process(task: tuple[int, argparse.Namespace, tuple[ImageSet, ImageSet], int]) -> tuple[int, float, str]:
    """Train one student in a worker process, its output in RUN/train.log.

    task: (index, run arguments, data, CPU threads); returns (index, wall seconds, error or "").
    """
    index, run_args, data, threads = task
    torch.set_num_threads(threads)
    started = time.perf_counter()
    run = Path(run_args.out)
    run.mkdir(parents=True, exist_ok=True)
    run_args.no_progress = True
    with open(run / "train.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            train_student(run_args, data)
        except Exception as exc:  # noqa: BLE001  (any failure is reported by the parent, named after its run)
            traceback.print_exc()
            return index, time.perf_counter() - started, f"{type(exc).__name__}: {exc}"
    return index, time.perf_counter() - started, ""


def ignore_interrupts() -> None:
    """Workers leave Ctrl-C to the parent, which stops them all (no traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_in_processes(pending: list[argparse.Namespace], data: tuple[ImageSet, ImageSet], jobs: int,
                     record: Callable[[argparse.Namespace, float], None]) -> None:
    """Train ``pending`` students, ``jobs`` at a time, each in a fresh spawned process (CUDA-safe);
    the images reach the workers through shared memory, not a reload per student. On an error or
    Ctrl-C every worker stops; the finished runs and the others' last checkpoints stay."""
    import torch.multiprocessing as mp

    for split in data:
        if isinstance(split.images, torch.Tensor):
            split.images.share_memory_()
        split.labels.share_memory_()
    jobs = min(jobs, len(pending))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // jobs)
    print(f"daqkd sweep: training {len(pending)} students, {jobs} at a time, {threads} CPU thread(s) each; "
          "logs in RUN/train.log", flush=True)
    pool = mp.get_context("spawn").Pool(jobs, initializer=ignore_interrupts, maxtasksperchild=1)
    interrupted = False
    try:
        tasks = [(i, run_args, data, threads) for i, run_args in enumerate(pending)]
        for index, wall_seconds, error in pool.imap_unordered(train_in_process, tasks):
            run = Path(pending[index].out)
            if error:
                raise DaqkdError(f"{run.name} failed ({error}); see {run / 'train.log'}")
            record(pending[index], wall_seconds)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
        try:
            pool.terminate()
            pool.join()
        finally:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise DaqkdError("interrupted: finished students are kept and the others resume from their last "
                         "epoch; run the same command again")


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise DaqkdError(f"--seeds must be at least 1, got {args.seeds}")
    if args.jobs < 1:
        raise DaqkdError(f"--jobs must be at least 1, got {args.jobs}")
    if args.jobs > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DaqkdError("--jobs trains students side by side on one machine: use it without torchrun")
    augs = parse_candidates(args.augs)
    names = list(augs)
    init_distributed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = select_device(args.device)
    data = load_train_test(args)
    train, _ = data
    main = is_main_process()

    rank_file = out / "rank.json"
    if rank_file.is_file():
        ranking = json.loads(rank_file.read_text())
        if sorted(c["name"] for c in ranking["candidates"]) != sorted(names):
            raise DaqkdError(f"{rank_file} ranks other candidates than --augs: use another --out, or delete it")
    else:
        teacher, _ = load_run_model(args.teacher, train.num_classes)
        ranking = rank_and_save(teacher, train, augs, args.seed, device, rank_file, main)
    if main:
        order = ", ".join(c["name"] for c in sorted(ranking["candidates"], key=lambda c: c["rank"]))
        print(f"daqkd sweep: ranking (best first): {order}", flush=True)

    command = "daqkd " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    title = (f"{ranking.get('images', len(train)):,} train images, {args.method} W{args.w_bits}A{args.a_bits} "
             f"student, KD {args.kd}, {args.epochs} epoch(s)")
    seeds = [args.seed + i for i in range(args.seeds)]
    results: list[dict[str, Any]] = []
    total = len(names) * len(seeds)

    def publish() -> None:
        analysis = analyze(ranking, results, names)
        meta = {"title": title, "runs_finished": len(results), "runs_total": total, "device": str(device),
                "train_seconds": sum(r["train_seconds"] for r in results), "command": command}
        write_json_atomic(out / "results.json", {"config": {k: v for k, v in vars(args).items() if k != "func"},
                                                 "meta": meta, "ranking": ranking, "runs": results, **analysis})
        (out / "report.md").write_text(report_markdown(analysis, meta))
        if analysis["candidates"]:
            scatter_plot(analysis, out / "scatter.png", title)

    # best-ranked first: a partial sweep then already holds the metric's pick
    ordered = sorted(names, key=lambda n: next(c["rank"] for c in ranking["candidates"] if c["name"] == n))
    pending: list[argparse.Namespace] = []
    for seed in seeds:
        for aug in ordered:
            run = out / "runs" / run_name(aug, seed)
            done = finished_run(run, args.epochs)
            if done is not None:
                results.append({"aug": aug, "seed": seed, "run": str(run.relative_to(out)), **done})
                continue
            run_args = copy.copy(args)
            run_args.aug, run_args.seed, run_args.out = aug, seed, str(run)
            run_args.resume = (run / "state.pt").is_file()
            if not run_args.resume and run.exists():
                shutil.rmtree(run)  # a partial run without its resume state: start it afresh
            pending.append(run_args)
    if main and results:
        publish()

    def record(run_args: argparse.Namespace, wall_seconds: float) -> None:
        run = Path(run_args.out)
        done = finished_run(run, args.epochs)
        if done is None:
            raise DaqkdError(f"{run} did not finish its {args.epochs} epochs")
        results.append({"aug": run_args.aug, "seed": run_args.seed, "run": str(run.relative_to(out)), **done,
                        "wall_seconds": wall_seconds})
        if main:
            print(f"{run.name} finished: top-1 {done['top1']:.2f}% ({len(results)}/{total})", flush=True)
            publish()

    if args.jobs > 1 and pending:
        run_in_processes(pending, data, args.jobs, record)
    for run_args in pending if args.jobs == 1 else []:
        if main:
            print(f"-- {Path(run_args.out).name} ({len(results) + 1}/{total})"
                  f"{' resuming' if run_args.resume else ''}", flush=True)
        started = time.perf_counter()
        train_student(run_args, data)
        record(run_args, time.perf_counter() - started)
    if main:
        publish()
        s = analyze(ranking, results, names)["summary"]
        corr = s["metric_correlation"]
        print(f"metric's pick {s['metric_pick']}: {s['metric_pick_top1']:.2f}%  variance pick "
              f"{s['variance_pick']}: {s['variance_pick_top1']:.2f}%  best {s.get('best')}: {s.get('best_top1'):.2f}%")
        if corr:
            print(f"Spearman(score, top-1) {corr['spearman']:+.3f} (p={corr['spearman_p']:.3g})  "
                  f"Kendall {corr['kendall']:+.3f} (p={corr['kendall_p']:.3g})")
        print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'scatter.png'}")
    return 0
