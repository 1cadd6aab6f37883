"""Does the metric pick the best DA? Rank the candidates once, train one student per (DA, seed),
and compare the ranking with the students' accuracy: the paper's Figure 1 (Kur & Zhao, 2025).

The analysis here is pure (results in, figures and text out) so the report can be rebuilt from
results.json at any point of a partial sweep; sweep_runner drives the runs.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .metric import score_formula, variance_standard_error
from .rundir import atomic_path
from .stats import Correlation, Gain, disagreement_test, friedman_test, paired_gain, rank_correlation

# Each control ranks the candidates from the teacher's predictions alone: (the ranking's figure,
# which direction the control prefers). The score rewards CMI, so "CMI alone" prefers high CMI.
CONTROLS: dict[str, tuple[str, str]] = {
    "score": ("score", "lower"),
    "teacher_accuracy": ("teacher_accuracy", "higher"),
    "centroid_ce": ("centroid_ce", "lower"),
    "cmi": ("cmi", "higher"),
    "sample_score": ("sample_score", "lower"),
    "variance": ("variance", "lower"),
    "authors_score": ("authors_score", "lower"),
}
CONTROL_LABELS = {
    "score": "metric score (centroid CE - CMI)", "teacher_accuracy": "teacher accuracy under the DA",
    "centroid_ce": "centroid CE alone", "cmi": "CMI alone", "sample_score": "per-sample score (CE - CMI)",
    "variance": "variance (Wang et al. 2022)", "authors_score": "authors' computation (reproduction)",
}


def control_label(name: str, analysis: dict[str, Any]) -> str:
    """CONTROL_LABELS[name], with the score's formula as the sweep's ranking computed it (--score,
    --cmi-weight); results.json files written before the formula was recorded used the defaults."""
    if name == "score" and "score_formula" in analysis:
        return f"metric score ({analysis['score_formula']})"
    if name == "sample_score" and "sample_score_formula" in analysis:
        return f"per-sample score ({analysis['sample_score_formula']})"
    return CONTROL_LABELS[name]


MIN_SEEDS = 3  # below this a paired comparison gets a warning


def correlation(figure: list[float], accuracy: list[float]) -> Correlation | None:
    """Spearman's rho and Kendall's tau with two-sided p-values (exact permutation for n <= 10);
    None below 3 points."""
    return rank_correlation(figure, accuracy)


# what ranking_figures and per_candidate read from each candidate of a rank.json
RANKING_FIELDS = ("rank", "score", "accuracy", "centroid_ce", "cmi")


def ranking_figures(
    cand: dict[str, Any], cmi_weight: float, images: int | None, group_size: int | None
) -> dict[str, Any]:
    """The controls of one ranked candidate, filling in what older rank.json files lack
    (sample_score from ce and cmi; the variance's group count and standard error)."""
    sample = cand.get("sample_score")
    if sample is None and cand.get("ce") is not None:
        sample = cand["ce"] - cmi_weight * cand["cmi"]
    groups = cand.get("variance_groups")
    if groups is None and images and group_size:
        groups = images // group_size
    variance_se = cand.get("variance_se")
    if variance_se is None and cand.get("variance") is not None and groups:
        variance_se = variance_standard_error(cand["variance"], groups)
    return {"score": cand["score"], "score_se": cand.get("score_se"), "teacher_accuracy": cand["accuracy"],
            "centroid_ce": cand["centroid_ce"],
            "cmi": cand["cmi"], "ce": cand.get("ce"), "sample_score": sample, "variance": cand.get("variance"),
            "variance_groups": groups, "variance_se": variance_se, "authors_score": cand.get("authors_score")}


def per_candidate(ranking: dict[str, Any], runs: list[dict[str, Any]],
                  default: str | None = None) -> list[dict[str, Any]]:
    """One row per DA that has at least one finished run: its ranking figures (None for a default
    that is not a candidate) and the mean (and standard deviation over seeds) of its students'
    final test top-1; candidates in ranking order, then the default."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_name.setdefault(run["aug"], []).append(run)
    cmi_weight = ranking.get("config", {}).get("cmi_weight", 1.0)
    ranked = sorted(ranking["candidates"], key=lambda c: c["rank"])
    entries: list[tuple[str, dict[str, Any] | None]] = [(c["name"], c) for c in ranked]
    if default is not None and all(c["name"] != default for c in ranked):
        entries.append((default, None))
    rows = []
    for name, cand in entries:
        finished = sorted(by_name.get(name, []), key=lambda r: r["seed"])
        if not finished:
            continue
        top1 = [r["top1"] for r in finished]
        row: dict[str, Any] = {"name": name, "candidate": cand is not None, "default": name == default,
                               "rank": cand["rank"] if cand else None,
                               "variance_rank": cand.get("variance_rank") if cand else None}
        row.update(ranking_figures(cand, cmi_weight, ranking.get("images"), ranking.get("variance_group"))
                   if cand else dict.fromkeys(CONTROLS))
        row.update({
            "top1": statistics.fmean(top1), "top1_std": statistics.stdev(top1) if len(top1) > 1 else None,
            "top1_by_seed": {str(r["seed"]): r["top1"] for r in finished},
            "best_top1": statistics.fmean(r["best_top1"] for r in finished), "seeds": [r["seed"] for r in finished],
        })
        rows.append(row)
    return rows


def _seed_table(runs: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """seed -> DA -> final top-1."""
    table: dict[int, dict[str, float]] = {}
    for run in runs:
        table.setdefault(run["seed"], {})[run["aug"]] = run["top1"]
    return table


def _gain_dict(gain: Gain | None) -> dict[str, Any] | None:
    if gain is None:
        return None
    return {"mean": gain.mean, "ci95": list(gain.ci95) if gain.ci95 else None, "seeds": gain.seeds,
            "differences": gain.differences}


def das_differ(by_seed: dict[int, dict[str, float]], names: list[str]) -> dict[str, Any] | None:
    """Whether the DAs ``names`` differ at all beyond seed noise, over the seeds where every one
    finished: Friedman's test (stats.friedman_test; seeds as blocks) and two plain figures, the
    span of the DA means and the median over DAs of their seed-to-seed standard deviation. None
    below 2 such seeds."""
    complete = [t for _, t in sorted(by_seed.items()) if all(n in t for n in names)]
    test = friedman_test([[t[n] for n in names] for t in complete]) if len(complete) >= 2 else None
    if test is None:
        return None
    means = [statistics.fmean(t[n] for t in complete) for n in names]
    spread = statistics.median(statistics.stdev(t[n] for t in complete) for n in names)
    return {"statistic": test.statistic, "df": test.df, "p": test.p, "p_method": test.p_method,
            "asymptotic_p": test.asymptotic_p, "das": len(names), "seeds": len(complete),
            "mean_span": max(means) - min(means), "median_seed_sd": spread}


# the controls the score is tested against where they order a pair of candidates differently
DISAGREEMENT_CONTROLS = ("teacher_accuracy", "variance")


def disagreement(cand_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """For each control of DISAGREEMENT_CONTROLS: the pairs of trained candidates that the score and
    the control order oppositely, and the share in which the students (mean final top-1 over
    seeds) side with the score, with its permutation p (stats.disagreement_test). The direct test
    of "the metric adds something beyond the control"; a control the ranking lacks is left out."""
    out: dict[str, Any] = {}
    score_better = CONTROLS["score"][1]
    for name in DISAGREEMENT_CONTROLS:
        key, better = CONTROLS[name]
        rows = [r for r in cand_rows if r.get(key) is not None and not math.isnan(r[key])]
        if len(rows) < len(cand_rows) or len(rows) < 2:
            continue
        test = disagreement_test([r["score"] for r in rows], score_better, [r[key] for r in rows], better,
                                 [r["top1"] for r in rows])
        sides = {1: "score", 0: "tie", -1: name}
        out[name] = {
            "pairs": test.pairs, "students_side_with_score": test.sides_with_a, "share": test.share, "p": test.p,
            "p_method": test.p_method, "candidates": len(rows),
            "pair_list": [{"score_prefers": rows[i]["name"], "control_prefers": rows[j]["name"],
                           "students_side_with": sides[o]} for i, j, o in test.pair_list],
        }
    return out


def _corr_dict(corr: Correlation | None, better: str | None = None) -> dict[str, Any] | None:
    if corr is None:
        return None
    out = {"spearman": corr.spearman, "spearman_p": corr.spearman_p, "kendall": corr.kendall,
           "kendall_p": corr.kendall_p, "n": corr.n, "p_method": corr.p_method}
    exact = corr.p_method == "exact permutation"
    out["spearman_p_exact"] = corr.spearman_p if exact else None
    out["kendall_p_exact"] = corr.kendall_p if exact else None
    if better is not None:
        out["better"] = better
        # a control predicts accuracy when the DAs it prefers train better students
        out["direction"] = ("n/a" if math.isnan(corr.spearman) else "none" if corr.spearman == 0 else
                            "as predicted" if (corr.spearman < 0) == (better == "lower") else "opposite")
    return out


def _pick(cands: list[dict[str, Any]], key: str, better: str) -> str | None:
    usable = [c for c in cands if c.get(key) is not None and not math.isnan(c[key])]
    if not usable:
        return None
    choose = min if better == "lower" else max
    return choose(usable, key=lambda c: c[key])["name"]


def analyze(ranking: dict[str, Any], runs: list[dict[str, Any]], candidates: list[str],
            default: str | None = None) -> dict[str, Any]:
    """The verdict of a sweep: correlations of every control with the students' top-1, the picks,
    the gains of the metric's pick over the default and over the median candidate, warnings.

    The picks are made among ``candidates`` (the swept DAs) from the ranking alone; ``default`` is
    the DA trained for comparison whether or not it is a candidate (it never enters the
    correlations unless it is a candidate). Pure: results in, results out."""
    rows = per_candidate(ranking, runs, default)
    cmi_weight = ranking.get("config", {}).get("cmi_weight", 1.0)
    score_kind = ranking.get("config", {}).get("score", "paper")
    swept = [{"name": c["name"], **ranking_figures(c, cmi_weight, ranking.get("images"), ranking.get("variance_group"))}
             for c in ranking["candidates"] if c["name"] in candidates]
    picks = {name: _pick(swept, key, better) for name, (key, better) in CONTROLS.items()}
    no_cmi_key = "centroid_ce" if score_kind == "paper" else "ce"
    picks["score_without_cmi"] = _pick(swept, no_cmi_key, "lower")
    accuracy = {r["name"]: r["top1"] for r in rows}
    cand_rows = [r for r in rows if r["candidate"]]

    summary: dict[str, Any] = {
        "candidates_finished": len(cand_rows), "candidates_swept": len(candidates),
        "metric_pick": picks["score"], "metric_pick_top1": accuracy.get(picks["score"]),
        "variance_pick": picks["variance"], "variance_pick_top1": accuracy.get(picks["variance"]),
        "teacher_accuracy_pick": picks["teacher_accuracy"],
        "teacher_accuracy_pick_top1": accuracy.get(picks["teacher_accuracy"]),
        "score_without_cmi_pick": picks["score_without_cmi"],
        "default": default, "default_top1": accuracy.get(default) if default else None,
    }
    if cand_rows:
        best = max(cand_rows, key=lambda r: r["top1"])
        worst = min(cand_rows, key=lambda r: r["top1"])
        summary.update(best=best["name"], best_top1=best["top1"], worst=worst["name"], worst_top1=worst["top1"])

    controls: dict[str, Any] = {}
    for name, (key, better) in CONTROLS.items():
        pairs = [(r[key], r["top1"]) for r in cand_rows if r.get(key) is not None and not math.isnan(r[key])]
        if len(pairs) < len(cand_rows) or not pairs:
            continue  # a control the ranking did not compute (authors_score unless asked)
        corr = correlation([p[0] for p in pairs], [p[1] for p in pairs])
        if corr is not None:
            controls[name] = _corr_dict(corr, better)
    summary["metric_correlation"] = controls.get("score")
    summary["variance_correlation"] = controls.get("variance")

    by_seed = _seed_table(runs)
    pick = picks["score"]
    vs_default = [t[pick] - t[default] for _, t in sorted(by_seed.items()) if pick in t and default in t]
    vs_median = [t[pick] - statistics.median(t[c] for c in candidates) for _, t in sorted(by_seed.items())
                 if all(c in t for c in candidates)]
    gain = {"pick_vs_default": _gain_dict(paired_gain(vs_default)),
            "pick_vs_median": _gain_dict(paired_gain(vs_median))}

    agreement = correlation([c["score"] for c in swept], [c["teacher_accuracy"] for c in swept])
    trained = [*candidates, *([default] if default is not None and default not in candidates else [])]
    analysis = {"candidates": rows, "summary": summary, "default": default, "controls": controls, "gain": gain,
                "disagreement": disagreement(cand_rows),
                "das_differ": das_differ(by_seed, trained),
                "score_formula": score_formula(score_kind, cmi_weight),
                "sample_score_formula": score_formula("sample", cmi_weight),
                "score_vs_teacher_accuracy_spearman": agreement.spearman if agreement else None,
                "score_vs_teacher_accuracy": _corr_dict(agreement)}
    analysis["verdict"], analysis["warnings"] = verdict_lines(analysis, picks)
    if ranking.get("stability"):
        analysis["verdict"].append(f"The ranking itself: {ranking['stability']['text']}.")
    return analysis


def _fmt_gain(g: dict[str, Any]) -> str:
    ci = g["ci95"]
    if not ci:
        return f"{g['mean']:+.2f} points (1 seed, no interval)"
    return f"{g['mean']:+.2f} points (95% CI [{ci[0]:+.2f}, {ci[1]:+.2f}], {g['seeds']} seeds)"


def verdict_lines(analysis: dict[str, Any], picks: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """Plain sentences for the report's verdict, and its warnings."""
    s, gain, lines, warnings = analysis["summary"], analysis["gain"], [], []
    pick, default = picks["score"], analysis["default"]
    if default is not None:
        g = gain["pick_vs_default"]
        if pick == default:
            lines.append(
                f"The metric's pick is the default ({default}): its gain over the default is 0 by construction."
            )
        elif g is None:
            lines.append(f"The metric's pick {pick} vs the default {default}: not measured (no seed has both runs).")
            warnings.append(f"pick vs default not measured: train the default {default} (the same `daqkd sweep` "
                            "command trains it)")
        else:
            lines.append(f"The metric's pick {pick} vs the default {default}: {_fmt_gain(g)}.")
        if g is not None and pick != default:
            if g["seeds"] < MIN_SEEDS:
                warnings.append(f"pick vs default rests on {g['seeds']} seed(s); at least {MIN_SEEDS} are needed to "
                                "judge it (run the same command with a larger --seeds)")
            if g["ci95"] is not None and g["ci95"][0] <= 0.0 <= g["ci95"][1]:
                warnings.append("pick vs default: the interval contains 0, the difference is within noise")
    else:
        warnings.append("no default DA was trained: the pick cannot be compared with the default")
    g = gain["pick_vs_median"]
    if g is None:
        lines.append("The metric's pick vs the median candidate: not measured (no seed has every candidate).")
    else:
        lines.append(f"The metric's pick vs the median candidate: {_fmt_gain(g)}.")
        if g["seeds"] < MIN_SEEDS:
            warnings.append(f"pick vs median rests on {g['seeds']} seed(s); at least {MIN_SEEDS} are needed")
        if g["ci95"] is not None and g["ci95"][0] <= 0.0 <= g["ci95"][1]:
            warnings.append("pick vs median: the interval contains 0, the difference is within noise")
    agree = analysis["score_vs_teacher_accuracy"]
    if agree is not None:
        lines.append(f"The score's ranking against the teacher-accuracy ranking: Spearman {agree['spearman']:+.3f} "
                     f"over {agree['n']} candidates.")
    acc_pick = picks["teacher_accuracy"]
    lines.append(
        f"The metric's pick {'is the same as' if pick == acc_pick else 'differs from'} the pick of teacher "
        f"accuracy ({acc_pick}); the CMI term {'did not change' if pick == picks['score_without_cmi'] else 'changed'}"
        f" the pick (without it: {picks['score_without_cmi']})."
    )
    # scipy's rho of two equal orders can be -0.9999999999999999 (n = 5, 10): compare with a tolerance
    if agree is not None and agree["spearman"] <= -1.0 + 1e-9:
        lines.append("The score orders the candidates exactly as the teacher's accuracy under each DA does, so this "
                     "sweep cannot credit the metric with anything beyond that control.")
    ctrl = analysis["controls"]
    if "score" in ctrl and "teacher_accuracy" in ctrl:
        sc, ta = ctrl["score"], ctrl["teacher_accuracy"]
        lines.append(f"Against student top-1: score Spearman {sc['spearman']:+.3f} (p {sc['spearman_p']:.3g}), teacher "
                     f"accuracy {ta['spearman']:+.3f} (p {ta['spearman_p']:.3g}), {sc['p_method']} p-values.")
    for name, test in analysis.get("disagreement", {}).items():
        label = control_label(name, analysis)
        if test["pairs"] == 0:
            lines.append(f"The score and {label} order every pair of trained candidates alike: no pair can tell "
                         "them apart.")
            continue
        follow = ("the score" if test["share"] > 0.5 else label if test["share"] < 0.5 else "neither")
        significant = test["p"] < 0.05 and test["share"] != 0.5
        lines.append(
            f"Where the score and {label} disagree ({test['pairs']} pair{'' if test['pairs'] == 1 else 's'} of "
            f"candidates), the students side with the score in {test['students_side_with_score']:g} "
            f"({100 * test['share']:.0f} %): p {test['p']:.3g} "
            f"({test['p_method']}); " + (f"the students follow {follow}." if significant else
                                         f"{'they lean to ' + follow if follow != 'neither' else 'an even split'}, "
                                         "within noise."))
        if test["pairs"] < 5:
            warnings.append(f"only {test['pairs']} pair(s) where the score and {label} disagree: too few to "
                            "credit either")
    differ = analysis.get("das_differ")
    if differ is not None:
        lines.append(
            f"Do the DAs differ at all? Friedman over {differ['das']} DAs{' (the default included)' if default else ''}"
            f" x {differ['seeds']} seeds: chi2 {differ['statistic']:.2f} ({differ['df']} df), p {differ['p']:.3g} "
            f"({differ['p_method']}; chi2 approximation {differ['asymptotic_p']:.3g}); the DA means span "
            f"{differ['mean_span']:.2f} points, a DA's seed-to-seed sd is {differ['median_seed_sd']:.2f} (median).")
        if differ["p"] >= 0.05:
            warnings.append(f"the DAs do not differ beyond seed noise (Friedman p {differ['p']:.3g} >= 0.05): this "
                            "sweep cannot tell any order of them apart, the metric's included")
    thin = [r["name"] for r in analysis["candidates"] if len(r["seeds"]) < MIN_SEEDS]
    if thin:
        warnings.append(f"{len(thin)} of {len(analysis['candidates'])} DAs have fewer than {MIN_SEEDS} seeds: "
                        "the order of DAs closer than their seed spread is within noise")
    if s["candidates_finished"] < s["candidates_swept"]:
        warnings.append(f"only {s['candidates_finished']} of {s['candidates_swept']} candidates have finished runs")
    return lines, warnings


def place_labels(fig: Any, ax: Any, points: list[tuple[str, float, float]]) -> None:
    """Annotate each (label, x, y) inside the axes, moving a label below or further up where it
    would overlap a label already placed, a point's marker or the legend (DAs often tie in accuracy)."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed: list[Any] = []
    for _, x, y in points:  # a label must not cover any point
        px, py = ax.transData.transform((x, y))
        placed.append(Bbox.from_extents(px - 5, py - 5, px + 5, py + 5))
    if ax.get_legend() is not None:
        placed.append(ax.get_legend().get_window_extent(renderer))
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

    rows = [r for r in analysis["candidates"] if r["candidate"]]
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
    if summary.get("default_top1") is not None and summary.get("default") != summary.get("metric_pick"):
        ax.axhline(summary["default_top1"], color="0.4", linestyle="-.",
                   label=f"default: {summary['default']} ({summary['default_top1']:.2f}%)")
    corr = summary.get("metric_correlation")
    if corr:
        ax.text(0.02, 0.02, f"Spearman {corr['spearman']:+.2f} (p={corr['spearman_p']:.2g}), "
                f"Kendall {corr['kendall']:+.2f} (p={corr['kendall_p']:.2g}), {corr['p_method']} p",
                transform=ax.transAxes, fontsize=8, color="0.3")
    ax.set_xlabel(f"metric score = {analysis.get('score_formula', 'centroid CE - CMI')} (lower is better)")
    ax.set_ylabel("student test top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    ax.autoscale_view()  # final limits and layout first: the overlap test works in pixels
    place_labels(fig, ax, [(r["name"], r["score"], r["top1"]) for r in rows])
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _corr_line(name: str, corr: dict[str, Any] | None) -> str:
    if not corr:
        return f"| {name} | | n/a | n/a | n/a | n/a | | |"
    return (f"| {name} | {corr.get('better', '')} | {corr['spearman']:+.3f} | {corr['spearman_p']:.3g} | "
            f"{corr['kendall']:+.3f} | {corr['kendall_p']:.3g} | {corr['p_method']} | {corr.get('direction', '')} |")


def _gain_line(name: str, gain: dict[str, Any] | None) -> str:
    if gain is None:
        return f"| {name} | n/a | n/a | 0 | |"
    ci = gain["ci95"]
    interval = f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "n/a (1 seed)"
    diffs = ", ".join(f"{d:+.2f}" for d in gain["differences"])
    return f"| {name} | {gain['mean']:+.2f} | {interval} | {gain['seeds']} | {diffs} |"


def _disagreement_section(analysis: dict[str, Any]) -> list[str]:
    """report.md's disagreement test: one row per control, then the pairs themselves."""
    tests = analysis.get("disagreement") or {}
    if not tests:
        return []
    lines = [
        "## Where the score and a control disagree, whom do the students follow?",
        "",
        ("Every pair of trained candidates that the score and the control order oppositely. `with the score`: the "
         "pairs in which the students (mean final top-1 over seeds) prefer what the score prefers, a tie counting "
         "one half; 50 % is chance. Two-sided permutation p of |share - 50 %|, the students' means shuffled over "
         "the candidates (exact for n <= 10, seeded Monte Carlo beyond)."),
        "",
        "| control | candidates | pairs that disagree | with the score | share | p | p-values |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t in tests.items():
        share = "n/a" if t["share"] is None else f"{100 * t['share']:.0f} %"
        p = "n/a" if t["p"] is None else f"{t['p']:.3g}"
        lines.append(f"| {control_label(name, analysis)} | {t['candidates']} | {t['pairs']} | "
                     f"{t['students_side_with_score']:g} | {share} | {p} | {t['p_method']} |")
    for name, t in tests.items():
        if t["pair_list"]:
            lines += ["", f"Pairs where the score and {control_label(name, analysis)} disagree:", "",
                      "| score prefers | control prefers | students side with |", "|---|---|---|"]
            lines += [f"| {q['score_prefers']} | {q['control_prefers']} | {q['students_side_with']} |"
                      for q in t["pair_list"]]
    lines.append("")
    return lines


def report_markdown(analysis: dict[str, Any], meta: dict[str, Any]) -> str:
    """report.md: the setting, the verdict with its warnings, every control's correlation, the
    gains over the default and the median candidate, the picks and every DA's figures."""
    s = analysis["summary"]
    default = analysis.get("default")
    lines = [
        f"# daqkd sweep: {meta['title']}",
        "",
        (
            f"Finished {s['candidates_finished']} of {s['candidates_swept']} candidates "
            f"({meta['runs_finished']} of {meta['runs_total']} runs, the default's included), "
            f"{meta['train_seconds'] / 3600:.2f} h of training on {meta['device']}. Command: `{meta['command']}`"
        ),
        "",
        "## Verdict",
        "",
        *[f"- {line}" for line in analysis["verdict"]],
        *[f"- **Warning:** {w}." for w in analysis["warnings"]],
        "",
        "## Does the ranking predict the students' accuracy? The metric beside its controls",
        "",
        (
            "Each row correlates a figure of the teacher's predictions under each candidate DA with the candidates' "
            "student top-1 (mean over seeds). `better` is the direction the figure prefers: a figure that predicts "
            "accuracy correlates negatively when lower is better, positively when higher is better (`direction`; "
            "`none` for rho 0). "
            "Two-sided permutation p-values, exact over all n! pairings for n <= 10, seeded Monte Carlo beyond."
        ),
        "",
        "| figure | better | Spearman rho | p | Kendall tau | p | p-values | direction |",
        "|---|---|---|---|---|---|---|---|",
        *[
            _corr_line(control_label(name, analysis), analysis["controls"].get(name))
            for name in CONTROLS
            if name in analysis["controls"]
        ],
        "",
        *_disagreement_section(analysis),
        "## Gain of the metric's pick",
        "",
        (
            "Per-seed paired differences in final student top-1 (percentage points), their mean and Student-t 95% "
            "interval. The median candidate is taken per seed over all swept candidates."
        ),
        "",
        "| comparison | mean | 95% CI | seeds | per-seed differences |",
        "|---|---|---|---|---|",
        _gain_line(f"metric's pick vs default ({default})", analysis["gain"]["pick_vs_default"]),
        _gain_line("metric's pick vs median candidate", analysis["gain"]["pick_vs_median"]),
        "",
        "## Picks",
        "",
        "| | DA | student top-1 |",
        "|---|---|---|",
        f"| metric's pick | {s['metric_pick']} | {_pct(s.get('metric_pick_top1'))} |",
        (f"| teacher-accuracy pick (control) | {s['teacher_accuracy_pick']} "
         f"| {_pct(s.get('teacher_accuracy_pick_top1'))} |"),
        f"| variance pick (Wang et al.) | {s['variance_pick']} | {_pct(s.get('variance_pick_top1'))} |",
        f"| default | {default or 'n/a'} | {_pct(s.get('default_top1'))} |",
        f"| best candidate | {s.get('best', 'n/a')} | {_pct(s.get('best_top1'))} |",
        f"| worst candidate | {s.get('worst', 'n/a')} | {_pct(s.get('worst_top1'))} |",
        "",
        "## Every DA (ranking order; the default last when it is not a candidate)",
        "",
        (
            "| rank | DA | score | centroid CE | CMI | sample score | variance ± SE (groups) | var. rank "
            "| teacher acc. | student top-1 | best-epoch top-1 | seeds |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in analysis["candidates"]:
        std = f" ± {r['top1_std']:.2f}" if r["top1_std"] is not None else ""
        if r["candidate"]:
            se = f" ± {r['variance_se']:.5f}" if r.get("variance_se") else ""
            groups = f" ({r['variance_groups']})" if r.get("variance_groups") else ""
            score_se = f" ± {r['score_se']:.4f}" if r.get("score_se") else ""
            figures = (
                f"{r['rank']} | {r['name']} | {_num(r['score'])}{score_se} | {_num(r['centroid_ce'])} | "
                f"{_num(r['cmi'])} | "
                f"{_num(r['sample_score'])} | {_num(r['variance'], 5)}{se}{groups} | {r['variance_rank']} | "
                f"{100 * r['teacher_accuracy']:.2f}%"
            )
        else:
            figures = f"- | {r['name']} (default, not a candidate) | | | | | | | "
        lines.append(f"| {figures} | {r['top1']:.2f}%{std} | {r['best_top1']:.2f}% | {len(r['seeds'])} |")
    lines += [
        "",
        (
            "Student top-1 is the test top-1 after the last epoch (mean over seeds ± their standard deviation), "
            "not the best epoch's, so no test-set selection enters the comparison. The variance's standard "
            "error is the normal-theory bound variance / sqrt(2 (groups - 1)); the score's (where the ranking has it)"
            " is the jackknife's over blocks of the ranking pass."
        ),
        "",
        "![scatter](scatter.png)",
        "",
    ]
    return "\n".join(lines)
