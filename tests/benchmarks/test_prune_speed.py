"""The intervention path's speed: a pruning sweep through the batched multi-mask evaluation against
one mask per pass on the same masks, as ratios measured in the same run (never an absolute time).

Run with `bash scripts/test.sh tests/benchmarks`; each test's `extra_info` holds its ratio.
"""
import time

import pytest
import torch

from neuronbench.harness.engine.data import load, subsample
from neuronbench.harness.engine.intervene import MaskSet, evaluate_masks
from neuronbench.harness.engine.models import load_model
from neuronbench.harness.suite.bench import PruneBenchConfig, _scorer, sweep_masks

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]
ROUNDS = 2


@pytest.fixture(scope="module")
def setting():
    model = load_model("minilm", device="cpu")
    ds = subsample(load("polarity").splits["test"], 64, seed=0)
    return model, ds, _scorer(model, ds)


def _per_mask(model, ds, masks, score):
    return torch.cat([evaluate_masks(model, ds, MaskSet({s: m[k:k + 1] for s, m in masks.masks.items()}), score,
                                     prefix_once=False) for k in range(masks.k)])


def _paired(benchmark, model, ds, masks, score, prefix_once):
    """The batched sweep under the benchmark, the per-mask loop before each round (load on the
    machine hits both alike); returns (batched scores, per-mask scores, best per-mask time)."""
    loop, ref = [], {}

    def setup():
        start = time.perf_counter()
        ref["scores"] = _per_mask(model, ds, masks, score)
        loop.append(time.perf_counter() - start)
        return (), {}

    got = benchmark.pedantic(lambda: evaluate_masks(model, ds, masks, score, prefix_once=prefix_once),
                             setup=setup, rounds=ROUNDS, iterations=1)
    return got, ref["scores"], min(loop)


@pytest.mark.parametrize("sites,prefix_once", [("ffn", True), ("ffn.3,ffn.4,ffn.5", True), ("ffn.3,ffn.4,ffn.5", False)],
                         ids=["all-layers", "late-layers-prefix-once", "late-layers-copy-inputs"])
def test_batched_sweep_vs_one_mask_per_pass(benchmark, setting, sites, prefix_once):
    model, ds, score = setting
    masks = sweep_masks(model, PruneBenchConfig(sites=sites))
    got, ref, loop = _paired(benchmark, model, ds, masks, score, prefix_once)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    ratio = loop / benchmark.stats.stats.min
    benchmark.extra_info.update(ratio_vs_per_mask=round(ratio, 3), masks=masks.k,
                                max_abs_diff=float((got - ref).abs().max()))
    print(f"{sites} prefix_once={prefix_once}: per-mask loop time / batched time = {ratio:.3f} ({masks.k} masks)")
