"""Submissions end to end at quick scale: every baseline exports, validates and re-scores to the
records of the method itself; the hidden split; a tampered submission earns what its outputs earn;
export is atomic; record/replay units on a tiny model; the `submit` command line."""
from __future__ import annotations

import dataclasses
import json
from datetime import datetime

import datasets
import polars as pl
import pytest
import torch

from neuronbench.harness.engine.cache import Cache
from neuronbench.harness.cli import main
from neuronbench.harness.engine.method import METHODS, Method, MethodContext, NeuronScores, get_method
from neuronbench.harness.engine.records import to_frame
from neuronbench.harness.suite.runner import RunConfig, run_one, run_suite
from neuronbench.harness.suite.task import TASKS, RunEnv
from neuronbench.leaderboard.export import ExportConfig, export_submission
from neuronbench.leaderboard.replay import Recorder, Replay, ReplayError
from neuronbench.leaderboard.score import InvalidSubmission, ScoreConfig, score_submission
from neuronbench.leaderboard.submission import MANIFEST, read_manifest, submission_id
from neuronbench.leaderboard.validate import validate

from ._exports import comparable, copy_of, exported, scored


def _round_trips():
    """(task, method) for every baseline and every task whose verb it implements; `random`
    (which implements every verb) runs by default, the other baselines with the slow tests."""
    for task in TASKS.names():
        for method in METHODS.names():
            if METHODS.get(method).supports(TASKS.get(task).spec.verb):
                marks = () if method == "random" else (pytest.mark.slow,)
                yield pytest.param(task, method, marks=marks, id=f"{task}-{method}")


@pytest.mark.parametrize("task,method", list(_round_trips()))
def test_export_validates_and_rescoring_reproduces_the_method_s_records(task, method):
    result = exported(method)
    direct = result.records.filter(pl.col("task") == task)
    if task not in read_manifest(result.folder)["tasks"]:  # e.g. a gradient method on a model without a head
        assert set(direct["status"]) == {"not_applicable"}
        return
    assert validate(result.folder) == []
    again = scored(method).filter(pl.col("task") == task)
    name = submission_id(read_manifest(result.folder))
    assert set(again["split"]) == {"public"} and set(again["method"]) == {name} and f"/{method}@" in name
    assert comparable(again).equals(comparable(direct.with_columns(method=pl.lit(name))))


def test_recording_is_transparent_export_records_equal_a_plain_run():
    frame, _ = run_suite(RunConfig(methods=("random",), quick=True), progress=False)
    assert comparable(frame).equals(comparable(exported("random").records))


def test_hidden_split_marks_records_and_moves_what_depends_on_the_examples(tmp_path, monkeypatch):
    monkeypatch.delenv("NEURONBENCH_HIDDEN_SEED", raising=False)
    folder, out = exported("random").folder, tmp_path / "hidden"
    (tmp_path / "seed").write_text("987654321\n")
    assert main(["submit", "score", str(folder), "--split", "hidden", "--out", str(out)]) == 2  # no seed
    assert main(["submit", "score", str(folder), "--split", "hidden", "--hidden-seed-file",
                 str(tmp_path / "seed"), "--out", str(out)]) == 0
    hidden, public = pl.read_parquet(out / "results.parquet"), scored("random")
    assert set(hidden["split"]) == {"hidden"}
    assert json.loads((out / MANIFEST).read_text()) == read_manifest(folder)
    config = json.loads((out / "config.json").read_text())
    assert datetime.fromisoformat(config["created"]).tzinfo is not None  # the leaderboard orders runs by it
    for name in ("results.parquet", "config.json", MANIFEST):
        assert b"987654321" not in (out / name).read_bytes()
    both = public.join(hidden, on=["task", "model", "metric", "k"], suffix="_hidden", nulls_equal=True)
    assert len(both) == len(public) == len(hidden)
    for task in read_manifest(folder)["tasks"]:
        rows = both.filter(pl.col("task") == task)
        assert (rows["value"] != rows["value_hidden"]).any(), f"{task}: hidden examples changed nothing"
    stage = both.filter(pl.col("metric") == "ppl-trend.stage_change")  # the method's answers, not the examples'
    assert len(stage) and (stage["value"] == stage["value_hidden"]).all()


class _Reversed(Method):
    """`random`'s relevance negated: what the tampered file below says."""

    name = "random"

    def relevance(self, ctx):
        out = get_method("random").relevance(ctx)
        return NeuronScores(out.index, -out.scores, out.concepts)


def test_tampered_submission_scores_what_its_outputs_earn_not_what_it_claims(tmp_path):
    folder = copy_of("random", tmp_path)
    path = folder / "prune.parquet"
    pl.read_parquet(path).with_columns(-pl.col("score")).write_parquet(path)
    man = read_manifest(folder)
    man["description"] = "prune.gap_auc = 0.99, verified by the authors"
    (folder / MANIFEST).write_text(json.dumps(man))
    assert validate(folder) == []
    got, _ = score_submission(ScoreConfig(str(folder), tasks=("prune",)))
    spec = TASKS.get("prune").spec.quick_version()
    direct = run_one(TASKS.get("prune"), spec, _Reversed(), RunEnv(seed=0, quick=True, cache=Cache(), progress=False))
    assert comparable(got).equals(comparable(to_frame(direct, "direct").with_columns(method=pl.lit(submission_id(man)))))
    original = scored("random").filter(pl.col("task") == "prune")
    assert not comparable(got).equals(comparable(original))

    man["claimed_gap_auc"] = 0.99
    (folder / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(InvalidSubmission, match="claimed_gap_auc.*unknown field"):
        score_submission(ScoreConfig(str(folder)))


class _FailsLate(Method):
    """Answers relevance, then fails on its first stage change."""

    name = "fails-late"

    def relevance(self, ctx):
        return get_method("random").relevance(ctx)

    def stage_change(self, ctx):
        raise RuntimeError("the method crashed")


def test_export_is_atomic_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "sub"
    config = ExportConfig(method="fails-late", out=str(out), tasks=("prune", "ppl-trend"), quick=True)
    with pytest.raises(RuntimeError, match="crashed"):
        export_submission(config, method=_FailsLate())
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary left behind
    out.mkdir()
    with pytest.raises(ValueError, match="already exists"):
        export_submission(config, method=_FailsLate())
    with pytest.raises(ValueError, match="does not implement"):
        export_submission(ExportConfig(method="activation", out=str(tmp_path / "x"), tasks=("ppl-trend",)))


# --------------------------------------------------------------------------- record and replay units

class _Fixed(Method):
    """Returns fixed answers (per-concept relevance, positions) for the unit tests."""

    name = "fixed"

    def __init__(self, rows: int | None, concepts=None):
        self.rows, self.concepts = rows, concepts

    def relevance(self, ctx):
        n = ctx.index.size
        shape = (n,) if self.rows is None else (self.rows, n)
        scores = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape) / 7
        return NeuronScores(ctx.index, scores, self.concepts)

    def attribute_positions(self, ctx, layer):
        return [torch.linspace(0, 1, 3 + i) * (layer + 1) for i in range(len(ctx.data))]


@pytest.fixture
def ctx(tiny):
    model = tiny("bert", "classifier")
    data = datasets.Dataset.from_dict({"id": [11, 5, 8], "text": ["a b", "c", "d e f"], "label": [0, 1, 0]})
    return MethodContext(model, model.sites("ffn"), data, "unit")


@pytest.mark.parametrize("rows,concepts", [(None, None), (1, (None,)), (2, ("negative", "positive"))])
def test_relevance_replays_exactly_what_was_recorded(ctx, rows, concepts):
    recorder = Recorder(_Fixed(rows, concepts))
    want = recorder.relevance(ctx)
    replay = Replay("fixed", "relevance", recorder.frame("relevance"))
    got = replay.relevance(ctx)
    assert got.concepts == want.concepts and got.index == want.index
    assert torch.equal(got.scores, want.scores.double())
    assert replay.supports("relevance") and not replay.supports("descriptors")
    with pytest.raises(ReplayError, match="no answer for relevance of concept 'positive'"):
        replay.relevance(MethodContext(ctx.model, ctx.sites, ctx.data, "unit", concept="positive"))


class _ByLabelling(Method):
    """A different answer for every labelling of the split (as a method that reads the labels gives)."""

    name = "by-labelling"

    def relevance(self, ctx):
        shift = 0.0 if ctx.labelling is None else 1.0 + int(ctx.labelling.partition(":")[2])
        return NeuronScores(ctx.index, torch.arange(ctx.index.size, dtype=torch.float32) + shift)


def test_relevance_answers_are_kept_apart_by_labelling(ctx):
    recorder = Recorder(_ByLabelling())
    contexts = [dataclasses.replace(ctx, labelling=lab) for lab in (None, "permuted:0", "permuted:1")]
    want = [recorder.relevance(c).scores for c in contexts]
    frame = recorder.frame("relevance")
    assert frame["labelling"].unique().sort(nulls_last=True).to_list() == ["permuted:0", "permuted:1", None]
    replay = Replay("by-labelling", "relevance", frame)
    for c, w in zip(contexts, want):
        assert torch.equal(replay.relevance(c).scores, w.double())
    with pytest.raises(ReplayError, match="labelling 'permuted:2'"):
        replay.relevance(dataclasses.replace(ctx, labelling="permuted:2"))
    legacy = Replay("by-labelling", "relevance", frame.filter(pl.col("labelling").is_null()).drop("labelling"))
    assert torch.equal(legacy.relevance(ctx).scores, want[0].double())  # files without the optional column


def test_positions_replay_by_example_id_and_layer(ctx):
    recorder = Recorder(_Fixed(None))
    want = [recorder.attribute_positions(ctx, layer) for layer in (0, 1)]
    replay = Replay("fixed", "attribute_positions", recorder.frame("attribute_positions"))
    shuffled = MethodContext(ctx.model, ctx.sites, ctx.data.select([2, 0, 1]), "unit")
    for layer in (0, 1):
        assert all(torch.equal(a, b.double()) for a, b in zip(replay.attribute_positions(ctx, layer), want[layer]))
        assert torch.equal(replay.attribute_positions(shuffled, layer)[0], want[layer][2].double())
    with pytest.raises(ReplayError, match="example 11 at layer 2"):
        replay.attribute_positions(ctx, 2)


def test_recorder_refuses_two_different_answers_to_one_call(ctx):
    recorder = Recorder(_Fixed(None))
    recorder.relevance(ctx)
    recorder.inner = _Fixed(1, ("x",))
    with pytest.raises(ValueError, match="twice with different outputs"):
        recorder.relevance(ctx)


# --------------------------------------------------------------------------- command line

def test_cli_export_validate_and_exit_codes(tmp_path, capsys):
    out = tmp_path / "sub"
    args = ["submit", "export", "--method", "random", "--tasks", "ppl-trend", "--quick", "--out", str(out),
            "--authors", "A. Person", "--license", "MIT"]
    assert main(args) == 0
    man = read_manifest(out)
    assert list(man["tasks"]) == ["ppl-trend"] and man["authors"] == ["A. Person"] and man["license"] == "MIT"
    assert main(args) == 2  # the folder exists: a usage error, nothing touched
    assert main(["submit", "validate", str(out)]) == 0
    (out / "notes.txt").write_text("hello")
    capsys.readouterr()
    assert main(["submit", "validate", str(out), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)
    assert problems == [{"file": "notes.txt", "row": None, "field": None,
                         "message": problems[0]["message"]}] and "unexpected file" in problems[0]["message"]
    assert main(["submit", "score", str(out), "--out", str(tmp_path / "res")]) == 1
    assert "unexpected file" in capsys.readouterr().out
    assert not (tmp_path / "res").exists()
