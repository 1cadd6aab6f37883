"""Running a sweep (`daqkd sweep`, :func:`daqkd.sweep`): rank the candidate DAs once, train one
student per (DA, seed), report whether the ranking predicted the students' accuracy (results.json,
report.md, scatter.png).

Resumable: the ranking is kept in OUT/rank.json, each student in OUT/runs/<DA>-seed<S>/; a finished
run is never repeated, a killed one resumes from its last checkpoint, and the outputs are
rewritten after every run, so a partial sweep always has a current report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing.context
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

from .api import (
    HESSIAN_OPTIONS,
    LEGACY_HESSIAN_SAMPLE,
    RunData,
    StudentOptions,
    SweepOptions,
    legacy_hessian_sample,
    load_teacher,
    train_student,
    uses_hessian_delta,
)
from .augment import check_candidate, parse_candidates
from .errors import DaqkdError
from .rank import rank_and_save
from .rundir import (
    RANK_FILE,
    STATE_FILE,
    TRAIN_LOG,
    check_output,
    finished_run,
    same_option,
    stored_ranking,
    write_json_atomic,
    write_text_atomic,
)
from .runtime import init_distributed, is_main_process, launched_by_torchrun, select_device
from .sweep import RANKING_FIELDS, _pct, analyze, report_markdown, scatter_plot


def run_name(aug: str, seed: int) -> str:
    return f"{aug}-seed{seed}"


def parse_devices(devices: str | None, device: str) -> list[str]:
    """The devices a sweep's students train on: ``devices`` as given (``"0,1"`` means cuda:0 and
    cuda:1), each checked to exist; without it ``[device]``."""
    if devices is None:
        return [device]
    names = [name.strip() for name in devices.split(",")]
    if not all(names):
        raise DaqkdError(f"--devices {devices!r}: list devices or CUDA indices separated by commas, e.g. 0,1")
    parsed = [f"cuda:{name}" if name.isdigit() else name for name in names]
    for name in parsed:
        try:
            torch.device(name)
        except RuntimeError as exc:
            raise DaqkdError(f"--devices {devices}: {name!r} is not a device: use CUDA indices (0,1), cuda:N or "
                             "cpu") from exc
        try:
            select_device(name)
        except DaqkdError as exc:
            reason = str(exc).replace(f"--device {name} ", "", 1).replace(f"--device {name}: ", "", 1)
            raise DaqkdError(f"--devices {devices}: {name}: {reason.split(': use')[0]}: list only devices "
                             "this machine has (CUDA indices 0..N-1)") from exc
    return parsed


def device_slots(devices: list[str], jobs: int) -> list[str]:
    """Round robin: of ``jobs`` students training at once, the i-th runs on ``devices[i % len]``,
    so no device holds more than ceil(jobs / len(devices)) of them."""
    return [devices[i % len(devices)] for i in range(jobs)]


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 0 <= K < N; None -> (0, 1), the whole sweep."""
    if shard is None:
        return 0, 1
    index, _, count = shard.partition("/")
    if not (index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
        raise DaqkdError(f"--shard {shard!r}: give K/N with 0 <= K < N, e.g. --shard 0/2 on one node and "
                         "--shard 1/2 on the other")
    return int(index), int(count)


# Set in each worker process by `_start_worker`: the free devices, one token per running student.
_device_slots: Any = None


def _stop_worker(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _start_worker(slots: Any) -> None:
    """Workers leave Ctrl-C to the parent, which stops them all (no traceback per worker). The
    parent stops them with SIGTERM (``Pool.terminate``): here that unwinds the student's loop and
    exits through multiprocessing's finalizers, which release the semaphores the student created
    (a worker killed outright leaves them to the resource tracker, which warns about each at exit)."""
    global _device_slots
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_worker)
    _device_slots = slots


def train_in_process(task: tuple[int, StudentOptions, RunData, int]) -> tuple[int, float, str]:
    """Train one student in a worker process on a free device slot, its output in RUN/train.log.

    task: (index, run arguments, data, CPU threads); returns (index, wall seconds, error or "").
    """
    index, run_args, data, threads = task
    torch.set_num_threads(threads)
    started = time.perf_counter()
    run = Path(run_args.out)
    run.mkdir(parents=True, exist_ok=True)
    # the pool runs at most as many tasks as there are slots, and each returns its slot before it
    # returns, so this never waits
    device = _device_slots.get()
    try:
        if device.startswith("cuda:"):  # else CUDA side work (pinned memory, caching) lands on GPU 0
            torch.cuda.set_device(device)
        run_args = dataclasses.replace(run_args, no_progress=True, device=device)
        with open(run / TRAIN_LOG, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                train_student(run_args, data)
            except Exception as exc:  # noqa: BLE001  (any failure is reported by the parent, named after its run)
                traceback.print_exc()
                return index, time.perf_counter() - started, f"{type(exc).__name__}: {exc}"
        return index, time.perf_counter() - started, ""
    finally:
        _device_slots.put(device)


class _StudentProcess(multiprocessing.context.SpawnProcess):
    """A spawned pool worker that is not a daemon: a Pool's workers are, and a daemon may not start
    the processes a student's ``--augment-workers`` needs. The pool still terminates them."""

    @property
    def daemon(self) -> bool:
        return False

    @daemon.setter
    def daemon(self, value: bool) -> None:
        pass

    def start(self) -> None:
        """Start with SIGINT blocked, a mask the spawned interpreter inherits: a Ctrl-C while it
        imports torch would otherwise print a KeyboardInterrupt traceback per starting worker
        (the pool starts replacements from its own thread, where SIG_IGN cannot be set)."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _StudentContext(multiprocessing.context.SpawnContext):
    Process = _StudentProcess


def run_in_processes(pending: list[StudentOptions], data: RunData, jobs: int,
                     record: Callable[[StudentOptions, float], None], devices: list[str]) -> None:
    """Train ``pending`` students, ``jobs`` at a time, each in a fresh spawned process (CUDA-safe),
    placed round-robin on ``devices`` (:func:`device_slots`); the images reach the workers through
    shared memory, not a reload per student. On an error or Ctrl-C every worker stops; the finished
    runs and the others' last checkpoints stay."""
    for split in (split for split in data if split is not None):
        if isinstance(split.images, torch.Tensor):
            split.images.share_memory_()
        split.labels.share_memory_()
    jobs = min(jobs, len(pending))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    augment_workers = max(run_args.augment_workers for run_args in pending)
    threads = max(1, (cores - jobs * augment_workers) // jobs)  # the students' augmentation workers take a core each
    slots = device_slots(devices, jobs)
    placed = ", ".join(f"{slots.count(d)} on {d}" for d in dict.fromkeys(slots))
    placed = "" if slots == ["auto"] * jobs else f" ({placed})"
    print(f"daqkd sweep: training {len(pending)} students, {jobs} at a time{placed}, {threads} CPU thread(s) "
          "each; logs in RUN/train.log", flush=True)
    context = _StudentContext()
    free = context.Queue()
    for slot in slots:
        free.put(slot)
    pool = context.Pool(jobs, initializer=_start_worker, initargs=(free,), maxtasksperchild=1)
    try:  # a Ctrl-C passes on to the CLI's one `daqkd: interrupted:` line, after the workers stopped
        tasks = [(i, run_args, data, threads) for i, run_args in enumerate(pending)]
        for index, wall_seconds, error in pool.imap_unordered(train_in_process, tasks):
            run = Path(pending[index].out)
            if error:
                raise DaqkdError(f"{run.name} failed ({error}); see {run / TRAIN_LOG}")
            record(pending[index], wall_seconds)
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
        try:
            pool.terminate()
            pool.join()
        finally:
            signal.signal(signal.SIGINT, previous)


def train_students(pending: list[StudentOptions], data: RunData, jobs: int, devices: list[str],
                   record: Callable[[StudentOptions, float], None], label: Callable[[StudentOptions], str]) -> None:
    """Train ``pending``: ``jobs`` at a time in processes (:func:`run_in_processes`), or one after
    another in this one (each announced as ``-- label``); ``record(run, wall seconds)`` after each."""
    if jobs > 1 and pending:
        run_in_processes(pending, data, jobs, record, devices)
        return
    for run_args in pending:
        if is_main_process():
            print(f"-- {label(run_args)}{' resuming' if run_args.resume else ''}", flush=True)
        started = time.perf_counter()
        train_student(run_args, data)
        record(run_args, time.perf_counter() - started)


# The options that make two students comparable: a sweep refuses to mix runs that differ in any.
COMPARED_OPTIONS = ("teacher", "teacher_arch", "normalize", "arch", "init", "method", "w_bits", "a_bits",
                    "per_channel", "first_last", "ewgs_delta", *HESSIAN_OPTIONS, "residual_bits", "kd", "gamma",
                    "alpha", "temperature", "beta", "kd_layers", "quant_lr",
                    "data", "dataset", "limit_per_class", "train_limit_per_class", "val_per_class", "val_seed",
                    "epochs", "batch_size",
                    "optimizer", "lr", "momentum", "weight_decay", "warmup_epochs", "no_amp", "compile")
PATH_OPTIONS = ("teacher", "init", "data")
DEFAULT_DA = "none"


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_same_configuration(out: Path, args: SweepOptions, stored_sweep: dict[str, Any] | None) -> None:
    """Stop with one error line naming every option in which ``args`` differs from the runs that
    ``out`` already holds (their config.json), or from the sweep's stored seed list and default."""
    differences: dict[str, tuple[Any, Any]] = {}
    for config_file in sorted(out.glob("runs/*/config.json")):
        try:
            saved = json.loads(config_file.read_text())
            stored, start = saved["args"], saved.get("cwd")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DaqkdError(f"{config_file} is unreadable ({exc}): delete that run or use another --out") from exc
        if legacy_hessian_sample(stored) and uses_hessian_delta(dataclasses.asdict(args)):
            differences.setdefault("ewgs_hessian_probes", (LEGACY_HESSIAN_SAMPLE, args.ewgs_hessian_probes))
        for name in COMPARED_OPTIONS:
            if name in HESSIAN_OPTIONS and not uses_hessian_delta(stored):
                continue  # the sample only matters to Hessian EWGS runs
            current = getattr(args, name, None)
            if name in stored and name not in differences and not same_option(
                    current, stored[name], start if isinstance(start, str) else None, name in PATH_OPTIONS):
                differences[name] = (stored[name], current)
    if stored_sweep is not None:
        if stored_sweep.get("seed", args.seed) != args.seed:
            differences["seed"] = (stored_sweep["seed"], args.seed)
        if stored_sweep.get("seeds", args.seeds) > args.seeds:
            differences["seeds"] = (stored_sweep["seeds"], args.seeds)
        stored_augs = parse_candidates(stored_sweep["augs"]) if "augs" in stored_sweep else None
        if stored_augs is not None and sorted(stored_augs) != sorted(parse_candidates(args.augs)):
            differences["augs"] = (stored_sweep["augs"], args.augs)
        stored_default = stored_sweep.get("default")
        if stored_default is not None and stored_default != args.default:
            differences["default"] = (stored_default, args.default)
    if differences:
        listed = ", ".join(f"{_option(k)} {v[0]!r} (now {v[1]!r})" for k, v in differences.items())
        raise DaqkdError(f"{out} holds a sweep made with other options: {listed}; rerun with those options "
                         "(--seeds may grow) or use another --out")


def collect_finished(out: Path, names: list[str], seeds: list[int], epochs: int,
                     wall_seconds: dict[tuple[str, int], float] | None = None) -> list[dict[str, Any]]:
    """The finished runs of ``names`` x ``seeds`` under ``out/runs``, with their ``wall_seconds``
    where known (a run's own files hold only its training seconds)."""
    results = []
    for seed in seeds:
        for aug in names:
            run = out / "runs" / run_name(aug, seed)
            done = finished_run(run, epochs)
            if done is not None:
                results.append({"aug": aug, "seed": seed, "run": str(run.relative_to(out)), **done})
                if wall_seconds and (aug, seed) in wall_seconds:
                    results[-1]["wall_seconds"] = wall_seconds[aug, seed]
    return results


def training_order(names: list[str], ranking: dict[str, Any], default: str) -> list[str]:
    """The DAs in the order a sweep trains and lists them: best-ranked first, then the default (a
    partial sweep already holds the pick and what it must beat), then the rest by rank."""
    ordered = sorted(names, key=lambda n: next(c["rank"] for c in ranking["candidates"] if c["name"] == n))
    if default not in ordered:
        ordered.insert(1, default)
    return ordered


def stored_wall_seconds(out: Path) -> dict[tuple[str, int], float]:
    """Wall-clock seconds per (DA, seed) that earlier sweep processes recorded in results.json (a
    run's own files hold only its training seconds): kept when a resumed sweep or --report-only
    rewrites the file."""
    try:
        runs = json.loads((out / "results.json").read_text())["runs"]
        return {(r["aug"], int(r["seed"])): float(r["wall_seconds"]) for r in runs if "wall_seconds" in r}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


class SweepOutputs:
    """Writes results.json, report.md and scatter.png of a sweep from its finished runs."""

    def __init__(self, out: Path, ranking: dict[str, Any], candidates: list[str], default: str,
                 config: dict[str, Any], meta: dict[str, Any]) -> None:
        self.out, self.ranking, self.candidates, self.default = out, ranking, candidates, default
        self.config, self.meta = config, meta

    def publish(self, results: list[dict[str, Any]], runs_total: int) -> dict[str, Any]:
        analysis = analyze(self.ranking, results, self.candidates, self.default)
        meta = {**self.meta, "runs_finished": len(results), "runs_total": runs_total,
                "train_seconds": sum(r["train_seconds"] for r in results)}
        write_json_atomic(self.out / "results.json", {"config": self.config, "meta": meta, "ranking": self.ranking,
                                                      "runs": results, **analysis})
        write_text_atomic(self.out / "report.md", report_markdown(analysis, meta))
        if any(r["candidate"] for r in analysis["candidates"]):
            scatter_plot(analysis, self.out / "scatter.png", meta["title"])
        return analysis


def print_verdict(analysis: dict[str, Any], out: Path) -> None:
    s = analysis["summary"]
    print(f"metric's pick {s['metric_pick']}: {_pct(s.get('metric_pick_top1'))}  default {s.get('default')}: "
          f"{_pct(s.get('default_top1'))}  variance pick {s['variance_pick']}: {_pct(s.get('variance_pick_top1'))}  "
          f"best {s.get('best')}: {_pct(s.get('best_top1'))}")
    for line in analysis["verdict"]:
        print(line)
    for warning in analysis["warnings"]:
        print(f"warning: {warning}")
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'scatter.png'}")


def sweep_title(images: int, args: SweepOptions | dict[str, Any]) -> str:
    a = args if isinstance(args, dict) else dataclasses.asdict(args)
    return (f"{images:,} train images, {a['method']} W{a['w_bits']}A{a['a_bits']} student, KD {a['kd']}, "
            f"{a['epochs']} epoch(s)")


# what --report-only reads from the command line; everything else comes from results.json's config,
# which must hold the settings the report counts with
REPORT_ONLY_OPTIONS = ("out", "report_only", "default", "no_progress")
REPORT_CONFIG_KEYS = ("augs", "seed", "seeds", "epochs", "method", "w_bits", "a_bits", "kd")
DEFAULT_SWEEP_OPTIONS = SweepOptions()


def report_only(args: SweepOptions) -> dict[str, Any]:
    """`daqkd sweep --report-only --out DIR`: the outputs rebuilt from rank.json, results.json's
    configuration and the finished runs on disk; nothing is trained. Only ``out`` and ``default``
    are read from ``args``: any other option set is refused, since the sweep's own settings apply."""
    given = [f.name for f in dataclasses.fields(args) if f.name not in REPORT_ONLY_OPTIONS
             and getattr(args, f.name) != getattr(DEFAULT_SWEEP_OPTIONS, f.name)]
    if given:
        raise DaqkdError(f"--report-only rebuilds the report with the sweep's own settings from results.json: "
                         f"drop --{given[0].replace('_', '-')} (only --out and --default apply)")
    if args.out is None:
        raise DaqkdError("--report-only: pass --out DIR (the sweep's directory)")
    out = Path(args.out)
    results_file, rank_file = out / "results.json", out / "rank.json"
    for needed in (results_file, rank_file):
        if not needed.is_file():
            raise DaqkdError(f"--report-only: {needed} is missing: pass the --out of a sweep that has started")
    try:
        stored = json.loads(results_file.read_text())
    except (OSError, ValueError) as exc:
        raise DaqkdError(f"--report-only: {results_file} is unreadable ({exc})") from exc
    config = _stored_sweep_config(results_file, stored)
    old_meta = stored["meta"]
    default = args.default or config.get("default") or DEFAULT_DA
    config = {**config, "default": default}
    names = parse_candidates(config["augs"])
    ranking = stored_ranking(rank_file, names, fields=RANKING_FIELDS)
    assert ranking is not None  # checked above that the file is there
    seeds = [config["seed"] + i for i in range(config.get("seeds", 1))]
    trained = training_order(names, ranking, default)
    results = collect_finished(out, trained, seeds, config["epochs"], stored_wall_seconds(out))
    meta = {"title": sweep_title(ranking.get("images", 0), config), "device": str(old_meta.get("device", "?")),
            "command": str(old_meta.get("command", "?"))}
    analysis = SweepOutputs(out, ranking, names, default, config, meta).publish(results, len(trained) * len(seeds))
    print(f"daqkd sweep --report-only: {len(results)} finished runs in {out}")
    print_verdict(analysis, out)
    return analysis


def _stored_sweep_config(results_file: Path, stored: Any) -> dict[str, Any]:
    """results.json's ``config``, checked as a sweep's options (types and the ranges --report-only
    counts with), so that a foreign or hand-edited file is one line, not a traceback or a wrong report."""
    if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict) \
            or not isinstance(stored.get("meta"), dict):
        raise DaqkdError(f"--report-only: {results_file} is not a daqkd sweep's results.json (an object with "
                         "config and meta): pass the --out of a daqkd sweep")
    config = stored["config"]
    missing = [k for k in REPORT_CONFIG_KEYS if k not in config]
    if missing:
        raise DaqkdError(f"--report-only: {results_file} has a damaged config (no {missing[0]}): rerun the sweep "
                         "into a new --out")
    known = {f.name for f in dataclasses.fields(SweepOptions)}
    try:
        options = SweepOptions(**{k: v for k, v in config.items() if k in known})
    except DaqkdError as exc:
        what = str(exc).removeprefix("SweepOptions.")
        raise DaqkdError(f"--report-only: {results_file} has a damaged config ({what}): rerun the sweep into a "
                         "new --out") from exc
    for name in ("epochs", "seeds"):
        if getattr(options, name) < 1:
            raise DaqkdError(f"--report-only: {results_file} has a damaged config ({name} is "
                             f"{getattr(options, name)}, not at least 1): rerun the sweep into a new --out")
    return {**config, **{name: getattr(options, name) for name in (*REPORT_CONFIG_KEYS, "default")}}


def run_sweep(args: SweepOptions) -> dict[str, Any]:
    """Rank, train every pending student (resuming a killed one, skipping finished ones), write the
    outputs after every run; the final analysis."""
    if args.race:
        from .race import check_race_options

        check_race_options(args)
    if args.report_only:
        return report_only(args)
    if args.out is None:
        raise DaqkdError("pass --out DIR (the sweep's directory)")
    if args.teacher is None:
        raise DaqkdError("pass --teacher RUN (the teacher's run directory or checkpoint)")
    check_output(args.out, "directory")
    args.student().quant_config()
    if args.stop_at_epoch is not None:
        raise DaqkdError("stop_at_epoch is for one run: a sweep's students train the whole schedule (a race stops "
                         "them at its rungs)")
    args.train_config(args.default or DEFAULT_DA)  # epochs, batch size, --val-per-class: before --out is made
    if args.seeds < 1:
        raise DaqkdError(f"--seeds must be at least 1, got {args.seeds}")
    if args.devices is not None and args.device != "auto":
        raise DaqkdError("pass either --device (one device) or --devices (students spread over several)")
    devices = parse_devices(args.devices, args.device)
    jobs = args.jobs if args.jobs is not None else len(devices) if args.devices else 1
    if jobs < 1:
        raise DaqkdError(f"--jobs must be at least 1, got {jobs}")
    if jobs < len(devices):
        raise DaqkdError(f"--jobs {jobs} would leave devices of --devices {args.devices} idle: use --jobs "
                         f"{len(devices)} or more (students per device at once = jobs / devices)")
    if (jobs > 1 or args.devices) and launched_by_torchrun():
        raise DaqkdError("--jobs and --devices train students side by side on one machine: use them without "
                         "torchrun (one sweep per node: --shard K/N)")
    shard_index, shard_count = parse_shard(args.shard)
    augs = parse_candidates(args.augs)
    names = list(augs)
    out = Path(args.out)
    stored_sweep = None
    if (out / "results.json").is_file():
        with contextlib.suppress(OSError, ValueError, KeyError):
            stored_sweep = json.loads((out / "results.json").read_text())["config"]
    args = dataclasses.replace(args, default=args.default or (stored_sweep or {}).get("default") or DEFAULT_DA,
                               # every student holds out the same validation images: the sweep's seed draws them
                               val_seed=args.validation_seed if args.val_per_class is not None else None)
    check_candidate(args.default, "--default")
    check_same_configuration(out, args, stored_sweep)
    init_distributed()
    out.mkdir(parents=True, exist_ok=True)
    device = select_device(devices[0])
    data = args.load_splits()
    train = data.train
    main = is_main_process()

    rank_file = out / RANK_FILE
    ranking = stored_ranking(rank_file, names, fields=RANKING_FIELDS)
    if ranking is None:
        teacher, _ = load_teacher(args, train.num_classes, train.classes)
        ranking = rank_and_save(teacher, train, augs, args.seed, device, rank_file, main, args.controls == "all")
    if main:
        order = ", ".join(c["name"] for c in sorted(ranking["candidates"], key=lambda c: c["rank"]))
        print(f"daqkd sweep: ranking (best first): {order}; default {args.default}", flush=True)

    command = "daqkd " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    seeds = [args.seed + i for i in range(args.seeds)]
    ordered = training_order(names, ranking, args.default)
    if args.race:
        from .race import run_race

        return run_race(args, out, ranking, ordered, seeds, data, jobs, devices)
    total = len(ordered) * len(seeds)
    config = dataclasses.asdict(args)
    meta = {"title": sweep_title(ranking.get("images", len(train)), args), "device": str(device), "command": command}
    outputs = SweepOutputs(out, ranking, names, args.default, config, meta)
    wall_seconds_of = stored_wall_seconds(out)

    def finished_runs() -> list[dict[str, Any]]:
        """Every finished run on disk: other shards' too, when nodes share ``out``."""
        return collect_finished(out, ordered, seeds, args.epochs, wall_seconds_of)

    results = finished_runs()
    finished = {(r["aug"], r["seed"]) for r in results}
    # shards split an order that every node derives alike, whatever its ranking (a node that ranked on
    # other hardware may order near-ties differently); each trains its own students best-ranked first
    mine = {(aug, seed) for seed in seeds for aug in sorted(ordered)}
    mine = set(sorted(mine, key=lambda s: (s[1], s[0]))[shard_index::shard_count])
    students = [(aug, seed) for seed in seeds for aug in ordered if (aug, seed) in mine]
    pending: list[StudentOptions] = []
    for aug, seed in students:
        if (aug, seed) in finished:
            continue
        run = out / "runs" / run_name(aug, seed)
        run_args = args.student(aug=aug, seed=seed, out=str(run), resume=(run / STATE_FILE).is_file(),
                                device=devices[0])
        if not run_args.resume and run.exists():
            shutil.rmtree(run)  # a partial run without its resume state: start it afresh
        pending.append(run_args)
    if main and args.shard is not None:
        print(f"daqkd sweep: shard {shard_index}/{shard_count}: {len(pending)} of its {len(students)} students "
              "to train", flush=True)
    if main and results:
        outputs.publish(results, total)

    def record(run_args: StudentOptions, wall_seconds: float) -> None:
        nonlocal results
        run = Path(run_args.out)
        done = finished_run(run, args.epochs)
        if done is None:
            raise DaqkdError(f"{run} did not finish its {args.epochs} epochs")
        wall_seconds_of[run_args.aug, run_args.seed] = wall_seconds
        results = finished_runs()
        if main:
            print(f"{run.name} finished: top-1 {done['top1']:.2f}% ({len(results)}/{total})", flush=True)
            outputs.publish(results, total)

    train_students(pending, data, jobs, devices, record,
                   lambda run_args: f"{Path(run_args.out).name} ({len(results) + 1}/{total})")
    results = finished_runs()
    analysis = outputs.publish(results, total) if main else {}
    if main:
        print_verdict(analysis, out)
        if len(results) < total:
            print(f"{total - len(results)} of {total} runs are not finished (other shards?): when they are, "
                  f"`daqkd sweep --report-only --out {out}` rebuilds the whole report")
        elif args.shard is not None:  # another shard finishing at the same moment may have published last
            print(f"all {total} runs are finished; `daqkd sweep --report-only --out {out}` once every shard has "
                  "stopped gives the final report")
    return analysis
