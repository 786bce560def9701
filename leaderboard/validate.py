"""Strict validation of a submission folder: files and paths, sizes, the manifest, then every
task's output file. All problems are collected and returned together; no input raises.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from polars.exceptions import PanicException

from neuronbench.harness import __version__
from neuronbench.harness.engine import paths
from neuronbench.harness.suite.runner import RunConfig, resolve_spec
from neuronbench.harness.suite.task import TASKS, TaskSpec

from .checks import NULL, Problem, check_columns, check_rows, check_values
from .facts import task_facts
from .submission import (FORMAT_VERSION, MANIFEST, MANIFEST_FIELDS, MAX_FILE_BYTES, MAX_MANIFEST_BYTES, MAX_ROWS,
                         MAX_TOTAL_BYTES, NAME_PATTERN, TASK_FIELDS, TooLarge, file_name, parquet_layout, read_frame,
                         strict_json, task_entry)

log = logging.getLogger(__name__)

MAX_ENTRIES = 64  # files in a submission folder (one per task plus the manifest)
MAX_TEXT = {"description": 4000}  # characters; other text fields take at most 300
MAX_SEED = 2**31 - 1


def validate(folder: str | Path) -> list[Problem]:
    """Every problem of the submission in `folder`; an empty list means it is valid.

    Args:
        folder: a submission folder (see `leaderboard/README.md`).

    Returns:
        The problems, each naming its file, row (0-based, where one applies) and field.
    """
    try:
        return _validate(Path(folder))
    except (Exception, PanicException) as err:  # last guard, never reached in the fuzz tests
        log.exception("validator failure on %s", folder)
        return [Problem(str(folder), f"the validator could not check this submission ({type(err).__name__}: {err})")]


def _validate(folder: Path) -> list[Problem]:
    if not folder.is_dir():
        return [Problem(str(folder), "no such folder: pass the folder that holds submission.json")]
    out: list[Problem] = []
    files = _entries(folder, out)
    if MANIFEST not in files:
        return out + [Problem(MANIFEST, "missing file: every submission has a submission.json manifest")]
    man = _read_manifest(folder / MANIFEST, out)
    if man is None:
        return out
    specs = check_manifest(man, out)
    tasks = man.get("tasks") if isinstance(man.get("tasks"), dict) else {}
    expected = {file_name(t) for t in tasks if isinstance(t, str) and _plain(t)}
    for name in sorted(set(files) - expected - {MANIFEST, paths.MARKER}):  # the marker: `export` wrote it
        out.append(Problem(name, "unexpected file: a submission holds submission.json and one <task>.parquet "
                                 "per task in its manifest, nothing else"))
    if sum(files.values()) > MAX_TOTAL_BYTES:
        out.append(Problem(str(folder), f"the submission is {sum(files.values())} bytes; at most {MAX_TOTAL_BYTES}"))
    for task, spec in specs.items():
        name = file_name(task)
        if name not in files:
            out.append(Problem(name, f"missing file: the manifest lists task {task!r}"))
        elif files[name] <= MAX_FILE_BYTES:
            out += check_file(folder / name, task, spec)
    return out


def _entries(folder: Path, out: list[Problem]) -> dict[str, int]:
    """Name -> size of the plain files directly in `folder`; links, folders and oversized files
    become problems (and only plain files are returned)."""
    files: dict[str, int] = {}
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    if len(entries) > MAX_ENTRIES:
        out.append(Problem(str(folder), f"{len(entries)} entries; a submission holds at most {MAX_ENTRIES} files"))
        entries = entries[:MAX_ENTRIES]
    for e in entries:
        name = ascii(e.name)[1:-1]
        if e.is_symlink():
            out.append(Problem(name, "symbolic link: a submission holds plain files only (nothing outside the folder)"))
        elif not e.is_file(follow_symlinks=False):
            out.append(Problem(name, "not a plain file (a folder or device): a submission holds plain files only"))
        else:
            files[name] = size = e.stat(follow_symlinks=False).st_size
            limit = MAX_MANIFEST_BYTES if e.name == MANIFEST else MAX_FILE_BYTES
            if size > limit:
                out.append(Problem(name, f"file too large: {size} bytes, at most {limit}"))
    return files


def _read_manifest(path: Path, out: list[Problem]) -> dict | None:
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        return None
    try:
        man = strict_json(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        out.append(Problem(MANIFEST, f"not valid UTF-8 JSON: {str(err)[:200]}"))
        return None
    if not isinstance(man, dict):
        out.append(Problem(MANIFEST, f"the manifest is a JSON {type(man).__name__}; it must be an object"))
        return None
    return man


def _plain(name: str) -> bool:
    """A task name that cannot act as a path (no separators, no leading dot, no NUL)."""
    return bool(name) and not name.startswith(".") and not re.search(r"[/\\\x00:]", name)


def _typed(value, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_manifest(man: dict, out: list[Problem]) -> dict[str, TaskSpec]:
    """Append the manifest's problems to `out`; return the resolved spec of each valid task entry."""
    for key in man:
        if key not in MANIFEST_FIELDS:
            out.append(Problem(MANIFEST, f"unknown field; the fields are {', '.join(MANIFEST_FIELDS)}",
                               field=ascii(key)[1:-1] if isinstance(key, str) else repr(key)))
    for key, (kind, required) in MANIFEST_FIELDS.items():
        if key not in man:
            if required:
                out.append(Problem(MANIFEST, "missing field", field=key))
        elif not _typed(man[key], kind):
            out.append(Problem(MANIFEST, f"must be a JSON {kind.__name__}, got {type(man[key]).__name__}", field=key))
        else:
            _check_value(key, man[key], out)
    quick = man.get("quick")
    if not isinstance(man.get("tasks"), dict) or not isinstance(quick, bool):
        return {}
    return {name: spec for name, entry in man["tasks"].items()
            if (spec := _check_task(name, entry, quick, out)) is not None}


def _check_value(key: str, value, out: list[Problem]) -> None:
    bad = None
    if key == "format_version" and value != FORMAT_VERSION:
        bad = f"format version {value} is not supported (this NeuronBench reads {FORMAT_VERSION}): re-export it"
    elif key == "method" and not NAME_PATTERN.fullmatch(value):
        bad = f"method name {value[:80]!r} must match {NAME_PATTERN.pattern}"
    elif key == "authors" and (not value or not all(isinstance(a, str) and 0 < len(a) <= 300 for a in value)):
        bad = "authors must be a non-empty list of names (strings of 1-300 characters)"
    elif key == "neuronbench_version" and not compatible_version(value):
        bad = f"exported with NeuronBench {value[:40]!r}; this is {__version__}: re-export with a compatible version"
    elif key == "tasks" and not value:
        bad = "lists no task: a submission covers at least one"
    elif key == "seed" and not 0 <= value <= MAX_SEED:
        bad = f"seed {value} must be in 0..{MAX_SEED}"
    elif isinstance(value, str) and len(value) > MAX_TEXT.get(key, 300):
        bad = f"{len(value)} characters; at most {MAX_TEXT.get(key, 300)}"
    elif key in ("method_version", "license") and not value.strip():
        bad = "must not be empty"
    if bad:
        out.append(Problem(MANIFEST, bad, field=key))


def compatible_version(theirs: str) -> bool:
    """Same MAJOR.MINOR as this NeuronBench (patch releases never change what a task asks)."""
    pattern = r"(\d+)\.(\d+)(\.\S*)?"
    mine, got = re.fullmatch(pattern, __version__), re.fullmatch(pattern, theirs)
    return bool(mine and got and mine.group(1, 2) == got.group(1, 2))


def _check_task(name, entry, quick: bool, out: list[Problem]) -> TaskSpec | None:
    field = f"tasks.{ascii(name)[1:-1][:80]}"
    if not _plain(name):
        out.append(Problem(MANIFEST, "a task name is a plain registered name, not a path", field=field))
        return None
    if name not in TASKS.names():
        out.append(Problem(MANIFEST, f"unknown task; tasks are {', '.join(TASKS.names())}", field=field))
        return None
    if not isinstance(entry, dict):
        out.append(Problem(MANIFEST, f"must be an object with {', '.join(TASK_FIELDS)}", field=field))
        return None
    n_before = len(out)
    for key in entry:
        if key not in TASK_FIELDS:
            out.append(Problem(MANIFEST, f"unknown field; a task entry has {', '.join(TASK_FIELDS)}",
                               field=f"{field}.{ascii(key)[1:-1][:80]}"))
    spec = resolve_spec(TASKS.get(name), RunConfig(quick=quick))
    want = task_entry(spec)
    for key, kind in TASK_FIELDS.items():
        if key not in entry:
            out.append(Problem(MANIFEST, "missing field", field=f"{field}.{key}"))
        elif not _typed(entry[key], kind):
            out.append(Problem(MANIFEST, f"must be a JSON {kind.__name__}", field=f"{field}.{key}"))
        elif entry[key] != want[key]:
            scale = "quick" if quick else "full"
            out.append(Problem(MANIFEST, f"exported for {key} {str(entry[key])[:40]!r}; this NeuronBench's {scale} "
                                         f"{name} spec has {want[key]!r}: re-export it", field=f"{field}.{key}"))
    return spec if len(out) == n_before else None


def check_file(path: Path, task: str, spec: TaskSpec) -> list[Problem]:
    """Every problem of one task's output file; data is read only once its footer passes the row
    limit and the column checks."""
    name = path.name
    try:
        rows, layout = parquet_layout(path)
        problems = check_columns(name, spec.verb, layout)
        if rows > MAX_ROWS:
            return problems + [Problem(name, f"{rows} rows; a file holds at most {MAX_ROWS}")]
        if problems:
            return problems
        frame = read_frame(path)
    except TooLarge as err:
        return [Problem(name, f"too large: {err}")]
    except (Exception, PanicException) as err:  # pyarrow and polars signal damaged files in many ways
        return [Problem(name, f"not a readable parquet file (truncated or corrupt?): {type(err).__name__}: "
                              f"{str(err)[:200]}")]
    problems, frame = check_values(name, spec.verb, frame)
    if any(p.message == NULL for p in problems):
        return problems
    try:
        facts = task_facts(task, spec)
    except (ValueError, KeyError, FileNotFoundError) as err:
        return problems + [Problem(name, f"cannot check the rows against task {task!r}: {err}")]
    return problems + check_rows(name, spec.verb, frame, facts)
