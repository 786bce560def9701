"""Tests for the `txray` baseline: the Hellinger distance, TX-Ray's token distributions against a
plain re-implementation of the public code's recipe on activations from plain hooks, and stage
comparisons of tiny models against identical and perturbed copies."""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from types import SimpleNamespace

import datasets
import pytest
import torch

from neuronbench.baselines.txray import (StageComparison, TXRay, by_token_string, compare_tables, hellinger,
                                         neuron_metrics, relevance_scores, token_distributions)
from neuronbench.harness.engine.method import MethodContext, call_verb
from neuronbench.harness.engine.sites import NeuronIndex, Site

TEXTS = ["the cat sat on the mat .", "stocks rallied sharply yesterday .", "this movie is wonderful",
         "the plot was boring and badly written .", "he quickly walked home , singing loudly", "a dog"] * 2
SITES = (Site.ffn(0), Site.resid(1))


def _table(rows):
    """A Max1-style table from (neuron, token_id, act_sum, count) rows."""
    n, t, a, c = zip(*rows)
    return {"neuron": torch.tensor(n), "token_id": torch.tensor(t),
            "act_sum": torch.tensor(a, dtype=torch.float64), "count": torch.tensor(c)}


def _perturbed(model, scale, seed=0):
    out = copy.deepcopy(model)
    out.name = f"{model.name}-noise{scale}"
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return out


def _ctx(model, parent, tmp_cache, sites=SITES, texts=TEXTS):
    data = datasets.Dataset.from_dict({"text": texts})
    return MethodContext(model, sites=sites, data=data, data_id=f"txray-{len(texts)}", parent=parent,
                         cache=tmp_cache)


# --------------------------------------------------------------------------- pure functions

def test_hellinger_is_zero_for_equal_and_one_for_disjoint_distributions():
    p = torch.tensor([0.2, 0.3, 0.5, 0.0])
    assert float(hellinger(p, p)) == pytest.approx(0.0, abs=1e-12)
    assert float(hellinger(torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.25, 0.75]))) \
        == pytest.approx(1.0)


def test_hellinger_matches_a_hand_computed_partial_overlap():
    # sqrt terms: (0.8 - 0.5)^2 + (0.6 - 0.5)^2 + (0 - sqrt 0.5)^2 = 0.09 + 0.01 + 0.5 = 0.6
    p, q = torch.tensor([0.64, 0.36, 0.0]), torch.tensor([0.25, 0.25, 0.5])
    assert float(hellinger(p, q)) == pytest.approx(math.sqrt(0.6) / math.sqrt(2))
    batch = hellinger(torch.stack([p, p]), torch.stack([q, p]))  # rows reduce independently
    assert batch.tolist() == pytest.approx([math.sqrt(0.3), 0.0])


def test_token_distribution_normalises_by_mass_then_averages_per_token_without_renormalising():
    # Neuron 0 wins token 7 twice (2 and 4) and token 9 once (2): mass 8.
    # Public-code recipe: mean(2/8, 4/8) = 0.375 for token 7, 2/8 = 0.25 for token 9 (sum 0.625).
    table = _table([(0, 7, 6.0, 2), (0, 9, 2.0, 1), (3, 7, 1.5, 3)])
    dist = token_distributions(table)
    assert dist["neuron"].tolist() == [0, 0, 3] and dist["token_id"].tolist() == [7, 9, 7]
    assert dist["p"].tolist() == pytest.approx([0.375, 0.25, 1.0 / 3])


def test_token_distribution_clips_negative_credits_so_square_roots_stay_defined():
    dist = token_distributions(_table([(0, 1, -2.0, 1), (0, 2, 4.0, 2), (1, 5, -1.0, 1)]))
    assert dist["p"].tolist() == pytest.approx([0.0, 0.5, 0.0])
    assert torch.isfinite(hellinger(dist["p"], dist["p"])).all()


def test_neuron_metrics_mass_length_wins_and_activity():
    m = neuron_metrics(_table([(0, 7, 6.0, 2), (0, 9, 2.0, 1), (2, 7, 1.5, 3)]), n=4)
    assert m["mass"].tolist() == [8.0, 0.0, 1.5, 0.0]
    assert m["length"].tolist() == [2, 0, 1, 0]
    assert m["wins"].tolist() == [3, 0, 3, 0]
    assert m["active"].tolist() == [True, False, True, False]


def test_compare_tables_is_hellinger_over_the_union_for_neurons_active_in_both():
    before = _table([(0, 1, 3.0, 1), (0, 2, 1.0, 1), (1, 4, 2.0, 1), (2, 5, 1.0, 1)])
    after = _table([(0, 2, 2.0, 2), (0, 3, 2.0, 1), (1, 4, 5.0, 1), (3, 6, 1.0, 1)])
    out = compare_tables(before, after, n=5)
    # Neuron 0 on the union {1, 2, 3}: before (3/4, 1/4, 0), after (0, (2/4)/2, 2/4).
    expected0 = float(hellinger(torch.tensor([0.75, 0.25, 0.0]), torch.tensor([0.0, 0.25, 0.5])))
    assert out["hellinger"][0].item() == pytest.approx(expected0)
    assert out["hellinger"][1].item() == pytest.approx(0.0)  # same single token, any mass
    assert out["hellinger"][2:].isnan().all()  # active in one stage or none: not compared
    assert out["union"].tolist() == [3, 1, 1, 1, 0]
    assert out["shared"].tolist() == [True, True, False, False, False]
    assert out["length_shift"].tolist() == [0, 0, -1, 1, 0]
    averaged = compare_tables(before, after, n=5, average=True)
    assert averaged["hellinger"][0].item() == pytest.approx(expected0 / 3)


def test_relevance_scores_give_the_largest_distance_to_gained_and_lost_neurons():
    before = _table([(0, 1, 3.0, 1), (0, 2, 1.0, 1), (2, 5, 1.0, 1), (2, 6, 1.0, 1)])
    after = _table([(0, 2, 2.0, 2), (0, 3, 2.0, 1), (3, 6, 1.0, 1)])
    zero = relevance_scores(compare_tables(before, after, n=5), no_evidence="zero")
    assert 0 < zero[0] < 1
    assert zero[1:].tolist() == [0.0, 1.0, 1.0, 0.0]  # inactive in both, lost, gained, inactive
    averaged = relevance_scores(compare_tables(before, after, n=5, average=True), average=True)
    assert averaged[2:4].tolist() == [0.5, 1.0]  # 1 / union size, like every averaged distance


def test_neurons_without_evidence_sit_at_the_median_of_those_with_evidence():
    before = _table([(0, 1, 3.0, 1), (0, 2, 1.0, 1), (2, 5, 1.0, 1), (2, 6, 1.0, 1)])
    after = _table([(0, 2, 2.0, 2), (0, 3, 2.0, 1), (3, 6, 1.0, 1)])
    before = _table([(0, 1, 3.0, 1), (0, 2, 1.0, 1), (1, 2, 1.0, 1), (2, 5, 1.0, 1)])
    after = _table([(0, 2, 2.0, 2), (0, 3, 2.0, 1), (1, 2, 5.0, 1), (3, 6, 1.0, 1)])
    neutral = relevance_scores(compare_tables(before, after, n=6))  # neurons 4 and 5 never win a token
    compared = neutral[[0, 1]]  # neuron 1: the same single token in both stages, distance 0
    assert neutral[4] == neutral[5] == compared.mean() and neutral[2] == neutral[3] == 1  # median of two
    assert compared.min() == 0 < neutral[4] < 1  # neither the least nor the most changed


def test_by_token_string_meets_two_numberings_of_the_same_tokens():
    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def convert_ids_to_tokens(self, ids):
            return [self.vocab[i] for i in ids]

    codes: dict[str, int] = {}
    a = by_token_string(_table([(0, 0, 1.0, 1), (0, 1, 3.0, 1)]), Tok(["cat", "dog"]), codes)
    b = by_token_string(_table([(0, 5, 3.0, 1), (0, 9, 1.0, 1)]), Tok({5: "dog", 9: "cat"}), codes)
    assert compare_tables(a, b, n=1)["hellinger"][0].item() == pytest.approx(0.0)
    merged = by_token_string(_table([(0, 0, 1.0, 1), (0, 1, 2.0, 3)]), Tok(["cat", "cat"]), {})
    assert merged["act_sum"].tolist() == [3.0] and merged["count"].tolist() == [4]


# --------------------------------------------------------------------------- end to end

def _public_code_distributions(examples, site, tokenizer):
    """TX-Ray's recipe in plain Python on activations from plain hooks: per token, credit its
    arg-max neuron; per neuron, divide each credit by the neuron's total, then average per token."""
    credits = defaultdict(list)
    for one in examples:
        for ids_pos, (tok, special) in enumerate(zip(one["ids"], one["special"])):
            if special:
                continue
            acts = one["acts"][site][ids_pos]
            credits[int(acts.argmax())].append((tokenizer.convert_ids_to_tokens(tok), float(acts.max())))
    out = {}
    for neuron, pairs in credits.items():
        total = sum(a for _, a in pairs)
        per_token = defaultdict(list)
        for tok, a in pairs:
            per_token[tok].append(a / total)
        out[neuron] = {tok: sum(v) / len(v) for tok, v in per_token.items()}
    return out


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_max1_distributions_match_the_public_code_recipe_on_hook_activations(tiny, reference, tmp_cache, arch):
    model = tiny(arch)
    data = datasets.Dataset.from_dict({"text": TEXTS})
    examples = reference.acts_per_example(model, data, SITES)
    ctx = MethodContext(model, sites=SITES, data=data, data_id="e2e", cache=tmp_cache)
    col = ctx.collect(stats=("max1",))
    for site in SITES:
        codes: dict[str, int] = {}
        dist = token_distributions(by_token_string(col[site].max1.table(), model.tokenizer, codes))
        names = {c: s for s, c in codes.items()}
        got = defaultdict(dict)
        for n, t, p in zip(dist["neuron"].tolist(), dist["token_id"].tolist(), dist["p"].tolist()):
            got[n][names[t]] = p
        expected = _public_code_distributions(examples, site, model.tokenizer)
        assert set(got) == set(expected)
        for neuron, tokens in expected.items():
            assert got[neuron].keys() == tokens.keys()
            for tok, p in tokens.items():
                assert got[neuron][tok] == pytest.approx(p, rel=1e-4, abs=1e-6)


def test_stage_change_is_zero_against_an_identical_copy(tiny, tmp_cache):
    model = tiny("bert")
    twin = copy.deepcopy(model)
    ctx = _ctx(model, twin, tmp_cache)
    assert call_verb(TXRay(), "stage_change", ctx) == pytest.approx(0.0, abs=1e-12)
    assert call_verb(TXRay(average=True), "stage_change", ctx) == pytest.approx(0.0, abs=1e-12)
    assert call_verb(TXRay(), "relevance", ctx).scores.abs().max() == 0


def test_stage_change_grows_with_the_perturbation(tiny, tmp_cache):
    model = tiny("bert")
    small = call_verb(TXRay(), "stage_change", _ctx(model, _perturbed(model, 0.002), tmp_cache))
    large = call_verb(TXRay(), "stage_change", _ctx(model, _perturbed(model, 0.2), tmp_cache))
    assert 0 < small < large <= 1


def test_stage_change_is_the_mean_over_shared_neurons_and_relevance_ranks_change(tiny, tmp_cache):
    model = tiny("bert")
    ctx = _ctx(model, _perturbed(model, 0.05), tmp_cache)
    method = TXRay()
    cmp = method.compare(ctx)
    shared = cmp["shared"]
    assert shared.any() and not shared.all()
    assert method.stage_change(ctx) == pytest.approx(cmp["hellinger"][shared].mean().item())
    rel = call_verb(method, "relevance", ctx).scores
    assert rel.shape == (ctx.index.size,)
    either, one_sided = cmp["active_before"] | cmp["active_after"], cmp["active_before"] ^ cmp["active_after"]
    assert (rel[one_sided] == 1).all()
    assert torch.allclose(rel[shared].double(), cmp["hellinger"][shared])
    assert torch.allclose(rel[~either].double(), cmp["hellinger"][shared].quantile(0.5))  # no evidence: neutral
    zero = call_verb(TXRay(no_evidence="zero"), "relevance", ctx).scores
    assert (zero[~either] == 0).all()
    averaged = TXRay(average=True).stage_change(ctx)
    assert averaged == pytest.approx((cmp["hellinger"][shared] / cmp["union"][shared]).mean().item())


def _fixed(method, before, after, n, monkeypatch):
    """`method` comparing two hand-made tables of one site of width n, whatever the context."""
    index = NeuronIndex.build({Site.ffn(0): n})
    monkeypatch.setattr(method, "compare", lambda ctx: StageComparison(
        index, compare_tables(before, after, n, average=method.average)))
    return method


def test_no_shared_neuron_falls_back_to_the_mean_relevance_of_active_neurons(monkeypatch):
    before, after = _table([(0, 1, 1.0, 1), (1, 2, 1.0, 1), (1, 3, 1.0, 1)]), _table([(2, 1, 1.0, 1)])
    ctx = SimpleNamespace(data_id="d")
    assert _fixed(TXRay(), before, after, 4, monkeypatch).stage_change(ctx) == pytest.approx(1.0)
    averaged = _fixed(TXRay(average=True), before, after, 4, monkeypatch).stage_change(ctx)
    assert averaged == pytest.approx((1 + 0.5 + 1) / 3)
    empty = _table([(0, 1, 0.0, 1)])
    empty = {k: v[:0] for k, v in empty.items()}
    with pytest.raises(ValueError, match="no token"):
        _fixed(TXRay(), empty, empty, 4, monkeypatch).stage_change(ctx)


def test_txray_needs_a_parent(tiny, tmp_cache):
    with pytest.raises(ValueError, match="parent"):
        TXRay().stage_change(_ctx(tiny("bert"), None, tmp_cache))
