"""Does the metric pick the best DA? Rank the candidates once, train one student per (DA, seed),
and compare the ranking with the students' accuracy: the paper's Figure 1 (Kur & Zhao, 2025).

The analysis here is pure (results in, figures and text out) so the report can be rebuilt from
results.json at any point of a partial sweep; cli_sweep drives the runs.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Correlation:
    """Rank correlation between a ranking figure (score or variance) and the students' top-1.

    Both figures rank DAs "lower is better", so a metric that predicts accuracy correlates
    negatively: rho and tau near -1."""

    spearman: float
    spearman_p: float
    kendall: float
    kendall_p: float
    n: int


def correlation(figure: list[float], accuracy: list[float]) -> Correlation | None:
    """Spearman's rho and Kendall's tau with their two-sided p-values (scipy); None below 3 points."""
    if len(figure) < 3:
        return None
    from scipy import stats

    rho = stats.spearmanr(figure, accuracy)
    tau = stats.kendalltau(figure, accuracy)
    return Correlation(_finite(rho.statistic), _finite(rho.pvalue), _finite(tau.statistic), _finite(tau.pvalue),
                       len(figure))


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else float("nan")


def per_candidate(ranking: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per candidate that has at least one finished run: its ranking figures and the mean
    (and standard deviation over seeds) of its students' final test top-1, in ranking order."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_name.setdefault(run["aug"], []).append(run)
    rows = []
    for cand in sorted(ranking["candidates"], key=lambda c: c["rank"]):
        finished = by_name.get(cand["name"], [])
        if not finished:
            continue
        top1 = [r["top1"] for r in finished]
        rows.append({
            "name": cand["name"], "rank": cand["rank"], "variance_rank": cand["variance_rank"],
            "score": cand["score"], "variance": cand["variance"], "cmi": cand["cmi"],
            "centroid_ce": cand["centroid_ce"], "teacher_accuracy": cand["accuracy"],
            "top1": statistics.fmean(top1), "top1_std": statistics.stdev(top1) if len(top1) > 1 else None,
            "best_top1": statistics.fmean(r["best_top1"] for r in finished), "seeds": sorted(r["seed"] for r in finished),
        })
    return rows


def analyze(ranking: dict[str, Any], runs: list[dict[str, Any]], candidates: list[str]) -> dict[str, Any]:
    """Correlations, the picks of each ranking and their students' accuracy.

    The picks are made among ``candidates`` (the swept DAs), from the ranking alone; their accuracy
    is known once their runs are finished."""
    rows = per_candidate(ranking, runs)
    swept = [c for c in ranking["candidates"] if c["name"] in candidates]
    metric_pick = min(swept, key=lambda c: c["score"])["name"] if swept else None
    variance_pick = min(swept, key=lambda c: c["variance"])["name"] if swept else None
    accuracy = {r["name"]: r["top1"] for r in rows}
    summary: dict[str, Any] = {
        "candidates_finished": len(rows), "candidates_swept": len(candidates),
        "metric_pick": metric_pick, "metric_pick_top1": accuracy.get(metric_pick),
        "variance_pick": variance_pick, "variance_pick_top1": accuracy.get(variance_pick),
    }
    baseline = next((n for n in accuracy if n.split("+")[0] == "none"), None)
    summary["none"] = baseline
    summary["none_top1"] = accuracy.get(baseline) if baseline else None
    if rows:
        best = max(rows, key=lambda r: r["top1"])
        worst = min(rows, key=lambda r: r["top1"])
        summary.update(best=best["name"], best_top1=best["top1"], worst=worst["name"], worst_top1=worst["top1"])
    for key, figure in (("metric", "score"), ("variance", "variance")):
        corr = correlation([r[figure] for r in rows], [r["top1"] for r in rows])
        summary[f"{key}_correlation"] = corr.__dict__ if corr else None
    return {"candidates": rows, "summary": summary}


def place_labels(fig: Any, ax: Any, points: list[tuple[str, float, float]]) -> None:
    """Annotate each (label, x, y) inside the axes, moving a label below or further up where it
    would overlap one already placed (DAs often tie in accuracy)."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed: list[Any] = []
    for label, x, y in sorted(points, key=lambda p: p[1]):
        choice = None
        for dy in (4, -11, 15, -22, 26):
            for dx, align in ((5, "left"), (-5, "right")):  # right of the point, else left of it
                text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8, ha=align)
                box = text.get_window_extent(renderer)
                inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                if inside and not any(box.overlaps(other) for other in placed):
                    choice = (text, box)
                    break
                text.remove()
            if choice:
                break
        if choice is None:  # crowded: the default place
            text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
            choice = (text, text.get_window_extent(renderer))
        placed.append(choice[1])


def scatter_plot(analysis: dict[str, Any], path: str | Path, title: str) -> None:
    """The paper's Figure 1: student top-1 against the metric's score, one labelled point per DA,
    with horizontal lines at the accuracy of the metric's pick and of the variance baseline's pick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = analysis["candidates"]
    summary = analysis["summary"]
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=130)
    xs = [r["score"] for r in rows]
    ys = [r["top1"] for r in rows]
    errors = [r["top1_std"] or 0.0 for r in rows]
    ax.errorbar(xs, ys, yerr=errors if any(errors) else None, fmt="o", color="tab:blue", capsize=3, zorder=3)
    if summary.get("metric_pick_top1") is not None:
        ax.axhline(summary["metric_pick_top1"], color="tab:green", linestyle="--",
                   label=f"metric's pick: {summary['metric_pick']} ({summary['metric_pick_top1']:.2f}%)")
    if summary.get("variance_pick_top1") is not None:
        ax.axhline(summary["variance_pick_top1"], color="tab:red", linestyle=":",
                   label=f"variance pick: {summary['variance_pick']} ({summary['variance_pick_top1']:.2f}%)")
    corr = summary.get("metric_correlation")
    if corr:
        ax.text(0.02, 0.02, f"Spearman {corr['spearman']:+.2f} (p={corr['spearman_p']:.2g}), "
                f"Kendall {corr['kendall']:+.2f} (p={corr['kendall_p']:.2g})",
                transform=ax.transAxes, fontsize=8, color="0.3")
    ax.set_xlabel("metric score = centroid CE - CMI (lower is better)")
    ax.set_ylabel("student test top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    ax.autoscale_view()  # final limits and layout first: the overlap test works in pixels
    place_labels(fig, ax, [(r["name"], r["score"], r["top1"]) for r in rows])
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def _corr_line(name: str, corr: dict[str, Any] | None) -> str:
    if not corr:
        return f"| {name} | n/a | n/a | n/a | n/a |"
    return (f"| {name} | {corr['spearman']:+.3f} | {corr['spearman_p']:.3g} | "
            f"{corr['kendall']:+.3f} | {corr['kendall_p']:.3g} |")


def report_markdown(analysis: dict[str, Any], meta: dict[str, Any]) -> str:
    """report.md: the setting, the correlations, the picks and every candidate's figures."""
    s = analysis["summary"]
    lines = [
        f"# daqkd sweep: {meta['title']}",
        "",
        (f"Finished {s['candidates_finished']} of {s['candidates_swept']} candidates "
         f"({meta['runs_finished']} of {meta['runs_total']} runs), {meta['train_seconds'] / 3600:.2f} h of training "
         f"on {meta['device']}. Command: `{meta['command']}`"),
        "",
        "## Does the ranking predict the students' accuracy?",
        "",
        ("Both figures rank DAs lower-is-better, so a ranking that predicts accuracy correlates negatively with "
         "top-1 (rho, tau near -1)."),
        "",
        "| ranking | Spearman rho | p | Kendall tau | p |",
        "|---|---|---|---|---|",
        _corr_line("metric (centroid CE - CMI)", s.get("metric_correlation")),
        _corr_line("variance (Wang et al. 2022)", s.get("variance_correlation")),
        "",
        "## Picks",
        "",
        "| | DA | student top-1 |",
        "|---|---|---|",
        f"| metric's pick | {s['metric_pick']} | {_pct(s.get('metric_pick_top1'))} |",
        f"| variance pick | {s['variance_pick']} | {_pct(s.get('variance_pick_top1'))} |",
        f"| none (crop + flip) | {s.get('none') or 'n/a'} | {_pct(s.get('none_top1'))} |",
        f"| best DA | {s.get('best', 'n/a')} | {_pct(s.get('best_top1'))} |",
        f"| worst DA | {s.get('worst', 'n/a')} | {_pct(s.get('worst_top1'))} |",
        "",
        "## Candidates (ranking order)",
        "",
        "| rank | DA | score | centroid CE | CMI | variance | var. rank | teacher acc. | student top-1 | best-epoch top-1 | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in analysis["candidates"]:
        std = f" ± {r['top1_std']:.2f}" if r["top1_std"] is not None else ""
        lines.append(
            f"| {r['rank']} | {r['name']} | {r['score']:.4f} | {r['centroid_ce']:.4f} | {r['cmi']:.4f} | "
            f"{r['variance']:.5f} | {r['variance_rank']} | {100 * r['teacher_accuracy']:.2f}% | "
            f"{r['top1']:.2f}%{std} | {r['best_top1']:.2f}% | {len(r['seeds'])} |")
    lines += ["", ("Student top-1 is the test top-1 after the last epoch (mean over seeds), not the best epoch's, "
                   "so no test-set selection enters the comparison."), "", "![scatter](scatter.png)", ""]
    return "\n".join(lines)
