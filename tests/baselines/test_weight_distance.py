"""Tests for the `weight-distance` baseline: zero for identical stages, the exact relative distance
for a known perturbation, and per-neuron relevance that lands on the perturbed neuron, on every tiny
architecture (nn.Linear and GPT-2's transposed Conv1D)."""
from __future__ import annotations

import copy
import math

import datasets
import pytest
import torch

from neuronbench.baselines.weight_distance import WeightDistance
from neuronbench.harness.engine.method import MethodContext, call_verb
from neuronbench.harness.engine.sites import Site
from neuronbench.harness.zoo.tiny import TINY_ARCHS

SITES = (Site.ffn(1), Site.resid(1))
DATA = datasets.Dataset.from_dict({"text": ["the cat sat"]})


def _ctx(model, parent):
    return MethodContext(model, sites=SITES, data=DATA, data_id="wd", parent=parent)


def _edited(model, edit):
    out = copy.deepcopy(model)
    with torch.no_grad():
        edit(out.model)
    return out


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_identical_stages_are_zero_apart(tiny, arch):
    model = tiny(arch)
    ctx = _ctx(model, copy.deepcopy(model))
    assert call_verb(WeightDistance(), "stage_change", ctx) == 0.0
    assert call_verb(WeightDistance(), "relevance", ctx).scores.abs().max() == 0


def test_stage_change_is_the_relative_l2_distance_over_shared_parameters(tiny):
    model = tiny("bert", "classifier")
    parent = tiny("bert")  # a base model: the classifier's head is not shared and is left out
    child = _edited(model, lambda m: m.bert.encoder.layer[0].intermediate.dense.weight.add_(0.5))
    # Same seed, so child and parent differ only by the edit (the classifier's head aside).
    base = torch.cat([p.detach().flatten() for p in parent.model.parameters()])
    delta = math.sqrt(0.5 ** 2 * child.model.bert.encoder.layer[0].intermediate.dense.weight.numel())
    got = WeightDistance().stage_change(_ctx(child, parent))
    assert got == pytest.approx(delta / float(base.norm()), rel=1e-6)


def _up(block, arch):
    return {"bert": lambda: block.intermediate.dense, "gpt2": lambda: block.mlp.c_fc,
            "gpt_neox": lambda: block.mlp.dense_h_to_4h, "llama": lambda: block.mlp.up_proj}[arch]()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_ffn_relevance_lands_on_the_neuron_whose_up_row_moved(tiny, reference, arch):
    model, j = tiny(arch), 5

    def edit(m):
        up = _up(reference.block_of(SimpleModel(m), 1), arch)
        if arch == "gpt2":  # Conv1D: (in, out), neuron j is column j
            up.weight[:, j] += 0.3
        else:
            up.weight[j, :] += 0.3

    child = _edited(model, edit)
    ctx = _ctx(child, model)
    scores = call_verb(WeightDistance(), "relevance", ctx).scores
    ffn = ctx.index.split(scores)[Site.ffn(1)]
    expected = 0.3 * math.sqrt(model.config.hidden_size)
    assert ffn[j].item() == pytest.approx(expected, rel=1e-5)
    assert (torch.cat([ffn[:j], ffn[j + 1:]]) == 0).all()
    assert (ctx.index.split(scores)[Site.resid(1)] == 0).all()  # the up projection writes no residual


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_resid_relevance_lands_on_the_dimension_the_down_projection_writes(tiny, reference, arch):
    model, d = tiny(arch), 3

    def edit(m):
        down = reference.mlp_parts(SimpleModel(m), 1)["down"]
        if arch == "gpt2":  # Conv1D: (in, out), output dimension d is column d
            down.weight[:, d] += 0.2
        else:
            down.weight[d, :] += 0.2

    ctx = _ctx(_edited(model, edit), model)
    per_site = ctx.index.split(call_verb(WeightDistance(), "relevance", ctx).scores)
    resid = per_site[Site.resid(1)]
    assert resid[d].item() == pytest.approx(0.2 * math.sqrt(model.width(Site.ffn(1))), rel=1e-5)
    assert (torch.cat([resid[:d], resid[d + 1:]]) == 0).all()
    # The down projection also reads every FFN neuron: each one's column moved by 0.2 in one entry.
    assert torch.allclose(per_site[Site.ffn(1)], torch.full_like(per_site[Site.ffn(1)], 0.2))


class SimpleModel:
    """The shape conftest's by-hand module finders expect (`.model`, `.config`)."""

    def __init__(self, module):
        self.model, self.config = module, module.config


def test_weight_distance_needs_a_parent(tiny):
    with pytest.raises(ValueError, match="parent"):
        WeightDistance().stage_change(_ctx(tiny("bert"), None))


@pytest.mark.parametrize("arch,path,row", [("opt", "fc1", 5), ("phi3", "mlp.gate_up_proj", 64 + 5),
                                           ("gemma2", "mlp.gate_proj", 5)])
def test_ffn_relevance_on_architectures_outside_the_writers_table(arch, path, row):
    """The FFN's writers come from the resolved structure: OPT, Phi-3's fused gate/up (row F + j is
    the up half of neuron j) and Gemma 2 need no WRITERS entry for ffn sites."""
    from neuronbench.harness.engine.models import layer_modules
    from neuronbench.harness.zoo.tiny import tiny_model

    model = tiny_model(arch)
    child = _edited(model, lambda m: layer_modules(m)[1].get_submodule(path).weight[row].add_(1.0))
    ctx = MethodContext(child, sites=(Site.ffn(1),), data=DATA, data_id="wd", parent=model)
    scores = call_verb(WeightDistance(), "relevance", ctx).scores
    assert int(scores.argmax()) == 5 and scores[5] == pytest.approx(math.sqrt(model.width(Site.resid(1))))
