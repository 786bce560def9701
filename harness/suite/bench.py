"""Speed benchmarks, each a ratio measured in one run: the collector against the bare batched forward
pass (`bench collect`), and batched multi-mask evaluation against one mask per pass (`bench prune`)."""
from __future__ import annotations

import gc
import json
import resource
import time
from dataclasses import dataclass

import psutil
import torch

from ..engine import fused, fused_cuda
from ..engine.batching import columns, encode
from ..engine.collect import CollectConfig, _autocast, collect, collect_encoded, run_batches
from ..engine.intervene import MaskSet, evaluate_masks, gold_label_scores, next_token_scores
from ..engine.models import LoadedModel
from ..engine.records import package_versions
from ..engine.sites import NeuronIndex


@dataclass(frozen=True)
class BenchConfig:
    """What `bench_collect` measures.

    Attributes:
        sites: `ffn`, `resid`, `all` or a list such as `ffn.0,resid.3`.
        repeats: timed repetitions of bare and collect (best of each is kept).
        batch1_examples: examples for the one-sentence-at-a-time reference loop (it is slow).
        max_tokens: padded tokens per batch.
        overlap: on CUDA, run the statistics on a side stream, overlapping the next forward
            (`fused_cuda.overlapped`); ignored elsewhere.
    """

    sites: str = "ffn"
    repeats: int = 2
    batch1_examples: int = 400
    max_tokens: int = 4096
    overlap: bool = False


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


def _kernel_name(device: torch.device) -> str:
    """Which statistics kernel a fused collector uses on `device`."""
    if fused_cuda.available(device):
        return "triton-2d"
    return "numba" if device.type == "cpu" and fused.available() else "torch"


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
        with fused_cuda.overlapped(bench.overlap and device.type == "cuda"):
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
        "threads": torch.get_num_threads(), "tokenize_s": tokenize_s, "overlap": bench.overlap,
        "kernel": _kernel_name(device),
        "note": "bare and collect both start from the same tokenised examples; tokenize_s is apart",
    }
    out["speedup_vs_batch1"] = out["collect_tok_s"] / out["batch1_tok_s"]
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


@dataclass(frozen=True)
class PruneBenchConfig:
    """What `bench_prune` measures: a pruning sweep of random neuron sets (the full model, then
    `seeds` sets per fraction in `ks` of the sites' neurons), zero-ablated.

    Attributes:
        sites: the sites the sets are drawn from (`ffn`, `resid`, `all`, `ffn.3,ffn.4`, ...).
        ks: fractions of the sites' neurons per set.
        seeds: random sets per fraction.
        repeats: timed repetitions of each way (best kept).
        max_tokens: padded tokens per forward pass, mask copies included (the prune task's 8192).
    """

    sites: str = "ffn"
    ks: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
    seeds: int = 2
    repeats: int = 2
    max_tokens: int = 8192


def sweep_masks(model: LoadedModel, bench: PruneBenchConfig) -> MaskSet:
    """The full model plus `seeds` uniformly random sets per fraction in `ks` (fixed seed)."""
    index = NeuronIndex.build({s: model.width(s) for s in model.sites(bench.sites)})
    gen = torch.Generator().manual_seed(0)
    sets = [{}]
    for k in bench.ks:
        n = max(1, round(k * index.size))
        sets += [index.split(torch.randperm(index.size, generator=gen)[:n]) for _ in range(bench.seeds)]
    return MaskSet.from_sets(model, sets)


def _scorer(model: LoadedModel, dataset):
    """The prune task's scores: gold label for a classifier, next tokens for a causal LM; a base
    encoder's first-token hidden state otherwise (for timing and identity only)."""
    if model.kind == "causal-lm":
        return next_token_scores
    if model.kind == "classifier" and "label" in dataset.column_names:
        labels = torch.tensor(dataset["label"])
        return lambda out, batch: gold_label_scores(out, batch, labels)
    return lambda out, batch: out.last_hidden_state[:, 0]


def bench_prune(model: LoadedModel, dataset, bench: PruneBenchConfig = PruneBenchConfig()) -> dict:
    """Time a pruning sweep four ways in one run: all masks batched with the prefix run once, batched
    copying the inputs, and one mask per pass (`evaluate_masks` with K = 1) both with the same token
    budget per pass (so with its own, longer padded batches) and on the batched way's example
    batches; check the scores agree.

    Returns:
        A dict with each way's best time (`batched_s`, `batched_copy_inputs_s`, `per_mask_s`,
        `per_mask_same_batches_s`), `ratio` (per-mask / batched), `ratio_same_batches`,
        `prefix_speedup`, `identical` (bit-equal scores), `max_abs_diff`, and what was measured.
    """
    masks, score, device = sweep_masks(model, bench), _scorer(model, dataset), model.device
    enc = encode(model.tokenizer, dataset, min(256, model.max_length), include_special=True)  # as evaluate_masks
    per_group = max(1, min(masks.k, bench.max_tokens // max(len(x) for x in enc.input_ids)))

    def per_mask(budget: int):
        return torch.cat([evaluate_masks(model, dataset, MaskSet({s: m[k:k + 1] for s, m in masks.masks.items()}),
                                         score, max_tokens=budget, prefix_once=False) for k in range(masks.k)])

    ways = {"batched": lambda: evaluate_masks(model, dataset, masks, score, max_tokens=bench.max_tokens),
            "batched_copy_inputs": lambda: evaluate_masks(model, dataset, masks, score, max_tokens=bench.max_tokens,
                                                          prefix_once=False),
            "per_mask": lambda: per_mask(bench.max_tokens),
            "per_mask_same_batches": lambda: per_mask(max(1, bench.max_tokens // per_group))}
    evaluate_masks(model, dataset.select(range(min(8, len(dataset)))), masks, score)  # warm-up
    best, scores = {w: float("inf") for w in ways}, {}
    for _ in range(bench.repeats):  # the ways interleaved, so changing load hits each alike
        for way, fn in ways.items():
            _sync(device)
            start = time.perf_counter()
            scores[way] = fn()
            _sync(device)
            best[way] = min(best[way], time.perf_counter() - start)
    ref = scores["per_mask"]
    first = min((s.layer for s, m in masks.masks.items() if bool(m.any())), default=None)
    out = {"model": model.name, "device": str(device), "sites": bench.sites, "ks": list(bench.ks),
           "masks": masks.k, "masks_per_pass": per_group, "examples": len(dataset), "first_masked_layer": first,
           "layers": model.num_layers, "max_tokens": bench.max_tokens, "threads": torch.get_num_threads(),
           **{f"{w}_s": best[w] for w in ways},
           "ratio": best["per_mask"] / best["batched"],
           "ratio_same_batches": best["per_mask_same_batches"] / best["batched"],
           "prefix_speedup": best["batched_copy_inputs"] / best["batched"],
           "identical": all(torch.equal(scores[w], ref) for w in ways),
           "max_abs_diff": max(float((scores[w] - ref).abs().max()) for w in ways)}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


# ---------------------------------------------------------------- the `bench` verb


def add_bench_parser(sub, cli) -> None:
    """Add `bench collect` and `bench prune` to the CLI's subparsers `sub`.

    Args:
        cli: what the CLI lends (this floor cannot import it): `add_data_args` (adds --model, --data,
            --split, --limit, --seed, --sites and the file options), `load_data` (parsed arguments ->
            dataset) and the argparse types `positive_int`, `positive_float`.
    """
    p = sub.add_parser("bench", help="speed benchmarks")
    bsub = p.add_subparsers(dest="what", required=True)
    b = bsub.add_parser("collect", help="collector vs bare forward vs a batch-1 loop")
    cli.add_data_args(b)
    b.add_argument("--repeats", type=cli.positive_int, default=2)
    b.add_argument("--batch1-examples", type=cli.positive_int, default=400)
    b.add_argument("--max-tokens", type=cli.positive_int, default=4096, help="padded tokens per batch")
    b.add_argument("--overlap", action="store_true", help="CUDA: statistics on a side stream")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.set_defaults(fn=lambda args: _bench_collect(args, cli.load_data))
    b = bsub.add_parser("prune", help="a pruning sweep: batched masks vs one mask per pass")
    cli.add_data_args(b)
    b.add_argument("--ks", type=cli.positive_float, nargs="+", default=list(PruneBenchConfig.ks),
                   help="fractions of the sites' neurons per random set")
    b.add_argument("--seeds", type=cli.positive_int, default=2, help="random sets per fraction")
    b.add_argument("--repeats", type=cli.positive_int, default=2)
    b.add_argument("--max-tokens", type=cli.positive_int, default=8192, help="padded tokens per pass, copies included")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.set_defaults(fn=lambda args: _bench_prune(args, cli.load_data))


def _print(result: dict, keys: tuple[str, ...], as_json: bool) -> int:
    result["versions"] = package_versions()
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for key in keys:
            print(f"{key:>22}: {result[key]:,.4g}")
    return 0


def _bench_collect(args, load_data) -> int:
    from ..engine.models import load_model

    model, ds = load_model(args.model), load_data(args)
    result = bench_collect(model, ds, BenchConfig(sites=args.sites, repeats=args.repeats, overlap=args.overlap,
                                                  batch1_examples=args.batch1_examples, max_tokens=args.max_tokens))
    return _print(result, ("bare_tok_s", "collect_tok_s", "ratio", "batch1_tok_s", "speedup_vs_batch1",
                           "peak_rss_mb"), args.json)


def _bench_prune(args, load_data) -> int:
    from ..engine.models import load_model

    if any(k > 1 for k in args.ks):
        raise ValueError(f"--ks are fractions of the sites' neurons in (0, 1]; got {args.ks}")
    model, ds = load_model(args.model), load_data(args)
    result = bench_prune(model, ds, PruneBenchConfig(sites=args.sites, ks=tuple(args.ks), seeds=args.seeds,
                                                     repeats=args.repeats, max_tokens=args.max_tokens))
    return _print(result, ("per_mask_s", "per_mask_same_batches_s", "batched_copy_inputs_s", "batched_s", "ratio",
                           "ratio_same_batches", "prefix_speedup",
                           "max_abs_diff"), args.json)
