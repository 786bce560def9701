"""Description metrics (NeuronEval, Oikarinen et al., ICML 2025): how well a descriptor's presence
on a set of inputs matches a neuron's activations on them, with the sanity tests that tell a
usable metric from one an explanation can game.

Every metric takes `acts` (S,) and `present` (S,) bool. F1, IoU, precision and recall read the
neuron as active on its top `active_fraction` of inputs. The missing-labels test drops half of
the positives of a true descriptor (too specific an explanation), the extra-labels test labels as
many random negatives positive (too generic): a sound metric scores the true labels higher in both.
Precision (fails extra labels) and recall (fails missing labels) are kept as controls that show
the tests can fail.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

ACTIVE_FRACTION = 0.2


def _active(acts: np.ndarray, active_fraction: float) -> np.ndarray:
    n = max(1, int(round(active_fraction * len(acts))))
    out = np.zeros(len(acts), dtype=bool)
    out[np.argsort(-acts, kind="stable")[:n]] = True
    return out


def correlation(acts, present, active_fraction: float = ACTIVE_FRACTION) -> float:
    """Pearson correlation of the activations with the 0/1 presence (0 when either is constant)."""
    a, y = np.asarray(acts, dtype=np.float64), np.asarray(present, dtype=np.float64)
    if a.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(a, y)[0, 1])


def auprc(acts, present, active_fraction: float = ACTIVE_FRACTION) -> float:
    """Average precision of ranking the inputs by activation for the presence (ties broken by order)."""
    y = np.asarray(present, dtype=bool)[np.argsort(-np.asarray(acts, dtype=np.float64), kind="stable")]
    if not y.any():
        return 0.0
    hits = np.cumsum(y)
    return float((hits[y] / (np.flatnonzero(y) + 1)).mean())


def _confusion(acts, present, active_fraction):
    act, y = _active(np.asarray(acts, dtype=np.float64), active_fraction), np.asarray(present, dtype=bool)
    return int((act & y).sum()), int(act.sum()), int(y.sum()), int((act | y).sum())


def f1(acts, present, active_fraction: float = ACTIVE_FRACTION) -> float:
    both, n_act, n_pos, _ = _confusion(acts, present, active_fraction)
    return 2 * both / (n_act + n_pos) if n_act + n_pos else 0.0


def iou(acts, present, active_fraction: float = ACTIVE_FRACTION) -> float:
    both, _, _, union = _confusion(acts, present, active_fraction)
    return both / union if union else 0.0


def precision(acts, present, active_fraction: float = ACTIVE_FRACTION) -> float:
    both, n_act, _, _ = _confusion(acts, present, active_fraction)
    return both / n_act if n_act else 0.0


def recall(acts, present, active_fraction: float = ACTIVE_FRACTION) -> float:
    both, _, n_pos, _ = _confusion(acts, present, active_fraction)
    return both / n_pos if n_pos else 0.0


METRICS: dict[str, Callable[..., float]] = {"correlation": correlation, "auprc": auprc, "f1": f1, "iou": iou,
                                            "precision": precision, "recall": recall}


def missing_labels(present: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`present` with a random half of its positives dropped."""
    out = np.asarray(present, dtype=bool).copy()
    pos = np.flatnonzero(out)
    out[rng.choice(pos, len(pos) // 2, replace=False)] = False
    return out


def extra_labels(present: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`present` with as many random negatives as it has positives (all of them if fewer) made positive."""
    out = np.asarray(present, dtype=bool).copy()
    neg = np.flatnonzero(~out)
    out[rng.choice(neg, min(len(neg), int(out.sum())), replace=False)] = True
    return out


def sanity_pass_rates(acts: np.ndarray, present: np.ndarray, metric: Callable[..., float], seed: int = 0,
                      trials: int = 5, active_fraction: float = ACTIVE_FRACTION) -> dict[str, float]:
    """Share of (neuron, trial) pairs where `metric` scores the true labels strictly higher than
    the perturbed ones, for the missing- and extra-labels tests.

    Args:
        acts: (S, N) activations of N neurons.
        present: (S, N) bool, each neuron's true descriptor presence (positives and negatives).
        metric: one of `METRICS`.
        seed, trials: perturbation draws per neuron.
    """
    rng = np.random.default_rng(seed)
    wins = {"missing": [], "extra": []}
    for j in range(acts.shape[1]):
        a, y = acts[:, j], present[:, j]
        true = metric(a, y, active_fraction)
        for _ in range(trials):
            wins["missing"].append(true > metric(a, missing_labels(y, rng), active_fraction))
            wins["extra"].append(true > metric(a, extra_labels(y, rng), active_fraction))
    return {test: float(np.mean(w)) if w else float("nan") for test, w in wins.items()}
