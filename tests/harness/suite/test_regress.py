"""`regress`: an unchanged method passes, a deliberately worsened one is caught, specs are guarded."""
from __future__ import annotations

import polars as pl
import pytest

from neuronbench.baselines.contrast import Contrast
from neuronbench.harness.engine.cache import Cache
from neuronbench.harness.cli import main
from neuronbench.harness.engine.records import save_results, to_frame
from neuronbench.harness.suite.regress import RegressConfig, compare
from neuronbench.harness.suite.task import TASKS, RunEnv

HEADLINE = TASKS.get("descriptors").spec.headline


class WorseContrast(Contrast):
    """`contrast` with a bug: its descriptor lists come out in reverse order."""

    def descriptors(self, ctx, vocabulary):
        return {n: list(reversed(d)) for n, d in super().descriptors(ctx, vocabulary).items()}


def _run(method, tmp_path_factory, tag: str) -> pl.DataFrame:
    task = TASKS.get("descriptors")
    env = RunEnv(seed=0, quick=True, cache=Cache(tmp_path_factory.mktemp(f"cache-{tag}")), progress=False)
    return to_frame(task.score(task.spec.quick_version(), method, env), tag)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {"base": _run(Contrast(), tmp_path_factory, "base"), "again": _run(Contrast(), tmp_path_factory, "again"),
            "worse": _run(WorseContrast(), tmp_path_factory, "worse")}


def test_an_unchanged_method_passes_even_on_every_metric(runs):
    for scope in ("headline", "all"):
        table = compare(runs["again"], runs["base"], RegressConfig(scope=scope))
        assert len(table) > (1 if scope == "all" else 0)
        assert table["status"].to_list() == ["ok"] * len(table)


def test_a_worsened_method_is_a_regression(runs):
    table = compare(runs["worse"], runs["base"], RegressConfig(scope="headline", tolerance=0.01))
    row = table.row(0, named=True)
    assert row["metric"] == HEADLINE and row["status"] == "regression"
    assert row["change"] < -0.01 and row["outside_ci"]
    # the other way round it is an improvement: moved, not a regression
    better = compare(runs["base"], runs["worse"], RegressConfig(tolerance=0.01))
    assert better["status"].to_list() == ["moved"]


def test_missing_rows_spec_changes_and_version_bumps(runs):
    base = runs["base"]
    assert compare(base.filter(pl.col("metric") != HEADLINE), base)["status"].to_list() == ["missing"]
    edited = base.with_columns(pl.lit("0123456789abcdef").alias("config_hash"))
    assert compare(edited, base)["status"].to_list() == ["spec_changed"]
    bumped = base.with_columns(pl.lit(99).cast(pl.Int64).alias("task_version"))
    assert compare(bumped, base)["status"].to_list() == ["version_changed"]


def test_outside_ci_ignores_moves_within_the_interval(runs):
    base = runs["base"]
    nudged = base.with_columns(pl.when(pl.col("metric") == HEADLINE).then(pl.col("value") - 0.02)
                               .otherwise(pl.col("value")).alias("value"))
    assert compare(nudged, base, RegressConfig(tolerance=0.01))["status"].to_list() == ["regression"]
    assert compare(nudged, base, RegressConfig(tolerance=0.01, outside_ci=True))["status"].to_list() == ["ok"]


def test_cli_exit_codes_and_table(runs, tmp_path, capsys):
    for name in ("base", "again", "worse"):
        save_results(runs[name], {"run_id": name}, tmp_path / name)
    assert main(["regress", str(tmp_path / "again"), "--against", str(tmp_path / "base"), "--scope", "all"]) == 0
    assert "no regression" in capsys.readouterr().out
    assert main(["regress", str(tmp_path / "worse"), "--against", str(tmp_path / "base")]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and HEADLINE in out and "contrast" in out
    assert main(["regress", str(tmp_path / "nothing"), "--against", str(tmp_path / "base")]) == 2
    assert "no results.parquet" in capsys.readouterr().err
    with pytest.raises(ValueError, match="scope"):
        RegressConfig(scope="some")


def test_per_metric_tolerances_first_match_wins_else_the_default(runs, tmp_path, capsys):
    worse = runs["base"].with_columns(value=pl.col("value") + 0.01, run_id=pl.lit("worse"))
    loose = RegressConfig(scope="all", tolerances=(("descriptors.data.*", 0.02), ("descriptors.*", 0.0)))
    table = compare(worse, runs["base"], loose)
    moved = set(table.filter(pl.col("status") == "regression")["metric"])
    assert moved and not any(m.startswith("descriptors.data.") for m in moved)
    (tmp_path / "tol.json").write_text('{"descriptors.*": 0.02}')
    save_results(worse, {"run_id": "worse"}, tmp_path / "worse")
    save_results(runs["base"], {"run_id": "base"}, tmp_path / "base")
    argv = ["regress", str(tmp_path / "worse"), "--against", str(tmp_path / "base"), "--scope", "all"]
    assert main([*argv, "--tolerances", str(tmp_path / "tol.json")]) == 0
    (tmp_path / "tol.json").write_text('["descriptors.*", 0.02]')
    assert main([*argv, "--tolerances", str(tmp_path / "tol.json")]) == 2
    assert "must be a JSON object" in capsys.readouterr().err


def test_the_golden_tolerances_file_is_valid():
    from pathlib import Path

    from neuronbench.harness.suite.regress import read_tolerances

    globs = [g for g, _ in read_tolerances(Path(__file__).parents[2] / "golden" / "tolerances.json")]
    assert {g for g in globs if g.endswith(".*")} == {f"{t}.*" for t in TASKS.names()}
    for i, glob in enumerate(globs):
        task = glob.split(".")[0]
        assert task in TASKS.names(), glob
        if not glob.endswith(".*"):  # a metric's own tolerance must come before its task's catch-all
            assert i < globs.index(f"{task}.*"), glob
