"""The Triton collector kernels under Triton's CPU interpreter (`TRITON_INTERPRET=1`) on tiny shapes,
checked against torch in float64, the numba kernel and the torch collector: CI runs them without a GPU.

The interpreter works only when the variable is set before Triton is imported, so a run without it
runs this file again in a child pytest with it set. Skipped where Triton is not installed (optional:
a ~290 MB wheel, ~1 GB installed).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neuronbench.harness.engine import fused, fused_cuda
from neuronbench.harness.engine.collect import CollectConfig, collect

pytest.importorskip("triton", reason="Triton is not installed (optional; `pip install triton` to run these)")


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
here = pytest.mark.skipif(not INTERPRETED, reason="runs in the child pytest with TRITON_INTERPRET=1")


@pytest.mark.skipif(INTERPRETED, reason="this is the child run")
def test_the_kernels_pass_under_the_interpreter_in_a_child_pytest():
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           str(Path(__file__).relative_to(root))], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def _batch(R=150, N=200, L=3, dtype=torch.bfloat16, binary=True, seed=0):
    """Activations with a mean far from 0 in some columns, uncounted rows, and label weights."""
    gen = torch.Generator().manual_seed(seed)
    X = (torch.randn(R, N, generator=gen) + torch.linspace(0, 30, N)).to(dtype)
    weight = (torch.rand(R, generator=gen) > 0.2).float()
    lw = torch.zeros(L, R)
    lw[torch.randint(0, L, (R,), generator=gen), torch.arange(R)] = 1 if binary else 0.5
    return X, weight, lw * weight


@here
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("binary", [True, False], ids=["0/1-labels", "fractional-labels"])
def test_kernel_statistics_match_float64_torch_and_numba(dtype, binary):
    X, weight, lw = _batch(R=700, dtype=dtype, binary=binary)  # 11 row blocks: several per program
    out = fused_cuda.run(X, weight, None, lw, binary)
    rows = weight.nonzero().squeeze(1)
    xd = X.double()[rows]
    torch.testing.assert_close(out.mean, xd.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.m2, ((xd - xd.mean(0)) ** 2).sum(0), rtol=1e-5, atol=1e-4)
    assert torch.equal(out.min, xd.min(0).values.float()) and torch.equal(out.max, xd.max(0).values.float())
    torch.testing.assert_close(out.labels, lw.double() @ X.double(), rtol=1e-6, atol=1e-4)
    numba = fused.run(X.float().numpy(), weight.numpy().astype(np.uint8), np.full(X.shape[1], np.inf, np.float32), 4)
    assert np.array_equal(out.row_idx[rows].numpy(), numba.row_idx[rows.numpy()])  # first arg-max, as numba
    assert np.array_equal(out.row_val[rows].numpy(), numba.row_val[rows.numpy()])
    assert torch.equal(out.max, torch.from_numpy(numba.max.max(0)))


@here
def test_candidates_hold_every_columns_top_k_above_threshold():
    X, weight, _ = _batch(R=300, N=140)
    xf = torch.where(weight[:, None] > 0, X.float(), float("-inf"))
    thr = xf[:40].topk(3, 0).values[-1]  # a threshold many later rows beat, as after a warm-up
    k = 4
    rows, cols, vals = fused_cuda.run(X, weight, thr, k=k).candidates()
    assert torch.equal(vals, xf[rows, cols]) and bool((vals > thr[cols]).all())
    per_tile = torch.bincount((rows // fused_cuda.BLOCK_R) * X.shape[1] + cols)
    assert int(per_tile.max()) <= k  # at most k per column and row block
    assert len(set(zip(rows.tolist(), cols.tolist()))) == rows.numel()
    for n in range(X.shape[1]):
        above = (xf[:, n] > thr[n]).nonzero().squeeze(1)
        top = above[xf[above, n].topk(min(k, above.numel())).indices]
        assert set(top.tolist()) <= set(rows[cols == n].tolist()), n
    assert per_tile.sum() < (xf > thr).sum()  # the per-tile top-k did drop entries


def _compare(a, b, exact_topk=True):
    assert a.moments.count == b.moments.count
    torch.testing.assert_close(a.moments.mean, b.moments.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.moments.var, b.moments.var, rtol=1e-4, atol=1e-5)
    assert torch.equal(a.moments.min, b.moments.min) and torch.equal(a.moments.max, b.moments.max)
    assert torch.equal(a.topk.values, b.topk.values)
    torch.testing.assert_close(a.labels.sums, b.labels.sums, rtol=1e-5, atol=1e-4)
    ta, tb = a.max1.table(), b.max1.table()
    assert torch.equal(ta["neuron"], tb["neuron"]) and torch.equal(ta["count"], tb["count"])
    torch.testing.assert_close(ta["act_sum"], tb["act_sum"], rtol=1e-6, atol=1e-5)


@here
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_collect_through_the_kernels_equals_the_torch_and_numba_collectors(tiny, sentence_data, word_data,
                                                                          monkeypatch, arch):
    model = tiny(arch)
    for data, alignment in ((sentence_data, "last"), (word_data, "mean")):
        cfg = dict(sites=model.sites("all"), max_tokens=96, topk=4, alignment=alignment)
        triton_col = collect(model, data, CollectConfig(**cfg), progress=False)
        torch_col = collect(model, data, CollectConfig(**cfg, fused=False), progress=False)
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU default: numba
        numba_col = collect(model, data, CollectConfig(**cfg), progress=False)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        for site in model.sites("all"):
            _compare(triton_col[site], torch_col[site])
            _compare(triton_col[site], numba_col[site])


@here
def test_candidate_overflow_falls_back_to_filtering_with_torch(tiny, sentence_data, monkeypatch):
    model = tiny("gpt2")
    cfg = dict(sites=model.sites("ffn"), max_tokens=96, topk=4, stats=("topk",))
    expected = collect(model, sentence_data, CollectConfig(**cfg, fused=False), progress=False)
    monkeypatch.setattr(fused_cuda, "_capacity", lambda n, k: 2)
    got = collect(model, sentence_data, CollectConfig(**cfg), progress=False)
    for site in cfg["sites"]:
        assert torch.equal(got[site].topk.values, expected[site].topk.values)
        assert torch.equal(got[site].topk.example_ids, expected[site].topk.example_ids)
