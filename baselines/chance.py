"""`random`: seeded uniform scores, descriptors and attributions; the no-skill reference of every task."""
from __future__ import annotations

import torch

from neuronbench.harness.engine.batching import encode
from neuronbench.harness.engine.method import Method, MethodContext, NeuronScores, register_method


@register_method("random")
class RandomMethod(Method):
    """Every answer drawn from a generator seeded by `ctx.seed`: what chance looks like."""

    name = "random"

    def relevance(self, ctx: MethodContext) -> NeuronScores:
        index = ctx.index
        return NeuronScores(index, torch.rand(index.size, generator=ctx.generator()))

    def stage_change(self, ctx: MethodContext) -> float:
        # A fresh draw per stage pair, seeded by the stages' names (e.g. `ptb-lm@2`), never by their
        # weights: the zoo trains its models on each machine, and one changed bit would redraw.
        stages = (ctx.parent.name if ctx.parent else "", ctx.model.name)
        return float(torch.rand(1, generator=ctx.generator(*stages)))

    def descriptors(self, ctx: MethodContext, vocabulary: tuple[str, ...]) -> dict[int, list[str]]:
        gen = ctx.generator()
        k = min(10, len(vocabulary))
        return {n: [vocabulary[i] for i in torch.randperm(len(vocabulary), generator=gen)[:k].tolist()]
                for n in range(ctx.index.size)}

    def attribute_positions(self, ctx: MethodContext, layer: int) -> list[torch.Tensor]:
        gen = ctx.generator()
        enc = encode(ctx.model.tokenizer, ctx.data, ctx.model.max_length, include_special=True)
        return [torch.rand(len(ids), generator=gen) for ids in enc.input_ids]
