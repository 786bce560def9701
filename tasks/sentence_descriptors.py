"""`sentence-descriptors`: the neuron-descriptor paper's setting (SEEDS.md section 3). A generative
LM discovers the vocabulary; a method names up to 10 descriptors per neuron; the harness scores
them against planted units (headline) and a held-out data-grounded truth.

A new task beside `descriptors` (word level, fixed POS/surface vocabulary), not a new version of
it: the unit (sentences), the vocabulary (discovered), the truth statistic and the planted design
all differ, and the word-level task stays a valid, comparable configuration.

Design:
- Data: the sentence corpus `data` is cut (split seed) 40/30/30 into discovery, calibration and
  validation parts, each subsampled to `per_part` sentences (generation on 2 CPU cores costs about
  1.9 s a sentence, measured). Words are the whitespace tokens.
- Vocabulary: the generator (`generator`, few-shot completion, greedy, cached; see
  `harness.engine.discovery`) proposes topics for every sentence; the proposals of the *discovery* part
  are normalised and clustered by MiniLM embedding (`cluster_similarity`) into at most
  `max_vocabulary` descriptors proposed for at least `min_support` sentences. No method ever sees
  the discovery part. A calibration or validation sentence carries the descriptors its proposals
  map to (`engine.discovery.assign`). The method is asked with the supported vocabulary: the
  descriptors carried by at least `min_positive` sentences of each of calibration and validation.
- Method input: the calibration sentences (`text`, `words`; `word_descriptors`, each word
  inheriting its sentence's descriptors, only for methods that declare `Needs(labels=True)`), and
  `ctx.proposer` (the generator's name). The method is asked about the `sites` of `model` and the planted FFN site.
- Sentence activation of a neuron: the mean over the sentence's words (last sub-token).
- Planted truth (headline): `n_planted` units appended to the FFN of `planted_layer` (BERT-style or
  gated MLPs; zero output weights, outputs unchanged). Unit j detects "the sentence carries a
  descriptor of D_j" (1-`max_planted_size` descriptors, seeded): its detector is a balanced ridge
  probe on the sentence-mean FFN input, fitted on calibration and validation. D_j is drawn so that
  the ideal unit (the exact indicator) has the data-grounded truth D_j on validation.
- Data-grounded truth: per neuron of `sites`, the supported descriptors whose validation Cohen's d
  (`truth_statistic`: mean sentence activation with the descriptor minus without, over the pooled
  standard deviation) is at least `d_threshold`. No baseline ranks by d (contrast: word-level
  AUROC; discovery: log odds among top sentences).
- Metrics per part, through the `evaluate` modules of `neuronbench.harness.engine.hf_metrics`:
  P@k, R@k (k in `ks`), the shuffled-answer null and `p_gap@k` as in `descriptors`; headline
  `sentence-descriptors.planted.p_gap@2` (no skill 0). The paper reports P@2 0.75, R@2 0.50.
- Intervals (v2): 95% percentile bootstrap (`metrics.PairedBootstrap`). Planted units whose sets
  share a descriptor are not independent: their detectors respond to the same sentences, so a
  method's chance association with that descriptor (e.g. under permuted descriptors) moves all of
  them at once; v1's unit bootstrap treated them as independent and was too narrow. The planted
  part's units and descriptors are crossed, and a cluster bootstrap over the connected components
  of "shares a descriptor" degenerates (the default's 32 sets of 1-3 of the 8 supported
  descriptors form a single component at seeds 0 and 1, measured). So each replicate resamples the
  planted units and, independently, the descriptors (the pigeonhole bootstrap for crossed designs,
  Owen 2007, mildly conservative): a unit weighs the mean draw count of its set's descriptors. The
  data truth resamples neurons, as v1 did; its intervals are unchanged.
  Description metrics (NeuronEval): correlation, AUPRC, F1, IoU between each scored neuron's
  validation activations and the presence of the method's first descriptor (`desc_<metric>`), and
  each metric's missing-/extra-label sanity pass rates on the planted units
  (`metric_sanity.<metric>.missing|extra|passed`); a metric that fails is recorded, never a headline.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import datasets
import numpy as np

from neuronbench.harness.engine import description
from neuronbench.harness.engine.activations import collect_cached
from neuronbench.harness.engine.cache import data_fingerprint
from neuronbench.harness.engine.collect import CollectConfig
from neuronbench.harness.engine.data import load, subsample
from neuronbench.harness.engine.discovery import (Vocabulary, assign, cluster, make_embedder, make_proposer,
                                                  normalise, propose, sentence_means)
from neuronbench.harness.engine.method import Method, MethodContext, NotApplicable, Provides, call_verb
from neuronbench.harness.engine.metrics import PairedBootstrap, cohen_d
from neuronbench.harness.engine.models import LoadedModel
from neuronbench.tasks._planting import Planted, ffn_inputs, fit_detectors, plant_units
from neuronbench.harness.engine.records import Record
from neuronbench.harness.engine.sites import Site
from neuronbench.harness.suite.task import RunEnv, Takes, TaskParams, TaskSpec, record, register_task
from neuronbench.harness.engine.hf_metrics import load as load_metric

from .descriptors import shuffled_at_k

log = logging.getLogger(__name__)

NAME = "sentence-descriptors"


@dataclass(frozen=True)
class Params(TaskParams):
    """sentence-descriptors' parameters (the module docstring gives the design).

    Attributes:
        per_part: sentences of each of the discovery, calibration and validation parts.
        generator: the generator that proposes topics (`discovery.make_proposer`).
        embedder: the embedder that clusters proposals (`discovery.make_embedder`).
        cluster_similarity: cosine similarity in (0, 1] at which proposals join a descriptor.
        min_support: discovery sentences a descriptor needs to enter the vocabulary.
        max_vocabulary: descriptors kept at most.
        min_positive: calibration and validation sentences a descriptor needs to be asked about.
        truth_statistic: the data truth's statistic (only "cohen_d").
        d_threshold: Cohen's d a neuron needs for a descriptor to enter its truth (positive).
        n_planted: planted units (positive).
        planted_layer: the layer whose FFN gets the planted units (negative counts from the end).
        max_planted_size: descriptors a planted unit detects at most (positive).
        planted_gain: the planted detectors' gain (positive).
        ridge: the detectors' ridge penalty (non-negative).
        ks: the k of P@k and R@k (positive integers).
        description_metrics: names in `description.METRICS`.
        active_fraction: share of inputs a neuron is active on, in (0, 1), for F1 and IoU.
        sanity_trials: trials of each metric's label tests (positive).
        sanity_pass_rate: pass rate in [0, 1] a metric needs in its label tests.
        bootstrap: bootstrap replicates of each interval (positive).
    """

    per_part: int
    generator: str
    embedder: str
    cluster_similarity: float
    min_support: int
    max_vocabulary: int
    min_positive: int
    truth_statistic: str
    d_threshold: float
    n_planted: int
    planted_layer: int
    max_planted_size: int
    planted_gain: float
    ridge: float
    ks: tuple[int, ...]
    description_metrics: tuple[str, ...]
    active_fraction: float
    sanity_trials: int
    sanity_pass_rate: float
    bootstrap: int

    def __post_init__(self) -> None:
        def integer(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        positive = ("per_part", "min_support", "max_vocabulary", "min_positive", "n_planted", "max_planted_size",
                    "sanity_trials", "bootstrap")
        checks = [*((n, integer(getattr(self, n)) and getattr(self, n) >= 1, "use a positive integer")
                    for n in positive),
                  ("planted_layer", integer(self.planted_layer), "use an integer layer (negative counts from the end)"),
                  ("cluster_similarity", 0 < self.cluster_similarity <= 1, "use a cosine similarity in (0, 1]"),
                  ("truth_statistic", self.truth_statistic == "cohen_d", 'only "cohen_d" is implemented'),
                  ("d_threshold", self.d_threshold > 0, "use a positive number"),
                  ("planted_gain", self.planted_gain > 0, "use a positive number"),
                  ("ridge", self.ridge >= 0, "use a non-negative penalty"),
                  ("ks", bool(self.ks) and all(integer(k) and k >= 1 for k in self.ks),
                   "use a non-empty tuple of positive integers"),
                  ("description_metrics", bool(self.description_metrics)
                   and set(self.description_metrics) <= set(description.METRICS),
                   f"use names among {tuple(description.METRICS)}"),
                  ("active_fraction", 0 < self.active_fraction < 1, "use a share in (0, 1)"),
                  ("sanity_pass_rate", 0 <= self.sanity_pass_rate <= 1, "use a rate in [0, 1]")]
        for name, ok, need in checks:
            if not ok:
                raise ValueError(f"{NAME}: {name}={getattr(self, name)!r}; {need}")

SPEC = TaskSpec(
    name=NAME, version=2, verb="descriptors", model="minilm", data="polarity", sites="resid",
    headline=f"{NAME}.planted.p_gap@2", no_skill=0.0,
    params=Params(per_part=300, generator="smollm2-135m", embedder="minilm", cluster_similarity=0.8,
                  min_support=5, max_vocabulary=60, min_positive=10, truth_statistic="cohen_d", d_threshold=0.8,
                  n_planted=32, planted_layer=-1, max_planted_size=3, planted_gain=10.0, ridge=1e-2, ks=(1, 2, 5),
                  description_metrics=tuple(description.METRICS), active_fraction=description.ACTIVE_FRACTION,
                  sanity_trials=5, sanity_pass_rate=0.9, bootstrap=1000),
    quick=(("model", "minilm-polarity-tiny"), ("generator", "stub"), ("per_part", 80), ("n_planted", 6),
           ("min_positive", 5), ("min_support", 3), ("bootstrap", 200)),
    description="P@k/R@k of per-neuron descriptors from a generator-discovered vocabulary vs planted units "
                "(headline) and held-out Cohen's d truth, on sentences",
    takes=Takes(models=("base", "classifier", "causal-lm")))

_MAX_DRAWS = 5000
_SHUFFLE_STREAM = 11
_BOOT_STREAM = 13


def parts(spec: TaskSpec) -> dict[str, datasets.Dataset]:
    """The discovery, calibration and validation parts (`id`, `text`, `words`)."""
    corpus = load(spec.data, seed=spec.split_seed, fractions=(0.4, 0.3, 0.3))
    out = {}
    for name, split in (("discovery", "train"), ("calibration", "dev"), ("validation", "test")):
        part = subsample(corpus.splits[split], Params.of(spec).per_part, spec.split_seed)
        out[name] = datasets.Dataset.from_dict({"id": list(part["id"]), "text": list(part["text"]),
                                                "words": [t.split() for t in part["text"]]})
    return out


def choose_planted_sets(valid_SV: np.ndarray, supported: np.ndarray, n: int, max_size: int, threshold: float,
                        rng: np.random.Generator) -> list[tuple[int, ...]]:
    """`n` distinct sets of supported descriptors, each kept only if the ideal unit ("carries one
    of them") has exactly that truth set on validation. Unit j tries size 1 + j % max_size first,
    then the other sizes (a small vocabulary has few exact single descriptors)."""
    eligible, chosen = np.flatnonzero(supported), []

    def exact(cand: tuple[int, ...]) -> bool:
        ideal = valid_SV[:, list(cand)].any(1, keepdims=True)
        return set(np.flatnonzero((cohen_d(ideal, valid_SV)[:, 0] >= threshold) & supported).tolist()) == set(cand)

    for j in range(n):
        first = 1 + j % max_size
        for size in (first, *(s for s in range(1, max_size + 1) if s != first)):
            draws = (tuple(sorted(rng.choice(eligible, size, replace=False).tolist()))
                     for _ in range(_MAX_DRAWS if len(eligible) >= size else 0))
            found = next((c for c in draws if c not in chosen and exact(c)), None)
            if found:
                chosen.append(found)
                break
        else:
            raise ValueError(f"found no new descriptor set of at most {max_size} whose indicator has exactly that "
                             f"truth set ({len(eligible)} supported descriptors, {len(chosen)} sets so far); "
                             "lower n_planted or raise max_planted_size")
    return chosen


@dataclass
class _Setup:
    """What the harness prepares once per run, before asking any method."""

    vocab: Vocabulary
    calib: datasets.Dataset          # text, words, word_descriptors
    valid: datasets.Dataset          # text, words
    present_v: np.ndarray            # (S_valid, V) descriptor presence on validation
    kept_v: np.ndarray               # (W_valid,) validation words that kept a token
    supported: np.ndarray            # (V,)
    planted: Planted
    sets: list[tuple[int, ...]]


def _presence(descs: list[list[str]], names: tuple[str, ...]) -> np.ndarray:
    col = {d: i for i, d in enumerate(names)}
    out = np.zeros((len(descs), len(names)), dtype=bool)
    for s, ds in enumerate(descs):
        out[s, [col[d] for d in ds]] = True
    return out


def _prepare(spec: TaskSpec, model: LoadedModel, cfg: CollectConfig, seed: int) -> _Setup:
    """Generate, discover the vocabulary, label calibration and validation, plant the units."""
    p = Params.of(spec)
    data = parts(spec)
    texts = [t for name in ("discovery", "calibration", "validation") for t in data[name]["text"]]
    completions, cost = propose(make_proposer(p.generator), texts, progress=True)
    log.info("%s: generation %s", NAME, cost)
    terms = [normalise(c) for c in completions]
    n_d, n_c = len(data["discovery"]), len(data["calibration"])
    embed = make_embedder(p.embedder)
    vocab = cluster(terms[:n_d], embed, p.cluster_similarity, p.min_support, p.max_vocabulary)
    descs = assign(terms[n_d:], vocab.names, vocab.centres, embed, p.cluster_similarity)
    present = _presence(descs, vocab.names)
    present_c, present_v = present[:n_c], present[n_c:]
    supported = (present_c.sum(0) >= p.min_positive) & (present_v.sum(0) >= p.min_positive)
    calib = data["calibration"].add_column(
        "word_descriptors", [[ds] * len(w) for ds, w in zip(descs[:n_c], data["calibration"]["words"])])
    both = datasets.concatenate_datasets([data["calibration"], data["validation"]])
    layer = p.planted_layer % model.num_layers
    inputs, kept = ffn_inputs(model, layer, both, cfg.max_length, cfg.max_tokens)
    x = sentence_means(inputs, kept, [len(w) for w in both["words"]])
    sets = choose_planted_sets(present_v, supported, p.n_planted, p.max_planted_size,
                               p.d_threshold, np.random.default_rng(seed))
    targets = np.stack([present[:, list(s)].any(1) for s in sets], 1)
    weight, bias = fit_detectors(x, targets, p.ridge, p.planted_gain)
    n_cw = sum(len(w) for w in data["calibration"]["words"])
    return _Setup(vocab, calib, data["validation"], present_v, kept[n_cw:], supported,
                  plant_units(model, layer, weight, bias, seed=seed), sets)


def _interval(values: np.ndarray, n_boot: int, seed: int, sets: list[tuple[int, ...]] | None = None):
    """Percentile interval of the mean of `values` over resampled units, crossed with resampled
    descriptors when `sets` gives each unit's descriptor indices (see the module docstring)."""
    if len(values) < 2:
        return None, None
    groups = None
    if sets is not None:
        groups = np.zeros((len(sets), 1 + max(v for s in sets for v in s)), dtype=bool)
        for i, s in enumerate(sets):
            groups[i, list(s)] = True
    boot = PairedBootstrap(len(values), n_boot, seed, _BOOT_STREAM, groups=groups)
    return boot.ci(np.asarray(values, dtype=np.float64)[None, :])[1:]


def part_records(spec: TaskSpec, method: str, seed: int, part: str, answer, truth: dict[int, set[str]],
                 n_boot: int, sets: dict[int, tuple[int, ...]] | None = None) -> list[Record]:
    """P@k, R@k (the `neuron_precision_at_k` module), the shuffled null and p_gap, with intervals
    over resampled neurons, crossed with resampled descriptors where `sets` (neuron -> the
    descriptor indices it detects) is given."""
    name = f"{NAME}.{part}"
    out = [record(spec, method, f"{name}.n_scored", float(len(truth)), seed)]
    if not truth:
        log.warning("%s: no %s neuron has a truth set; nothing to score", NAME, part)
        return out
    module, neurons = load_metric("neuron_precision_at_k"), list(truth)
    labels = None if sets is None else [sets[n] for n in neurons]
    ks = Params.of(spec).ks
    shuffled = shuffled_at_k(answer, truth, ks, np.random.default_rng([seed, _SHUFFLE_STREAM]))
    for k in ks:
        res = module.compute(predictions=[list(answer.get(n, [])) for n in neurons],
                             references=[sorted(truth[n]) for n in neurons], k=k)
        p, r = np.asarray(res["per_item_precision"]), np.asarray(res["per_item_recall"])
        for metric, v in (("p", p), ("r", r), ("p_shuffled", shuffled[k]), ("p_gap", p - shuffled[k])):
            lo, hi = _interval(v, n_boot, seed, labels)
            out.append(record(spec, method, f"{name}.{metric}@{k}", float(v.mean()), seed, k=float(k),
                              ci_low=lo, ci_high=hi))
    return out


def description_records(spec: TaskSpec, method: str, seed: int, part: str, answer, acts: dict[int, np.ndarray],
                        present: np.ndarray, names: tuple[str, ...], n_boot: int,
                        sets: dict[int, tuple[int, ...]] | None = None) -> list[Record]:
    """Each description metric between a neuron's activations and its first descriptor's presence
    (intervals as in `part_records`)."""
    col, p = {d: i for i, d in enumerate(names)}, Params.of(spec)
    answered = [n for n in acts if answer.get(n)]
    items = [(acts[n], present[:, col[answer[n][0]]]) for n in answered]
    labels = None if sets is None else [sets[n] for n in answered]
    if not items:
        return []
    res = load_metric("neuron_description").compute(
        predictions=[a.astype(np.float32) for a, _ in items], references=[y.astype(np.int8) for _, y in items],
        metrics=p.description_metrics, active_fraction=p.active_fraction)
    out = []
    for metric in p.description_metrics:
        v = np.asarray(res[f"per_item_{metric}"])
        lo, hi = _interval(v, n_boot, seed, labels)
        out.append(record(spec, method, f"{NAME}.{part}.desc_{metric}@1", float(v.mean()), seed, k=1.0,
                          ci_low=lo, ci_high=hi))
    return out


def metric_sanity(spec: TaskSpec, unit_acts: np.ndarray, unit_present: np.ndarray, seed: int) -> dict:
    """metric -> {missing, extra, passed}: NeuronEval's label tests on the planted units."""
    out, p = {}, Params.of(spec)
    for metric in p.description_metrics:
        rates = description.sanity_pass_rates(unit_acts, unit_present, description.METRICS[metric], seed,
                                              p.sanity_trials, p.active_fraction)
        out[metric] = {**rates, "passed": float(min(rates.values()) >= p.sanity_pass_rate)}
    return out


def _validation_truth(col, setup: _Setup, sites, index, rows: np.ndarray, threshold: float):
    """Per `resid` neuron with a non-empty truth, its supported descriptors with validation d >=
    `threshold` and its sentence activations; and the planted units' activations (S, P)."""
    n_words = [len(w) for w in setup.valid["words"]]
    present, names, planted = setup.present_v[rows], setup.vocab.names, setup.planted
    data_truth, data_acts, unit_acts = {}, {}, None
    for site in sites:
        acts = sentence_means(np.asarray(col.dense_words[site]), setup.kept_v, n_words)[rows]  # (S, N)
        if site == planted.site:
            unit_acts = acts[:, list(planted.units)]
            continue
        passing = (cohen_d(acts, present) >= threshold) & setup.supported[:, None]  # (V, N)
        for i in np.flatnonzero(passing.any(0)):
            data_truth[index.offset(site) + int(i)] = {names[v] for v in np.flatnonzero(passing[:, i])}
            data_acts[index.offset(site) + int(i)] = acts[:, i]
    return data_truth, data_acts, unit_acts


@register_task(SPEC, Params, Provides(labels=True))
def score(spec: TaskSpec, method: Method, env: RunEnv) -> list[Record]:
    """Discover the vocabulary and plant units (once per run), ask `method.descriptors` on the
    calibration part, score against the planted and validation truths."""
    p = Params.of(spec)
    n_boot = p.bootstrap
    model = env.model(spec.model)
    layer = p.planted_layer % model.num_layers
    cfg = CollectConfig(sites=(*model.sites(spec.sites), Site.ffn(layer)), stats=(), dense_words=True,
                        alignment="last")
    setup = env.memo((NAME, spec.fingerprint(), env.seed), lambda: _prepare(spec, model, cfg, env.seed))
    planted, names = setup.planted, setup.vocab.names
    asked = tuple(d for d, ok in zip(names, setup.supported) if ok)
    data = setup.calib if method.needs.labels else setup.calib.remove_columns("word_descriptors")
    ctx = MethodContext(planted.model, cfg.sites, data, f"{NAME}:{data_fingerprint(data)}", seed=env.seed,
                        cache=env.cache, collect_defaults={"alignment": cfg.alignment}, proposer=p.generator)
    answer = call_verb(method, spec.verb, ctx, asked)
    if isinstance(answer, NotApplicable):
        log.info("%s", answer)
        return [record(spec, method.name, f"{NAME}.not_applicable", None, env.seed, status="not_applicable")]

    col, _ = collect_cached(planted.model, setup.valid, cfg, data_id=f"{NAME}:{data_fingerprint(setup.valid)}",
                            cache=env.cache, progress=env.progress)
    rows = env.scoring_rows(len(setup.valid), None, spec.split_seed)
    present = setup.present_v[rows]
    index, out = ctx.index, []
    data_truth, data_acts, unit_acts = _validation_truth(col, setup, cfg.sites, index, rows, p.d_threshold)
    planted_truth = {index.offset(planted.site) + u: {names[v] for v in s} for u, s in zip(planted.units, setup.sets)}
    planted_acts = {index.offset(planted.site) + u: unit_acts[:, j] for j, u in enumerate(planted.units)}
    groups = dict(zip(planted_truth, setup.sets))
    unit_present = np.stack([present[:, list(s)].any(1) for s in setup.sets], 1)
    # Fidelity: the share of (unit, descriptor of D_j) pairs whose validation d reaches the threshold.
    unit_d = np.concatenate([cohen_d(unit_acts[:, [j]], present[:, list(s)])[:, 0] for j, s in enumerate(setup.sets)])
    for part, truth, acts, sets in (("planted", planted_truth, planted_acts, groups),
                                    ("data", data_truth, data_acts, None)):
        out += part_records(spec, method.name, env.seed, part, answer, truth, n_boot, sets)
        out += description_records(spec, method.name, env.seed, part, answer, acts, present, names, n_boot, sets)
    for metric, res in env.memo((NAME, "sanity", spec.fingerprint(), env.seed),
                                lambda: metric_sanity(spec, unit_acts, unit_present, env.seed)).items():
        out += [record(spec, method.name, f"{NAME}.metric_sanity.{metric}.{t}", v, env.seed) for t, v in res.items()]
    return [*out, record(spec, method.name, f"{NAME}.planted.fidelity", float(np.mean(unit_d >= p.d_threshold)),
                         env.seed),
            record(spec, method.name, f"{NAME}.vocabulary_size", float(len(asked)), env.seed),
            record(spec, method.name, f"{NAME}.discovered_size", float(len(names)), env.seed)]
