"""`neuronbench leaderboard build`: merge result folders and write the static leaderboard site.

Methods are ranked per split and per task configuration (task version + config fingerprint): rows
scored under different configurations never share a ranking, each configuration gets its own column.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import polars as pl

from neuronbench.harness import __version__
from neuronbench.harness.suite import html
from neuronbench.harness.engine import paths
from neuronbench.harness.suite.plots import task_plot
from neuronbench.harness.engine.records import RESULTS, SCHEMA
from neuronbench.harness.suite.report import COLUMN_KEY, headline_cells, headline_of, methods_table, read_results
from neuronbench.harness.suite.verdicts import sanity_flags

from .submission import MANIFEST, strict_json

log = logging.getLogger(__name__)

INDEX, DATA, METHODS_DIR = "index.html", "leaderboard.json", "methods"
DEDUP_KEY = ["task", "task_version", "config_hash", "method", "metric", "k", "split"]
# Shown first, in this order (as `neuronbench submit` writes them; older spellings too); then the rest.
MANIFEST_FIELDS = ("method", "name", "method_version", "version", "authors", "contact", "description", "code_url",
                   "code", "url", "license", "licence")
SPLIT_NOTES = {"public": "scored on each task's fixed public examples",
               "hidden": "scored on examples drawn with the scorer's secret seed"}


@dataclass(frozen=True)
class Run:
    """One results folder: where it is, its config, when it was written, its submission manifest."""

    folder: Path
    config: dict
    created: float
    manifest: dict | None


def load_runs(folders: list[Path]) -> tuple[list[pl.DataFrame], list[Run]]:
    """Each folder's records (with `source` and `run_order`, newest run highest) and its `Run`."""
    loaded = []
    for position, folder in enumerate(map(Path, folders)):
        frame, config = read_results(folder)
        created = _created(folder, config)
        manifest = _manifest(folder / MANIFEST)
        _check_identity(folder, frame, config, manifest)
        loaded.append((created, position, Run(folder, config, created, manifest), frame))
    loaded.sort(key=lambda item: item[:2])  # oldest first; equal times keep the command-line order
    frames = [_complete(f).with_columns(source=pl.lit(str(run.folder)), run_order=pl.lit(i))
              for i, (_, _, run, f) in enumerate(loaded)]
    return frames, [run for _, _, run, _ in loaded]


def _check_identity(folder: Path, frame: pl.DataFrame, config: dict, manifest: dict | None) -> None:
    """A scored submission's records all carry its namespaced id (`submission_id`), so that no
    submission can take a baseline's or another submitter's rows."""
    if config.get("kind") != "submission":
        return
    expected = config.get("submission_id")
    names = set(frame["method"].unique().to_list())
    claimed = None if manifest is None else f"/{manifest.get('method')}@{manifest.get('method_version')}"
    if (not isinstance(expected, str) or "/" not in expected or names - {expected}
            or claimed is not None and not expected.endswith(claimed)):
        raise ValueError(f"{folder} is a scored submission whose records are named {sorted(map(str, names))}, "
                         f"not its namespaced id {expected!r} (submitter/method@version): score it again with "
                         "`neuronbench submit score`")


def _complete(frame: pl.DataFrame) -> pl.DataFrame:
    """The records in `SCHEMA`'s column order and types; results written before a column existed
    get its default (`split` public, `status` ok)."""
    defaults = {"split": "public", "status": "ok"}
    missing = [pl.lit(defaults.get(c), dtype).alias(c) for c, dtype in SCHEMA.items() if c not in frame.columns]
    return frame.with_columns(missing).select([pl.col(c).cast(t) for c, t in SCHEMA.items()])


def _manifest(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        manifest = strict_json(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): fix or remove it") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} holds a {type(manifest).__name__}, not an object: fix or remove it")
    return manifest


def _created(folder: Path, config: dict) -> float:
    """When the run was written: `config["created"]` (ISO time) if present, else the records' mtime."""
    stamp = config.get("created")
    if isinstance(stamp, str):
        try:
            return datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            log.warning("%s: unreadable created time %r; using the file time", folder, stamp)
    return (folder / RESULTS).stat().st_mtime


def merge_runs(frames: list[pl.DataFrame]) -> tuple[pl.DataFrame, list[str]]:
    """All records in one table; a record key (`DEDUP_KEY`) found in several runs keeps the newest.

    Args:
        frames: `load_runs` output (each with `source` and `run_order`).

    Returns:
        The merged records and one warning per run that lost records to a newer one.
    """
    if not frames:
        raise ValueError("no results folders given: pass one or more folders written by `neuronbench run --out`")
    merged = pl.concat(frames, how="vertical")
    newest = pl.col("run_order") == pl.col("run_order").max().over(DEDUP_KEY)
    kept, dropped = merged.filter(newest), merged.filter(~newest)
    warnings = []
    lost = dropped.group_by("source").agg(pl.len(), pl.col("method").unique().sort(), pl.col("task").unique().sort())
    for r in lost.sort("source").iter_rows(named=True):
        warnings.append(f"{r['len']} records in {r['source']} (methods {', '.join(r['method'])}; tasks "
                        f"{', '.join(r['task'])}) are also in a newer run: kept the newest run's")
    return kept, warnings


def config_warnings(cells: pl.DataFrame) -> list[str]:
    """A warning per (split, task) scored under several configurations, and per task scored under
    a version other than the installed one."""
    from neuronbench.harness.suite.task import TASKS

    out = []
    for (split, task), group in cells.group_by(["split", "task"], maintain_order=True):
        configs = group.group_by(["task_version", "config_hash"]).agg(pl.col("method").unique().sort())
        if len(configs) > 1:
            parts = [f"v{r['task_version']} {r['config_hash'][:8]} ({', '.join(r['method'])})"
                     for r in configs.sort(["task_version", "config_hash"]).iter_rows(named=True)]
            out.append(f"{task} ({split}) was scored under {len(configs)} configurations: {'; '.join(parts)}. "
                       "They are not comparable and are ranked apart, one column each")
        if task in TASKS.names():
            current = TASKS.get(task).spec.version
            old = sorted(v for v in group["task_version"].unique() if v != current)
            if old:
                out.append(f"{task} ({split}): some results are from task version(s) {old}; "
                           f"this harness has version {current}")
    return out


def rank_with_ties(lows: list[float], highs: list[float]) -> list[int]:
    """Rank = 1 + the number of others whose interval lies entirely above this one (higher is better).

    Methods with overlapping intervals can share a rank.
    """
    return [1 + sum(lo > hi_i for j, lo in enumerate(lows) if j != i) for i, hi_i in enumerate(highs)]


def add_ranks(cells: pl.DataFrame) -> pl.DataFrame:
    """`cells` with `rank` (None where not ranked) and `tied` (rank shared) per column group; a
    value without an interval counts as the interval [value, value]."""
    parts = []
    for group in cells.partition_by(list(COLUMN_KEY), maintain_order=True):
        ok = (pl.col("status") == "ok") & pl.col("value").is_not_null()
        ranked = group.filter(ok).with_columns(lo=pl.coalesce("ci_low", "value"), hi=pl.coalesce("ci_high", "value"))
        ranks = rank_with_ties(ranked["lo"].to_list(), ranked["hi"].to_list())
        counts = {r: ranks.count(r) for r in ranks}
        ranked = ranked.drop("lo", "hi").with_columns(rank=pl.Series(ranks, dtype=pl.Int64),
                                                      tied=pl.Series([counts[r] > 1 for r in ranks]))
        rest = group.filter(~ok).with_columns(rank=pl.lit(None, pl.Int64), tied=pl.lit(False))
        parts.extend([ranked, rest])
    return pl.concat(parts) if parts else cells.with_columns(rank=pl.lit(None, pl.Int64), tied=pl.lit(False))


def method_slugs(methods: list[str]) -> dict[str, str]:
    """A distinct file-name-safe name per method."""
    out: dict[str, str] = {}
    for method in sorted(methods):
        base = re.sub(r"[^A-Za-z0-9_-]+", "-", method).strip("-") or "method"
        slug, n = base, 1
        while slug.lower() in {s.lower() for s in out.values()}:  # case-insensitive file systems
            n += 1
            slug = f"{base}-{n}"
        out[method] = slug
    return out


def manifests(runs: list[Run], frame: pl.DataFrame) -> dict[str, dict]:
    """Method -> the submission manifest of its newest run that has one."""
    out = {}
    for run in runs:  # oldest first, so a newer manifest replaces an older one
        if not run.manifest:
            continue
        present = set(frame.filter(pl.col("source") == str(run.folder))["method"].unique())
        name = run.manifest.get("method") or run.manifest.get("name")
        if name not in present and len(present) == 1:
            name = next(iter(present))
        if name in present:
            out[name] = run.manifest
        else:
            log.warning("%s/%s names method %r, which has no records there", run.folder, MANIFEST, name)
    return out


@dataclass(frozen=True)
class Board:
    """Everything the site shows: merged records, ranked headline cells, runs, warnings."""

    frame: pl.DataFrame
    cells: pl.DataFrame
    runs: list[Run]
    warnings: list[str]
    manifests: dict[str, dict]
    slugs: dict[str, str]


def build_board(folders: list[Path]) -> Board:
    """Load, merge, de-duplicate and rank the results in `folders`."""
    frames, runs = load_runs(folders)
    frame, warnings = merge_runs(frames)
    configs = {}
    for run in runs:
        configs.update(run.config.get("tasks", {}))
    headlines = {t: h for t in sorted(frame["task"].unique()) if (h := headline_of(t, {"tasks": configs}))}
    missing = sorted(set(frame["task"].unique()) - set(headlines))
    if missing:
        warnings.append(f"no headline known for task(s) {', '.join(missing)}: left out of the tables")
    cells = add_ranks(headline_cells(frame, headlines))
    warnings += config_warnings(cells)
    for warning in warnings:
        log.warning(warning)
    methods = sorted(frame["method"].unique())
    return Board(frame, cells, runs, warnings, manifests(runs, frame), method_slugs(methods))


def board_json(board: Board) -> dict:
    """The leaderboard as data: one entry per ranked cell, the methods, runs and warnings."""
    pairs = board.cells.select("task", "config_hash").unique().iter_rows()
    flags = {(t, h): sanity_flags({t: h}).get(t) for t, h in pairs}
    entries = [{**r, "sanity_failed": flags[(r["task"], r["config_hash"])]}
               for r in board.cells.sort(list(COLUMN_KEY) + ["method"]).iter_rows(named=True)]
    methods = {m: {"page": f"{METHODS_DIR}/{slug}.html", "submission": board.manifests.get(m)}
               for m, slug in board.slugs.items()}
    runs = [{"folder": str(r.folder), "run_id": r.config.get("run_id"),
             "created": datetime.fromtimestamp(r.created, timezone.utc).isoformat(timespec="seconds"),
             "harness_version": r.config.get("harness_version")} for r in board.runs]
    return {"harness_version": __version__, "generated": _now(), "ranking": RANK_RULE,
            "entries": entries, "methods": methods, "runs": runs, "warnings": board.warnings}


RANK_RULE = ("per split and task configuration, higher headline is better; rank = 1 + the number of "
             "methods whose interval lies entirely above this one's, so overlapping intervals can share "
             "a rank (marked =)")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def index_page(board: Board) -> str:
    """The leaderboard: one sortable table per split, a column per task configuration."""
    body = ["<h1>NeuronBench leaderboard</h1>",
            f"<p class=sub>harness {escape(__version__)} · built {escape(_now())} · "
            f"{len(board.runs)} result folder(s) · <a href=\"{DATA}\">{DATA}</a></p>",
            f"<p>Value [95% bootstrap interval]. Ranking: {escape(RANK_RULE)}. n/a: the method does not "
            "implement the task's verb. Click a column header to sort.</p>"]
    if board.warnings:
        items = "".join(f"<li>{escape(w)}</li>" for w in board.warnings)
        body.append(f'<h2>Warnings</h2><ul class="warn" id="warnings">{items}</ul>')
    for split in sorted(board.cells["split"].unique(), key=lambda s: (s != "public", s)):
        cells = board.cells.filter(pl.col("split") == split)
        methods = sorted(cells["method"].unique())
        body.append(f'<h2 id="split-{escape(split)}">{escape(split.capitalize())} split</h2>'
                    f"<p>{escape(SPLIT_NOTES.get(split, split))}; ranked on its own.</p>")
        body.append(methods_table(cells, methods, f"board-{split}",
                                  link=lambda m: f"{METHODS_DIR}/{board.slugs[m]}.html"))
    return html.page("NeuronBench leaderboard", "\n".join(body))


def method_page(board: Board, method: str) -> str:
    """A method's page: its submission manifest, its headline cells and ranks, and its plots."""
    body = ['<p><a href="../index.html">&larr; leaderboard</a></p>', f"<h1>{escape(method)}</h1>"]
    manifest = board.manifests.get(method)
    if manifest:
        body.append(_manifest_html(manifest))
    mine = board.cells.filter(pl.col("method") == method)
    for split in sorted(mine["split"].unique(), key=lambda s: (s != "public", s)):
        body.append(f"<h2>{escape(split.capitalize())} split</h2>")
        body.append(methods_table(mine.filter(pl.col("split") == split), [method], f"method-{split}"))
    records = board.frame.filter(pl.col("method") == method)
    for key in sorted(set(mine.select(COLUMN_KEY).iter_rows())):
        split, task, version, config_hash, _ = key
        sub = records.filter((pl.col("split") == split) & (pl.col("task") == task)
                             & (pl.col("task_version") == version) & (pl.col("config_hash") == config_hash))
        png = task_plot(task, sub)
        if png is not None:
            body.append(f"<h3>{escape(task)} ({escape(split)}, v{version} · {escape(config_hash[:8])})</h3>")
            body.append(html.png_figure(png, f"{task} plot for {method}"))
    return html.page(f"{method} · NeuronBench leaderboard", "\n".join(body))


def _manifest_html(manifest: dict) -> str:
    keys = [k for k in MANIFEST_FIELDS if k in manifest] + sorted(k for k in manifest if k not in MANIFEST_FIELDS)
    items = []
    for key in keys:
        value = manifest[key]
        text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        inner = escape(text)
        if isinstance(value, dict):
            inner = f"<code>{escape(json.dumps(value, sort_keys=True))}</code>"
        elif isinstance(value, str) and re.match(r"https?://", value):  # never javascript: and the like
            inner = f'<a href="{escape(value)}" rel="noopener">{inner}</a>'
        elif isinstance(value, str) and key == "contact" and "@" in value:
            inner = f'<a href="mailto:{escape(value)}">{inner}</a>'
        items.append(f"<dt>{escape(key)}</dt><dd>{inner}</dd>")
    return f'<h2>Submission</h2><dl class="meta" id="submission">{"".join(items)}</dl>'


def write_site(board: Board, out: Path) -> Path:
    """Write `index.html`, `leaderboard.json` and `methods/*.html` into `out`, replacing it atomically.

    Raises:
        ValueError: `out` exists, is not empty and is not a site this command built.
    """
    out = Path(out)
    with paths.atomic_dir(out, "leaderboard site", legacy=lambda f: (f / DATA).is_file()) as tmp:
        (tmp / INDEX).write_text(index_page(board), encoding="utf-8")
        (tmp / DATA).write_text(json.dumps(board_json(board), indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / METHODS_DIR).mkdir()
        for method, slug in board.slugs.items():
            (tmp / METHODS_DIR / f"{slug}.html").write_text(method_page(board, method), encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private; a site is served to others
    return out


def build_site(folders: list[Path], out: Path) -> Board:
    """Merge the result folders and write the site to `out`; returns what it showed.

    Args:
        folders: folders written by `neuronbench run --out` or `neuronbench submit score`.
        out: the site folder (created or replaced).
    """
    start = time.perf_counter()
    board = build_board(folders)
    write_site(board, out)
    log.info("leaderboard: %d records, %d methods in %.1f s", len(board.frame), len(board.slugs),
             time.perf_counter() - start)
    return board


def _build(args) -> int:
    board = build_site([Path(f) for f in args.results], Path(args.out))
    print(f"wrote {Path(args.out) / INDEX} ({len(board.slugs)} methods, {len(board.frame)} records)")
    return 0


def add_leaderboard_parser(sub: argparse._SubParsersAction) -> None:
    """The `neuronbench leaderboard build` verb."""
    p = sub.add_parser("leaderboard", help="build the static leaderboard site from result folders")
    lsub = p.add_subparsers(dest="what", required=True)
    b = lsub.add_parser("build", help="merge result folders, rank per task and split, write the site")
    b.add_argument("results", nargs="+", help="folders from `neuronbench run --out` or `neuronbench submit score`")
    b.add_argument("--out", required=True, help="site folder to write (replaced if it is a previous site)")
    b.set_defaults(fn=_build)
