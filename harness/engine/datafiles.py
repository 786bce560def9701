"""User data files (csv, json/jsonl, word/TAG text, plain text) read into a `DataSpec`."""
from __future__ import annotations

import codecs
import csv
import json
import tempfile
from pathlib import Path

import datasets

from .dataspec import DataSpec, data_names

FORMATS = ("csv", "json", "tagged", "text")
_SUFFIX_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".txt": "tagged"}


def load_file(path: str | Path, *, format: str | None = None, text_column: str = "text",
              label_column: str | None = "label") -> DataSpec:
    """Read a user data file into a `DataSpec` named by its path.

    Formats: "csv" and "json" (.json, .jsonl; read with `datasets.load_dataset`) give kind
    "sentence" when the label column exists, else "lm"; labels are mapped to 0..K-1 in sorted
    order (numerically when all are integers) and their names kept. "tagged" (.txt) reads one
    example per line of space-separated `word/TAG` tokens (split on the last '/') as kind "tokens";
    "text" reads one example per non-blank line as kind "lm". Blank lines are skipped. A .txt file
    is "tagged" when a token of its first non-blank line holds a '/', else "text" (plain text for
    language-model tasks).

    Args:
        path: the file.
        format: one of FORMATS; by default taken from the suffix.
        text_column: column holding the text (csv/json).
        label_column: column holding the labels (csv/json); None to ignore labels.

    Raises:
        FileNotFoundError: no such file.
        ValueError: empty file, malformed line (with its 1-based line number), missing column.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}: check the path (or use a registered "
                                f"dataset: {', '.join(data_names())})")
    fmt = format or _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt == "tagged" and format is None and not _looks_tagged(path):
        fmt = "text"
    if fmt not in FORMATS:
        raise ValueError(f"cannot read {path} as format {fmt!r}: pass --format one of {FORMATS} (format= in Python)")
    if _is_blank(path):
        raise ValueError(f"data file {path} is empty: it needs at least one example")
    _check_utf8(path)
    if fmt == "tagged":
        return read_tagged(path)
    if fmt == "text":
        lines = [line.strip() for _, line in _text_lines(path)]
        return DataSpec.from_columns(str(path), "lm", {"text": lines})
    return _read_table(path, fmt, text_column, label_column)


def read_tagged(path: Path, name: str | None = None) -> DataSpec:
    """Read a `word/TAG word/TAG ...` file, one example per non-blank line, as kind "tokens".

    The tag vocabulary is the sorted set of tags in the file.
    """
    sentences: list[tuple[list[str], list[str]]] = []
    for lineno, line in _text_lines(path):
        words, tags = [], []
        for token in line.split():
            word, slash, tag = token.rpartition("/")
            if not slash or not word or not tag:
                raise ValueError(f"{path}, line {lineno}: token {token!r} is not `word/TAG`; "
                                 "fix the line (or pass --format text for plain text)")
            words.append(word)
            tags.append(tag)
        sentences.append((words, tags))
    vocab = sorted({t for _, tags in sentences for t in tags})
    index = {t: i for i, t in enumerate(vocab)}
    columns = {"words": [w for w, _ in sentences],
               "word_labels": [[index[t] for t in tags] for _, tags in sentences]}
    return DataSpec.from_columns(name or str(path), "tokens", columns, label_names=vocab)


def _looks_tagged(path: Path) -> bool:
    """Whether a .txt file's first non-blank line has a token with a '/' (word/TAG)."""
    with path.open(encoding="utf-8-sig", errors="replace") as fh:
        for line in fh:
            if line.strip():
                return any("/" in token for token in line.split())
    return True


def _text_lines(path: Path) -> list[tuple[int, str]]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (bad byte at offset {err.start}); "
                         "re-save it as UTF-8") from err
    return [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]


def _check_utf8(path: Path) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 16):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise ValueError(f"{path} is not UTF-8 text (bad byte at offset {offset + err.start}; binary, "
                                 "or UTF-16?): re-save it as UTF-8") from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text (it ends inside a character): re-save it as UTF-8") from None


def _is_blank(path: Path) -> bool:
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 16):
            if chunk.replace(b"\xef\xbb\xbf", b"").strip():
                return False
    return True


def _read_table(path: Path, fmt: str, text_column: str, label_column: str | None) -> DataSpec:
    table = _hf_load(path, fmt)
    have = list(table)
    if text_column not in table:
        raise ValueError(f"{path} has no text column {text_column!r}; its columns are {have}: "
                         "pass --text-column one of them (text_column= in Python)")
    if label_column not in (None, "label") and label_column not in table:
        raise ValueError(f"{path} has no label column {label_column!r}; its columns are {have}: "
                         "pass --label-column one of them (label_column=, or None for unlabelled text, in Python)")
    texts = table[text_column]
    for row, text in enumerate(texts):
        if text is None or not str(text).strip():
            raise ValueError(f"{path}, {_where(path, fmt, row)}: missing text in column "
                             f"{text_column!r}; fill it in or delete the row")
    columns = {"text": [str(t) for t in texts]}
    if label_column not in table:
        return DataSpec.from_columns(str(path), "lm", columns)
    columns["label"], names = _encode_labels(table[label_column], path, fmt, label_column)
    return DataSpec.from_columns(str(path), "sentence", columns, label_names=names)


def _hf_load(path: Path, fmt: str) -> dict[str, list]:
    # A throw-away cache: load_dataset would otherwise write arrow files for every user file
    # (and for failed ones) under ~/.cache/huggingface; keep_in_memory keeps the rows alive.
    with tempfile.TemporaryDirectory(prefix="neuronbench-hf-") as cache:
        try:
            # keep_default_na=False: a text "NA" or "null" is text, not a missing value.
            extra = {"keep_default_na": False} if fmt == "csv" else {}
            ds = datasets.load_dataset("csv" if fmt == "csv" else "json", data_files=str(path),
                                       split="train", keep_in_memory=True, cache_dir=cache, **extra)
        except datasets.exceptions.DatasetGenerationError as err:
            raise ValueError(f"{path}: {_locate_parse_error(path, fmt, err.__cause__ or err)}; "
                             "fix the file") from err
        except ValueError as err:  # a header with no rows: "corresponds to no data"
            raise ValueError(f"data file {path} has no examples ({err})") from err
    if len(ds) == 0:
        raise ValueError(f"data file {path} has no examples")
    return ds.to_dict()


def _locate_parse_error(path: Path, fmt: str, cause: BaseException) -> str:
    """Name the first unreadable line, or fall back on the parser's own message."""
    if fmt == "csv":
        with path.open(encoding="utf-8-sig", newline="") as fh:
            rows = [r for r in _csv_records(fh)]
        width = len(rows[0][1]) if rows else 0
        for lineno, row in rows[1:]:
            if len(row) != width:
                return (f"line {lineno}: expected {width} fields like the header, found {len(row)}"
                        " (an unquoted comma or an unclosed quote?)")
    elif not _is_json_array(path):
        for lineno, line in _text_lines(path):
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {lineno}: invalid JSON ({err.msg})"
    else:
        try:
            json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as err:
            return f"line {err.lineno}: invalid JSON ({err.msg})"
    return f"cannot parse it as {fmt} ({cause})"


def _csv_records(fh) -> list[tuple[int, list[str]]]:
    """(first line, fields) of each non-blank CSV record, as pandas counts rows."""
    reader, out = csv.reader(fh), []
    start = 1
    for row in reader:
        if row and not (len(row) == 1 and not row[0].strip()):
            out.append((start, row))
        start = reader.line_num + 1
    return out


def _is_json_array(path: Path) -> bool:
    with path.open(encoding="utf-8-sig") as fh:
        return fh.read(4096).lstrip().startswith("[")


def _where(path: Path, fmt: str, row: int) -> str:
    """'line N' of data row `row` (0-based), or 'record N' inside a JSON array."""
    if fmt == "csv":
        with path.open(encoding="utf-8-sig", newline="") as fh:
            return f"line {_csv_records(fh)[row + 1][0]}"
    if _is_json_array(path):
        return f"record {row + 1}"
    return f"line {_text_lines(path)[row][0]}"


def _encode_labels(values: list, path: Path, fmt: str, column: str) -> tuple[list[int], list[str]]:
    for row, v in enumerate(values):
        if v is None or v == "" or (isinstance(v, float) and not v.is_integer()):
            what = "missing label" if v in (None, "") else f"label {v!r} is not a class"
            raise ValueError(f"{path}, {_where(path, fmt, row)}: {what} in column {column!r}; "
                             "labels must be class names or integers")
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    keys = [int(v) for v in values] if numeric else [str(v) for v in values]
    vocab = sorted(set(keys))
    index = {k: i for i, k in enumerate(vocab)}
    return [index[k] for k in keys], [str(k) for k in vocab]
