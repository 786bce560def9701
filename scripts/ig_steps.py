"""How many Riemann steps `integrated-gradients` needs on the suite's classifier (issue 19's suite
time): per site and step count, the completeness error (|sum of IG - (objective(input) -
objective(site at its baseline))| over the gap's size, per example) and the agreement with the
finest step count: Spearman correlation and top-1% overlap of the per-neuron relevance (mean |IG|
over tokens, what `prune` ranks by), and the mean per-example Spearman correlation of the
position scores (what `erasure` ranks by, at `resid` sites).

Usage: python scripts/ig_steps.py [--sites ffn.1 ffn.4 resid.2] [--steps 4 8 16 32] [--n 48] [--json F]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from neuronbench.baselines.integrated_gradients import integrated_gradients
from neuronbench.harness.engine.cache import Cache
from neuronbench.harness.engine.data import load, subsample
from neuronbench.harness.engine.hooks import site_hooks
from neuronbench.harness.engine.models import load_model
from neuronbench.harness.engine.objective import gradient_batches, objective, run
from neuronbench.harness.engine.sites import Site
from neuronbench.tasks.prune import train_means


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-polarity")
    ap.add_argument("--sites", nargs="+", default=["ffn.1", "ffn.4", "resid.2"])
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--n", type=int, default=48, help="train sentences attributed")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    model, corpus = load_model(args.model, device="cpu"), load("polarity")
    train = corpus.splits["train"]
    sites = [Site.parse(s) for s in args.sites]
    means = train_means(model, train, f"{corpus.fingerprint}:train", sites, Cache(), corpus.label_names)
    data = subsample(train, args.n, 0)
    out = {}
    for site in sites:
        base = means[site].float()
        per_steps, seconds, errors = {}, {}, {}
        for steps in args.steps:
            start, rel, pos, err = time.perf_counter(), [], [], []
            for batch, target in gradient_batches(model, data, max_tokens=8192 // steps):
                ig = integrated_gradients(model, batch, target, site, steps, base).detach()
                with torch.no_grad():
                    full = objective(model, run(model, batch), batch, target)
                    with site_hooks(model.model, {site: lambda a: base.expand_as(a)}):
                        gap = full - objective(model, run(model, batch), batch, target)
                err.append(((ig.sum((1, 2)) - gap).abs() / gap.abs().clamp_min(1e-6)).numpy())
                real = batch.attention_mask.bool()
                rel.append(ig[real].abs().sum(0).double().numpy())
                pos += [ig[b].sum(-1)[real[b]].numpy() for b in range(len(ig))]
            seconds[steps] = time.perf_counter() - start
            per_steps[steps] = (np.sum(rel, 0), pos)
            errors[steps] = np.concatenate(err)
        finest = max(args.steps)
        ref_rel, ref_pos = per_steps[finest]
        n_top = max(1, round(0.01 * len(ref_rel)))
        top_ref = set(np.argsort(-ref_rel)[:n_top])
        rows = {}
        for steps, (r, p) in per_steps.items():
            rows[steps] = {"seconds": seconds[steps],
                           "completeness_rel_err_median": float(np.median(errors[steps])),
                           "completeness_rel_err_p90": float(np.quantile(errors[steps], 0.9)),
                           "relevance_spearman_vs_finest": spearman(r, ref_rel),
                           "top1pct_overlap_vs_finest": len(top_ref & set(np.argsort(-r)[:n_top])) / n_top,
                           "position_spearman_vs_finest": float(np.mean([spearman(a, b) for a, b in zip(p, ref_pos)
                                                                         if len(a) > 2]))}
            f = rows[steps]
            print(f"{site} steps {steps:3d}: {f['seconds']:6.1f} s  completeness error median "
                  f"{f['completeness_rel_err_median']:.4f} p90 {f['completeness_rel_err_p90']:.4f}  vs {finest} steps: "
                  f"relevance rho {f['relevance_spearman_vs_finest']:.4f}, top-1% overlap "
                  f"{f['top1pct_overlap_vs_finest']:.2f}, position rho {f['position_spearman_vs_finest']:.4f}")
        out[str(site)] = rows
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
