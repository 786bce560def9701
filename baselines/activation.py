"""`activation`: neurons ranked by how strongly they fire on the data, with no labels: the magnitude
baseline that every label-aware method should beat.
"""
from __future__ import annotations

import torch

from neuronbench.harness.engine.method import Method, MethodContext, NeuronScores, register_method

SCORES = ("rms", "variance")


@register_method("activation")
class Activation(Method):
    """Per-neuron activation magnitude over the tokens of `ctx.data` (special tokens excluded).

    The mean |activation| is not among the harness's streaming moments, so the default score is its
    nearest moment-based stand-in, the root mean square sqrt(mean^2 + var) = sqrt(E[x^2]): it
    bounds E|x| from above and equals it for a neuron of constant magnitude, and like E|x| it ranks
    a neuron with a large constant offset high. `variance` ranks by spread around the mean instead
    (a constant offset scores 0). Both ignore `ctx.concept`: the score is the same for every concept.

    Args:
        score: `rms` (default) or `variance`.
    """

    name = "activation"

    def __init__(self, score: str = "rms"):
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}; use one of {SCORES}")
        self.score = score

    def relevance(self, ctx: MethodContext) -> NeuronScores:
        col = ctx.collect(stats=("moments",))
        rows = []
        for site in ctx.index.sites:
            m = col[site].moments
            var = m.var.double().cpu()
            rows.append(var if self.score == "variance" else (m.mean.double().cpu().square() + var).sqrt())
        return NeuronScores(ctx.index, torch.cat(rows).float())
