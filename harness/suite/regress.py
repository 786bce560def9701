"""`neuronbench regress`: compare a result set with a baseline one and fail on a regression.

Rows are matched on (task, task version, model, method, metric, k, split). Only rows of the same
task version are compared; the same version with a different spec fingerprint is itself a failure
(a spec changed without a version bump).
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ..engine.records import load_results
from .task import TASKS

KEY = ["task", "task_version", "model", "method", "metric", "k", "split"]
SCOPES = ("headline", "all")


@dataclass(frozen=True)
class RegressConfig:
    """How two result sets are compared.

    Attributes:
        tolerance: absolute change a value may make without counting as moved.
        scope: `headline` compares each task's headline metric, where lower is a regression;
            `all` compares every metric, where any move is one (for a harness's own golden results).
        outside_ci: count a move only when the new value also leaves the baseline's interval
            (for comparisons across seeds or machines, where values move within their noise).
    """

    tolerance: float = 1e-6
    scope: str = "headline"
    outside_ci: bool = False
    tolerances: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"regress scope {self.scope!r}: use one of {SCOPES}")
        for name, value in (("tolerance", self.tolerance), *self.tolerances):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"regress tolerance {value!r} for {name!r} must be a number >= 0")

    def tolerance_for(self, metric: str) -> float:
        """The first of `tolerances` whose glob `metric` matches, else `tolerance`."""
        return float(next((v for pattern, v in self.tolerances if fnmatch.fnmatchcase(metric, pattern)), self.tolerance))


def read_tolerances(path: Path) -> tuple[tuple[str, float], ...]:
    """Per-metric tolerances from a JSON object `{"metric glob": tolerance, ...}` (first match wins).

    Raises:
        ValueError: the file is not such an object.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"cannot read the tolerances file {path} ({type(err).__name__}): it must be a JSON "
                         'object like {"prune.*": 0.05}') from None
    if not isinstance(data, dict):
        raise ValueError(f"the tolerances file {path} holds a {type(data).__name__}: it must be a JSON object "
                         'like {"prune.*": 0.05}')
    out = tuple(data.items())
    RegressConfig(tolerances=out)  # checks the values
    return out


def _headlines(frame: pl.DataFrame) -> pl.DataFrame:
    tasks = [t for t in frame["task"].unique().to_list() if t in TASKS.names()]
    heads = pl.DataFrame({"task": tasks, "metric": [TASKS.get(t).spec.headline for t in tasks]},
                         schema={"task": pl.Utf8, "metric": pl.Utf8})
    return frame.join(heads, on=["task", "metric"], how="semi")


def compare(new: pl.DataFrame, old: pl.DataFrame, config: RegressConfig = RegressConfig()) -> pl.DataFrame:
    """One row per compared baseline row: old and new values, the change and a `status`:
    `ok`, `moved` (beyond tolerance, not harmful in this scope), `regression`, `missing` (in the
    baseline, not in the new set: a regression), `spec_changed` (same version, other fingerprint:
    a regression) or `version_changed` (not compared)."""
    new, old = (f.filter(pl.col("status") == "ok") for f in (new, old))
    if config.scope == "headline":
        new, old = _headlines(new), _headlines(old)
    cols = [*KEY, "value", "ci_low", "ci_high", "config_hash"]
    versions = new.select("task", pl.col("task_version").alias("new_version")).unique()
    joined = (old.select(cols).unique(subset=KEY, keep="last")
              .join(new.select(cols).unique(subset=KEY, keep="last"), on=KEY, how="left", suffix="_new", nulls_equal=True)
              .join(versions.group_by("task").agg(pl.col("new_version").max()), on="task", how="left"))
    delta = pl.col("value_new") - pl.col("value")
    outside = (pl.col("value_new") < pl.col("ci_low")) | (pl.col("value_new") > pl.col("ci_high"))
    tolerance = {m: config.tolerance_for(m) for m in joined["metric"].unique().to_list()}
    moved = delta.abs() > pl.col("metric").replace_strict(tolerance, return_dtype=pl.Float64)
    if config.outside_ci:
        moved = moved & outside.fill_null(True)
    harmful = moved & (delta < 0) if config.scope == "headline" else moved
    status = (pl.when(pl.col("value_new").is_null() & pl.col("new_version").is_not_null()
                      & (pl.col("new_version") != pl.col("task_version"))).then(pl.lit("version_changed"))
              .when(pl.col("config_hash_new").is_null()).then(pl.lit("missing"))
              .when(pl.col("config_hash_new") != pl.col("config_hash")).then(pl.lit("spec_changed"))
              .when(harmful).then(pl.lit("regression"))
              .when(moved).then(pl.lit("moved"))
              .otherwise(pl.lit("ok")))
    return joined.with_columns(delta.alias("change"), outside.alias("outside_ci"), status.alias("status")).select(
        "task", "task_version", "model", "method", "metric", "k", "split", pl.col("value").alias("baseline"),
        pl.col("value_new").alias("new"), "change", "ci_low", "ci_high", "outside_ci", "status")


FAILING = ("regression", "missing", "spec_changed")


def regress(results: Path, against: Path, config: RegressConfig = RegressConfig()) -> pl.DataFrame:
    """`compare` of the result folders `results` (new) and `against` (baseline)."""
    new, _ = load_results(Path(results))
    old, _ = load_results(Path(against))
    return compare(new, old, config)


def _cli(args) -> int:
    config = RegressConfig(tolerance=args.tolerance, scope=args.scope, outside_ci=args.outside_ci,
                           tolerances=read_tolerances(Path(args.tolerances)) if args.tolerances else ())
    table = regress(Path(args.results), Path(args.against), config)
    shown = table.filter(pl.col("status") != "ok")
    counts = dict(table.group_by("status").len().iter_rows())
    with pl.Config(tbl_rows=200, tbl_cols=20, fmt_str_lengths=50, tbl_width_chars=220, float_precision=4):
        if not shown.is_empty():
            print(shown.sort("status", "task", "method", "metric", "k", nulls_last=True))
    failing = sum(counts.get(s, 0) for s in FAILING)
    print(f"compared {len(table)} {config.scope} rows against {args.against}: "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    print("REGRESSION" if failing else "no regression")
    return 1 if failing else 0


def add_regress_parser(sub) -> None:
    p = sub.add_parser("regress", help="compare results with a baseline result set; exit 1 on a regression")
    p.add_argument("results", help="the new results folder (results.parquet + config.json)")
    p.add_argument("--against", required=True, help="the baseline results folder")
    p.add_argument("--tolerance", type=float, default=1e-6, help="absolute change allowed (default 1e-6)")
    p.add_argument("--scope", choices=SCOPES, default="headline",
                   help="headline: a task's headline going down is a regression; all: any metric moving is")
    p.add_argument("--tolerances", metavar="FILE",
                   help='JSON object of per-metric tolerances, e.g. {"prune.*": 0.05} (first match; else --tolerance)')
    p.add_argument("--outside-ci", action="store_true",
                   help="count a change only if the new value leaves the baseline's interval")
    p.set_defaults(fn=_cli)
