"""Tests for the gradient baselines (gradxact, integrated-gradients, diffmask) and the task objective:
exact gradients on a hand-computable head, IG completeness, the hard concrete distribution, the
Lagrange multiplier, and valid, seeded outputs on tiny models."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from neuronbench.baselines.diffmask import (LAGRANGE_MAX, LagrangeMultiplier, expected_l0,
                                            hard_concrete_sample)
from neuronbench.baselines.integrated_gradients import integrated_gradients, path_nodes
from neuronbench.harness.engine.hooks import site_hooks
from neuronbench.harness.engine.method import MethodContext, call_verb, get_method
from neuronbench.harness.engine.objective import NoObjectiveError, gradient_batches, objective, run
from neuronbench.harness.engine.sites import Site
from neuronbench.harness.zoo.tiny import tiny_model

GRADIENT_METHODS = ("gradxact", "integrated-gradients", "diffmask")
FAST = {"gradxact": {}, "integrated-gradients": {}, "diffmask": {"steps": 5}}


def _ctx(model, data, sites, cache, seed: int = 0) -> MethodContext:
    return MethodContext(model=model, sites=tuple(sites), data=data, data_id="test-data", seed=seed,
                         cache=cache)


def _sharp_classifier(seed: int = 2):
    """A fresh tiny BERT classifier with unit-gain weights, so signals and gradients are not tiny."""
    model = tiny_model("bert", "classifier", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.model.modules():
            if isinstance(module, nn.Linear):
                scale = module.in_features ** -0.5
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * scale)
    return model


class _FirstToken(nn.Module):
    """A pooler that passes the [CLS] hidden state through unchanged: logits become linear in it."""

    def forward(self, hidden_states):
        return hidden_states[:, 0]


def _encode_one(model, text):
    ids = torch.tensor([model.tokenizer(text)["input_ids"]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ---------------------------------------------------------------- objective

def test_objective_is_gold_log_probability_and_lm_likelihood(tiny, sentence_data):
    clf, lm = tiny("bert", "classifier"), tiny("gpt2", "causal-lm")
    for model in (clf, lm):
        got = torch.zeros(len(sentence_data))
        for batch, labels in gradient_batches(model, sentence_data, max_tokens=64):
            with torch.no_grad():
                got[batch.indices] = objective(model, run(model, batch), batch, labels)
        for i, row in enumerate(sentence_data):
            inputs = _encode_one(model, row["text"])
            with torch.no_grad():
                if model.kind == "classifier":
                    expected = torch.log_softmax(model.model(**inputs).logits, -1)[0, row["label"]]
                else:  # transformers' loss is the mean next-token cross-entropy
                    expected = -model.model(**inputs, labels=inputs["input_ids"]).loss
            assert got[i].item() == pytest.approx(expected.item(), abs=1e-5), (model.kind, i)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_predicted_next_token_objective_is_log_p_of_the_prediction_at_the_last_real_token(tiny, sentence_data,
                                                                                          arch):
    # Batches are padded (texts of different lengths): the last *real* position must be read.
    model = tiny(arch, "causal-lm")
    got, target_ids = torch.zeros(len(sentence_data)), torch.zeros(len(sentence_data), dtype=torch.long)
    for batch, target in gradient_batches(model, sentence_data, max_tokens=64, objective="predicted-next-token"):
        assert target.objective == "predicted-next-token" and bool((batch.attention_mask == 0).any())
        with torch.no_grad():
            got[batch.indices] = objective(model, run(model, batch), batch, target)
        target_ids[batch.indices] = target.ids
    for i, row in enumerate(sentence_data):
        with torch.no_grad():
            logp = torch.log_softmax(model.model(**_encode_one(model, row["text"])).logits[0, -1], -1)
        assert target_ids[i].item() == logp.argmax().item()
        assert got[i].item() == pytest.approx(logp.max().item(), abs=1e-5)


def test_an_objective_for_another_kind_of_model_is_refused(tiny, sentence_data):
    from neuronbench.harness.engine.objective import objective_name

    assert objective_name(tiny("gpt2", "causal-lm")) == "next-token-mean"
    assert objective_name(tiny("bert", "classifier")) == "gold-label"
    with pytest.raises(ValueError, match="needs a causal-lm model"):
        next(gradient_batches(tiny("bert", "classifier"), sentence_data, objective="predicted-next-token"))
    with pytest.raises(ValueError, match="unknown objective 'loss'"):
        objective_name(tiny("gpt2", "causal-lm"), "loss")


@pytest.mark.parametrize("name", ["gradxact", "integrated-gradients"])
def test_gradient_methods_attribute_the_objective_the_task_declares(reference, sentence_data, tmp_cache, name):
    # On a causal LM, erasure declares log p(predicted next token at the last real position): the
    # per-position attribution must be grad x act (IG: its path integral) of exactly that quantity.
    model = tiny_model("llama", "causal-lm", seed=1)
    site, data = Site.resid(0), sentence_data.select(range(4))
    ctx = dataclasses.replace(_ctx(model, data, [site], tmp_cache), objective="predicted-next-token")
    method = get_method(name, **({"steps": 64} if name != "gradxact" else {}))
    got = call_verb(method, "attribute_positions", ctx, 0)
    default = call_verb(method, "attribute_positions", _ctx(model, data, [site], tmp_cache), 0)
    for i, row in enumerate(data):
        inputs, kept = _encode_one(model, row["text"]), {}
        handle = reference.block_of(model, 0).register_forward_hook(
            lambda m, a, out: kept.setdefault("h", out[0] if isinstance(out, tuple) else out))
        try:
            logp = torch.log_softmax(model.model(**inputs).logits[0, -1], -1)
            (grad,) = torch.autograd.grad(logp.max(), kept["h"])
        finally:
            handle.remove()
        want = (grad * kept["h"]).detach()[0].sum(-1)
        if name == "gradxact":
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-4)
        else:  # completeness: IG sums to log p(pred) minus its value with the site at IG's (mean) baseline
            base = ctx.collect(("moments",))[site].moments.mean
            with torch.no_grad(), site_hooks(model.model, {site: lambda a: base.expand_as(a)}):
                at_base = torch.log_softmax(model.model(**inputs).logits[0, -1], -1)[logp.argmax()]
            assert got[i].sum().item() == pytest.approx((logp.max() - at_base).item(), abs=2e-3, rel=1e-2)
        assert not torch.allclose(got[i], default[i], atol=1e-4)  # the mean-likelihood objective differs


@pytest.mark.parametrize("verb", ["relevance", "attribute_positions"])
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_a_base_model_is_not_applicable(tiny, sentence_data, tmp_cache, name, verb):
    model = tiny("bert", "base")
    ctx = _ctx(model, sentence_data, model.sites("ffn"), tmp_cache)
    args = (1,) if verb == "attribute_positions" else ()
    with pytest.raises(NoObjectiveError, match="not applicable.*task head") as err:
        call_verb(get_method(name, **FAST[name]), verb, ctx, *args)
    # ValueError as asked of methods; NotImplementedError is what the runner records as not applicable
    assert isinstance(err.value, ValueError) and isinstance(err.value, NotImplementedError)


# ---------------------------------------------------------------- gradxact

def test_gradxact_equals_hand_computed_gradient_times_input(reference, sentence_data, tmp_cache):
    # With the pooler replaced by [CLS] itself, log p(y) = log_softmax(W h_cls + b)[y], whose
    # gradient w.r.t. the last hidden state is W[y] - p @ W at [CLS] and 0 at every other token.
    model = _sharp_classifier()
    model.model.bert.pooler = _FirstToken()
    site = Site.resid(1)
    W, b = model.model.classifier.weight.detach(), model.model.classifier.bias.detach()
    expected_pos, total, n_tokens = [], 0.0, 0
    for row in sentence_data:
        inputs = _encode_one(model, row["text"])
        h_TH = reference.record_sites(model, [site], **inputs)[site][0]
        p = torch.softmax(W @ h_TH[0] + b, -1)
        ga = h_TH[0] * (W[row["label"]] - p @ W)
        scores = torch.zeros(h_TH.shape[0])
        scores[0] = ga.sum()
        expected_pos.append(scores)
        total, n_tokens = total + ga.abs(), n_tokens + h_TH.shape[0]
    ctx = _ctx(model, sentence_data, [site], tmp_cache)
    method = get_method("gradxact")
    got_pos = call_verb(method, "attribute_positions", ctx, 1)
    for got, want in zip(got_pos, expected_pos):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    relevance = call_verb(method, "relevance", ctx).scores
    torch.testing.assert_close(relevance, total / n_tokens, atol=1e-6, rtol=1e-4)


def test_gradxact_relevance_matches_plain_autograd_through_every_path(reference, sentence_data, tmp_cache):
    # Several sites in one pass on a frozen model: the later site must still pass its gradient on.
    model = _sharp_classifier()
    sites = (Site.ffn(0), Site.resid(0), Site.ffn(1))
    sums = {s: torch.zeros(model.width(s)) for s in sites}
    n_tokens = 0
    for row in sentence_data:
        got, handles = {}, []

        def keep(site, t):
            t = t[0] if isinstance(t, tuple) else t
            t.retain_grad()
            got[site] = t

        for s in sites:
            if s.kind == "resid":
                handles.append(reference.block_of(model, s.layer).register_forward_hook(
                    lambda m, a, out, s=s: keep(s, out)))
            else:
                handles.append(reference.mlp_parts(model, s.layer)["down"].register_forward_pre_hook(
                    lambda m, args, s=s: keep(s, args[0])))
        try:
            inputs = _encode_one(model, row["text"])
            torch.log_softmax(model.model(**inputs).logits, -1)[0, row["label"]].backward()
        finally:
            for h in handles:
                h.remove()
        for s in sites:
            sums[s] += (got[s].grad * got[s]).detach()[0].abs().sum(0)
        n_tokens += inputs["input_ids"].shape[1]
    ctx = _ctx(model, sentence_data, sites, tmp_cache)
    scores = call_verb(get_method("gradxact"), "relevance", ctx)
    expected = scores.index.concat({s: v / n_tokens for s, v in sums.items()})
    torch.testing.assert_close(scores.scores, expected, atol=1e-6, rtol=1e-4)
    assert all(p.requires_grad for p in model.model.parameters()), "the model must be unfrozen after"


@pytest.mark.parametrize("name", ["gradxact", "integrated-gradients"])
def test_neurons_that_cannot_reach_the_output_score_exactly_zero(sentence_data, tmp_cache, name):
    model = _sharp_classifier()
    with torch.no_grad():
        model.model.bert.encoder.layer[1].output.dense.weight[:, :20] = 0  # ffn.1 neurons 0..19
        model.model.bert.pooler.dense.weight[:, :10] = 0  # resid.1 dims 0..9 never reach the head
    ctx = _ctx(model, sentence_data, (Site.ffn(1), Site.resid(1)), tmp_cache)
    per_site = ctx.index.split(call_verb(get_method(name), "relevance", ctx).scores)
    assert (per_site[Site.ffn(1)][:20] == 0).all() and (per_site[Site.ffn(1)][20:] > 0).all()
    assert (per_site[Site.resid(1)][:10] == 0).all() and (per_site[Site.resid(1)][10:] > 0).all()


# ---------------------------------------------------------------- integrated gradients

@pytest.mark.parametrize("site,baseline", [(Site.ffn(0), "zero"), (Site.ffn(0), "mean"),
                                           (Site.resid(0), "mean"), (Site.ffn(1), "mean")], ids=str)
def test_integrated_gradients_completeness(sentence_data, tmp_cache, site, baseline):
    model = _sharp_classifier()
    ctx = _ctx(model, sentence_data, [site], tmp_cache)
    zeros = torch.zeros(model.width(site))
    base = ctx.collect(("moments",))[site].moments.mean if baseline == "mean" else zeros
    for batch, labels in gradient_batches(model, sentence_data):
        ig_BTN = integrated_gradients(model, batch, labels, site, steps=16,
                                      baseline=None if baseline == "zero" else base)
        with torch.no_grad():
            full = objective(model, run(model, batch), batch, labels)
            with site_hooks(model.model, {site: lambda a: base.expand_as(a)}):
                at_baseline = objective(model, run(model, batch), batch, labels)
        gap = full - at_baseline
        assert gap.abs().max() > 0.05, "the test needs an objective that the site moves"
        torch.testing.assert_close(ig_BTN.sum((1, 2)), gap, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("rule", ["midpoint", "gausslegendre"])
def test_path_nodes_lie_inside_the_path_with_weights_summing_to_one_and_integrate_polynomials(rule):
    nodes, weights = path_nodes(4, rule)
    assert ((nodes > 0) & (nodes < 1)).all() and weights.sum() == pytest.approx(1.0)
    # Gauss-Legendre with n nodes is exact up to degree 2n - 1; the midpoint rule only up to 1.
    exact = {d: (weights * nodes ** d).sum() == pytest.approx(1 / (d + 1), rel=1e-12) for d in (1, 7)}
    assert exact == {1: True, 7: rule == "gausslegendre"}
    with pytest.raises(ValueError, match="use one of"):
        path_nodes(4, "simpson")


def test_auto_steps_keep_the_cheapest_complete_quadrature_per_site(sentence_data, tmp_cache, monkeypatch):
    """On each site's first batch "auto" climbs the ladder until the completeness error's 90th
    percentile is within the tolerance; later batches reuse the choice. A tolerance no quadrature
    meets ends on the last rung, which then gives what an explicit call of it gives."""
    import neuronbench.baselines.integrated_gradients as ig

    model, sites = _sharp_classifier(), (Site.ffn(0), Site.resid(0))
    ctx = _ctx(model, sentence_data, sites, tmp_cache)
    method = get_method("integrated-gradients")
    call_verb(method, "relevance", ctx)
    assert set(method.chosen) == set(sites)
    for site, (rule, steps, q) in method.chosen.items():
        assert q <= ig.AUTO_TOLERANCE or (rule, steps) == ig.AUTO_LADDER[-1], (site, rule, steps, q)
        # the rungs below the one kept were not complete enough on that batch
        batch, target = next(iter(gradient_batches(model, sentence_data, max_tokens=method._batch_tokens())))
        base = ctx.collect(("moments",))[site].moments.mean.float()
        for lower in ig.AUTO_LADDER[:ig.AUTO_LADDER.index((rule, steps))]:
            attr = integrated_gradients(model, batch, target, site, lower[1], base, rule=lower[0])
            gap = ig.baseline_gap(model, batch, target, site, base)
            assert torch.quantile(ig.completeness_error(attr, gap), 0.9) > ig.AUTO_TOLERANCE
    monkeypatch.setattr(ig, "AUTO_TOLERANCE", -1.0)
    strict = call_verb(get_method("integrated-gradients"), "relevance", ctx).scores
    rule, steps = ig.AUTO_LADDER[-1]  # the ladder's largest step count: batches alike
    explicit = call_verb(get_method("integrated-gradients", steps=steps, rule=rule), "relevance", ctx).scores
    torch.testing.assert_close(strict, explicit)


# ---------------------------------------------------------------- hard concrete and the multiplier

@pytest.mark.parametrize("log_alpha", [-4.0, -1.0, 0.0, 1.0, 4.0])
def test_expected_l0_matches_monte_carlo(log_alpha):
    la = torch.full((100_000,), log_alpha)
    z = hard_concrete_sample(la, torch.Generator().manual_seed(0))
    assert ((z >= 0) & (z <= 1)).all()
    assert (z > 0).float().mean().item() == pytest.approx(expected_l0(la[:1]).item(), abs=0.01)


def test_hard_concrete_has_a_point_mass_at_zero_and_a_continuous_part():
    # With the paper's stretch (-0.2, 1.0) only 0 carries a point mass: the stretched sample
    # never exceeds r = 1, so clamping at 1 changes nothing (bar float saturation of the sigmoid).
    la = torch.zeros(100_000, requires_grad=True)
    z = hard_concrete_sample(la, torch.Generator().manual_seed(1))
    at_zero = (z == 0).float().mean().item()
    assert at_zero == pytest.approx(1 - expected_l0(torch.zeros(1)).item(), abs=0.01)
    assert ((z > 0) & (z < 1)).float().mean().item() > 0.5
    z.sum().backward()  # reparameterised: a gradient reaches log_alpha through the open gates
    assert (la.grad > 0).any() and (la.grad[z.detach() == 0] == 0).all()


def test_lagrange_multiplier_rises_while_violated_and_stays_in_bounds():
    slow = LagrangeMultiplier()  # inside Lookahead (k=6): it rises between syncs and from sync to sync
    values = [slow.value.item()]
    for _ in range(24):
        slow(torch.tensor([0.3, 0.5])).mean().backward()
        slow.ascend()
        values.append(slow.value.item())
    synced = values[::6]
    assert all(b > a for a, b in zip(synced, synced[1:])), values
    assert all(b > a for s in range(0, 24, 6) for a, b in zip(values[s:s + 5], values[s + 1:s + 6])), values

    fast = LagrangeMultiplier(lr=40.0)
    for violation, bound in ((1.0, LAGRANGE_MAX), (-1.0, 0.0)):
        trace = []
        for _ in range(40):
            fast(torch.tensor(violation)).backward()
            fast.ascend()
            trace.append(fast.value.item())
        assert all(0.0 <= v <= LAGRANGE_MAX for v in trace)
        assert trace[-1] == bound


# ---------------------------------------------------------------- diffmask

def test_diffmask_neuron_and_position_modes_return_valid_outputs(tiny, sentence_data, tmp_cache):
    model = tiny("bert", "classifier")
    ctx = _ctx(model, sentence_data, model.sites("ffn"), tmp_cache)
    method = get_method("diffmask", steps=20)
    scores = call_verb(method, "relevance", ctx).scores
    assert scores.shape == (ctx.index.size,) and ((scores >= 0) & (scores <= 1)).all()
    assert method.history["step"] == list(range(1, 21)) and method.history["dev_step"] == [20]
    positions = call_verb(method, "attribute_positions", ctx, 1)
    lengths = [len(model.tokenizer(t)["input_ids"]) for t in sentence_data["text"]]
    assert [len(p) for p in positions] == lengths
    assert all(((p >= 0) & (p <= 1)).all() for p in positions)
    assert all(0 <= v <= LAGRANGE_MAX for v in method.history["lagrange"])
    assert all(v > -1e-6 for v in method.history["kl"])


def _decisive_classifier(cut_dims: int = 0):
    """A sharp classifier with logits large enough that masking what the head reads breaks the KL
    budget (it does not for most random models); its head ignores last-layer dims < `cut_dims`."""
    model = _sharp_classifier()
    with torch.no_grad():
        model.model.bert.pooler.dense.weight[:, :cut_dims] = 0
        model.model.classifier.weight.mul_(20)
    return model


def test_diffmask_neuron_mode_keeps_the_neurons_the_head_reads(tmp_cache):
    from .test_diffmask import _sentences  # enough sentences for a dev split that can see the KL

    ctx = _ctx(_decisive_classifier(cut_dims=16), _sentences(160, 0), (Site.resid(1),), tmp_cache)
    method = get_method("diffmask", steps=200)
    scores = call_verb(method, "relevance", ctx).scores
    cut, read = scores[:16], scores[16:]
    assert read.mean() > 3 * cut.max() and cut.max() < 0.05, (cut.max(), read.mean())
    assert max(method.history["lagrange"]) > 1, "the KL constraint should have bound"
    assert method.summary["met"] and method.summary["dev_kl"] > 0.01, method.summary


def test_diffmask_position_mode_closes_what_the_head_does_not_read(sentence_data, tmp_cache):
    # At the last layer the head reads [CLS] only (never gated): every word can be masked for free.
    ctx = _ctx(_decisive_classifier(), sentence_data, (), tmp_cache)
    method = get_method("diffmask", steps=200)
    keep = call_verb(method, "attribute_positions", ctx, 1)
    words = torch.cat([k[1:-1] for k in keep])
    assert words.mean() < 0.25, words.mean()
    assert method.summary["met"] and method.summary["dev_l0"] < 0.25, method.summary


def test_diffmask_is_seeded(tiny, sentence_data, tmp_cache):
    model = tiny("bert", "classifier")
    runs = [call_verb(get_method("diffmask", steps=5), "attribute_positions",
                      _ctx(model, sentence_data, (), tmp_cache, seed=seed), 0) for seed in (0, 0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_causal_lm_outputs_are_valid(tiny, sentence_data, tmp_cache, name):
    model = tiny("gpt2", "causal-lm")
    ctx = _ctx(model, sentence_data, model.sites("all"), tmp_cache)
    method = get_method(name, **FAST[name])
    scores = call_verb(method, "relevance", ctx).scores
    assert scores.shape == (ctx.index.size,) and scores.abs().sum() > 0
    positions = call_verb(method, "attribute_positions", ctx, 0)
    lengths = [len(model.tokenizer(t)["input_ids"]) for t in sentence_data["text"]]
    assert [len(p) for p in positions] == lengths


@pytest.mark.parametrize("arch,kind", [("bert", "classifier"), ("llama", "causal-lm"), ("gpt2", "causal-lm"),
                                       ("gpt2", "classifier")])
@pytest.mark.parametrize("site", [Site.resid(0), Site.ffn(1)], ids=str)
def test_integrated_gradients_runs_the_blocks_before_the_site_once_with_the_same_attributions(
        tiny, sentence_data, arch, kind, site):
    from neuronbench.harness.engine.arch import layer_modules

    model = tiny(arch, kind)
    batch, target = next(iter(gradient_batches(model, sentence_data.select(range(6)))))
    base = torch.full((model.width(site),), 0.1)
    plain = integrated_gradients(model, batch, target, site, steps=4, baseline=base, prefix_once=False)
    rows: list[int] = []
    handle = layer_modules(model.model)[0].register_forward_hook(
        lambda m, a, out: rows.append(int((out[0] if isinstance(out, tuple) else out).shape[0])))
    try:
        reused = integrated_gradients(model, batch, target, site, steps=4, baseline=base)
    finally:
        handle.remove()
    scale = plain.abs().max()
    assert scale > 1e-7 and plain[0].abs().sum() > 0  # the site moves the objective, so the test can fail
    torch.testing.assert_close(reused / scale, plain / scale, rtol=0, atol=1e-4)
    B = batch.input_ids.shape[0]  # block 0 runs on the plain batch; a head pooling by input_ids retries
    assert rows == ([B, 4 * B] if (arch, kind) == ("gpt2", "classifier") else [B])
