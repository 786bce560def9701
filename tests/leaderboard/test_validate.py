"""The validator on malformed submissions, one defect each (asserting message, file, field and
row), several defects at once, the size limits, and the row checks on synthetic task facts."""
from __future__ import annotations

import json
import os

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neuronbench.harness.engine.sites import NeuronIndex, Site
from neuronbench.harness.suite.task import TASKS
from neuronbench.leaderboard import submission as sub
from neuronbench.leaderboard import validate as val
from neuronbench.leaderboard.checks import check_rows
from neuronbench.leaderboard.facts import TaskFacts
from neuronbench.leaderboard.submission import MANIFEST
from neuronbench.leaderboard.validate import validate

from ._exports import copy_of

POSITIONS = next(n for n in TASKS.names() if TASKS.get(n).spec.verb == "attribute_positions")


def _frame(folder, task: str, edit) -> None:
    path = folder / f"{task}.parquet"
    edit(pl.read_parquet(path)).write_parquet(path)


def _set(frame: pl.DataFrame, column: str, row: int, value) -> pl.DataFrame:
    values = frame[column].to_list()
    values[row] = value
    return frame.with_columns(pl.Series(column, values, dtype=frame.schema[column]))


def _manifest(folder, edit) -> None:
    man = json.loads((folder / MANIFEST).read_text())
    edit(man)
    (folder / MANIFEST).write_text(json.dumps(man))


def _outside(d):
    (d.parent / "elsewhere.parquet").write_bytes((d / "prune.parquet").read_bytes())
    (d / "prune.parquet").unlink()
    (d / "prune.parquet").symlink_to(d.parent / "elsewhere.parquet")


def _rename_task(name: str):
    def edit(man):
        man["tasks"][name] = man["tasks"].pop("prune")
    return edit


# name -> (damage, file, field, row, words in the message)
DEFECTS = {
    "missing file": (lambda d: (d / "prune.parquet").unlink(), "prune.parquet", None, None, "missing file"),
    "wrong dtype": (lambda d: _frame(d, "prune", lambda f: f.with_columns(pl.col("score").cast(pl.String))),
                    "prune.parquet", "score", None, "dtype is String; expected Float64"),
    "narrow int": (lambda d: _frame(d, "prune", lambda f: f.with_columns(pl.col("layer").cast(pl.Int32))),
                   "prune.parquet", "layer", None, "dtype is int32; expected Int64"),
    "NaN": (lambda d: _frame(d, "prune", lambda f: _set(f, "score", 5, float("nan"))),
            "prune.parquet", "score", 5, "nan is not a finite number"),
    "infinity": (lambda d: _frame(d, POSITIONS, lambda f: _set(f, "score", 2, float("inf"))),
                 f"{POSITIONS}.parquet", "score", 2, "inf is not a finite number"),
    "null": (lambda d: _frame(d, "prune", lambda f: _set(f, "site_kind", 3, None)),
             "prune.parquet", "site_kind", 3, "missing value (null)"),
    "duplicate neuron": (lambda d: _frame(d, "prune", lambda f: pl.concat([f, f[3]])),
                         "prune.parquet", "index", "last", "duplicate neuron"),
    "missing neuron": (lambda d: _frame(d, "prune", lambda f: f.filter(pl.int_range(pl.len()) != 7)),
                       "prune.parquet", "index", None, "missing neurons: concept None row None scores"),
    "layer outside the model": (lambda d: _frame(d, "prune", lambda f: _set(f, "layer", 0, 99)),
                                "prune.parquet", "layer", 0, "neuron outside the model: site ffn.99"),
    "index outside the model": (lambda d: _frame(d, "prune", lambda f: _set(f, "index", 0, 10**6)),
                                "prune.parquet", "index", 0, "neuron outside the model"),
    "unknown site kind": (lambda d: _frame(d, "prune", lambda f: _set(f, "site_kind", 0, "attn")),
                          "prune.parquet", "site_kind", 0, "unknown site kind 'attn'"),
    "unknown descriptor": (lambda d: _frame(d, "descriptors", lambda f: _set(f, "descriptor", 0, "pos:XYZ")),
                           "descriptors.parquet", "descriptor", 0, "unknown descriptor 'pos:XYZ'"),
    "rank out of range": (lambda d: _frame(d, "descriptors", lambda f: _set(f, "rank", 0, 11)),
                          "descriptors.parquet", "rank", 0, "rank 11 is not in 1..10"),
    "step outside the trajectory": (lambda d: _frame(d, "ppl-trend", lambda f: _set(f, "from_step", 0, 999)),
                                    "ppl-trend.parquet", "from_step", 0, "step 999 is not a checkpoint"),
    "missing stage pair": (lambda d: _frame(d, "ppl-trend", lambda f: f[1:]),
                           "ppl-trend.parquet", "score", None, "missing the stage change of"),
    "example outside the pool": (lambda d: _frame(d, POSITIONS, lambda f: _set(f, "example_id", 0, 10**9)),
                                 f"{POSITIONS}.parquet", "example_id", 0, "example id 1000000000 is not in the task's pool"),
    "unknown column": (lambda d: _frame(d, "prune", lambda f: f.with_columns(claimed_gap_auc=pl.lit(0.99))),
                       "prune.parquet", "claimed_gap_auc", None, "unknown column"),
    "truncated parquet": (lambda d: os.truncate(d / "prune.parquet", os.path.getsize(d / "prune.parquet") // 2),
                          "prune.parquet", None, None, "not a readable parquet file"),
    "not parquet": (lambda d: (d / "prune.parquet").write_bytes(b"PAR1 but not really"),
                    "prune.parquet", None, None, "not a readable parquet file"),
    "oversized file": (lambda d: os.truncate(d / "prune.parquet", sub.MAX_FILE_BYTES + 1),
                       "prune.parquet", None, None, "file too large"),
    "format version": (lambda d: _manifest(d, lambda m: m.update(format_version=2)),
                       MANIFEST, "format_version", None, "format version 2 is not supported"),
    "NeuronBench version": (lambda d: _manifest(d, lambda m: m.update(neuronbench_version="9.0.0")),
                            MANIFEST, "neuronbench_version", None, "exported with NeuronBench '9.0.0'"),
    "task version": (lambda d: _manifest(d, lambda m: m["tasks"]["prune"].update(task_version=99)),
                     MANIFEST, "tasks.prune.task_version", None, "exported for task_version '99'"),
    "spec fingerprint": (lambda d: _manifest(d, lambda m: m["tasks"]["prune"].update(fingerprint="0" * 16)),
                         MANIFEST, "tasks.prune.fingerprint", None, "quick prune spec has"),
    "full-scale claim": (lambda d: _manifest(d, lambda m: m.update(quick=False)),
                         MANIFEST, "tasks.prune.model", None, "full prune spec has 'minilm-polarity'"),
    "unknown manifest field": (lambda d: _manifest(d, lambda m: m.update(score=0.99)),
                               MANIFEST, "score", None, "unknown field"),
    "unknown task field": (lambda d: _manifest(d, lambda m: m["tasks"]["prune"].update(gap_auc=0.99)),
                           MANIFEST, "tasks.prune.gap_auc", None, "unknown field"),
    "missing manifest field": (lambda d: _manifest(d, lambda m: m.pop("contact")),
                               MANIFEST, "contact", None, "missing field"),
    "wrong manifest type": (lambda d: _manifest(d, lambda m: m.update(seed="0")),
                            MANIFEST, "seed", None, "must be a JSON int, got str"),
    "bool is no int": (lambda d: _manifest(d, lambda m: m.update(format_version=True)),
                       MANIFEST, "format_version", None, "must be a JSON int, got bool"),
    "unknown task": (lambda d: _manifest(d, _rename_task("prnue")),
                     MANIFEST, "tasks.prnue", None, "unknown task"),
    "../ in a task name": (lambda d: _manifest(d, _rename_task("../prune")),
                           MANIFEST, "tasks.../prune", None, "not a path"),
    "absolute path as a task name": (lambda d: _manifest(d, _rename_task("/etc/passwd")),
                                     MANIFEST, "tasks./etc/passwd", None, "not a path"),
    "symlink out of the folder": (_outside, "prune.parquet", None, None, "symbolic link"),
    "a folder inside": (lambda d: (d / "extra").mkdir(), "extra", None, None, "not a plain file"),
    "an extra file": (lambda d: (d / "notes.txt").write_text("hi"), "notes.txt", None, None, "unexpected file"),
    "manifest not JSON": (lambda d: (d / MANIFEST).write_text("{"), MANIFEST, None, None, "not valid UTF-8 JSON"),
    "manifest not an object": (lambda d: (d / MANIFEST).write_text("[]"), MANIFEST, None, None, "must be an object"),
    "no manifest": (lambda d: (d / MANIFEST).unlink(), MANIFEST, None, None, "missing file"),
    "no task": (lambda d: _manifest(d, lambda m: m.update(tasks={})), MANIFEST, "tasks", None, "lists no task"),
}


@pytest.fixture
def folder(tmp_path):
    return copy_of("random", tmp_path)


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_defect_is_rejected_with_its_file_field_and_message(folder, defect):
    damage, file, field, row, words = DEFECTS[defect]
    damage(folder)
    problems = validate(folder)
    if row == "last":
        row = len(pl.read_parquet(folder / file)) - 1
    hits = [p for p in problems if p.file == file and p.field == field and words in p.message
            and (row is None or p.row == row)]
    assert hits, f"{defect}: expected {file} / {field} / row {row} / {words!r}; got\n" + "\n".join(map(str, problems))
    assert not any("could not check" in p.message for p in problems)


def test_every_problem_is_reported_at_once(folder):
    chosen = ("NaN", "unknown descriptor", "step outside the trajectory", "example outside the pool",
              "unknown manifest field", "an extra file")
    for name in chosen:
        DEFECTS[name][0](folder)
    problems = validate(folder)
    for name in chosen:
        _, file, field, row, words = DEFECTS[name]
        assert any(p.file == file and p.field == field and words in p.message for p in problems), name


def test_size_and_row_limits(folder, monkeypatch):
    monkeypatch.setattr(val, "MAX_TOTAL_BYTES", 1000)
    assert any("bytes; at most 1000" in p.message for p in validate(folder))
    monkeypatch.undo()
    monkeypatch.setattr(val, "MAX_ROWS", 10)
    assert any(p.file == "prune.parquet" and "rows; a file holds at most 10" in p.message for p in validate(folder))
    monkeypatch.undo()
    monkeypatch.setattr(sub, "MAX_TEXT_BYTES", 100)  # one long value repeated on every row decodes big
    assert any(p.file == "prune.parquet" and "too large: its text columns decode to" in p.message
               for p in validate(folder))


def test_many_bad_rows_are_reported_up_to_a_cap_then_counted(folder):
    _frame(folder, "prune", lambda f: f.with_columns(score=pl.lit(float("nan"))))
    problems = [p for p in validate(folder) if p.field == "score"]
    assert len(problems) == 21 and problems[-1].row is None and "more rows with the same defect" in problems[-1].message


def test_bytes_that_are_not_utf8_are_a_problem_or_ignored_never_a_crash(folder):
    path = folder / "prune.parquet"
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({b"note": b"\xff\xfe"}), path)  # polars panics on it
    assert validate(folder) == []
    kinds = table.column("site_kind").combine_chunks()
    data = b"\xff" * (len(kinds) * 3)
    offsets = pa.py_buffer(np.arange(0, len(data) + 1, 3, dtype=np.int32).tobytes())
    bad = pa.Array.from_buffers(pa.string(), len(kinds), [None, offsets, pa.py_buffer(data)])
    pq.write_table(table.set_column(table.schema.get_field_index("site_kind"), "site_kind", bad), path)
    assert [p.message.split(":")[0] for p in validate(folder)] == ["not a readable parquet file (truncated or corrupt?)"]


def test_a_missing_folder_is_a_problem_not_an_exception(tmp_path):
    assert "no such folder" in validate(tmp_path / "nope")[0].message


# --------------------------------------------------------------------------- rows on synthetic facts

INDEX = NeuronIndex.build({Site.ffn(0): 3, Site.ffn(1): 2})


def _relevance(**cols) -> pl.DataFrame:
    base = {"concept": [None] * 5, "labelling": [None] * 5, "answer_row": [None] * 5, "answer_concept": [None] * 5,
            "site_kind": ["ffn"] * 5, "layer": [0, 0, 0, 1, 1], "index": [0, 1, 2, 0, 1], "score": [0.1] * 5}
    return sub.to_schema("relevance", {**base, **cols})


def test_per_concept_relevance_rows_must_be_consistent():
    facts = TaskFacts("relevance", INDEX, num_layers=2)
    assert check_rows("r.parquet", "relevance", _relevance(), facts) == []
    mixed = _relevance(answer_row=[None, 0, 0, 0, 0])
    assert any("mixes a single-row answer" in p.message for p in check_rows("r.parquet", "relevance", mixed, facts))
    stray = _relevance(answer_concept=["x", None, None, None, None])
    assert any(p.field == "answer_concept" and p.row == 0 for p in check_rows("r.parquet", "relevance", stray, facts))
    other = _relevance(concept=["positive"] * 5)
    assert any("no answer for concept None" in p.message for p in check_rows("r.parquet", "relevance", other, facts))
    null_only = _relevance(labelling=["permuted:0"] * 5)  # a label null does not answer the real question
    assert any("no answer for concept None" in p.message for p in check_rows("r.parquet", "relevance", null_only, facts))


def test_a_label_null_answer_is_checked_like_the_real_one():
    facts = TaskFacts("relevance", INDEX, num_layers=2)
    both = pl.concat([_relevance(), _relevance(labelling=["permuted:0"] * 5)])
    assert check_rows("r.parquet", "relevance", both, facts) == []
    short = pl.concat([_relevance(), _relevance(labelling=["permuted:0"] * 5).head(4)])
    (problem,) = check_rows("r.parquet", "relevance", short, facts)
    assert problem.field == "index" and "concept None with labelling 'permuted:0' row None scores 4" in problem.message


def test_positions_must_cover_the_pool_with_contiguous_positions():
    facts = TaskFacts("attribute_positions", INDEX, num_layers=2, first_layer=0, pool=frozenset({4, 9}))
    rows = {"example_id": [4, 4, 9, 9], "layer": [0, 0, 0, 0], "position": [0, 1, 0, 1], "score": [0.5] * 4}
    assert check_rows("e.parquet", "attribute_positions", sub.to_schema("attribute_positions", rows), facts) == []
    gap = sub.to_schema("attribute_positions", {**rows, "position": [0, 2, 0, 1]})
    assert any("positions must be 0..T-1" in p.message
               for p in check_rows("e.parquet", "attribute_positions", gap, facts))
    short = sub.to_schema("attribute_positions", {k: v[:2] for k, v in rows.items()})
    problems = check_rows("e.parquet", "attribute_positions", short, facts)
    assert any(p.field == "example_id" and "missing examples at layer 0: 1 of the pool's 2 (first: 9)" in p.message
               for p in problems)
    wrong_layer = sub.to_schema("attribute_positions", {**rows, "layer": [1, 1, 1, 1]})
    assert any("no attributions at layer 0" in p.message
               for p in check_rows("e.parquet", "attribute_positions", wrong_layer, facts))
