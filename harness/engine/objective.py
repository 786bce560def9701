"""The task objective that gradient methods differentiate, and batches of the data to differentiate it on.

A task declares its objective (`MethodContext.objective`, one of `OBJECTIVES`); by default a
classifier's is the log-probability of the gold label and a causal LM's the mean next-token
log-likelihood. A bare encoder (`base`) has no task head, so there is no objective and gradient
methods do not apply.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .batching import Batch, encode, make_batch, plan_batches
from .method import MethodContext, NeuronScores
from .models import LoadedModel
from .sites import Site


class NoObjectiveError(ValueError, NotImplementedError):
    """A gradient method was asked about a model without a task head.

    A ValueError (the model is the wrong input for the method) and a NotImplementedError, which the
    suite runner records as "not applicable" rather than as a failure.
    """


def require_task_head(model: LoadedModel, method: str = "this method") -> None:
    """Raise NoObjectiveError when `model` has no task head (a `base` model) to differentiate."""
    if model.kind not in ("classifier", "causal-lm"):
        raise NoObjectiveError(
            f"{method} is not applicable to model {model.name!r} of kind {model.kind!r}: it needs a "
            "task head (kind 'classifier' or 'causal-lm') to define an objective; load the model "
            "with kind='classifier' or kind='causal-lm'")


# What a task may ask gradient methods to differentiate, per example, and the model kind it needs:
# - gold-label: log p(gold label) (what a classifier task scores);
# - next-token-mean: the mean over the text's predicted tokens of log p(next token) (`prune` on a
#   causal LM scores held-out next-token likelihood);
# - predicted-next-token: log p(t) of the token t the unmodified model predicts after the whole
#   text, at its last real position (`erasure` on a causal LM explains that prediction).
OBJECTIVES = {"gold-label": "classifier", "next-token-mean": "causal-lm", "predicted-next-token": "causal-lm"}
_DEFAULTS = {"classifier": "gold-label", "causal-lm": "next-token-mean"}


def objective_name(loaded: LoadedModel, name: str | None = None) -> str:
    """`name` checked against the model's kind, or the kind's default objective when None.

    Raises:
        NoObjectiveError: the model has no task head.
        ValueError: an unknown objective, or one for another kind of model.
    """
    require_task_head(loaded, "a gradient objective")
    if name is None:
        return _DEFAULTS[loaded.kind]
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; use one of {sorted(OBJECTIVES)}")
    if OBJECTIVES[name] != loaded.kind:
        raise ValueError(f"objective {name!r} needs a {OBJECTIVES[name]} model; {loaded.name!r} is a {loaded.kind}")
    return name


@dataclass(frozen=True)
class Target:
    """What one batch's objective is computed against (yielded by `gradient_batches`).

    Attributes:
        objective: one of `OBJECTIVES`.
        ids: (B,) gold labels (`gold-label`) or the tokens the unmodified model predicts after each
            text (`predicted-next-token`); None for `next-token-mean`.
    """

    objective: str
    ids: torch.Tensor | None = None


def _copies(n_rows: int, batch: Batch) -> int:
    B = batch.input_ids.shape[0]
    if n_rows % B:
        raise ValueError(f"model output has {n_rows} rows, not a multiple of the batch's {B} examples")
    return n_rows // B


def gold_log_prob(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """(N,) log-probability of the gold label of each row of `logits` (N, classes), in float32: the
    one definition that the classifier objective and pruning's evaluation share.

    `gold` is (N,), or (B,) for N = K*B rows holding K stacked copies of a batch (copy-major).
    """
    logits = logits.float()
    gold = gold.to(logits.device)
    if len(gold) != logits.shape[0]:
        gold = gold.repeat(logits.shape[0] // len(gold))
    return torch.log_softmax(logits, -1).gather(1, gold[:, None])[:, 0]


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) the index of each row's last real token (right padding, as `make_batch` pads)."""
    return attention_mask.sum(1) - 1


def objective(loaded: LoadedModel, batch_outputs, batch: Batch, target: "Target | torch.Tensor | None") -> torch.Tensor:
    """Per-example objective, differentiable, in float32.

    Args:
        loaded: the model.
        batch_outputs: the model's output for `batch`, or for K copies of it stacked copy-major
            (rows k*B .. k*B+B-1 are copy k), with `.logits`.
        batch: the batch that was run.
        target: the batch's `Target` from `gradient_batches`; a tensor of gold labels (or None)
            means the model kind's default objective.

    Returns:
        (K*B,): the target's objective (see `OBJECTIVES`): log p(gold label); the mean over the
        example's predicted tokens of log p(next token) (0 for a one-token example); or log p of
        the unmodified model's predicted token at the last real position.
    """
    if not isinstance(target, Target):
        target = Target(objective_name(loaded), target)
    name = objective_name(loaded, target.objective)
    logits = batch_outputs.logits.float()
    k = _copies(logits.shape[0], batch)
    if name != "next-token-mean" and target.ids is None:
        raise ValueError(f"objective {name!r} needs target ids (gold labels: the data needs a 'label' column; "
                         "predicted tokens: as `gradient_batches` yields them)")
    if name == "gold-label":
        return gold_log_prob(logits, target.ids.repeat(k))
    if name == "predicted-next-token":
        last = last_positions(batch.attention_mask).repeat(k)
        return gold_log_prob(logits[torch.arange(len(last), device=logits.device), last], target.ids.repeat(k))
    ids = batch.input_ids.repeat(k, 1)
    attn = batch.attention_mask.repeat(k, 1)
    logp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None])[..., 0]  # (KB, T-1)
    valid = (attn[:, 1:] * attn[:, :-1]).to(logp.dtype)
    return (logp * valid).sum(1) / valid.sum(1).clamp(min=1)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Inside the block no parameter of `model` requires grad (their flags are restored after).

    Gradient methods differentiate with respect to activations or their own parameters only;
    freezing spares the weight gradients and keeps `.grad` of the model untouched.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def gradient_batches(loaded: LoadedModel, data, max_tokens: int = 2048, max_batch: int = 64,
                     max_length: int | None = None, include_special: bool = True,
                     objective: str | None = None) -> Iterator[tuple[Batch, Target]]:
    """Batches of `data` on the model's device, yielded with gradients enabled (model frozen).

    Args:
        loaded: the model (must have a task head).
        data: a `datasets.Dataset` with `text` (and `label` for the `gold-label` objective).
        max_tokens: padded tokens per batch.
        max_batch: examples per batch at most.
        max_length: truncation length; default the model's limit.
        include_special: count special tokens in `batch.view` (a classifier reads [CLS], so
            gradient methods count them).
        objective: the task's objective (`MethodContext.objective`); None = the kind's default.

    Yields:
        (batch, target): the `Target` of the batch's examples (for `predicted-next-token`, the
        unmodified model's prediction, from a forward pass without gradients). Examples come
        longest first; `batch.indices` gives their positions in `data`.
    """
    name = objective_name(loaded, objective)
    enc = encode(loaded.tokenizer, data, max_length or loaded.max_length, include_special=include_special)
    if name == "gold-label" and enc.labels is None:
        raise ValueError("a classifier objective needs gold labels: the data needs a 'label' column")
    all_labels = torch.tensor(enc.labels) if name == "gold-label" else None
    pad = loaded.tokenizer.pad_token_id
    with frozen(loaded.model), torch.inference_mode(False), torch.enable_grad():
        for indices in plan_batches([len(x) for x in enc.input_ids], max_tokens, max_batch):
            batch = make_batch(enc, indices, pad, device=loaded.device)
            ids = all_labels[indices].to(loaded.device) if all_labels is not None else None
            if name == "predicted-next-token":
                with torch.no_grad():
                    logits = run(loaded, batch).logits
                ids = logits[torch.arange(len(indices), device=logits.device),
                             last_positions(batch.attention_mask)].argmax(-1)
            yield batch, Target(name, ids)


def run(loaded: LoadedModel, batch: Batch, batch_copies: int = 1):
    """Forward `batch` (repeated `batch_copies` times, copy-major) through the model."""
    return loaded.model(input_ids=batch.input_ids.repeat(batch_copies, 1),
                        attention_mask=batch.attention_mask.repeat(batch_copies, 1))


# An attribution function maps (batch, target, sites) to per-site attributions (B, T, N) of the
# objective: the shared shape of gradient methods, so relevance and position scores are built once.
Attribution = Callable[[Batch, Target, tuple[Site, ...]], dict[Site, torch.Tensor]]


def neuron_relevance(ctx: MethodContext, attribute: Attribution, max_tokens: int = 2048) -> NeuronScores:
    """Per neuron, the mean over every real token of `ctx.data` of |attribution|.

    Every non-pad token counts, special tokens included: a classifier reads [CLS], so without it a
    last-layer neuron would look irrelevant. The absolute value keeps positive and negative
    contributions from cancelling: a neuron that pushes the objective either way is relevant.
    """
    index = ctx.index
    sums = {s: torch.zeros(index.width(s), dtype=torch.float64) for s in index.sites}
    count = 0
    for batch, target in gradient_batches(ctx.model, ctx.data, max_tokens=max_tokens, objective=ctx.objective):
        attributions = attribute(batch, target, index.sites)
        rows = batch.view.rows
        for site, attr_BTN in attributions.items():
            sums[site] += attr_BTN.detach().reshape(-1, attr_BTN.shape[-1])[rows].abs().sum(0).double().cpu()
        count += int(rows.numel())
    return NeuronScores(index, index.concat({s: (v / max(count, 1)).float() for s, v in sums.items()}))


def position_scores(ctx: MethodContext, layer: int, attribute: Attribution,
                    max_tokens: int = 2048) -> list[torch.Tensor]:
    """Per example of `ctx.data`, the signed sum over hidden dims of the attribution at `resid.layer`,
    one score per token of the model's tokenisation (special tokens included)."""
    site = Site.resid(layer)
    ctx.model.width(site)  # checks the layer exists before any work
    out: list[torch.Tensor] = [torch.zeros(0)] * len(ctx.data)
    for batch, target in gradient_batches(ctx.model, ctx.data, max_tokens=max_tokens, objective=ctx.objective):
        per_pos_BT = attribute(batch, target, (site,))[site].detach().sum(-1).float().cpu()
        lengths = batch.attention_mask.sum(1).tolist()
        for b, i in enumerate(batch.indices):
            out[i] = per_pos_BT[b, : lengths[b]].clone()
    return out
