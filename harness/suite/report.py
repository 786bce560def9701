"""`neuronbench report`: one self-contained HTML page for a results folder (plots and headline table).

The headline cells and the methods table built here are shared with the leaderboard pages.
"""
from __future__ import annotations

import argparse
import json
import logging
from html import escape
from pathlib import Path
from typing import Callable

import polars as pl

from ..engine import paths
from ..engine.cache import Cache
from ..engine.records import CONFIG, RESULTS, load_results, per_k_last
from . import html
from .plots import TrainingCurves, task_plot, training_plot
from .verdicts import sanity_flags

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
COLUMN_KEY = ("split", "task", "task_version", "config_hash", "metric")


def collection_summary(col, tokenizer, seconds: float) -> str:
    """What `neuronbench collect` prints: counts and speed, then per site its mean and spread and
    the max-1 winner's most credited tokens."""
    lines = [f"{col.n_examples} examples, {col.n_tokens} tokens in {seconds:.1f} s "
             f"({col.n_tokens / max(seconds, 1e-9):,.0f} tokens/s)"]
    for site in col.index.sites:
        st = col[site]
        line = f"  {str(site):<9} {col.index.width(site):>5} neurons"
        if st.moments is not None:
            line += f" | mean {st.moments.mean.mean():+.3f} std {st.moments.var.sqrt().mean():.3f}"
        if st.max1 is not None:
            table = st.max1.table()
            mass = table["act_sum"].new_zeros(col.index.width(site)).index_add_(0, table["neuron"], table["act_sum"])
            top = int(mass.argmax())
            sel = table["neuron"] == top
            tok = table["token_id"][sel][table["count"][sel].argsort(descending=True)[:5]]
            words = tokenizer.convert_ids_to_tokens(tok.tolist())
            line += f" | max-1: {int((mass > 0).sum())} neurons win tokens; top {top}: {' '.join(words)}"
        lines.append(line)
    return "\n".join(lines)


def text_table(frame: pl.DataFrame, width: int = 28) -> str:
    """`frame` as a plain text table for a terminal: a header, a rule and one line per row, cells
    cut to `width` characters, floats to 3 decimals, nulls blank. A `task (metric)` column name
    (the summary's) is shown on two header lines, the task above its metric."""
    def cell(value) -> str:
        text = "" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        return text if len(text) <= width else text[: width - 1] + "…"

    heads = [c.split(" (", 1) if " (" in c else [c, ""] for c in frame.columns]
    heads = [[top + (" SANITY FAILED" if rest.endswith(" SANITY FAILED") else ""),
              rest.removesuffix(" SANITY FAILED").removesuffix(")")] for top, rest in heads]
    rows = [[cell(v) for v in row] for row in frame.iter_rows()]
    widths = [max(len(cell(h[0])), len(cell(h[1])), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    lines = ["  ".join(cell(h[0]).ljust(w) for h, w in zip(heads, widths))]
    if any(h[1] for h in heads):
        lines.append("  ".join(cell(h[1]).ljust(w) for h, w in zip(heads, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def headline_of(task: str, config: dict | None = None) -> str | None:
    """The headline metric of `task`: from the task registry, else from the spec recorded in a
    run's `config` (a task this install does not have), else None."""
    from .task import TASKS

    if task in TASKS.names():
        return TASKS.get(task).spec.headline
    return ((config or {}).get("tasks", {}).get(task) or {}).get("headline")


def headline_cells(frame: pl.DataFrame, headlines: dict[str, str]) -> pl.DataFrame:
    """One row per (split, task, task_version, config_hash, method): its headline record, or its
    `not_applicable`/`error` record when it has no headline.

    Args:
        frame: long-format records (see `records.SCHEMA`).
        headlines: task name -> headline metric; tasks not in it are left out.
    """
    ids = ["split", "task", "task_version", "config_hash", "method"]
    keep = pl.lit(False)
    for task, metric in headlines.items():
        keep = keep | ((pl.col("task") == task) & ((pl.col("metric") == metric) | (pl.col("status") != "ok")))
    sub = per_k_last(frame.filter(keep)).with_columns(head=(pl.col("status") == "ok").cast(pl.Int8))
    sub = sub.sort([*ids, "head"], descending=[False] * len(ids) + [True], maintain_order=True).unique(
        ids, keep="first", maintain_order=True)
    metric = pl.col("task").replace_strict(headlines, default=None)
    return sub.with_columns(metric=metric).select([*COLUMN_KEY, "method", "value", "ci_low", "ci_high", "status"])


def column_id(key: tuple) -> str:
    split, task, version, config_hash, _ = key
    return f"{split}/{task}/v{version}/{config_hash}"


def table_columns(cells: pl.DataFrame) -> list[html.Column]:
    """One column per (split, task, version, config) in `cells`, each flagged when the task's
    stored sanity check failed at that config."""
    keys = sorted(set(cells.select(COLUMN_KEY).iter_rows()))
    splits = {k[0] for k in keys}
    columns = [html.Column("method", "method")]
    for key in keys:
        split, task, version, config_hash, metric = key
        sub = f"{metric} · v{version} · {config_hash[:8]}" + (f" · {split}" if len(splits) > 1 else "")
        flag = sanity_flags({task: config_hash}).get(task, "")
        columns.append(html.Column(column_id(key), task, sub, flag))
    return columns


def methods_table(cells: pl.DataFrame, methods: list[str], table_id: str,
                  link: Callable[[str], str | None] | None = None) -> str:
    """The methods x tasks table of headline values with intervals (sortable).

    Args:
        cells: `headline_cells` output; optional `rank` (int) and `tied` (bool) columns add a rank
            badge ("=2" for a shared rank) before each value.
        methods: one row each, in this order.
        table_id: the table's HTML id.
        link: method -> relative URL of its page, or None for no link.
    """
    rows = {m: {"method": _method_cell(m, link)} for m in methods}
    has_rank = "rank" in cells.columns
    for r in cells.iter_rows(named=True):
        if r["method"] not in rows:
            continue
        prefix = ""
        if has_rank and r["rank"] is not None:
            mark = "=" if r["tied"] else ""
            prefix = f'<span class="rank" title="rank">{mark}{r["rank"]}</span> '
        rows[r["method"]][column_id(tuple(r[c] for c in COLUMN_KEY))] = html.interval_cell(
            r["value"], r["ci_low"], r["ci_high"], r["status"], prefix)
    return html.table(table_columns(cells), list(rows.values()), table_id)


def _method_cell(method: str, link: Callable[[str], str | None] | None) -> html.Cell:
    url = link(method) if link else None
    inner = f'<a href="{escape(url)}">{escape(method)}</a>' if url else escape(method)
    return html.Cell(inner, method)


def task_figures(frame: pl.DataFrame) -> list[tuple[str, bytes]]:
    """(task, PNG) for each task in `frame` that has a plot, in task-name order."""
    out = []
    for task in sorted(frame["task"].unique()):
        png = task_plot(task, frame)
        if png is not None:
            out.append((task, png))
    return out


def trained_artifacts(frame: pl.DataFrame, config: dict, cache: Cache | None = None) -> dict[str, list[TrainingCurves]]:
    """The training curves of the cached artifacts this run's methods trained, by "method on model".

    An artifact shows when its cache entry holds `curves.json` and its `meta.json` a `curves`
    description (`name`, `title`, `panels`, `lines`, `marked_step`, `log_panels`; see
    `plots.TrainingCurves`), its `parts` name a method and a model of this run, and it was
    written by the run's harness version; of several entries with the same name (an artifact
    rebuilt under another config), the newest.
    """
    cache = cache or Cache()
    models, methods = set(frame["model"].unique()), set(frame["method"].unique())
    version = config.get("harness_version")
    newest: dict[tuple, tuple[tuple, TrainingCurves, str]] = {}
    for entry in cache.entries():
        meta, parts = entry.meta, entry.meta.get("parts", {})
        about = meta.get("curves")
        if (not isinstance(about, dict) or parts.get("model_name") not in models
                or parts.get("method") not in methods or (version and meta.get("harness_version") != version)
                or not (entry.path / "curves.json").is_file()):
            continue
        run = TrainingCurves(about["title"], json.loads((entry.path / "curves.json").read_text()),
                             tuple(tuple(p) for p in about["panels"]),
                             {k: tuple(tuple(line) for line in v) for k, v in about.get("lines", {}).items()},
                             about.get("marked_step"), tuple(about.get("log_panels", ())))
        group = f"{parts['method']} on {parts['model_name']}"
        key = (group, about.get("name", about["title"]))
        written = (meta.get("created", ""), (entry.path / "meta.json").stat().st_mtime_ns)  # seconds tie
        if key not in newest or written > newest[key][0]:
            newest[key] = (written, run, group)
    out: dict[str, list[TrainingCurves]] = {}
    for key in sorted(newest):
        out.setdefault(newest[key][2], []).append(newest[key][1])
    return out


def _training_section(artifacts: dict[str, list[TrainingCurves]]) -> tuple[list[str], dict[str, bytes]]:
    """The page's training-curves section and its figures (name -> PNG)."""
    if not artifacts:
        return [], {}
    body = ['<h2 id="training">Training curves</h2>',
            "<p>What the methods trained before answering (cached artifacts, built once): each step's "
            "batch value, its running mean, the dev checks and the budget, with the kept checkpoint marked, "
            "so a reader can see whether training converged.</p>"]
    figures = {}
    for group, runs in artifacts.items():
        name = "training-" + "".join(c if c.isalnum() or c in "-." else "-" for c in group)
        figures[name] = training_plot(runs)
        body += [f"<h3>{escape(group)}</h3>", html.png_figure(figures[name], f"{group} training curves")]
    return body, figures


def build_report(frame: pl.DataFrame, config: dict, cache: Cache | None = None) -> tuple[str, dict[str, bytes]]:
    """The report page and its figures (task or training-curves name -> PNG) for one run's records
    and config; the training curves are read from `cache` (default: NEURONBENCH_HOME's)."""
    if frame.is_empty():
        raise ValueError("the results hold no records: re-run `neuronbench run --out DIR` and report DIR")
    headlines = {t: h for t in sorted(frame["task"].unique()) if (h := headline_of(t, config))}
    cells = headline_cells(frame, headlines)
    methods = sorted(frame["method"].unique())
    figures = dict(task_figures(frame))
    body = ["<h1>NeuronBench report</h1>", _run_facts(frame, config), "<h2>Headline metrics</h2>",
            methods_table(cells, methods, "headlines"),
            "<p class=sub>Value [95% bootstrap interval]; click a column header to sort. "
            "n/a: the method does not implement the task's verb.</p>"]
    specs = config.get("tasks", {})
    for task in sorted(frame["task"].unique()):
        body.append(f'<h2 id="task-{escape(task)}">{escape(task)}</h2>')
        if specs.get(task, {}).get("description"):
            body.append(f"<p>{escape(specs[task]['description'])}</p>")
        if task in figures:
            body.append(html.png_figure(figures[task], f"{task} plot"))
    training, curves = _training_section(trained_artifacts(frame, config, cache))
    return html.page("NeuronBench report", "\n".join(body + training)), {**figures, **curves}


def _run_facts(frame: pl.DataFrame, config: dict) -> str:
    run = config.get("config", {})
    facts = {"run": config.get("run_id", "?"), "harness version": config.get("harness_version", "?"),
             "split": ", ".join(sorted(frame["split"].unique())), "quick": str(run.get("quick", "?")),
             "seed": str(run.get("seed", "?")), "models": ", ".join(sorted(frame["model"].unique()))}
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in facts.items())
    return f'<dl class="meta">{items}</dl>'


def read_results(folder: Path) -> tuple[pl.DataFrame, dict]:
    """`load_results`, with an error naming the fix when `config.json` is missing."""
    folder = Path(folder)
    if (folder / RESULTS).is_file() and not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"no {CONFIG} in {folder}: copy the run's {CONFIG} beside its {RESULTS}")
    return load_results(folder)


def plots_dir(page: Path) -> Path:
    """The folder of a page's PNGs: `report-plots/` beside `report.html`."""
    return page.with_name(f"{page.stem}-plots")


def _only_plots(folder: Path) -> bool:
    # A plots folder written before folders were stamped (see paths.atomic_dir).
    return all(p.suffix == ".png" for p in folder.iterdir())


def write_report(folder: Path, out: Path | None = None) -> Path:
    """Write the report of the results in `folder` (default `folder/report.html`, self-contained)
    and its PNGs in `plots_dir` beside it; both replaced atomically. Returns the page's path.

    Args:
        folder: a folder written by `neuronbench run --out`.
        out: the HTML file to write instead of `folder/report.html`.
    """
    frame, config = read_results(folder)
    out = Path(out) if out else Path(folder) / REPORT_FILE
    pngs = plots_dir(out)
    paths.check_output_dir(pngs, "report plots", _only_plots)
    page, figures = build_report(frame, config)
    with paths.atomic_dir(pngs, "report plots", legacy=_only_plots) as tmp:
        for task, png in figures.items():
            (tmp / f"{task}.png").write_bytes(png)
        tmp.chmod(0o755)  # temp files and folders are private; a report is for reading
    paths.atomic_write_text(out, page)
    out.chmod(0o644)
    log.info("wrote %s with %d figures", out, len(figures))
    return out


def _report(args) -> int:
    path = write_report(Path(args.results), Path(args.out) if args.out else None)
    print(f"wrote {path}")
    return 0


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    """The `neuronbench report` verb."""
    p = sub.add_parser("report", help="write the HTML report of a results folder")
    p.add_argument("results", help="a folder written by `neuronbench run --out`")
    p.add_argument("--out", help="HTML file to write (default: RESULTS/report.html)")
    p.set_defaults(fn=_report)
