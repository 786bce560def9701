"""Quick-scale exports shared by the leaderboard tests: each method is exported once per test
session (the tests copy a submission before changing it)."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import polars as pl

from neuronbench.leaderboard.export import ExportConfig, ExportResult, export_submission
from neuronbench.leaderboard.score import ScoreConfig, score_submission

_ROOT = Path(tempfile.mkdtemp(prefix="nb-submissions-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
KEY = ["task", "metric", "k", "seed"]


@functools.lru_cache(maxsize=None)
def exported(method: str) -> ExportResult:
    """`method` exported at quick scale for every task it supports (seed 0)."""
    return export_submission(ExportConfig(method=method, out=str(_ROOT / method), quick=True))


@functools.lru_cache(maxsize=None)
def scored(method: str, split: str = "public", hidden_seed: int | None = None) -> pl.DataFrame:
    """The records of re-scoring `method`'s export."""
    frame, _ = score_submission(ScoreConfig(str(exported(method).folder), split=split), hidden_seed=hidden_seed)
    return frame


def copy_of(method: str, dest: Path) -> Path:
    """A private copy of `method`'s export, to damage."""
    return Path(shutil.copytree(exported(method).folder, dest / "submission"))


def comparable(frame: pl.DataFrame) -> pl.DataFrame:
    """Records without the run id, in a fixed order."""
    return frame.drop("run_id").sort(KEY, nulls_last=True)
