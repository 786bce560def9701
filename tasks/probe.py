"""`probe`: retrain a fixed linear POS probe on the `resid` neurons a method ranks most (and least)
relevant for WSJ part-of-speech tags, against random neurons and a control task (LCA / NeuroX;
Hewitt & Liang 2019 for the control task and selectivity).

Protocol (fixed before measuring):
- The method sees the train split (word-level POS labels, `label_names`; `ctx.concept` None) and
  ranks every `resid` neuron with `relevance`; `overall()` (max over concepts) orders them, ties
  broken by a permutation seeded by the run seed.
- Words are represented by the activation at their last subword (`alignment`); words a truncated
  input cut off have no activation and are left out everywhere.
- The harness trains a fresh probe with one recipe for every method: multinomial logistic
  regression on inputs standardised with the probe-train words' mean and std, cross-entropy +
  `l2` * sum W^2 (bias not penalised), zero initial weights, full-batch L-BFGS (strong Wolfe line
  search, history 10) for at most `lbfgs_steps` iterations. Zero init and full batches leave no
  randomness in the probe. It is trained on the words of `probe_sentences` sentences of the
  method's train split (seeded by `split_seed`; all when None) and scored on test-split words.
- Neuron sets per k (a share of all resid neurons, round(k * N), at least 1): the method's top-k,
  its bottom-k, and `random_seeds` uniform random k-sets (seed i: a permutation drawn from
  (run seed + i), nested in k). The full-neuron probe is the reference.
- Label null (version 2): the method is asked again `null_permutations` times with the train
  split's word tags permuted across all words (`data.permute_labels`, key (run seed, 11, i);
  `ctx.labelling` = `permuted:<i>`); those rankings' top-k and bottom-k are probed on the real
  tags. `tmb_gap` = the method's top-minus-bottom minus their mean: what the POS labels buy
  (why: CHANGELOG.md). A method that reads no labels ranks alike on permuted tags: gap 0, no null
  probe retrained.
- Control task: every word type (exact string) gets a tag drawn from the token-level tag
  distribution of the train split, by hashing (split_seed, word) to a uniform number and inverting
  the distribution's CDF: a function of the type alone, the same in every split and run. The same
  recipe is trained on the same neuron sets with the control tags; selectivity = task accuracy -
  control accuracy.
- Headline `probe.tmb_gap@10` (no skill 0), beside `probe.top_minus_bottom@10` and `selectivity@10`.
- Scoring: `n_test` test sentences (`RunEnv.scoring_subset`; the hidden split scores others), all
  their words. Intervals: paired percentile bootstrap over test sentences (words of one sentence
  are not independent), random-set seeds and null permutations resampled in every replicate
  (`metrics.PairedBootstrap`).
- Method-independent probes (random sets, full) are trained once and shared, across runs too
  (`RunEnv.reference`).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from neuronbench.harness.engine.activations import collect_cached
from neuronbench.harness.engine.batching import encode
from neuronbench.harness.engine.collect import CollectConfig
from neuronbench.harness.engine.data import load, permute_labels, subsample
from neuronbench.harness.engine.method import Method, MethodContext, Provides, call_verb
from neuronbench.harness.engine.metrics import PairedBootstrap
from neuronbench.harness.engine.models import LoadedModel, load_model
from neuronbench.harness.engine.ranking import rank_neurons, set_size
from neuronbench.harness.engine.records import Record
from neuronbench.harness.suite.task import RunEnv, Takes, TaskParams, TaskSpec, record, register_task
from neuronbench.tasks._probe_recipe import ProbeData, control_tags, correct_counts, tag_distribution

log = logging.getLogger(__name__)

HEADLINE_K = 0.1  # the k of the headline metrics


@dataclass(frozen=True)
class Params(TaskParams):
    """probe's parameters.

    Attributes:
        ks: fractions of the neurons in each probed set; must include the headline's 0.1.
        random_seeds: random k-sets per k.
        null_permutations: times the method is asked again on permuted tags (the headline's null).
        n_test: test sentences scored.
        train_sentences: train sentences the method reads (None = the whole split).
        probe_sentences: train sentences the probe is fitted on (None = all the method read).
        l2, lbfgs_steps: the probe's L2 strength and full-batch L-BFGS steps.
        bootstrap: bootstrap resamples of each interval.
        alignment: which subword stands for a word (`first`, `last`, `mean`).
    """

    ks: tuple[float, ...]
    random_seeds: int
    null_permutations: int
    n_test: int | None
    train_sentences: int | None
    probe_sentences: int | None
    l2: float
    lbfgs_steps: int
    bootstrap: int
    alignment: str

    def __post_init__(self) -> None:
        for k in self.ks:
            set_size(k, 1)
        if HEADLINE_K not in self.ks:
            raise ValueError(f"probe: ks={self.ks} must include {HEADLINE_K}, the k of the headline metrics")
        for name in ("random_seeds", "lbfgs_steps", "bootstrap", "null_permutations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"probe: {name}={value!r} must be a positive integer")


# Cost (2 CPU cores): the probe-train cap of 400 sentences (~10k words) halves L-BFGS time against
# the whole split (801) for about 1 point of full-probe accuracy; 50 iterations change test accuracy
# by < 0.5 points against 200. --quick: the tiny classifier's encoder (no head; see `encoder`).
SPEC = TaskSpec(
    name="probe", version=2, verb="relevance", model="minilm", data="wsj-pos", sites="resid",
    headline="probe.tmb_gap@10", no_skill=0.0,
    params=Params(ks=(0.01, 0.05, 0.1, 0.2), random_seeds=5, null_permutations=3, n_test=50,
                  train_sentences=None, probe_sentences=400, l2=1e-3, lbfgs_steps=50, bootstrap=1000,
                  alignment="last"),
    quick=(("model", "minilm-polarity-tiny"), ("ks", (0.1, 0.2)), ("random_seeds", 2), ("null_permutations", 2),
           ("n_test", 20), ("train_sentences", 60), ("lbfgs_steps", 15), ("bootstrap", 200)),
    description="POS accuracy of a probe retrained on a method's top-k resid neurons minus its bottom-k, "
                "beyond what the method's ranking on permuted tags gets; control-task selectivity",
    takes=Takes(models=("base", "classifier", "causal-lm"),
                data=tuple((kind, ("tokens",)) for kind in ("base", "classifier", "causal-lm"))))

TOP, RANDOM, BOTTOM = "top", "random", "bottom"
CONDITIONS = (TOP, RANDOM, BOTTOM)
TASK, CONTROL = "task", "control"
_RANDOM_STREAM, _BOOT_STREAM = 1, 2  # the tie-breaking stream is ranking.TIE_STREAM (0)
_NULL_STREAM = 11  # label permutations of the null (the sanity check's own permutation uses 7)
NULL = "null"


# --------------------------------------------------------------------------- neuron sets

def neuron_sets(scores: torch.Tensor, ks, n_seeds: int, seed: int) -> dict[tuple[str, float], list[np.ndarray]]:
    """(condition, k) -> sorted flat ids: one set for top and bottom, one per seed for random."""
    n = len(scores)
    perms = [random_permutation(n, seed, i) for i in range(n_seeds)]
    out = {key: [ids] for key, ids in extreme_sets(scores, ks, seed).items()}
    for k in ks:
        out[(RANDOM, k)] = [np.sort(p[:set_size(k, n)]) for p in perms]
    return out


def extreme_sets(scores: torch.Tensor, ks, seed: int) -> dict[tuple[str, float], np.ndarray]:
    """(top|bottom, k) -> sorted flat ids of a ranking's k-sets (ties broken as in `neuron_sets`)."""
    order, n = rank_neurons(scores, seed), len(scores)
    out = {}
    for k in ks:
        m = set_size(k, n)
        out[(TOP, k)], out[(BOTTOM, k)] = np.sort(order[:m]), np.sort(order[n - m:])
    return out


def null_context(ctx: MethodContext, seed: int, i: int) -> MethodContext:
    """`ctx` with the word tags of its split permuted across all words: the i-th label null."""
    return replace(ctx, data=permute_labels(ctx.data, (seed, _NULL_STREAM, i)),
                   data_id=f"{ctx.data_id}~permuted:{seed}:{i}", labelling=f"permuted:{i}")


def random_permutation(n: int, seed: int, i: int) -> np.ndarray:
    """Random seed i's order of the n neurons (its k-sets are prefixes, so nested in k)."""
    return np.random.default_rng([seed + i, _RANDOM_STREAM]).permutation(n)


# --------------------------------------------------------------------------- data

def encoder(env: RunEnv, name: str) -> LoadedModel:
    """`name` as a bare encoder: a classifier's task head (the tiny --quick model has one) plays no
    part in probing and would make gradient methods differentiate an unrelated objective."""
    model = env.model(name)
    if model.kind == "base":
        return model
    return env.memo(("probe", "encoder", name), lambda: _load_base(name, model.device))


def _load_base(name: str, device: torch.device) -> LoadedModel:
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its report lists the head's weights we drop on purpose
    try:
        return load_model(name, kind="base", device=device)
    finally:
        hf_logging.set_verbosity(before)


def kept_words(model: LoadedModel, dataset, cfg: CollectConfig) -> np.ndarray:
    """(W,) bool, words in dataset order: False for a word truncation cut off (no activation)."""
    enc = encode(model.tokenizer, dataset, min(cfg.max_length, model.max_length), with_words=True)
    kept = [np.isin(np.arange(n), [w for w in wids if w is not None]) for n, wids in zip(enc.n_words, enc.word_ids)]
    return np.concatenate(kept) if kept else np.zeros(0, dtype=bool)


def word_matrix(model: LoadedModel, dataset, data_id: str, cfg: CollectConfig, env: RunEnv,
                label_names) -> tuple[np.ndarray, np.ndarray]:
    """(W, N) float32 word activations of all of `cfg.sites` (dataset order) and the kept mask."""
    model.model.eval()  # a method may have left dropout on
    col, _ = collect_cached(model, dataset, cfg, data_id=data_id, label_names=label_names, cache=env.cache,
                            progress=env.progress)
    x = np.concatenate([np.asarray(col.dense_words[s], dtype=np.float32) for s in cfg.sites], 1)
    return x, kept_words(model, dataset, cfg)


def _words(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Words, gold tags and sentence position per word of a tagged split (dataset order)."""
    words = np.array([w for ws in ds["words"] for w in ws], dtype=object)
    tags = np.array([t for ts in ds["word_labels"] for t in ts], dtype=np.int64)
    return words, tags, np.repeat(np.arange(len(ds)), [len(ws) for ws in ds["words"]])


def prepare(spec: TaskSpec, env: RunEnv, model: LoadedModel, corpus, train, train_id: str) -> ProbeData:
    """Collect (cached) and standardise the probe-train and scored test words; control tags."""
    p = Params.of(spec)
    cfg = CollectConfig(sites=model.sites(spec.sites), stats=(), dense_words=True, alignment=p.alignment)
    n_classes = len(corpus.label_names)
    probs = tag_distribution(_words(corpus.splits["train"])[1], n_classes)
    x_tr, kept_tr = word_matrix(model, train, train_id, cfg, env, corpus.label_names)
    words_tr, tags_tr, sent_tr = _words(train)
    n_probe = p.probe_sentences or len(train)
    probe_rows = np.random.default_rng(spec.split_seed).permutation(len(train))[:n_probe]
    chosen = np.isin(sent_tr, probe_rows) & kept_tr
    test = corpus.splits["test"]
    x_te, kept_te = word_matrix(model, test, f"{corpus.fingerprint}:test", cfg, env, corpus.label_names)
    words_te, tags_te, sent_te = _words(test)
    rows = env.scoring_rows(len(test), p.n_test, spec.split_seed)
    scored = np.isin(sent_te, rows) & kept_te
    if not chosen.any() or scored.sum() < 2:
        raise ValueError(f"probe: {chosen.sum()} train and {scored.sum()} test words kept a token; "
                         "use longer max_length or more sentences")
    x_train = torch.from_numpy(x_tr[chosen])
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    y_train = {TASK: tags_tr[chosen], CONTROL: control_tags(words_tr[chosen], probs, spec.split_seed)}
    return ProbeData(x_train=(x_train - mean) / std, y_train={k: torch.from_numpy(v) for k, v in y_train.items()},
                     x_test=(torch.from_numpy(x_te[scored]) - mean) / std,
                     y_test={TASK: tags_te[scored], CONTROL: control_tags(words_te[scored], probs, spec.split_seed)},
                     sentence=np.searchsorted(rows, sent_te[scored]), test_rows=rows, n_classes=n_classes)


# --------------------------------------------------------------------------- scoring

def evaluate(spec: TaskSpec, env: RunEnv, data: ProbeData, sets, n_neurons: int, key: dict) -> dict:
    """(condition, k, labels) -> (S, n_sentences) correct counts, S = 1 or the random seeds;
    ("full", None, labels) for the full probe. The random and full probes do not depend on the
    method: trained once and stored across runs (`RunEnv.reference`, under `key`: what they depend
    on besides the spec, the run seed and the scored sentences)."""
    l2, steps = Params.of(spec).l2, Params.of(spec).lbfgs_steps

    def counts(columns: np.ndarray, labels: str) -> np.ndarray:
        return correct_counts(data, columns, labels, l2, steps)

    def shared() -> dict[str, np.ndarray]:
        got = {}
        for labels in (TASK, CONTROL):
            got[f"{labels}_full"] = counts(np.arange(n_neurons), labels)
            for (cond, k), members in sets.items():
                if cond == RANDOM:
                    got.update({f"{labels}_random_{k}_{i}": counts(m, labels) for i, m in enumerate(members)})
        return got

    refs = env.reference({**key, "kind": "probe-reference", "spec": spec.fingerprint(), "seed": env.seed,
                          "rows": hashlib.sha256(data.test_rows.tobytes()).hexdigest()}, shared)
    out = {}
    for labels in (TASK, CONTROL):
        out[("full", None, labels)] = refs[f"{labels}_full"][None]
        for (cond, k), members in sets.items():
            if cond == RANDOM:
                out[(cond, k, labels)] = np.stack([refs[f"{labels}_random_{k}_{i}"] for i in range(len(members))])
            else:
                out[(cond, k, labels)] = np.stack([counts(m, labels) for m in members])
    return out


def null_counts(spec: TaskSpec, data: ProbeData, sets, counts: dict, nulls: list[torch.Tensor], ks,
                seed: int) -> dict[tuple[str, float], np.ndarray]:
    """(top|bottom, k) -> (P, n_sentences) task-correct counts of each permuted-label ranking's
    k-set, P = len(nulls). A k-set equal to the method's own reuses its counts (a method that
    reads no labels retrains nothing)."""
    l2, steps = Params.of(spec).l2, Params.of(spec).lbfgs_steps
    rows: dict[tuple[str, float], list[np.ndarray]] = {(c, k): [] for c in (TOP, BOTTOM) for k in ks}
    for scores in nulls:
        extremes = extreme_sets(scores, ks, seed)
        for (cond, k), out in rows.items():
            members = extremes[(cond, k)]
            same = np.array_equal(members, sets[(cond, k)][0])
            out.append(counts[(cond, k, TASK)][0] if same else correct_counts(data, members, TASK, l2, steps))
    return {key: np.stack(v) for key, v in rows.items()}


def summarise(spec: TaskSpec, method: str, seed: int, counts: dict, nulls: dict, ks, n_neurons: int,
              boot: PairedBootstrap) -> list[Record]:
    """Accuracy, control accuracy and selectivity per condition and k, top-minus-bottom with its
    label null and their gap per k, the full probe's, and the headline `probe.tmb_gap@10` beside
    `probe.top_minus_bottom@10` and `probe.selectivity@10`, each with its interval."""
    def rec(metric: str, per_seed: np.ndarray, k: float | None = None) -> Record:
        value, low, high = boot.ci(per_seed)
        return record(spec, method, metric, value, seed, k=k, ci_low=low, ci_high=high)

    full_task, full_control = counts[("full", None, TASK)], counts[("full", None, CONTROL)]
    out = [rec("probe.full_accuracy", full_task), rec("probe.full_control_accuracy", full_control),
           rec("probe.full_selectivity", full_task - full_control)]
    for k in ks:
        out.append(record(spec, method, "probe.set_size", float(set_size(k, n_neurons)), seed, k=k))
        for cond in CONDITIONS:
            task, control = counts[(cond, k, TASK)], counts[(cond, k, CONTROL)]
            out += [rec(f"probe.acc.{cond}", task, k), rec(f"probe.control_acc.{cond}", control, k),
                    rec(f"probe.selectivity.{cond}", task - control, k)]
        tmb, null_tmb = counts[(TOP, k, TASK)] - counts[(BOTTOM, k, TASK)], nulls[(TOP, k)] - nulls[(BOTTOM, k)]
        out += [rec("probe.top_minus_bottom", tmb, k), rec(f"probe.top_minus_bottom.{NULL}", null_tmb, k),
                rec("probe.tmb_gap", tmb - null_tmb, k)]
    top, bottom = counts[(TOP, HEADLINE_K, TASK)], counts[(BOTTOM, HEADLINE_K, TASK)]
    out.append(rec(spec.headline, top - bottom - (nulls[(TOP, HEADLINE_K)] - nulls[(BOTTOM, HEADLINE_K)])))
    out.append(rec("probe.top_minus_bottom@10", top - bottom))
    out.append(rec("probe.selectivity@10", top - counts[(TOP, HEADLINE_K, CONTROL)]))
    return out


@register_task(SPEC, Params, Provides(labels=True))
def score(spec: TaskSpec, method: Method, env: RunEnv) -> list[Record]:
    """Rank the resid neurons with `method.relevance` (train split, then its permuted-label
    copies), retrain the probe on the top/bottom/random k-sets, and score task and control
    accuracy on the test split."""
    p = Params.of(spec)
    ks, n_seeds, n_null, n_boot = p.ks, p.random_seeds, p.null_permutations, p.bootstrap
    corpus = load(spec.data, spec.split_seed)
    if corpus.label_names is None or "word_labels" not in corpus.splits["train"].column_names:
        raise ValueError(f"probe: data {spec.data!r} has no word-level tags; use a tagged corpus such as wsj-pos")
    model = encoder(env, spec.model)
    train, train_id = corpus.splits["train"], f"{corpus.fingerprint}:train"
    if p.train_sentences is not None:
        train = subsample(train, p.train_sentences, spec.split_seed)
        train_id = f"{train_id}:{len(train)}@{spec.split_seed}"
    ctx = MethodContext(model=model, sites=model.sites(spec.sites), data=train, data_id=train_id, seed=env.seed,
                        label_names=corpus.label_names, cache=env.cache)
    answer = call_verb(method, spec.verb, ctx)
    null_scores = []
    for i in range(n_null):
        log.info("probe: asking %s again on permuted tags (%d of %d)", method.name, i + 1, n_null)
        null_scores.append(call_verb(method, spec.verb, null_context(ctx, env.seed, i)).overall())
    data = env.memo(("probe", spec.fingerprint(), "data"), lambda: prepare(spec, env, model, corpus, train, train_id))
    sets = neuron_sets(answer.overall(), ks, n_seeds, env.seed)
    key = {"model": model.fingerprint(), "model_name": model.name, "data": train_id}
    counts = evaluate(spec, env, data, sets, ctx.index.size, key)
    nulls = null_counts(spec, data, sets, counts, null_scores, ks, env.seed)
    words = data.words_per_sentence
    boot = PairedBootstrap(len(words), n_boot, env.seed, _BOOT_STREAM, den=words)
    return summarise(spec, method.name, env.seed, counts, nulls, ks, ctx.index.size, boot)
