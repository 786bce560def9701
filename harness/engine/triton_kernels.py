"""The Triton collector kernels (device code only; `fused_cuda` launches them and merges their output).

Imported by `fused_cuda` only where Triton is installed. Under `TRITON_INTERPRET=1` (set before
Triton is imported) they run on CPU tensors in Triton's interpreter.
"""
import triton
import triton.language as tl



@triton.jit
def _chan(n, mean, m2, x, m2d, c):
    """Merge the tile's counted values `x` (BLOCK_R, BLOCK_N), `c` of them per column, into the running
    count `n`, mean and M2 (Chan et al.): the tile's own mean and M2 are exact two-pass values."""
    xs = tl.where(m2d, x, 0.0)
    tmean = tl.sum(xs, 0) / tl.maximum(c, 1.0)
    d = tl.where(m2d, x - tmean[None, :], 0.0)
    tm2 = tl.sum(d * d, 0)
    total = n + c
    frac = c / tl.maximum(total, 1.0)
    delta = tmean - mean
    return total, mean + delta * frac, m2 + tm2 + delta * delta * n * frac


@triton.jit
def _tile_topk(xm, thr, row0, cols, c_row, c_col, c_val, c_n, cap, K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Offer each column's (up to) K largest counted values of the tile that beat its threshold:
    appended to the candidate buffers at an atomically reserved offset (dropped past `cap`; the
    counter still counts them, so the host sees the overflow)."""
    cand = tl.where(xm > thr[None, :], xm, float("-inf"))
    best = tl.max(cand, 0)
    local = tl.arange(0, BLOCK_R)
    j = 0
    more = tl.max(best, 0) > float("-inf")
    while more:
        r = tl.argmax(cand, 0)
        valid = (best > float("-inf")).to(tl.int32)
        base = tl.atomic_add(c_n, tl.sum(valid, 0))
        off = base + tl.cumsum(valid, 0) - valid
        ok = (valid != 0) & (off < cap)
        tl.store(c_row + off, row0 + r, mask=ok)
        tl.store(c_col + off, cols, mask=ok)
        tl.store(c_val + off, best, mask=ok)
        cand = tl.where(local[:, None] == r[None, :], float("-inf"), cand)
        best = tl.max(cand, 0)
        j += 1
        more = (j < K) & (tl.max(best, 0) > float("-inf"))


@triton.jit
def _tile_labels(lab, LW, stride_lw, L, rows, in_rows, xr, x, L_PAD: tl.constexpr, LOWP_DOT: tl.constexpr):
    """Add the tile's per-label sums (label weights (L, rows) @ activations) to `lab` (L_PAD, BLOCK_N),
    accumulating in float32: bf16 x bf16 where the weights are 0/1 (exact), float32 otherwise."""
    labs = tl.arange(0, L_PAD)
    lw = tl.load(LW + labs[:, None] * stride_lw + rows[None, :], mask=(labs < L)[:, None] & in_rows[None, :],
                 other=0.0)
    if LOWP_DOT:
        return lab + tl.dot(lw.to(xr.dtype), xr)
    return lab + tl.dot(lw, x, input_precision="ieee")


@triton.jit
def collect_tiles(X, W, thr, LW, p_n, p_mean, p_m2, p_min, p_max, p_lab, r_val, r_idx,
                  c_row, c_col, c_val, c_n, R, N, L, stride_x, stride_lw, cap, steps,
                  BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, L_PAD: tl.constexpr, K: tl.constexpr,
                  LABELS: tl.constexpr, LOWP_DOT: tl.constexpr):
    """One program per (row group, column block): walks the group's `steps` row blocks once, keeping
    the moments, min, max and label sums of its columns, and writing per-row max partials and top-k
    candidates. Activations are read in their own dtype and widened in registers only."""
    g, cb = tl.program_id(0), tl.program_id(1)
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = cols < N
    t = tl.load(thr + cols, mask=in_cols, other=float("inf"))
    n = tl.sum(tl.zeros((BLOCK_R,), tl.float32), 0)
    mean = tl.zeros((BLOCK_N,), tl.float32)
    m2 = tl.zeros((BLOCK_N,), tl.float32)
    mn = tl.full((BLOCK_N,), float("inf"), tl.float32)
    mx = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    lab = tl.zeros((L_PAD, BLOCK_N), tl.float32)
    for step in range(steps):
        row0 = (g * steps + step) * BLOCK_R
        rows = row0 + tl.arange(0, BLOCK_R)
        in_rows = rows < R
        use = (tl.load(W + rows, mask=in_rows, other=0.0) != 0) & in_rows
        m2d = use[:, None] & in_cols[None, :]
        xr = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=in_rows[:, None] & in_cols[None, :],
                     other=0.0)
        x = xr.to(tl.float32)
        n, mean, m2 = _chan(n, mean, m2, x, m2d, tl.sum(use.to(tl.float32), 0))
        mn = tl.minimum(mn, tl.min(tl.where(m2d, x, float("inf")), 0))
        xm = tl.where(m2d, x, float("-inf"))
        mx = tl.maximum(mx, tl.max(xm, 0))
        tl.store(r_val + cb * R + rows, tl.max(xm, 1), mask=in_rows)
        tl.store(r_idx + cb * R + rows, tl.argmax(xm, 1) + cb * BLOCK_N, mask=in_rows)
        if LABELS:
            lab = _tile_labels(lab, LW, stride_lw, L, rows, in_rows, xr, x, L_PAD, LOWP_DOT)
        if K > 0:
            _tile_topk(xm, t, row0, cols, c_row, c_col, c_val, c_n, cap, K, BLOCK_R)
    out = g * N + cols
    tl.store(p_n + g, n)
    tl.store(p_mean + out, mean, mask=in_cols)
    tl.store(p_m2 + out, m2, mask=in_cols)
    tl.store(p_min + out, mn, mask=in_cols)
    tl.store(p_max + out, mx, mask=in_cols)
    if LABELS:
        labs = tl.arange(0, L_PAD)
        tl.store(p_lab + (g * L_PAD + labs[:, None]) * N + cols[None, :], lab, mask=in_cols[None, :])


@triton.jit
def row_argmax(r_val, r_idx, row_val, row_idx, R, CB, BLOCK: tl.constexpr):
    """The max-1 row pass: each row's max and first arg-max over the column blocks' partials."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_rows = rows < R
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_i = tl.full((BLOCK,), -1, tl.int32)
    for cb in range(CB):
        v = tl.load(r_val + cb * R + rows, mask=in_rows, other=float("-inf"))
        i = tl.load(r_idx + cb * R + rows, mask=in_rows, other=-1)
        better = (v > best) | (best_i < 0)
        best = tl.where(better, v, best)
        best_i = tl.where(better, i, best_i)
    tl.store(row_val + rows, best, mask=in_rows)
    tl.store(row_idx + rows, best_i, mask=in_rows)
