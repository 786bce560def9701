"""Sanity checks: perturbations really perturb, verdicts are stored and flagged, a cheat is caught."""
from __future__ import annotations

import pytest
import torch

from neuronbench.baselines.contrast import Contrast
from neuronbench.harness.suite import sanity
from neuronbench.harness.engine.cache import Cache
from neuronbench.harness.engine.method import MethodContext
from neuronbench.harness.suite.sanity import Check, Perturbed, permuted_labels, reinitialised
from neuronbench.harness.suite import verdicts as stored
from neuronbench.harness.suite.verdicts import sanity_flags
from neuronbench.harness.suite.task import TASKS, RunEnv


@pytest.fixture
def verdicts(tmp_path, monkeypatch):
    monkeypatch.setattr(stored, "verdict_path", lambda task, fp: tmp_path / "sanity" / f"{task}-{fp}.json")
    return tmp_path / "sanity"


def test_reinitialised_redraws_every_weight_and_leaves_the_original(tiny):
    model = tiny("bert", "classifier")
    before = {n: p.clone() for n, p in model.model.named_parameters()}
    copy1, copy2 = reinitialised(model, seed=3), reinitialised(model, seed=3)
    for name, p in copy1.model.named_parameters():
        assert torch.equal(p, dict(copy2.model.named_parameters())[name]), f"{name} not seeded"
        assert torch.equal(dict(model.model.named_parameters())[name], before[name])
        if p.dim() == 2:  # matrices are drawn afresh (LayerNorm weights go back to ones)
            assert not torch.equal(p, before[name]), f"{name} was not re-initialised"
    assert copy1.fingerprint() != model.fingerprint()  # the activation cache must not mix them
    assert copy1.name.endswith("~reinit")


def test_reinitialised_checkpoints_differ_from_each_other(tiny):
    a, b = tiny("gpt2", "causal-lm", 0), tiny("gpt2", "causal-lm", 1)
    b_named = type(b)(model=b.model, tokenizer=b.tokenizer, name="other", source=b.source, kind=b.kind)
    wa = next(reinitialised(a, 0).model.parameters())
    wb = next(reinitialised(b_named, 0).model.parameters())
    assert not torch.equal(wa, wb)


def test_permuted_labels_keep_counts_and_lengths(word_data, sentence_data):
    shuffled = permuted_labels(word_data, seed=0)
    flat = lambda d: sorted(v for row in d["word_labels"] for v in row)  # noqa: E731
    assert flat(shuffled) == flat(word_data)
    assert [len(r) for r in shuffled["word_labels"]] == [len(r) for r in word_data["word_labels"]]
    assert shuffled["word_labels"] != word_data["word_labels"]
    assert shuffled["words"] == word_data["words"]
    assert permuted_labels(word_data, seed=0)["word_labels"] == shuffled["word_labels"]
    sentences = permuted_labels(sentence_data, seed=1)
    assert sorted(sentences["label"]) == sorted(sentence_data["label"])
    assert sentences["label"] != sentence_data["label"] and sentences["text"] == sentence_data["text"]
    assert sentences.features["label"] == sentence_data.features["label"]


class _Spy(Contrast):
    seen: list = []

    def descriptors(self, ctx, vocabulary):
        self.seen.append(ctx)
        return super().descriptors(ctx, vocabulary)


def test_perturbed_hands_the_inner_method_a_perturbed_context(tiny, word_data, tmp_path):
    model = tiny("bert")
    data = word_data.add_column("word_descriptors", [[["pos:NN"] if l == 1 else [] for l in row]
                                                     for row in word_data["word_labels"]])
    ctx = MethodContext(model, tuple(model.sites("resid")), data, "words", cache=Cache(tmp_path))
    for mode in ("reinit", "permuted"):
        spy = _Spy()
        spy.seen.clear()
        method = Perturbed(spy, mode, seed=0)
        assert method.name == f"contrast~{mode}" and method.supports("descriptors")
        assert not method.supports("stage_change")
        method.descriptors(ctx, ("pos:NN",))
        seen = spy.seen[-1]
        if mode == "reinit":
            assert seen.model is not model and seen.model.fingerprint() != model.fingerprint()
            assert seen.data is data
        else:
            assert seen.model is model and seen.data_id != ctx.data_id
            assert seen.data["word_descriptors"] != data["word_descriptors"]


def test_check_verdicts():
    chance = Check("t", "reinit", "m~reinit", 0.01, -0.02, 0.05, 0.0)
    above = Check("t", "reinit", "m~reinit", 0.2, 0.1, 0.3, 0.0)
    assert chance.verdict == "chance" and above.verdict == "FAIL"
    assert Check("t", "reinit", "m~reinit", -0.2, -0.3, -0.1, 0.0).verdict == "below chance"
    assert Check("t", "random", "random", -0.2, -0.3, -0.1, 0.0).verdict == "FAIL"
    assert Check("t", "reference", "m", 0.2, 0.1, 0.3, 0.0).verdict == "skill"
    assert Check("t", "reference", "m", 0.01, -0.02, 0.05, 0.0).verdict == "no skill"
    assert Check("t", "random", "random", None, None, None, 0.0).verdict == "chance"  # undefined = no skill
    assert "[+0.100, +0.300]" in above.describe()


class _Memorising(Contrast):
    """A cheat: answers every later call with its first answer, whatever model or labels it is given."""

    def __init__(self):
        super().__init__()
        self.first = None

    def descriptors(self, ctx, vocabulary):
        if self.first is None:
            self.first = super().descriptors(ctx, vocabulary)
        return self.first


def test_sanity_catches_a_method_that_ignores_the_model(verdicts):
    task = TASKS.get("descriptors")
    spec = task.spec.quick_version()
    env = RunEnv(seed=0, quick=True, cache=Cache(verdicts.parent / "cache"), progress=False)
    checks, records = sanity.check_task(task, spec, env, reference=_Memorising())
    by = {c.check: c for c in checks}
    assert by["reference"].verdict == "skill"
    assert by["reinit"].verdict == "FAIL" and by["permuted"].verdict == "FAIL"
    assert by["random"].verdict == "chance"
    verdict = stored.store_verdict(spec, checks, sanity.surviving(checks, records))
    assert not verdict["passed"] and len(verdict["failures"]) == 2
    for check in ("reinit", "permuted"):  # the headline is named among the metrics that kept skill
        assert spec.headline in verdict["surviving_metrics"][check]
    flags = sanity_flags({"descriptors": spec.fingerprint()})
    assert "reinit" in flags["descriptors"] and "permuted" in flags["descriptors"]
    assert sanity_flags({"descriptors": "another-fingerprint"}) == {}


def test_sanity_command_passes_for_an_honest_method(verdicts, tmp_path, capsys):
    from neuronbench.harness.cli import main

    code = main(["sanity", "--tasks", "descriptors", "--quick", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "all tasks pass" in out and "contrast~reinit" in out
    assert (tmp_path / "out" / "results.parquet").is_file()
    spec = TASKS.get("descriptors").spec.quick_version()
    assert sanity_flags({"descriptors": spec.fingerprint()}) == {}
    assert (verdicts / f"descriptors-{spec.fingerprint()}.json").is_file()


def test_sanity_command_calls_a_reference_without_skill_inconclusive(verdicts, capsys):
    """A reference with no skill cannot lose it: the command says so instead of a bare pass."""
    from neuronbench.harness.cli import main

    code = main(["sanity", "--tasks", "descriptors", "--quick", "--reference", "random"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "descriptors: inconclusive: the reference shows no skill" in out
    assert "(1 inconclusive: descriptors)" in out


def _row(method: str, metric: str, value: float, low: float, high: float, k: float | None = None) -> dict:
    return {"method": method, "metric": metric, "k": k, "value": value, "ci_low": low, "ci_high": high}


def test_surviving_metrics_names_what_keeps_skill_beyond_random():
    import polars as pl

    rows = [
        # raw: the reference's skill survives the perturbation (interval wholly above random's)
        _row("random", "t.raw", 0.00, -0.02, 0.02), _row("m", "t.raw", 0.30, 0.25, 0.35),
        _row("m~p", "t.raw", 0.10, 0.05, 0.15),
        # gap: the perturbed interval overlaps random's, so the skill is gone
        _row("random", "t.gap", 0.00, -0.02, 0.02), _row("m", "t.gap", 0.20, 0.15, 0.25),
        _row("m~p", "t.gap", 0.03, 0.01, 0.05),
        # loss, per k: lower is better and the skill survives below random
        _row("random", "t.loss", 1.0, 0.9, 1.1, k=0.5), _row("m", "t.loss", 0.5, 0.4, 0.6, k=0.5),
        _row("m~p", "t.loss", 0.6, 0.5, 0.7, k=0.5),
        # shared: the reference is no better than random, so nothing is judged
        _row("random", "t.shared", 0.9, 0.8, 1.0), _row("m", "t.shared", 0.9, 0.8, 1.0),
        _row("m~p", "t.shared", 2.0, 1.9, 2.1),
        # no interval: not judged
        _row("random", "t.size", 5.0, None, None), _row("m", "t.size", 9.0, None, None),
        _row("m~p", "t.size", 9.0, None, None),
    ]
    frame = pl.DataFrame(rows, schema={"method": pl.String, "metric": pl.String, "k": pl.Float64,
                                       "value": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64})
    assert sanity.surviving_metrics(frame, "m", "m~p") == ["t.loss@0.5", "t.raw"]
    assert sanity.surviving_metrics(frame, "m", "m") == ["t.gap", "t.loss@0.5", "t.raw"]
