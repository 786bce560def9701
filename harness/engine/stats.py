"""Streaming, mergeable per-neuron statistics, updated on the device as each batch passes.

Every statistic works on one site's padded activations `acts_RN` (R = batch x tokens rows, N neurons)
plus a `BatchView` saying which rows are real tokens. None stores per-token activations; each one
merges associatively (`a.merge(b)` over shards equals one pass over the whole), which makes
data-parallel collection a reduction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

STAT_NAMES = ("moments", "max1", "topk", "labels")


@dataclass
class BatchView:
    """What the statistics need to know about one padded batch, flattened to rows (R = B*T).

    Attributes:
        rows: (M,) indices of the counted rows (real, non-special tokens).
        weight: (R,) 1.0 for counted rows, 0.0 otherwise.
        excluded: (E,) indices of the rows not counted (pads, uncounted special tokens).
        token_ids: (M,) vocabulary id of each counted row.
        example_ids: (M,) dataset id of each counted row's example.
        positions: (M,) token position of each counted row.
        label_weight: (L, R) per-label row weights (sentence labels and/or aligned word labels),
            or None when the data has no labels.
    """

    rows: torch.Tensor
    weight: torch.Tensor
    excluded: torch.Tensor
    token_ids: torch.Tensor
    example_ids: torch.Tensor
    positions: torch.Tensor
    label_weight: torch.Tensor | None = None
    label_binary: bool = True  # label weights are all 0/1 (exact in bf16)
    counted_np: "np.ndarray | None" = None  # (R,) uint8 copy of the counted mask, for the CPU kernel


def mean_m2(acts_RN: torch.Tensor, view: BatchView, s: torch.Tensor, q: torch.Tensor):
    """Float64 mean and M2 of the counted rows from their sum `s` and sum of squares `q`.

    `q - s * mean` cancels badly where the mean dwarfs the spread (float32 partial sums): those
    few neurons are recomputed exactly around their mean.
    """
    m = int(view.rows.numel())
    mean = s / m
    m2 = (q - s * mean).clamp_min(0)
    cols = (s * mean > 1e3 * m2).nonzero().squeeze(1)
    if cols.numel():
        d = acts_RN.index_select(1, cols).double() - mean[cols]
        m2[cols] = view.weight.double() @ (d * d)
    return mean, m2


def _masked_extreme(acts_RN: torch.Tensor, excluded: torch.Tensor, view: BatchView, largest: bool) -> torch.Tensor:
    """Per-neuron min (or max) over the counted rows only.

    Takes the extreme over all rows, and recomputes with a mask only the neurons whose extreme
    may come from an uncounted row.
    """
    reduce = torch.amax if largest else torch.amin
    full = reduce(acts_RN, 0).float()
    if excluded.shape[0] == 0:
        return full
    ex = reduce(excluded, 0)
    cols = ((ex >= full) if largest else (ex <= full)).nonzero().squeeze(1)
    if cols.numel():
        sub = acts_RN.index_select(1, cols).float()
        fill = float("-inf") if largest else float("inf")
        full[cols] = reduce(torch.where(view.weight[:, None] > 0, sub, fill), 0)
    return full


class Moments:
    """Count, mean, variance, min and max per neuron, merged with Chan et al.'s parallel formula."""

    def __init__(self, n: int, device: torch.device):
        self.count = 0
        self._mean = torch.zeros(n, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(n, dtype=torch.float64, device=device)  # sum of squared deviations
        self.min = torch.full((n,), float("inf"), device=device)
        self.max = torch.full((n,), float("-inf"), device=device)

    def add(self, count: int, mean: torch.Tensor, m2: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor) -> None:
        """Add a batch summary: its count, float64 mean and M2, and its min and max."""
        if count == 0:
            return
        total = self.count + count
        delta = mean.to(self._mean) - self._mean
        self.m2 += m2.to(self.m2) + delta * delta * (self.count * count / total)
        self._mean += delta * (count / total)
        self.count = total
        self.min = torch.minimum(self.min, mn.to(self.min))
        self.max = torch.maximum(self.max, mx.to(self.max))

    def update(self, acts_RN: torch.Tensor, view: BatchView, max_N: torch.Tensor | None = None) -> None:
        """Add one padded batch with torch reductions (`max_N`: the counted rows' max, if known).

        Sums run over all rows with float32 accumulation, then the few uncounted rows (pads,
        special tokens) are subtracted: no masked float32 copy of the activations is made.
        """
        m = int(view.rows.numel())
        if m == 0:
            return
        excluded = acts_RN.index_select(0, view.excluded).float()  # (E, N), small
        s = acts_RN.sum(0, dtype=torch.float32).double() - excluded.sum(0).double()
        q = torch.linalg.vector_norm(acts_RN, dim=0, dtype=torch.float32).double().square()
        q -= excluded.square().sum(0).double()
        mean, m2 = mean_m2(acts_RN, view, s, q)
        mn = _masked_extreme(acts_RN, excluded, view, largest=False)
        mx = max_N if max_N is not None else _masked_extreme(acts_RN, excluded, view, largest=True)
        self.add(m, mean, m2, mn, mx)

    @property
    def mean(self) -> torch.Tensor:
        return self._mean.float()

    @property
    def var(self) -> torch.Tensor:
        """Population variance."""
        return (self.m2 / max(self.count, 1)).float()

    def merge(self, other: "Moments") -> "Moments":
        self.add(other.count, other._mean, other.m2, other.min, other.max)
        return self

    def state(self) -> dict[str, torch.Tensor]:
        return {"count": torch.tensor([self.count]), "mean": self._mean, "m2": self.m2,
                "min": self.min, "max": self.max}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device: torch.device) -> "Moments":
        out = cls(state["min"].numel(), device)
        out.count = int(state["count"][0])
        out._mean, out.m2 = state["mean"].to(device), state["m2"].to(device)
        out.min, out.max = state["min"].to(device), state["max"].to(device)
        return out


class Max1:
    """TX-Ray max-1 table: each token credited to its layer's most active neuron.

    Stores (neuron, token type) -> summed max-activation and count, in memory proportional to the
    pairs seen: per-batch credits are appended and compacted with `unique` when the buffer grows.
    """

    def __init__(self, n: int, device: torch.device, compact_every: int = 1 << 20):
        self.n = n
        self.device = device
        self.compact_every = compact_every
        self._keys: list[torch.Tensor] = []
        self._vals: list[torch.Tensor] = []
        self._counts: list[torch.Tensor] = []
        self._pending = 0
        self._compacted = 0

    def update(self, acts_RN: torch.Tensor, view: BatchView) -> None:
        vals, idx = acts_RN.max(dim=1)  # (R,)
        self.add(idx, vals.float(), view)

    def add(self, row_idx: torch.Tensor, row_val: torch.Tensor, view: BatchView) -> None:
        """Credit each counted row's token to its arg-max neuron `row_idx` with value `row_val`."""
        keys = row_idx[view.rows] * (1 << 32) + view.token_ids  # token ids < 2**32
        self._push(keys, row_val[view.rows].double(), torch.ones_like(keys))

    def _push(self, keys: torch.Tensor, vals: torch.Tensor, counts: torch.Tensor) -> None:
        self._keys.append(keys)
        self._vals.append(vals)
        self._counts.append(counts)
        self._pending += int(keys.numel())
        if self._pending > self.compact_every + 2 * self._compacted:
            self._compact()

    def _compact(self) -> None:
        if not self._keys or (len(self._keys) == 1 and self._pending == self._compacted):
            return  # nothing, or already one deduplicated, sorted block
        keys, inverse = torch.unique(torch.cat(self._keys), return_inverse=True)
        vals = torch.zeros(keys.numel(), dtype=torch.float64, device=keys.device)
        counts = torch.zeros(keys.numel(), dtype=torch.int64, device=keys.device)
        vals.index_add_(0, inverse, torch.cat(self._vals))
        counts.index_add_(0, inverse, torch.cat(self._counts))
        self._keys, self._vals, self._counts = [keys], [vals], [counts]
        self._pending = self._compacted = int(keys.numel())

    def table(self) -> dict[str, torch.Tensor]:
        """Columns `neuron`, `token_id`, `act_sum`, `count`, sorted by (neuron, token_id)."""
        self._compact()
        if not self._keys:
            empty = torch.zeros(0, dtype=torch.int64)
            return {"neuron": empty, "token_id": empty, "act_sum": empty.double(), "count": empty}
        keys = self._keys[0]
        return {"neuron": keys >> 32, "token_id": keys & ((1 << 32) - 1),
                "act_sum": self._vals[0], "count": self._counts[0]}

    def merge(self, other: "Max1") -> "Max1":
        for k, v, c in zip(other._keys, other._vals, other._counts):
            self._push(k.to(self.device), v.to(self.device), c.to(self.device))
        return self

    def state(self) -> dict[str, torch.Tensor]:
        return self.table()

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device: torch.device, n: int) -> "Max1":
        out = cls(n, device)
        if state["neuron"].numel():
            keys = (state["neuron"] << 32) + state["token_id"]
            out._push(keys.to(device), state["act_sum"].to(device), state["count"].to(device))
        return out


class TopK:
    """The k highest activations of every neuron with where they occurred (example id, position).

    After the first batch, only entries above each neuron's current k-th best can enter, so each
    batch costs one comparison pass plus a small sort of the candidates.
    """

    def __init__(self, n: int, k: int, device: torch.device):
        self.k = k
        self.values = torch.full((n, k), float("-inf"), device=device)
        self.example_ids = torch.full((n, k), -1, dtype=torch.int64, device=device)
        self.positions = torch.full((n, k), -1, dtype=torch.int64, device=device)

    @property
    def threshold(self) -> torch.Tensor:
        """(N,) each neuron's current k-th best value; only larger values can enter."""
        return self.values[:, -1]

    @property
    def warm(self) -> bool:
        """True once every neuron holds k entries, so the threshold filter applies."""
        return not bool(torch.isinf(self.threshold).any())

    def warm_up(self, acts_RN: torch.Tensor, view: BatchView, rows: int = 256) -> int:
        """Fill every neuron's list from the batch's first `rows` counted rows (a small dense
        top-k), so the threshold filter applies to the rest. Returns how many rows it used."""
        first = view.rows[:rows]
        block = acts_RN.index_select(0, first)  # (n, N)
        kk = min(self.k, block.shape[0])
        vals, local = block.T.topk(kk, dim=1)  # (N, kk)
        neuron = torch.arange(vals.shape[0], device=vals.device).repeat_interleave(kk)
        local = local.reshape(-1)
        self._merge(neuron, vals.reshape(-1), view.example_ids[local], view.positions[local])
        return int(first.numel())

    def update(self, acts_RN: torch.Tensor, view: BatchView) -> None:
        skip = 0 if self.warm else self.warm_up(acts_RN, view)
        cand = (acts_RN > self.threshold).nonzero()  # (C, 2): row, neuron
        self.add_candidates(cand[:, 0], cand[:, 1], acts_RN[cand[:, 0], cand[:, 1]], view, skip)

    def add_candidates(self, rows: torch.Tensor, neuron: torch.Tensor, vals: torch.Tensor,
                       view: BatchView, skip: int = 0) -> None:
        """Offer entries at padded `rows`; pads, uncounted special tokens and the first `skip`
        counted rows (already taken by `warm_up`) are dropped."""
        if not rows.numel():
            return
        row_of = torch.full((view.weight.numel(),), -1, dtype=torch.int64, device=rows.device)
        row_of[view.rows] = torch.arange(view.rows.numel(), device=rows.device)
        local = row_of[rows]
        keep = local >= skip
        local = local[keep]
        self._merge(neuron[keep], vals[keep], view.example_ids[local], view.positions[local])

    def _merge(self, neuron, vals, ex, pos) -> None:
        """Merge entries (neuron, value, example, position) into the running top-k."""
        if not neuron.numel():
            return
        n, k = self.values.shape
        order = torch.sort(neuron, stable=True).indices
        neuron, vals, ex, pos = neuron[order], vals[order], ex[order], pos[order]
        counts = torch.bincount(neuron, minlength=n)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(neuron.numel(), device=neuron.device) - starts[neuron]
        width = int(counts.max())
        # Lay the new entries out as an (N, width) block beside the running (N, k) and re-take top-k.
        new_v = torch.full((n, width), float("-inf"), device=vals.device)
        new_e = torch.full((n, width), -1, dtype=torch.int64, device=vals.device)
        new_p = torch.full((n, width), -1, dtype=torch.int64, device=vals.device)
        new_v[neuron, rank], new_e[neuron, rank], new_p[neuron, rank] = vals.float(), ex, pos
        all_v = torch.cat([self.values, new_v], 1)
        self.values, best = all_v.topk(k, dim=1)
        self.example_ids = torch.cat([self.example_ids, new_e], 1).gather(1, best)
        self.positions = torch.cat([self.positions, new_p], 1).gather(1, best)

    def merge(self, other: "TopK") -> "TopK":
        n, k = other.values.shape
        neuron = torch.arange(n, device=self.values.device).repeat_interleave(k)
        self._merge(neuron, other.values.reshape(-1).to(self.values.device),
                    other.example_ids.reshape(-1).to(self.values.device),
                    other.positions.reshape(-1).to(self.values.device))
        return self

    def state(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "example_ids": self.example_ids, "positions": self.positions}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device: torch.device) -> "TopK":
        out = cls(*state["values"].shape, device=device)
        out.values, out.example_ids, out.positions = (state[k].to(device) for k in out.state())
        return out


class LabelSums:
    """Per-label activation sums and counts (token-level for sentence labels, word-level for word labels)."""

    def __init__(self, n: int, num_labels: int, device: torch.device):
        self.sums = torch.zeros(num_labels, n, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_labels, dtype=torch.float64, device=device)

    def update(self, label_sums_LN: torch.Tensor, label_counts_L: torch.Tensor) -> None:
        self.sums += label_sums_LN.double()
        self.counts += label_counts_L.double()

    @property
    def means(self) -> torch.Tensor:
        return (self.sums / self.counts.clamp_min(1)[:, None]).float()

    def merge(self, other: "LabelSums") -> "LabelSums":
        self.sums += other.sums.to(self.sums.device)
        self.counts += other.counts.to(self.counts.device)
        return self

    def state(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums, "counts": self.counts}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device: torch.device) -> "LabelSums":
        out = cls(state["sums"].shape[1], state["sums"].shape[0], device)
        out.sums, out.counts = state["sums"].to(device), state["counts"].to(device)
        return out
