"""One-pass CUDA kernel (Triton) for the streaming statistics, the GPU twin of `fused.py`.

Per block of rows it reads each activation once and writes per-column partial sums, sums of
squares, minima and maxima over counted rows, each row's max and arg-max, and whether the row
holds any value above its neuron's top-k threshold. Torch then reduces the partials in float64
and re-reads only the flagged rows for top-k candidates.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (CPU-only installs): the torch reductions are used instead
    triton = None

BLOCK_R, BLOCK_N, NUM_WARPS = 64, 128, 4

if triton is not None:
    @triton.jit
    def _kernel(X, counted, thr, psum, psq, pmin, pmax, row_val, row_idx, row_hit, R, N,
                stride_x, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        in_rows = rows < R
        use = (tl.load(counted + rows, mask=in_rows, other=0) != 0) & in_rows
        best = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        best_i = tl.zeros((BLOCK_R,), tl.int32)
        hit = tl.zeros((BLOCK_R,), tl.int32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            in_cols = cols < N
            m2d = use[:, None] & in_cols[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m2d, other=0.0).to(tl.float32)
            out = pid * N + cols
            tl.store(psum + out, tl.sum(x, 0), mask=in_cols)
            tl.store(psq + out, tl.sum(x * x, 0), mask=in_cols)
            tl.store(pmin + out, tl.min(tl.where(m2d, x, float("inf")), 0), mask=in_cols)
            xm = tl.where(m2d, x, float("-inf"))
            tl.store(pmax + out, tl.max(xm, 0), mask=in_cols)
            tile_best = tl.max(xm, 1)
            tile_i = tl.argmax(xm, 1) + start
            better = tile_best > best
            best = tl.where(better, tile_best, best)
            best_i = tl.where(better, tile_i, best_i)
            t = tl.load(thr + cols, mask=in_cols, other=float("inf"))
            hit = hit | tl.max((xm > t[None, :]).to(tl.int32), 1)
        tl.store(row_val + rows, best, mask=in_rows)
        tl.store(row_idx + rows, tl.where(use, best_i, -1), mask=in_rows)
        tl.store(row_hit + rows, hit, mask=in_rows)


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


class CudaBatch:
    """Reduced per-batch results (torch tensors on the device)."""

    def __init__(self, X: torch.Tensor, counted: torch.Tensor, thr: torch.Tensor):
        R, N = X.shape
        X = X if X.stride(1) == 1 else X.contiguous()
        thr = thr.contiguous().float()
        programs = triton.cdiv(R, BLOCK_R)
        dev = X.device
        psum = torch.empty(programs, N, device=dev)
        psq, pmin, pmax = torch.empty_like(psum), torch.empty_like(psum), torch.empty_like(psum)
        self.row_val = torch.empty(R, device=dev)
        self.row_idx = torch.empty(R, dtype=torch.int32, device=dev)
        self.row_hit = torch.empty(R, dtype=torch.int32, device=dev)
        _kernel[(programs,)](X, counted, thr, psum, psq, pmin, pmax, self.row_val, self.row_idx,
                             self.row_hit, R, N, X.stride(0), BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N,
                             num_warps=NUM_WARPS)
        self.sum = psum.sum(0, dtype=torch.float64)
        self.sumsq = psq.sum(0, dtype=torch.float64)
        self.min = pmin.amin(0)
        self.max = pmax.amax(0)


def run(X: torch.Tensor, counted: torch.Tensor, thr: torch.Tensor) -> CudaBatch:
    """Run the kernel over `X` (R, N) for rows with `counted` (R,) uint8 set; `thr` (N,) float32."""
    return CudaBatch(X, counted, thr)
