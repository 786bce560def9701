"""The GPU collector (Triton): one read of each batch's activations for every statistic, on the device.

`triton_kernels.collect_tiles` runs a 2-D grid over (row groups x column blocks): each program keeps
its columns' count, mean and M2 (Chan's merge per row block), min, max and per-label sums, and writes
per-row max partials and per-tile top-k candidates. Partials are merged on the device in float64
(Chan's merge again across row groups); `row_argmax` is the max-1 row pass over the per-row partials.
Activations stay in their dtype (bf16 under autocast); no float32 copy is made.

With `overlapped(True)` on CUDA the statistics run on a side stream, so batch i's statistics overlap
batch i+1's forward. Top-k candidates are merged one batch late in both modes. Written and checked without a
GPU (the kernels under `TRITON_INTERPRET=1` on CPU tensors); the side stream is untested on hardware.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from types import ModuleType

import torch

try:
    import triton
except ImportError:  # no Triton (CPU-only installs): the torch reductions are used instead
    triton = None

BLOCK_R, BLOCK_N, ROW_BLOCK, NUM_WARPS = 64, 128, 256, 4
_OVERLAP = {"on": False}
_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> bool:
    """Triton is installed and `device` is CUDA, or CPU under `TRITON_INTERPRET=1` (for tests)."""
    return triton is not None and (device.type == "cuda" or (device.type == "cpu" and interpreting()))


def _kernels() -> ModuleType:
    """The kernel module, imported on first use (it needs Triton). Triton's interpreter works only
    when `TRITON_INTERPRET=1` is set before Triton is imported: a process is one or the other."""
    from . import triton_kernels

    return triton_kernels


def _groups(row_blocks: int, col_blocks: int, device: torch.device, per_group_cells: int) -> int:
    """Row groups: enough programs to fill the device (4 per SM), bounded so the per-group label
    partials stay small."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    want = max(1, (4 * sms) // col_blocks)
    return max(1, min(row_blocks, want, max(1, (1 << 22) // max(per_group_cells, 1))))


class TileBatch:
    """One batch through the kernels; every result a tensor on the activations' device.

    Attributes:
        mean, m2: (N,) float64 over the counted rows. min, max: (N,) float32.
        labels: (L, N) float64 per-label sums, or None. row_val, row_idx: (R,) each row's max and
            first arg-max (defined on counted rows).
    """

    def __init__(self, X: torch.Tensor, weight: torch.Tensor, thr: torch.Tensor | None,
                 label_weight: torch.Tensor | None = None, label_binary: bool = True, k: int = 0):
        X = X if X.stride(1) == 1 else X.contiguous()
        R, N = X.shape
        dev, kern = X.device, _kernels()
        L = 0 if label_weight is None else label_weight.shape[0]
        l_pad = max(16, triton.next_power_of_2(max(L, 1)))
        cb, rb = triton.cdiv(N, BLOCK_N), triton.cdiv(R, BLOCK_R)
        G = _groups(rb, cb, dev, l_pad * N if L else N)
        steps = triton.cdiv(rb, G)
        f32 = dict(device=dev, dtype=torch.float32)
        p_n, parts = torch.empty(G, **f32), [torch.empty(G, N, **f32) for _ in range(4)]
        p_lab = torch.empty(G, l_pad, N, **f32) if L else p_n
        r_val, r_idx = torch.empty(cb, R, **f32), torch.empty(cb, R, dtype=torch.int32, device=dev)
        self.cap = _capacity(N, k)
        self._cand = (torch.empty(self.cap, dtype=torch.int32, device=dev),
                      torch.empty(self.cap, dtype=torch.int32, device=dev), torch.empty(self.cap, **f32))
        self._count = torch.zeros(1, dtype=torch.int32, device=dev)
        thr = torch.full((N,), float("inf"), **f32) if thr is None else thr.float().contiguous()
        lw = label_weight.float().contiguous() if L else weight
        kern.collect_tiles[(G, cb)](
            X, weight, thr, lw, p_n, *parts, p_lab, r_val, r_idx, *self._cand, self._count,
            R, N, L, X.stride(0), lw.stride(0) if L else 0, self.cap, steps, BLOCK_R=BLOCK_R,
            BLOCK_N=BLOCK_N, L_PAD=l_pad, K=k, LABELS=bool(L),
            LOWP_DOT=_lowp_dot(X, label_binary), **_warps(dev))
        self.row_val = torch.empty(R, **f32)
        self.row_idx = torch.empty(R, dtype=torch.int32, device=dev)
        kern.row_argmax[(triton.cdiv(R, ROW_BLOCK),)](r_val, r_idx, self.row_val, self.row_idx, R, cb,
                                                       BLOCK=ROW_BLOCK)
        self.mean, self.m2 = chan_merge(p_n, parts[0], parts[1])
        self.min, self.max = parts[2].amin(0), parts[3].amax(0)
        self.labels = p_lab.sum(0, dtype=torch.float64)[:L] if L else None
        self._host_count = _to_host(self._count)

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(row, neuron, value) of the per-tile top-k entries above threshold, or None when they
        overflowed the buffer (then the caller filters the batch itself). Waits for the kernel."""
        count, event = self._host_count
        if event is not None:
            event.synchronize()
        n = int(count[0])
        if n > self.cap:
            return None
        rows, cols, vals = (t[:n] for t in self._cand)
        return rows.long(), cols.long(), vals


def _capacity(N: int, k: int) -> int:
    """Candidate buffer entries: after the first batch few entries beat the thresholds; a batch
    with more falls back to filtering with torch."""
    return max(1 << 16, 16 * N * k) if k else 1


def _lowp_dot(X: torch.Tensor, label_binary: bool) -> bool:
    """Label sums as a bf16/fp16 dot with float32 accumulation: exact for 0/1 weights. Not under the
    interpreter: Triton 3.9's interpreter returns garbage for a bf16 `tl.dot` (measured), so there
    the float32 dot runs and only the GPU exercises this branch."""
    return label_binary and X.dtype in (torch.bfloat16, torch.float16) and not interpreting()


def _warps(device: torch.device) -> dict:
    return {} if device.type != "cuda" else {"num_warps": NUM_WARPS}


def _to_host(count: torch.Tensor):
    """Start copying the candidate count to the host without waiting (pinned memory and an event on
    CUDA), so reading it later waits for this batch only."""
    if count.device.type != "cuda":
        return count, None
    host = torch.empty(1, dtype=count.dtype, pin_memory=True)
    host.copy_(count, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def chan_merge(n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-group counts (G,), means and M2 (G, N) into one float64 mean and M2 (Chan et al.'s
    pairwise formula, written for G parts at once)."""
    n, mean, m2 = n.double()[:, None], mean.double(), m2.double()
    total = n.sum(0).clamp_min(1)
    merged = (n * mean).sum(0) / total
    return merged, m2.sum(0) + (n * (mean - merged) ** 2).sum(0)


def run(X: torch.Tensor, counted: torch.Tensor, thr: torch.Tensor | None, label_weight: torch.Tensor | None = None,
        label_binary: bool = True, k: int = 0) -> TileBatch:
    """Run the kernels over `X` (R, N) for the rows where `counted` (R,) is non-zero.

    Args:
        thr: (N,) top-k entry thresholds; with `k` > 0, up to k entries per column and row block
            above them become candidates.
        label_weight: (L, R) per-label row weights for per-label sums (0/1 when `label_binary`).
    """
    return TileBatch(X, counted, thr, label_weight, label_binary, k)


@contextmanager
def overlapped(on: bool = True):
    """Inside the block, collectors created on CUDA run their statistics on a side stream."""
    before = _OVERLAP["on"]
    _OVERLAP["on"] = on
    try:
        yield
    finally:
        _OVERLAP["on"] = before


def _side_stream(device: torch.device):
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


@contextmanager
def _on_stream(stream, tensors=()):
    """Enqueue the block's work on `stream` (None: the current one) after the current stream's work
    so far; `tensors` made on the current stream are marked in use by `stream` for the allocator."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            t.record_stream(stream)
    with torch.cuda.stream(stream):
        yield


class SiteUpdater:
    """Updates one site's statistics (`collect.SiteStats`) from each batch with the kernels.

    Top-k candidates are merged when the next batch arrives, or at `finish`: reading their count
    then waits for the previous batch's kernel (long done), not for the model queued since, so the
    host stays ahead of the device. The batch's activations are held until then (for the rare
    candidate overflow), one batch's worth per site.
    """

    def __init__(self, stats, device: torch.device):
        self.stats = stats
        self.warm = False
        self.pending = None
        self.stream = _side_stream(device) if _OVERLAP["on"] and device.type == "cuda" else None

    def __call__(self, acts: torch.Tensor, view) -> None:
        with _on_stream(self.stream, (acts, *vars(view).values())):
            self._flush()
            self._launch(acts, view)

    def finish(self) -> None:
        """Merge what is pending; afterwards the current stream sees every update."""
        with _on_stream(self.stream):
            self._flush()
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)

    def _launch(self, acts: torch.Tensor, view) -> None:
        st, skip, thr = self.stats, 0, None
        if st.topk is not None:
            self.warm = self.warm or st.topk.warm  # monotone: skip the device sync once warm
            skip = 0 if self.warm else st.topk.warm_up(acts, view)
            thr = st.topk.threshold.contiguous()
        out = run(acts, view.weight, thr, view.label_weight if st.labels is not None else None,
                  view.label_binary, st.topk.k if st.topk is not None else 0)
        m = int(view.rows.numel())
        if st.moments is not None and m:
            st.moments.add(m, out.mean, out.m2, out.min, out.max)
        if st.labels is not None:
            st.labels.update(out.labels, view.label_weight.sum(1))
        if st.max1 is not None:
            st.max1.add(out.row_idx.long(), out.row_val, view)
        if st.topk is not None:
            self.pending = (out, view, skip, acts, thr)

    def _flush(self) -> None:
        if self.pending is None:
            return
        out, view, skip, acts, thr = self.pending
        self.pending = None
        found = out.candidates()
        if found is None:  # more candidates than the buffer holds: filter the batch with torch
            cand = (acts > thr).nonzero()
            found = cand[:, 0], cand[:, 1], acts[cand[:, 0], cand[:, 1]]
        self.stats.topk.add_candidates(*found, view, skip)
