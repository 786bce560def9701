"""How `prune`'s intervals depend on how many test sentences it scores (issue 19's suite time): the
task's own sets, evaluated once on `--n-test` public test sentences, then summarised (the task's
`summarise`, the same paired bootstrap) on random subsets of m of those sentences. Per method and
m: the headline (`prune.gap_auc`) and `prune.bottom_gap`, their mean interval width over the
subsets and its ratio to the width on all `--n-test`, and how often the interval excludes 0.

The subsets come from the same sentences, so they show how the width grows with fewer sentences,
not how much the value would move on other sentences.

Usage: python scripts/prune_ntest.py [--methods random activation gradxact] [--n-test 120]
       [--sizes 120 100 80 60] [--subsets 20] [--json F]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from neuronbench.harness.engine.cache import Cache
from neuronbench.harness.engine.data import load
from neuronbench.harness.engine.method import MethodContext, call_verb, get_method
from neuronbench.harness.suite.task import RunEnv
from neuronbench.tasks import prune

METRICS = (prune.SPEC.headline, "prune.bottom_gap")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["random", "activation", "gradxact"])
    ap.add_argument("--n-test", type=int, default=prune.Params.of(prune.SPEC).n_test)
    ap.add_argument("--sizes", type=int, nargs="+", default=[120, 100, 80, 60])
    ap.add_argument("--subsets", type=int, default=20, help="random subsets per size (one when m = n-test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    spec, p = prune.SPEC, prune.Params.of(prune.SPEC)
    env = RunEnv(seed=args.seed, cache=Cache(), progress=False)
    corpus = load(spec.data, spec.split_seed)
    child, parent = env.model(spec.model), env.model(spec.parent)
    train, data_id = corpus.splits["train"], f"{corpus.fingerprint}:train"
    test = env.scoring_subset(corpus.splits["test"], args.n_test, spec.split_seed)
    sites = child.sites(spec.sites)
    means = prune.train_means(child, train, data_id, sites, env.cache, corpus.label_names)
    known: dict = {}
    rng = np.random.default_rng(args.seed)
    out = {}
    for name in args.methods:
        start = time.perf_counter()
        ctx = MethodContext(model=child, sites=sites, data=train, data_id=data_id, seed=args.seed,
                            label_names=corpus.label_names, parent=parent, cache=env.cache,
                            objective=prune.OBJECTIVES.get(child.kind))
        answer = call_verb(get_method(name), spec.verb, ctx)
        plan = prune.build_plan(ctx.index, answer.overall(), p.ks, p.random_seeds, args.seed)
        scores = prune.evaluate_plan(child, test, ctx.index, plan, p.ablation, means, known)
        print(f"{name}: answered and evaluated in {time.perf_counter() - start:.0f} s")
        rows = {}
        for m in args.sizes:
            draws = [np.arange(len(test))] if m >= len(test) else \
                [np.sort(rng.choice(len(test), m, replace=False)) for _ in range(args.subsets)]
            got = {metric: [] for metric in METRICS}
            for idx in draws:
                for r in prune.summarise(spec, name, args.seed, plan, scores[:, idx], p.bootstrap, ctx.index.size):
                    if r.metric in got:
                        got[r.metric].append((r.value, r.ci_low, r.ci_high))
            rows[m] = {metric: {"width": float(np.mean([h - lo for _, lo, h in v])),
                                "value_mean": float(np.mean([x for x, _, _ in v])),
                                "excludes_0": float(np.mean([lo > 0 or h < 0 for _, lo, h in v])),
                                "subsets": len(v)} for metric, v in got.items()}
        full = rows[max(rows)]
        for m, row in rows.items():
            for metric, fig in row.items():
                fig["width_ratio"] = fig["width"] / full[metric]["width"]
                print(f"  m={m:4d} {metric:18s} value {fig['value_mean']:+.3f}  width {fig['width']:.3f} "
                      f"(x{fig['width_ratio']:.2f})  excludes 0 in {fig['excludes_0']:.0%} of {fig['subsets']}")
        out[name] = rows
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
