"""On CUDA, the Triton one-pass kernel agrees with the torch reductions and with the CPU results.

Skipped where no GPU is present (CI); run on a GPU machine with `bash scripts/test.sh -m gpu`.
"""
import datasets
import pytest
import torch

from neuronbench.harness.engine import fused_cuda
from neuronbench.harness.engine.collect import CollectConfig, collect
from neuronbench.harness.zoo.tiny import TINY_ARCHS, tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TEXTS = ["the cat sat on the mat", "stocks rallied sharply yesterday as investors bought shares",
         "a dog", "he quickly walked home singing loudly and happily", "the plot was boring"] * 8


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_triton_kernel_matches_torch_reductions_and_cpu(arch):
    ds = datasets.Dataset.from_dict({"text": TEXTS, "label": [0, 1, 0, 1, 0] * 8})
    model = tiny_model(arch, seed=2).to("cpu")
    cfg = dict(sites=model.sites("all"), max_tokens=96, topk=4)
    cpu = collect(model, ds, CollectConfig(**cfg, fused=False), progress=False)
    model.to("cuda")
    gpu = {f: collect(model, ds, CollectConfig(**cfg, fused=f), progress=False) for f in (True, False)}
    with fused_cuda.overlapped():  # statistics on a side stream, top-k merged one batch late
        side = collect(model, ds, CollectConfig(**cfg), progress=False)
    for site in model.sites("all"):
        a, b, c = gpu[True][site], gpu[False][site], cpu[site]
        assert torch.equal(side[site].moments.mean, a.moments.mean) and torch.equal(side[site].topk.values, a.topk.values)
        torch.testing.assert_close(a.labels.sums, b.labels.sums, rtol=1e-4, atol=1e-3)
        # bf16 autocast on CUDA: compare the two CUDA paths tightly, and CUDA with CPU loosely.
        assert a.moments.count == b.moments.count == c.moments.count
        torch.testing.assert_close(a.moments.mean, b.moments.mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.moments.var, b.moments.var, atol=1e-5, rtol=1e-3)
        torch.testing.assert_close(a.moments.min, b.moments.min)
        torch.testing.assert_close(a.moments.max, b.moments.max)
        torch.testing.assert_close(a.topk.values, b.topk.values)
        torch.testing.assert_close(a.moments.mean.cpu(), c.moments.mean, atol=2e-2, rtol=5e-2)
        ta, tb = a.max1.table(), b.max1.table()
        assert torch.equal(ta["count"].sum().cpu(), tb["count"].sum().cpu())
        torch.testing.assert_close(ta["act_sum"].sum(), tb["act_sum"].sum(), rtol=1e-4, atol=1e-4)
