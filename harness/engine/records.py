"""Results as long-format records: one row per (run, task, model, method, metric, k, seed).

Aggregation happens here and nowhere else; files are written atomically with the full config.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import polars as pl

from .. import __version__
from . import paths


def utc_stamp() -> str:
    """Now, in UTC, as an ISO 8601 string to the second (the `created` time of runs and builds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


SCHEMA = {
    "run_id": pl.Utf8, "task": pl.Utf8, "task_version": pl.Int64, "model": pl.Utf8, "method": pl.Utf8,
    "metric": pl.Utf8, "k": pl.Float64, "seed": pl.Int64, "value": pl.Float64, "ci_low": pl.Float64,
    "ci_high": pl.Float64, "config_hash": pl.Utf8, "split": pl.Utf8, "status": pl.Utf8,
}
STATUSES = ("ok", "not_applicable", "error")
RESULTS, CONFIG = "results.parquet", "config.json"


@dataclass(frozen=True)
class Record:
    """One measured value. `k` is None where no k applies; `ci_*` None without an interval;
    `split` is the scoring split (`public` or `hidden`, see `RunEnv.scoring_rows`)."""

    task: str
    task_version: int
    model: str
    method: str
    metric: str
    value: float | None
    seed: int
    config_hash: str
    k: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    split: str = "public"
    status: str = "ok"

    def row(self, run_id: str) -> dict:
        out = {name: getattr(self, name) for name in SCHEMA if name != "run_id"}
        out["run_id"] = run_id
        for key in ("value", "ci_low", "ci_high"):
            if out[key] is not None and not math.isfinite(out[key]):
                raise ValueError(f"record {self.task}/{self.method}/{self.metric}: {key} is {out[key]}")
        return out


def to_frame(records: list[Record], run_id: str) -> pl.DataFrame:
    return pl.DataFrame([r.row(run_id) for r in records], schema=SCHEMA)


PACKAGES = ("neuronbench", "torch", "transformers", "datasets", "tokenizers", "numpy", "numba", "polars")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when absent), for records and manifests."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def save_results(frame: pl.DataFrame, config: dict, out_dir: Path) -> Path:
    """Write `results.parquet` and `config.json` (config + versions) into `out_dir`, atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tmp-{RESULTS}"
    frame.write_parquet(tmp)
    tmp.replace(out_dir / RESULTS)
    full = {**config, "harness_version": __version__, "versions": package_versions()}
    paths.atomic_write_json(out_dir / CONFIG, full)
    return out_dir


def load_results(folder: Path) -> tuple[pl.DataFrame, dict]:
    """Read what `save_results` wrote."""
    folder = Path(folder)
    if not (folder / RESULTS).is_file():
        raise FileNotFoundError(f"no {RESULTS} in {folder}: pass the --out folder of a `neuronbench run`")
    return pl.read_parquet(folder / RESULTS), json.loads((folder / CONFIG).read_text())


def headline_table(frame: pl.DataFrame, headlines: dict[str, str]) -> pl.DataFrame:
    """Tasks x methods: the headline metric of each task as `value [ci_low, ci_high]`."""
    rows = []
    for task, metric in headlines.items():
        sub = frame.filter((pl.col("task") == task) & (pl.col("metric").is_in([metric, f"{task}.not_applicable"])))
        for r in sub.iter_rows(named=True):
            cell = "n/a" if r["status"] != "ok" else (
                f"{r['value']:+.3f}" + (f" [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" if r["ci_low"] is not None else ""))
            rows.append({"method": r["method"], "task": f"{task} ({metric})", "cell": cell})
    if not rows:
        return pl.DataFrame()
    return pl.DataFrame(rows).pivot(on="task", index="method", values="cell", aggregate_function="first").sort("method")
