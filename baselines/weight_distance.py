"""`weight-distance`: how far the weights moved from `ctx.parent` to `ctx.model`, for the whole model
and per neuron. A data-free reference for stage questions: it sees training, never activations.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from neuronbench.harness.engine.method import Method, MethodContext, Needs, NeuronScores, register_method
from neuronbench.harness.engine.models import arch_spec, layer_modules, site_module
from neuronbench.harness.engine.sites import Site

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Writers:
    """Modules of one block (paths from the block) whose output axis writes the residual stream
    (the FFN's writers, its up and gate projections, come from `models.arch_spec`).

    Attributes:
        resid: besides the FFN down projection (found by the harness), what writes the residual
            stream inside the block: the attention output projection, and for post-LN blocks
            the LayerNorms that produce the stream.
    """

    resid: tuple[str, ...]


_BERT = Writers(("attention.output.dense", "attention.output.LayerNorm", "output.LayerNorm"))
_LLAMA = Writers(("self_attn.o_proj",))
# Keyed by model_type; an architecture missing here fails (for resid sites) with the fix named.
WRITERS: dict[str, Writers] = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT, "camembert": _BERT,
    "distilbert": Writers(("attention.out_lin", "sa_layer_norm", "output_layer_norm")),
    "gpt2": Writers(("attn.c_proj",)),
    "gpt_neox": Writers(("attention.dense",)),
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
}


@register_method("weight-distance")
class WeightDistance(Method):
    """Parameter change between two stages.

    `stage_change`: relative L2 distance `||theta_model - theta_parent|| / ||theta_parent||` over
    the parameters the two base models share (same name and shape: the transformer with its
    embeddings; task heads, which a parent usually lacks, are left out and logged).

    `relevance`: per neuron, the L2 norm of the change of the weights tied to its site, ignoring
    `ctx.data` and `ctx.concept`:
      * `ffn` neuron j: row j of the up projection (and of the gate), with its bias, which
        produce it, and column j of the down projection, which reads it.
      * `resid` dimension d (the block output): the slice at output dimension d of everything
        in the block that writes the residual stream: the attention output and FFN down
        projections (weights and biases) and, in post-LN blocks (BERT, DistilBERT), the
        LayerNorms' gain and bias. A residual dimension has no weights of its own, so its
        writers are the principled analogue of the FFN's up rows.
    """

    name = "weight-distance"
    needs = Needs(stages=True)

    def stage_change(self, ctx: MethodContext) -> float:
        parent, model = _stages(ctx)
        theirs = dict(parent.base_model.named_parameters())
        diff_sq = base_sq = 0.0
        skipped = []
        for name, param in model.base_model.named_parameters():
            old = theirs.get(name)
            if old is None or old.shape != param.shape:
                skipped.append(name)
                continue
            old = old.detach().to(param.device)
            diff_sq += float(torch.linalg.vector_norm(param.detach().double() - old.double())) ** 2
            base_sq += float(torch.linalg.vector_norm(old.double())) ** 2
        if skipped:
            log.info("weight-distance: %d parameters not in both stages left out (%s...)",
                     len(skipped), skipped[:3])
        if base_sq == 0.0:
            raise ValueError("the two stages share no parameter with non-zero weights; weight-distance "
                             "needs a parent of the same architecture as the model")
        return math.sqrt(diff_sq / base_sq)

    def relevance(self, ctx: MethodContext) -> NeuronScores:
        parent, model = _stages(ctx)
        index = ctx.index
        per_site = {site: _site_change(parent, model, site, index.width(site)).float().cpu()
                    for site in index.sites}
        return NeuronScores(index, index.concat(per_site))


def _stages(ctx: MethodContext) -> tuple[nn.Module, nn.Module]:
    if ctx.parent is None:
        raise ValueError("weight-distance compares two stages: give the context a parent (the earlier stage)")
    return ctx.parent.model, ctx.model.model


def _writers(model: nn.Module) -> Writers:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in WRITERS:
        raise ValueError(f"weight-distance does not know which modules write the neurons of {model_type!r}; "
                         f"known: {', '.join(sorted(WRITERS))}. Add its Writers to baselines/weight_distance.py")
    return WRITERS[model_type]


def _site_change(parent: nn.Module, model: nn.Module, site: Site, width: int) -> torch.Tensor:
    """(width,) L2 norm of each neuron's weight change at `site`."""
    new_block, old_block = layer_modules(model)[site.layer], layer_modules(parent)[site.layer]
    down = [(site_module(model, Site.ffn(site.layer)), site_module(parent, Site.ffn(site.layer)))]
    # The FFN's writers come from the resolved structure (any architecture); the residual stream's
    # from the WRITERS table.
    paths = arch_spec(model).up_proj if site.kind == "ffn" else _writers(model).resid
    out_side = [(new_block.get_submodule(p), old_block.get_submodule(p)) for p in paths]
    if site.kind == "resid":
        out_side, down = out_side + down, []
    total = torch.zeros(width, dtype=torch.float64, device=next(model.parameters()).device)
    for new, old in out_side:
        total += _axis_change(new, old, output=True, width=width)
    for new, old in down:  # the down projection reads the FFN neurons on its input axis
        total += _axis_change(new, old, output=False, width=width)
    return total.sqrt()


def _axis_change(new: nn.Module, old: nn.Module, output: bool, width: int) -> torch.Tensor:
    """(width,) squared change of a module's parameters per output (or input) unit.

    nn.Linear stores (out, in); transformers' Conv1D (GPT-2) stores (in, out); 1-D parameters
    (biases, norm gains) are per output unit and have no input axis.
    """
    transposed = type(new).__name__ == "Conv1D"
    theirs = dict(old.named_parameters(recurse=False))
    total = torch.zeros(width, dtype=torch.float64, device=next(new.parameters()).device)
    for name, param in new.named_parameters(recurse=False):
        if param.dim() == 1 and not output:
            continue
        delta = (param.detach().double() - theirs[name].detach().to(param.device).double()).square()
        if delta.dim() == 2:
            unit_axis = (1 if output else 0) if transposed else (0 if output else 1)
            delta = delta.sum(1 - unit_axis)
        if output and delta.shape == (2 * width,):  # a fused gate/up projection: gate rows, then up rows
            delta = delta.view(2, width).sum(0)
        if delta.shape != (width,):
            raise ValueError(f"{type(new).__name__}.{name} has {tuple(param.shape)}, which does not index "
                             f"{width} neurons on its {'output' if output else 'input'} axis; fix WRITERS")
        total += delta
    return total
