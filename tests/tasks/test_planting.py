"""Planting on every family `tiny_config` builds, read from the resolved architecture (plain MLPs,
gated `act(gate) * up`, Phi-3's fused gate/up, GPT-2's transposed `Conv1D`): outputs unchanged,
the new units fire as designed (act(weight . x + bias)), and an unusable layout is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronbench.harness.engine.arch import ArchSpec, register_arch, ARCHS
from neuronbench.harness.engine.collect import CollectConfig, collect
from neuronbench.harness.engine.discovery import sentence_means
from neuronbench.harness.engine.models import arch_spec
from neuronbench.harness.engine.sites import Site
from neuronbench.harness.zoo.tiny import TINY_FAMILIES, tiny_model
from neuronbench.tasks._planting import ffn_inputs, ffn_parts, plant_units
from families import ffn_act

WORDS = [["the", "cat", "sat", "on", "the", "mat"], ["stocks", "rallied", "sharply"], ["a", "dog", "ran"]]


@pytest.mark.parametrize("arch,parts", [
    ("bert", ("intermediate.dense", "output.dense", None, False)),
    ("gpt2", ("mlp.c_fc", "mlp.c_proj", None, False)),
    ("llama", ("mlp.up_proj", "mlp.down_proj", "mlp.gate_proj", False)),
    ("phi3", ("mlp.gate_up_proj", "mlp.down_proj", None, True))])
def test_ffn_parts_come_from_the_resolved_architecture(arch, parts):
    found = ffn_parts(tiny_model(arch).model, 1)
    assert (found.up, found.down, found.gate, found.fused) == parts


def test_a_layout_without_input_projections_is_refused():
    model = tiny_model("opt")
    spec = arch_spec(model.model)
    register_arch("opt", ArchSpec(spec.layers, spec.down_proj))  # an override written before up_proj existed
    try:
        with pytest.raises(ValueError, match="override .* has no up_proj"):
            ffn_parts(model.model, 0)
    finally:
        del ARCHS["opt"]


@pytest.mark.parametrize("kind", ["base", "causal-lm"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_planting_keeps_outputs_and_units_compute_their_detector(family, kind, tmp_path):
    import datasets

    if kind == "causal-lm" and family in ("bert", "roberta", "distilbert", "electra"):
        kind = "classifier"  # the encoders' head: planting must keep its logits too
    model = tiny_model(family, kind)
    layer, n_new = 1, 5
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(n_new, 32, generator=gen), torch.randn(n_new, generator=gen)
    planted = plant_units(model, layer, weight, bias, seed=3)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    with torch.no_grad():
        before = model.model(input_ids=ids, output_hidden_states=True)
        after = planted.model.model(input_ids=ids, output_hidden_states=True)
    for b, a in zip(before.hidden_states, after.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if kind != "base":
        torch.testing.assert_close(after.logits, before.logits, atol=1e-5, rtol=1e-5)
    assert planted.model.width(Site.ffn(layer)) == 64 + n_new and len(set(planted.units)) == n_new
    assert model.width(Site.ffn(layer)) == 64  # the original is untouched

    # Each planted unit is act(weight . x + bias) of the FFN input x, gated or not.
    data = datasets.Dataset.from_dict({"words": WORDS})
    x, kept = ffn_inputs(model, layer, data)
    cfg = CollectConfig(sites=(Site.ffn(layer),), stats=(), dense_words=True, alignment="last")
    acts = np.asarray(collect(planted.model, data, cfg, dense_dir=tmp_path, progress=False).dense_words[Site.ffn(layer)],
                      dtype=np.float32)
    want = ffn_act(model.config)(torch.as_tensor(x[kept]) @ weight.T + bias).numpy()
    assert kept.sum() > 5
    np.testing.assert_allclose(acts[kept][:, list(planted.units)], want, atol=2e-2, rtol=2e-2)


def test_sentence_means_average_kept_words_only():
    values = np.array([[1.0], [3.0], [100.0], [4.0], [6.0]])
    kept = np.array([True, True, False, True, True])
    means = sentence_means(values, kept, [3, 2])
    np.testing.assert_allclose(means, [[2.0], [5.0]])
    with pytest.raises(ValueError, match="no kept word"):
        sentence_means(values, np.array([False, False, False, True, True]), [3, 2])
