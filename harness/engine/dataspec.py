"""What a dataset is before splitting (`DataSpec`) and the registry of named datasets.

The floor under `datafiles` (user files), `corpora` (the built-in datasets) and `data` (loading
and splitting), so none of them needs another lazily.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import datasets

Kind = Literal["lm", "sentence", "tokens"]
KINDS = ("lm", "sentence", "tokens")
SPLITS = ("train", "dev", "test")


# --------------------------------------------------------------------------- specs and registry

@dataclass(frozen=True, eq=False)
class DataSpec:
    """A whole dataset before splitting.

    Attributes:
        name: registry name, or the path of a user file.
        kind: "lm" (columns `id`, `text`), "sentence" (`id`, `text`, `label`) or "tokens"
            (`id`, `words`, `word_labels`).
        examples: every example; `id` is its row index, so ids are stable and dense.
        label_names: name of each integer label (sentence and tokens kinds), else None.
        official_splits: ids of each of train/dev/test for data that ships its own splits.
    """

    name: str
    kind: Kind
    examples: datasets.Dataset
    label_names: tuple[str, ...] | None = None
    official_splits: Mapping[str, range] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"DataSpec {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if (self.label_names is None) != (self.kind == "lm"):
            raise ValueError(f"DataSpec {self.name!r}: kind {self.kind!r} "
                             f"{'takes no' if self.kind == 'lm' else 'needs'} label_names")
        if self.official_splits is not None and tuple(self.official_splits) != SPLITS:
            raise ValueError(f"DataSpec {self.name!r}: official_splits keys "
                             f"{tuple(self.official_splits)} must be {SPLITS}")

    @classmethod
    def from_columns(cls, name: str, kind: Kind, columns: Mapping[str, list],
                     label_names: Sequence[str] | None = None,
                     official_splits: Mapping[str, range] | None = None) -> DataSpec:
        """Build a spec from Python lists, adding the `id` column and typed label features.

        Args:
            name: registry name or file path.
            kind: "lm", "sentence" or "tokens"; fixes which columns `columns` must hold.
            columns: `text`, or `text` and `label`, or `words` and `word_labels`.
            label_names: names of the integer labels, index = label (not for "lm").
            official_splits: ids of train/dev/test when the data ships its own splits.
        """
        names = tuple(label_names) if label_names is not None else None
        feats = _features(kind, names)
        n = len(next(iter(columns.values())))
        table = {"id": list(range(n)), **columns}
        if set(table) != set(feats):
            raise ValueError(f"DataSpec {name!r}: kind {kind!r} needs columns {sorted(feats)}, "
                             f"got {sorted(table)}")
        examples = datasets.Dataset.from_dict(table, features=feats)
        return cls(name, kind, examples, names, official_splits)


def _features(kind: str, label_names: tuple[str, ...] | None) -> datasets.Features:
    seq = getattr(datasets, "List", datasets.Sequence)  # `List` replaced `Sequence` in datasets 4
    cols = {"id": datasets.Value("int64")}
    if kind == "tokens":
        cols["words"] = seq(datasets.Value("string"))
        cols["word_labels"] = seq(datasets.ClassLabel(names=list(label_names or ())))
    else:
        cols["text"] = datasets.Value("string")
    if kind == "sentence":
        cols["label"] = datasets.ClassLabel(names=list(label_names or ()))
    return datasets.Features(cols)


_REGISTRY: dict[str, Callable[[], DataSpec]] = {}


def register_data(name: str) -> Callable[[Callable[[], DataSpec]], Callable[[], DataSpec]]:
    """Register a zero-argument function returning the `DataSpec` of dataset `name`.

    The function runs only when the dataset is asked for, so registering costs nothing.

    Raises:
        ValueError: `name` is already registered.
    """
    def decorate(fn: Callable[[], DataSpec]) -> Callable[[], DataSpec]:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is already registered by "
                             f"{_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}; "
                             "choose another name")
        _REGISTRY[name] = fn
        return fn
    return decorate


def data_names() -> list[str]:
    """Sorted names of the registered datasets."""
    return sorted(_REGISTRY)


def registered(name: str) -> Callable[[], DataSpec] | None:
    """The function registered as dataset `name`, or None."""
    return _REGISTRY.get(name)
