"""Checks on what a method returns: the harness never scores NaN, missing or out-of-range answers."""
from __future__ import annotations

import math

import torch

from .sites import NeuronScores

MAX_DESCRIPTORS = 10


class MethodOutputError(ValueError):
    """A method returned something the harness cannot score."""


def _fail(method: str, verb: str, defect: str):
    raise MethodOutputError(f"method {method!r}, verb {verb!r}: {defect}")


def _check_relevance(method: str, ctx, out) -> None:
    if not isinstance(out, NeuronScores):
        _fail(method, "relevance", f"returned {type(out).__name__}, expected NeuronScores")
    expected = ctx.index
    if out.index != expected:
        _fail(method, "relevance", f"scores cover sites {[str(s) for s in out.index.sites]}, "
                                   f"the task asked for {[str(s) for s in expected.sites]}")
    scores = out.scores
    if scores.dim() not in (1, 2) or scores.shape[-1] != expected.size:
        _fail(method, "relevance", f"scores have shape {tuple(scores.shape)}; expected "
                                   f"({expected.size},) or (n_concepts, {expected.size})")
    if scores.dim() == 2 and (out.concepts is None or len(out.concepts) != scores.shape[0]):
        _fail(method, "relevance", "per-concept scores need one concept name per row")
    bad = (~torch.isfinite(scores)).sum().item()
    if bad:
        _fail(method, "relevance", f"{bad} scores are NaN or infinite")


def _check_stage_change(method: str, out) -> None:
    if isinstance(out, bool) or not isinstance(out, (int, float)) or not math.isfinite(float(out)):
        _fail(method, "stage_change", f"returned {out!r}; expected one finite number")


def _check_descriptors(method: str, ctx, out, vocabulary) -> None:
    if not isinstance(out, dict):
        _fail(method, "descriptors", f"returned {type(out).__name__}; expected dict neuron id -> list")
    vocab, size = set(vocabulary), ctx.index.size
    for neuron, ranked in out.items():
        if not isinstance(neuron, int) or not 0 <= neuron < size:
            _fail(method, "descriptors", f"neuron id {neuron!r} is outside 0..{size - 1}")
        if len(ranked) > MAX_DESCRIPTORS:
            _fail(method, "descriptors", f"neuron {neuron} has {len(ranked)} descriptors; at most {MAX_DESCRIPTORS}")
        if len(set(ranked)) != len(ranked):
            _fail(method, "descriptors", f"neuron {neuron} lists a descriptor twice: {ranked}")
        unknown = [d for d in ranked if d not in vocab]
        if unknown:
            _fail(method, "descriptors", f"neuron {neuron}: descriptors outside the vocabulary: {unknown[:5]}")


def _check_positions(method: str, ctx, out) -> None:
    n = len(ctx.data)
    if not isinstance(out, (list, tuple)) or len(out) != n:
        _fail(method, "attribute_positions", f"expected a list of {n} tensors (one per example), "
                                             f"got {type(out).__name__} of length {len(out) if hasattr(out, '__len__') else '?'}")
    for i, scores in enumerate(out):
        if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
            _fail(method, "attribute_positions", f"example {i}: expected a 1-D tensor of position scores")
        if not torch.isfinite(scores).all():
            _fail(method, "attribute_positions", f"example {i}: NaN or infinite scores")


def check_output(method: str, verb: str, ctx, out, *args) -> None:
    """Raise MethodOutputError naming `method` and the defect when `out` cannot be scored."""
    if verb == "relevance":
        _check_relevance(method, ctx, out)
    elif verb == "stage_change":
        _check_stage_change(method, out)
    elif verb == "descriptors":
        _check_descriptors(method, ctx, out, args[0])
    else:
        _check_positions(method, ctx, out)
