"""`txray`: TX-Ray (Rethmeier et al., UAI 2020), how each neuron's max-1 token distribution shifts
between two model stages (Hellinger distance), as in SEEDS.md section 1 and the public code
(copenlu/tx-ray, `Evaluation_metrics/measures.py`); what they leave open is in `TXRay`'s docstring."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from neuronbench.harness.engine.method import Method, MethodContext, Needs, NeuronScores, register_method
from neuronbench.harness.engine.sites import NeuronIndex

log = logging.getLogger(__name__)

_KEY_SHIFT = 32  # a (neuron, token) pair packs into one int64, as in the Max1 table


def hellinger(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Hellinger distance `sqrt(sum((sqrt p - sqrt q)^2)) / sqrt(2)` over the last axis.

    Args:
        p, q: non-negative masses on the same support (the union of both token sets), aligned.

    Returns:
        The distance per leading index; 0 for equal inputs, 1 for disjoint probability vectors.
    """
    if p.shape != q.shape:
        raise ValueError(f"p and q must be aligned on one support; got shapes {tuple(p.shape)} "
                         f"and {tuple(q.shape)}")
    diff = p.double().sqrt() - q.double().sqrt()
    return diff.square().sum(-1).sqrt() / math.sqrt(2)


def token_distributions(table: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each neuron's TX-Ray token distribution from a max-1 table.

    Token type t of neuron n gets `(act_sum[n, t] / count[n, t]) / mass[n]`: the max-activations
    normalised by the neuron's total mass, then averaged over t's occurrences, as the public code
    does (so a neuron's values need not sum to 1). Negative credits are clipped at 0 (in `act_sum`
    and in the mass) so that square roots are defined; the max over a layer is practically never
    negative, and where all credits are positive this is exactly the public code's value.

    Args:
        table: `Max1.table()` columns `neuron`, `token_id`, `act_sum`, `count`.

    Returns:
        Columns `neuron`, `token_id` (as given) and `p` (float64), one row per (neuron, token type).
    """
    neuron = table["neuron"].long().cpu()
    act = table["act_sum"].double().cpu().clamp_min(0)
    count = table["count"].double().cpu()
    size = int(neuron.max()) + 1 if neuron.numel() else 0
    mass = torch.zeros(size, dtype=torch.float64).index_add_(0, neuron, act)
    # A neuron whose credits are all <= 0 has no mass: its values are 0 rather than 0/0.
    p = act / count / mass[neuron].clamp_min(torch.finfo(torch.float64).tiny)
    return {"neuron": neuron, "token_id": table["token_id"].long().cpu(), "p": p}


def neuron_metrics(table: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """TX-Ray's per-neuron metrics of one stage.

    Args:
        table: `Max1.table()` of one site.
        n: the site's width.

    Returns:
        `mass` (n,) float64: sum of the neuron's max-activations ("mass activation");
        `length` (n,) int64: unique token types it wins; `wins` (n,) int64: tokens it wins;
        `active` (n,) bool: it wins at least one token.
    """
    neuron = table["neuron"].long().cpu()
    mass = torch.zeros(n, dtype=torch.float64).index_add_(0, neuron, table["act_sum"].double().cpu())
    length = torch.bincount(neuron, minlength=n)
    wins = torch.zeros(n, dtype=torch.int64).index_add_(0, neuron, table["count"].long().cpu())
    return {"mass": mass, "length": length, "wins": wins, "active": length > 0}


def compare_tables(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], n: int,
                   average: bool = False) -> dict[str, torch.Tensor]:
    """Per-neuron TX-Ray comparison of two max-1 tables of the same site.

    Args:
        before, after: `Max1.table()` of the earlier and the later stage.
        n: the site's width.
        average: divide each distance by its union size (the public code's "average Hellinger").

    Returns:
        `hellinger` (n,) float64, NaN unless the neuron is active in both stages; `union` (n,) the
        size of the union of its token sets; `shared` (n,) bool, active in both; the metrics of
        `neuron_metrics` suffixed `_before` / `_after`; `length_shift` (n,) = length after - length
        before (negative: the neuron specialised; positive: it generalised).
    """
    pa, pb = token_distributions(before), token_distributions(after)
    ka = (pa["neuron"] << _KEY_SHIFT) + pa["token_id"]
    kb = (pb["neuron"] << _KEY_SHIFT) + pb["token_id"]
    keys, inverse = torch.unique(torch.cat([ka, kb]), return_inverse=True)
    # Both distributions laid out on the union support; a token a stage never credits has mass 0.
    p = torch.zeros(keys.numel(), dtype=torch.float64).index_put_((inverse[: ka.numel()],), pa["p"])
    q = torch.zeros(keys.numel(), dtype=torch.float64).index_put_((inverse[ka.numel():],), pb["p"])
    owner = keys >> _KEY_SHIFT
    sq = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, (p.sqrt() - q.sqrt()).square())
    union = torch.bincount(owner, minlength=n)
    dist = sq.sqrt() / math.sqrt(2)
    if average:
        dist = dist / union.clamp_min(1)
    ma, mb = neuron_metrics(before, n), neuron_metrics(after, n)
    shared = ma["active"] & mb["active"]
    out = {"hellinger": torch.where(shared, dist, float("nan")), "union": union, "shared": shared,
           "length_shift": mb["length"] - ma["length"]}
    out.update({f"{k}_before": v for k, v in ma.items()})
    out.update({f"{k}_after": v for k, v in mb.items()})
    return out


def by_token_string(table: dict[str, torch.Tensor], tokenizer, codes: dict[str, int]) -> dict[str, torch.Tensor]:
    """A max-1 table keyed by token string instead of token id.

    Token types are compared as strings, as the public code keys them by the input word: two stages
    whose tokenizers number their vocabularies differently still meet on the types they share.

    Args:
        table: `Max1.table()` columns.
        tokenizer: the tokenizer whose ids `table` holds.
        codes: string -> code, shared by the tables to compare (extended in place).

    Returns:
        The same columns with `token_id` the string's code (rows merged where strings coincide).
    """
    ids, inverse = torch.unique(table["token_id"].long().cpu(), return_inverse=True)
    strings = tokenizer.convert_ids_to_tokens(ids.tolist())
    code = torch.tensor([codes.setdefault(t, len(codes)) for t in strings], dtype=torch.int64)
    keys = (table["neuron"].long().cpu() << _KEY_SHIFT) + code[inverse]
    keys, rows = torch.unique(keys, return_inverse=True)
    act = torch.zeros(keys.numel(), dtype=torch.float64).index_add_(0, rows, table["act_sum"].double().cpu())
    count = torch.zeros(keys.numel(), dtype=torch.int64).index_add_(0, rows, table["count"].long().cpu())
    return {"neuron": keys >> _KEY_SHIFT, "token_id": keys & ((1 << _KEY_SHIFT) - 1),
            "act_sum": act, "count": count}


@dataclass(frozen=True)
class StageComparison:
    """TX-Ray's comparison of two stages over every neuron of `index` (flat ids).

    Attributes:
        index: the neurons compared.
        columns: the `compare_tables` columns, each (index.size,), concatenated over sites.
    """

    index: NeuronIndex
    columns: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.columns[name]


@register_method("txray")
class TXRay(Method):
    """TX-Ray neuron knowledge transfer between `ctx.parent` (before) and `ctx.model` (after).

    As the public code: each token credited to its layer's most active neuron (`max1`); a neuron's
    distribution gives token type t the mean over t's occurrences of max-activation / the
    neuron's total mass, not renormalised (`token_distributions`); neurons compared only when
    active (winning a token) in both stages, over the union of their token types.

    Choices beyond the paper, and why:
      * Token types are the model's tokens (subwords), per site (layer), compared by string
        (`by_token_string`); special tokens follow the collection settings (not counted by
        default). The paper's LSTM had word tokens.
      * Relevance of a neuron active in both stages is its Hellinger distance. A neuron active in
        exactly one stage gets the largest distance, 1 (its distribution has nothing in common
        with the other stage's empty one: it gained or lost all its knowledge). A neuron active in
        neither stage never wins a token: TX-Ray has no evidence about it. With
        `no_evidence="neutral"` (default) it gets the median distance of the compared neurons
        (active in both stages), so it sits in the middle of the ranking, in neither the most- nor the least-changed sets
        while those stay within the evidence-bearing half (a task that cuts deeper meets a tie and
        says so); with `"zero"` it gets 0 (the earlier default: "nothing observed, nothing
        changed", which ranks every silent neuron as least changed, ordered only by the task's
        seeded tie-break). With `average`, the scores of neurons with evidence are divided by the
        neuron's union size, as the public code divides distances.
      * `stage_change` is the mean distance over neurons active in both stages (the paper's
        comparison set). When no neuron is active in both, it is the mean relevance over the
        neurons active in either stage (1.0 without `average`: all knowledge moved), with a
        warning; when the data credits no token in either stage it raises ValueError.
      * Relevance ignores `ctx.concept`: TX-Ray measures change, not a concept.

    Args:
        average: use the public code's "average Hellinger" (distance / union size); the default
            is the paper's plain distance.
        no_evidence: `neutral` or `zero`, the score of neurons active in neither stage (above).
    """

    name = "txray"
    needs = Needs(stages=True)

    def __init__(self, average: bool = False, no_evidence: str = "neutral"):
        if no_evidence not in NO_EVIDENCE:
            raise ValueError(f"txray: no_evidence={no_evidence!r}; use one of {NO_EVIDENCE}")
        self.average, self.no_evidence = average, no_evidence

    def compare(self, ctx: MethodContext) -> StageComparison:
        """Max-1 tables of both stages on `ctx.data`, compared per neuron (see `compare_tables`)."""
        _check_stages(ctx)
        before = ctx.collect(stats=("max1",), model=ctx.parent)
        after = ctx.collect(stats=("max1",))
        index, codes = ctx.index, {}
        parts = [compare_tables(by_token_string(before[s].max1.table(), ctx.parent.tokenizer, codes),
                                by_token_string(after[s].max1.table(), ctx.model.tokenizer, codes),
                                index.width(s), self.average)
                 for s in index.sites]
        return StageComparison(index, {k: torch.cat([p[k] for p in parts]) for k in parts[0]})

    def relevance(self, ctx: MethodContext) -> NeuronScores:
        cmp = self.compare(ctx)
        return NeuronScores(cmp.index, relevance_scores(cmp, self.average, self.no_evidence).float())

    def stage_change(self, ctx: MethodContext) -> float:
        cmp = self.compare(ctx)
        shared = cmp["shared"]
        if shared.any():
            return float(cmp["hellinger"][shared].mean())
        either = cmp["active_before"] | cmp["active_after"]
        if not either.any():
            raise ValueError(f"no token of ctx.data (data_id {ctx.data_id!r}) was credited to any neuron in "
                             "either stage; TX-Ray needs data with countable (non-special) tokens")
        log.warning("txray: no neuron is active in both stages; stage change = mean relevance of the "
                    "%d neurons active in either", int(either.sum()))
        return float(relevance_scores(cmp, self.average)[either].mean())


NO_EVIDENCE = ("neutral", "zero")


def relevance_scores(cmp: StageComparison | dict[str, torch.Tensor], average: bool = False,
                     no_evidence: str = "neutral") -> torch.Tensor:
    """Per-neuron change: the distance where active in both stages, the largest distance where active
    in one only (1, or 1/union size with `average`); where active in neither, the median distance of
    the neurons compared (active in both; else of all with evidence) (`neutral`), or 0 (`zero`, and
    when no neuron has evidence).

    Args:
        cmp: `compare_tables` columns (or a `StageComparison`) computed with the same `average`.
        average: whether distances were divided by the union size.
        no_evidence: `neutral` or `zero`.
    """
    moved = torch.ones_like(cmp["hellinger"])
    if average:
        moved = moved / cmp["union"].clamp_min(1)
    one_sided = cmp["active_before"] ^ cmp["active_after"]
    evidence = cmp["shared"] | one_sided
    scores = torch.where(cmp["shared"], cmp["hellinger"], torch.where(one_sided, moved, 0.0))
    if no_evidence == "neutral" and evidence.any():
        middle = torch.quantile(scores[cmp["shared"] if cmp["shared"].any() else evidence], 0.5)
        scores = torch.where(evidence, scores, middle)
    return scores


def _check_stages(ctx: MethodContext) -> None:
    """Two stages that TX-Ray can compare: a parent, and the same neurons at every site."""
    if ctx.parent is None:
        raise ValueError("txray compares two stages: give the context a parent (the earlier stage)")
    parent, model = ctx.parent, ctx.model
    for site in ctx.sites:
        if parent.width(site) != model.width(site):
            raise ValueError(f"site {site} has {parent.width(site)} neurons in {parent.name!r} but "
                             f"{model.width(site)} in {model.name!r}; stages must share the architecture")
