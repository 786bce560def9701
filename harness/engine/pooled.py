"""Correlations pooled over several series (training trajectories): Fisher-z pooling of per-series
Spearman, the same across series at each time point, and where in a series a planted event peaks.

All functions take 2-D arrays `(series, points)` so that bootstrap replicates stay vectorised.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

# A Spearman of +-1 (common over few points) has an infinite Fisher z; clipping at 0.99 (z = 2.65)
# keeps one perfectly ordered short series from outweighing every other.
CLIP = 0.99


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of `x` with the same row of `y` (average ranks for ties).

    Args:
        x, y: (S, P) arrays.

    Returns:
        (S,) correlations; NaN where a row is constant (no order to correlate).
    """
    rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)
    rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
    denom = np.sqrt((rx ** 2).sum(-1) * (ry ** 2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(-1) / np.where(denom > 0, denom, 1.0), np.nan)


def fisher_pool(rhos: np.ndarray, points: np.ndarray | int) -> float:
    """Correlations of several series pooled by Fisher z, weighted by their points - 3.

    Args:
        rhos: (S,) per-series correlations; NaN (a constant series) counts as 0, no order.
        points: (S,) points per series, or one count for all; weights are max(points - 3, 1).

    Returns:
        tanh of the weighted mean of atanh(clip(rho, +-CLIP)).
    """
    z = np.arctanh(np.clip(np.nan_to_num(np.asarray(rhos, dtype=float), nan=0.0), -CLIP, CLIP))
    w = np.maximum(np.broadcast_to(np.asarray(points, dtype=float), z.shape) - 3, 1)
    return float(np.tanh((w * z).sum() / w.sum()))


def pooled_spearman(changes: list[np.ndarray], gains: list[np.ndarray]) -> float:
    """Per-series Spearman of `changes` with `gains`, pooled by Fisher z (series may differ in length)."""
    rhos = np.array([spearman_rows(c[None], g[None])[0] for c, g in zip(changes, gains)])
    return fisher_pool(rhos, np.array([len(c) for c in changes]))


def time_controlled(changes: np.ndarray, gains: np.ndarray) -> float:
    """At each time point, Spearman across series; pooled over time points by Fisher z.

    A trend that every series shares over time (everything slows down) is constant within a time
    point and cannot produce this correlation; only differences between series can.

    Args:
        changes, gains: (S, P), the same time points in every series.
    """
    rhos = spearman_rows(changes.T, gains.T)  # (P,): one correlation across the S series per point
    return fisher_pool(rhos, changes.shape[0])


def onset_scores(excess: np.ndarray, onset: int) -> tuple[float, float]:
    """Where a series of per-interval excess changes peaks relative to a planted onset interval.

    Args:
        excess: (P,) per interval, the change on text carrying the planted concept minus the change
            on plain text.
        onset: the index of the interval in which the concept appears.

    Returns:
        `rank`: the onset interval's rank among all intervals, scaled to [0, 1] (1 = the largest
        excess; ties share their mean rank, so an uninformative constant series gives 0.5);
        `hit`: 1 when the onset interval alone holds the largest excess, 1/n when n intervals tie
        for it (its expected value for a method without skill is 1/P).
    """
    ranks = rankdata(excess)
    top = excess == excess.max()
    return float((ranks[onset] - 1) / (len(excess) - 1)), float(top[onset] / top.sum())
