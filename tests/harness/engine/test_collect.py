"""Tests for neuronbench.harness.engine.collect: every streaming statistic equals a naive reference built from
all activations (stored with plain hooks, reduced with numpy), on every tiny architecture, with the
numba kernel and with torch reductions; merging, batching and padding change nothing."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from neuronbench.harness.engine.collect import CollectConfig, collect
from neuronbench.harness.engine.sites import Site
from neuronbench.harness.zoo.tiny import TINY_ARCHS

K = 5
SITES = (Site.ffn(0), Site.resid(0), Site.ffn(1), Site.resid(1))
# Small budget: several batches, so the running top-k threshold (and the kernel's candidate path) is used.
SMALL_BATCHES = 40


@pytest.fixture(scope="module")
def naive_cache():
    return {}


@pytest.fixture
def examples(tiny, reference, naive_cache):
    """`examples(arch, dataset, name)`: per-example activations by plain hooks, memoised per module."""
    def get(arch, dataset, name):
        key = (arch, name)
        if key not in naive_cache:
            naive_cache[key] = reference.acts_per_example(tiny(arch), dataset, SITES)
        return naive_cache[key]
    return get


def _with_ids(ds):
    return ds.add_column("id", [100 + 7 * i for i in range(len(ds))])


def naive(examples, site, include_special=False, labels=None, ids=None):
    """All counted tokens' activations (M, N) with their token id, example id, position and label."""
    X, tok, ex, pos, lab = [], [], [], [], []
    for e, one in enumerate(examples):
        for p, (t, special) in enumerate(zip(one["ids"], one["special"])):
            if include_special or not special:
                X.append(one["acts"][site][p])
                tok.append(t)
                ex.append(ids[e] if ids is not None else e)
                pos.append(p)
                lab.append(labels[e] if labels is not None else -1)
    return np.stack(X), np.array(tok), np.array(ex), np.array(pos), np.array(lab)


def naive_max1(X, tok):
    best, val = X.argmax(1), X.max(1)
    table: dict[tuple[int, int], list[float]] = {}
    for n, t, v in zip(best, tok, val):
        entry = table.setdefault((int(n), int(t)), [0.0, 0])
        entry[0] += v
        entry[1] += 1
    keys = sorted(table)
    return {"neuron": np.array([k[0] for k in keys]), "token_id": np.array([k[1] for k in keys]),
            "act_sum": np.array([table[k][0] for k in keys]), "count": np.array([table[k][1] for k in keys])}


def assert_max1_equal(table, expected, atol=1e-5):
    got = {k: v.cpu().numpy() for k, v in table.items()}
    assert len(got["neuron"]) == len(expected["neuron"]), "one row per distinct (neuron, token id) pair"
    np.testing.assert_array_equal(got["neuron"], expected["neuron"])
    np.testing.assert_array_equal(got["token_id"], expected["token_id"])
    np.testing.assert_array_equal(got["count"], expected["count"])
    np.testing.assert_allclose(got["act_sum"], expected["act_sum"], rtol=1e-5, atol=atol)


def assert_matches_naive(col, examples, include_special=False, labels=None, ids=None):
    for site in SITES:
        X, tok, ex, pos, lab = naive(examples, site, include_special, labels, ids)
        st = col[site]
        m = st.moments
        assert m.count == len(X)
        np.testing.assert_allclose(m.mean.numpy(), X.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(m.var.numpy(), X.var(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(m.min.numpy(), X.min(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(m.max.numpy(), X.max(0), rtol=1e-5, atol=1e-5)

        assert_max1_equal(st.max1.table(), naive_max1(X, tok))

        order = np.argsort(-X, axis=0, kind="stable")[:K]  # (K, N)
        top = np.take_along_axis(X, order, 0).T  # (N, K)
        np.testing.assert_allclose(st.topk.values.numpy(), top, rtol=1e-5, atol=1e-5)
        # Where a value is clearly apart from every other one of its neuron, its place must match.
        for n in range(X.shape[1]):
            for j in range(K):
                gaps = np.abs(np.delete(X[:, n], order[j, n]) - X[order[j, n], n])
                if gaps.min() > 1e-4:
                    assert st.topk.example_ids[n, j] == ex[order[j, n]]
                    assert st.topk.positions[n, j] == pos[order[j, n]]

        if labels is not None:
            sums = np.stack([X[lab == k].sum(0) for k in range(2)])
            np.testing.assert_allclose(st.labels.sums.numpy(), sums, rtol=1e-5, atol=1e-4)
            np.testing.assert_array_equal(st.labels.counts.numpy(), [(lab == k).sum() for k in range(2)])


# ---------------------------------------------------------------- every statistic vs naive

@pytest.mark.parametrize("fused", [True, False], ids=["numba", "torch"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_statistics_equal_naive_reference(tiny, examples, sentence_data, arch, fused):
    ds = _with_ids(sentence_data)
    cfg = CollectConfig(sites=SITES, topk=K, max_tokens=SMALL_BATCHES, fused=fused)
    col = collect(tiny(arch), ds, cfg, progress=False)
    assert col.n_examples == 10
    assert_matches_naive(col, examples(arch, sentence_data, "sentences"), labels=ds["label"], ids=ds["id"])


@pytest.mark.parametrize("fused", [True, False], ids=["numba", "torch"])
def test_include_special_counts_special_tokens(tiny, examples, sentence_data, fused):
    ds = _with_ids(sentence_data)
    cfg = CollectConfig(sites=SITES, topk=K, max_tokens=SMALL_BATCHES, fused=fused, include_special=True)
    col = collect(tiny("bert"), ds, cfg, progress=False)
    ref = examples("bert", sentence_data, "sentences")
    assert col[Site.ffn(0)].moments.count == sum(len(e["ids"]) for e in ref) == col.n_tokens
    specials = {2, 3}  # [CLS], [SEP]
    assert specials <= set(col[Site.resid(1)].max1.table()["token_id"].tolist())
    assert_matches_naive(col, ref, include_special=True, labels=ds["label"], ids=ds["id"])
    default = collect(tiny("bert"), ds, replace(cfg, include_special=False), progress=False)
    assert not specials & set(default[Site.resid(1)].max1.table()["token_id"].tolist())


@pytest.mark.parametrize("alignment", ["first", "last", "mean"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_word_label_sums_use_the_aligned_token(tiny, examples, word_data, arch, alignment):
    cfg = CollectConfig(sites=SITES, stats=("labels",), alignment=alignment, max_tokens=SMALL_BATCHES)
    col = collect(tiny(arch), word_data, cfg, progress=False)
    for site in SITES:
        sums = np.zeros((6, col.index.width(site)))
        counts = np.zeros(6)
        for one, word_labels in zip(examples(arch, word_data, "words"), word_data["word_labels"]):
            for w, label in enumerate(word_labels):
                rows = [p for p, wid in enumerate(one["word_ids"]) if wid == w]
                chosen = {"first": rows[:1], "last": rows[-1:], "mean": rows}[alignment]
                sums[label] += one["acts"][site][chosen].mean(0)
                counts[label] += 1
        st = col[site].labels
        np.testing.assert_allclose(st.sums.numpy(), sums, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(st.counts.numpy(), counts)
        assert col[site].moments is None and col[site].max1 is None and col[site].topk is None


# ---------------------------------------------------------------- invariances

def assert_collections_equal(a, b, atol=1e-5):
    assert a.index == b.index and a.n_tokens == b.n_tokens and a.n_examples == b.n_examples
    for site in a.index.sites:
        x, y = a[site], b[site]
        assert x.moments.count == y.moments.count
        for name in ("mean", "var", "min", "max"):
            np.testing.assert_allclose(getattr(x.moments, name), getattr(y.moments, name),
                                       rtol=1e-5, atol=atol)
        tx = {k: v.numpy() for k, v in x.max1.table().items()}
        assert_max1_equal(y.max1.table(), tx, atol=atol)
        np.testing.assert_allclose(x.topk.values, y.topk.values, rtol=1e-5, atol=atol)
        # Places must match where a value is apart from its neighbours; the last slot is left out,
        # as an exact tie with the first value outside the top-k cannot be seen (causal models give
        # identical activations to equal first tokens).
        apart = np.abs(np.diff(x.topk.values.numpy(), axis=1, prepend=np.inf)) > 1e-4
        distinct = apart & np.concatenate([apart[:, 1:], np.zeros_like(apart[:, :1])], axis=1)
        np.testing.assert_array_equal(x.topk.example_ids[distinct], y.topk.example_ids[distinct])
        np.testing.assert_array_equal(x.topk.positions[distinct], y.topk.positions[distinct])
        np.testing.assert_allclose(x.labels.sums, y.labels.sums, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(x.labels.counts, y.labels.counts)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_sharded_then_merged_equals_whole(tiny, sentence_data, arch):
    ds = _with_ids(sentence_data)
    cfg = CollectConfig(sites=SITES, topk=K, max_tokens=SMALL_BATCHES)
    whole = collect(tiny(arch), ds, cfg, progress=False)
    first = collect(tiny(arch), ds.select(range(4)), cfg, progress=False)
    second = collect(tiny(arch), ds.select(range(4, 10)), cfg, progress=False)
    merged = first.merge(second)
    assert_collections_equal(whole, merged)
    assert merged.n_examples == 10


def test_merge_refuses_different_sites_or_statistics(tiny, sentence_data):
    model = tiny("bert")
    a = collect(model, sentence_data, CollectConfig(sites=(Site.ffn(0),)), progress=False)
    with pytest.raises(ValueError, match="different sites"):
        a.merge(collect(model, sentence_data, CollectConfig(sites=(Site.ffn(1),)), progress=False))
    no_topk = CollectConfig(sites=(Site.ffn(0),), stats=("moments", "max1", "labels"))
    with pytest.raises(ValueError, match="'topk' is in one shard only"):
        a.merge(collect(model, sentence_data, no_topk, progress=False))


@pytest.mark.parametrize("fused", [True, False], ids=["numba", "torch"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_padding_and_batch_size_change_nothing(tiny, sentence_data, arch, fused):
    ds = _with_ids(sentence_data)
    one_each = collect(tiny(arch), ds, CollectConfig(sites=SITES, topk=K, max_tokens=1, fused=fused),
                       progress=False)
    all_in_one = collect(tiny(arch), ds, CollectConfig(sites=SITES, topk=K, max_tokens=4096, fused=fused),
                         progress=False)
    assert_collections_equal(one_each, all_in_one)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_numba_kernel_and_torch_reductions_agree(tiny, sentence_data, arch):
    ds = _with_ids(sentence_data)
    cfg = CollectConfig(sites=SITES, topk=K, max_tokens=SMALL_BATCHES)
    assert_collections_equal(collect(tiny(arch), ds, cfg, progress=False),
                             collect(tiny(arch), ds, replace(cfg, fused=False), progress=False))


# ---------------------------------------------------------------- max-1 memory

@pytest.mark.parametrize("max_tokens", [SMALL_BATCHES, 4096], ids=["many-batches", "one-batch"])
def test_max1_stores_one_row_per_distinct_pair_seen(tiny, examples, sentence_data, max_tokens):
    cfg = CollectConfig(sites=SITES, stats=("max1",), max_tokens=max_tokens)
    col = collect(tiny("bert"), sentence_data, cfg, progress=False)
    ref = examples("bert", sentence_data, "sentences")
    for site in SITES:
        X, tok, *_ = naive(ref, site)
        pairs = set(zip(X.argmax(1).tolist(), tok.tolist()))
        assert len(pairs) < len(X)  # repeated (neuron, token) pairs occur, so dedup is exercised
        max1 = col[site].max1
        table = max1.table()
        assert len(table["neuron"]) == len(pairs)
        assert sum(k.numel() for k in max1._keys) == len(pairs)  # what it holds, not neurons x vocab
        assert int(table["count"].sum()) == len(X)


# ---------------------------------------------------------------- dense word matrix

@pytest.mark.parametrize("alignment", ["first", "last", "mean"])
@pytest.mark.parametrize("arch", ["bert", "gpt_neox"])
def test_dense_words_equal_naive_aligned_vectors(tiny, examples, word_data, tmp_path, arch, alignment):
    cfg = CollectConfig(sites=SITES, stats=("moments",), alignment=alignment, dense_words=True,
                        max_tokens=SMALL_BATCHES)
    col = collect(tiny(arch), word_data, cfg, dense_dir=tmp_path, progress=False)
    for site in SITES:
        expected = []
        for one, words in zip(examples(arch, word_data, "words"), word_data["words"]):
            for w in range(len(words)):  # dataset word order
                rows = [p for p, wid in enumerate(one["word_ids"]) if wid == w]
                chosen = {"first": rows[:1], "last": rows[-1:], "mean": rows}[alignment]
                expected.append(one["acts"][site][chosen].mean(0))
        on_disk = np.load(tmp_path / f"{site}.npy")
        assert on_disk.dtype == np.float16
        assert on_disk.shape == (sum(map(len, word_data["words"])), col.index.width(site))
        np.testing.assert_allclose(on_disk.astype(np.float64), np.stack(expected), rtol=2e-3, atol=2e-3)
        np.testing.assert_array_equal(col.dense_words[site], on_disk)


def test_dense_words_of_raw_text_follow_the_tokenizer_word_split(tiny, examples, sentence_data, tmp_path):
    cfg = CollectConfig(sites=(Site.ffn(1),), stats=("moments",), alignment="first", dense_words=True)
    collect(tiny("bert"), sentence_data, cfg, dense_dir=tmp_path, progress=False)
    expected = []
    for one in examples("bert", sentence_data, "sentences"):
        for w in range(1 + max(wid for wid in one["word_ids"] if wid is not None)):
            expected.append(one["acts"][Site.ffn(1)][one["word_ids"].index(w)])
    np.testing.assert_allclose(np.load(tmp_path / "ffn.1.npy").astype(np.float64), np.stack(expected),
                               rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------- configuration errors

@pytest.mark.parametrize("kwargs, match", [
    ({"stats": ("moments", "mean")}, "unknown statistics \\['mean'\\]"),
    ({"alignment": "middle"}, "unknown alignment 'middle'"),
    ({"sites": ()}, "no sites"),
])
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CollectConfig(**{"sites": SITES, **kwargs})


def test_config_sorts_sites():
    assert CollectConfig(sites=(Site.resid(1), Site.ffn(0))).sites == (Site.ffn(0), Site.resid(1))


def test_dense_words_without_a_folder_and_sites_outside_the_model_are_rejected(tiny, word_data):
    with pytest.raises(ValueError, match="dense_dir"):
        collect(tiny("bert"), word_data, CollectConfig(sites=SITES, dense_words=True), progress=False)
    with pytest.raises(ValueError, match="outside the model"):
        collect(tiny("bert"), word_data, CollectConfig(sites=(Site.ffn(7),)), progress=False)
