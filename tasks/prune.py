"""`prune`: ablate the FFN neurons a method ranks most (and least) relevant in the fine-tuned
polarity classifier, and measure how much more test accuracy drops than for random neurons.

The method sees the train split and both stages (`minilm-polarity` and its parent `minilm`); the
harness scores on the test split only, all masks of a run batched into one `evaluate_masks` sweep.
On a causal LM (`--model`), "accuracy" is each test text's top-1 next-token accuracy and
"log-likelihood" its mean next-token log-likelihood (labels, if any, are unused): the drop in
held-out next-token log-likelihood is `prune.loglik_gap_auc`. Without a parent (`--model` with no
`--parent` and no zoo parent) a method that compares stages is not applicable.

Why the gaps' intervals carry the between-set spread (v3): a gap compares ONE set (the method's
top-k, or bottom-k) with the mean of S random sets of the same per-layer size. A model with a few
catastrophic FFN units makes a set's drop depend on whether it holds one of them, a luck the
method's single set carries as much as any random set does; resampling texts and the S random
sets (v2) sees the reference's share of it (sigma^2 / S) but not the compared set's (sigma^2), so
a set that happened to miss (or hit) a catastrophic unit got an interval excluding 0 with no
skill behind it (SmolLM2: `random` -0.289 [-0.641, -0.057]). Asking "is this set more harmful
than random sets of its size?" is a test of one draw against the random sets' distribution, so
each replicate adds one random set's deviation from the random sets' mean (`PairedBootstrap.ci`,
`one_set`): beyond the texts' share, its variance is then sigma^2 (1 + 1/S), that of one set
minus the mean of S. The value is unchanged. The drops' own intervals (`acc_drop.top`, ...)
describe the sets themselves and are not widened. With few random sets (quick: 3) the spread
is estimated from few draws and the interval is coarse.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from neuronbench.harness.engine.activations import collect_cached
from neuronbench.harness.engine.cache import data_fingerprint
from neuronbench.harness.engine.collect import CollectConfig
from neuronbench.harness.engine.data import load
from neuronbench.harness.engine.intervene import (ABLATION_MODES, MaskSet, evaluate_masks, gold_label_scores,
                                                  next_token_scores)
from neuronbench.harness.engine.method import Method, MethodContext, Provides, call_verb
from neuronbench.harness.engine.metrics import PairedBootstrap
from neuronbench.harness.engine.models import LoadedModel
from neuronbench.harness.engine.ranking import rank_neurons, set_size
from neuronbench.harness.engine.records import Record
from neuronbench.harness.engine.sites import NeuronIndex, Site
from neuronbench.harness.suite.task import RunEnv, Takes, TaskParams, TaskSpec, record, register_task

@dataclass(frozen=True)
class Params(TaskParams):
    """prune's parameters.

    Attributes:
        ks: fractions of all scored neurons ablated (each in [0, 1]).
        random_seeds: random neuron sets per k (at least 2: the gaps' intervals estimate the
            between-set spread from them).
        ablation: "mean" (train-split mean) or "zero".
        n_test: test sentences scored (None = the whole split).
        bootstrap: bootstrap resamples of each interval.
    """

    ks: tuple[float, ...]
    random_seeds: int
    ablation: str
    n_test: int | None
    bootstrap: int

    def __post_init__(self) -> None:
        for k in self.ks:
            set_size(k, 1)
        if self.ablation not in ABLATION_MODES:
            raise ValueError(f"prune: ablation={self.ablation!r}; use one of {ABLATION_MODES}")
        if not isinstance(self.random_seeds, int) or self.random_seeds < 2:
            raise ValueError(f"prune: random_seeds={self.random_seeds!r} must be an integer >= 2 (the gaps' "
                             "intervals need the spread between random sets)")


# The tiny classifier is a random tiny BERT fine-tuned from scratch: it has no pre-trained parent
# to load, so --quick hands the child itself to the method as its parent (a stage-comparing method
# then sees no change; the quick run checks plumbing, not skill). n_test: a mask costs a forward
# pass per sentence (~6 ms for MiniLM on 2 CPU cores), and the ~190 masks of a run over all 400
# test sentences took ~8 min a method: 120 public sentences let ten methods fit the default
# suite's time budget and leave the hidden split 280 others (version history: CHANGELOG.md).
SPEC = TaskSpec(
    name="prune", version=3, verb="relevance", model="minilm-polarity", parent="minilm",
    data="polarity", sites="ffn", headline="prune.gap_auc", no_skill=0.0,
    params=Params(ks=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2), random_seeds=10, ablation="mean", n_test=120,
                  bootstrap=1000),
    quick=(("model", "minilm-polarity-tiny"), ("parent", "minilm-polarity-tiny"), ("ks", (0.05, 0.2)),
           ("random_seeds", 3), ("n_test", 64), ("bootstrap", 200)),
    description="test-accuracy drop from ablating a method's top-k FFN neurons minus layer-matched random-k",
    takes=Takes(models=("classifier", "causal-lm"),
                data=(("classifier", ("sentence",)), ("causal-lm", ("sentence", "lm"))),
                adapted=(("causal-lm", "accuracy = top-1 next-token accuracy, log-likelihood = mean "
                                       "next-token log-likelihood of each held-out test text"),)))

# What gradient methods attribute, per model kind: what the task scores (`MethodContext.objective`).
OBJECTIVES = {"classifier": "gold-label", "causal-lm": "next-token-mean"}
TOP, BOTTOM = "top", "bottom"
RANDOM_UNIFORM, RANDOM_MATCHED = "random_uniform", "random_matched"
CONDITIONS = (TOP, BOTTOM, RANDOM_UNIFORM, RANDOM_MATCHED)
# Padded tokens per forward pass, copies included. On 2 CPU cores 4k-16k run at the bare forward
# pass's speed (the masks cost nothing measurable); 64k is slower. A causal LM's logits take
# vocabulary-size floats a token: its budget keeps them near LOGIT_BUDGET floats (512 MB).
EVAL_MAX_TOKENS = 8192
LOGIT_BUDGET = 2 ** 27
# Stream tags, so that tie-breaking and random sets never share a generator with each other.
_RANDOM_STREAM, _BOOT_STREAM = 1, 2  # the tie-breaking stream is ranking.TIE_STREAM (0)


def site_orders(index: NeuronIndex, perm: np.ndarray) -> dict[Site, np.ndarray]:
    """Each site's local neuron ids in the order they appear in `perm` (a permutation of all
    flat ids): a uniform random order within every site when `perm` is uniform."""
    site_of = np.repeat(np.arange(len(index.sites)), index.widths)
    return {s: perm[site_of[perm] == j] - index.offset(s) for j, s in enumerate(index.sites)}


def matched_random(index: NeuronIndex, chosen: np.ndarray, orders: dict[Site, np.ndarray]) -> np.ndarray:
    """Random neurons with exactly as many per site as `chosen`: the first ones of each site's
    random order (so the sets of one seed are nested as k grows, like top-k sets are)."""
    counts = {s: len(local) for s, local in index.split(torch.as_tensor(chosen, dtype=torch.int64)).items()}
    parts = [index.offset(s) + orders[s][:c] for s, c in counts.items()]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


@dataclass
class PrunePlan:
    """The neuron sets of one run. `sets[0]` ablates nothing (the full model); `rows[(condition,
    k)]` lists the sets of that condition and k (one for top/bottom, one per seed for random)."""

    sets: list[np.ndarray] = field(default_factory=lambda: [np.zeros(0, np.int64)])
    rows: dict[tuple[str, float], list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._ids = {s.tobytes(): i for i, s in enumerate(self.sets)}

    def add(self, condition: str, k: float, flat: np.ndarray) -> None:
        flat = np.sort(flat).astype(np.int64)
        if flat.tobytes() not in self._ids:  # identical sets (e.g. equal per-site counts) run once
            self._ids[flat.tobytes()] = len(self.sets)
            self.sets.append(flat)
        self.rows.setdefault((condition, k), []).append(self._ids[flat.tobytes()])


def uniform_orders(index: NeuronIndex, n_seeds: int, seed: int) -> list[np.ndarray]:
    """Random seed i's uniform permutation of all neurons (generator seeded by seed + i)."""
    return [np.random.default_rng([seed + i, _RANDOM_STREAM]).permutation(index.size) for i in range(n_seeds)]


def reference_plan(index: NeuronIndex, ks, n_seeds: int, seed: int) -> PrunePlan:
    """The sets every method's plan shares: the full model and the uniform random sets."""
    plan = PrunePlan()
    for k in ks:
        for perm in uniform_orders(index, n_seeds, seed):
            plan.add(RANDOM_UNIFORM, k, perm[:set_size(k, index.size)])
    return plan


def build_plan(index: NeuronIndex, scores: torch.Tensor, ks, n_seeds: int, seed: int) -> PrunePlan:
    """Top-k, bottom-k and random-k sets for every k.

    Random seed i draws one uniform permutation of all neurons from a generator seeded by
    (seed + i); `random_uniform` takes its first n, and the set matched to the top-k's per-site
    counts (`random_matched`) takes the first neurons of each site in the same permutation. Within
    a site that is still a uniform draw, but the two conditions of a seed share their neurons as far
    as the counts allow (equal counts give the same set, evaluated once), so their difference
    reflects the per-layer counts rather than which rare, very harmful neurons each happened to
    draw. The sets of a seed are nested in k; the uniform ones are the same for every method.
    """
    order = rank_neurons(scores, seed)
    plan = PrunePlan()
    uniform = uniform_orders(index, n_seeds, seed)
    orders = [site_orders(index, perm) for perm in uniform]
    for k in ks:
        n = set_size(k, index.size)
        top, bottom = order[:n], order[len(order) - n:]
        plan.add(TOP, k, top)
        plan.add(BOTTOM, k, bottom)
        for i in range(n_seeds):
            plan.add(RANDOM_UNIFORM, k, uniform[i][:n])
            plan.add(RANDOM_MATCHED, k, matched_random(index, top, orders[i]))
    return plan


def train_means(model: LoadedModel, train, data_id: str, sites, cache,
                label_names: tuple[str, ...] | None = None) -> dict[Site, torch.Tensor]:
    """Per-neuron mean activation over the train split's word tokens.

    Special tokens are left out (the collectors' default): some FFN neurons are silent on words
    and fire only on [CLS]/[SEP], and a mean pooled over both would write a large value into every
    word position, which breaks the model for reasons that have nothing to do with the neuron's role.
    The configuration is the one `MethodContext.collect` uses, so a method's moments are reused.
    """
    cfg = CollectConfig(sites=tuple(sites), stats=("moments",))
    col, _ = collect_cached(model, train, cfg, data_id=data_id, label_names=label_names, cache=cache,
                            progress=False)
    return {s: col[s].moments.mean for s in sites}


def evaluate_plan(model: LoadedModel, test, index: NeuronIndex, plan: PrunePlan, mode: str,
                  means: dict[Site, torch.Tensor] | None, known: dict[bytes, np.ndarray] | None = None) -> np.ndarray:
    """(n_sets, n_test, 2): [correct, log p(gold)] of every test example under every set.

    `known` maps a set (its sorted flat ids as bytes) to scores measured earlier in the run on the
    same model, test examples and ablation: sets another method shares (the full model, the
    uniform random sets) are evaluated once per run. New results are added to it.
    """
    known = {} if known is None else known
    todo = [i for i, s in enumerate(plan.sets) if s.tobytes() not in known]
    if todo:
        neuron_sets = [index.split(torch.as_tensor(plan.sets[i], dtype=torch.int64)) for i in todo]
        masks = MaskSet.from_sets(model, neuron_sets)
        model.model.eval()  # a method may have left dropout on
        if model.kind == "causal-lm":
            score, budget = next_token_scores, max(256, min(EVAL_MAX_TOKENS, LOGIT_BUDGET // model.config.vocab_size))
        else:
            labels = torch.tensor(test["label"])
            score, budget = (lambda out, batch: gold_label_scores(out, batch, labels)), EVAL_MAX_TOKENS
        fresh = evaluate_masks(model, test, masks, score, mode=mode, means=means,
                               max_tokens=budget).double().numpy()
        for row, i in enumerate(todo):
            known[plan.sets[i].tobytes()] = fresh[row]
    return np.stack([known[s.tobytes()] for s in plan.sets])


def stored_references(env: RunEnv, spec: TaskSpec, model: LoadedModel, test, index: NeuronIndex, plan: PrunePlan,
                      mode: str, means: dict[Site, torch.Tensor] | None) -> dict[bytes, np.ndarray]:
    """`evaluate_plan`'s scores of `plan`'s sets (method-independent references), as a `known`
    map: evaluated once and kept in the cache by `RunEnv.reference` (key: the spec, the model's
    weights, the scoring examples, the seed and the sets themselves), so a later run reads them."""
    flat = np.concatenate(plan.sets)
    lengths = np.array([len(x) for x in plan.sets])
    parts = {"kind": f"{spec.name}-reference", "spec": spec.fingerprint(), "model": model.fingerprint(),
             "model_name": model.name,
             "test": data_fingerprint(test), "mode": mode, "seed_sets": hashlib.sha256(flat.tobytes() +
                                                                                      lengths.tobytes()).hexdigest()}
    got = env.reference(parts, lambda: {"scores": evaluate_plan(model, test, index, plan, mode, means)})
    return {s.tobytes(): row for s, row in zip(plan.sets, got["scores"])}


def summarise(spec: TaskSpec, method: str, seed: int, plan: PrunePlan, scores: np.ndarray,
              n_boot: int, n_neurons: int) -> list[Record]:
    """Drop curves per k, `gap_auc`, `bottom_gap` and the full model's accuracy, each with a
    bootstrap interval (`metrics.PairedBootstrap`: test examples and random-set seeds resampled;
    the gaps' intervals also carry the compared set's own set-level luck, `one_set`: see below).

    A drop is the full model's value minus the ablated one (accuracy, or mean log-probability of
    the gold label); a random condition's value is the mean over its seeds. Per k,
    gap = (drop of top-k - mean drop of random-k matched to the top-k's per-layer counts) / full
    accuracy, and bottom gap = (mean drop of uniform random-k - drop of bottom-k) / full accuracy:
    both are 0 for chance and higher for a better ranking (top neurons matter more than random ones
    of their layers; bottom neurons matter less than random ones, as in LCA's top / random / bottom
    comparison); the bottom is compared with the uniform sets every method shares. `gap_auc`
    and `bottom_gap` are their means over the ks (equal weights); `loglik_gap_auc` and
    `loglik_bottom_gap` are the same in mean log-likelihood of the gold label (nats, not
    normalised), finer-grained than accuracy where few predictions flip.
    The gaps' intervals also carry the compared set's own luck (v3; the module docstring says why).
    """
    full = scores[0]  # (n, 2): [correct, log p(gold)] of the unablated model
    ks = sorted({k for _, k in plan.rows})
    n_seeds = len(plan.rows[(RANDOM_UNIFORM, ks[0])])
    boot = PairedBootstrap(full.shape[0], n_boot, seed, _BOOT_STREAM)

    def rec(metric: str, per_seed: np.ndarray, k: float | None = None,
            den: np.ndarray | None = None, one_set: bool = False) -> Record:
        # None where the full model gets nothing right (a normalised gap is undefined: an untrained LM)
        with np.errstate(invalid="ignore", divide="ignore"):
            got = boot.ci(np.atleast_2d(per_seed), den, one_set=one_set)
        value, low, high = (v if np.isfinite(v) else None for v in got)
        return record(spec, method, metric, value, seed, k=k, ci_low=low, ci_high=high)

    out = [rec("prune.full_accuracy", full[:, 0]), rec("prune.full_loglik", full[:, 1])]
    gaps = np.zeros((4, n_seeds, full.shape[0]))  # gap, bottom gap; then both in log-likelihood
    for k in ks:
        cond = {c: scores[plan.rows[(c, k)]] for c in CONDITIONS}  # (S, n, 2); S = 1 for top/bottom
        out.append(record(spec, method, "prune.set_size", float(set_size(k, n_neurons)), seed, k=k))
        for c in CONDITIONS:
            out.append(rec(f"prune.acc_drop.{c}", full[None, :, 0] - cond[c][..., 0], k))
            out.append(rec(f"prune.loglik_drop.{c}", full[None, :, 1] - cond[c][..., 1], k))
        gap = cond[RANDOM_MATCHED] - cond[TOP]  # (S, n, 2): drop(top) - drop(random)
        bottom = cond[BOTTOM] - cond[RANDOM_UNIFORM]  # drop(random) - drop(bottom)
        out.append(rec("prune.gap_at_k", gap[..., 0], k, full[:, 0], one_set=True))
        out.append(rec("prune.bottom_gap_at_k", bottom[..., 0], k, full[:, 0], one_set=True))
        gaps += np.stack([gap[..., 0], bottom[..., 0], gap[..., 1], bottom[..., 1]]) / len(ks)
    out.append(rec(spec.headline, gaps[0], den=full[:, 0], one_set=True))
    out.append(rec("prune.bottom_gap", gaps[1], den=full[:, 0], one_set=True))
    out.append(rec("prune.loglik_gap_auc", gaps[2], one_set=True))
    out.append(rec("prune.loglik_bottom_gap", gaps[3], one_set=True))
    return out


@register_task(SPEC, Params, Provides(labels=True, gradients=True))
def score(spec: TaskSpec, method: Method, env: RunEnv) -> list[Record]:
    """Rank the FFN neurons with `method.relevance` (train split), ablate top/bottom/random k-sets
    of the classifier, and score accuracy and gold log-likelihood on the test split."""
    p = Params.of(spec)
    ks, n_seeds, mode, n_test, n_boot = p.ks, p.random_seeds, p.ablation, p.n_test, p.bootstrap
    corpus = load(spec.data, spec.split_seed)
    child = env.model(spec.model)
    parent = env.model(spec.parent) if spec.parent else None
    train, data_id = corpus.splits["train"], f"{corpus.fingerprint}:train"
    ctx = MethodContext(model=child, sites=child.sites(spec.sites), data=train, data_id=data_id,
                        seed=env.seed, label_names=corpus.label_names, parent=parent, cache=env.cache,
                        objective=OBJECTIVES.get(child.kind))
    answer = call_verb(method, spec.verb, ctx)
    test = corpus.splits["test"]
    test = env.scoring_subset(test, n_test, spec.split_seed)  # fixed per split, whatever the run seed
    plan = build_plan(ctx.index, answer.overall(), ks, n_seeds, env.seed)
    means = None
    if mode == "mean":
        means = train_means(child, train, data_id, ctx.sites, env.cache, corpus.label_names)
    known = env.memo(("prune.sets", spec.fingerprint(), env.split, env.hidden_seed), dict)
    if not known:  # the full model and the uniform random sets: stored across runs
        known.update(stored_references(env, spec, child, test, ctx.index,
                                       reference_plan(ctx.index, ks, n_seeds, env.seed), mode, means))
    scores = evaluate_plan(child, test, ctx.index, plan, mode, means, known)
    return summarise(spec, method.name, env.seed, plan, scores, n_boot, ctx.index.size)
