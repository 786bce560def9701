"""bench prune on a tiny model: the three ways agree, the figures are consistent, and the sweep is the
full model plus random sets of the asked sizes."""
import pytest
import torch

from neuronbench.harness.engine.sites import Site
from neuronbench.harness.suite.bench import PruneBenchConfig, bench_prune, sweep_masks


def test_sweep_masks_are_the_full_model_then_random_sets_of_each_size(tiny):
    model = tiny("bert", "classifier")
    bench = PruneBenchConfig(sites="ffn.1", ks=(0.05, 0.25), seeds=3)
    masks = sweep_masks(model, bench)
    sizes = masks.masks[Site.ffn(1)].sum(1).tolist()
    assert masks.k == 7 and sizes == [0] + [3] * 3 + [16] * 3
    assert len({tuple(m.nonzero().squeeze(1).tolist()) for m in masks.masks[Site.ffn(1)][4:]}) == 3


@pytest.mark.parametrize("arch,kind,sites", [("bert", "classifier", "ffn.1"), ("llama", "causal-lm", "ffn")])
def test_bench_prune_ways_agree_and_ratios_follow_the_times(tiny, sentence_data, arch, kind, sites):
    model = tiny(arch, kind)
    out = bench_prune(model, sentence_data, PruneBenchConfig(sites=sites, ks=(0.05, 0.2), seeds=2, repeats=1))
    assert out["masks"] == 5 and out["examples"] == len(sentence_data)
    assert out["max_abs_diff"] <= 1e-5
    assert out["ratio"] == pytest.approx(out["per_mask_s"] / out["batched_s"])
    assert out["prefix_speedup"] == pytest.approx(out["batched_copy_inputs_s"] / out["batched_s"])
    assert out["ratio_same_batches"] == pytest.approx(out["per_mask_same_batches_s"] / out["batched_s"])
    assert out["masks_per_pass"] == 5  # a tiny batch: every mask in one pass
    assert out["first_masked_layer"] == (1 if sites == "ffn.1" else 0)
    assert all(out[k] > 0 for k in ("per_mask_s", "per_mask_same_batches_s", "batched_s", "batched_copy_inputs_s"))
    assert torch.get_num_threads() == out["threads"]


@pytest.mark.realmodel
def test_bench_prune_cli_prints_json_and_refuses_bad_fractions(capsys):
    import json

    from neuronbench.harness.cli import main

    assert main(["bench", "prune", "--data", "polarity", "--split", "test", "--limit", "16", "--ks", "0.01",
                 "0.1", "--seeds", "1", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["masks"] == 3 and out["examples"] == 16 and out["max_abs_diff"] <= 1e-5 and out["ratio"] > 0
    assert main(["bench", "prune", "--ks", "0.1", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ks are fractions" in err
