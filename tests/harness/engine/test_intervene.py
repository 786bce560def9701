"""Tests for neuronbench.harness.engine.intervene: ablation changes exactly the ablated units, batched
multi-mask evaluation equals one mask at a time, and hooks never outlive their block."""
from __future__ import annotations

import pytest
import torch

from neuronbench.harness.engine.intervene import MaskSet, ablate, evaluate_masks, gold_label_scores
from neuronbench.harness.engine.models import site_module
from neuronbench.harness.engine.sites import Site
from neuronbench.harness.zoo.tiny import TINY_ARCHS

SITES = (Site.ffn(0), Site.resid(0), Site.ffn(1), Site.resid(1))
ABLATED = torch.tensor([1, 5, 17, 30])


def _means(model):
    gen = torch.Generator().manual_seed(3)
    return {s: torch.randn(model.width(s), generator=gen) for s in SITES}


def _batch(model, texts):
    enc = model.tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _harness_hooks(model):
    """Hooks the harness added (transformers adds output-capturing hooks of its own)."""
    return [h for m in model.model.modules()
            for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
            if getattr(h, "__module__", "").startswith("neuronbench")]


# ---------------------------------------------------------------- ablate

@pytest.mark.parametrize("mode", ["zero", "mean"])
@pytest.mark.parametrize("site", SITES, ids=str)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_ablation_changes_exactly_the_ablated_units_at_their_site(tiny, reference, sentence_data, arch, site,
                                                                  mode):
    model = tiny(arch)
    inputs = _batch(model, sentence_data["text"][:3])
    means = _means(model)
    clean = reference.record_sites(model, SITES, **inputs)
    with ablate(model, {site: ABLATED}, mode, means if mode == "mean" else None):
        ablated = reference.record_sites(model, SITES, **inputs)  # plain hooks, registered after
    keep = torch.ones(model.width(site), dtype=torch.bool)
    keep[ABLATED] = False
    fill = means[site][ABLATED] if mode == "mean" else torch.zeros(len(ABLATED))
    assert torch.equal(ablated[site][..., keep], clean[site][..., keep])
    assert torch.equal(ablated[site][..., ~keep], fill.expand_as(ablated[site][..., ~keep]))
    assert not torch.equal(clean[site][..., ~keep], ablated[site][..., ~keep])
    for other in SITES:  # upstream sites are untouched, downstream ones see the change
        if other < site:
            assert torch.equal(ablated[other], clean[other])
        elif other.layer > site.layer:
            assert not torch.allclose(ablated[other], clean[other])
    assert _harness_hooks(model) == []


def test_hooks_are_removed_when_the_block_raises(tiny, reference, sentence_data):
    model = tiny("gpt_neox")
    inputs = _batch(model, sentence_data["text"][:2])
    clean = reference.record_sites(model, SITES, **inputs)
    with pytest.raises(RuntimeError, match="inside"):
        with ablate(model, {Site.ffn(0): ABLATED, Site.resid(1): torch.tensor([0])}):
            assert len(_harness_hooks(model)) == 3  # an ffn site also watches its block's input shape
            raise RuntimeError("inside")
    assert _harness_hooks(model) == []
    after = reference.record_sites(model, SITES, **inputs)
    assert all(torch.equal(after[s], clean[s]) for s in SITES)


def test_mean_ablation_without_means_is_rejected(tiny, sentence_data):
    model = tiny("bert", "classifier")
    with pytest.raises(ValueError, match="mean ablation needs"):
        with ablate(model, {Site.ffn(0): ABLATED}, "mean"):
            pass
    with pytest.raises(ValueError, match="ffn.1 has none"):
        with ablate(model, {Site.ffn(0): ABLATED, Site.ffn(1): ABLATED}, "mean",
                    means={Site.ffn(0): torch.zeros(64)}):
            pass
    masks = MaskSet.from_sets(model, [{Site.ffn(0): ABLATED}])
    with pytest.raises(ValueError, match="mean ablation needs"):
        evaluate_masks(model, sentence_data, masks, lambda out, b: out.logits, mode="mean")
    assert _harness_hooks(model) == []


def test_bad_mode_and_out_of_range_neurons_are_rejected(tiny):
    model = tiny("bert")
    with pytest.raises(ValueError, match="unknown ablation mode 'random'"):
        with ablate(model, {Site.ffn(0): ABLATED}, "random"):
            pass
    with pytest.raises(IndexError, match="0..63"):
        with ablate(model, {Site.ffn(0): torch.tensor([64])}):
            pass
    assert _harness_hooks(model) == []


# ---------------------------------------------------------------- evaluate_masks

def _random_sets(model, k: int):
    gen = torch.Generator().manual_seed(7)
    sets = [{}]  # the unablated model is one of the masks
    for i in range(1, k):
        sites = [Site.ffn(0), Site.resid(1)] if i % 2 else [Site.ffn(1)]
        sets.append({s: torch.randperm(model.width(s), generator=gen)[:4 * i] for s in sites})
    return sets


def _one_at_a_time(model, dataset, sets, mode, means):
    labels = torch.tensor(dataset["label"])
    out = torch.zeros(len(sets), len(dataset), 2)
    for k, one in enumerate(sets):
        with ablate(model, one, mode, means), torch.no_grad():
            for i, text in enumerate(dataset["text"]):
                logits = model.model(**_batch(model, [text])).logits[0]
                logp = torch.log_softmax(logits, -1)
                out[k, i] = torch.tensor([float(logits.argmax() == labels[i]), logp[labels[i]]])
    return out


@pytest.mark.parametrize("max_tokens", [48, 100, 8192],
                         ids=["one-mask-per-pass", "masks-in-groups", "all-masks-in-one-pass"])
@pytest.mark.parametrize("mode", ["zero", "mean"])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_batched_masks_equal_one_mask_at_a_time(tiny, sentence_data, arch, mode, max_tokens):
    model = tiny(arch, "classifier")
    sets = _random_sets(model, 5)
    means = _means(model) if mode == "mean" else None
    labels = torch.tensor(sentence_data["label"])
    got = evaluate_masks(model, sentence_data, MaskSet.from_sets(model, sets),
                         lambda out, batch: gold_label_scores(out, batch, labels), mode=mode, means=means,
                         max_tokens=max_tokens)
    expected = _one_at_a_time(model, sentence_data, sets, mode, means)
    assert got.shape == (5, len(sentence_data), 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(got[0, :, 1], got[4, :, 1])  # the masks did something
    assert _harness_hooks(model) == []


def test_mask_set_from_sets_marks_the_given_neurons(tiny):
    model = tiny("bert", "classifier")
    sets = [{Site.ffn(1): torch.tensor([0, 3])}, {Site.resid(0): torch.tensor([2])}]
    masks = MaskSet.from_sets(model, sets)
    assert masks.k == 2 and set(masks.masks) == {Site.resid(0), Site.ffn(1)}
    assert masks.masks[Site.ffn(1)].shape == (2, 64)
    assert masks.masks[Site.ffn(1)][0].nonzero().squeeze(1).tolist() == [0, 3]
    assert not masks.masks[Site.ffn(1)][1].any() and not masks.masks[Site.resid(0)][0].any()
    assert masks.masks[Site.resid(0)][1].nonzero().squeeze(1).tolist() == [2]


def test_evaluate_masks_removes_hooks_when_scoring_raises(tiny, sentence_data):
    model = tiny("llama", "classifier")
    masks = MaskSet.from_sets(model, _random_sets(model, 3))

    def score(out, batch):
        raise RuntimeError("score failed")

    with pytest.raises(RuntimeError, match="score failed"):
        evaluate_masks(model, sentence_data, masks, score)
    assert _harness_hooks(model) == []
    assert not site_module(model.model, Site.ffn(0))._forward_pre_hooks


# ---------------------------------------------------------------- prefix reuse

def _late_sets(model, k: int):
    """Masks confined to layer 1 and later (and one unablated model): the prefix is shared."""
    gen = torch.Generator().manual_seed(11)
    sets = [{}]
    for i in range(1, k):
        site = Site.ffn(1) if i % 2 else Site.resid(1)
        sets.append({site: torch.randperm(model.width(site), generator=gen)[:3 * i]})
    return sets


def _block_rows(model):
    """Record the batch rows each block's hidden states enter with (a plain forward hook)."""
    from neuronbench.harness.engine.arch import layer_modules

    seen = {}

    def make(i):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            seen.setdefault(i, []).append(int(out.shape[0]))
        return hook
    blocks = layer_modules(model.model)
    return seen, [b.register_forward_hook(make(i), with_kwargs=True) for i, b in enumerate(blocks)]


@pytest.mark.parametrize("arch,kind", [("bert", "classifier"), ("gpt2", "causal-lm"),
                                       ("gpt_neox", "causal-lm"), ("llama", "causal-lm")])
def test_prefix_once_equals_copying_the_inputs_and_runs_the_prefix_once(tiny, sentence_data, arch, kind):
    from neuronbench.harness.engine.intervene import next_token_scores

    model = tiny(arch, kind)
    masks = MaskSet.from_sets(model, _late_sets(model, 5))
    if kind == "classifier":
        labels = torch.tensor(sentence_data["label"])
        score = lambda out, batch: gold_label_scores(out, batch, labels)  # noqa: E731
    else:
        score = next_token_scores
    plain = evaluate_masks(model, sentence_data, masks, score, max_tokens=8192, prefix_once=False)
    seen, handles = _block_rows(model)
    try:
        reused = evaluate_masks(model, sentence_data, masks, score, max_tokens=8192, prefix_once=True)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(reused, plain, rtol=0, atol=1e-5)
    assert not torch.allclose(plain[0, :, 1], plain[4, :, 1])  # the masks did something
    n = len(sentence_data)  # one batch: block 0 sees the examples once, block 1 on sees 5 copies
    assert seen[0] == [n] and seen[1] == [5 * n]
    assert _harness_hooks(model) == []


def test_prefix_once_falls_back_where_the_head_pools_by_input_ids(tiny, sentence_data):
    model = tiny("gpt2", "classifier")  # pools the last real token found from input_ids: B rows out
    labels = torch.tensor(sentence_data["label"])
    masks = MaskSet.from_sets(model, _late_sets(model, 3))
    got = [evaluate_masks(model, sentence_data, masks, lambda out, b: gold_label_scores(out, b, labels),
                          prefix_once=p) for p in (True, False)]
    torch.testing.assert_close(got[0], got[1], rtol=0, atol=1e-5)
    assert _harness_hooks(model) == []
