"""Tests for the `contrast` baseline: average ranks and AUROC against brute force, descriptor
ranking, and an end-to-end run on a tiny model whose descriptors are defined from activations
recorded with plain hooks (so a misaligned word matrix would rank them wrong)."""
from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from neuronbench.baselines.contrast import (Contrast, auroc, average_ranks, descriptor_matrix, rank_descriptors,
                                            word_activations)
from neuronbench.harness.engine.method import MethodContext, call_verb
from neuronbench.harness.engine.sites import Site

WORDS = [["the", "cat", "sat", "on", "the", "mat", "."], ["stocks", "rallied", "sharply", "yesterday"],
         ["unbelievably", "dull", "movie"], ["he", "quickly", "walked", "home", ",", "singing", "loudly"],
         ["investors", "bought", "banking", "shares"], ["a", "dog"]] * 2
SITE = Site.ffn(1)


def _brute_auroc(scores, positive):
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_average_ranks_match_scipy_with_ties():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0, 3.0], [0.0] * 6, [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    assert average_ranks(x).tolist() == rankdata(x.numpy(), method="average", axis=-1).tolist()


@pytest.mark.parametrize("chunk_elems", [1, 50, 1 << 22])  # one neuron at a time, a few, all at once
def test_auroc_matches_a_brute_force_pairwise_count(chunk_elems):
    gen = np.random.default_rng(0)
    scores = gen.integers(0, 4, size=(40, 7)).astype(np.float16)  # few values: many ties
    labels = torch.from_numpy(gen.random((40, 3)) < 0.3)
    got = auroc(scores, labels, chunk_elems=chunk_elems)
    assert got.shape == (3, 7)
    for v in range(3):
        for n in range(7):
            expected = _brute_auroc(scores[:, n].astype(float), labels[:, v].numpy())
            assert got[v, n].item() == pytest.approx(expected)


def test_auroc_is_nan_for_a_label_without_positives_or_negatives():
    scores = torch.randn(10, 2)
    labels = torch.stack([torch.zeros(10, dtype=torch.bool), torch.ones(10, dtype=torch.bool),
                          torch.arange(10) < 5], 1)
    got = auroc(scores, labels)
    assert got[:2].isnan().all() and not got[2].isnan().any()


def test_a_neuron_equal_to_a_descriptor_indicator_gets_it_first():
    gen = np.random.default_rng(1)
    vocab = ("a", "b", "c")
    labels = torch.from_numpy(gen.random((60, 3)) < 0.4)
    scores = gen.normal(size=(60, 5)).astype(np.float32)
    scores[:, 3] = labels[:, 1].numpy()  # neuron 3 fires exactly on descriptor "b"
    ranked = rank_descriptors(auroc(scores, labels), vocab)
    assert ranked[3][0] == "b"
    assert auroc(scores, labels)[1, 3].item() == 1.0


def test_rank_descriptors_keeps_above_chance_best_first_at_most_top():
    auc = torch.tensor([[0.9, 0.5, float("nan")], [0.7, 0.4, 0.6], [0.9, 0.55, 0.2], [0.6, 0.3, 0.1]])
    assert rank_descriptors(auc, ("w", "x", "y", "z")) == [["w", "y", "x", "z"], ["y"], ["x"]]
    assert rank_descriptors(auc, ("w", "x", "y", "z"), top=2) == [["w", "y"], ["y"], ["x"]]


def test_descriptor_matrix_flattens_words_in_dataset_order_and_checks_lengths():
    data = datasets.Dataset.from_dict({"words": [["a", "b"], ["c"]],
                                       "word_descriptors": [[["x"], ["y", "other"]], [["x", "y"]]]})
    assert descriptor_matrix(data, ("x", "y")).tolist() == [[True, False], [False, True], [True, True]]
    bad = datasets.Dataset.from_dict({"words": [["a", "b"]], "word_descriptors": [[["x"]]]})
    with pytest.raises(ValueError, match="2 words but 1"):
        descriptor_matrix(bad, ("x",))


# --------------------------------------------------------------------------- end to end

def _last_subword_acts(examples, n_words):
    """(W, N) activation at each word's last subword, from plain-hook recordings."""
    rows = []
    for one, n in zip(examples, n_words):
        last = {w: p for p, w in enumerate(one["word_ids"]) if w is not None}
        rows.extend(one["acts"][SITE][last[w]] for w in range(n))
    return np.stack(rows)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, reference):
    """A tiny BERT, word data whose descriptor `hi` marks the words where neuron J of SITE is above
    its median (from plain hooks), `coin` a random descriptor, `every` one that always holds."""
    from neuronbench.harness.engine.cache import Cache
    from neuronbench.harness.zoo.tiny import tiny_model

    model = tiny_model("bert", seed=2)
    data = datasets.Dataset.from_dict({"words": WORDS})
    acts = _last_subword_acts(reference.acts_per_example(model, data, (SITE,)), [len(w) for w in WORDS])
    j = 17
    col = acts[:, j].astype(np.float16)  # the matrix contrast reads is float16
    hi = col > np.median(col)
    coin = np.random.default_rng(0).random(len(col)) < 0.5
    per_word = [[d for d, on in (("hi", h), ("coin", c), ("every", True)) if on] for h, c in zip(hi, coin)]
    offsets = np.cumsum([0] + [len(w) for w in WORDS])
    data = data.add_column("word_descriptors", [per_word[a:b] for a, b in zip(offsets[:-1], offsets[1:])])
    ctx = MethodContext(model, sites=(Site.ffn(0), SITE), data=data, data_id="planted",
                        cache=Cache(tmp_path_factory.mktemp("cache")))
    return ctx, j


def test_descriptors_end_to_end_rank_the_planted_descriptor_first(planted):
    ctx, j = planted
    vocab = ("coin", "every", "hi", "unused")
    out = call_verb(Contrast(), "descriptors", ctx, vocab)  # validated output format
    assert sorted(out) == list(range(ctx.index.size))
    flat = ctx.index.flat(SITE, j)
    assert out[flat][0] == "hi"
    assert not any({"every", "unused"} & set(ranked) for ranked in out.values())  # AUROC undefined
    assert sum(ranked[:1] == ["hi"] for ranked in out.values()) < ctx.index.size  # not everyone's first


def test_relevance_end_to_end_per_concept_and_for_one_concept(planted):
    ctx, j = planted
    table = call_verb(Contrast(), "relevance", ctx)
    assert table.concepts == ("coin", "every", "hi")
    assert (table.scores[1] == 0.5).all()  # no negatives: chance
    hi = table.scores[2]
    assert hi[ctx.index.flat(SITE, j)].item() == pytest.approx(1.0)
    one = call_verb(Contrast(), "relevance", MethodContext(**{**vars(ctx), "concept": "hi"}))
    assert torch.equal(one.scores, hi)


def test_relevance_on_sentence_labels_gives_each_word_its_sentence_label(tiny, tmp_cache):
    model = tiny("bert")
    data = datasets.Dataset.from_dict({"text": [" ".join(w) for w in WORDS], "label": [0, 1, 1, 0, 1, 0] * 2})
    ctx = MethodContext(model, sites=(SITE,), data=data, data_id="sent", cache=tmp_cache,
                        label_names=("neg", "pos"))
    out = call_verb(Contrast(), "relevance", ctx)
    assert out.concepts == ("neg", "pos")
    # The tiny tokenizer splits on whitespace and punctuation, so sentence i has len(WORDS[i]) words.
    positive = torch.tensor(np.repeat(data["label"], [len(w) for w in WORDS]) == 1)[:, None]
    expected = auroc(word_activations(ctx).acts[SITE], positive)[0]
    assert torch.allclose(out.scores[1].double(), expected, atol=1e-6)
    assert torch.allclose(out.scores[0] + out.scores[1], torch.ones(out.scores.shape[1]), atol=1e-6)  # binary


def test_truncated_words_are_left_out(tiny, tmp_cache):
    model = tiny("bert")
    data = datasets.Dataset.from_dict({"words": WORDS[:3]})
    ctx = MethodContext(model, sites=(SITE,), data=data, data_id="trunc", cache=tmp_cache,
                        collect_defaults={"max_length": 5})
    words = word_activations(ctx)
    kept_per_example = np.split(words.kept, np.cumsum([len(w) for w in WORDS[:3]])[:-1])
    enc = model.tokenizer(WORDS[:3], is_split_into_words=True, truncation=True, max_length=5)
    for i, kept in enumerate(kept_per_example):
        assert kept.tolist() == [w in set(enc.word_ids(i)) for w in range(len(WORDS[i]))]
    assert not words.kept.all()
    assert (words.acts[SITE][~words.kept] == 0).all()  # never written: must not count as activations


def test_float16_ranks_by_counting_equal_the_sorted_ranks_and_give_the_same_auroc():
    from neuronbench.harness.engine.metrics import average_ranks_f16

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 3000, generator=gen) * 4).half()
    x[:, :200] = 0.0  # a large tie group, signed zeros in it
    x[:, 200:260] = -0.0
    x[1] = 2.5  # a constant row
    x[2, :10], x[2, 10:20] = float("inf"), float("-inf")
    ranks = average_ranks_f16(x)
    assert torch.equal(ranks, average_ranks(x.float()))
    assert (ranks[1] == 1500.5).all() and ranks.dtype == torch.float64
    labels = torch.rand(3000, 3, generator=gen) < 0.3
    assert torch.equal(auroc(x.T.numpy(), labels, chunk_elems=4000), auroc(x.T.float().numpy(), labels, chunk_elems=4000))
