"""Racing DA selection (`daqkd sweep --race`, `daqkd train --aug race`): successive halving
(Jamieson & Talwalkar, AISTATS 2016; asynchronous as ASHA in Li et al., MLSys 2020) over the
candidate DAs and the default, decided on a validation split held out of the training data.

Every student starts the full run's schedule (the cosine runs to ``--epochs``). At each rung, an
epoch given as a fraction of the schedule, every student still racing stops and is evaluated on
the validation split; the best ``--keep`` share of the DAs by mean validation top-1 over seeds
(and any within the seeds' noise of the last of them) go on by resuming from that epoch's state,
so a survivor ends bit-identical to the same run trained straight through. The winner is the best
DA at the last rung (the full schedule). No decision reads the test split: its figures are
reported beside the validation ones, never compared. The default races like any candidate, so
the race loses to it only by the noise of the validation estimate.

Written by hand: successive halving is a loop of a dozen lines over runs that daqkd already
trains and resumes exactly; hyperparameter libraries (Ray Tune, Optuna) would own the processes,
checkpoints and devices that the sweep runner manages.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import statistics
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .errors import DaqkdError
from .rundir import STATE_FILE, read_history, write_json_atomic, write_text_atomic
from .runtime import is_main_process
from .sweep_runner import run_name, train_students

RACE_FILE = "race.json"
RACE_REPORT = "race.md"


def parse_fraction(text: str, option: str) -> Fraction:
    """"1/3", "0.5" or "1" as a Fraction in (0, 1]."""
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise DaqkdError(f"{option}: {text.strip()!r} is not a fraction: give shares of the schedule such as "
                         "1/9,1/3,1") from None
    if not 0 < value <= 1:
        raise DaqkdError(f"{option}: {text.strip()} is not in (0, 1]: give shares of the schedule such as 1/9,1/3,1")
    return value


def rung_epochs(rungs: str, epochs: int) -> list[int]:
    """The epochs at which a race decides: each share of ``rungs`` (comma-separated, increasing,
    the last 1) times ``epochs``, rounded to the nearest epoch (at least 1). Two shares on one
    epoch are an error, not a silently shorter race."""
    shares = [parse_fraction(part, "--rungs") for part in rungs.split(",")]
    if any(b <= a for a, b in itertools.pairwise(shares)):
        raise DaqkdError(f"--rungs {rungs}: the shares must increase, e.g. 1/9,1/3,1")
    if shares[-1] != 1:
        raise DaqkdError(f"--rungs {rungs}: the last rung must be 1 (the full schedule, where the winner is chosen)")
    points = [max(1, math.floor(share * epochs + Fraction(1, 2))) for share in shares]
    for (share_a, a), (share_b, b) in zip(zip(shares, points), zip(shares[1:], points[1:])):
        if a == b:
            raise DaqkdError(f"--rungs {rungs}: {share_a} and {share_b} of {epochs} epochs both fall on epoch {a}: "
                             "use fewer rungs or more --epochs")
    return points


def parse_keep(keep: str) -> Fraction:
    """The share of DAs that go on at each rung, in (0, 1)."""
    value = parse_fraction(keep, "--keep")
    if value == 1:
        raise DaqkdError("--keep 1 keeps every DA at every rung (a full sweep): give a share below 1, e.g. 1/3")
    return value


@dataclass
class RungDecision:
    """One rung: the DAs ranked by mean validation top-1, and which go on."""

    epoch: int
    kept: list[str]
    cutoff: float  # the mean validation top-1 of the last DA kept by share
    tie_margin: float  # DAs within this of the cutoff go on too (points of top-1)


def tie_margin(standings: dict[str, list[float]]) -> float:
    """One standard error of the difference of two DAs' mean validation top-1: the seed standard
    deviation pooled over the DAs (each a sample of ``seeds`` runs) times sqrt(2 / seeds); 0 with one
    seed, where only exact ties go on together."""
    seeds = min(len(v) for v in standings.values())
    if seeds < 2:
        return 0.0
    squares = sum(sum((x - statistics.fmean(v)) ** 2 for x in v) for v in standings.values())
    dof = sum(len(v) - 1 for v in standings.values())
    return math.sqrt(squares / dof) * math.sqrt(2 / seeds)


def survivors(standings: dict[str, list[float]], keep: Fraction, epoch: int) -> RungDecision:
    """The DAs that go on from a rung: the best ceil(keep x DAs) by mean validation top-1 over seeds
    (``standings``: DA -> its seeds' validation top-1, %), and any whose mean is within
    :func:`tie_margin` of the last of them. Ties in the order break by name, the same every time."""
    means = {name: statistics.fmean(values) for name, values in standings.items()}
    order = sorted(means, key=lambda name: (-means[name], name))
    count = max(1, math.ceil(keep * len(order)))
    cutoff = means[order[count - 1]]
    margin = tie_margin(standings)
    kept = [name for name in order if means[name] >= cutoff - margin - 1e-9]
    return RungDecision(epoch, kept, cutoff, margin)


def reached(run: Path, epoch: int) -> dict[str, Any] | None:
    """The record of ``epoch`` in RUN/metrics.jsonl if it holds a validation figure, else None; an
    error if the run went past that epoch without one (it cannot take part in the race)."""
    history = read_history(run)
    record = next((h for h in history if h.get("epoch") == epoch), None)
    if record is not None and "val_top1" in record:
        return record
    if history and history[-1].get("epoch", 0) >= epoch:
        raise DaqkdError(f"{run} trained past epoch {epoch} without a validation figure there (a run of a full sweep "
                         "or without --val-per-class): race in another --out")
    return None


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "seeds": values}


def race_report(config: dict[str, Any], records: dict[tuple[str, int], dict[int, dict[str, Any]]],
                decisions: list[RungDecision], pick: str | None) -> dict[str, Any]:
    """race.json: each rung's standings (validation top-1 decides; test top-1 is reported only),
    the winner, the default's and the training-free pick's figures at the last rung they reached,
    and the cost in student-epochs next to a full sweep's.

    records: (DA, seed) -> epoch -> that epoch's metrics record, for the rungs each run reached."""
    seeds, epochs = config["seeds"], config["epochs"]
    rung_list = []
    for decision in decisions:
        rows = []
        names = sorted({aug for (aug, _), by_epoch in records.items() if decision.epoch in by_epoch})
        for name in names:
            at = [records[name, seed][decision.epoch] for seed in seeds
                  if decision.epoch in records.get((name, seed), {})]
            rows.append({"aug": name, "val_top1": _stats([r["val_top1"] for r in at]),
                         "test_top1": _stats([r["test_top1"] for r in at]), "kept": name in decision.kept})
        rows.sort(key=lambda row: (-row["val_top1"]["mean"], row["aug"]))
        rung_list.append({"epoch": decision.epoch, "standings": rows, "kept": decision.kept,
                          "cutoff": decision.cutoff, "tie_margin": decision.tie_margin})
    finished = bool(decisions) and decisions[-1].epoch == epochs

    def last_seen(name: str | None) -> dict[str, Any] | None:
        if name is None:
            return None
        for rung in reversed(rung_list):
            row = next((r for r in rung["standings"] if r["aug"] == name), None)
            if row is not None:
                return {"aug": name, "epoch": rung["epoch"], "val_top1": row["val_top1"],
                        "test_top1": row["test_top1"]}
        return None

    winner = last_seen(decisions[-1].kept[0]) if finished else None
    student_epochs = sum(max(by_epoch) for by_epoch in records.values() if by_epoch)
    full = len(config["candidates"]) * len(seeds) * epochs
    return {"config": config, "rungs": rung_list, "finished": finished, "winner": winner,
            "default": last_seen(config["default"]), "metric_pick": last_seen(pick),
            "cost": {"student_epochs": student_epochs, "full_sweep_student_epochs": full,
                     "ratio": student_epochs / full}}


def _pct(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "n/a"
    spread = f" ({', '.join(f'{v:.2f}' for v in stats['seeds'])})" if len(stats["seeds"]) > 1 else ""
    return f"{stats['mean']:.2f}%{spread}"


def race_markdown(report: dict[str, Any]) -> str:
    """race.md: what was decided at each rung and what it cost."""
    config, cost = report["config"], report["cost"]
    lines = [(f"# Race: {len(config['candidates'])} DAs (default {config['default']}), rungs at epochs "
             f"{', '.join(map(str, config['rung_epochs']))} of {config['epochs']}, keep {config['keep']}"), "",
             (f"Decided on the validation split ({config['val_per_class']} images per class held out of the train "
             f"split, seed {config['val_seed']}), mean over seeds {', '.join(map(str, config['seeds']))}; test top-1 "
             "is reported, never used."), ""]
    winner = report["winner"]
    if winner is None:
        lines += ["**Not finished**: rerun the same command to go on.", ""]
    else:
        lines += [(f"**Winner: {winner['aug']}**, validation top-1 {_pct(winner['val_top1'])}, test top-1 "
                  f"{_pct(winner['test_top1'])} after {winner['epoch']} epochs."), ""]
    lines += ["| | DA | reached epoch | validation top-1 | test top-1 |", "|---|---|---|---|---|"]
    for label, key in (("winner", "winner"), ("default", "default"), ("training-free pick", "metric_pick")):
        row = report[key]
        if row is not None:
            lines.append(f"| {label} | {row['aug']} | {row['epoch']} | {_pct(row['val_top1'])} | "
                         f"{_pct(row['test_top1'])} |")
    lines += ["", (f"Cost: {cost['student_epochs']} student-epochs, {cost['ratio']:.2f} of a full sweep's "
              f"{cost['full_sweep_student_epochs']}."), ""]
    for rung in report["rungs"]:
        lines += [(f"## Epoch {rung['epoch']}: {len(rung['kept'])} of {len(rung['standings'])} go on "
                  f"(cutoff {rung['cutoff']:.2f}%, tie margin {rung['tie_margin']:.2f} points)"), "",
                  "| DA | validation top-1 | test top-1 (not used) | goes on |", "|---|---|---|---|"]
        for row in rung["standings"]:
            lines.append(f"| {row['aug']} | {_pct(row['val_top1'])} | {_pct(row['test_top1'])} | "
                         f"{'yes' if row['kept'] else ''} |")
        lines.append("")
    return "\n".join(lines)


def write_race(out: Path, report: dict[str, Any]) -> None:
    write_json_atomic(out / RACE_FILE, report)
    write_text_atomic(out / RACE_REPORT, race_markdown(report))


def check_race_options(args: Any) -> None:
    """What a race needs, checked before anything is loaded: a validation split, valid rungs and
    keep, one node (every rung compares all students)."""
    if args.val_per_class is None:
        raise DaqkdError("--race decides on a validation split, never the test split: pass --val-per-class K "
                         "(e.g. 50 images per class held out of the train split)")
    if args.shard is not None:
        raise DaqkdError("--race compares every student at each rung, which one shard cannot see: race on one node "
                         "(--jobs and --devices spread the students over its devices)")
    if args.report_only:
        raise DaqkdError("--report-only rebuilds a full sweep's report; a race rewrites race.json and race.md when "
                         "its command is rerun (finished rungs are not trained again)")
    rung_epochs(args.rungs, args.epochs)
    parse_keep(args.keep)


# what race.json records of the command, and what a rerun in the same --out must repeat
RACE_SETTINGS = ("candidates", "default", "seeds", "epochs", "rungs", "rung_epochs", "keep", "val_per_class",
                 "val_seed")


def _check_stored_race(out: Path, config: dict[str, Any]) -> None:
    path = out / RACE_FILE
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text())["config"]
        differences = {k: (stored[k], config[k]) for k in RACE_SETTINGS
                       if (sorted(stored[k]) if k == "candidates" else stored[k])
                       != (sorted(config[k]) if k == "candidates" else config[k])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DaqkdError(f"{path} is not a daqkd race ({type(exc).__name__}: {exc}): delete it or use another "
                         "--out") from exc
    if differences:
        listed = ", ".join(f"{k} {v[0]!r} (now {v[1]!r})" for k, v in differences.items())
        raise DaqkdError(f"{out} holds a race run with other settings: {listed}; rerun with those or use another "
                         "--out")


def run_race(args: Any, out: Path, ranking: dict[str, Any], ordered: list[str], seeds: list[int], data: Any,
             jobs: int, devices: list[str]) -> dict[str, Any]:
    """Race ``ordered`` (the candidates and the default) x ``seeds`` in ``out``: train to each rung
    (resuming what is there), decide on the validation split, write race.json and race.md after
    every rung; returns the race report. Rerunning it redoes no finished rung: the decisions are
    recomputed from the runs' metrics, which are deterministic."""

    epochs_at = rung_epochs(args.rungs, args.epochs)
    keep = parse_keep(args.keep)
    config = {"candidates": list(ordered), "default": args.default, "seeds": seeds, "epochs": args.epochs,
              "rungs": args.rungs, "rung_epochs": epochs_at, "keep": args.keep, "val_per_class": args.val_per_class,
              "val_seed": args.val_seed}
    _check_stored_race(out, config)
    main = is_main_process()
    alive = list(ordered)
    decisions: list[RungDecision] = []
    records: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    report: dict[str, Any] = {}
    for index, epoch in enumerate(epochs_at):
        pending = []
        for seed in seeds:
            for aug in alive:
                run = out / "runs" / run_name(aug, seed)
                if reached(run, epoch) is not None:
                    continue
                resume = (run / STATE_FILE).is_file()
                if not resume and run.exists() and main:
                    shutil.rmtree(run)  # a partial run without its resume state starts afresh
                pending.append(args.student(aug=aug, seed=seed, out=str(run), resume=resume, device=devices[0],
                                            stop_at_epoch=epoch))
        if main:
            print(f"daqkd sweep --race: rung {index + 1}/{len(epochs_at)} at epoch {epoch} of {args.epochs}: "
                  f"{len(alive)} DA(s) x {len(seeds)} seed(s), {len(pending)} run(s) to train", flush=True)
        train_students(pending, data, jobs, devices, lambda _run, _seconds: None,
                       lambda run_args: f"{Path(run_args.out).name} to epoch {run_args.stop_at_epoch}")
        if dist.is_initialized():
            dist.barrier()  # the main process has written every run's metrics before anyone reads them
        standings: dict[str, list[float]] = {}
        for aug in alive:
            for seed in seeds:
                record = reached(out / "runs" / run_name(aug, seed), epoch)
                if record is None:
                    raise DaqkdError(f"{out / 'runs' / run_name(aug, seed)} did not reach epoch {epoch}")
                records.setdefault((aug, seed), {})[epoch] = record
                standings.setdefault(aug, []).append(record["val_top1"])
        last = index == len(epochs_at) - 1
        decision = survivors(standings, Fraction(1, len(alive)) if last else keep, epoch)
        decisions.append(decision)
        alive = decision.kept
        report = race_report(config, records, decisions, ranking.get("selected"))
        if main:
            write_race(out, report)
            verb = "tied with the best" if last else "go on"
            print(f"epoch {epoch}: {', '.join(decision.kept)} {verb} (validation top-1 cutoff {decision.cutoff:.2f}%, "
                  f"tie margin {decision.tie_margin:.2f})", flush=True)
    if main:
        winner, default, cost = report["winner"], report["default"], report["cost"]
        print(f"race winner {winner['aug']}: validation top-1 {_pct(winner['val_top1'])}, test top-1 "
              f"{_pct(winner['test_top1'])}; default {default['aug']} (to epoch {default['epoch']}): validation "
              f"{_pct(default['val_top1'])}, test {_pct(default['test_top1'])}")
        print(f"cost {cost['student_epochs']} student-epochs, {cost['ratio']:.2f} of a full sweep; wrote "
              f"{out / RACE_FILE}, {out / RACE_REPORT}")
    return report
