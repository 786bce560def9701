"""The report's figures: one PNG per task, one panel per method, drawn with matplotlib (Agg).

Each plotter takes one task's `ok` records (any number of methods) and returns PNG bytes, or None
when the records hold nothing it can draw.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Callable

import polars as pl

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on CI; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, width: float = 3.4, height: float = 2.6, sharey: bool = False):
    """A figure with `n` panels, at most 4 a row; unused panels are hidden."""
    plt = _pyplot()
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, sharey=sharey)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    if not fig.get_constrained_layout():
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=80)
    _pyplot().close(fig)
    return buf.getvalue()


def _series(frame: pl.DataFrame, metric: str) -> pl.DataFrame:
    return frame.filter((pl.col("metric") == metric) & pl.col("k").is_not_null()
                        & pl.col("value").is_not_null()).sort("k")


def _line(ax, frame: pl.DataFrame, metric: str, label: str, color: str, style: str = "-") -> bool:
    """Plot `metric` against k with its interval as a band; False when there is nothing to plot."""
    sub = _series(frame, metric)
    if sub.is_empty():
        return False
    ax.plot(sub["k"], sub["value"], style, marker="o", ms=3, color=color, label=label)
    ci = sub.filter(pl.col("ci_low").is_not_null())
    if len(ci):
        ax.fill_between(ci["k"], ci["ci_low"], ci["ci_high"], color=color, alpha=0.12, lw=0)
    return True


def _curves(frame: pl.DataFrame, lines: dict[str, tuple[str, str]], xlabel: str, ylabel: str,
            log_x: bool = False, hline: str | None = None) -> bytes | None:
    """One panel per method; `lines` maps metric -> (legend label, line style)."""
    methods = sorted(frame.filter(pl.col("metric").is_in(list(lines)))["method"].unique())
    if not methods:
        return None
    fig, axes = _grid(len(methods), sharey=True)  # one y scale, so panels compare at a glance
    _panels(axes, frame, methods, lines, xlabel, ylabel, log_x, hline)
    return _png(fig)


def _panels(axes, frame: pl.DataFrame, methods, lines: dict[str, tuple[str, str]], xlabel: str, ylabel: str,
            log_x: bool, hline: str | None) -> None:
    for ax, method in zip(axes, methods):
        sub = frame.filter(pl.col("method") == method)
        for i, (metric, (label, style)) in enumerate(lines.items()):
            _line(ax, sub, metric, label, COLORS[i % len(COLORS)], style)
        ref = sub.filter(pl.col("metric") == hline)["value"] if hline else []
        if len(ref):
            ax.axhline(float(ref[0]), color="black", ls=":", lw=1, label=hline.rsplit(".", 1)[-1])
        ks = _series(sub, next(iter(lines)))["k"]
        _axes(ax, method, xlabel, ylabel, log_x and _spans_decade(ks))
    axes[0].legend(fontsize=7)


def _spans_decade(ks: pl.Series) -> bool:
    """Whether positive x values span a factor of 10 or more (a log axis then reads better)."""
    return len(ks) > 0 and ks.min() > 0 and ks.max() / ks.min() >= 10


def _axes(ax, title: str, xlabel: str, ylabel: str, log_x: bool) -> None:
    """Title, labels and a log x axis when `log_x`, in the report's font sizes."""
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)


def prune_plot(frame: pl.DataFrame) -> bytes | None:
    """Test-accuracy drop against the fraction of FFN neurons ablated, per condition."""
    conditions = ("top", "bottom", "random_uniform", "random_matched")
    styles = ("-", "-", "--", "--", ":")
    lines = {f"prune.acc_drop.{c}": (c, s) for c, s in zip(conditions, styles)}
    return _curves(frame, lines, "fraction of neurons ablated", "accuracy drop", log_x=True)


def probe_plot(frame: pl.DataFrame) -> bytes | None:
    """Probe accuracy against the fraction of neurons kept (top, random, bottom), one panel per
    method on one scale; a last panel gives every method's top-minus-bottom gap over its
    permuted-tag null (the headline's curve over k)."""
    lines = {f"probe.acc.{c}": (c, "-") for c in ("top", "random", "bottom")}
    methods = sorted(frame.filter(pl.col("metric").is_in(list(lines)))["method"].unique())
    if not methods:
        return None
    fig, axes = _grid(len(methods) + 1)
    for ax in axes[1:-1]:
        ax.sharey(axes[0])
    _panels(axes[:-1], frame, methods, lines, "fraction of neurons", "probe accuracy", True, "probe.full_accuracy")
    gap = axes[-1]
    for i, method in enumerate(methods):
        _line(gap, frame.filter(pl.col("method") == method), "probe.tmb_gap", method, COLORS[i % len(COLORS)])
    gap.axhline(0.0, color="black", ls=":", lw=1)
    _axes(gap, "top-bottom gap over the permuted-tag null", "fraction of neurons", "accuracy gap",
          _spans_decade(_series(frame, "probe.tmb_gap")["k"]))
    gap.legend(fontsize=6)
    return _png(fig)


def erasure_plot(frame: pl.DataFrame) -> bytes | None:
    """Comprehensiveness and sufficiency (AOPC) per layer, against random positions."""
    lines = {"erasure.comprehensiveness": ("comprehensiveness", "-"),
             "erasure.random_comprehensiveness": ("random comp.", "--"),
             "erasure.sufficiency": ("sufficiency", "-"),
             "erasure.random_sufficiency": ("random suff.", "--")}
    return _curves(frame, lines, "layer", "AOPC")


def ppl_trend_plot(frame: pl.DataFrame) -> bytes | None:
    """Per method: stage change against the log-perplexity improvement between consecutive steps,
    one colour per trajectory (the records' `model`), titled with the pooled correlation and the gap."""
    methods = sorted(frame.filter(pl.col("metric") == "ppl-trend.stage_change")["method"].unique())
    if not methods:
        return None
    fig, axes = _grid(len(methods))
    for ax, method in zip(axes, methods):
        sub = frame.filter(pl.col("method") == method)
        trajs = sorted(sub.filter(pl.col("metric") == "ppl-trend.stage_change")["model"].unique())
        for i, traj in enumerate(trajs):
            mine = sub.filter(pl.col("model") == traj)
            ppl = _series(mine, "ppl-trend.valid_ppl")
            log_ppl = dict(zip(ppl["k"].to_list(), (math.log(v) for v in ppl["value"])))
            steps = sorted(log_ppl)
            gain = {later: log_ppl[earlier] - log_ppl[later] for earlier, later in zip(steps, steps[1:])}
            change = _series(mine, "ppl-trend.stage_change")
            pts = [(gain[k], v) for k, v in zip(change["k"], change["value"]) if k in gain]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, color=COLORS[i % len(COLORS)])
        heads = {m: sub.filter(pl.col("metric") == f"ppl-trend.{m}")["value"] for m in ("pooled_spearman", "gap")}
        parts = [f"{m.split('_')[0]}={v[0]:+.2f}" for m, v in heads.items() if len(v) and v[0] is not None]
        ax.set_title(f"{method} ({', '.join(parts)})" if parts else method, fontsize=9)
        ax.set_xlabel("log-ppl improvement since previous checkpoint", fontsize=8)
        ax.set_ylabel("stage change", fontsize=8)
        ax.tick_params(labelsize=7)
    return _png(fig)


def descriptors_plot(frame: pl.DataFrame) -> bytes | None:
    """P@k and R@k bars per method, data-grounded and planted truths, chance as black ticks."""
    methods = sorted(frame.filter(pl.col("metric").str.contains(r"^descriptors\.\w+\.[pr]@"))["method"].unique())
    if not methods:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), squeeze=False)
    width = 0.8 / len(methods)
    for row, truth in enumerate(("data", "planted")):
        for col, stat in enumerate(("p", "r")):
            ax = axes[row][col]
            for i, method in enumerate(methods):
                sub = frame.filter(pl.col("method") == method)
                _bars(ax, sub, f"descriptors.{truth}.{stat}@", f"descriptors.{truth}.chance_{stat}@",
                      (i - (len(methods) - 1) / 2) * width, width, method, COLORS[i % len(COLORS)])
            ax.set_title(f"{truth}: {stat.upper()}@k", fontsize=10)
            ax.set_xlabel("k", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].plot([], [], color="black", lw=1.5, label="chance")
    axes[0][0].legend(fontsize=7)
    return _png(fig)


def _bars(ax, frame: pl.DataFrame, prefix: str, chance_prefix: str, shift: float, width: float,
          label: str, color: str) -> None:
    ks = (1, 2, 5)
    vals, errs, xs, chance = [], [[], []], [], []
    for x, k in enumerate(ks):
        row = frame.filter(pl.col("metric") == f"{prefix}{k}")
        if row.is_empty() or row["value"][0] is None:
            continue
        v, lo, hi = row["value"][0], row["ci_low"][0], row["ci_high"][0]
        xs.append(x + shift)
        vals.append(v)
        errs[0].append(v - lo if lo is not None else 0.0)
        errs[1].append(hi - v if hi is not None else 0.0)
        ref = frame.filter(pl.col("metric") == f"{chance_prefix}{k}")["value"]
        chance.append(ref[0] if len(ref) else None)
    ax.bar(xs, vals, width, yerr=errs, color=color, label=label, capsize=2, error_kw={"lw": 0.8})
    for x, c in zip(xs, chance):
        if c is not None:
            ax.hlines(c, x - width / 2, x + width / 2, color="black", lw=1.5)
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])


@dataclass(frozen=True)
class TrainingCurves:
    """One training run's curves for `training_plot`.

    Attributes:
        title: the row's title (what was trained and how it ended).
        curves: per-step series keyed by name, x in `step`; a `dev_<name>` series (x in
            `dev_step`) is drawn as points on `<name>`'s panel.
        panels: (series name, panel title) in order, one panel each.
        lines: series name -> (y, label) horizontal reference lines (e.g. a budget).
        marked_step: a step drawn as a vertical line on every panel (e.g. the kept checkpoint).
        log_panels: series names drawn on a symmetric-log y axis.
    """

    title: str
    curves: dict[str, list[float]]
    panels: tuple[tuple[str, str], ...]
    lines: dict[str, tuple[tuple[float, str], ...]] = field(default_factory=dict)
    marked_step: int | None = None
    log_panels: tuple[str, ...] = ()


def _running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def training_plot(runs: list[TrainingCurves]) -> bytes | None:
    """One row per run, one panel per series: each step's value (grey), its running mean over 25
    steps, the dev checks (points), the reference lines and the marked step; None without runs."""
    if not runs:
        return None
    width = max(len(r.panels) for r in runs)
    fig = _pyplot().figure(figsize=(3.6 * width, 2.7 * len(runs)), layout="constrained")
    for sub, run in zip(fig.subfigures(len(runs), 1, squeeze=False)[:, 0], runs):
        sub.suptitle(run.title, fontsize=9, x=0.01, ha="left")
        axes = sub.subplots(1, width, squeeze=False)[0]
        for ax, (name, label) in zip(axes, run.panels):
            steps, values = run.curves.get("step", []), run.curves.get(name, [])
            ax.plot(steps, values, lw=0.5, color="0.7", label="each step")
            ax.plot(steps, _running_mean(values, 25), lw=1.2, color=COLORS[0], label="running mean (25)")
            if run.curves.get(f"dev_{name}"):
                ax.plot(run.curves["dev_step"], run.curves[f"dev_{name}"], "o", ms=3, color=COLORS[1], label="dev")
            for i, (y, text) in enumerate(run.lines.get(name, ())):
                ax.axhline(y, color="black", ls=(":", "--")[i % 2], lw=0.9, label=text)
            if run.marked_step is not None:
                ax.axvline(run.marked_step, color=COLORS[2], lw=0.9, label="kept")
            if name in run.log_panels:
                ax.set_yscale("symlog", linthresh=0.01)
                ax.set_ylim(bottom=0)
            _axes(ax, label, "step", "", False)
            ax.legend(fontsize=6)
        for ax in axes[len(run.panels):]:
            ax.set_visible(False)
    return _png(fig)


PLOTTERS: dict[str, Callable[[pl.DataFrame], bytes | None]] = {
    "prune": prune_plot, "ppl-trend": ppl_trend_plot, "descriptors": descriptors_plot,
    "probe": probe_plot, "erasure": erasure_plot,
}


def task_plot(task: str, frame: pl.DataFrame) -> bytes | None:
    """The PNG of `task` from its records (only `ok` rows are drawn), or None for a task without
    a plotter or with nothing to draw."""
    plotter = PLOTTERS.get(task)
    if plotter is None:
        return None
    return plotter(frame.filter((pl.col("task") == task) & (pl.col("status") == "ok")))
