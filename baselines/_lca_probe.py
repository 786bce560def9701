"""Linear probes with the NeuroX recipe: one linear layer, cross-entropy plus an elastic-net penalty,
streamed chunk by chunk from (memory-mapped, float16) activation matrices onto the device.

Used only by the `lca` baseline (the `probe` task trains its own fixed probe), so it lives beside it;
the activation views it streams from are in `_lca_features`.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from neuronbench.baselines._lca_features import Features, _chunks, _device, _indices, as_features

log = logging.getLogger(__name__)

# Below this many multiply-adds per Adam step, CPU training runs on one thread: intra-op threading
# costs more than it saves on such small matrices (measured 2-3x slower with 2 threads).
ONE_THREAD_WORK = 1 << 24

# (l1, l2) pairs tried by `select_lambdas` unless told otherwise: none, then NeuroX-scale penalties.
DEFAULT_GRID: tuple[tuple[float, float], ...] = ((0.0, 0.0), (1e-5, 1e-5), (1e-4, 1e-4), (1e-3, 1e-3))


# --------------------------------------------------------------------------- the probe

@dataclass(frozen=True)
class ProbeRecipe:
    """How a probe is trained (NeuroX defaults, except where noted).

    Attributes:
        l1: weight of sum |W| in the loss.
        l2: weight of sqrt(sum W^2) in the loss (NeuroX's L2 term, the norm, not its square).
        epochs: passes over the training rows.
        lr: Adam learning rate.
        batch_size: rows per Adam step. NeuroX uses 32; larger batches (e.g. 256) train faster
            on big matrices at the price of fewer steps, so keep epochs x rows / batch_size in mind.
        seed: seeds the initial weights and the row order of every epoch (NeuroX reads the rows in
            corpus order every epoch; shuffling avoids steps that see one long sentence's words only).
    """

    l1: float = 0.0
    l2: float = 0.0
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.l1 < 0 or self.l2 < 0:
            raise ValueError(f"penalties must be non-negative, got l1={self.l1}, l2={self.l2}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"epochs={self.epochs}, batch_size={self.batch_size} and lr={self.lr} "
                             "must be positive")


@dataclass(frozen=True)
class Probe:
    """A trained linear probe: logits = X[:, columns] @ weight.T + bias.

    Attributes:
        weight: (C, K) float32 on the CPU.
        bias: (C,) float32.
        in_dim: width of the matrices it reads (all neurons, also when it uses a subset).
        columns: (K,) the input columns (neurons) the weights read, or None for all.
        recipe: how it was trained.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    in_dim: int
    columns: np.ndarray | None
    recipe: ProbeRecipe

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def full_weight(self) -> torch.Tensor:
        """(C, in_dim) weights over every input neuron (0 for neurons it does not read)."""
        if self.columns is None:
            return self.weight
        full = torch.zeros(self.num_classes, self.in_dim)
        full[:, torch.as_tensor(self.columns)] = self.weight
        return full

    def logits(self, X, device=None) -> torch.Tensor:
        """(n, C) float32 logits on the CPU, computed chunk by chunk on `device`."""
        feats = as_features(X)
        if feats.shape[1] != self.in_dim:
            raise ValueError(f"the probe reads {self.in_dim} neurons, X has {feats.shape[1]} columns")
        if self.columns is not None:
            feats = feats.select(self.columns)
        dev = _device(device, feats)
        w, b = self.weight.to(dev), self.bias.to(dev)
        out = [(x @ w.T + b).cpu() for _, _, x in _chunks(feats, dev)]
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)

    def predict(self, X, device=None) -> np.ndarray:
        """(n,) predicted class ids."""
        return self.logits(X, device).argmax(1).numpy()

    def accuracy(self, X, y, device=None) -> float:
        """Share of rows of X whose predicted class is y."""
        y = np.asarray(y)
        if len(y) != len(as_features(X)):
            raise ValueError(f"X has {len(as_features(X))} rows but y has {len(y)} labels")
        return float((self.predict(X, device) == y).mean()) if len(y) else float("nan")

    def zero_out(self, keep) -> "Probe":
        """This probe with the weights of every neuron but `keep` set to 0 (NeuroX's "zero out":
        the same as zeroing those activations), without retraining."""
        keep = _indices(keep, self.in_dim, "neuron")
        mask = np.zeros(self.in_dim, dtype=bool)
        mask[keep] = True
        mine = mask if self.columns is None else mask[self.columns]
        return replace(self, weight=self.weight * torch.from_numpy(mine).float())

    def sparsity(self) -> float:
        """Mean Hoyer sparsity of the class rows of |W|: 0 when all weights are equal in size, 1 when
        each class uses one neuron (scale-free, so it compares probes trained with any penalty)."""
        return hoyer_sparsity(self.weight)


def hoyer_sparsity(weight_CK: torch.Tensor) -> float:
    """Mean over rows of (sqrt(K) - |w|_1 / |w|_2) / (sqrt(K) - 1)."""
    w = weight_CK.abs().double()
    k = w.shape[1]
    if k < 2:
        return 0.0
    ratio = w.sum(1) / w.norm(dim=1).clamp_min(1e-30)
    return float(((k ** 0.5 - ratio) / (k ** 0.5 - 1)).mean())


def train_probe(X, y, num_classes: int, l1: float = 0.0, l2: float = 0.0, epochs: int = 10,
                lr: float = 1e-3, batch_size: int = 32, seed: int = 0, device=None,
                columns=None) -> Probe:
    """Train a linear probe with cross-entropy + l1 * sum|W| + l2 * sqrt(sum W^2) (bias not penalised), Adam.

    Args:
        X: (n, N) activations: a numpy array or float16 memmap, a torch tensor, or a `Features` view;
            read one chunk at a time and converted to float32 on the device.
        y: (n,) class ids in 0..num_classes-1.
        num_classes: output classes.
        l1, l2, epochs, lr, batch_size, seed: the recipe (see `ProbeRecipe`).
        device: where to train; default the CUDA device X lives on, else the CPU.
        columns: train on these neurons only (the probe still reads full-width X).

    Returns:
        The trained probe.
    """
    recipe = ProbeRecipe(l1, l2, epochs, lr, batch_size, seed)
    feats = as_features(X)
    in_dim = feats.shape[1]
    if columns is not None:
        columns = _indices(columns, in_dim, "neuron")
        if not len(columns):
            raise ValueError("columns is empty: a probe needs at least one neuron")
        feats = feats.select(columns)
    y = _labels(y, len(feats), num_classes)
    if not len(feats):
        raise ValueError("no training rows")
    dev = _device(device, feats)
    weight, bias = _init(feats.shape[1], num_classes, seed, dev)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    rng = np.random.default_rng(seed)
    y_dev = torch.from_numpy(y).to(dev)
    n_chunks = -(-len(feats) // feats.chunk_rows())
    cached = list(_chunks(feats, dev)) if n_chunks == 1 else None
    small = dev.type == "cpu" and batch_size * feats.shape[1] * num_classes < ONE_THREAD_WORK
    with _one_thread() if small else contextlib.nullcontext():
        for _ in range(epochs):
            # Chunks in a random order, rows shuffled within each: one chunk in memory at a time.
            for start, stop, x in cached or _chunks(feats, dev, rng.permutation(n_chunks)):
                perm = torch.from_numpy(rng.permutation(stop - start)).to(dev)
                xs, ys = x.index_select(0, perm), y_dev[start:stop].index_select(0, perm)
                for s in range(0, stop - start, batch_size):
                    _step(opt, weight, bias, xs[s:s + batch_size], ys[s:s + batch_size], l1, l2)
    return Probe(weight.detach().cpu(), bias.detach().cpu(), in_dim, columns, recipe)


def _step(opt, weight, bias, x, y, l1: float, l2: float) -> None:
    loss = F.cross_entropy(x @ weight.T + bias, y)
    if l1:
        loss = loss + l1 * weight.abs().sum()
    if l2:
        loss = loss + l2 * weight.square().sum().sqrt()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@contextlib.contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _labels(y, n: int, num_classes: int) -> np.ndarray:
    y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y).astype(np.int64).reshape(-1)
    if len(y) != n:
        raise ValueError(f"X has {n} rows but y has {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}; got {y.min()}..{y.max()}")
    return y


def _init(k: int, c: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # nn.Linear's default initialisation, drawn from a seeded generator.
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / k ** 0.5
    weight = (torch.rand(c, k, generator=gen) * 2 - 1) * bound
    bias = (torch.rand(c, generator=gen) * 2 - 1) * bound
    return weight.to(device).requires_grad_(), bias.to(device).requires_grad_()


# --------------------------------------------------------------------------- lambdas and subsets

@dataclass(frozen=True)
class GridPoint:
    """One (l1, l2) of a lambda search with its dev accuracy and Hoyer sparsity."""

    l1: float
    l2: float
    dev_accuracy: float
    sparsity: float


@dataclass(frozen=True)
class LambdaChoice:
    """The chosen (l1, l2), the probe trained with them, and the whole grid."""

    l1: float
    l2: float
    probe: Probe
    grid: tuple[GridPoint, ...]


def select_lambdas(X_train, y_train, X_dev, y_dev, grid: Sequence[tuple[float, float]] = DEFAULT_GRID,
                   num_classes: int | None = None, tolerance: float = 0.01, **recipe) -> LambdaChoice:
    """Grid-search the elastic-net weights for a sparsity / accuracy balance.

    Rule: train one probe per (l1, l2) of `grid`; keep the points whose dev accuracy is within
    `tolerance` (absolute) of the best; of those, choose the sparsest probe (highest Hoyer
    sparsity of |W|), and on equal sparsity the earlier grid point.

    Args:
        X_train, y_train: training rows and labels (see `train_probe`).
        X_dev, y_dev: rows and labels the choice is made on.
        grid: (l1, l2) pairs.
        num_classes: output classes; default 1 + the largest label seen.
        tolerance: accuracy a sparser probe may give up.
        **recipe: further `train_probe` arguments (epochs, lr, batch_size, seed, device).

    Returns:
        The choice, with its probe and every grid point's dev accuracy and sparsity.
    """
    if not len(grid):
        raise ValueError("the lambda grid is empty; pass e.g. grid=DEFAULT_GRID")
    if num_classes is None:
        num_classes = 1 + int(max(np.max(y_train), np.max(y_dev) if len(y_dev) else 0))
    points, probes = [], []
    for l1, l2 in grid:
        probe = train_probe(X_train, y_train, num_classes, l1=l1, l2=l2, **recipe)
        points.append(GridPoint(l1, l2, probe.accuracy(X_dev, y_dev, recipe.get("device")), probe.sparsity()))
        probes.append(probe)
        log.info("probe l1=%g l2=%g: dev accuracy %.4f, sparsity %.3f", l1, l2, points[-1].dev_accuracy,
                 points[-1].sparsity)
    best = max(p.dev_accuracy for p in points)
    near = [i for i, p in enumerate(points) if p.dev_accuracy >= best - tolerance]
    pick = max(near, key=lambda i: (points[i].sparsity, -i))
    return LambdaChoice(points[pick].l1, points[pick].l2, probes[pick], tuple(points))


def keep_neurons(probe: Probe, keep, X_train=None, y_train=None, mode: str = "retrain", device=None,
                 **overrides) -> Probe:
    """A probe that uses only the neurons `keep` (NeuroX's ablation of a ranking).

    Args:
        probe: the probe trained on all neurons.
        keep: indices of the neurons to keep.
        X_train, y_train: training rows (for `retrain`).
        mode: `retrain` (train a new probe on the kept neurons with the same recipe) or `zero`
            (keep `probe`, zeroing the weights of the other neurons).
        device: where to train.
        **overrides: recipe fields to change for the retrained probe (e.g. l1=0, l2=0).

    Returns:
        A probe that reads full-width matrices, like `probe`.
    """
    if mode == "zero":
        return probe.zero_out(keep)
    if mode != "retrain":
        raise ValueError(f"unknown mode {mode!r}; use 'retrain' or 'zero'")
    if X_train is None or y_train is None:
        raise ValueError("mode='retrain' needs X_train and y_train")
    recipe = replace(probe.recipe, **overrides)
    return train_probe(X_train, y_train, probe.num_classes, l1=recipe.l1, l2=recipe.l2, epochs=recipe.epochs,
                       lr=recipe.lr, batch_size=recipe.batch_size, seed=recipe.seed, device=device,
                       columns=keep)
