"""Collector speed as ratios against the bare batched forward pass measured in the same run.

Run with `bash scripts/test.sh tests/benchmarks` (pytest-benchmark prints the table; each test's
`extra_info` holds its ratio). There is no timed assertion: the ratios are reported, not gated.
"""
import time

import pytest
import torch

from neuronbench.harness.engine.batching import encode
from neuronbench.harness.suite.bench import batch1_loop
from neuronbench.harness.engine.collect import CollectConfig, collect, run_batches
from neuronbench.harness.engine.data import load, subsample
from neuronbench.harness.engine.models import load_model

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]
ROUNDS = 3


@pytest.fixture(scope="module")
def setting():
    model = load_model("minilm", device="cpu")
    corpus = load("polarity")
    ds = subsample(corpus.splits["train"], 400, seed=0)
    cfg = CollectConfig(sites=model.sites("ffn"))
    enc = encode(model.tokenizer, ds, cfg.max_length)
    collect(model, ds.select(range(32)), cfg, progress=False)  # compile the CPU kernel once
    return model, ds, cfg, enc


def _bare(model, enc, cfg) -> float:
    start = time.perf_counter()
    run_batches(model, enc, cfg, lambda b: None, progress=False)
    return time.perf_counter() - start


def _paired(benchmark, model, enc, cfg, fn, args, rounds=ROUNDS):
    """Run `fn` under the benchmark, a bare forward before each round, so load on the machine hits
    both alike; returns (fn's result, best bare time)."""
    bare = []

    def setup():
        bare.append(_bare(model, enc, cfg))
        return args, {}

    result = benchmark.pedantic(fn, setup=setup, rounds=rounds, iterations=1)
    return result, min(bare)


def test_bare_forward(benchmark, setting):
    model, ds, cfg, enc = setting
    n = benchmark.pedantic(run_batches, args=(model, enc, cfg, lambda b: None),
                           kwargs={"progress": False}, rounds=ROUNDS, iterations=1)
    assert n == enc.n_tokens
    benchmark.extra_info["tokens"] = n


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
def test_collect_all_stats_vs_bare(benchmark, setting, fused):
    model, ds, cfg, enc = setting
    run = CollectConfig(sites=cfg.sites, fused=fused)
    col, bare = _paired(benchmark, model, enc, cfg, lambda: collect(model, ds, run, progress=False), ())
    assert col.n_tokens == enc.n_tokens
    ratio = bare / benchmark.stats.stats.min
    benchmark.extra_info["ratio_vs_bare"] = round(ratio, 3)
    print(f"collect ({'fused' if fused else 'torch'}) / bare forward throughput ratio: {ratio:.3f}")


def test_batch1_loop_vs_bare(benchmark, setting):
    model, ds, cfg, enc = setting
    texts = list(ds["text"])
    n, bare = _paired(benchmark, model, enc, cfg, batch1_loop, (model, texts), rounds=1)
    ratio = (n / benchmark.stats.stats.min) / (enc.n_tokens / bare)
    benchmark.extra_info["ratio_vs_bare"] = round(ratio, 3)
    print(f"batch-1 loop / bare forward throughput ratio: {ratio:.3f}")
    assert n > 0 and torch.get_num_threads() >= 1
