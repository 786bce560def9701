"""Collector speed and memory, as ratios measured in one run against the bare batched forward pass."""
from __future__ import annotations

import gc
import resource
import time
from dataclasses import dataclass

import psutil
import torch

from ..engine.batching import columns, encode
from ..engine.collect import CollectConfig, _autocast, collect, collect_encoded, run_batches
from ..engine.models import LoadedModel


@dataclass(frozen=True)
class BenchConfig:
    """What `bench_collect` measures.

    Attributes:
        sites: `ffn`, `resid`, `all` or a list such as `ffn.0,resid.3`.
        repeats: timed repetitions of bare and collect (best of each is kept).
        batch1_examples: examples for the one-sentence-at-a-time reference loop (it is slow).
        max_tokens: padded tokens per batch.
    """

    sites: str = "ffn"
    repeats: int = 2
    batch1_examples: int = 400
    max_tokens: int = 4096


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def batch1_loop(model: LoadedModel, texts: list[str]) -> int:
    """The NeuroX-style reference: one sentence per forward, every layer's hidden states to numpy."""
    tokens = 0
    with torch.inference_mode(), _autocast(model.device):
        for text in texts:
            enc = model.tokenizer(text, return_tensors="pt", truncation=True, max_length=256).to(model.device)
            out = model.model(**enc, output_hidden_states=True)
            _ = [h[0].float().cpu().numpy() for h in out.hidden_states]
            tokens += int(enc["input_ids"].shape[1])
    return tokens


def _timed(fn, device) -> tuple[float, int]:
    _sync(device)
    start = time.perf_counter()
    n = fn()
    _sync(device)
    return time.perf_counter() - start, n


def bench_collect(model: LoadedModel, dataset, bench: BenchConfig = BenchConfig()) -> dict:
    """Measure tokens/s of the bare batched forward, the collector (all four statistics) and a
    batch-1 loop, all in this run, plus memory.

    Returns:
        A dict with `bare_tok_s`, `collect_tok_s`, `ratio` (collect / bare), `batch1_tok_s`,
        `speedup_vs_batch1`, `peak_rss_mb`, `rss_above_model_mb`, and what was measured.
    """
    cfg = CollectConfig(sites=model.sites(bench.sites), max_tokens=bench.max_tokens)
    device = model.device
    start = time.perf_counter()
    enc = encode(model.tokenizer, dataset, min(cfg.max_length, model.max_length))
    tokenize_s = time.perf_counter() - start
    collect(model, dataset.select(range(min(64, len(dataset)))), cfg, progress=False)  # warm-up, kernel compile
    gc.collect()
    rss_model = _rss_mb()
    bare, coll = float("inf"), float("inf")
    tokens = 0
    for _ in range(bench.repeats):
        t, tokens = _timed(lambda: run_batches(model, enc, cfg, lambda b: None, progress=False), device)
        bare = min(bare, t)
        t, _ = _timed(lambda: collect_encoded(model, enc, cfg, progress=False).n_tokens, device)
        coll = min(coll, t)
    texts = columns(dataset)["text"][: bench.batch1_examples]
    t1, n1 = _timed(lambda: batch1_loop(model, texts), device)
    out = {
        "model": model.name, "device": str(device), "sites": [str(s) for s in cfg.sites],
        "stats": list(cfg.stats), "examples": len(dataset), "tokens": tokens,
        "bare_tok_s": tokens / bare, "collect_tok_s": tokens / coll, "ratio": bare / coll,
        "batch1_tok_s": n1 / t1, "batch1_examples": len(texts),
        "peak_rss_mb": _peak_rss_mb(), "rss_above_model_mb": _peak_rss_mb() - rss_model,
        "threads": torch.get_num_threads(), "tokenize_s": tokenize_s,
        "note": "bare and collect both start from the same tokenised examples; tokenize_s is apart",
    }
    out["speedup_vs_batch1"] = out["collect_tok_s"] / out["batch1_tok_s"]
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
