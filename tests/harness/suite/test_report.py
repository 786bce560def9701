"""`neuronbench report`: the page in headless Chromium, tasks left out, errors, atomic writes."""
from __future__ import annotations

import json
import pathlib

import pytest
from browser import HEADLINES, chromium, config_hash, open_page, quick_results, synthetic_records, write_results

from neuronbench.harness.suite import report
from neuronbench.harness.cli import main
from neuronbench.harness.engine import paths
from neuronbench.harness.engine.records import to_frame
from neuronbench.harness.suite.verdicts import verdict_path

__all__ = ["quick_results"]  # a shared session fixture


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def _numbers(keys: list[str | None]) -> list[float]:
    return [float(k) for k in keys if k]


def test_report_page_loads_offline_sorts_and_flags_a_failed_sanity_check(tmp_path, browser, isolated_home):
    folder = write_results(tmp_path / "run", synthetic_records())
    verdict = verdict_path("prune", config_hash("prune"))
    verdict.parent.mkdir(parents=True)
    verdict.write_text(json.dumps({"passed": False, "failures": ["random method beat chance"]}))
    page = open_page(browser, report.write_report(folder))
    facts = page.facts()
    assert page.errors == []
    table = page.table("headlines")
    assert [row[0] for row in table["rows"]] == ["alpha", "beta", "gamma", "nope"]
    assert table["headers"][0] == "method" and len(table["headers"]) == 1 + len(HEADLINES)
    assert all(cell == "n/a" for cell in table["rows"][3][1:])
    flagged = [h for h in table["headers"] if "sanity failed" in h]
    assert len(flagged) == 1 and flagged[0].startswith("prune") and "random method beat chance" in flagged[0]
    assert len(facts["images"]) == len(HEADLINES) and all(i["width"] > 0 for i in facts["images"])
    pngs = report.plots_dir(folder / report.REPORT_FILE)
    assert sorted(p.name for p in pngs.iterdir() if p.name != paths.MARKER) == sorted(f"{t}.png" for t in HEADLINES)

    col = table["headers"].index(next(h for h in table["headers"] if h.startswith("probe")))
    page.click_header("headlines", "probe")
    keys = [row[col] for row in page.table("headlines")["keys"]]
    assert _numbers(keys) == sorted(_numbers(keys)) and keys[-1] == ""  # n/a sorts last
    page.click_header("headlines", "probe")
    keys = [row[col] for row in page.table("headlines")["keys"]]
    assert _numbers(keys) == sorted(_numbers(keys), reverse=True) and keys[-1] == ""
    page.click_header("headlines", "method")
    assert [r[0] for r in page.table("headlines")["rows"]] == ["alpha", "beta", "gamma", "nope"]
    assert page.errors == []


def test_tasks_absent_from_the_results_are_left_out(tmp_path):
    folder = write_results(tmp_path / "run", synthetic_records(tasks=("probe",), methods=("alpha",), n_a=()))
    page, figures = report.build_report(*report.read_results(folder))
    assert list(figures) == ["probe"]
    assert 'id="task-probe"' in page and "task-prune" not in page and "descriptors" not in page
    assert page.count("data:image/png;base64,") == 1


def _artifact(cache, method: str, model: str, title: str, l0: list[float], version: str | None = None):
    """A cached artifact with training curves, as a method writes one (see baselines/diffmask.py)."""
    steps = list(range(1, len(l0) + 1))

    def write(folder):
        (folder / "curves.json").write_text(json.dumps({"step": steps, "kl": [0.05] * len(l0), "l0": l0,
                                                        "dev_step": steps[-1:], "dev_l0": l0[-1:]}))
        return {"curves": {"name": title, "title": f"{title}: {l0[-1]}", "panels": [["kl", "KL"], ["l0", "keep"]],
                           "lines": {"kl": [[0.1, "budget"]]}, "marked_step": steps[-1]}}

    entry = cache.put(cache.key({"method": method, "model_name": model, "title": title, "l0": l0}), write,
                      {"method": method, "model_name": model})
    if version:  # an entry an older harness wrote
        meta = json.loads((entry.path / "meta.json").read_text())
        (entry.path / "meta.json").write_text(json.dumps({**meta, "harness_version": version}))
    return entry


def test_training_curves_of_the_runs_methods_and_models_are_drawn(tmp_path):
    from neuronbench.harness import __version__
    from neuronbench.harness.engine.cache import Cache

    cache = Cache(tmp_path / "cache")
    _artifact(cache, "alpha", "tiny", "layer 0", [1.0, 0.8, 0.6])
    newest = _artifact(cache, "alpha", "tiny", "layer 1", [1.0, 0.9])
    _artifact(cache, "alpha", "tiny", "layer 2", [1.0, 0.5], version="0.0.1")  # another harness version
    _artifact(cache, "alpha", "other-model", "layer 0", [1.0, 0.7])
    _artifact(cache, "zeta", "tiny", "layer 0", [1.0, 0.7])  # a method not in the run
    meta = json.loads((newest.path / "meta.json").read_text())
    older = _artifact(cache, "alpha", "tiny", "layer 1", [1.0, 0.95, 0.9, 0.7])
    (older.path / "meta.json").write_text(json.dumps({**json.loads((older.path / "meta.json").read_text()),
                                                      "created": "2000-01-01T00:00:00"}))
    frame = to_frame(synthetic_records(tasks=("erasure",), methods=("alpha", "beta"), n_a=()), "r")
    runs = report.trained_artifacts(frame, {"harness_version": __version__}, cache)
    assert list(runs) == ["alpha on tiny"]
    assert [r.title for r in runs["alpha on tiny"]] == ["layer 0: 0.6", "layer 1: 0.9"]
    assert runs["alpha on tiny"][1].curves["l0"] == [1.0, 0.9] and meta["created"] > "2000"  # the newest
    assert runs["alpha on tiny"][0].lines == {"kl": ((0.1, "budget"),)} and runs["alpha on tiny"][0].marked_step == 3
    page, figures = report.build_report(frame, {"harness_version": __version__}, cache)
    assert list(figures) == ["erasure", "training-alpha-on-tiny"] and figures["training-alpha-on-tiny"][:4] == b"\x89PNG"
    assert 'id="training"' in page and page.count("data:image/png;base64,") == 2
    page, figures = report.build_report(frame, {"harness_version": __version__}, Cache(tmp_path / "empty"))
    assert list(figures) == ["erasure"] and 'id="training"' not in page


def test_headline_cells_prefer_the_headline_and_mark_not_applicable():
    records = synthetic_records(tasks=("prune",), methods=("alpha",), n_a=("nope",))
    cells = report.headline_cells(to_frame(records, "r"), {"prune": "prune.gap_auc"})
    assert cells.height == 2
    by = {r["method"]: r for r in cells.iter_rows(named=True)}
    assert by["alpha"]["metric"] == "prune.gap_auc" and by["alpha"]["status"] == "ok"
    assert by["nope"]["status"] == "not_applicable" and by["nope"]["value"] is None


def test_a_headline_recorded_per_k_and_over_k_is_read_over_k():
    """txray-prune records its headline metric per k and summarised (k null): every table reads the summary."""
    from neuronbench.harness.engine.records import Record, headline_table
    from neuronbench.harness.suite.sanity import _headline
    from neuronbench.harness.suite.task import TASKS

    metric = "txray-prune.head.most_vs_random"
    common = dict(task="txray-prune", task_version=1, model="m", method="alpha", metric=metric, seed=0,
                  split="public", config_hash="h")
    records = [Record(value=v, k=k, ci_low=v - 0.01, ci_high=v + 0.01, **common)
               for v, k in ((-0.5, 0.01), (-0.4, 0.05), (0.25, None), (-0.3, 0.1))]
    frame = to_frame(records, "r")
    assert report.headline_cells(frame, {"txray-prune": metric})["value"].to_list() == [0.25]
    assert headline_table(frame, {"txray-prune": metric}).row(0)[1].startswith("+0.250")
    assert _headline(frame, TASKS.get("txray-prune").spec, "reference", "alpha").value == 0.25


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "neuronbench run"),
    (lambda d: (d.mkdir(), (d / "notes.txt").write_text("x")), "neuronbench run"),
    (lambda d: write_results(d, synthetic_records(tasks=("probe",))) and (d / "config.json").unlink(),
     "config.json"),
])
def test_a_folder_without_results_exits_2_with_one_line(tmp_path, capsys, make, message):
    folder = tmp_path / "results"
    make(folder)
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("neuronbench: error:") and message in err
    assert not (folder / report.REPORT_FILE).exists()


def test_a_failed_write_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    folder = write_results(tmp_path / "run", synthetic_records(tasks=("probe",), methods=("alpha",)))
    page = report.write_report(folder)
    pngs = report.plots_dir(page)
    before, png = page.read_bytes(), (pngs / "probe.png").read_bytes()

    def broken(self, data):
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_bytes", broken)
    with pytest.raises(OSError, match="disk full"):
        report.write_report(folder)
    assert page.read_bytes() == before and (pngs / "probe.png").read_bytes() == png
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp")]


def test_never_replaces_a_folder_of_other_files(tmp_path):
    folder = write_results(tmp_path / "run", synthetic_records(tasks=("probe",), methods=("alpha",)))
    mine = tmp_path / "notes-plots"
    mine.mkdir()
    (mine / "draft.txt").write_text("precious")
    with pytest.raises(ValueError, match="NeuronBench did not write"):
        report.write_report(folder, tmp_path / "notes.html")
    assert (mine / "draft.txt").read_text() == "precious"


def test_run_writes_the_report_unless_told_not_to(tmp_path, monkeypatch, capsys):
    from neuronbench.harness.suite import runner

    records = synthetic_records(tasks=("prune",), methods=("alpha",), n_a=())

    def fake_run_suite(config, resume=False):
        write_results(pathlib.Path(config.out), records)
        return to_frame(records, "fake"), {}

    monkeypatch.setattr(runner, "run_suite", fake_run_suite)
    assert main(["run", "--out", str(tmp_path / "a"), "--no-report"]) == 0
    assert not (tmp_path / "a" / report.REPORT_FILE).exists()
    assert main(["run", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / report.REPORT_FILE).is_file() and "report:" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.realmodel
def test_report_of_a_real_quick_run_in_chromium(quick_results, browser):
    page = open_page(browser, quick_results / report.REPORT_FILE)  # written by `neuronbench run`
    facts = page.facts()
    assert page.errors == []
    rows = {r[0]: r[1:] for r in page.table("headlines")["rows"]}
    assert sorted(rows) == ["activation", "contrast", "random", "txray"]
    activation = dict(zip(page.table("headlines")["labels"][1:], rows["activation"]))
    assert activation["descriptors"] == activation["ppl-trend"] == "n/a" and activation["prune"][0] in "+-"
    assert sorted(i["alt"] for i in facts["images"]) == [f"{t} plot" for t in ("descriptors", "ppl-trend", "prune")]
    assert all(i["width"] > 0 for i in facts["images"])
