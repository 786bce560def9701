"""`erasure`: ERASER comprehensiveness and sufficiency (AOPC) of a method's token-position
attributions at each hidden layer of the polarity classifier, with DiffMask-style masking of hidden
states by the layer's mean, against random position orders computed by the harness.

On a causal LM (`--model`) the probability explained is that of the token the full model predicts
after the whole text (its next-token distribution at the last real position), and the task declares
the same quantity as the objective gradient methods attribute (`OBJECTIVES`, v3): log p(that token)
at the last real position, not the mean next-token likelihood `prune` uses. On a classifier the
objective stays the gold label's log-probability (the masking explains the predicted class; the
two agree wherever the classifier is right)."""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from neuronbench.harness.engine.batching import Encoded, encode, make_batch, plan_batches
from neuronbench.harness.engine.collect import _autocast
from neuronbench.harness.engine.data import load, subsample
from neuronbench.harness.engine.hooks import site_hooks
from neuronbench.harness.engine.intervene import copied_forward
from neuronbench.harness.engine.method import Method, MethodContext, MethodOutputError, Provides, call_verb
from neuronbench.harness.engine.metrics import bootstrap_ci
from neuronbench.harness.engine.models import LoadedModel
from neuronbench.harness.engine.records import Record
from neuronbench.harness.engine.sites import Site
from neuronbench.harness.suite.task import RunEnv, Takes, TaskParams, TaskSpec, record, register_task
from neuronbench.tasks.prune import train_means

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Params(TaskParams):
    """erasure's parameters.

    Attributes:
        layers: hidden layers (`resid.L`) whose positions are attributed and masked (non-empty).
        fractions: the top-q fractions of positions masked (non-empty, each in [0, 1]).
        n_pool: test sentences the method is asked about (None = the whole split); more than n_test.
        n_test: sentences of the pool scored.
        random_seeds: random position orders per example (positive).
        bootstrap: bootstrap resamples of each interval.
    """

    layers: tuple[int, ...]
    fractions: tuple[float, ...]
    n_pool: int | None
    n_test: int
    random_seeds: int
    bootstrap: int

    def __post_init__(self) -> None:
        if not self.layers or not self.fractions:
            raise ValueError(f"erasure: layers={self.layers!r} and fractions={self.fractions!r} must be non-empty")
        for q in self.fractions:
            if not 0 <= q <= 1:
                raise ValueError(f"erasure fraction q={q!r} must be in [0, 1], e.g. 0.1 for 10% of the positions")
        if not isinstance(self.random_seeds, int) or self.random_seeds < 1:
            raise ValueError(f"erasure: random_seeds={self.random_seeds!r} must be a positive integer")
        if self.n_pool is not None and self.n_pool <= self.n_test:
            raise ValueError(f"erasure: n_pool={self.n_pool} must exceed n_test={self.n_test}, so that the hidden "
                             "split has examples of its own; raise n_pool or set it to None (whole split)")


# Layer L is the hidden state `Site.resid(L)`, the output of transformer block L (Hugging Face's
# `hidden_states[L + 1]`), the site every baseline's `attribute_positions(ctx, L)` reads. The last
# block is left out: the classifier reads only [CLS] of its output, so masking word positions there
# changes nothing for any method. The embedding output (DiffMask's input mode) has no site yet.
# "Masked" means: the hidden state at that position replaced by the layer's train-split mean over
# word tokens (special tokens are never masked). A method may learn on the train split
# (`ctx.train`, version 2): DiffMask trains its amortized gates there against this same baseline.
# Costs measured on 2 CPU cores: the harness runs 2 x 4 masked copies of the n_test examples per
# layer, the blocks up to the masked layer once (`intervene.copied_forward`): `random`'s item, the
# harness alone, took 21 s for 5 layers and 100 examples; the random reference (random_seeds times
# as many) is computed once and stored across runs (`RunEnv.reference`). A method is asked about
# the n_pool examples once per layer, so the pool bounds its cost: gradxact ~5 s a layer,
# integrated-gradients 8-70 s a layer (16 midpoint steps at layers 0-2, 8 Gauss-Legendre nodes at 3-4:
# its quadrature is chosen per site), diffmask seconds a layer once its gates are
# cached (building them: see baselines/diffmask.py).
SPEC = TaskSpec(
    name="erasure", version=3, verb="attribute_positions", model="minilm-polarity", data="polarity",
    sites="resid", headline="erasure.comp_gap_mean", no_skill=0.0,
    params=Params(layers=(0, 1, 2, 3, 4), fractions=(0.05, 0.1, 0.2, 0.5), n_pool=300, n_test=100,
                  random_seeds=3, bootstrap=1000),
    quick=(("model", "minilm-polarity-tiny"), ("layers", (0,)), ("n_pool", 48), ("n_test", 24),
           ("random_seeds", 2), ("bootstrap", 200)),
    description="ERASER comprehensiveness (AOPC) of a method's top token positions at each hidden "
                "layer, masked by the layer's mean, minus random positions",
    takes=Takes(models=("classifier", "causal-lm"),
                data=(("classifier", ("sentence",)), ("causal-lm", ("sentence", "lm"))),
                adapted=(("causal-lm", "p = probability of the token the full model predicts after the "
                                       "whole text; no accuracy"),)))

# The objective gradient methods are asked to attribute, per model kind (`MethodContext.objective`;
# a kind not listed keeps its default: a classifier's gold-label log-probability).
OBJECTIVES = {"causal-lm": "predicted-next-token"}
# Padded tokens per forward pass, masked copies included (the budget `prune` measured on 2 cores).
EVAL_MAX_TOKENS = 8192
# Stream tags: tie-breaking, random orders and the bootstrap never share a generator.
_TIE_STREAM, _RANDOM_STREAM = 0, 1


def n_top(q: float, n_candidates: int) -> int:
    """Positions in the top-q: round(q * n), at least 1 when q > 0, none when q = 0."""
    if not 0 <= q <= 1:
        raise ValueError(f"erasure fraction q={q!r} must be in [0, 1], e.g. 0.1 for 10% of the positions")
    return 0 if q == 0 else min(n_candidates, max(1, round(q * n_candidates)))


def position_order(scores: np.ndarray, candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The candidate positions, highest score first; ties broken by `rng` (not by position)."""
    tie = rng.permutation(candidates)
    return tie[np.argsort(-scores[tie], kind="stable")]


def erasure_masks(order: np.ndarray, length: int, fractions: tuple[float, ...]) -> np.ndarray:
    """(2F, length) bool, True = masked. Row f removes the top-q_f of `order` (comprehensiveness);
    row F + f masks every candidate but the top-q_f (sufficiency). `order` lists all candidates."""
    F = len(fractions)
    masks = np.zeros((2 * F, length), dtype=bool)
    for f, q in enumerate(fractions):
        n = n_top(q, len(order))
        masks[f, order[:n]] = True
        masks[F + f, order[n:]] = True
    return masks


def class_probs(model: LoadedModel, logits: torch.Tensor, attention_mask: torch.Tensor,
                pick: np.ndarray | None = None) -> np.ndarray:
    """(B, C) float64 probabilities of what erasure explains: a classifier's classes, or a causal
    LM's next token after each example's last real token (the token it predicts after the whole
    text); (B, 1) with `pick`, the probability of class `pick[b]` only."""
    if model.kind == "causal-lm":
        last = attention_mask.sum(1) - 1
        logits = logits[torch.arange(len(last), device=logits.device), last]
    probs = torch.softmax(logits.float(), -1)
    if pick is not None:
        probs = probs.gather(1, torch.as_tensor(pick, device=probs.device)[:, None])
    return probs.double().cpu().numpy()


def _mask_hook(state: dict, baseline: torch.Tensor):
    """A site hook setting the positions in `state["mask"]` (copies * B, T) to `baseline`."""
    def fn(acts: torch.Tensor) -> torch.Tensor:
        mask = state["mask"]
        if acts.shape[0] != mask.shape[0]:  # the copies begin after this block: make them here
            acts = acts.repeat(mask.shape[0] // acts.shape[0], *([1] * (acts.dim() - 1)))
        return torch.where(mask[..., None], baseline.to(acts.dtype), acts)
    return fn


def _copies_logits(model: LoadedModel, batch, kg: int, attention: torch.Tensor, layer: int | None,
                   state: dict) -> torch.Tensor:
    """Logits of `kg` copies of `batch` (`attention`: their mask), sharing blocks 0..layer while
    `state["prefix"]` holds."""
    if state["prefix"] and kg > 1:
        fwd = copied_forward(model, batch, kg, layer + 1)
        state["prefix"] = fwd is not None  # rows not one per copy: copy the inputs from now on
        if fwd is not None:
            return fwd.logits
    return model.model(input_ids=batch.input_ids.repeat(kg, 1), attention_mask=attention).logits


def masked_probs(model: LoadedModel, enc: Encoded, layer: int | None, masks: list[np.ndarray],
                 baseline: torch.Tensor | None, max_tokens: int = EVAL_MAX_TOKENS,
                 pick: np.ndarray | None = None, prefix_once: bool = True) -> np.ndarray:
    """Class probabilities with masked positions' hidden states at `resid.layer` set to `baseline`.

    Args:
        model: a sequence classifier, or a causal LM (its next-token distribution after the text).
        enc: the examples (special tokens in `input_ids`).
        layer: the block whose output is masked; None runs the unmasked model.
        masks: per example, (V, T_i) bool, True = replace that position (V variants per example).
        baseline: (H,) the replacement hidden state.
        max_tokens: padded tokens per forward pass, copies included.
        pick: (n,) one class per example: return only its probability (a vocabulary is large).
        prefix_once: run blocks 0..layer once on the plain batch and copy their output for the
            variants (`intervene.copied_forward`; the same probabilities, about half the compute
            over layers 0-4 of a 6-block model). A model whose output is not one row per copy falls
            back to copying the inputs.

    Returns:
        (V, n_examples, n_classes) float64, or (V, n_examples) with `pick`; several variants per
        forward pass.
    """
    V = masks[0].shape[0]
    lengths = [len(x) for x in enc.input_ids]
    per_group = max(1, min(V, max_tokens // max(lengths)))
    state: dict = {"prefix": prefix_once and layer is not None}
    out: np.ndarray | None = None
    hooks = {} if layer is None else {Site.resid(layer): _mask_hook(state, baseline)}
    model.model.eval()  # a method may have left dropout on
    with torch.inference_mode(), _autocast(model.device), site_hooks(model.model, hooks):
        for indices in plan_batches(lengths, max(1, max_tokens // per_group), 256):
            batch = make_batch(enc, indices, model.tokenizer.pad_token_id, device=model.device)
            T = batch.input_ids.shape[1]
            padded = np.zeros((V, len(indices), T), dtype=bool)
            for b, i in enumerate(indices):
                padded[:, b, : lengths[i]] = masks[i]
            for start in range(0, V, per_group):
                kg = min(per_group, V - start)
                group = padded[start:start + kg].reshape(kg * len(indices), T)  # copy-major, as repeat()
                state["mask"] = torch.from_numpy(group).to(model.device)
                attention = batch.attention_mask.repeat(kg, 1)
                logits = _copies_logits(model, batch, kg, attention, layer, state)
                picked = None if pick is None else np.tile(pick[indices], kg)
                probs = class_probs(model, logits, attention, picked).reshape(kg, len(indices), -1)
                if out is None:
                    out = np.zeros((V, len(enc), probs.shape[-1]))
                out[start:start + kg, indices] = probs
    return out[..., 0] if pick is not None else out


@dataclass
class Scoring:
    """The scoring examples of a run and the full model's answers on them.

    Attributes:
        enc: the scoring examples, tokenised as the methods tokenise them.
        candidates: per example, the maskable positions (every non-special token).
        pred: (n,) the class the full model predicts; p is always that class's probability.
        p_full: (n,) its probability under the full model.
        correct: (n,) 1 where the prediction is the gold label; None without labels (a causal LM
            predicts the next token, which has no gold label).
    """

    enc: Encoded
    candidates: list[np.ndarray]
    pred: np.ndarray
    p_full: np.ndarray
    correct: np.ndarray | None

    @classmethod
    def build(cls, model: LoadedModel, examples) -> "Scoring":
        enc = encode(model.tokenizer, examples, model.max_length, include_special=False)
        candidates = [np.flatnonzero(c) for c in enc.counted]
        probs = masked_probs(model, enc, None, [np.zeros((1, len(x)), bool) for x in enc.input_ids], None)[0]
        pred = probs.argmax(1)
        correct = None
        if model.kind != "causal-lm" and enc.labels is not None:
            correct = (pred == np.asarray(enc.labels)).astype(float)
        return cls(enc, candidates, pred, probs[np.arange(len(pred)), pred], correct)

    def drops(self, model: LoadedModel, layer: int, orders: list[list[np.ndarray]],
              fractions: tuple[float, ...], baseline: torch.Tensor) -> np.ndarray:
        """(S, 2, F, n): p(full) - p(masked) for S orders per example; [:, 0] removes the top-q
        (comprehensiveness), [:, 1] keeps only the top-q (sufficiency)."""
        S, F = len(orders[0]), len(fractions)
        masks = [np.concatenate([erasure_masks(o, len(ids), fractions) for o in per_example])
                 for per_example, ids in zip(orders, self.enc.input_ids)]
        p = masked_probs(model, self.enc, layer, masks, baseline, pick=self.pred)  # (S * 2F, n)
        return (self.p_full[None] - p).reshape(S, 2, F, -1)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def method_orders(answer: list[torch.Tensor], scoring: Scoring, seed: int, layer: int) -> list[list[np.ndarray]]:
    """Per scoring example, its candidate positions in the method's order (ties at random)."""
    ids = scoring.enc.example_ids
    return [[position_order(a.detach().double().cpu().numpy(), c, _rng(seed, _TIE_STREAM, layer, i))]
            for a, c, i in zip(answer, scoring.candidates, ids)]


def random_orders(scoring: Scoring, seed: int, layer: int, n_seeds: int) -> list[list[np.ndarray]]:
    """Per scoring example, `n_seeds` uniform orders of its candidates, drawn per example id (the
    same example gets the same orders whichever split is scored)."""
    return [[_rng(seed, _RANDOM_STREAM, layer, s, i).permutation(c) for s in range(n_seeds)]
            for c, i in zip(scoring.candidates, scoring.enc.example_ids)]


def check_lengths(method: str, answer: list[torch.Tensor], scoring: Scoring) -> None:
    """Raise MethodOutputError unless every example has one score per token (specials included)."""
    for a, ids, i in zip(answer, scoring.enc.input_ids, scoring.enc.example_ids):
        if a.numel() != len(ids):
            raise MethodOutputError(
                f"method {method!r}, verb 'attribute_positions': example id {i} has {a.numel()} scores "
                f"for {len(ids)} tokens; return one score per token of the model's tokenisation "
                "(special tokens included, no padding)")


def _ci(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """(mean, low, high) over examples; the same resamples for every statistic (paired)."""
    low, high = bootstrap_ci(lambda idx: float(values[idx].mean()), len(values), n_boot, seed)
    return float(values.mean()), low, high


def summarise(spec: TaskSpec, method: str, seed: int, curves: dict[int, tuple[np.ndarray, np.ndarray]],
              correct: np.ndarray | None, n_boot: int) -> list[Record]:
    """Per layer AOPC comprehensiveness and sufficiency of the method and of random orders, their
    gaps, the gaps' means over layers, and the full model's accuracy, each with a paired bootstrap
    interval over the scoring examples.

    Args:
        curves: per layer, (method drops (1, 2, F, n), random drops (S, 2, F, n)) from `Scoring.drops`.
        correct: (n,) the full model's correctness on the scoring examples (None: not recorded).
    """
    def rec(metric: str, values: np.ndarray, k: float | None = None) -> Record:
        value, low, high = _ci(values, n_boot, seed)
        return record(spec, method, metric, value, seed, k=k, ci_low=low, ci_high=high)

    out = [rec("erasure.full_accuracy", correct)] if correct is not None else []
    gaps = []
    for layer, (ours, rand) in curves.items():
        (comp, suff), (r_comp, r_suff) = ours.mean(2)[0], rand.mean(2).mean(0)  # AOPC: mean over q
        k = float(layer)
        out += [rec("erasure.comprehensiveness", comp, k), rec("erasure.sufficiency", suff, k),
                rec("erasure.random_comprehensiveness", r_comp, k),
                rec("erasure.random_sufficiency", r_suff, k),
                rec("erasure.comp_gap", comp - r_comp, k), rec("erasure.suff_gap", r_suff - suff, k)]
        gaps.append((comp - r_comp, r_suff - suff))
    comp_gap, suff_gap = np.mean(gaps, axis=0)
    return out + [rec("erasure.comp_gap_mean", comp_gap), rec("erasure.suff_gap_mean", suff_gap)]


def pool_of(spec: TaskSpec, n_pool: int | None):
    """The corpus and the fixed pool of test examples every method is asked about."""
    corpus = load(spec.data, spec.split_seed)
    test = corpus.splits["test"]
    return corpus, (test if n_pool is None else subsample(test, n_pool, spec.split_seed))


@register_task(SPEC, Params, Provides(labels=True, gradients=True))
def score(spec: TaskSpec, method: Method, env: RunEnv) -> list[Record]:
    """Ask `method.attribute_positions` on the pool at every layer, mask its top positions of the
    scoring examples (`env.scoring_subset` of the pool) by the layer's train mean, and score
    ERASER comprehensiveness and sufficiency against random orders."""
    p = Params.of(spec)
    corpus, pool = pool_of(spec, p.n_pool)
    model = env.model(spec.model)
    for layer in p.layers:
        model.width(Site.resid(layer))  # an out-of-range layer fails before any work
    sites = tuple(Site.resid(layer) for layer in p.layers)
    train = corpus.splits["train"]
    ctx = MethodContext(model=model, sites=sites, data=pool, data_id=f"{corpus.fingerprint}:test-pool{len(pool)}",
                        seed=env.seed, label_names=corpus.label_names, train=train,
                        train_id=f"{corpus.fingerprint}:train", cache=env.cache,
                        objective=OBJECTIVES.get(model.kind))
    rows = env.scoring_rows(len(pool), p.n_test, spec.split_seed)
    key = ("erasure", spec.fingerprint(), env.seed, env.split, rows.tobytes())
    means = env.memo(("erasure.means", spec.model, corpus.fingerprint, sites), lambda: train_means(
        model, train, f"{corpus.fingerprint}:train", sites, env.cache, corpus.label_names))
    scoring = env.memo(key + ("full",), lambda: Scoring.build(model, pool.select(rows)))
    curves = {}
    for layer in p.layers:
        start = time.perf_counter()
        answer = call_verb(method, spec.verb, ctx, layer)
        asked = time.perf_counter()
        answer = [answer[r] for r in rows]
        check_lengths(method.name, answer, scoring)
        base = means[Site.resid(layer)]
        rand = env.reference(  # stored across runs: the random orders' drops do not depend on the method
            {"kind": "erasure-reference", "spec": spec.fingerprint(), "model": model.fingerprint(),
             "model_name": model.name,
             "pool": ctx.data_id, "rows": hashlib.sha256(rows.tobytes()).hexdigest(), "seed": env.seed,
             "layer": layer},
            lambda: {"drops": scoring.drops(model, layer, random_orders(scoring, env.seed, layer, p.random_seeds),
                                            p.fractions, base)})["drops"]
        ours = scoring.drops(model, layer, method_orders(answer, scoring, env.seed, layer), p.fractions, base)
        curves[layer] = (ours, rand)
        log.info("erasure layer %d: %s answered in %.1f s, the harness scored in %.1f s", layer,
                 method.name, asked - start, time.perf_counter() - asked)
    return summarise(spec, method.name, env.seed, curves, scoring.correct, p.bootstrap)
