"""How many Riemann steps `integrated-gradients` needs on the suite's classifier (issue 19's suite
time): per site and step count, the completeness error (|sum of IG - (objective(input) -
objective(site at its baseline))| over the gap's size, per example) and the agreement with the
finest step count: Spearman correlation and top-1% overlap of the per-neuron relevance (mean |IG|
over tokens, what `prune` ranks by), and the mean per-example Spearman correlation of the
position scores (what `erasure` ranks by, at `resid` sites).

Usage: python scripts/ig_steps.py [--sites ffn.1 ffn.4 resid.2] [--steps 4 8 16 32]
       [--rules midpoint gausslegendre] [--n 48] [--json F]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from neuronbench.baselines.integrated_gradients import RULES, baseline_gap, completeness_error, integrated_gradients
from neuronbench.harness.engine.cache import Cache
from neuronbench.harness.engine.data import load, subsample
from neuronbench.harness.engine.models import load_model
from neuronbench.harness.engine.objective import gradient_batches
from neuronbench.harness.engine.sites import Site
from neuronbench.tasks.prune import train_means


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def measure(model, data, site: Site, base: torch.Tensor, steps: int, rule: str):
    """Seconds, per-neuron relevance, per-example position scores and completeness errors."""
    start, rel, pos, err = time.perf_counter(), [], [], []
    for batch, target in gradient_batches(model, data, max_tokens=8192 // steps):
        ig = integrated_gradients(model, batch, target, site, steps, base, rule=rule).detach()
        err.append(completeness_error(ig, baseline_gap(model, batch, target, site, base)).numpy())
        real = batch.attention_mask.bool()
        rel.append(ig[real].abs().sum(0).double().numpy())
        pos += [ig[b].sum(-1)[real[b]].numpy() for b in range(len(ig))]
    return time.perf_counter() - start, np.sum(rel, 0), pos, np.concatenate(err)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-polarity")
    ap.add_argument("--sites", nargs="+", default=["ffn.1", "ffn.4", "resid.2"])
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--rules", nargs="+", default=["midpoint"], choices=list(RULES),
                    help="quadrature rules; every rule runs every step count")
    ap.add_argument("--n", type=int, default=48, help="train sentences attributed")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    model, corpus = load_model(args.model, device="cpu"), load("polarity")
    train = corpus.splits["train"]
    sites = [Site.parse(s) for s in args.sites]
    means = train_means(model, train, f"{corpus.fingerprint}:train", sites, Cache(), corpus.label_names)
    data = subsample(train, args.n, 0)
    # The reference: the finest step count of the first rule.
    configs = [(args.rules[0], max(args.steps))] + [(r, n) for r in args.rules for n in args.steps
                                                    if (r, n) != (args.rules[0], max(args.steps))]
    out = {}
    for site in sites:
        base, rows = means[site].float(), {}
        _, ref_rel, ref_pos, _ = found = measure(model, data, site, base, *configs[0][::-1])
        n_top = max(1, round(0.01 * len(ref_rel)))
        top_ref = set(np.argsort(-ref_rel)[:n_top])
        for rule, steps in configs:
            seconds, r, p, errors = found if (rule, steps) == configs[0] else measure(model, data, site, base,
                                                                                       steps, rule)
            f = rows[f"{rule}:{steps}"] = {
                "seconds": seconds, "completeness_rel_err_median": float(np.median(errors)),
                "completeness_rel_err_p90": float(np.quantile(errors, 0.9)),
                "relevance_spearman_vs_ref": spearman(r, ref_rel),
                "top1pct_overlap_vs_ref": len(top_ref & set(np.argsort(-r)[:n_top])) / n_top,
                "position_spearman_vs_ref": float(np.mean([spearman(a, b) for a, b in zip(p, ref_pos) if len(a) > 2]))}
            print(f"{site} {rule:13s} {steps:3d}: {seconds:6.1f} s  completeness error median "
                  f"{f['completeness_rel_err_median']:.4f} p90 {f['completeness_rel_err_p90']:.4f}  vs {configs[0]}: "
                  f"relevance rho {f['relevance_spearman_vs_ref']:.4f}, top-1% overlap "
                  f"{f['top1pct_overlap_vs_ref']:.2f}, position rho {f['position_spearman_vs_ref']:.4f}", flush=True)
        out[str(site)] = rows
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
