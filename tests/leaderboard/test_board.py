"""`neuronbench leaderboard build`: ranks with ties, the merge, splits, the site in headless Chromium."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import polars as pl
import pytest
from browser import chromium, config_hash, open_page, quick_results, synthetic_records, write_results

from neuronbench.harness import __version__
from neuronbench.harness.cli import main
from neuronbench.harness.engine.records import save_results
from neuronbench.harness.suite.verdicts import verdict_path
from neuronbench.harness.suite.task import TASKS
from neuronbench.leaderboard import board as lb

__all__ = ["quick_results"]  # a shared session fixture

# The constructed case: prune.gap_auc intervals. alpha and beta overlap (both rank 1); gamma and
# delta sit below both and overlap each other (both rank 3); epsilon has no interval (a point).
CASE = {"alpha": (0.7, 0.5, 0.9), "beta": (0.5, 0.4, 0.6), "gamma": (0.2, 0.1, 0.3), "delta": (0.25, 0.1, 0.35),
        "epsilon": (-0.5, None, None)}
EXPECTED = {"alpha": "=1", "beta": "=1", "gamma": "=3", "delta": "=3", "epsilon": "5", "nope": "n/a"}


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def case_records(split: str = "public") -> list:
    """Synthetic prune records of five methods with the headline intervals of CASE, plus one n/a."""
    records = synthetic_records(tasks=("prune",), methods=tuple(CASE), split=split)
    out = []
    for r in records:
        if r.metric == "prune.gap_auc":
            value, lo, hi = CASE[r.method]
            r = dataclasses.replace(r, value=value, ci_low=lo, ci_high=hi)
        out.append(r)
    return out


def write(folder: Path, records: list, created: str | None = None, run_id: str = "run") -> Path:
    write_results(folder, records, run_id)
    if created:  # as a run's config would record it
        config = json.loads((folder / "config.json").read_text())
        save_results(pl.read_parquet(folder / "results.parquet"), {**config, "created": created}, folder)
    return folder


def test_rank_is_one_plus_the_methods_entirely_above():
    assert lb.rank_with_ties([0.5, 0.4, 0.1, 0.1], [0.9, 0.6, 0.3, 0.35]) == [1, 1, 3, 3]
    assert lb.rank_with_ties([3, 2, 1], [3, 2, 1]) == [1, 2, 3]
    assert lb.rank_with_ties([0.0, 0.0], [1.0, 1.0]) == [1, 1]
    assert lb.rank_with_ties([], []) == []


def test_ranks_and_tie_marks_of_the_constructed_case(tmp_path):
    board = lb.build_board([write(tmp_path / "a", case_records())])
    got = {r["method"]: (r["rank"], r["tied"]) for r in board.cells.iter_rows(named=True)}
    assert got == {"alpha": (1, True), "beta": (1, True), "gamma": (3, True), "delta": (3, True),
                   "epsilon": (5, False), "nope": (None, False)}


def test_duplicate_runs_keep_the_newest_and_warn(tmp_path, caplog):
    old = [dataclasses.replace(r, value=r.value - 1) if r.metric == "prune.gap_auc" else r for r in case_records()]
    first = write(tmp_path / "old", old, created="2026-01-01T00:00:00+00:00", run_id="old")
    second = write(tmp_path / "new", case_records(), created="2026-02-01T00:00:00+00:00", run_id="new")
    for order in ([first, second], [second, first]):  # the command-line order does not matter
        board = lb.build_board(order)
        assert board.frame.height == len(case_records())
        assert set(board.frame["run_id"]) == {"new"}
        assert any(str(first) in w and "newer run" in w for w in board.warnings)
    assert "newer run" in caplog.text


def test_without_a_created_time_the_newer_file_wins_and_old_results_lacking_columns_merge(tmp_path):
    old = write(tmp_path / "old", case_records(), run_id="old")
    frame = pl.read_parquet(old / "results.parquet").drop("split", "status")  # written before those existed
    frame.write_parquet(old / "results.parquet")
    config = json.loads((old / "config.json").read_text())  # nor had the records hash
    (old / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "records_sha256"}))
    new = write(tmp_path / "new", case_records(), run_id="new")
    os.utime(old / "results.parquet", (1e9, 1e9))
    board = lb.build_board([new, old])
    assert set(board.frame["run_id"]) == {"new"} and set(board.frame["split"]) == {"public"}


def test_a_broken_manifest_is_named(tmp_path):
    folder = write(tmp_path / "a", case_records())
    (folder / lb.MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="submission.json is not valid JSON"):
        lb.build_board([folder])


def test_a_task_version_mismatch_is_ranked_in_a_separate_column_and_warned(tmp_path):
    installed = TASKS.get("prune").spec.version
    v1 = write(tmp_path / "v1", synthetic_records(tasks=("prune",), methods=("alpha", "beta"), n_a=(),
                                                  version=installed))
    v2 = write(tmp_path / "v2", synthetic_records(tasks=("prune",), methods=("gamma",), n_a=(), version=installed + 1))
    board = lb.build_board([v1, v2])
    columns = board.cells.select("task_version", "config_hash").unique()
    assert sorted(columns["task_version"]) == [installed, installed + 1]
    assert board.cells.filter(pl.col("method") == "gamma")["rank"].to_list() == [1]  # alone in its column
    assert any("2 configurations" in w and "ranked apart" in w for w in board.warnings)
    assert any(f"task version(s) [{installed + 1}]" in w for w in board.warnings)  # not the installed one
    assert lb.index_page(board).count('<th scope="col"') == 3


def test_public_and_hidden_splits_are_ranked_apart(tmp_path):
    hidden = [dataclasses.replace(r, value=-r.value if r.method == "alpha" and r.value else r.value,
                                  ci_low=None, ci_high=None) if r.metric == "prune.gap_auc" else r
              for r in case_records("hidden")]
    board = lb.build_board([write(tmp_path / "pub", case_records()), write(tmp_path / "hid", hidden, run_id="h")])
    rank = {(r["split"], r["method"]): r["rank"] for r in board.cells.iter_rows(named=True)}
    assert rank[("public", "alpha")] == 1 and rank[("hidden", "alpha")] == 5
    page = lb.index_page(board)
    assert 'id="board-public"' in page and 'id="board-hidden"' in page


def test_leaderboard_json_is_the_table_as_data(tmp_path):
    board = lb.build_board([write(tmp_path / "a", case_records())])
    data = lb.board_json(board)
    assert data["harness_version"] == __version__
    entries = {e["method"]: e for e in data["entries"]}
    assert entries["alpha"]["rank"] == 1 and entries["alpha"]["tied"] and entries["nope"]["status"] == "not_applicable"
    assert data["methods"]["alpha"]["page"] == "methods/alpha.html"


def test_method_pages_get_distinct_safe_names():
    slugs = lb.method_slugs(["a/b", "a b", "../x", "plain"])
    assert slugs["plain"] == "plain" and len(set(slugs.values())) == 4
    assert all("/" not in s and not s.startswith(".") for s in slugs.values())


def test_site_in_chromium_ranks_links_sorting_and_the_submission(tmp_path, browser, isolated_home):
    folder = write(tmp_path / "sub", case_records())
    manifest = {"method": "beta", "method_version": "1.2", "authors": ["Ada L."], "contact": "ada@example.org",
                "description": "a method", "code_url": "https://example.org/beta", "license": "MIT",
                "tasks": {"prune": {"task_version": 1}}}
    (folder / lb.MANIFEST).write_text(json.dumps(manifest))
    verdict = verdict_path("prune", config_hash("prune"))
    verdict.parent.mkdir(parents=True)
    verdict.write_text(json.dumps({"passed": False, "failures": ["noise wins"]}))
    site = tmp_path / "site"
    assert main(["leaderboard", "build", str(folder), "--out", str(site)]) == 0
    page = open_page(browser, site / lb.INDEX)
    table = page.table("board-public")
    assert page.errors == []
    assert sorted(r[0] for r in table["rows"]) == sorted(EXPECTED)
    assert {r[0]: r[1].split()[0] for r in table["rows"]} == EXPECTED
    assert "sanity failed: noise wins" in table["headers"][1]
    links = [a for a in page.facts()["links"] if a["href"].startswith(lb.METHODS_DIR)]
    assert len(links) == len(EXPECTED) and all((site / a["href"]).is_file() for a in links)
    page.click_header("board-public", "prune")
    assert [r[0] for r in page.table("board-public")["rows"]] == ["epsilon", "gamma", "delta", "beta", "alpha", "nope"]
    page.click_header("board-public", "prune")
    assert [r[0] for r in page.table("board-public")["rows"]][:2] == ["alpha", "beta"]
    assert page.errors == []

    details = open_page(browser, site / lb.METHODS_DIR / "beta.html")
    facts = details.facts()
    assert details.errors == [] and facts["images"] and all(i["width"] > 0 for i in facts["images"])
    text = details.page.inner_text("#submission")
    assert all(str(v) in text for k, v in manifest.items() if isinstance(v, str)) and "Ada L." in text
    assert '"task_version": 1' in text
    assert details.table("method-public")["rows"][0][1].startswith("=1")
    assert any(a["href"] == "../index.html" for a in facts["links"])


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["leaderboard", "build", str(tmp_path / "nothing"), "--out", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neuronbench run" in err and not (tmp_path / "site").exists()
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "thesis.tex").write_text("precious")
    folder = write(tmp_path / "a", case_records())
    assert main(["leaderboard", "build", str(folder), "--out", str(keep)]) == 2
    assert "not a leaderboard site" in capsys.readouterr().err and (keep / "thesis.tex").is_file()


def test_a_failed_build_leaves_the_previous_site_whole(tmp_path, monkeypatch):
    folder = write(tmp_path / "a", case_records())
    site = tmp_path / "site"
    lb.build_site([folder], site)
    before = {p.relative_to(site): p.read_bytes() for p in site.rglob("*") if p.is_file()}

    def broken(board, method):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(lb, "method_page", broken)
    with pytest.raises(RuntimeError):
        lb.build_site([folder], site)
    assert {p.relative_to(site): p.read_bytes() for p in site.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.slow
@pytest.mark.realmodel
def test_site_of_a_real_quick_run_and_a_submission(quick_results, tmp_path, browser):
    submission = write(tmp_path / "submission", synthetic_records(tasks=("prune",), methods=("mine",), n_a=()))
    (submission / lb.MANIFEST).write_text(json.dumps({"method": "mine", "authors": "Me"}))
    board = lb.build_site([quick_results, submission], tmp_path / "site")
    assert any("2 configurations" in w for w in board.warnings)  # a synthetic config is not the real one
    page = open_page(browser, tmp_path / "site" / lb.INDEX)
    rows = [r[0] for r in page.table("board-public")["rows"]]
    assert page.errors == [] and sorted(rows) == ["activation", "contrast", "mine", "random", "txray"]
    for method in ("contrast", "mine"):
        details = open_page(browser, tmp_path / "site" / lb.METHODS_DIR / f"{method}.html")
        facts = details.facts()
        assert details.errors == [] and facts["images"] and all(i["width"] > 0 for i in facts["images"])


def test_a_submission_never_shadows_a_baseline_and_a_renamed_one_is_refused(tmp_path):
    """Issue 13, case 5: submissions are namespaced (submitter/method@version)."""
    from neuronbench.leaderboard.score import ScoreConfig, score_submission
    from neuronbench.leaderboard.submission import read_manifest, submission_id

    from ._exports import copy_of

    baseline = write(tmp_path / "baseline", synthetic_records(tasks=("ppl-trend",), methods=("random",), n_a=()))
    submission = copy_of("random", tmp_path)  # its manifest says "method": "random", like the baseline
    scored = tmp_path / "scored"
    score_submission(ScoreConfig(str(submission), out=str(scored), tasks=("ppl-trend",)))
    board = lb.build_board([baseline, scored])
    name = submission_id(read_manifest(submission))
    assert "/" in name and set(board.frame["method"]) == {"random", name}
    assert set(board.frame.filter(pl.col("method") == "random")["source"]) == {str(baseline)}
    again = tmp_path / "scored-again"  # the scorer names the submitter
    score_submission(ScoreConfig(str(submission), out=str(again), tasks=("ppl-trend",), submitter="Ada L."))
    assert set(pl.read_parquet(again / "results.parquet")["method"]) == {"Ada-L./random@" + name.split("@")[1]}
    frame = pl.read_parquet(scored / "results.parquet").with_columns(method=pl.lit("random"))
    save_results(frame, json.loads((scored / "config.json").read_text()), scored)  # a doctored scored folder
    with pytest.raises(ValueError, match="namespaced id"):
        lb.build_board([baseline, scored])


def test_a_manifest_with_a_duplicate_key_is_rejected(tmp_path):
    from neuronbench.leaderboard.validate import validate

    from ._exports import copy_of

    submission = copy_of("random", tmp_path)
    text = (submission / lb.MANIFEST).read_text()
    (submission / lb.MANIFEST).write_text(text.replace('"method": "random"', '"method": "random", "method": "lca"', 1))
    assert any("duplicate key(s) 'method'" in p.message for p in validate(submission))
    with pytest.raises(ValueError, match="duplicate key"):  # the board reads manifests the same way
        lb.build_board([_with_manifest(tmp_path / "run", submission / lb.MANIFEST)])


def _with_manifest(folder: Path, manifest: Path) -> Path:
    write(folder, case_records())
    (folder / lb.MANIFEST).write_bytes(manifest.read_bytes())
    return folder
