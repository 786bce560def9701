"""Tasks: a frozen, versioned spec plus one scoring function, registered by name.

A task file in `tasks/` declares its `TaskSpec` and decorates its scoring function with
`register_task(spec)`; the registry discovers the package, so adding a task is adding a file.
Only the harness scores: a scoring function asks the method one verb (through `call_verb`) and
measures the answer by intervening on the model.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..engine import catalogue
from ..engine.cache import Cache
from ..engine.method import VERBS, Method
from ..engine.models import LoadedModel, load_model
from ..engine.records import Record
from ..engine.registry import Registry
from ..zoo.build import build


@dataclass(frozen=True)
class TaskSpec:
    """Everything that fixes a task's scores. Change any field and bump `version`.

    Attributes:
        name: registry name.
        version: bumped whenever a change may move scores.
        verb: the method verb the task asks (see `method.VERBS`).
        model: the model (alias or zoo name) the task studies.
        data: the dataset name.
        sites: `ffn`, `resid`, `all` or an explicit list.
        headline: the metric name that summarises the task.
        no_skill: the headline value a method with no skill gets in expectation.
        parent: the earlier stage of `model`, when the task compares stages.
        split_seed: seed of the train/dev/test split.
        params: task parameters as sorted (name, value) pairs.
        quick: overrides of `model`, `parent` and `params` for `--quick` runs.
        description: one line for tables and pages.
    """

    name: str
    version: int
    verb: str
    model: str
    data: str
    sites: str
    headline: str
    no_skill: float = 0.0
    parent: str | None = None
    split_seed: int = 0
    params: tuple[tuple[str, Any], ...] = ()
    quick: tuple[tuple[str, Any], ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if self.verb not in VERBS:
            raise ValueError(f"task {self.name!r}: verb {self.verb!r} is not one of {VERBS}")
        object.__setattr__(self, "params", tuple(sorted(self.params)))
        object.__setattr__(self, "quick", tuple(sorted(self.quick)))

    def param(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)

    def quick_version(self) -> "TaskSpec":
        """The spec with its `--quick` overrides applied (model, parent, params)."""
        over = dict(self.quick)
        params = {**dict(self.params), **{k: v for k, v in over.items() if k not in ("model", "parent")}}
        return replace(self, model=over.get("model", self.model), parent=over.get("parent", self.parent),
                       params=tuple(params.items()), quick=())

    def fingerprint(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class RunEnv:
    """What a scoring function gets besides the spec and the method: seeds, cache, models."""

    seed: int = 0
    quick: bool = False
    cache: Cache | None = None
    progress: bool = True
    split: str = "public"
    hidden_seed: int | None = None
    _models: dict = field(default_factory=dict)
    _memo: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"scoring split {self.split!r}: use one of {SPLITS}")
        if self.split == "hidden" and self.hidden_seed is None:
            raise ValueError("the hidden split needs the scorer's secret seed: pass --hidden-seed-file FILE "
                             f"or set {HIDDEN_SEED_ENV}")

    def scoring_rows(self, pool_size: int, n: int | None, split_seed: int) -> np.ndarray:
        """Row ids (sorted) of the examples a task scores on, out of a pool of `pool_size`.

        `public`: the first `n` of a permutation seeded by the spec's `split_seed` (all of the pool
        when `n` is None or covers it), the same examples in every run. `hidden`: `n` examples
        drawn with the scorer's secret seed from the rest of the pool, so a submitter who tuned on
        the public examples never saw them (all of the rest when it is smaller than `n`); when the
        public split takes the whole pool, a random half of the pool drawn with the secret seed.
        """
        perm = np.random.default_rng(split_seed).permutation(pool_size)
        public = perm if n is None or n >= pool_size else perm[:n]
        if self.split == "public":
            return np.sort(public)
        rng = np.random.default_rng([self.hidden_seed, split_seed])
        rest = np.setdiff1d(np.arange(pool_size), public)
        if len(rest) == 0:
            return np.sort(rng.permutation(pool_size)[: max(1, pool_size // 2)])
        return np.sort(rng.permutation(rest)[: n or len(rest)])

    def scoring_subset(self, dataset, n: int | None, split_seed: int):
        """The rows of `dataset` that `scoring_rows` picks (a `datasets.Dataset`)."""
        rows = self.scoring_rows(len(dataset), n, split_seed)
        return dataset if len(rows) == len(dataset) else dataset.select(rows)

    def memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """`compute()` once per run for `key`: harness-side work every method shares (e.g. the
        full model's scores), never a method's answer."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def model(self, name: str) -> LoadedModel:
        """Load (once per run) the model `name`, building its zoo entry first if it is missing."""
        if name not in self._models:
            base = name.partition("@")[0]
            if base in {spec.name for spec in catalogue.entries()}:
                if catalogue.get_spec(base).kind != "hub" and not catalogue.status(base).built:
                    build(base, progress=self.progress)
            self._models[name] = load_model(name)
        return self._models[name]


SPLITS = ("public", "hidden")
HIDDEN_SEED_ENV = "NEURONBENCH_HIDDEN_SEED"


def read_hidden_seed(path: str | None = None) -> int | None:
    """The scorer's secret seed: an integer in the file `path`, else in ${HIDDEN_SEED_ENV}, else None.

    The seed never lives in the repository or in a results folder."""
    where = f"the hidden-seed file {path}" if path else f"${HIDDEN_SEED_ENV}"
    try:
        text = Path(path).read_text().strip() if path else os.environ.get(HIDDEN_SEED_ENV)
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {where} ({type(err).__name__}: {getattr(err, 'strerror', None) or 'not text'}): "
                         "pass a file holding one integer") from None
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:  # the content is a secret: never echo it
        raise ValueError(f"{where} does not hold one integer: write the secret seed as one integer") from None


Scorer = Callable[[TaskSpec, Method, RunEnv], list[Record]]


@dataclass(frozen=True)
class Task:
    spec: TaskSpec
    score: Scorer


TASKS: Registry[Task] = Registry("task", "neuronbench.tasks", "neuronbench.tasks")


def register_task(spec: TaskSpec) -> Callable[[Scorer], Scorer]:
    """Register `spec` with the decorated scoring function under `spec.name`."""
    def decorate(score: Scorer) -> Scorer:
        TASKS.register(spec.name)(Task(spec, score))
        return score
    return decorate


def record(spec: TaskSpec, method: str, metric: str, value: float | None, seed: int, **kw) -> Record:
    """A Record of `spec` (task, version, model, fingerprint filled in)."""
    return Record(task=spec.name, task_version=spec.version, model=spec.model, method=method,
                  metric=metric, value=value, seed=seed, config_hash=spec.fingerprint(), **kw)
