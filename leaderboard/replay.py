"""Methods that record or replay outputs: `Recorder` wraps a real method at export and keeps what
each verb call returned; `Replay` answers the same calls from a submission's data, running no code.

A call is identified by: relevance, the concept asked (`ctx.concept`) and the labelling of the
split (`ctx.labelling`: None, or a task's label null such as `permuted:0`); stage_change, the trajectory,
the labelling of the text (None, or `planted`) and the steps of the two checkpoints; descriptors, the neurons of `ctx.index`; attribute_positions, the layer and
the `id` of each example of `ctx.data`.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import polars as pl
import torch

from neuronbench.harness.engine.catalogue import ModelRef
from neuronbench.harness.engine.method import Method, MethodContext, NeuronScores
from neuronbench.harness.engine.models import LoadedModel
from neuronbench.harness.engine.sites import OUT_OF_RANGE, NeuronIndex, Site
from neuronbench.harness.engine.validate import check_output

from .submission import COLUMNS, to_schema


class ReplayError(ValueError):
    """A task asked a submission something it holds no answer for."""


def checkpoint_step(model: LoadedModel) -> int:
    """The training step of a trajectory checkpoint loaded as `name@STEP` (or `name@stepSTEP`)."""
    step = ModelRef.parse(model.name).step
    if step is None:
        raise ValueError(f"cannot tell which checkpoint model {model.name!r} is: stage_change answers are "
                         "keyed by checkpoint steps, so both stages must be loaded as NAME@STEP")
    return step


def stage_key(ctx: MethodContext) -> tuple[str, str | None, int, int]:
    """(trajectory, labelling, from step, to step) of a stage_change call; the trajectory is the
    checkpoints' name without `@STEP`."""
    return (ctx.model.name.partition("@")[0], ctx.labelling, checkpoint_step(ctx.parent), checkpoint_step(ctx.model))


def example_ids(ctx: MethodContext) -> list[int]:
    if "id" not in ctx.data.column_names:
        raise ValueError("attribute_positions answers are keyed by example id, but the task's ctx.data has no "
                         "`id` column; keep it in the examples the task hands the method")
    return [int(i) for i in ctx.data["id"]]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


class Recorder(Method):
    """Pass every verb call through to `inner` and keep its (checked) answer, keyed by the call.

    Args:
        inner: the method being exported; its answers are returned unchanged, so a task run
            through the recorder gives the records of the method itself.
    """

    def __init__(self, inner: Method):
        self.inner, self.name, self.needs = inner, inner.name, inner.needs
        self.answers: dict[str, dict[Any, Any]] = defaultdict(dict)

    def supports(self, verb: str) -> bool:
        return self.inner.supports(verb)

    def _keep(self, verb: str, key: Any, value: Any) -> None:
        seen = self.answers[verb]
        if key in seen and not _same(seen[key], value):
            raise ValueError(f"method {self.name!r} answered the same {verb} call ({key!r}) twice with different "
                             "outputs; a submission holds one answer per call: make the method deterministic "
                             "given ctx.seed")
        seen[key] = value

    def relevance(self, ctx: MethodContext) -> NeuronScores:
        out = self.inner.relevance(ctx)
        check_output(self.name, "relevance", ctx, out)
        scores = out.scores.detach().double().cpu().numpy()
        self._keep("relevance", (ctx.concept, ctx.labelling),
                   (out.index, scores, out.concepts if scores.ndim == 2 else None))
        return out

    def stage_change(self, ctx: MethodContext) -> float:
        out = self.inner.stage_change(ctx)
        check_output(self.name, "stage_change", ctx, out)
        self._keep("stage_change", stage_key(ctx), float(out))
        return out

    def descriptors(self, ctx: MethodContext, vocabulary: tuple[str, ...]) -> dict[int, list[str]]:
        out = self.inner.descriptors(ctx, vocabulary)
        check_output(self.name, "descriptors", ctx, out, vocabulary)
        if self.answers["descriptors"] and ctx.index.sites not in self.answers["descriptors"]:
            raise ValueError("the submission format holds one descriptors answer per task, but the task asked "
                             "about two different sets of sites")
        self._keep("descriptors", ctx.index.sites, (ctx.index, {int(n): tuple(d) for n, d in out.items() if d}))
        return out

    def attribute_positions(self, ctx: MethodContext, layer: int) -> list[torch.Tensor]:
        out = self.inner.attribute_positions(ctx, layer)
        check_output(self.name, "attribute_positions", ctx, out, layer)
        for ex, scores in zip(example_ids(ctx), out):
            self._keep("attribute_positions", (int(layer), ex), scores.detach().double().cpu().numpy())
        return out

    def frame(self, verb: str) -> pl.DataFrame:
        """Everything recorded for `verb` in the submission's column layout (see `COLUMNS`)."""
        rows: dict[str, list] = {c.name: [] for c in COLUMNS[verb]}
        for key, value in self.answers.get(verb, {}).items():
            _ROWS[verb](rows, key, value)
        return to_schema(verb, rows)


def _neuron_rows(rows: dict[str, list], index: NeuronIndex, flat: np.ndarray) -> None:
    for f in flat.tolist():
        site, i = index.unflat(f)
        rows["site_kind"].append(site.kind)
        rows["layer"].append(site.layer)
        rows["index"].append(i)


def _relevance_rows(rows, key, value) -> None:
    (concept, labelling), (index, scores, concepts) = key, value
    answer_rows = [None] if scores.ndim == 1 else list(range(len(scores)))
    for r in answer_rows:
        n = index.size
        rows["concept"] += [concept] * n
        rows["labelling"] += [labelling] * n
        rows["answer_row"] += [r] * n
        rows["answer_concept"] += [None if r is None else concepts[r]] * n
        _neuron_rows(rows, index, np.arange(n))
        rows["score"] += (scores if r is None else scores[r]).tolist()


def _stage_rows(rows, key, value) -> None:
    for name, part in zip(("trajectory", "labelling", "from_step", "to_step"), key):
        rows[name].append(part)
    rows["score"].append(value)


def _descriptor_rows(rows, key, value) -> None:
    index, answer = value
    for neuron in sorted(answer):
        ranked = answer[neuron]
        _neuron_rows(rows, index, np.full(len(ranked), neuron))
        rows["rank"] += list(range(1, len(ranked) + 1))
        rows["descriptor"] += list(ranked)


def _position_rows(rows, key, value) -> None:
    layer, ex = key
    rows["example_id"] += [ex] * len(value)
    rows["layer"] += [layer] * len(value)
    rows["position"] += list(range(len(value)))
    rows["score"] += value.tolist()


_ROWS = {"relevance": _relevance_rows, "stage_change": _stage_rows, "descriptors": _descriptor_rows,
         "attribute_positions": _position_rows}


class Replay(Method):
    """Answer one task's verb calls from a submission's output frame (checked by `validate` first).

    Args:
        name: the submitted method's name (records carry it).
        verb: the verb the frame answers; `supports` is True for it alone.
        frame: the task's output file, in `COLUMNS[verb]` layout.
        source: the file name, for errors.
    """

    def __init__(self, name: str, verb: str, frame: pl.DataFrame, source: str = "submission"):
        self.name, self.verb, self.source = name, verb, source
        frame = frame.with_columns(pl.lit(None, c.dtype).alias(c.name) for c in COLUMNS[verb]
                                   if c.name not in frame.columns)  # absent optional columns
        frame = frame.sort([c.name for c in COLUMNS[verb] if c.name not in ("score", "descriptor")],
                           nulls_last=False)
        key = {"relevance": ["concept", "labelling"], "stage_change": ["trajectory", "labelling", "from_step", "to_step"], "descriptors": [],
               "attribute_positions": ["layer", "example_id"]}[verb]
        self._parts = {k: part for k, part in frame.group_by(key, maintain_order=True)} if key else {(): frame}

    def supports(self, verb: str) -> bool:
        Method.supports(verb)  # rejects unknown verbs
        return verb == self.verb

    def _part(self, key: tuple, what: str) -> pl.DataFrame:
        if key not in self._parts:
            raise ReplayError(f"{self.source}: the submission holds no answer for {what}; "
                              "re-export it for this task version (`neuronbench submit validate` lists gaps)")
        return self._parts[key]

    def relevance(self, ctx: MethodContext) -> NeuronScores:
        labelling = "" if ctx.labelling is None else f" with labelling {ctx.labelling!r}"
        part = self._part((ctx.concept, ctx.labelling), f"relevance of concept {ctx.concept!r}{labelling}")
        index = ctx.index
        rows = part["answer_row"].unique(maintain_order=True).to_list()
        scores = np.stack([self._vector(index, part.filter(pl.col("answer_row").eq_missing(r))) for r in rows])
        if rows == [None]:
            return NeuronScores(index, torch.from_numpy(scores[0]))
        concepts = tuple(part.filter(pl.col("answer_row").eq_missing(r))["answer_concept"][0] for r in rows)
        return NeuronScores(index, torch.from_numpy(scores), concepts=concepts)

    def _vector(self, index: NeuronIndex, part: pl.DataFrame) -> np.ndarray:
        flat = _flat_ids(index, part, self.source)
        if len(flat) != index.size or len(np.unique(flat)) != index.size:
            raise ReplayError(f"{self.source}: relevance rows cover {len(np.unique(flat))} distinct neurons; "
                              f"the task scores {index.size}")
        out = np.empty(index.size)
        out[flat] = part["score"].to_numpy()
        return out

    def stage_change(self, ctx: MethodContext) -> float:
        key = stage_key(ctx)
        text = "" if key[1] is None else f" on {key[1]} text"
        return float(self._part(key, f"the stage change of {key[0]} from step {key[2]} to {key[3]}{text}")["score"][0])

    def descriptors(self, ctx: MethodContext, vocabulary: tuple[str, ...]) -> dict[int, list[str]]:
        part = self._part((), "descriptors")
        flat = _flat_ids(ctx.index, part, self.source)
        out: dict[int, list[str]] = defaultdict(list)
        for neuron, descriptor in zip(flat.tolist(), part["descriptor"].to_list()):  # sorted by rank
            out[neuron].append(descriptor)
        return dict(out)

    def attribute_positions(self, ctx: MethodContext, layer: int) -> list[torch.Tensor]:
        return [torch.tensor(self._part((int(layer), ex), f"example {ex} at layer {layer}")["score"].to_numpy(),
                             dtype=torch.float64) for ex in example_ids(ctx)]


def _flat_ids(index: NeuronIndex, part: pl.DataFrame, source: str) -> np.ndarray:
    """Flat ids (in `index`) of the neurons named by `part`'s site_kind/layer/index columns."""
    kinds, layers, local = (part[c].to_numpy() for c in ("site_kind", "layer", "index"))
    flat, problem = index.locate(kinds, layers, local)
    for r in np.flatnonzero(problem)[:1].tolist():
        site = f"{kinds[r]}.{layers[r]}"
        if problem[r] == OUT_OF_RANGE:
            width = index.width(Site(int(layers[r]), kinds[r]))
            raise ReplayError(f"{source}: a neuron index of {site} is outside 0..{width - 1}")
        raise ReplayError(f"{source}: site {site} is not one the task asked about "
                          f"({', '.join(map(str, index.sites))})")
    return flat
