"""The submission format: a folder with `submission.json` and one parquet file of a method's
outputs (never its scores) per task. `leaderboard/README.md` documents it; this module is its code.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from neuronbench.harness import __version__
from neuronbench.harness.engine import paths

FORMAT_VERSION = 1
MANIFEST = "submission.json"
# Limits (documented in the README). The largest full-scale answers are a few MB: prune's 9,216
# neurons x a few concepts, or per-position attributions of a pool of test sentences at every layer.
MAX_MANIFEST_BYTES = 64 * 2**10
MAX_FILE_BYTES = 64 * 2**20
MAX_TOTAL_BYTES = 256 * 2**20
MAX_ROWS = 5_000_000  # per file, read from the parquet footer before any data (a small file can hold many rows)
MAX_TEXT_BYTES = 256 * 2**20  # decoded text per file, measured before decoding
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}")


@dataclass(frozen=True)
class Column:
    """One column of a task's output file.

    Attributes:
        name: column name.
        dtype: the exact polars dtype (`pl.Int64`, `pl.Float64` or `pl.String`).
        required: the file must have it (an optional column that is absent reads as all null).
        nullable: null is a value (e.g. the concept of a relevance answer for the task as a whole).
    """

    name: str
    dtype: type[pl.DataType]
    required: bool = True
    nullable: bool = False


def _neuron() -> tuple[Column, ...]:
    return (Column("site_kind", pl.String), Column("layer", pl.Int64), Column("index", pl.Int64))


COLUMNS: dict[str, tuple[Column, ...]] = {
    "relevance": (Column("concept", pl.String, required=False, nullable=True),
                  Column("labelling", pl.String, required=False, nullable=True),
                  Column("answer_row", pl.Int64, required=False, nullable=True),
                  Column("answer_concept", pl.String, required=False, nullable=True),
                  *_neuron(), Column("score", pl.Float64)),
    "stage_change": (Column("trajectory", pl.String, required=False, nullable=True),
                     Column("labelling", pl.String, required=False, nullable=True),
                     Column("from_step", pl.Int64), Column("to_step", pl.Int64), Column("score", pl.Float64)),
    "descriptors": (*_neuron(), Column("rank", pl.Int64), Column("descriptor", pl.String)),
    "attribute_positions": (Column("example_id", pl.Int64), Column("layer", pl.Int64),
                            Column("position", pl.Int64), Column("score", pl.Float64)),
}

# Top-level manifest fields: name -> (type, required). Unknown fields are rejected.
MANIFEST_FIELDS: dict[str, tuple[type, bool]] = {
    "format_version": (int, True), "method": (str, True), "method_version": (str, True),
    "authors": (list, True), "contact": (str, True), "description": (str, True), "code_url": (str, True),
    "license": (str, True), "neuronbench_version": (str, True), "seed": (int, True), "quick": (bool, True),
    "tasks": (dict, True),
}
TASK_FIELDS: dict[str, type] = {"task_version": int, "fingerprint": str, "verb": str, "model": str}


def file_name(task: str) -> str:
    """The output file of `task` inside a submission folder."""
    return f"{task}.parquet"


def to_schema(verb: str, rows: dict[str, list]) -> pl.DataFrame:
    """`rows` (every column of `verb` -> values) as a frame with the exact column order and dtypes."""
    return pl.DataFrame({c.name: rows[c.name] for c in COLUMNS[verb]},
                        schema={c.name: c.dtype for c in COLUMNS[verb]})


def task_entry(spec) -> dict:
    """The manifest entry of a (resolved) task spec."""
    return {"task_version": spec.version, "fingerprint": spec.fingerprint(), "verb": spec.verb, "model": spec.model}


def manifest(method: str, method_version: str, tasks: dict[str, dict], seed: int, quick: bool,
             authors: tuple[str, ...], contact: str = "", description: str = "", code_url: str = "",
             license: str = "unspecified") -> dict:
    """A complete `submission.json` object (see the README for each field)."""
    return {"format_version": FORMAT_VERSION, "method": method, "method_version": method_version,
            "authors": list(authors), "contact": contact, "description": description, "code_url": code_url,
            "license": license, "neuronbench_version": __version__, "seed": seed, "quick": quick,
            "tasks": tasks}


def write_submission(folder: Path, man: dict, frames: dict[str, pl.DataFrame]) -> Path:
    """Write a submission folder atomically: a temporary sibling renamed into place at the end.

    Args:
        folder: where it goes; must not exist yet (a submission is never overwritten in place).
        man: the manifest.
        frames: task name -> its output frame.
    """
    folder = Path(folder)
    if folder.exists():
        raise ValueError(f"{folder} already exists; remove it or pass another --out")
    with paths.atomic_dir(folder, "submission") as tmp:
        for task, frame in frames.items():
            frame.write_parquet(tmp / file_name(task))
        (tmp / MANIFEST).write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")
    return folder


def read_manifest(folder: Path) -> dict:
    """The parsed `submission.json` of `folder` (unchecked: run `validate` first)."""
    return strict_json((Path(folder) / MANIFEST).read_bytes().decode("utf-8"))


def strict_json(text: str) -> object:
    """`json.loads`, refusing an object with a duplicate key (the parser would keep the last one
    silently, so a reader and a checker could see different values)."""
    def pairs(items: list[tuple[str, object]]) -> dict:
        keys = [k for k, _ in items]
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        if duplicated:
            raise ValueError(f"duplicate key(s) {', '.join(map(repr, duplicated))} in one JSON object")
        return dict(items)

    return json.loads(text, object_pairs_hook=pairs)


def submission_id(man: dict, submitter: str | None = None) -> str:
    """The name a submission's records and leaderboard rows carry: `submitter/method@version`.
    The `/` keeps every submission apart from the baselines, whose names never hold one, and the
    submitter apart from others.

    Args:
        man: the manifest.
        submitter: who sent it, as the scorer knows them (`submit score --submitter`); default the
            manifest's contact, else its first author (what the submitter claims).
    """
    submitter = submitter or man.get("contact") or (man.get("authors") or ["anonymous"])[0]
    clean = re.sub(r"[\s/]+", "-", str(submitter)).strip("-") or "anonymous"
    return f"{clean}/{man['method']}@{man['method_version']}"


class TooLarge(ValueError):
    """A file whose data would decode to more than the documented limits."""


def _dtype(arrow_type) -> type[pl.DataType] | str:
    """The polars dtype a scalar arrow column reads as, else the arrow type's name (never matches)."""
    if pa.types.is_int64(arrow_type):
        return pl.Int64
    if pa.types.is_float64(arrow_type):
        return pl.Float64
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type):
        return pl.String
    return str(arrow_type)


def parquet_layout(path: Path) -> tuple[int, list[tuple[str, type[pl.DataType] | str]]]:
    """Row count and (column, dtype) pairs from the parquet footer, without reading any data."""
    pf = pq.ParquetFile(path)
    return pf.metadata.num_rows, [(f.name, _dtype(f.type)) for f in pf.schema_arrow]


def read_frame(path: Path) -> pl.DataFrame:
    """A task's output file as a polars frame (its layout checked with `parquet_layout` first).

    Text columns are read dictionary-encoded and their decoded size bounded before decoding, so
    that a small file cannot expand into a huge frame (one long value repeated on every row).
    """
    texts = [name for name, dtype in parquet_layout(path)[1] if dtype == pl.String]
    table = pq.ParquetFile(path, read_dictionary=texts).read()
    table.validate(full=True)  # e.g. invalid UTF-8, which pyarrow reads unchecked and polars panics on
    total = 0
    for name in texts:
        for chunk in table.column(name).chunks:
            lengths = pc.take(pc.binary_length(chunk.dictionary), chunk.indices)
            total += pc.sum(lengths).as_py() or 0
    if total > MAX_TEXT_BYTES:
        raise TooLarge(f"its text columns decode to {total} bytes; at most {MAX_TEXT_BYTES}")
    # Plain text columns and no metadata: polars panics on metadata that is not valid UTF-8.
    columns = [table.column(f.name).cast(pa.large_string()) if f.name in texts else table.column(f.name)
               for f in table.schema]
    return pl.from_arrow(pa.Table.from_arrays(columns, names=table.schema.names))
