"""Checks of one task's output frame: schema and values, then its rows against the task's facts
(neurons in the model, descriptors in the vocabulary, examples in the pool, steps in the trajectory).
Every defect becomes a `Problem` naming the file, the row (0-based) and the field.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from neuronbench.harness.engine.sites import NO_SITE, OUT_OF_RANGE, SITE_KINDS, UNKNOWN_KIND, Site
from neuronbench.harness.engine.validate import MAX_DESCRIPTORS

from .facts import TaskFacts
from .submission import COLUMNS

MAX_REPORTED = 20  # rows reported per (file, field, defect); the rest are counted in one more problem
MAX_GROUPS = 1000  # relevance answers (concept, row) per file
NULL = "missing value (null)"


@dataclass(frozen=True)
class Problem:
    """One defect of a submission: where it is and what is wrong."""

    file: str
    message: str
    row: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = self.file + (f" row {self.row}" if self.row is not None else "")
        return f"{where}{f' field {self.field!r}' if self.field else ''}: {self.message}"


def flag_rows(out: list[Problem], file: str, field: str, mask, message) -> None:
    """A problem for each row where `mask` holds (`message(row)` or a fixed text), at most
    `MAX_REPORTED`, then one counting the rest."""
    rows = np.flatnonzero(np.asarray(mask, bool))
    for r in rows[:MAX_REPORTED].tolist():
        out.append(Problem(file, message(r) if callable(message) else message, r, field))
    if len(rows) > MAX_REPORTED:
        out.append(Problem(file, f"{len(rows) - MAX_REPORTED} more rows with the same defect", None, field))


def check_columns(file: str, verb: str, layout: list[tuple[str, object]]) -> list[Problem]:
    """Column names and dtypes (from the file's footer, before any data is read)."""
    out: list[Problem] = []
    columns = {c.name: c for c in COLUMNS[verb]}
    names = ", ".join(columns)
    seen: dict[str, object] = {}
    for name, dtype in layout:
        if name in seen:
            out.append(Problem(file, "the column appears twice", field=name))
        elif name not in columns:
            out.append(Problem(file, f"unknown column; {verb} files have the columns {names}", field=name))
        seen[name] = dtype
    for c in columns.values():
        if c.name not in seen:
            if c.required:
                out.append(Problem(file, f"missing column ({c.dtype} of {verb})", field=c.name))
        elif seen[c.name] != c.dtype:
            out.append(Problem(file, f"dtype is {seen[c.name]}; expected {c.dtype}", field=c.name))
    return out


def check_values(file: str, verb: str, frame: pl.DataFrame) -> tuple[list[Problem], pl.DataFrame]:
    """Nulls and non-finite numbers of a frame with the right columns. Returns the problems and
    the frame in `COLUMNS[verb]` order, absent optional columns added as nulls.

    Nulls (message `NULL`) stop the row checks, a row with a missing key cannot be placed; a
    non-finite score does not."""
    out: list[Problem] = []
    columns = COLUMNS[verb]
    frame = frame.with_columns(pl.lit(None, c.dtype).alias(c.name) for c in columns
                               if c.name not in frame.columns).select([c.name for c in columns])
    for c in columns:
        if not c.nullable:
            flag_rows(out, file, c.name, frame[c.name].is_null().to_numpy(), NULL)
        if c.dtype == pl.Float64:
            values = frame[c.name].fill_null(0.0).to_numpy()
            flag_rows(out, file, c.name, ~np.isfinite(values), lambda r, v=values: f"{v[r]} is not a finite number")
    return out, frame


def _locate_neurons(out: list[Problem], file: str, frame: pl.DataFrame, facts: TaskFacts) -> np.ndarray:
    """Flat neuron id of each row, -1 where the neuron is not one the task scores."""
    index = facts.index
    kinds, layers, local = (frame[c].to_numpy() for c in ("site_kind", "layer", "index"))
    flat, problem = index.locate(kinds, layers, local)
    listed = ", ".join(map(str, index.sites))
    flag_rows(out, file, "site_kind", problem == UNKNOWN_KIND,
              lambda r: f"unknown site kind {kinds[r]!r}; use one of {SITE_KINDS}")
    flag_rows(out, file, "layer", problem == NO_SITE, lambda r: f"neuron outside the model: site {kinds[r]}.{layers[r]} is "
                                                         f"not one the task scores ({listed})")

    def outside(r: int) -> str:
        width = index.width(Site(int(layers[r]), kinds[r]))
        return f"neuron outside the model: {kinds[r]}.{layers[r]} has {width} neurons, index {local[r]} is not in 0..{width - 1}"

    flag_rows(out, file, "index", problem == OUT_OF_RANGE, outside)
    return flat


def _duplicates(out: list[Problem], file: str, frame: pl.DataFrame, keys: list[str], field: str, what: str) -> None:
    repeat = ~frame.select(pl.struct(keys).is_first_distinct()).to_series().to_numpy()
    flag_rows(out, file, field, repeat, f"duplicate {what} (the same {', '.join(keys)} as an earlier row)")


def _unflat(facts: TaskFacts, flat: int) -> str:
    site, i = facts.index.unflat(int(flat))
    return f"{site} #{i}"


def check_relevance(out: list[Problem], file: str, frame: pl.DataFrame, facts: TaskFacts) -> None:
    flat = _locate_neurons(out, file, frame, facts)
    _duplicates(out, file, frame, ["concept", "labelling", "answer_row", "site_kind", "layer", "index"], "index",
                "neuron")
    flag_rows(out, file, "answer_row", frame["answer_row"].fill_null(0).to_numpy() < 0, "answer_row must be >= 0")
    stray = frame["answer_row"].is_null() & frame["answer_concept"].is_not_null()
    flag_rows(out, file, "answer_concept", stray.to_numpy(), "answer_concept names a row of a per-concept answer; "
                                                            "leave it null when answer_row is null")
    frame = frame.with_columns(_flat=pl.Series(flat))
    if facts.concept not in frame.filter(pl.col("labelling").is_null())["concept"].to_list():
        out.append(Problem(file, f"no answer for concept {facts.concept!r}, which the task asks "
                                 "(null: the task as a whole)", field="concept"))
    n_groups = frame.select(pl.struct("concept", "labelling", "answer_row").n_unique()).item()
    if n_groups > MAX_GROUPS:
        out.append(Problem(file, f"{n_groups} (concept, labelling, answer_row) answers; at most {MAX_GROUPS}",
                           field="concept"))
        return
    for (concept, labelling), part in frame.group_by(["concept", "labelling"], maintain_order=True):
        what = f"concept {concept!r}" + ("" if labelling is None else f" with labelling {labelling!r}")
        answer_rows = part["answer_row"].unique().to_list()
        if None in answer_rows and len(answer_rows) > 1:
            out.append(Problem(file, f"{what} mixes a single-row answer (answer_row null) with "
                                     "per-concept rows", field="answer_row"))
        elif None not in answer_rows and sorted(answer_rows) != list(range(len(answer_rows))):
            out.append(Problem(file, f"{what}: answer_row values {sorted(answer_rows)[:10]} "
                                     "must be 0..R-1", field="answer_row"))
        for (r,), sub in part.group_by(["answer_row"], maintain_order=True):
            if sub["answer_concept"].n_unique() > 1:
                out.append(Problem(file, f"{what} row {r}: answer_concept differs between rows",
                                   field="answer_concept"))
            have = np.unique(sub["_flat"].to_numpy())
            missing = np.setdiff1d(np.arange(facts.index.size), have)
            if len(missing):
                out.append(Problem(file, f"missing neurons: {what} row {r} scores {len(have[have >= 0])} "
                                         f"of the task's {facts.index.size} neurons (first missing: "
                                         f"{_unflat(facts, missing[0])})", field="index"))


def check_stage_change(out: list[Problem], file: str, frame: pl.DataFrame, facts: TaskFacts) -> None:
    steps: dict[str, set[int]] = {}
    for traj, _, a, b in facts.stages:
        steps.setdefault(traj, set()).update((a, b))
    trajs, labels = frame["trajectory"].to_list(), frame["labelling"].to_list()
    flag_rows(out, file, "trajectory", [t not in steps for t in trajs],
              lambda r: f"trajectory {trajs[r]!r} is not one the task asks about ({', '.join(sorted(steps))})")
    for field in ("from_step", "to_step"):
        values = frame[field].to_list()
        flag_rows(out, file, field, [t in steps and v not in steps[t] for t, v in zip(trajs, values)],
                  lambda r, v=values: f"step {v[r]} is not a checkpoint of the trajectory {trajs[r]!r} "
                                      f"(steps {sorted(steps[trajs[r]])})")
    keys = list(zip(trajs, labels, frame["from_step"].to_list(), frame["to_step"].to_list()))
    frame = frame.with_columns(pl.Series("_key", [repr(k) for k in keys]))
    _duplicates(out, file, frame, ["_key"], "to_step", "stage pair (trajectory, labelling, from_step, to_step)")
    asked = set(facts.stages)
    known = [t in steps and a in steps[t] and b in steps[t] for t, _, a, b in keys]
    flag_rows(out, file, "to_step", [ok and k not in asked for ok, k in zip(known, keys)],
              lambda r: f"{keys[r][2]} -> {keys[r][3]} of {keys[r][0]!r} (labelling {keys[r][1]!r}) is not a "
                        "stage pair the task asks about")
    for traj, label, a, b in sorted(asked - set(keys), key=repr):
        text = "" if label is None else f" on {label} text"
        out.append(Problem(file, f"missing the stage change of {traj!r} from step {a} to step {b}{text}", field="score"))


def check_descriptors(out: list[Problem], file: str, frame: pl.DataFrame, facts: TaskFacts) -> None:
    _locate_neurons(out, file, frame, facts)
    words = frame["descriptor"].to_list()
    vocab = set(facts.vocabulary)
    flag_rows(out, file, "descriptor", [w not in vocab for w in words],
              lambda r: f"unknown descriptor {words[r]!r}: not in the task's vocabulary")
    ranks = frame["rank"].to_numpy()
    flag_rows(out, file, "rank", (ranks < 1) | (ranks > MAX_DESCRIPTORS),
              lambda r: f"rank {ranks[r]} is not in 1..{MAX_DESCRIPTORS} (1 = best, at most {MAX_DESCRIPTORS} per neuron)")
    neuron = ["site_kind", "layer", "index"]
    _duplicates(out, file, frame, [*neuron, "rank"], "rank", "rank for a neuron")
    _duplicates(out, file, frame, [*neuron, "descriptor"], "descriptor", "descriptor for a neuron")
    gaps = frame.group_by(neuron).agg(pl.len().alias("n"), pl.col("rank").max().alias("top")).filter(
        pl.col("n") != pl.col("top"))
    for kind, layer, i, n, top in gaps.head(MAX_REPORTED).iter_rows():
        out.append(Problem(file, f"neuron {kind}.{layer} #{i}: {n} descriptors ranked up to {top}; ranks must be "
                                 "1..n", field="rank"))


def check_positions(out: list[Problem], file: str, frame: pl.DataFrame, facts: TaskFacts) -> None:
    ids, layers, positions = (frame[c].to_numpy() for c in ("example_id", "layer", "position"))
    flag_rows(out, file, "example_id", ~np.isin(ids, list(facts.pool)),
              lambda r: f"example id {ids[r]} is not in the task's pool of {len(facts.pool)} examples")
    flag_rows(out, file, "layer", (layers < 0) | (layers >= facts.num_layers),
              lambda r: f"layer {layers[r]} is outside the model's 0..{facts.num_layers - 1}")
    flag_rows(out, file, "position", positions < 0, lambda r: f"position {positions[r]} is negative")
    _duplicates(out, file, frame, ["layer", "example_id", "position"], "position", "position")
    gaps = frame.group_by(["layer", "example_id"]).agg(pl.len().alias("n"), pl.col("position").max().alias("top"))
    for layer, ex, n, top in gaps.filter(pl.col("n") != pl.col("top") + 1).head(MAX_REPORTED).iter_rows():
        out.append(Problem(file, f"layer {layer} example {ex}: {n} positions up to {top}; positions must be "
                                 "0..T-1", field="position"))
    if facts.first_layer not in set(layers.tolist()):
        out.append(Problem(file, f"no attributions at layer {facts.first_layer}, which the task asks", field="layer"))
    inside = frame.filter(pl.col("layer").is_between(0, facts.num_layers - 1))
    for (layer,), part in inside.group_by(["layer"], maintain_order=True):
        missing = facts.pool - set(part["example_id"].to_list())
        if missing:
            out.append(Problem(file, f"missing examples at layer {layer}: {len(missing)} of the pool's {len(facts.pool)} "
                                     f"(first: {min(missing)})", field="example_id"))


CHECKS = {"relevance": check_relevance, "stage_change": check_stage_change, "descriptors": check_descriptors,
          "attribute_positions": check_positions}


def check_rows(file: str, verb: str, frame: pl.DataFrame, facts: TaskFacts) -> list[Problem]:
    """Every problem of a well-formed frame (see `check_schema`) against the task's facts."""
    out: list[Problem] = []
    CHECKS[verb](out, file, frame, facts)
    return out
