"""Collectors: one batched pass over the data computing streaming per-neuron statistics on the device.

Hooks sit on the requested sites only; each batch's activations are reduced on the spot (moments,
TX-Ray max-1 credits, top-k examples, per-label sums) and dropped, so memory does not grow with
the number of tokens. A dense word-level matrix is written only when asked for.
"""
from __future__ import annotations

import contextlib
import logging
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed, fused, fused_cuda
from .batching import ALIGNMENTS, Batch, Encoded, encode, make_batch, plan_batches
from .hooks import site_hooks
from .models import LoadedModel
from .sites import NeuronIndex, Site
from .stats import STAT_NAMES, LabelSums, Max1, Moments, TopK

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectConfig:
    """What to collect and how to batch.

    Attributes:
        sites: the sites to hook.
        stats: any of `moments`, `max1`, `topk`, `labels`.
        max_tokens: padded tokens per batch (the batch budget).
        max_batch: examples per batch at most.
        max_length: truncation length in tokens.
        topk: examples kept per neuron for `topk`.
        alignment: word <- subword alignment for word labels and dense word matrices.
        include_special: count special tokens ([CLS], [SEP], ...) in the statistics.
        dense_words: also write a float16 word-level activation matrix per site.
        fused: compute the statistics in one pass over the activations: the numba kernel on CPU,
            the Triton kernel on CUDA (same results as the plain torch reductions used when this is
            False or no kernel is available).
    """

    sites: tuple[Site, ...]
    stats: tuple[str, ...] = STAT_NAMES
    max_tokens: int = 4096
    max_batch: int = 2048
    max_length: int = 256
    topk: int = 10
    alignment: str = "last"
    include_special: bool = False
    dense_words: bool = False
    fused: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.stats) - set(STAT_NAMES))
        if unknown:
            raise ValueError(f"unknown statistics {unknown}; choose from {STAT_NAMES}")
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"unknown alignment {self.alignment!r}; use one of {ALIGNMENTS}")
        if not self.sites:
            raise ValueError("no sites to collect; pass e.g. sites=model.sites('ffn')")
        object.__setattr__(self, "sites", tuple(sorted(self.sites)))

    def record(self) -> dict:
        out = asdict(self)
        out["sites"] = [str(s) for s in self.sites]
        return out


@dataclass
class SiteStats:
    """The statistics of one site (each None unless requested)."""

    moments: Moments | None = None
    max1: Max1 | None = None
    topk: TopK | None = None
    labels: LabelSums | None = None

    def merge(self, other: "SiteStats") -> "SiteStats":
        for name in STAT_NAMES:
            mine, theirs = getattr(self, name), getattr(other, name)
            if (mine is None) != (theirs is None):
                raise ValueError(f"cannot merge: statistic {name!r} is in one shard only")
            if mine is not None:
                setattr(self, name, mine.merge(theirs))
        return self


@dataclass
class Collection:
    """The result of a collection run: per-site statistics plus what was seen."""

    index: NeuronIndex
    sites: dict[Site, SiteStats]
    n_tokens: int = 0
    n_examples: int = 0
    label_names: tuple[str, ...] | None = None
    dense_words: dict[Site, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __getitem__(self, site: Site) -> SiteStats:
        return self.sites[site]

    def merge(self, other: "Collection") -> "Collection":
        """Combine two shards of the same configuration (associative)."""
        if self.index != other.index:
            raise ValueError("cannot merge collections over different sites")
        for site in self.sites:
            self.sites[site].merge(other.sites[site])
        self.n_tokens += other.n_tokens
        self.n_examples += other.n_examples
        return self


def _num_labels(enc: Encoded, label_names) -> int:
    if label_names:
        return len(label_names)
    if enc.word_labels is not None:
        return 1 + max((max(w, default=-1) for w in enc.word_labels), default=-1)
    if enc.labels is not None:
        return 1 + max(enc.labels, default=-1)
    return 0


class _SiteCollector:
    """Updates one site's statistics from each batch's activations."""

    def __init__(self, width: int, cfg: CollectConfig, num_labels: int, device: torch.device):
        self.stats = SiteStats(
            moments=Moments(width, device) if "moments" in cfg.stats else None,
            max1=Max1(width, device) if "max1" in cfg.stats else None,
            topk=TopK(width, cfg.topk, device) if "topk" in cfg.stats else None,
            labels=LabelSums(width, num_labels, device) if "labels" in cfg.stats and num_labels else None)
        self.batch: Batch | None = None
        self.dense: np.ndarray | None = None
        self.use_fused = cfg.fused
        self.chunks = 4 * torch.get_num_threads()
        self.device = device
        self.cuda: fused_cuda.SiteUpdater | None = None

    def __call__(self, acts_BTN: torch.Tensor) -> None:
        batch, st = self.batch, self.stats
        # (R, N) in the model's dtype (bf16 under CUDA autocast): every reduction below accumulates
        # in float32 or better without first materialising a float32 copy. A model dispatched over
        # devices runs this layer where it sits; the statistics stay on the model's input device.
        acts = acts_BTN.detach().reshape(-1, acts_BTN.shape[-1]).to(self.device)
        if self.use_fused and fused_cuda.available(acts.device):
            if self.cuda is None:
                self.cuda = fused_cuda.SiteUpdater(st, acts.device)
            self.cuda(acts, batch.view)  # per-label sums included
        else:
            if st.labels is not None:
                view = batch.view
                st.labels.update(_label_sums(view, acts), view.label_weight.sum(1))
            if acts.device.type == "cpu" and fused.available() and self.use_fused:
                self._update_fused(acts.float(), batch.view)
            else:
                self._update_torch(acts, batch.view)
        if self.dense is not None:
            self._write_dense(acts, batch)

    def finish(self) -> None:
        """Complete the updates still pending (the CUDA collector merges top-k one batch late)."""
        if self.cuda is not None:
            self.cuda.finish()

    def _update_torch(self, acts: torch.Tensor, view) -> None:
        st = self.stats
        if st.max1 is not None:
            st.max1.update(acts, view)
        if st.topk is not None:
            st.topk.update(acts, view)
        if st.moments is not None:
            # With top-k on, each neuron's running max is its top-1: no extra pass for it.
            running_max = st.topk.values[:, 0] if st.topk is not None else None
            st.moments.update(acts, view, running_max)

    def _update_fused(self, acts: torch.Tensor, view) -> None:
        st = self.stats
        topk_on = st.topk is not None and st.topk.warm
        thr = st.topk.threshold.numpy() if topk_on else self._no_threshold(acts.shape[1])
        out = fused.run(acts.contiguous().numpy(), view.counted_np, thr, self.chunks)
        if st.moments is not None:
            m = int(view.rows.numel())
            total, sq = out.sum.sum(0), out.sumsq.sum(0)
            mean = total / max(m, 1)
            st.moments.add(m, torch.from_numpy(mean), torch.from_numpy(sq - total * mean),
                           torch.from_numpy(out.min.min(0)), torch.from_numpy(out.max.max(0)))
        if st.max1 is not None:
            st.max1.add(torch.from_numpy(out.row_idx), torch.from_numpy(out.row_val), view)
        if st.topk is not None:
            if not topk_on or out.overflow:
                st.topk.update(acts, view)
            else:
                rows, cols, vals = (torch.from_numpy(a) for a in out.candidates())
                st.topk.add_candidates(rows, cols, vals, view)

    def _no_threshold(self, n: int) -> np.ndarray:
        return np.full(n, np.inf, dtype=np.float32)

    def _write_dense(self, acts: torch.Tensor, batch: Batch) -> None:
        words, inverse = torch.unique(batch.word_index, return_inverse=True)
        rep = torch.zeros(words.numel(), acts.shape[1], device=acts.device)
        rep.index_add_(0, inverse, acts.index_select(0, batch.word_rows).float() * batch.word_row_weight[:, None])
        self.dense[words.cpu().numpy()] = rep.cpu().numpy().astype(np.float16)


def _label_sums(view, acts: torch.Tensor) -> torch.Tensor:
    """(L, N) float32 per-label sums, one GEMM; bf16 activations stay bf16 when the weights are 0/1."""
    weight = view.label_weight
    if acts.dtype == torch.float32:
        return weight @ acts
    if view.label_binary:
        try:  # bf16 x bf16 -> fp32 output (exact 0/1 weights, fp32 accumulation)
            return torch.mm(weight.to(acts.dtype), acts, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return weight @ acts.float()


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_batches(model: LoadedModel, enc: Encoded, cfg: CollectConfig, on_batch, num_labels: int = 0,
                word_offsets: list[int] | None = None, progress: bool = True, desc: str = "collect",
                batches: list[list[int]] | None = None) -> int:
    """Forward every batch of `enc` through the model, calling `on_batch(batch)` before each pass.

    Only the base model runs: every site lies in its blocks, and a language model's head (a
    vocabulary-wide matrix product, most of a small LM's forward) computes nothing a hook reads.
    `batches` (example indices per batch) defaults to `plan_batches` over all of `enc`.
    Returns the number of real (non-pad) tokens processed.
    """
    device = model.device
    net = model.model.base_model
    if batches is None:
        batches = plan_batches([len(x) for x in enc.input_ids], cfg.max_tokens, cfg.max_batch)
    total = sum(len(enc.input_ids[i]) for b in batches for i in b)
    pad_id = model.tokenizer.pad_token_id
    seen = 0
    with torch.inference_mode(), _autocast(device), \
            tqdm(total=total, unit="tok", desc=desc, disable=not progress, leave=False) as bar:
        for indices in batches:
            batch = make_batch(enc, indices, pad_id, cfg.alignment, num_labels, word_offsets, device)
            on_batch(batch)
            net(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            seen += batch.n_tokens
            bar.update(batch.n_tokens)
    return seen


def collect(model: LoadedModel, dataset, cfg: CollectConfig, label_names: tuple[str, ...] | None = None,
            dense_dir: Path | None = None, progress: bool = True) -> Collection:
    """Collect streaming statistics of `cfg.sites` over `dataset`.

    Args:
        model: the loaded model.
        dataset: a `datasets.Dataset` with `text` or `words`, optionally `id`, `label`, `word_labels`.
        cfg: what to collect.
        label_names: names of the label ids (for `labels`); inferred as a count when None.
        dense_dir: folder for the dense word matrices (`cfg.dense_words`); one `.npy` per site.
        progress: show a progress bar.

    Returns:
        The per-site statistics.
    """
    for site in cfg.sites:
        model.sites(str(site))  # raises on a site outside the model
    max_length = min(cfg.max_length, model.max_length)
    enc = encode(model.tokenizer, dataset, max_length, cfg.include_special,
                 with_words=None if not cfg.dense_words else True)
    if enc.truncated:
        log.warning("%d examples were truncated to %d tokens", enc.truncated, max_length)
    return collect_encoded(model, enc, cfg, label_names, dense_dir, progress)


def collect_encoded(model: LoadedModel, enc: Encoded, cfg: CollectConfig,
                    label_names: tuple[str, ...] | None = None, dense_dir: Path | None = None,
                    progress: bool = True) -> Collection:
    """`collect` on already tokenised examples (see `batching.encode`).

    Inside `distributed.collective`, each rank forwards its share of the length-sorted batches and
    the statistics are reduced across ranks (every rank returns the whole collection; the dense
    word matrices, in a folder every rank sees, get each rank's rows).
    """
    ranks = distributed.active()
    num_labels = _num_labels(enc, label_names) if "labels" in cfg.stats else 0
    index = NeuronIndex.build({s: model.width(s) for s in cfg.sites})
    collectors = {s: _SiteCollector(index.width(s), cfg, num_labels, model.device) for s in cfg.sites}
    word_offsets = None
    if cfg.dense_words:
        word_offsets = _open_dense(collectors, index, enc, dense_dir, ranks)
    batches = plan_batches([len(x) for x in enc.input_ids], cfg.max_tokens, cfg.max_batch)
    if ranks is not None:
        batches = ranks.share(batches)

    def on_batch(batch: Batch) -> None:
        for c in collectors.values():
            c.batch = batch

    start = time.perf_counter()
    with site_hooks(model.model, dict(collectors)):
        n_tokens = run_batches(model, enc, cfg, on_batch, num_labels, word_offsets, progress, batches=batches)
    for c in collectors.values():
        c.finish()
    dense = {}
    for site, c in collectors.items():
        if c.dense is not None:
            c.dense.flush()
            dense[site] = c.dense
    col = Collection(index, {s: c.stats for s, c in collectors.items()}, n_tokens, len(enc), label_names,
                     dense, meta={"truncated": enc.truncated})
    if ranks is not None:
        _reduce_across(col, ranks, sum(len(b) for b in batches), time.perf_counter() - start)
    return col


def _reduce_across(col: Collection, ranks: distributed.Ranks, examples: int, seconds: float) -> None:
    """Reduce a rank's share into the whole collection, in place, and record in `col.meta` each
    rank's examples, tokens, seconds collecting and reducing (waiting for the others included)
    and peak RSS."""
    share = {"rank": ranks.rank, "examples": examples, "tokens": col.n_tokens, "collect_s": round(seconds, 4),
             "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    start = time.perf_counter()
    distributed.reduce_stats([col.sites[s] for s in col.index.sites])
    share["reduce_s"] = round(time.perf_counter() - start, 4)
    shares = distributed.gather_objects(share)
    col.n_tokens = sum(x["tokens"] for x in shares)
    col.meta["distributed"] = {"world_size": ranks.world_size, "backend": torch.distributed.get_backend(),
                               "ranks": shares}


def _open_dense(collectors: dict[Site, _SiteCollector], index: NeuronIndex, enc: Encoded,
                dense_dir: Path | None, ranks: distributed.Ranks | None) -> list[int]:
    """Create the float16 word matrices (one `.npy` per site) and return each example's first word
    row. With ranks, rank 0 creates the files and the others open them to write their own rows."""
    if dense_dir is None:
        raise ValueError("dense_words=True needs dense_dir, the folder to write the matrices to")
    word_offsets = np.concatenate([[0], np.cumsum(enc.n_words)[:-1]]).tolist()
    total = int(sum(enc.n_words))
    creator = ranks is None or ranks.is_main
    if creator:
        Path(dense_dir).mkdir(parents=True, exist_ok=True)
        for site, c in collectors.items():
            c.dense = np.lib.format.open_memmap(Path(dense_dir) / f"{site}.npy", mode="w+",
                                                dtype=np.float16, shape=(total, index.width(site)))
            c.dense.flush()
    if ranks is not None:
        distributed.barrier()
    if not creator:
        for site, c in collectors.items():
            c.dense = np.load(Path(dense_dir) / f"{site}.npy", mmap_mode="r+")
    return word_offsets
