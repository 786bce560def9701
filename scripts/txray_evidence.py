"""How many units per site TX-Ray has no evidence about: units that win no token under max-1 in
either stage (issue 19). Reads the same train split and sites as `txray-prune` (and shares its cache).

Usage: python scripts/txray_evidence.py [--model minilm-polarity] [--parent minilm] [--data polarity]
"""
from __future__ import annotations

import argparse

from neuronbench.baselines.txray import TXRay
from neuronbench.harness.engine.data import load
from neuronbench.harness.engine.method import MethodContext
from neuronbench.harness.engine.models import load_model
from neuronbench.harness.engine.sites import Site


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-polarity")
    ap.add_argument("--parent", default="minilm")
    ap.add_argument("--data", default="polarity")
    args = ap.parse_args()
    child, parent = load_model(args.model, device="cpu"), load_model(args.parent, device="cpu")
    corpus = load(args.data)
    sites = (Site.resid(child.num_layers - 1), *child.sites("ffn"))
    ctx = MethodContext(model=child, sites=sites, data=corpus.splits["train"],
                        data_id=f"{corpus.fingerprint}:train", seed=0, label_names=corpus.label_names,
                        parent=parent)
    cmp = TXRay().compare(ctx)
    print(f"{'site':10} {'units':>6} {'wins before':>12} {'wins after':>11} {'both':>6} {'neither':>8}")
    before_all, after_all = (ctx.index.split(cmp[c].float()) for c in ("active_before", "active_after"))
    for site in ctx.index.sites:
        before, after = before_all[site].bool(), after_all[site].bool()
        neither = int((~before & ~after).sum())
        print(f"{str(site):10} {before.numel():6d} {int(before.sum()):12d} {int(after.sum()):11d} "
              f"{int((before & after).sum()):6d} {neither:8d}")


if __name__ == "__main__":
    main()
