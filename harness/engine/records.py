"""Results as long-format records: one row per (run, task, model, method, metric, k, seed).

Aggregation happens here and nowhere else; files are written atomically with the full config.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
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


def records_hash(frame: pl.DataFrame) -> str:
    """SHA-256 of a records frame's rows (in order), the same for the same records on any machine."""
    rows = json.dumps(frame.rows(), default=str, separators=(",", ":"))
    return hashlib.sha256(f"{frame.columns}{rows}".encode()).hexdigest()


def save_results(frame: pl.DataFrame, config: dict, out_dir: Path) -> Path:
    """Write `results.parquet` and `config.json` (config + versions) into `out_dir`, atomically,
    bound to each other: both carry the run id and the hash of the records (`load_results` checks)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    binding = {"run_id": config.get("run_id"), "records_sha256": records_hash(frame)}
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{RESULTS}-", dir=out_dir)
    os.close(fd)
    try:
        frame.write_parquet(tmp, metadata={"neuronbench": json.dumps(binding)})
        os.chmod(tmp, 0o644)  # results are for reading; mkstemp makes files private
        os.replace(tmp, out_dir / RESULTS)
    finally:
        Path(tmp).unlink(missing_ok=True)
    full = {**config, **binding, "harness_version": __version__, "versions": package_versions()}
    paths.atomic_write_json(out_dir / CONFIG, full)
    return out_dir


def load_results(folder: Path) -> tuple[pl.DataFrame, dict]:
    """Read what `save_results` wrote, checking that the two files belong to the same run.

    Raises:
        FileNotFoundError: no results in `folder`.
        ValueError: a file is unreadable or not NeuronBench's, or the pair comes from two runs.
    """
    folder = Path(folder)
    if not (folder / RESULTS).is_file():
        raise FileNotFoundError(f"no {RESULTS} in {folder}: pass the --out folder of a `neuronbench run`")
    try:
        frame = pl.read_parquet(folder / RESULTS)
    except Exception as err:  # polars raises several unrelated classes for a damaged file
        raise ValueError(f"{folder / RESULTS} is not a readable parquet file ({type(err).__name__}); "
                         "run the command that wrote it again") from err
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder / CONFIG} is missing or not JSON ({err}); run the command that wrote "
                         f"{folder} again") from err
    missing = set(SCHEMA) - {"split", "status"} - set(frame.columns)  # results older than those columns load
    if not isinstance(config, dict) or missing:
        raise ValueError(f"{folder} is not a NeuronBench results folder ("
                         + (f"{RESULTS} lacks columns {sorted(missing)})" if missing else f"{CONFIG} is not an object)"))
    _check_bound(folder, frame, config)
    return frame, config


def _check_bound(folder: Path, frame: pl.DataFrame, config: dict) -> None:
    run_ids = set(frame["run_id"].unique().to_list())
    if run_ids and run_ids != {config.get("run_id")}:
        raise ValueError(f"{folder}: {RESULTS} holds run {sorted(map(str, run_ids))} but {CONFIG} describes run "
                         f"{config.get('run_id')!r}; the two files come from different runs: rerun it")
    if "records_sha256" in config and config["records_sha256"] != records_hash(frame):
        raise ValueError(f"{folder}: {RESULTS} does not hold the records {CONFIG} was written with (hash "
                         "mismatch); the files were changed or mixed from two runs: rerun it")


def per_k_last(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` with its k-less rows first, order kept otherwise: a task may record its headline metric
    per k and summarised over k (`txray-prune`), and then the summary (k null) is the headline."""
    return frame.sort(pl.col("k").is_not_null(), maintain_order=True)


def headline_table(frame: pl.DataFrame, headlines: dict[str, str]) -> pl.DataFrame:
    """Tasks x methods: the headline metric of each task as `value [ci_low, ci_high]`."""
    rows = []
    for task, metric in headlines.items():
        sub = frame.filter((pl.col("task") == task) & (pl.col("metric").is_in([metric, f"{task}.not_applicable"])))
        sub = per_k_last(sub)
        for r in sub.iter_rows(named=True):
            cell = "n/a" if r["status"] != "ok" else (
                f"{r['value']:+.3f}" + (f" [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" if r["ci_low"] is not None else ""))
            rows.append({"method": r["method"], "task": f"{task} ({metric})", "cell": cell})
    if not rows:
        return pl.DataFrame()
    return pl.DataFrame(rows).pivot(on="task", index="method", values="cell", aggregate_function="first").sort("method")
