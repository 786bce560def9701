"""GPU figures for issue 18 in one call: `bench collect` (bf16; ratio to the bare forward, with and
without the side stream; speed-up over a batch-1 loop), the Triton statistics kernel's achieved
bandwidth, and `bench prune`, on MiniLM, a BERT-base shape and a Llama-family shape.

  python scripts/gpu_bench.py prepare out/gpu_bench   # here, on CPU: data CSV + MiniLM in bf16 (~47 MB)
  python scripts/gpu_bench.py run out/gpu_bench RESULTS_DIR   # on the GPU machine (no network needed)

The BERT-base and Llama shapes are randomly initialised from their configs (speed does not depend on
the weights) with MiniLM's tokenizer (BERT vocabulary): the Llama entry is Llama-3.2-1B's body, not
its 128k-token vocabulary. Every step writes its JSON as soon as it ends, so a timeout keeps the rest.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

SHAPES = {
    "bert-base": ("BertConfig", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, vocab_size=30522)),
    "llama-1b-shape": ("LlamaConfig", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                           num_key_value_heads=8, intermediate_size=8192, vocab_size=30522,
                                           max_position_embeddings=2048, tie_word_embeddings=True)),
}


def prepare(root: Path) -> None:
    """Write the data (polarity, text and label) and MiniLM with its tokenizer, in bf16."""
    from neuronbench.harness.engine.data import load
    from neuronbench.harness.engine.models import load_model

    root.mkdir(parents=True, exist_ok=True)
    corpus = load("polarity")
    import datasets

    ds = datasets.concatenate_datasets([corpus.splits[s] for s in corpus.splits])
    ds.select_columns(["text", "label"]).to_csv(str(root / "polarity.csv"), index=False)
    model = load_model("minilm", device="cpu")
    model.model.to(torch.bfloat16).save_pretrained(root / "minilm")
    model.tokenizer.save_pretrained(root / "minilm")
    print(f"prepared {root}: {len(ds)} examples, minilm in bf16")


def _build_shapes(root: Path, models: Path) -> dict[str, Path]:
    import transformers

    from neuronbench.harness.engine.models import load_model

    tok = transformers.AutoTokenizer.from_pretrained(root / "minilm")
    out = {"minilm": root / "minilm"}
    for name, (cls, kwargs) in SHAPES.items():
        folder = models / name
        if not (folder / "config.json").exists():
            config = getattr(transformers, cls)(**kwargs)
            torch.manual_seed(0)
            base = transformers.AutoModel.from_config(config, torch_dtype=torch.bfloat16)
            base.save_pretrained(folder)
            tok.save_pretrained(folder)
        out[name] = folder
    load_model(str(out["minilm"]), device="cpu")  # fails here, not later, if the harness cannot read it
    return out


def kernel_bandwidth(rows: int, width: int, k: int = 10, labels: int = 2, iters: int = 20) -> dict:
    """Median time of the statistics kernels on one (rows, width) bf16 batch, all statistics on, after
    a top-k warm-up threshold; GB/s over the activation bytes, beside a plain float32-accumulated
    column sum of the same matrix (a read-bound reference)."""
    from neuronbench.harness.engine import fused_cuda

    gen = torch.Generator(device="cuda").manual_seed(0)
    X = torch.randn(rows, width, device="cuda", generator=gen).to(torch.bfloat16)
    weight = (torch.rand(rows, device="cuda", generator=gen) > 0.05).float()
    lw = torch.zeros(labels, rows, device="cuda")
    lw[torch.randint(0, labels, (rows,), device="cuda", generator=gen), torch.arange(rows, device="cuda")] = 1
    lw *= weight
    thr = X[:256].float().topk(k, 0).values[-1].contiguous()

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    t_kernel = timed(lambda: fused_cuda.run(X, weight, thr, lw, True, k).candidates())
    t_sum = timed(lambda: X.sum(0, dtype=torch.float32))
    gb = X.numel() * X.element_size() / 1e9
    return {"rows": rows, "width": width, "k": k, "labels": labels, "kernel_s": t_kernel, "kernel_gb_s": gb / t_kernel,
            "column_sum_s": t_sum, "column_sum_gb_s": gb / t_sum, "note": "kernel time includes the device-side "
            "merges and reading the candidate count (one host sync)"}


def _step(results: Path, name: str, fn) -> None:
    start = time.perf_counter()
    try:
        out = {"ok": True, **fn()}
    except Exception as err:  # one failing step must not lose the others
        out = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    out["step_s"] = round(time.perf_counter() - start, 2)
    (results / f"{name}.json").write_text(json.dumps(out, indent=2, default=str))
    print(f"{name}: {'ok' if out['ok'] else out['error']} ({out['step_s']} s)", flush=True)


def run(root: Path, results: Path) -> None:
    from neuronbench.harness.engine.data import load
    from neuronbench.harness.engine.models import load_model
    from neuronbench.harness.suite.bench import BenchConfig, PruneBenchConfig, bench_collect, bench_prune

    results.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on the GPU machine")
    folders = _build_shapes(root, Path("/tmp/nb-gpu-models"))  # GBs: kept out of the results
    ds = load(str(root / "polarity.csv")).splits
    data = next(iter(ds.values()))
    collect_ds = data.select(range(min(2000, len(data))))
    prune_ds = data.select(range(min(512, len(data))))
    for name, folder in folders.items():
        model = load_model(str(folder), device="cuda")
        n = model.width(model.sites("ffn")[0])
        _step(results, f"kernel-{name}", lambda: kernel_bandwidth(4096, n))
        for overlap in (False, True):
            bench = BenchConfig(sites="ffn", repeats=2, batch1_examples=200, overlap=overlap)
            _step(results, f"collect-{name}{'-overlap' if overlap else ''}", lambda: bench_collect(model, collect_ds, bench))
        _step(results, f"prune-{name}", lambda: bench_prune(model, prune_ds, PruneBenchConfig(sites="ffn")))
        late = ",".join(str(s) for s in model.sites("ffn")[model.num_layers // 2:])
        _step(results, f"prune-{name}-late-layers", lambda: bench_prune(model, prune_ds, PruneBenchConfig(sites=late)))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("prepare", "run") or (sys.argv[1] == "run" and len(sys.argv) != 4):
        raise SystemExit(__doc__)
    if sys.argv[1] == "prepare":
        prepare(Path(sys.argv[2]))
    else:
        run(Path(sys.argv[2]), Path(sys.argv[3]))
