"""Data parallelism on torch.distributed: which share of the work a rank does, and the reductions that
turn the ranks' shares into one result. Launched by `torchrun` or `accelerate launch` (gloo on CPU,
NCCL on CUDA); a plain process has no group and nothing here changes what it computes.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from .stats import Max1, TopK

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
PARALLEL_MODES = ("items", "data")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launched group."""

    rank: int
    world_size: int
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every world_size-th from its rank on. Over length-sorted batches the
        ranks get batches of alternating sizes, so their shares of tokens differ by about one batch."""
        return list(items[self.rank::self.world_size])


class RankFailure(RuntimeError):
    """One or more ranks failed; the message names each rank, what it was doing and the error."""


def launched() -> bool:
    """True under a launcher that started more than one process (`WORLD_SIZE` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(backend: str | None = None) -> Ranks | None:
    """Join the launcher's process group (once per process); None in a plain process.

    Args:
        backend: `gloo` or `nccl`; default NCCL when CUDA is present (each rank on its
            `LOCAL_RANK` GPU), else gloo.
    """
    if not dist.is_initialized():
        if not launched():
            return None
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return current()


def close() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def current() -> Ranks | None:
    """The initialised group with more than one rank, or None."""
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


_collective: Ranks | None = None


@contextmanager
def collective(ranks: Ranks | None) -> Iterator[None]:
    """Inside the block every rank runs the same code and the engine splits its data: collection and
    multi-mask evaluation work on this rank's share of the batches and reduce across ranks. With
    `ranks` None (a plain process) the block runs as usual."""
    global _collective
    outer, _collective = _collective, ranks
    try:
        yield
    finally:
        _collective = outer


def active() -> Ranks | None:
    """The ranks sharing the current computation (inside `collective`), or None."""
    return _collective


def _device(tensor: torch.Tensor) -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_reduce(parts: list[torch.Tensor], op) -> list[torch.Tensor]:
    """All-reduce several tensors as one flat buffer (one collective call)."""
    if not parts:
        return []
    dtype, device = parts[0].dtype, parts[0].device
    flat = torch.cat([p.reshape(-1).to(dtype) for p in parts]).to(_device(parts[0]))
    dist.all_reduce(flat, op=op)
    out, start = [], 0
    for p in parts:
        out.append(flat[start:start + p.numel()].view_as(p).to(device))
        start += p.numel()
    return out


def reduce_stats(stats: list) -> None:
    """Reduce each site's statistics (`collect.SiteStats`, in the same site order on every rank)
    across ranks, in place; afterwards every rank holds the statistics of all ranks' data.

    Moments use Chan et al.'s merge for many parts in two all-reduces (sum of n_i * mean_i gives
    the mean, then the sum of M2_i + n_i * (mean_i - mean)^2), min and max all-reduce MIN/MAX,
    label sums all-reduce SUM; the top-k tables are all-gathered and merged, the variable-size
    max-1 tables gathered as objects and merged, in rank order on every rank (the same result).
    """
    moments = [s.moments for s in stats if s.moments is not None]
    labels = [s.labels for s in stats if s.labels is not None]
    if moments:
        counts = _all_reduce([torch.tensor([float(m.count)], dtype=torch.float64) for m in moments], dist.ReduceOp.SUM)
        sums = _all_reduce([m._mean * m.count for m in moments], dist.ReduceOp.SUM)
        means = [s / max(float(c), 1.0) for s, c in zip(sums, counts)]
        m2 = _all_reduce([m.m2 + m.count * (m._mean - mu) ** 2 for m, mu in zip(moments, means)], dist.ReduceOp.SUM)
        mins = _all_reduce([m.min for m in moments], dist.ReduceOp.MIN)
        maxs = _all_reduce([m.max for m in moments], dist.ReduceOp.MAX)
        for m, c, mu, q, lo, hi in zip(moments, counts, means, m2, mins, maxs):
            m.count, m._mean, m.m2, m.min, m.max = int(c), mu, q, lo, hi
    if labels:
        summed = _all_reduce([t for ls in labels for t in (ls.sums, ls.counts)], dist.ReduceOp.SUM)
        for i, ls in enumerate(labels):
            ls.sums, ls.counts = summed[2 * i], summed[2 * i + 1]
    for s in stats:
        if s.topk is not None:
            s.topk = _merge_topk(s.topk)
    tables = gather_objects([{k: v.cpu() for k, v in s.max1.table().items()} if s.max1 is not None else None
                             for s in stats])
    for i, s in enumerate(stats):
        if s.max1 is not None:
            merged = Max1(s.max1.n, s.max1.device)
            for rank_tables in tables:
                merged.merge(Max1.from_state(rank_tables[i], torch.device("cpu"), s.max1.n))
            s.max1 = Max1.from_state(merged.table(), s.max1.device, s.max1.n)


def _merge_topk(topk: TopK) -> TopK:
    world = dist.get_world_size()
    gathered = {}
    for name, tensor in topk.state().items():
        local = tensor.contiguous().to(_device(tensor))
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        gathered[name] = [p.to(tensor.device) for p in parts]
    device = topk.values.device
    out = TopK.from_state({k: v[0] for k, v in gathered.items()}, device)
    for r in range(1, world):
        out.merge(TopK.from_state({k: v[r] for k, v in gathered.items()}, device))
    return out


def map_items(items: Sequence[T], fn: Callable[[T], R], label: Callable[[T], str],
              parallel: str = "items", prepare: Callable[[], None] | None = None,
              idle: Sequence[bool] | None = None) -> list[R]:
    """`[fn(item) for item in items]`, spread over the launched ranks; every rank gets every result.

    Args:
        items: the work, in the order results are returned.
        fn: runs one item.
        label: names an item in a failure message.
        parallel: `items`: each rank runs its share of the items (`Ranks.share`) and the results
            are gathered; `data`: every rank runs every item together, inside `collective`, so the
            engine splits each item's data across ranks. Ignored in a plain process.
        prepare: under a launcher, run on rank 0 alone before the ranks start (e.g. building
            models that two ranks must not build at once), followed by a barrier.
        idle: per item, True when it is known to do no work (`owners`: they are shared out last).

    Raises:
        RankFailure: on every rank, when any rank's item raised; it names the rank and the item.
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel={parallel!r}: use one of {PARALLEL_MODES}")
    ranks = current()
    if ranks is None:
        return [fn(item) for item in items]
    if ranks.is_main and prepare is not None:
        prepare()
    barrier()
    if parallel == "data":
        with collective(ranks):
            return [fn(item) for item in items]
    mine: dict[int, R] = {}
    failure = None
    with collective(None):  # the ranks run different items: nothing inside may wait for the others
        for i in (i for i, r in enumerate(owners(len(items), ranks, parallel, idle)) if r == ranks.rank):
            try:
                mine[i] = fn(items[i])
            except Exception as err:  # reported with its rank below; every rank must reach the gather
                log.error("rank %d failed on %s", ranks.rank, label(items[i]), exc_info=True)
                failure = (ranks.rank, label(items[i]), f"{type(err).__name__}: {err}")
                break
    gathered = gather_objects((mine, failure))
    failures = [f for _, f in gathered if f is not None]
    if failures:
        raise RankFailure("; ".join(f"rank {r} failed on {what}: {msg}" for r, what, msg in failures))
    results: dict[int, R] = {}
    for part, _ in gathered:
        results.update(part)
    return [results[i] for i in range(len(items))]


def owners(n_items: int, ranks: Ranks | None, parallel: str,
           idle: Sequence[bool] | None = None) -> list[int | None]:
    """Which rank runs each of `n_items` items under `map_items` (None: every rank, or a plain
    process): in turn, the items that work first, then those known to be idle (`idle[i]`: e.g. a
    method the task records as not applicable without running it), so that idle items do not
    count as a rank's turn: a fixed split, the same on every rank, known before anything runs."""
    if ranks is None or parallel == "data":
        return [None] * n_items
    idle = [False] * n_items if idle is None else list(idle)
    order = [i for i in range(n_items) if not idle[i]] + [i for i in range(n_items) if idle[i]]
    out: list[int | None] = [None] * n_items
    for turn, i in enumerate(order):
        out[i] = turn % ranks.world_size
    return out
