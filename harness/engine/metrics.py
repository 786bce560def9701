"""Metrics the tasks share: bootstrap intervals (plain and paired), rank correlations, precision/recall at k,
Cohen's d."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


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


class PairedBootstrap:
    """Paired percentile intervals of a mean (or a ratio of means) over resampled units, which
    resample the rows of a (S, n) array too (random-set seeds, null permutations).

    Each replicate draws units (test examples or sentences, through `bootstrap_ci` seeded by
    `seed`) and, from a generator seeded by (`seed`, `stream`) and restarted for every statistic,
    S rows: every statistic sees the same replicates, so intervals of differences stay paired.
    Resampling rows matters where they vary more than the units do (whether a random neuron set
    holds one of the few neurons that break a classifier).

    With `groups`, units are crossed with shared sources of noise (planted units with the
    descriptors they detect: units that share a descriptor share its chance association), and a
    replicate resamples both (the pigeonhole bootstrap, Owen 2007, Ann. Appl. Stat. 1:2): group g is
    drawn m_g times (from a generator seeded by (`seed`, `stream`, 1), restarted like the rows'),
    and a drawn unit weighs the mean m_g over its groups. One group per unit is a two-stage cluster
    bootstrap; a single group shared by all leaves the unit bootstrap.

    Args:
        n: units per row.
        n_boot: replicates.
        seed: the run seed.
        stream: the generator stream of the row draws (a task's bootstrap stream tag).
        den: (n,) per-unit denominators (e.g. words per sentence), or None for a plain mean.
        groups: (n, G) bool, True where unit i shares source g (every unit in at least one), or None.
    """

    def __init__(self, n: int, n_boot: int, seed: int, stream: int, den: np.ndarray | None = None,
                 groups: np.ndarray | None = None):
        self.n, self.n_boot, self.seed, self.stream, self.den = n, n_boot, seed, stream, den
        self.groups = None if groups is None else np.asarray(groups, dtype=bool)
        if self.groups is not None and (self.groups.ndim != 2 or len(self.groups) != n
                                        or not self.groups.any(1).all()):
            raise ValueError(f"groups must be ({n}, G) bool with every unit in at least one group, "
                             f"got shape {self.groups.shape}")

    def ci(self, per_seed: np.ndarray, den: np.ndarray | None = None,
           one_set: bool = False) -> tuple[float, float, float]:
        """(value, low, high) of mean(per_seed) [/ mean(den)]; `per_seed` is (S, n), S = 1 or the
        rows resampled with the units; `den` replaces the bootstrap's own denominators.

        `one_set`: row s is (one compared set) - (reference set s), e.g. a method's top-k neurons
        minus random sets of the same size, and the interval must also carry the compared set's own
        set-level luck (whether it holds one of a few very harmful neurons), which resampling
        units and reference rows never sees. Each replicate adds one reference row's deviation from
        the rows' mean, drawn uniformly, scaled by sqrt(S / (S - 1)) (so that its variance is the
        unbiased between-set variance): the pivot of "this set vs a random set of its size". Needs S >= 2.
        """
        den = self.den if den is None else den
        if one_set and (len(per_seed) < 2 or self.groups is not None):
            raise ValueError(f"one_set intervals need at least 2 reference rows (got {len(per_seed)}) "
                             "and no groups")
        rows_rng = np.random.default_rng([self.seed, self.stream])
        groups_rng = np.random.default_rng([self.seed, self.stream, 1])
        set_rng = np.random.default_rng([self.seed, self.stream, 2])
        share = None if self.groups is None else self.groups / self.groups.sum(1, keepdims=True)  # (n, G)
        spread = np.sqrt(len(per_seed) / (len(per_seed) - 1)) if one_set else 0.0

        def stat(units: np.ndarray) -> float:
            s = len(per_seed)
            rows = per_seed[rows_rng.integers(0, s, s)] if s > 1 else per_seed
            if share is None:
                num = rows[:, units].mean()
                if one_set:  # the compared set's own luck: one reference set's deviation from their mean
                    num += spread * (per_seed[set_rng.integers(0, s), units].mean() - per_seed[:, units].mean())
                return num if den is None else num / den[units].mean()
            g = share.shape[1]
            w = (share @ np.bincount(groups_rng.integers(0, g, g), minlength=g))[units]  # mean m_g per unit
            if not w.sum():
                return float("nan")
            num = (rows[:, units] * w).sum(1).mean() / w.sum()
            return num if den is None else num / ((den[units] * w).sum() / w.sum())

        value = per_seed.mean() if den is None else per_seed.mean() / den.mean()
        return (float(value), *bootstrap_ci(stat, self.n, self.n_boot, self.seed))


def cohen_d(acts_SN: np.ndarray, present_SV: np.ndarray) -> np.ndarray:
    """(V, N) Cohen's d of every neuron's activations, sentences with vs without each descriptor
    (pooled within-group standard deviation; +-inf when it is 0 and the means differ, 0 when a
    group is empty or both are constant and equal)."""
    a = np.asarray(acts_SN, dtype=np.float64)
    y = np.asarray(present_SV, dtype=np.float64)
    n1, n0 = y.sum(0)[:, None], (1 - y).sum(0)[:, None]  # (V, 1)
    s1, s0 = y.T @ a, (1 - y).T @ a
    q1, q0 = y.T @ a**2, (1 - y).T @ a**2
    with np.errstate(invalid="ignore", divide="ignore"):
        m1, m0 = s1 / n1, s0 / n0
        ss = (q1 - n1 * m1**2) + (q0 - n0 * m0**2)
        sd = np.sqrt(np.maximum(ss, 0) / np.maximum(n1 + n0 - 2, 1))
        diff = m1 - m0
        d = np.where(sd > 1e-12 * (1 + np.abs(diff)), diff / sd, np.sign(diff) * np.inf)
    return np.where((n1 > 0) & (n0 > 0) & ~np.isnan(d), d, 0.0)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank)."""
    return average_ranks(torch.as_tensor(np.asarray(x, float))).numpy() - 1


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


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last axis, tied values sharing their average rank (float64).

    The same as `scipy.stats.rankdata(x, method="average", axis=-1)`, vectorised over rows.
    """
    vals, order = x.sort(dim=-1)
    n = x.shape[-1]
    pos = torch.arange(n, device=x.device).expand_as(vals)
    starts = torch.ones_like(vals, dtype=torch.bool)
    starts[..., 1:] = vals[..., 1:] != vals[..., :-1]
    ends = torch.ones_like(vals, dtype=torch.bool)
    ends[..., :-1] = starts[..., 1:]
    # A tie group spans [first, last]: the latest start at or before i, the earliest end at or after i.
    first = torch.where(starts, pos, 0).cummax(-1).values
    last = torch.where(ends, pos, n - 1).flip(-1).cummin(-1).values.flip(-1)
    avg = (first + last).double() / 2 + 1
    return torch.empty_like(avg).scatter_(-1, order, avg)


def _f16_keys(x: torch.Tensor) -> torch.Tensor:
    """float16 values as int64 keys in [0, 65535] with the same order (equal values, -0 and +0
    included, get equal keys): the bit pattern, negatives reflected below the positives."""
    bits = x.contiguous().view(torch.int16).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFF)) + 32768


def average_ranks_f16(x: torch.Tensor) -> torch.Tensor:
    """`average_ranks` of float16 rows by counting, not sorting: a float16 has at most 65,536
    values, so each row's histogram gives every value's rank exactly (the values below it, plus
    the mean position inside its tie group). The same float64 ranks as `average_ranks`, about ten
    times faster on rows of tens of thousands of words (e.g. `contrast` on 60k words x 9,216 FFN
    neurons). NaN is not supported."""
    rows, n = x.shape
    keys = _f16_keys(x) + torch.arange(rows, device=x.device)[:, None] * 65536
    counts = torch.bincount(keys.reshape(-1), minlength=rows * 65536).view(rows, 65536).double()
    below = counts.cumsum(1) - counts
    return (below + (counts + 1) / 2).view(-1)[keys.reshape(-1)].view(rows, n)


def auroc_matrix(scores: np.ndarray | torch.Tensor, labels: torch.Tensor, chunk_elems: int = 1 << 22,
          device: torch.device | str = "cpu") -> torch.Tensor:
    """AUROC of every score column at separating the positives of every label column.

    AUROC = P(score of a positive > score of a negative) + P(tie) / 2, computed as the
    Mann-Whitney U from average ranks: all neurons and labels at once, neurons in chunks. float16
    scores (the cached word matrices) are ranked by counting (`average_ranks_f16`: the same ranks).

    Args:
        scores: (W, N) scores (activations), numpy or torch, any float dtype.
        labels: (W, V) bool, True where label v holds for row w.
        chunk_elems: rows x neurons ranked at once (bounds memory).
        device: where to rank.

    Returns:
        (V, N) float64; NaN for a label with no positive or no negative row.
    """
    W, N = scores.shape
    if labels.shape[0] != W:
        raise ValueError(f"scores have {W} rows but labels have {labels.shape[0]}; they must align")
    y = labels.to(device=device, dtype=torch.float64)
    pos = y.sum(0)  # (V,)
    neg = W - pos
    chunk = max(1, chunk_elems // max(W, 1))
    out = []
    for a in range(0, N, chunk):
        block = torch.as_tensor(np.asarray(scores[:, a:a + chunk])) if isinstance(scores, np.ndarray) \
            else scores[:, a:a + chunk]
        if block.dtype == torch.float16 and not torch.isnan(block).any():
            ranks = average_ranks_f16(block.to(device).T)  # (C, W)
        else:
            ranks = average_ranks(block.to(device=device, dtype=torch.float32).T)
        u = ranks @ y - pos * (pos + 1) / 2  # (C, V) rank sum of the positives, minus its minimum
        out.append((u / (pos * neg)).T)
    result = torch.cat(out, 1) if out else torch.zeros(labels.shape[1], 0, dtype=torch.float64, device=device)
    result[(pos == 0) | (neg == 0)] = float("nan")
    return result.cpu()
