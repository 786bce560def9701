"""Tests for the `prune` task: the quick spec end to end, mask construction, an oracle ranking that
must beat chance, reproducibility and the not-applicable path (tiny models only)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from neuronbench.harness.engine import data
from neuronbench.harness.engine.intervene import MaskSet, evaluate_masks, gold_label_scores
from neuronbench.harness.engine.method import Method, MethodContext, NeuronScores, get_method
from neuronbench.harness.engine.sites import NeuronIndex, Site
from neuronbench.harness.suite.runner import run_one
from neuronbench.harness.suite.task import TASKS, RunEnv
from neuronbench.harness.zoo.tiny import tiny_model, tiny_tokenizer
from neuronbench.tasks import prune
from conftest import quick_zoo_home

QUICK = prune.SPEC.quick_version()
SHARP = "tiny-sharp-classifier"


@pytest.fixture(scope="module")
def quick_home(tmp_path_factory):
    """A fresh NeuronBench home with the fetched corpora linked in and the tiny classifier built."""
    with quick_zoo_home(tmp_path_factory, "prune-home", QUICK.model) as home:
        yield home


@pytest.fixture(scope="module")
def sharp():
    """A random tiny BERT classifier with unit-gain weights, a word-level polarity tokenizer and its
    bias set so that it predicts each class on half of the quick test examples: its predictions and
    gold log-likelihoods move when single FFN neurons are ablated (the quick zoo model is almost
    insensitive to its FFN neurons)."""
    corpus = data.load("polarity")
    model = tiny_model("bert", "classifier", seed=3,
                       tokenizer=tiny_tokenizer(list(corpus.splits["train"]["text"][:500]), vocab_size=400))
    gen = torch.Generator().manual_seed(3)
    test = data.subsample(corpus.splits["test"], prune.Params.of(QUICK).n_test, QUICK.split_seed)
    enc = model.tokenizer(list(test["text"]), padding=True, truncation=True, max_length=128,
                          return_tensors="pt")
    with torch.no_grad():
        for module in model.model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen)
                                    / module.in_features ** 0.5)
        logits = model.model(**enc).logits
        model.model.classifier.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    return model


def _sharp_run(sharp, method: Method, seed: int = 0, tmp_cache=None, **params):
    """Score `method` on the quick spec with the sharp classifier standing in for the model."""
    spec = dataclasses.replace(QUICK, model=SHARP, parent=None,
                               params=tuple({**dict(QUICK.params), **params}.items()))
    env = RunEnv(seed=seed, cache=tmp_cache, progress=False, _models={SHARP: sharp})
    return run_one(TASKS.get("prune"), spec, method, env)


def _by_metric(records) -> dict[tuple[str, float | None], float]:
    return {(r.metric, r.k): r.value for r in records}


class Oracle(Method):
    """Relevance = the true drop in gold log-likelihood from mean-ablating each neuron alone on the
    scoring examples (it reads the test split, which no real method may: a reference, not a baseline)."""

    name = "oracle"

    def __init__(self, examples):
        self.examples = examples

    def relevance(self, ctx: MethodContext) -> NeuronScores:
        index = ctx.index
        singles = [index.split(torch.tensor([i])) for i in range(index.size)]
        labels = torch.tensor(self.examples["label"])
        col = ctx.collect(("moments",))
        means = {s: col[s].moments.mean for s in index.sites}
        scores = evaluate_masks(ctx.model, self.examples, MaskSet.from_sets(ctx.model, [{}] + singles),
                                lambda out, b: gold_label_scores(out, b, labels), mode="mean", means=means)
        drop = scores[:1].mean(1) - scores[1:].mean(1)  # (N, 2): accuracy and log-likelihood drops
        return NeuronScores(index, drop[:, 1].float())


class StagesOnly(Method):
    name = "stages-only"

    def stage_change(self, ctx: MethodContext) -> float:
        return 0.0


# ---------------------------------------------------------------- the quick spec end to end

@pytest.mark.parametrize("name", ["random", "activation"])
def test_quick_spec_runs_and_gives_the_headline_with_an_interval(quick_home, tmp_cache, name):
    env = RunEnv(seed=0, quick=True, cache=tmp_cache, progress=False)
    records = prune.score(QUICK, get_method(name), env)
    assert all(r.status == "ok" and r.task == "prune" and r.model == QUICK.model for r in records)
    head = [r for r in records if r.metric == QUICK.headline]
    assert len(head) == 1 and head[0].k is None
    for r in records:
        if r.ci_low is not None:
            assert r.ci_low <= r.value <= r.ci_high, r
    got = _by_metric(records)
    assert ("prune.full_accuracy", None) in got and ("prune.bottom_gap", None) in got
    for k in prune.Params.of(QUICK).ks:
        for cond in prune.CONDITIONS:
            assert (f"prune.acc_drop.{cond}", k) in got and (f"prune.loglik_drop.{cond}", k) in got


# ---------------------------------------------------------------- mask construction

def test_sets_have_the_right_sizes_and_matched_sets_the_methods_per_site_counts():
    index = NeuronIndex.build({Site.ffn(0): 10, Site.ffn(1): 20, Site.ffn(2): 30})
    # Relevance grows with the flat id, but layer 1 is the most relevant site as a whole.
    scores = torch.arange(60.0)
    scores[10:30] += 100
    ks, seeds = (0.05, 0.2, 0.5), 4
    plan = prune.build_plan(index, scores, ks, seeds, seed=7)
    order = torch.argsort(scores, descending=True).numpy()
    assert len(plan.sets[0]) == 0
    for k in ks:
        n = prune.set_size(k, 60)
        sets = {c: [plan.sets[i] for i in plan.rows[(c, k)]] for c in prune.CONDITIONS}
        assert sorted(sets["top"][0]) == sorted(order[:n]) and sorted(sets["bottom"][0]) == sorted(order[-n:])
        counts = {c: [{s: len(v) for s, v in index.split(torch.tensor(x)).items()} for x in xs]
                  for c, xs in sets.items()}
        for c in ("random_uniform", "random_matched"):
            assert len(sets[c]) == seeds and all(len(np.unique(x)) == n for x in sets[c])
        assert all(c == counts["top"][0] for c in counts["random_matched"])
        assert len({x.tobytes() for x in sets["random_uniform"]}) == seeds  # seeds draw different sets
        assert not any(set(x) == set(sets["top"][0]) for x in sets["random_matched"])
    again = prune.build_plan(index, scores, ks, seeds, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(plan.sets, again.sets)) and plan.rows == again.rows


def test_ties_are_broken_at_random_not_by_position():
    index = NeuronIndex.build({Site.ffn(0): 50, Site.ffn(1): 50})
    plan = prune.build_plan(index, torch.zeros(100), (0.2,), 1, seed=0)
    top = plan.sets[plan.rows[("top", 0.2)][0]]
    assert len(top) == 20 and (top >= 50).any() and (top < 50).any()


def test_bad_parameters_are_rejected(sharp):
    with pytest.raises(ValueError, match="ablation"):
        _sharp_run(sharp, get_method("random"), ablation="median")
    with pytest.raises(ValueError, match="random_seeds=1 must be an integer >= 2"):
        _sharp_run(sharp, get_method("random"), random_seeds=1)
    with pytest.raises(ValueError, match="k=1.5"):
        prune.set_size(1.5, 100)


# ---------------------------------------------------------------- scores

def test_an_oracle_ranking_has_a_larger_gap_than_random(sharp, tmp_cache):
    test = data.subsample(data.load("polarity").splits["test"], prune.Params.of(QUICK).n_test, QUICK.split_seed)
    oracle = _sharp_run(sharp, Oracle(test), tmp_cache=tmp_cache)
    chance = _by_metric(_sharp_run(sharp, get_method("random"), tmp_cache=tmp_cache))
    got = _by_metric(oracle)
    for k in prune.Params.of(QUICK).ks:
        assert got[("prune.loglik_drop.top", k)] > got[("prune.loglik_drop.random_matched", k)] + 0.01
    (gap,) = [r for r in oracle if r.metric == "prune.loglik_gap_auc"]
    assert gap.ci_low > 0 and gap.value > chance[("prune.loglik_gap_auc", None)] + 0.02
    assert any(got[("prune.acc_drop.top", k)] != 0 for k in prune.Params.of(QUICK).ks)  # accuracy moves too


def test_same_seed_gives_identical_records_and_zero_ablation_is_an_option(sharp, tmp_cache):
    first = _sharp_run(sharp, get_method("activation"), seed=1, tmp_cache=tmp_cache)
    again = _sharp_run(sharp, get_method("activation"), seed=1, tmp_cache=tmp_cache)
    assert first == again
    assert any(r.value != 0 for r in first if r.metric.startswith("prune.acc_drop"))
    other = _by_metric(_sharp_run(sharp, get_method("activation"), seed=2, tmp_cache=tmp_cache))
    key = ("prune.loglik_drop.random_uniform", 0.2)
    assert other[key] != _by_metric(first)[key]  # another seed draws other random sets
    zero = _sharp_run(sharp, get_method("activation"), seed=1, tmp_cache=tmp_cache, ablation="zero")
    assert _by_metric(zero) != _by_metric(first)


def test_a_method_without_relevance_gets_a_not_applicable_record(sharp, tmp_cache):
    (only,) = _sharp_run(sharp, StagesOnly(), tmp_cache=tmp_cache)
    assert only.metric == "prune.not_applicable" and only.status == "not_applicable" and only.value is None


def test_the_shared_references_are_stored_and_a_later_run_reads_them(sharp, tmp_cache, monkeypatch):
    evaluated: list[int] = []
    real = prune.evaluate_masks

    def counting(model, dataset, masks, *args, **kwargs):
        evaluated.append(masks.k)
        return real(model, dataset, masks, *args, **kwargs)

    monkeypatch.setattr(prune, "evaluate_masks", counting)
    first = _sharp_run(sharp, get_method("activation"), seed=4, tmp_cache=tmp_cache)
    n_first = sum(evaluated)
    p = prune.Params.of(QUICK)
    index = NeuronIndex.build({s: sharp.width(s) for s in sharp.sites("ffn")})
    shared = prune.reference_plan(index, p.ks, p.random_seeds, 4)
    assert len(shared.sets) == 1 + len(p.ks) * p.random_seeds  # the full model and the uniform sets
    stored = [e for e in tmp_cache.entries() if e.meta["parts"].get("kind") == "prune-reference"]
    assert len(stored) == 1
    evaluated.clear()
    again = _sharp_run(sharp, get_method("activation"), seed=4, tmp_cache=tmp_cache)  # a new run (RunEnv)
    assert again == first and sum(evaluated) == n_first - len(shared.sets)
    evaluated.clear()
    spec = dataclasses.replace(QUICK, model=SHARP, parent=None)
    hidden = RunEnv(seed=4, cache=tmp_cache, progress=False, split="hidden", hidden_seed=7, _models={SHARP: sharp})
    run_one(TASKS.get("prune"), spec, get_method("activation"), hidden)
    assert sum(evaluated) >= len(shared.sets)  # the hidden split's references are computed, never stored
    assert [e.key for e in tmp_cache.entries() if e.meta["parts"].get("kind") == "prune-reference"] == \
        [e.key for e in stored]
