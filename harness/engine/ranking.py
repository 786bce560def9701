"""Turning a method's neuron scores into the neuron sets tasks intervene on."""
from __future__ import annotations

import numpy as np
import torch

# Stream tag of the tie-breaking permutation (tasks draw random sets from other streams).
TIE_STREAM = 0


def set_size(k: float, n_neurons: int) -> int:
    """Neurons in a k-set: round(k * n), at least 1."""
    if not 0 < k <= 1:
        raise ValueError(f"neuron fraction k={k!r} must be in (0, 1], e.g. 0.05 for 5% of the neurons")
    return max(1, round(k * n_neurons))


def rank_neurons(scores: torch.Tensor, seed: int) -> np.ndarray:
    """Flat neuron ids, most relevant first; ties are broken by a seeded random permutation (so a
    method with constant scores does not get the first layer's neurons as its top set)."""
    values = scores.detach().double().cpu().numpy()
    tie = np.random.default_rng([seed, TIE_STREAM]).permutation(len(values))
    return tie[np.argsort(-values[tie], kind="stable")]
