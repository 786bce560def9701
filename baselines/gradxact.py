"""`gradxact`: gradient x activation of the task's objective (`harness.engine.objective`)."""
from __future__ import annotations

import torch

from neuronbench.harness.engine.batching import Batch
from neuronbench.harness.engine.hooks import site_hooks
from neuronbench.harness.engine.method import Method, MethodContext, Needs, NeuronScores, register_method
from neuronbench.harness.engine.models import LoadedModel
from neuronbench.harness.engine.objective import Target, neuron_relevance, objective, position_scores, run
from neuronbench.harness.engine.sites import Site


def site_gradients(loaded: LoadedModel, batch: Batch, target: Target | torch.Tensor | None,
                   sites: tuple[Site, ...]) -> dict[Site, tuple[torch.Tensor, torch.Tensor]]:
    """One forward and backward pass: per site, (activations, d objective / d activations), (B, T, N).

    `target` is the batch's `Target` (from `gradient_batches`). The objective is summed over
    examples, which is exact: examples do not interact.
    """
    captured: dict[Site, torch.Tensor] = {}

    def make(site: Site):
        def fn(acts: torch.Tensor):
            if acts.requires_grad:
                captured[site] = acts
                return None
            # A frozen model's earliest hooked site has no graph yet: make it the root. Later
            # sites depend on it, so their gradients still flow through every path.
            root = acts.detach().requires_grad_()
            acts = acts.detach()
            captured[site] = root
            return root
        return fn

    with site_hooks(loaded.model, {s: make(s) for s in sites}):
        obj_B = objective(loaded, run(loaded, batch), batch, target)
    grads = torch.autograd.grad(obj_B.sum(), [captured[s] for s in sites], allow_unused=True)
    return {s: (captured[s].detach(), torch.zeros_like(captured[s]) if g is None else g)
            for s, g in zip(sites, grads)}


def grad_x_act(loaded: LoadedModel):
    """The attribution function `(batch, target, sites) -> {site: grad * act (B, T, N)}`."""
    def attribute(batch: Batch, target, sites):
        return {s: g * a for s, (a, g) in site_gradients(loaded, batch, target, sites).items()}
    return attribute


@register_method("gradxact")
class GradXAct(Method):
    """Gradient x activation (first-order Taylor estimate of what zeroing a unit does to the objective).

    The objective is the task's (`ctx.objective`, `harness.engine.objective.OBJECTIVES`): by default
    log p(gold label) for a classifier and the mean next-token log-likelihood for a causal LM;
    `erasure` on a causal LM declares log p(the predicted next token after the text). A `base`
    model has none, so the method raises ValueError.

    relevance: per neuron, mean over every real token (special tokens included) of |grad x act|;
        the absolute value counts a neuron that pushes the objective down as relevant too.
    attribute_positions: per position, the signed sum over hidden dims of grad x hidden state at
        `resid.layer`: positive = raises the objective (ERASER's "higher = more important").
    `ctx.concept` is not used: the objective is the task's.
    """

    name = "gradxact"
    needs = Needs(labels=True, gradients=True)

    def __init__(self, max_tokens: int = 2048):
        self.max_tokens = max_tokens

    def relevance(self, ctx: MethodContext) -> NeuronScores:
        return neuron_relevance(ctx, grad_x_act(ctx.model), self.max_tokens)

    def attribute_positions(self, ctx: MethodContext, layer: int) -> list[torch.Tensor]:
        return position_scores(ctx, layer, grad_x_act(ctx.model), self.max_tokens)
