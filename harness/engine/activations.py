"""Cached collection: the one door through which tasks and methods get activation statistics."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import distributed
from .cache import Cache, Entry, data_fingerprint
from .collect import CollectConfig, Collection, SiteStats, collect
from .models import LoadedModel, tokenizer_fingerprint
from .sites import NeuronIndex, Site
from .stats import LabelSums, Max1, Moments, TopK

log = logging.getLogger(__name__)

TENSORS = "stats.safetensors"
# Batching and the CPU kernel change no statistic beyond float rounding, so they are not in the key.
_NOT_IN_KEY = ("max_tokens", "max_batch", "fused")


def save_collection(col: Collection, folder: Path) -> dict:
    """Write a collection's tensors (safetensors) and return its JSON-able description."""
    tensors = {}
    for site, st in col.sites.items():
        for name in ("moments", "max1", "topk", "labels"):
            stat = getattr(st, name)
            if stat is not None:
                for key, value in stat.state().items():
                    tensors[f"{site}/{name}/{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(Path(folder) / TENSORS))
    return {"sites": [str(s) for s in col.index.sites], "widths": list(col.index.widths),
            "n_tokens": col.n_tokens, "n_examples": col.n_examples,
            "label_names": list(col.label_names) if col.label_names else None,
            "dense_words": sorted(f"{s}.npy" for s in col.dense_words), "collect_meta": col.meta}


def load_collection(folder: Path, device: torch.device | str = "cpu") -> Collection:
    """Read back what `save_collection` wrote (dense matrices memory-mapped, read-only)."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    # Cloned: safetensors maps the file, and a loaded collection must not change with it.
    flat = {k: v.clone() for k, v in load_file(str(folder / TENSORS)).items()}
    index = NeuronIndex(tuple(Site.parse(s) for s in meta["sites"]), tuple(meta["widths"]))
    device = torch.device(device)
    sites: dict[Site, SiteStats] = {}
    for site, width in zip(index.sites, index.widths):
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            s, name, field = key.split("/")
            if s == str(site):
                parts.setdefault(name, {})[field] = value
        sites[site] = SiteStats(
            moments=Moments.from_state(parts["moments"], device) if "moments" in parts else None,
            max1=Max1.from_state(parts["max1"], device, width) if "max1" in parts else None,
            topk=TopK.from_state(parts["topk"], device) if "topk" in parts else None,
            labels=LabelSums.from_state(parts["labels"], device) if "labels" in parts else None)
    dense = {Site.parse(name[:-4]): np.load(folder / name, mmap_mode="r") for name in meta["dense_words"]}
    names = tuple(meta["label_names"]) if meta["label_names"] else None
    return Collection(index, sites, meta["n_tokens"], meta["n_examples"], names, dense,
                      meta=meta.get("collect_meta", {}))


def cache_parts(model: LoadedModel, dataset, cfg: CollectConfig, data_id: str | None = None,
                label_names: tuple[str, ...] | None = None) -> dict:
    """Everything that determines a collection's content."""
    config = {k: v for k, v in cfg.record().items() if k not in _NOT_IN_KEY}
    return {"kind": "collection", "model": model.fingerprint(), "model_name": model.name,
            "tokenizer": tokenizer_fingerprint(model.tokenizer),
            "data": data_id or data_fingerprint(dataset), "config": config,
            "label_names": list(label_names) if label_names else None}


def collect_cached(model: LoadedModel, dataset, cfg: CollectConfig, *, data_id: str | None = None,
                   label_names: tuple[str, ...] | None = None, cache: Cache | None = None,
                   progress: bool = True) -> tuple[Collection, bool]:
    """Collect, or load the identical collection from the cache.

    Args:
        model: the loaded model.
        dataset: the examples (see `collect`).
        cfg: what to collect.
        data_id: a fingerprint of `dataset` if already known (e.g. a Corpus fingerprint + split name);
            computed from the content otherwise.
        label_names: names of the labels.
        cache: where to look; default the user cache.
        progress: show a progress bar on a miss.

    Returns:
        (collection, hit): hit is True when it came from the cache.
    """
    cache = cache or Cache()
    parts = cache_parts(model, dataset, cfg, data_id, label_names)

    def run(folder: Path) -> Collection:
        return collect(model, dataset, cfg, label_names, dense_dir=folder if cfg.dense_words else None,
                       progress=progress)

    if distributed.active() is not None:
        entry, hit = _get_or_put_across_ranks(cache, parts, run)
    else:
        entry, hit = cache.get_or_put(parts, lambda folder: save_collection(run(folder), folder))
    if hit:
        log.info("cache hit %s for %s", entry.key, model.name)
        try:
            return load_collection(entry.path, model.device), hit
        except (OSError, ValueError, KeyError, SafetensorError) as err:  # hash-verified, yet unreadable
            cache.remove(entry.key, f"{type(err).__name__}: {err}")
            entry, hit = cache.get_or_put(parts, write)
    return load_collection(entry.path, model.device), hit


def _get_or_put_across_ranks(cache: Cache, parts: dict, run: Callable[[Path], Collection]) -> tuple[Entry, bool]:
    """`cache.get_or_put` inside `distributed.collective`: rank 0 decides hit or miss for all; on a
    miss every rank collects its share into rank 0's temporary folder (named to the others), rank 0
    writes the entry atomically, and every rank reads it (the cache must be on a filesystem every
    rank sees: one node, or shared storage)."""
    ranks = distributed.active()
    key = cache.key(parts)
    hit = distributed.broadcast_object(cache.get(key) is not None if ranks.is_main else None)
    if not hit:
        if ranks.is_main:
            def announce_and_write(folder: Path) -> dict:
                distributed.broadcast_object(str(folder))
                return save_collection(run(folder), folder)

            cache.put(key, announce_and_write, parts)
        else:
            run(Path(distributed.broadcast_object(None)))
        distributed.barrier()  # the entry is complete before any rank reads it
    entry = cache.get(key)
    if entry is None:
        raise FileNotFoundError(f"rank {ranks.rank} cannot see cache entry {key} in {cache.root} that rank 0 "
                                "wrote: put $NEURONBENCH_HOME on storage every rank shares")
    return entry, hit
