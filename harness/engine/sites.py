"""Neuron sites as values: `Site(layer, kind)`, a stable flat id for every neuron across sites
(`NeuronIndex`), and scores over those ids (`NeuronScores`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import numpy as np
import torch

SiteKind = Literal["resid", "ffn"]
SITE_KINDS: tuple[str, ...] = ("resid", "ffn")
# Why `NeuronIndex.locate` finds no neuron for a row.
UNKNOWN_KIND, NO_SITE, OUT_OF_RANGE = 1, 2, 3


@dataclass(frozen=True, order=True)
class Site:
    """A place in the model whose units are neurons.

    Attributes:
        layer: 0-based transformer block index.
        kind: `resid`, the block's output hidden state, or `ffn`, the FFN activation after its
            nonlinearity (the input of the down/output projection; `act(gate) * up` for gated MLPs).
    """

    layer: int
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"unknown site kind {self.kind!r}; use one of {SITE_KINDS}")
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"site layer must be a non-negative int, got {self.layer!r}")

    @classmethod
    def ffn(cls, layer: int) -> "Site":
        return cls(layer, "ffn")

    @classmethod
    def resid(cls, layer: int) -> "Site":
        return cls(layer, "resid")

    @classmethod
    def parse(cls, text: str) -> "Site":
        """Parse `ffn.3` / `resid.0` (the form `str(site)` prints)."""
        kind, _, layer = text.partition(".")
        if not layer.isdigit():
            raise ValueError(f"cannot parse site {text!r}; write KIND.LAYER, e.g. 'ffn.3'")
        return cls(int(layer), kind)

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"


@dataclass(frozen=True)
class NeuronIndex:
    """Flat neuron ids over a set of sites.

    Sites are kept in canonical order (by layer, then kind), so the same set of sites always gives
    the same ids whatever order they were requested in. Neuron `(site, i)` has id
    `offset(site) + i`.
    """

    sites: tuple[Site, ...]
    widths: tuple[int, ...]

    @classmethod
    def build(cls, widths: dict[Site, int]) -> "NeuronIndex":
        ordered = tuple(sorted(widths))
        return cls(ordered, tuple(int(widths[s]) for s in ordered))

    @property
    def size(self) -> int:
        return sum(self.widths)

    def offset(self, site: Site) -> int:
        try:
            pos = self.sites.index(site)
        except ValueError:
            raise KeyError(f"site {site} is not in this index (sites: {', '.join(map(str, self.sites))})") from None
        return sum(self.widths[:pos])

    def width(self, site: Site) -> int:
        return self.widths[self.sites.index(site)]

    def flat(self, site: Site, index: int | torch.Tensor) -> int | torch.Tensor:
        """Flat id of neuron `index` at `site`."""
        return self.offset(site) + index

    def unflat(self, flat_id: int) -> tuple[Site, int]:
        """The `(site, index)` of a flat id."""
        if not 0 <= flat_id < self.size:
            raise IndexError(f"neuron id {flat_id} outside 0..{self.size - 1}")
        start = 0
        for site, width in zip(self.sites, self.widths):
            if flat_id < start + width:
                return site, flat_id - start
            start += width
        raise AssertionError("unreachable")

    def split(self, flat: torch.Tensor) -> dict[Site, torch.Tensor]:
        """Split a vector over all neurons (or a set of flat ids) by site.

        A float vector of length `size` is cut into per-site slices; a long tensor of flat ids is
        grouped into per-site local indices.
        """
        if flat.dtype in (torch.int64, torch.int32):
            out: dict[Site, torch.Tensor] = {}
            start = 0
            for site, width in zip(self.sites, self.widths):
                sel = flat[(flat >= start) & (flat < start + width)] - start
                if sel.numel():
                    out[site] = sel
                start += width
            return out
        if flat.shape[-1] != self.size:
            raise ValueError(f"expected {self.size} values (one per neuron), got {flat.shape[-1]}")
        return dict(zip(self.sites, torch.split(flat, list(self.widths), dim=-1)))

    def locate(self, kinds, layers, indices) -> tuple[np.ndarray, np.ndarray]:
        """Flat ids of the neurons that rows of (site kind, layer, local index) name, vectorised:
        the one mapping from a table of neurons (a submission's, a replayed answer's) to ids.

        Returns:
            (flat, problem), each (n,): `flat` is the id, -1 where the row names no neuron of this
            index; `problem` is 0, or UNKNOWN_KIND, NO_SITE (a site not in the index) or
            OUT_OF_RANGE (an index outside its site's width).
        """
        kinds = np.asarray(kinds, dtype=object)
        layers, local = np.asarray(layers), np.asarray(indices)
        offset, width = np.full(len(kinds), -1, np.int64), np.zeros(len(kinds), np.int64)
        for site, start, w in zip(self.sites, np.cumsum((0, *self.widths[:-1])), self.widths):
            hit = (kinds == site.kind) & (layers == site.layer)
            offset[hit], width[hit] = start, w
        problem = np.where(~np.isin(kinds, SITE_KINDS), UNKNOWN_KIND, 0)
        problem = np.where((problem == 0) & (offset < 0), NO_SITE, problem)
        problem = np.where((problem == 0) & ((local < 0) | (local >= width)), OUT_OF_RANGE, problem)
        return np.where(problem == 0, offset + local, -1), problem

    def concat(self, per_site: dict[Site, torch.Tensor]) -> torch.Tensor:
        """Inverse of `split` for per-site value vectors."""
        missing = [str(s) for s in self.sites if s not in per_site]
        if missing:
            raise KeyError(f"missing values for sites {missing}")
        return torch.cat([per_site[s] for s in self.sites], dim=-1)


def parse_sites(spec: str | Iterable[Site] | Site, num_layers: int) -> tuple[Site, ...]:
    """Sites from a CLI spec: `ffn`, `resid`, `all`, or a comma list such as `ffn.0,resid.5`."""
    if isinstance(spec, Site):
        return (spec,)
    if not isinstance(spec, str):
        return tuple(sorted(spec))
    out: set[Site] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part == "all":
            out.update(Site(layer, kind) for layer in range(num_layers) for kind in SITE_KINDS)
        elif part in SITE_KINDS:
            out.update(Site(layer, part) for layer in range(num_layers))
        else:
            out.add(Site.parse(part))
    if not out:
        raise ValueError(f"no sites in {spec!r}; use 'ffn', 'resid', 'all' or e.g. 'ffn.0,resid.3'")
    return tuple(sorted(out))


@dataclass(frozen=True)
class NeuronScores:
    """Relevance of every neuron of `index`: higher = more relevant.

    `scores` is (n_neurons,), or (n_concepts, n_neurons) with `concepts` naming the rows.
    """

    index: NeuronIndex
    scores: torch.Tensor
    concepts: tuple[str, ...] | None = None

    def overall(self) -> torch.Tensor:
        """One score per neuron (the max over concepts when there are several)."""
        return self.scores if self.scores.dim() == 1 else self.scores.max(0).values
