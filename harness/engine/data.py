"""Named datasets and user data files, loaded as a `Corpus` with seeded train/dev/test splits.

`DataSpec` and the registry live in `dataspec`; the built-in datasets in `corpora`, the file
readers in `datafiles`.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import datasets
import numpy as np
import torch

# Importing `corpora` registers the built-in datasets; the names of the floors below are
# re-exported so `data` stays the one entry point for users.
from .corpora import POLARITY_FILE, WSJ_FILE, corpora_dir, fetch_corpora  # noqa: F401
from .datafiles import _SUFFIX_FORMATS, FORMATS, load_file, read_tagged  # noqa: F401
from .dataspec import KINDS, SPLITS, DataSpec, Kind, data_names, register_data, registered  # noqa: F401

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- lookup

def get_data(name_or_path: str | Path, *, format: str | None = None, text_column: str = "text",
             label_column: str | None = "label") -> DataSpec:
    """The whole dataset registered as `name_or_path`, or read from that file.

    A `Path`, an existing file, a string with a '/' or ending in .csv/.json/.jsonl/.txt is a
    file (see `load_file`); a registered name wins over a same-named file in the working folder.

    Raises:
        KeyError: an unknown name (the message suggests close names and lists known ones).
        FileNotFoundError: a missing file, or missing fetched corpora.
    """
    make = registered(name_or_path) if isinstance(name_or_path, str) else None
    if make is not None:
        if (format, text_column, label_column) != (None, "text", "label"):
            raise ValueError(f"--format/--text-column/--label-column apply to data files, not to the "
                             f"registered dataset {name_or_path!r}; drop them")
        spec = make()
        if not isinstance(spec, DataSpec) or spec.name != name_or_path:
            raise TypeError(f"the function registered as {name_or_path!r} returned {spec!r:.200}, "
                            f"not a DataSpec named {name_or_path!r}")
        return spec
    text = str(name_or_path)
    if (isinstance(name_or_path, Path) or format is not None or Path(text).expanduser().exists()
            or "/" in text or Path(text).suffix.lower() in _SUFFIX_FORMATS):
        return load_file(text, format=format, text_column=text_column, label_column=label_column)
    close = difflib.get_close_matches(text, data_names(), n=3)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    raise KeyError(f"unknown dataset {text!r}: {hint}Known datasets: {', '.join(data_names())}; "
                   "or give the path of a .csv, .json, .jsonl or word/TAG .txt file")


# --------------------------------------------------------------------------- splits

@dataclass(frozen=True, eq=False)
class Corpus:
    """A dataset split into train/dev/test, with what is needed to record and reproduce it.

    Attributes:
        name: registry name or file path.
        kind: "lm", "sentence" or "tokens" (see `DataSpec`).
        splits: "train", "dev", "test" datasets; each keeps the examples' `id` column.
        label_names: names of the integer labels, or None.
        seed: seed of the split permutation (recorded even where official splits ignore it).
        fractions: train/dev/test fractions, or None when the data's official splits were used.
        fingerprint: sha256 of the data, labels, seed and split ids; equal across runs and machines.
    """

    name: str
    kind: Kind
    splits: datasets.DatasetDict
    label_names: tuple[str, ...] | None
    seed: int
    fractions: tuple[float, float, float] | None
    fingerprint: str

    def texts(self, split: str) -> list[str]:
        """The texts of one split; for kind "tokens", the words joined by spaces."""
        if split not in self.splits:
            raise KeyError(f"no split {split!r} in {self.name!r}; splits are {list(self.splits)}")
        ds = self.splits[split]
        if self.kind == "tokens":
            return [" ".join(words) for words in ds["words"]]
        return list(ds["text"])

    def split_record(self) -> dict:
        """What to store beside results to identify this exact data and split."""
        return {"name": self.name, "seed": self.seed,
                "fractions": list(self.fractions) if self.fractions else None,
                "official_splits": self.fractions is None,
                "sizes": {k: len(v) for k, v in self.splits.items()},
                "fingerprint": self.fingerprint}


def load(name_or_path: str | Path, seed: int = 0,
         fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), *, format: str | None = None,
         text_column: str = "text", label_column: str | None = "label") -> Corpus:
    """Load a registered dataset or a user file and split it deterministically.

    Data with official splits (ptb) keeps them and ignores `fractions`; otherwise a
    `numpy.random.default_rng(seed)` permutation of the ids is cut by `fractions` (see `split_ids`).

    Args:
        name_or_path: a registered name (`data_names()`) or a data file (see `load_file`).
        seed: non-negative integer seed of the split.
        fractions: train, dev and test fractions, non-negative, summing to 1.
        format, text_column, label_column: how to read a data file (see `load_file`).

    Returns:
        The split `Corpus`.
    """
    spec = get_data(name_or_path, format=format, text_column=text_column,
                    label_column=label_column)
    _check_seed(seed)
    if spec.official_splits is not None:
        ids = {k: np.asarray(spec.official_splits[k], dtype=np.int64) for k in SPLITS}
        used: tuple[float, float, float] | None = None
        if tuple(fractions) != (0.8, 0.1, 0.1):
            log.info("%s has official splits; ignoring fractions=%s", spec.name, fractions)
    else:
        used = tuple(float(f) for f in fractions)  # type: ignore[assignment]
        ids = split_ids(len(spec.examples), seed, used)
    splits = datasets.DatasetDict({k: spec.examples.select(ids[k]) for k in SPLITS})
    return Corpus(spec.name, spec.kind, splits, spec.label_names, seed, used,
                  _fingerprint(spec, seed, ids))


def split_ids(n: int, seed: int, fractions: Sequence[float]) -> dict[str, np.ndarray]:
    """Cut a seeded permutation of range(n) into sorted train/dev/test id arrays.

    Dev and test get round(fraction * n) ids (at least one if their fraction is positive);
    train gets the rest, so the three are disjoint and cover range(n).
    """
    if n < 3:
        raise ValueError(f"a dataset of {n} example(s) cannot be split into train/dev/test: "
                         "give at least 3 examples")
    fr = tuple(fractions)
    if len(fr) != 3 or min(fr) < 0 or fr[0] <= 0 or abs(sum(fr) - 1) > 1e-6:
        raise ValueError(f"fractions={fractions!r} must be 3 non-negative numbers (train > 0) "
                         "summing to 1, e.g. (0.8, 0.1, 0.1)")
    n_dev, n_test = (max(1, round(f * n)) if f > 0 else 0 for f in fr[1:])
    if n - n_dev - n_test < 1:
        raise ValueError(f"fractions={fractions!r} leave no training example out of {n}: "
                         "give train a larger fraction")
    perm = np.random.default_rng(seed).permutation(n)
    cuts = np.split(perm, [n - n_dev - n_test, n - n_test])
    return {k: np.sort(c) for k, c in zip(SPLITS, cuts)}


def subsample(dataset: datasets.Dataset, n: int, seed: int = 0) -> datasets.Dataset:
    """`n` examples of `dataset` picked by a seeded permutation, kept in their original order.

    Returns all of `dataset` when it has n or fewer examples. With one seed a smaller sample is
    a subset of a larger one.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"subsample size n={n!r} must be a positive integer")
    _check_seed(seed)
    if n >= len(dataset):
        return dataset
    keep = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:n])
    return dataset.select(keep)


LABEL_COLUMNS = ("label", "word_labels", "word_descriptors")


def permute_labels(data: datasets.Dataset, key: Sequence[int]) -> datasets.Dataset:
    """`data` with its labels shuffled within the split by a generator seeded with `key`: sentence
    labels across sentences, word labels (and word descriptors) across all words, each sentence
    keeping its length. Text, words and every other column are unchanged."""
    rng = np.random.default_rng(list(key))
    for column in (c for c in LABEL_COLUMNS if c in data.column_names):
        values = data[column]
        if column == "label":
            shuffled = [values[i] for i in rng.permutation(len(values))]
        else:
            flat = [v for row in values for v in row]
            order, ends = rng.permutation(len(flat)), np.cumsum([len(row) for row in values])
            pool = [flat[i] for i in order]
            shuffled = [pool[e - len(row):e] for row, e in zip(values, ends)]
        feature = data.features[column]
        data = data.remove_columns(column).add_column(column, shuffled, feature=feature)
    return data


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer, e.g. 0")


def _fingerprint(spec: DataSpec, seed: int, ids: Mapping[str, np.ndarray]) -> str:
    # JSON of plain Python values and little-endian ids: the same bytes on every machine.
    h = hashlib.sha256()
    meta = {"kind": spec.kind, "label_names": spec.label_names, "seed": int(seed)}
    h.update(json.dumps(meta, sort_keys=True).encode())
    h.update(json.dumps(spec.examples.to_dict(), sort_keys=True, ensure_ascii=False,
                        separators=(",", ":")).encode())
    for k in SPLITS:
        h.update(k.encode() + np.asarray(ids[k], dtype="<i8").tobytes())
    return h.hexdigest()


def descriptor_matrix(data, vocabulary: tuple[str, ...]) -> torch.Tensor:
    """(W, V) bool: word w (dataset order) carries descriptor v. Unknown descriptors are ignored."""
    if "word_descriptors" not in data.column_names:
        raise ValueError(f"descriptors need a `word_descriptors` column; the data has {data.column_names}")
    col = {d: i for i, d in enumerate(vocabulary)}
    rows = []
    for i, (words, descs) in enumerate(zip(data["words"], data["word_descriptors"])):
        if len(words) != len(descs):
            raise ValueError(f"example {i} has {len(words)} words but {len(descs)} descriptor lists")
        rows.extend(descs)
    out = torch.zeros(len(rows), len(vocabulary), dtype=torch.bool)
    for w, descs in enumerate(rows):
        out[w, [col[d] for d in descs if d in col]] = True
    return out
