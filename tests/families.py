"""Hand-written facts about the tiny families that tests check the harness against."""
from __future__ import annotations

import torch
from transformers.activations import ACT2FN


def ffn_act(config):
    """The FFN nonlinearity a family's config names (Falcon's is a fixed exact GELU)."""
    if config.model_type == "falcon":
        return torch.nn.GELU()
    for attr in ("hidden_activation", "hidden_act", "activation_function", "activation"):
        if isinstance(getattr(config, attr, None), str):
            return ACT2FN[getattr(config, attr)]
    raise AssertionError(f"no activation named in {config.model_type}'s config")
