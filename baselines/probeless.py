"""`probeless` (Antverg & Belinkov, in NeuroX): neurons ranked by how far their class-conditional mean
activations lie apart, with no probe trained.
"""
from __future__ import annotations

import torch

from neuronbench.harness.engine.method import Method, MethodContext, Needs, NeuronScores, register_method


def probeless_scores(sums_LN: torch.Tensor, counts_L: torch.Tensor, concept: int | None = None,
                     pairwise: bool = True) -> torch.Tensor:
    """Per-neuron spread of the class means.

    Only classes with a count above 0 take part. With `pairwise=True` (the default) it is NeuroX's
    code: sum over class pairs of |mean_a - mean_b|, and for one `concept`, sum over the other
    classes c of |mean_concept - mean_c|. With `pairwise=False` the score is the sum over classes c
    of |mean_c - mean|, where mean is the mean over all labelled rows (the class means weighted by
    their counts); for one `concept`, |mean_concept - mean|.

    Args:
        sums_LN: (L, N) per-label activation sums.
        counts_L: (L,) rows per label.
        concept: a label id to score for, or None for all labels together.
        pairwise: NeuroX's pairwise form (default) or the distance to the overall mean.

    Returns:
        (N,) float32 scores, higher = more class-dependent.
    """
    sums, counts = sums_LN.double(), counts_L.double()
    present = counts > 0
    if concept is not None and not bool(present[concept]):
        raise ValueError(f"label {concept} has no labelled row; it cannot be scored")
    means = sums[present] / counts[present, None]  # (P, N)
    if not pairwise:
        overall = sums[present].sum(0) / counts[present].sum()
        if concept is None:
            return (means - overall).abs().sum(0).float()
        return (sums[concept] / counts[concept] - overall).abs().float()
    if concept is not None:
        return (means - sums[concept] / counts[concept]).abs().sum(0).float()
    total = torch.zeros(sums.shape[1], dtype=torch.float64, device=sums.device)
    for a in range(means.shape[0] - 1):  # one class at a time: no (P, P, N) tensor
        total += (means[a + 1:] - means[a]).abs().sum(0)
    return total.float()


@register_method("probeless")
class Probeless(Method):
    """Class-mean spread of word-level activations (last subword of each word).

    Word-labelled data uses word-level means; sentence-labelled data uses token-level means (each
    token carries its sentence's label), as the harness's label statistics provide.

    Args:
        pairwise: NeuroX's own score, the sum over class pairs of |mean_a - mean_b| (default);
            False scores the sum over classes of the distance to the overall mean instead.
    """

    name = "probeless"
    needs = Needs(labels=True)

    def __init__(self, pairwise: bool = True):
        self.pairwise = pairwise

    def relevance(self, ctx: MethodContext) -> NeuronScores:
        col = ctx.collect(stats=("labels", "moments"), alignment="last")
        concept = None
        if ctx.concept is not None:
            names = ctx.label_names or col.label_names or ()
            if ctx.concept not in names:
                raise KeyError(f"concept {ctx.concept!r} is not a label of this data; labels: {list(names)}")
            concept = list(names).index(ctx.concept)
        rows = []
        for site in ctx.index.sites:
            labels = col[site].labels
            if labels is None:
                raise ValueError("probeless needs labelled data (`word_labels` or `label`); the data has none")
            rows.append(probeless_scores(labels.sums.cpu(), labels.counts.cpu(), concept, self.pairwise))
        scores = torch.cat(rows)
        if concept is None:
            return NeuronScores(ctx.index, scores)
        return NeuronScores(ctx.index, scores[None], concepts=(ctx.concept,))
