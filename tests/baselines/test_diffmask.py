"""DiffMask's training discipline: Lookahead, the dev check and selection rule, the gate cache, and
the amortized gates of a tiny model meeting the KL budget on examples they never trained on."""
from __future__ import annotations

from dataclasses import asdict

import datasets
import numpy as np
import polars as pl
import pytest
import torch
from torch import nn

from neuronbench.baselines.diffmask import PositionGate
from neuronbench.baselines.diffmask_train import DiffMaskConfig, Lookahead, batches_with_logits, evaluate
from neuronbench.baselines.diffmask_train import fit_gates as diffmask_fit_gates
from neuronbench.harness.engine.method import MethodContext, call_verb, get_method
from neuronbench.harness.suite.report import trained_artifacts
from neuronbench.harness.zoo.tiny import tiny_model

from .test_gradient_methods import _decisive_classifier

WORDS = ("the cat sat on mat stocks rallied sharply movie is wonderful and acting superb plot was "
         "boring badly written he quickly walked home singing a dog unbelievably dull").split()


def _sentences(n: int, seed: int) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(n)]
    return datasets.Dataset.from_dict({"text": texts, "label": rng.integers(0, 2, size=n).tolist()})


def test_lookahead_pulls_fast_weights_back_every_k_steps():
    p = nn.Parameter(torch.tensor([0.0]))
    opt = Lookahead(torch.optim.SGD([p], lr=1.0), k=2, alpha=0.5)
    for _ in range(2):
        p.grad = torch.tensor([-1.0])  # each fast step adds 1
        opt.step()
    assert p.item() == pytest.approx(1.0)  # slow 0 -> 0 + 0.5 * (2 - 0)
    p.grad = torch.tensor([-1.0])
    opt.step()
    assert p.item() == pytest.approx(2.0)  # a fast step from the synced weights


def test_the_sparsest_checkpoint_that_meets_the_dev_budget_is_kept(tmp_cache):
    model = _decisive_classifier()
    train, pool = _sentences(160, 0), _sentences(20, 1)
    ctx = MethodContext(model=model, sites=(), data=pool, data_id="pool", train=train, train_id="train", cache=tmp_cache)
    method = get_method("diffmask", steps=60, max_steps=60, eval_every=10, batch=32)
    call_verb(method, "attribute_positions", ctx, 0)
    curves, summary = method.history, method.summary
    met = [(l0, s) for s, kl, l0 in zip(curves["dev_step"], curves["dev_kl"], curves["dev_l0"]) if kl <= 0.1]
    assert len(curves["step"]) == 60 and curves["dev_step"] == list(range(10, 61, 10))
    if met:
        assert summary["met"] and summary["selected_step"] == min(met)[1]
    else:
        assert not summary["met"] and summary["dev_kl"] == min(curves["dev_kl"])


@pytest.mark.parametrize("eps, steps_run", [(1e-9, 40), (10.0, 20)])
def test_training_goes_on_past_steps_until_a_dev_check_meets_the_budget(tmp_cache, eps, steps_run):
    model = _decisive_classifier()
    ctx = MethodContext(model=model, sites=(), data=_sentences(8, 1), data_id="pool", train=_sentences(80, 0),
                        train_id="train", cache=tmp_cache)
    method = get_method("diffmask", steps=20, max_steps=40, eval_every=10, eps=eps, eps_train=eps)
    call_verb(method, "attribute_positions", ctx, 0)
    curves, summary = method.history, method.summary
    assert len(curves["step"]) == summary["steps"] == steps_run
    assert curves["dev_step"] == list(range(10, steps_run + 1, 10))
    assert summary["met"] == (eps > 1)
    if not summary["met"]:  # the checkpoint nearest the budget
        assert summary["dev_kl"] == min(curves["dev_kl"])


def test_trained_gates_are_cached_per_layer_and_config(tmp_cache):
    model = _decisive_classifier()
    train, pool = _sentences(80, 0), _sentences(10, 1)
    ctx = MethodContext(model=model, sites=(), data=pool, data_id="pool", train=train, train_id="train", cache=tmp_cache)
    first = call_verb(get_method("diffmask", steps=10, eval_every=5), "attribute_positions", ctx, 0)
    kinds = [e.meta["parts"]["kind"] for e in tmp_cache.entries()]
    assert kinds.count("diffmask-position-gate") == 1
    again = call_verb(get_method("diffmask", steps=10, eval_every=5), "attribute_positions", ctx, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert [e.meta["parts"]["kind"] for e in tmp_cache.entries()].count("diffmask-position-gate") == 1
    call_verb(get_method("diffmask", steps=10, eval_every=5), "attribute_positions", ctx, 1)
    call_verb(get_method("diffmask", steps=11, eval_every=5), "attribute_positions", ctx, 0)
    entries = [e for e in tmp_cache.entries() if e.meta["parts"]["kind"] == "diffmask-position-gate"]
    assert len(entries) == 3
    assert all({"gate.pt", "curves.json"} <= {f["name"] for f in e.meta["files"]} for e in entries)
    # The report draws the newest gate of each layer (steps=11 rebuilt layer 0).
    runs = trained_artifacts(pl.DataFrame({"model": [model.name], "method": ["diffmask"]}), {}, tmp_cache)
    drawn = runs[f"diffmask on {model.name}"]
    assert [r.title.split(":")[0] for r in drawn] == [f"{model.name} resid.0", f"{model.name} resid.1"]
    assert len(drawn[0].curves["step"]) == 11 and drawn[0].marked_step in drawn[0].curves["dev_step"]


def test_neuron_gates_are_cached_under_the_data_sites_and_config(tmp_cache, monkeypatch):
    import neuronbench.baselines.diffmask as diffmask

    model = _decisive_classifier()
    data = _sentences(60, 0)
    ctx = MethodContext(model=model, sites=model.sites("ffn"), data=data, data_id="train", cache=tmp_cache)
    first = call_verb(get_method("diffmask", steps=10, eval_every=5), "relevance", ctx).scores
    trained = []
    monkeypatch.setattr(diffmask, "fit_gates", lambda *a, **k: trained.append(1) or diffmask_fit_gates(*a, **k))
    again = get_method("diffmask", steps=10, eval_every=5)
    assert torch.equal(call_verb(again, "relevance", ctx).scores, first) and not trained
    assert again.summary["selected_step"] in again.history["dev_step"]  # the curves come from the cache
    assert again.settings() == {"cfg": asdict(again.cfg)}  # the run's curves are not settings
    call_verb(get_method("diffmask", steps=10, eval_every=5), "relevance",
              MethodContext(model=model, sites=model.sites("ffn")[:1], data=data, data_id="train", cache=tmp_cache))
    call_verb(get_method("diffmask", steps=10, eval_every=5), "relevance",
              MethodContext(model=model, sites=model.sites("ffn"), data=data.select(range(50)), data_id=None,
                            cache=tmp_cache))
    assert len(trained) == 2
    kinds = [e.meta["parts"]["kind"] for e in tmp_cache.entries()]
    assert kinds.count("diffmask-neuron-gates") == 3


def test_amortized_gates_meet_the_kl_budget_on_held_out_examples(tmp_cache):
    model = _decisive_classifier()
    train, held_out = _sentences(320, 0), _sentences(64, 2)
    ctx = MethodContext(model=model, sites=(), data=held_out, data_id="held-out", train=train, train_id="train",
                        cache=tmp_cache)
    # A quarter held out as the dev split: the selection rule reads a less noisy KL estimate.
    method = get_method("diffmask", steps=300, batch=32, dev_fraction=0.25)
    keep = call_verb(method, "attribute_positions", ctx, 0)
    curves, eps = method.history, method.cfg.eps
    assert method.summary["met"], method.summary
    assert max(curves["lagrange"]) > 1, "the KL constraint never bound: the budget was not tested"
    # Converged, not a lucky transient: the last dev checks all meet the budget.
    assert all(kl <= eps for kl in curves["dev_kl"][-3:]), curves["dev_kl"]
    gate = method.position_gate(ctx, 0)  # the cached network
    batches = batches_with_logits(model, held_out, method.cfg, include_special=False)
    kls = [evaluate(model, gate, batches, seed)[0] for seed in range(8)]  # gate draws
    assert np.mean(kls) <= eps, kls
    words = torch.cat([k[1:-1] for k in keep])
    assert words.mean() < 0.9, "the gates should close some positions while keeping the budget"
    # Not tied: nearly every word of an example gets its own keep probability.
    distinct = [len(torch.unique(k[1:-1])) / (len(k) - 2) for k in keep if len(k) > 3]
    assert np.mean(distinct) > 0.8, distinct


@pytest.mark.parametrize("settings, message", [({"eps_train": 0.2}, "eps_train"), ({"eps_train": 0.0}, "eps_train"),
                                               ({"steps": 50, "max_steps": 40}, "max_steps")])
def test_bad_settings_fail_with_the_setting_named(settings, message):
    with pytest.raises(ValueError, match=message):
        DiffMaskConfig(**settings)
