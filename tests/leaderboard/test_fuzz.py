"""Fuzzing the validator with hypothesis: mutated manifests, mutated parquet contents and
mutated parquet bytes must all come back as a list of problems, never as an exception (and never
through the validator's last-resort guard). Each test prints how many cases ran."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuronbench.leaderboard.checks import Problem
from neuronbench.leaderboard.submission import COLUMNS, MANIFEST, MANIFEST_FIELDS, TASK_FIELDS
from neuronbench.leaderboard.validate import validate

from ._exports import exported

# Cases per test (360 in all by default); NEURONBENCH_FUZZ_CASES=5000 for a deeper run.
CASES = int(os.environ.get("NEURONBENCH_FUZZ_CASES", 120))
FUZZ = settings(max_examples=CASES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
TEXT = st.sampled_from(["ffn", "resid", "attn", "", "pos:NN", "stop", "../x", "\x00", "é" * 3, "NaN"]) | st.text(max_size=12)
INTS = st.sampled_from([0, 1, 2, 3, 5, -1, 10, 99, 2**31, 2**63 - 1, -2**63]) | st.integers(-50, 5000)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)


def _check(folder: Path) -> None:
    problems = validate(folder)
    assert isinstance(problems, list) and all(isinstance(p, Problem) for p in problems)
    assert not any("could not check" in p.message for p in problems), problems


def _run(body) -> int:
    """Run the hypothesis test `body(workdir, ...)` on fresh copies of the `random` export; return the
    number of cases."""
    base = exported("random").folder
    count = [0]
    with tempfile.TemporaryDirectory() as tmp:
        def fresh() -> Path:
            count[0] += 1
            return Path(shutil.copytree(base, Path(tmp) / f"case{count[0]}"))
        body(fresh)
    return count[0]


def _paths(man: dict) -> list[tuple[str, ...]]:
    tasks = [("tasks", t, f) for t in man["tasks"] for f in TASK_FIELDS]
    return [(k,) for k in MANIFEST_FIELDS] + [("tasks",)] + [("tasks", t) for t in man["tasks"]] + tasks


def test_fuzz_manifests():
    man0 = json.loads((exported("random").folder / MANIFEST).read_text())
    paths = _paths(man0)
    edit = st.tuples(st.sampled_from(paths) | st.tuples(st.text(max_size=8)), st.booleans(), JSON)

    def body(fresh):
        @FUZZ
        @given(edits=st.lists(edit, min_size=1, max_size=4), raw=st.none() | st.binary(max_size=64))
        def case(edits, raw):
            folder = fresh()
            man = json.loads(json.dumps(man0))
            for path, delete, value in edits:
                parent = man
                for key in path[:-1]:
                    parent = parent.get(key) if isinstance(parent, dict) else None
                if isinstance(parent, dict):
                    if delete:
                        parent.pop(path[-1], None)
                    else:
                        parent[path[-1]] = value
            (folder / MANIFEST).write_bytes(raw if raw is not None else json.dumps(man).encode())
            _check(folder)
        case()

    n = _run(body)
    print(f"manifest fuzz: {n} cases")
    assert n >= CASES // 2


def _cell(dtype) -> st.SearchStrategy:
    kind = {pl.Int64: INTS, pl.Float64: FLOATS, pl.String: TEXT}[dtype]
    return st.none() | kind


@st.composite
def _mutated(draw, frame: pl.DataFrame, verb: str) -> pl.DataFrame:
    """`frame` with random cells, rows, columns and dtypes changed."""
    columns = {c.name: c.dtype for c in COLUMNS[verb]}
    data = {name: frame[name].to_list() for name in frame.columns}
    n = len(frame)
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from(list(columns)))
        if n:
            data[name][draw(st.integers(0, n - 1))] = draw(_cell(columns[name]))
    out = pl.DataFrame(data, schema=columns)
    action = draw(st.sampled_from(["none", "drop", "duplicate", "cast", "extra", "missing", "slice"]))
    name = draw(st.sampled_from(list(columns)))
    if action == "drop" and n:
        out = out.filter(pl.int_range(pl.len()) != draw(st.integers(0, n - 1)))
    elif action == "duplicate" and n:
        out = pl.concat([out, out.sample(draw(st.integers(1, 3)), with_replacement=True, seed=0)])
    elif action == "cast":
        dtype = draw(st.sampled_from([pl.Int32, pl.Float32, pl.String, pl.Boolean, pl.Null, pl.List(pl.Int64)]))
        try:
            out = out.with_columns(pl.col(name).cast(dtype, strict=False))
        except pl.exceptions.PolarsError:  # no such cast (e.g. text to list): a column of nulls of that dtype
            out = out.with_columns(pl.lit(None, dtype).alias(name))
    elif action == "extra":
        out = out.with_columns(pl.lit(draw(FLOATS)).alias(draw(st.text(min_size=1, max_size=6))))
    elif action == "missing":
        out = out.drop(name)
    elif action == "slice":
        out = out.head(draw(st.integers(0, 3)))
    return out


def test_fuzz_parquet_contents():
    folder0 = exported("random").folder
    man = json.loads((folder0 / MANIFEST).read_text())
    tasks = sorted(man["tasks"])
    frames = {t: pl.read_parquet(folder0 / f"{t}.parquet") for t in tasks}

    def body(fresh):
        @FUZZ
        @given(data=st.data())
        def case(data):
            task = data.draw(st.sampled_from(tasks))
            frame = data.draw(_mutated(frames[task], man["tasks"][task]["verb"]))
            folder = fresh()
            frame.write_parquet(folder / f"{task}.parquet")
            _check(folder)
        case()

    n = _run(body)
    print(f"parquet content fuzz: {n} cases")
    assert n >= CASES // 2


def test_fuzz_parquet_bytes():
    folder0 = exported("random").folder
    tasks = sorted(json.loads((folder0 / MANIFEST).read_text())["tasks"])
    raw = {t: (folder0 / f"{t}.parquet").read_bytes() for t in tasks}

    def body(fresh):
        @FUZZ
        @given(task=st.sampled_from(tasks), cut=st.none() | st.integers(0, 10**6),
               flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=8),
               junk=st.none() | st.binary(max_size=64))
        def case(task, cut, flips, junk):
            data = bytearray(raw[task])
            for pos, xor in flips:
                data[pos % len(data)] ^= xor
            if cut is not None:
                data = data[: cut % (len(data) + 1)]
            if junk is not None:
                data = junk + data if len(junk) % 2 else data + junk
            folder = fresh()
            (folder / f"{task}.parquet").write_bytes(bytes(data))
            _check(folder)
        case()

    n = _run(body)
    print(f"parquet byte fuzz: {n} cases")
    assert n >= CASES // 2

