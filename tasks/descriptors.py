"""`descriptors`: a method names up to 10 descriptors per neuron from a fixed vocabulary (gold POS
tags and surface features of WSJ words); scored by precision/recall@k against two ground truths,
reported apart: data-grounded (held-out word-level AUROC) and planted (synthetic units).

Design (SEEDS.md section 3):
- Vocabulary: `pos:TAG` for the 44 tags of the WSJ sample, and surface descriptors computed from the
  word alone (`cap`, `num`, `punct`, `suffix:ing|ed|ly|s`, `stop`; rules in `describe`). A word's
  descriptors are all those that hold for it (`word_descriptors`).
- Polarity is left out. WSJ has none, and a second, movie-review part would confound it with the
  domain (review vs newswire words, lower-cased text, no POS tags there); within the review
  sentences alone the best MiniLM resid neuron separates words of positive from negative sentences
  at AUROC 0.58 (31k words, measured), far below the 0.8 threshold: it would never be in a truth set.
- The WSJ lines are cut in two halves (split seed): the method reads the calibration half only;
  the harness keeps the validation half. The method is asked with the supported vocabulary: the
  entries with at least `min_positive` words in each half (rare tags such as `pos:UH` can never
  reach a truth set; asking for them would score a method's handling of 1-word samples).
- Data-grounded truth of a `resid` neuron: the supported descriptors whose validation-word
  activation AUROC (words with vs without the descriptor, last sub-token, words left without a
  token dropped) is at least `auroc_threshold`. Only the "fires more" direction counts; neurons
  with an empty truth set are not scored.
- Planted truth: `n_planted` units appended to the FFN of `planted_layer` in a copy of the model
  (see `tasks/_planting.py`; zero output weights, so outputs are unchanged). Unit j detects "the word
  carries a descriptor of D_j" (1-3 descriptors, seeded by the run seed): its input row is a
  balanced linear probe fitted on both halves. D_j is drawn so that the ideal unit (the exact
  indicator) has the data-grounded truth set D_j on the validation half, no more, no less; so a
  correlated descriptor outside D_j never passes the threshold. Units sit at random positions of
  `ffn.<planted_layer>`; the method is asked about the `resid` sites and that site together and is
  not told which units are planted; the site's original units are not scored.
- Metrics per part: P@k = |top-k & truth| / k and R@k = |top-k & truth| / |truth| for k in `ks`,
  averaged over scored neurons (a neuron the method leaves out ranks nothing), with bootstrap
  intervals over neurons. Chance (a uniform random ranking): P@k = mean |truth| / |V| and
  R@k = k / |V| (|V| the supported vocabulary), recorded as `chance_p@k` / `chance_r@k`. The
  headline's null is sharper: `p_shuffled@k`, the P@k of the method's own lists handed to other
  scored neurons (`shuffled_at_k`), and `p_gap@k` = P@k - p_shuffled@k per neuron (headline
  `descriptors.data.p_gap@2`, no skill 0).
  `planted.fidelity` is the share of (unit, descriptor of D_j) pairs whose validation AUROC
  reaches the threshold (how well the planted units follow their design).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import datasets
import numpy as np
import torch

from neuronbench.harness.engine.activations import collect_cached
from neuronbench.harness.engine.cache import data_fingerprint
from neuronbench.harness.engine.collect import CollectConfig
from neuronbench.harness.engine import metrics
from neuronbench.harness.engine.data import descriptor_matrix, load, subsample
from neuronbench.harness.engine.method import Method, MethodContext, Provides, call_verb
from neuronbench.harness.engine.metrics import bootstrap_ci, precision_recall_at_k
from neuronbench.harness.engine.models import LoadedModel
from neuronbench.tasks._planting import Planted, ffn_inputs, fit_detectors, plant_units
from neuronbench.harness.engine.records import Record
from neuronbench.harness.engine.sites import Site
from neuronbench.harness.suite.task import RunEnv, Takes, TaskParams, TaskSpec, record, register_task

log = logging.getLogger(__name__)

POS_TAGS = ("$", "''", "(", ")", ",", ".", ":", "CC", "CD", "DT", "EX", "FW", "IN", "JJ", "JJR", "JJS", "LS",
            "MD", "NN", "NNP", "NNPS", "NNS", "PDT", "POS", "PRP", "PRP$", "RB", "RBR", "RBS", "RP", "SYM",
            "TO", "UH", "VB", "VBD", "VBG", "VBN", "VBP", "VBZ", "WDT", "WP", "WP$", "WRB", "``")
SUFFIXES = ("ing", "ed", "ly", "s")
SURFACE = ("cap", "num", "punct", *(f"suffix:{s}" for s in SUFFIXES), "stop")
VOCABULARY = (*(f"pos:{t}" for t in POS_TAGS), *SURFACE)
STOP_WORDS = ("a", "about", "after", "all", "an", "and", "any", "are", "as", "at", "be", "been", "before",
              "being", "but", "by", "can", "could", "did", "do", "does", "for", "from", "had", "has", "have",
              "he", "her", "him", "his", "i", "if", "in", "into", "is", "it", "its", "me", "more", "most",
              "my", "no", "not", "of", "on", "or", "our", "she", "should", "so", "some", "than", "that",
              "the", "their", "them", "then", "there", "these", "they", "this", "those", "to", "up", "was",
              "we", "were", "what", "when", "which", "who", "will", "with", "would", "you", "your")

@dataclass(frozen=True)
class Params(TaskParams):
    """descriptors' parameters.

    Attributes:
        vocabulary: the descriptors a method may name (`pos:TAG`, surface classes).
        stop_words: the words the `stop` descriptor holds for.
        auroc_threshold: the held-out AUROC at which a descriptor is true of a neuron, in (0.5, 1).
        min_positive: words a descriptor needs in each half to be asked about.
        n_planted, max_planted_size: planted units, and the most descriptors one unit detects.
        planted_layer: the FFN layer the units are planted in (negative counts from the end).
        planted_gain, ridge: the planted detectors' gain and ridge penalty.
        ks: the k of P@k and R@k.
        bootstrap: bootstrap resamples of each interval.
        limit: sentences of the tagged data used (None = all).
    """

    vocabulary: tuple[str, ...]
    stop_words: tuple[str, ...]
    auroc_threshold: float
    min_positive: int
    n_planted: int
    planted_layer: int
    max_planted_size: int
    planted_gain: float
    ridge: float
    ks: tuple[int, ...]
    bootstrap: int
    limit: int | None

    def __post_init__(self) -> None:
        if not 0.5 < self.auroc_threshold < 1:
            raise ValueError(f"descriptors: auroc_threshold={self.auroc_threshold!r} must be in (0.5, 1)")
        for name in ("min_positive", "n_planted", "max_planted_size", "bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"descriptors: {name}={value!r} must be a positive integer")
        if not self.ks or any(not isinstance(k, int) or k < 1 for k in self.ks):
            raise ValueError(f"descriptors: ks={self.ks!r} must be positive integers, e.g. (1, 2, 5)")


# Headline: P@2 minus the P@2 of the method's own answers shuffled across neurons (`p_gap`), no
# skill = 0, since truths and answers both favour the descriptors any feature detects easily (why
# P@2 against uniform chance was dropped: CHANGELOG.md). P@k, R@k and uniform chance are still
# recorded (the paper's 75% P@2 is a P@2).
SPEC = TaskSpec(
    name="descriptors", version=2, verb="descriptors", model="minilm", data="wsj-pos", sites="resid",
    headline="descriptors.data.p_gap@2", no_skill=0.0,
    params=Params(vocabulary=VOCABULARY, stop_words=STOP_WORDS, auroc_threshold=0.8, min_positive=20,
                  n_planted=36, planted_layer=-1, max_planted_size=3, planted_gain=10.0, ridge=1e-3,
                  ks=(1, 2, 5), bootstrap=1000, limit=None),
    quick=(("model", "minilm-polarity-tiny"), ("n_planted", 12), ("bootstrap", 200), ("limit", 300)),
    description="P@k/R@k of per-neuron descriptors vs held-out AUROC truth (resid) and planted FFN units",
    takes=Takes(models=("base", "classifier", "causal-lm")))

# Permutations of the shuffled-answer null (see `shuffled_at_k`) and its generator stream.
_SHUFFLES, _SHUFFLE_STREAM = 20, 11
_NUM = re.compile(r"[\d.,:/%+-]*\d[\d.,:/%+-]*")
_MAX_DRAWS = 5000  # attempts at drawing one planted set before giving up


def describe(word: str, tag: str | None, stop_words: tuple[str, ...] = STOP_WORDS) -> list[str]:
    """The descriptors that hold for `word` (gold POS `tag`, None for none), in vocabulary order.

    `cap`: the first character is an upper-case letter. `num`: only digits and `.,:/%+-`, at least
    one digit. `punct`: no letter or digit. `suffix:X`: alphabetic, lower-cased ends with X and at
    least two letters precede it (`suffix:s` excludes `-ss`). `stop`: lower-cased in `stop_words`.
    """
    low = word.lower()
    out = [f"pos:{tag}"] if tag is not None else []
    if word[:1].isupper():
        out.append("cap")
    if _NUM.fullmatch(word):
        out.append("num")
    if not any(c.isalnum() for c in word):
        out.append("punct")
    if word.isalpha():
        out += [f"suffix:{s}" for s in SUFFIXES
                if low.endswith(s) and len(low) >= len(s) + 2 and not (s == "s" and low.endswith("ss"))]
    if low in stop_words:
        out.append("stop")
    return out


def describe_dataset(ds: datasets.Dataset, label_names, stop_words) -> datasets.Dataset:
    """`id`, `words` and `word_descriptors` of a tagged split (the POS labels become `pos:` descriptors)."""
    descs = [[describe(w, label_names[t], stop_words) for w, t in zip(words, tags)]
             for words, tags in zip(ds["words"], ds["word_labels"])]
    return datasets.Dataset.from_dict({"id": list(ds["id"]), "words": list(ds["words"]), "word_descriptors": descs})


def descriptor_labels(ds: datasets.Dataset, vocabulary: tuple[str, ...]) -> np.ndarray:
    """(W, V) bool: word w (dataset order) carries descriptor v."""
    return descriptor_matrix(ds, vocabulary).numpy()


def auroc_matrix(acts: np.ndarray, labels: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(V, N) AUROC of every activation column for every label column (ties count half)."""
    return metrics.auroc_matrix(acts, torch.as_tensor(labels), chunk_elems=chunk * max(len(acts), 1)).numpy()


def truth_sets(auc: np.ndarray, supported: np.ndarray, vocabulary, threshold: float) -> list[set[str]]:
    """Per neuron (column of `auc`), the supported descriptors with AUROC >= threshold."""
    passing = (np.nan_to_num(auc, nan=0.0) >= threshold) & supported[:, None]
    return [{vocabulary[v] for v in np.flatnonzero(col)} for col in passing.T]


def ideal_truth(labels: np.ndarray, members: list[int], supported: np.ndarray, threshold: float) -> set[int]:
    """Data-grounded truth (descriptor indices) of a unit equal to "carries one of `members`"."""
    z = labels[:, members].any(1).astype(np.float64)
    y = labels.astype(np.float64)
    pos, neg = y.sum(0), len(y) - y.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = 0.5 + 0.5 * (z @ y / pos - z @ (1 - y) / neg)  # a 0/1 score: 1/2 + (TPR - FPR)/2
    return set(np.flatnonzero((np.nan_to_num(auc) >= threshold) & supported).tolist())


def choose_planted_sets(valid: np.ndarray, supported: np.ndarray, n: int, max_size: int, threshold: float,
                        rng: np.random.Generator) -> list[tuple[int, ...]]:
    """`n` distinct sets of supported descriptors (indices), sizes cycling 1..max_size, each kept
    only if its ideal unit's truth on the validation words `valid` (W, V) is exactly the set."""
    eligible = np.flatnonzero(supported)
    chosen: list[tuple[int, ...]] = []
    for j in range(n):
        size = 1 + j % max_size
        for _ in range(_MAX_DRAWS):
            cand = tuple(sorted(rng.choice(eligible, size, replace=False).tolist())) if len(eligible) >= size else ()
            if cand and cand not in chosen and ideal_truth(valid, list(cand), supported, threshold) == set(cand):
                chosen.append(cand)
                break
        else:
            raise ValueError(f"found no descriptor set of size {size} whose indicator has exactly that truth "
                             f"set ({len(eligible)} eligible descriptors); lower n_planted or max_planted_size, "
                             "or use more data")
    return chosen


def at_k(answer: dict[int, list[str]], truth: dict[int, set[str]], ks) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """k -> (P@k, R@k) per scored neuron (in `truth` order)."""
    out = {}
    for k in ks:
        pr = np.array([precision_recall_at_k(list(answer.get(n, [])), t, k) for n, t in truth.items()])
        out[k] = (pr[:, 0], pr[:, 1]) if len(pr) else (np.zeros(0), np.zeros(0))
    return out


def shuffled_at_k(answer: dict[int, list[str]], truth: dict[int, set[str]], ks, rng: np.random.Generator,
                  n_shuffles: int = _SHUFFLES) -> dict[int, np.ndarray]:
    """k -> per scored neuron, the mean P@k of other scored neurons' answers against its truth.

    The permutation null of the method's own answers: each of `n_shuffles` random permutations of
    the scored neurons hands every neuron another one's descriptor list. It keeps what the method
    says overall (e.g. that `pos:,` and `punct` are easy to detect) and only breaks which neuron it
    says it of, so a method whose lists carry no neuron-specific knowledge scores it exactly.
    """
    neurons = list(truth)
    lists = [list(answer.get(n, [])) for n in neurons]
    out = {k: np.zeros(len(neurons)) for k in ks}
    for _ in range(n_shuffles):
        perm = rng.permutation(len(neurons))
        for k in ks:
            out[k] += [precision_recall_at_k(lists[j], truth[n], k)[0] for n, j in zip(neurons, perm)]
    return {k: v / n_shuffles for k, v in out.items()}


def part_records(spec: TaskSpec, method: str, seed: int, part: str, answer, truth, ks, n_vocab: int,
                 n_boot: int) -> list[Record]:
    """P@k, R@k (bootstrap over neurons), chance and the number of scored neurons of one part."""
    name = f"descriptors.{part}"
    out = [record(spec, method, f"{name}.n_scored", float(len(truth)), seed)]
    if not truth:
        log.warning("descriptors: no %s neuron has a truth set; nothing to score", part)
        return out
    mean_size = float(np.mean([len(t) for t in truth.values()]))
    shuffled = shuffled_at_k(answer, truth, ks, np.random.default_rng([seed, _SHUFFLE_STREAM]))
    for k, (p, r) in at_k(answer, truth, ks).items():
        gap = p - shuffled[k]
        for metric, v in (("p", p), ("r", r), ("p_shuffled", shuffled[k]), ("p_gap", gap)):
            ci = bootstrap_ci(lambda idx, v=v: v[idx].mean(), len(v), n_boot, seed) if len(v) > 1 else (None, None)
            out.append(record(spec, method, f"{name}.{metric}@{k}", float(v.mean()), seed, k=float(k),
                              ci_low=ci[0], ci_high=ci[1]))
        for metric, chance in (("chance_p", mean_size / n_vocab), ("chance_r", min(k, n_vocab) / n_vocab)):
            out.append(record(spec, method, f"{name}.{metric}@{k}", chance, seed, k=float(k)))
    return out


def _halves(spec: TaskSpec):
    """The calibration and validation halves (tagged), and the tag names."""
    corpus = load(spec.data, seed=spec.split_seed, fractions=(0.5, 0.5, 0.0))
    p = Params.of(spec)
    limit = p.limit
    halves = [corpus.splits[s] for s in ("train", "dev")]
    if limit is not None:
        halves = [subsample(h, max(1, limit // 2), spec.split_seed) for h in halves]
    unknown = sorted(set(corpus.label_names) - {d[4:] for d in p.vocabulary if d.startswith("pos:")})
    if unknown:
        raise ValueError(f"descriptors: tags {unknown} of {spec.data!r} are not in the vocabulary; add `pos:` entries")
    return halves, corpus.label_names


@dataclass
class _Setup:
    """What the harness prepares before asking the method."""

    calib: datasets.Dataset
    valid: datasets.Dataset
    labels_v: np.ndarray      # (W_valid kept, V) descriptor indicators of the validation words
    kept_v: np.ndarray        # (W_valid,) validation words that kept a token
    supported: np.ndarray     # (V,) descriptors with min_positive words in each half
    planted: Planted
    sets: list[tuple[int, ...]]


def _prepare(spec: TaskSpec, model: LoadedModel, cfg: CollectConfig, seed: int) -> _Setup:
    """Describe both halves, draw the planted sets and plant their units into a copy of `model`."""
    p = Params.of(spec)
    vocab, thr = tuple(p.vocabulary), float(p.auroc_threshold)
    (calib_raw, valid_raw), tags = _halves(spec)
    calib, valid = (describe_dataset(h, tags, tuple(p.stop_words)) for h in (calib_raw, valid_raw))
    both = datasets.concatenate_datasets([calib, valid])
    layer = p.planted_layer % model.num_layers
    inputs, kept = ffn_inputs(model, layer, both, cfg.max_length, cfg.max_tokens)
    labels = descriptor_labels(both, vocab)
    n_cal = sum(len(w) for w in calib["words"])
    labels_c, labels_v = labels[:n_cal][kept[:n_cal]], labels[n_cal:][kept[n_cal:]]
    supported = (labels_c.sum(0) >= p.min_positive) & (labels_v.sum(0) >= p.min_positive)
    sets = choose_planted_sets(labels_v, supported, int(p.n_planted), int(p.max_planted_size), thr,
                               np.random.default_rng(seed))
    targets = np.stack([labels[:, list(s)].any(1) for s in sets], 1)
    weight, bias = fit_detectors(inputs[kept], targets[kept], float(p.ridge), float(p.planted_gain))
    planted = plant_units(model, layer, weight, bias, seed=seed)
    return _Setup(calib, valid, labels_v, kept[n_cal:], supported, planted, sets)


@register_task(SPEC, Params, Provides(labels=True))
def score(spec: TaskSpec, method: Method, env: RunEnv) -> list[Record]:
    """Plant units, ask `method.descriptors` on the calibration half (resid sites + the planted
    FFN site) with the supported vocabulary, and score its rankings against the validation-half
    and planted truths."""
    p = Params.of(spec)
    vocab, thr, ks, n_boot = tuple(p.vocabulary), float(p.auroc_threshold), p.ks, int(p.bootstrap)
    model = env.model(spec.model)
    cfg = CollectConfig(sites=(*model.sites(spec.sites), Site.ffn(p.planted_layer % model.num_layers)),
                        stats=(), dense_words=True, alignment="last")
    setup = _prepare(spec, model, cfg, env.seed)
    planted, asked = setup.planted, tuple(d for d, ok in zip(vocab, setup.supported) if ok)
    ctx = MethodContext(planted.model, cfg.sites, setup.calib, f"descriptors:{data_fingerprint(setup.calib)}",
                        seed=env.seed, cache=env.cache, collect_defaults={"alignment": cfg.alignment})
    answer = call_verb(method, spec.verb, ctx, asked)

    col, _ = collect_cached(planted.model, setup.valid, cfg, data_id=f"descriptors:{data_fingerprint(setup.valid)}",
                            cache=env.cache, progress=env.progress)
    # The truths come from the scoring split's sentences of the validation half (all of it when
    # public); the planted sets, drawn before the method is asked, never depend on the split.
    rows = env.scoring_rows(len(setup.valid), None, spec.split_seed)
    sentence = np.repeat(np.arange(len(setup.valid)), [len(w) for w in setup.valid["words"]])
    scored = np.isin(sentence, rows)[setup.kept_v]
    labels_v, index, data_truth = setup.labels_v[scored], ctx.index, {}
    for site in cfg.sites:
        if site == planted.site:
            continue
        auc = auroc_matrix(np.asarray(col.dense_words[site])[setup.kept_v][scored], labels_v)
        for i, t in enumerate(truth_sets(auc, setup.supported, vocab, thr)):
            if t:
                data_truth[index.offset(site) + i] = t
    units = list(planted.units)
    planted_truth = {index.offset(planted.site) + u: {vocab[v] for v in s} for u, s in zip(units, setup.sets)}
    unit_auc = auroc_matrix(np.asarray(col.dense_words[planted.site])[setup.kept_v][scored][:, units], labels_v)
    fidelity = np.mean([unit_auc[v, j] >= thr for j, s in enumerate(setup.sets) for v in s])
    return [*part_records(spec, method.name, env.seed, "data", answer, data_truth, ks, len(asked), n_boot),
            *part_records(spec, method.name, env.seed, "planted", answer, planted_truth, ks, len(asked), n_boot),
            record(spec, method.name, "descriptors.planted.fidelity", float(fidelity), env.seed),
            record(spec, method.name, "descriptors.vocabulary_size", float(len(asked)), env.seed)]
