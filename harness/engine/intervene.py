"""Interventions: zero or mean ablation of neuron sets, and batched evaluation of many masks at once.

`ablate` is a scoped context for one set. `evaluate_masks` expands each batch once per mask (K
copies) and applies mask k to copy k inside a single forward pass, so a pruning sweep over many k
and seeds costs far fewer passes than one pass per mask.
"""
from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from . import distributed
from .batching import Batch, encode, make_batch, plan_batches
from .arch import layer_modules
from .collect import _autocast
from .hooks import site_hooks
from .models import LoadedModel
from .objective import gold_log_prob
from .sites import Site

ABLATION_MODES = ("zero", "mean")
log = logging.getLogger(__name__)


def fill_values(model: LoadedModel, sites, mode: str, means: dict[Site, torch.Tensor] | None) -> dict[Site, torch.Tensor]:
    """The value each ablated neuron is set to: 0, or its mean (e.g. train-split `Moments.mean`)."""
    if mode not in ABLATION_MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; use one of {ABLATION_MODES}")
    out = {}
    for site in sites:
        if mode == "zero":
            out[site] = torch.zeros(model.width(site), device=model.device)
        else:
            if not means or site not in means:
                raise ValueError(f"mean ablation needs the mean activation of every site; {site} has none "
                                 "(collect `moments` on the train split and pass their means)")
            out[site] = means[site].to(model.device).float()
    return out


def _as_mask(site_width: int, index: torch.Tensor, device) -> torch.Tensor:
    mask = torch.zeros(site_width, dtype=torch.bool, device=device)
    index = torch.as_tensor(index, dtype=torch.int64, device=device)
    if index.numel() and (index.min() < 0 or index.max() >= site_width):
        raise IndexError(f"neuron index out of range 0..{site_width - 1}: {index.tolist()[:10]}")
    mask[index] = True
    return mask


@contextmanager
def ablate(model: LoadedModel, neurons: dict[Site, torch.Tensor], mode: str = "zero",
           means: dict[Site, torch.Tensor] | None = None) -> Iterator[None]:
    """Inside the block, the given neurons output their fill value (0 or their mean) at every token.

    Args:
        model: the loaded model.
        neurons: per site, the local indices of the neurons to ablate.
        mode: `zero` or `mean`.
        means: per-site mean activations, for `mean`.
    """
    fills = fill_values(model, neurons, mode, means)
    masks = {s: _as_mask(model.width(s), idx, model.device) for s, idx in neurons.items()}

    def make(site: Site):
        def fn(acts: torch.Tensor) -> torch.Tensor:
            return torch.where(masks[site].to(acts.device), fills[site].to(acts.device, acts.dtype), acts)
        return fn

    with site_hooks(model.model, {s: make(s) for s in neurons}):
        yield


@dataclass
class MaskSet:
    """K masks over some sites: `masks[site]` is (K, N) bool, True = ablated in that mask."""

    masks: dict[Site, torch.Tensor]

    @property
    def k(self) -> int:
        return next(iter(self.masks.values())).shape[0]

    @classmethod
    def from_sets(cls, model: LoadedModel, sets: list[dict[Site, torch.Tensor]]) -> "MaskSet":
        """Build from a list of neuron sets (per site, local indices)."""
        sites = sorted({s for one in sets for s in one})
        masks = {s: torch.stack([_as_mask(model.width(s), one.get(s, torch.zeros(0, dtype=torch.int64)),
                                          model.device) for one in sets]) for s in sites}
        return cls(masks)


def _fill_masked(state: dict, fills: dict[Site, torch.Tensor],
                 site: Site) -> Callable[[torch.Tensor], torch.Tensor]:
    """A hook for `site` that writes its fill value into the neurons each copy's mask ablates; the
    masks of the copies in the batch (Kg, N) are read from `state["mask"][site]` at call time."""
    def fn(acts: torch.Tensor) -> torch.Tensor | None:
        if state.get("copies", 1) > 1 and site.layer < state["first"]:
            return None  # before the copies begin: no mask of the group ablates here
        kg = state["mask"][site].to(acts.device)  # (Kg, N); a dispatched model's layer may sit elsewhere
        shaped = acts.view(kg.shape[0], -1, *acts.shape[1:])  # (Kg, B, T, N)
        return torch.where(kg[:, None, None, :], fills[site].to(acts.device, acts.dtype), shaped).view_as(acts)
    return fn


def evaluate_masks(model: LoadedModel, dataset, masks: MaskSet,
                   score: Callable[[object, Batch], torch.Tensor], mode: str = "zero",
                   means: dict[Site, torch.Tensor] | None = None, max_tokens: int = 8192,
                   max_length: int = 256, prefix_once: bool = True) -> torch.Tensor:
    """Score every example under every mask, several masks per forward pass.

    Args:
        model: the loaded model.
        dataset: examples with `text` (and whatever `score` reads, e.g. `label`).
        masks: K masks.
        score: maps (model output for a K-times-expanded batch, the original batch) to a tensor of
            shape (K * B, ...) in copy-major order (copy k holds rows k*B .. k*B+B-1).
        mode: `zero` or `mean` ablation.
        means: per-site means for `mean`.
        max_tokens: padded tokens per forward pass, copies included.
        max_length: truncation length.
        prefix_once: run the blocks before a group's first masked layer once on the plain batch and
            copy it only from there (same scores; masks grouped by their first masked layer). A model
            whose output is not one row per copy (a decoder classifier pooling by `input_ids`) falls
            back to copying the inputs.

    Returns:
        (K, n_examples, ...) scores, examples in dataset order.
    """
    fills = fill_values(model, masks.masks, mode, means)
    enc = encode(model.tokenizer, dataset, min(max_length, model.max_length), include_special=True)
    K = masks.k
    lengths = [len(x) for x in enc.input_ids]
    # Each example is copied once per mask inside a group; size batches so copies fit the budget.
    per_group = max(1, min(K, max_tokens // max(lengths)))
    groups = _mask_groups(model, masks, per_group, sort=prefix_once)
    state: dict = {"prefix": prefix_once}
    hooks = {s: _fill_masked(state, fills, s) for s in masks.masks}
    results: list[torch.Tensor] = [None] * len(enc)  # type: ignore[list-item]
    batches = _share(plan_batches(lengths, max(1, max_tokens // per_group), 256), masks)
    with torch.inference_mode(), _autocast(model.device), site_hooks(model.model, hooks):
        for indices in batches:
            batch = make_batch(enc, indices, model.tokenizer.pad_token_id, device=model.device)
            full = torch.empty(0)
            for group, first in groups:
                state["mask"] = {s: m[group] for s, m in masks.masks.items()}
                val = _group_forward(model, batch, state, len(group), first, score)
                val = val.reshape(len(group), len(indices), *val.shape[1:]).float().cpu()
                if not full.numel():
                    full = torch.empty(K, *val.shape[1:])
                full[group] = val  # (K, B, ...)
            for b, i in enumerate(indices):
                results[i] = full[:, b]
    return torch.stack(_gathered(results), 1)


def _mask_groups(model: LoadedModel, masks: MaskSet, per_group: int, sort: bool) -> list[tuple[torch.Tensor, int]]:
    """Mask indices in groups of `per_group`, each with the first layer any of its masks ablates
    in (the last layer when none does). `sort`: order the masks by that layer first, so a group of
    late masks shares a long prefix."""
    first = torch.full((masks.k,), model.num_layers - 1, dtype=torch.int64)
    for site in sorted(masks.masks, reverse=True):  # earlier layers overwrite later ones
        hit = masks.masks[site].any(1).cpu()
        first[hit] = torch.minimum(first[hit], torch.tensor(site.layer))
    order = torch.argsort(first, stable=True) if sort else torch.arange(masks.k)
    return [(order[i:i + per_group], int(first[order[i:i + per_group]].min()))
            for i in range(0, masks.k, per_group)]


def _group_forward(model: LoadedModel, batch: Batch, state: dict, kg: int, first: int, score) -> torch.Tensor:
    """One forward pass for a group of `kg` masks: the plain batch copied from block `first` when
    prefix reuse is on and `first` > 0, else `kg` copies of the inputs. Returns the group's scores."""
    if state["prefix"] and first > 0 and kg > 1:
        state.update(copies=kg, first=first)  # the fill hooks of earlier blocks see the plain batch
        try:
            out = copied_forward(model, batch, kg, first)
        finally:
            state["copies"] = 1
        if out is not None:
            return score(out, batch)
        state["prefix"] = False
    out = model.model(input_ids=batch.input_ids.repeat(kg, 1), attention_mask=batch.attention_mask.repeat(kg, 1))
    return score(out, batch)


def copied_forward(model: LoadedModel, batch: Batch, copies: int, first: int):
    """The model's output for `copies` copies of `batch` (stacked copy-major), with the blocks
    before `first` run once on the plain batch: from block `first` on, every block's batch-shaped
    inputs are copied (`_copy_from_block`). A site hook of an earlier block may instead return the
    copies itself (its rows are then left as they are). Returns None where the output is not one
    row per copy (a decoder classifier pooling the last token found from `input_ids`): the caller
    then copies the inputs."""
    B = batch.input_ids.shape[0]
    with _copy_from_block(model, {"copies": copies, "rows": B, "first": first}):
        out = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    if _rows(out) == copies * B:
        return out
    log.info("%s: output rows are not one per copy; copying inputs instead of reusing the prefix", model.name)
    return None


def _rows(out) -> int:
    first = out.logits if getattr(out, "logits", None) is not None else out.to_tuple()[0]
    return int(first.shape[0])


def _repeat_batch(value, rows: int, copies: int):
    """`value` copied `copies` times along dim 0 (copy-major) if it is batch-shaped (a tensor of 2+
    dims with `rows` rows, or a tuple holding such, e.g. rotary (cos, sin)); else unchanged."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == rows:
            return value.repeat(copies, *([1] * (value.dim() - 1)))
        return value
    if isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(_repeat_batch(v, rows, copies) for v in value)
    return value


@contextmanager
def _copy_from_block(model: LoadedModel, state: dict) -> Iterator[None]:
    """Pre-hooks on every block: from block `state["first"]` on, while `state["copies"]` > 1, the
    block's batch-shaped inputs (its hidden states once, the attention mask and position tensors at
    every block) are copied `copies` times. They run before any other pre-hook on the block."""
    def make(layer: int):
        def hook(module, args, kwargs):
            copies = state.get("copies", 1)
            if copies == 1 or layer < state["first"]:
                return None
            rows = state["rows"]
            return (tuple(_repeat_batch(a, rows, copies) for a in args),
                    {k: _repeat_batch(v, rows, copies) for k, v in kwargs.items()})
        return hook

    handles = [block.register_forward_pre_hook(make(i), with_kwargs=True, prepend=True)
               for i, block in enumerate(layer_modules(model.model))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _share(batches: list[list[int]], masks: MaskSet) -> list[list[int]]:
    """Inside `distributed.collective`, this rank's share of the batches (every rank runs every
    mask on its share of the same batches); otherwise all of them."""
    ranks = distributed.active()
    if ranks is None:
        return batches
    _check_same_masks(masks)
    return ranks.share(batches)


def _gathered(results: list) -> list:
    """Inside `distributed.collective`, every rank's per-example results filled in; else `results`."""
    if distributed.active() is not None:
        for part in distributed.gather_objects({i: r for i, r in enumerate(results) if r is not None}):
            for i, r in part.items():
                results[i] = r
    return results


def _check_same_masks(masks: MaskSet) -> None:
    """Ranks splitting one evaluation must hold the same masks (their methods answered alike)."""
    h = hashlib.sha256()
    for site in sorted(masks.masks):
        h.update(str(site).encode())
        h.update(masks.masks[site].cpu().numpy().tobytes())
    digests = distributed.gather_objects(h.hexdigest())
    if len(set(digests)) > 1:
        raise ValueError(f"ranks disagree on the masks to evaluate (digests {digests}): a method answered "
                         "differently on different ranks; run with --parallel items, or make it deterministic")


def gold_label_scores(out, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
    """(K*B, 2): [correct, log-probability of the gold label] for a sequence classifier.

    Args:
        out: the model output (with `logits`).
        batch: the original batch.
        labels: gold label of every example in the Encoded order (indexed by `batch.indices`).
    """
    logits = out.logits.float()
    gold = labels[batch.indices].to(logits.device).repeat(logits.shape[0] // len(batch.indices))
    correct = (logits.argmax(-1) == gold).float()
    return torch.stack([correct, gold_log_prob(logits, gold)], 1)


def next_token_scores(out, batch: Batch) -> torch.Tensor:
    """(K*B, 2): [top-1 next-token accuracy, mean next-token log-likelihood] of each example's text
    under a causal LM (every predicted real token; 0 for a one-token example).

    Args:
        out: the model output for K copies of `batch` (copy-major), with `logits`.
        batch: the original batch.
    """
    logits = out.logits[:, :-1]  # (KB, T-1, V); no log-softmax copy of a large vocabulary
    k = logits.shape[0] // batch.input_ids.shape[0]
    ids, attn = batch.input_ids.repeat(k, 1), batch.attention_mask.repeat(k, 1)
    target = ids[:, 1:, None]
    logp = (logits.gather(2, target)[..., 0].float() - torch.logsumexp(logits.float(), -1))
    valid = (attn[:, 1:] * attn[:, :-1]).float()
    n = valid.sum(1).clamp(min=1)
    correct = ((logits.argmax(-1) == target[..., 0]).float() * valid).sum(1) / n
    return torch.stack([correct, (logp * valid).sum(1) / n], 1)
