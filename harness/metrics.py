"""Metrics the tasks share: bootstrap intervals, rank correlations, precision/recall at k."""
from __future__ import annotations

from typing import Callable

import numpy as np


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of `statistic(idx)` over resamples `idx` of range(n) with replacement.

    The statistic gets the resampled indices, so paired quantities (the same examples for every
    condition) stay paired.
    """
    if n < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 units, got {n}")
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_boot)])
    stats = stats[np.isfinite(stats)]
    if not len(stats):
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank)."""
    order = np.argsort(x, kind="stable")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts - 1) / 2, counts)
    return ranks


def spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def kendall(x, y) -> float:
    """Kendall's tau-b."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    upper = np.triu_indices(len(x), 1)
    dx, dy = dx[upper], dy[upper]
    denom = np.sqrt((dx != 0).sum() * (dy != 0).sum())
    return float((dx * dy).sum() / denom) if denom else float("nan")


def precision_recall_at_k(ranked: list[str], truth: set[str], k: int) -> tuple[float, float]:
    """precision@k = |top-k ∩ truth| / k; recall@k = |top-k ∩ truth| / |truth| (SEEDS.md §3)."""
    if not truth:
        raise ValueError("precision/recall at k needs a non-empty truth set")
    hits = len(set(ranked[:k]) & truth)
    return hits / k, hits / len(truth)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the boolean `positive` (ties count half)."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if not n_pos or not n_neg:
        return float("nan")
    ranks = _ranks(np.asarray(scores, float)) + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
