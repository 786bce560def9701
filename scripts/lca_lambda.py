"""How much `lca`'s neuron ranking depends on the elastic-net lambdas (issue 19): one probe per
l1 = l2 = lambda on the suite's `wsj-pos` train split (tested on its test split), at NeuroX's
"layer 3" (`resid.2` of MiniLM: NeuroX counts the embeddings as layer 0). Per lambda: test
accuracy, weight sparsity, the test accuracy of probes retrained on the top and bottom 10% of the
ranking, and the overlap of its top 10% with the default's (NeuroX's 1e-3); then the pairwise
top-10% overlaps.

Usage: python scripts/lca_lambda.py [--site resid.2] [--lambdas 0 1e-5 1e-4 1e-3 1e-2] [--json F]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from neuronbench.baselines._lca_probe import keep_neurons
from neuronbench.baselines.lca import NEUROX_LAMBDAS, probe_data
from neuronbench.harness.engine.data import load
from neuronbench.harness.engine.method import MethodContext, get_method
from neuronbench.harness.engine.models import load_model
from neuronbench.harness.engine.sites import Site


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--data", default="wsj-pos")
    ap.add_argument("--site", default="resid.2", help="resid.L (NeuroX's layer L + 1)")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1e-5, 1e-4, 1e-3, 1e-2])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    model, corpus = load_model(args.model, device="cpu"), load(args.data)
    site = Site.resid(int(args.site.split(".")[1]))

    def ctx(split: str) -> MethodContext:
        return MethodContext(model, sites=(site,), data=corpus.splits[split], seed=args.seed,
                             data_id=f"{corpus.fingerprint}/{split}", label_names=corpus.label_names)

    train_ctx = ctx("train")
    train, test = probe_data(train_ctx), probe_data(ctx("test"))
    rows, tops = [], {}
    for lam in args.lambdas:
        start = time.perf_counter()
        fit = get_method("lca", grid=((lam, lam),)).fit(train_ctx)
        order = np.argsort(-fit.scores().scores.numpy(), kind="stable")
        k = len(order) // 10
        tops[lam] = set(order[:k].tolist())
        retrained = {part: keep_neurons(fit.probe, keep, train.features, train.labels).accuracy(
            test.features, test.labels) for part, keep in (("top", order[:k]), ("bottom", order[-k:]))}
        rows.append({"lambda": lam, "test_accuracy": fit.probe.accuracy(test.features, test.labels),
                     "sparsity": fit.probe.sparsity(), "top10_accuracy": retrained["top"],
                     "bottom10_accuracy": retrained["bottom"], "k": k, "seconds": time.perf_counter() - start})
    default = NEUROX_LAMBDAS[0][0]
    print(f"lca on {args.model} {site}, {args.data} ({len(corpus.splits['train'])} train sentences), "
          f"top/bottom k = {rows[0]['k']} of {len(order)} neurons")
    print(f"{'lambda':>8} {'test acc':>9} {'sparsity':>9} {'top-10%':>8} {'bottom-10%':>11} "
          f"{f'top-k shared with {default:g}':>26}")
    for row in rows:
        shared = len(tops[row["lambda"]] & tops[default]) if default in tops else None
        row["top_shared_with_default"] = shared
        print(f"{row['lambda']:8g} {row['test_accuracy']:9.3f} {row['sparsity']:9.3f} {row['top10_accuracy']:8.3f} "
              f"{row['bottom10_accuracy']:11.3f} {'' if shared is None else shared:>26}")
    lams = list(tops)
    matrix = [[len(tops[a] & tops[b]) for b in lams] for a in lams]
    print("top-k shared, pairwise:")
    print(" " * 9 + "".join(f"{b:>9g}" for b in lams))
    for a, line in zip(lams, matrix):
        print(f"{a:9g}" + "".join(f"{n:9d}" for n in line))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "site": str(site), "data": args.data, "seed": args.seed,
                       "rows": rows, "lambdas": lams, "top_shared": matrix}, f, indent=1)


if __name__ == "__main__":
    main()
