"""Planting on every architecture whose FFN is made of nn.Linear layers: BERT-style (up -> act ->
down), GPT-NeoX, and gated Llama-style MLPs (act(gate) * up): outputs unchanged, the new units
fire as designed (act(weight . x + bias)), and GPT-2's Conv1D is refused with a clear message."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronbench.harness.engine.collect import CollectConfig, collect
from neuronbench.harness.engine.discovery import sentence_means
from neuronbench.tasks._planting import ffn_inputs, ffn_parts, plant_units
from neuronbench.harness.engine.sites import Site

WORDS = [["the", "cat", "sat", "on", "the", "mat"], ["stocks", "rallied", "sharply"], ["a", "dog", "ran"]]


@pytest.mark.parametrize("arch,parts", [("bert", ("intermediate.dense", "output.dense", None)),
                                        ("gpt_neox", ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", None)),
                                        ("llama", ("mlp.up_proj", "mlp.down_proj", "mlp.gate_proj"))])
def test_ffn_parts_are_found_structurally(tiny, arch, parts):
    found = ffn_parts(tiny(arch).model, 1)
    assert (found.up, found.down, found.gate) == parts


def test_conv1d_ffn_is_refused(tiny):
    with pytest.raises(ValueError, match="nn.Linear"):
        ffn_parts(tiny("gpt2").model, 0)


@pytest.mark.parametrize("arch", ["bert", "gpt_neox", "llama"])
def test_planting_keeps_outputs_and_units_compute_their_detector(tiny, arch, tmp_path):
    import datasets

    model = tiny(arch)
    layer, n_new = 1, 5
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(n_new, 32, generator=gen), torch.randn(n_new, generator=gen)
    planted = plant_units(model, layer, weight, bias, seed=3)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        before = model.model(input_ids=ids, output_hidden_states=True).hidden_states
        after = planted.model.model(input_ids=ids, output_hidden_states=True).hidden_states
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert planted.model.width(Site.ffn(layer)) == 64 + n_new and len(set(planted.units)) == n_new

    # Each planted unit is act(weight . x + bias) of the FFN input x, gated or not.
    data = datasets.Dataset.from_dict({"words": WORDS})
    x, kept = ffn_inputs(model, layer, data)
    cfg = CollectConfig(sites=(Site.ffn(layer),), stats=(), dense_words=True, alignment="last")
    acts = np.asarray(collect(planted.model, data, cfg, dense_dir=tmp_path, progress=False).dense_words[Site.ffn(layer)], dtype=np.float32)
    act_fn = {"bert": torch.nn.functional.gelu, "gpt_neox": torch.nn.functional.gelu,
              "llama": torch.nn.functional.silu}[arch]
    want = act_fn(torch.as_tensor(x[kept]) @ weight.T + bias).numpy()
    np.testing.assert_allclose(acts[kept][:, list(planted.units)], want, atol=2e-2, rtol=2e-2)


def test_sentence_means_average_kept_words_only():
    values = np.array([[1.0], [3.0], [100.0], [4.0], [6.0]])
    kept = np.array([True, True, False, True, True])
    means = sentence_means(values, kept, [3, 2])
    np.testing.assert_allclose(means, [[2.0], [5.0]])
    with pytest.raises(ValueError, match="no kept word"):
        sentence_means(values, np.array([False, False, False, True, True]), [3, 2])
