"""Tests for neuronbench.harness.engine.stats: each statistic, fed in pieces and merged, equals one pass."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronbench.harness.engine.batching import Encoded, make_batch
from neuronbench.harness.engine.stats import BatchView, LabelSums, Max1, Moments, TopK

CPU = torch.device("cpu")


def _view(token_ids: list[int], counted: list[bool], example_id: int = 0) -> BatchView:
    """The view of one unpadded example, built the way the collector builds it."""
    enc = Encoded(input_ids=[token_ids], counted=[[int(c) for c in counted]],
                  word_ids=[[None] * len(token_ids)], example_ids=[example_id])
    return make_batch(enc, [0], pad_id=0).view


def test_max1_table_has_one_sorted_row_per_pair_after_a_single_batch():
    acts = torch.tensor([[0.0, 5.0], [0.0, 3.0], [2.0, 1.0], [0.0, 4.0]])  # arg-max 1, 1, 0, 1
    max1 = Max1(2, CPU)
    max1.update(acts, _view([7, 7, 7, 9], [True] * 4))
    table = max1.table()
    assert table["neuron"].tolist() == [0, 1, 1]
    assert table["token_id"].tolist() == [7, 7, 9]
    assert table["act_sum"].tolist() == [2.0, 8.0, 4.0]
    assert table["count"].tolist() == [1, 2, 1]


def test_max1_skips_uncounted_rows_and_merges_shards():
    acts = torch.tensor([[9.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    a, b = Max1(2, CPU), Max1(2, CPU)
    a.update(acts, _view([5, 6, 5], [False, True, True]))
    b.update(acts, _view([5, 6, 5], [True, True, False]))
    table = a.merge(b).table()
    assert list(zip(table["neuron"].tolist(), table["token_id"].tolist(), table["act_sum"].tolist(),
                    table["count"].tolist())) == [(0, 5, 12.0, 2), (1, 6, 2.0, 2)]


def test_moments_merged_from_uneven_pieces_equal_numpy():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(101, 7, generator=gen) * 3 + 10  # offset mean: a naive sum-of-squares loses precision
    pieces = [X[:1], X[1:40], X[40:41], X[41:]]
    parts = []
    for piece in pieces:
        m = Moments(7, CPU)
        view = _view([0] * len(piece), [True] * len(piece))
        m.update(piece, view)
        parts.append(m)
    merged = parts[0].merge(parts[1]).merge(parts[2].merge(parts[3]))
    Xn = X.double().numpy()
    assert merged.count == 101
    np.testing.assert_allclose(merged.mean.numpy(), Xn.mean(0), rtol=1e-6)
    np.testing.assert_allclose(merged.var.numpy(), Xn.var(0), rtol=1e-5)
    np.testing.assert_array_equal(merged.min.numpy(), X.min(0).values.numpy())
    np.testing.assert_array_equal(merged.max.numpy(), X.max(0).values.numpy())
    assert Moments(7, CPU).merge(Moments(7, CPU)).count == 0


@pytest.mark.parametrize("offset", [0.0, 100.0, 1000.0])
def test_moments_variance_is_accurate_when_the_mean_dwarfs_the_spread(offset):
    """Residual streams have units with |mean| >> std (GPT-2's outlier dimensions reach thousands);
    E[x^2] - E[x]^2 in float32 cancels catastrophically there."""
    X = torch.randn(4096, 8, generator=torch.Generator().manual_seed(0)) + offset  # var 1
    m = Moments(8, CPU)
    m.update(X, _view([5] * 4096, [True] * 4096))
    np.testing.assert_allclose(m.var.numpy(), X.double().numpy().var(0), rtol=1e-4)
    np.testing.assert_allclose(m.mean.numpy(), X.double().numpy().mean(0), rtol=1e-6)


def test_topk_streams_and_merges_to_the_global_top_k():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(60, 4, generator=gen)
    a, b = TopK(4, 3, CPU), TopK(4, 3, CPU)
    for start in range(0, 30, 7):  # uneven batches: cold start, then the threshold path
        piece = X[start:min(start + 7, 30)]
        a.update(piece, _view([0] * len(piece), [True] * len(piece), example_id=start))
    b.update(X[30:], _view([0] * 30, [True] * 30, example_id=30))
    merged = a.merge(b)
    best = X.topk(3, dim=0)
    assert torch.equal(merged.values, best.values.T)
    starts = [s for s in range(0, 30, 7)]
    for n in range(4):
        for j, row in enumerate(best.indices[:, n].tolist()):
            ex = 30 if row >= 30 else max(s for s in starts if s <= row)
            assert (merged.example_ids[n, j], merged.positions[n, j]) == (ex, row - ex)


@pytest.mark.parametrize("k", [1, 4])
def test_topk_ignores_uncounted_rows(k):
    X = torch.tensor([[100.0], [1.0], [2.0], [50.0], [3.0]])
    top = TopK(1, k, CPU)
    top.update(X[:2], _view([0, 0], [False, True]))
    top.update(X[2:], _view([0, 0, 0], [True, False, True]))
    assert top.values[0, :min(k, 3)].tolist() == [3.0, 2.0, 1.0][:k]


def test_label_sums_merge_adds():
    a, b = LabelSums(2, 3, CPU), LabelSums(2, 3, CPU)
    a.update(torch.ones(3, 2), torch.tensor([1.0, 0.0, 2.0]))
    b.update(torch.full((3, 2), 2.0), torch.tensor([1.0, 1.0, 0.0]))
    merged = a.merge(b)
    assert merged.sums.tolist() == [[3.0, 3.0]] * 3
    assert merged.counts.tolist() == [2.0, 1.0, 2.0]
    torch.testing.assert_close(merged.means, torch.tensor([[1.5, 1.5], [3.0, 3.0], [1.5, 1.5]]))
