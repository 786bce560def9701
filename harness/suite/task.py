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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..engine import catalogue, zoo_family
from ..engine.cache import Cache
from ..engine.method import VERBS, Method, Provides
from ..engine.models import LoadedModel, load_model
from ..engine.records import Record
from ..engine.registry import Registry
from ..zoo.build import build


MODEL_KINDS = ("classifier", "causal-lm", "base", "trajectory")


@dataclass(frozen=True)
class Takes:
    """What a task can run on: the runner checks `--model`, `--parent` and `--data` against it
    before any work (see `inputs.check_inputs`).

    Attributes:
        models: the model kinds the task scores: `classifier`, `causal-lm`, `base` (a bare encoder
            or any model read through its base) or `trajectory` (a zoo entry with checkpoints).
        data: per model kind, the data kinds (`sentence`, `tokens`, `lm`; see `data.KINDS`) that
            `--data` may give it; a model kind not listed takes no `--data`.
        adapted: per model kind, how the task scores that kind where it differs from its default
            model's kind (shown in errors and config.json).
    """

    models: tuple[str, ...]
    data: tuple[tuple[str, tuple[str, ...]], ...] = ()
    adapted: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        unknown = [k for k in (*self.models, *dict(self.data), *dict(self.adapted)) if k not in MODEL_KINDS]
        if unknown:
            raise ValueError(f"Takes: unknown model kinds {unknown}; use {MODEL_KINDS}")

    def data_kinds(self, model_kind: str) -> tuple[str, ...]:
        return dict(self.data).get(model_kind, ())


@dataclass(frozen=True)
class TaskParams:
    """A task's parameters: subclass it as a frozen dataclass, one field per parameter, whose
    `__post_init__` checks them (a ValueError naming the field, the value and the fix).

    A `TaskSpec` takes an instance as `params` and keeps it as sorted (name, value) pairs, the form
    its fingerprint and config records hold; the scoring function reads them back, checked, with
    `Params.of(spec)` (after `--quick` overrides and test replacements).
    """

    @classmethod
    def of(cls, spec: "TaskSpec"):
        """The parameters of `spec`, checked.

        Raises:
            ValueError: a parameter this class does not declare, one missing, or one its checks reject.
        """
        given, names = dict(spec.params), [f.name for f in fields(cls)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"task {spec.name!r}: unknown parameter(s) {unknown}; "
                             f"{cls.__qualname__} declares {names}")
        try:
            return cls(**given)
        except TypeError as err:  # a required field not given
            raise ValueError(f"task {spec.name!r}: {err}; {cls.__qualname__} declares {names}") from None

    def pairs(self) -> tuple[tuple[str, Any], ...]:
        """The parameters as sorted (name, value) pairs (what `TaskSpec.params` stores)."""
        return tuple(sorted((f.name, getattr(self, f.name)) for f in fields(self)))


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
        params: the task's `TaskParams` (stored as sorted (name, value) pairs; read them back with
            `Params.of(spec)`).
        quick: overrides of `model`, `parent` and parameters for `--quick` runs, as (name, value) pairs.
        description: one line for tables and pages.
        takes: the model and data kinds the task accepts (not part of the fingerprint: it moves no
            score). None: only its own model and data.
        data_fingerprint: the content fingerprint of `data` when it is a user's file (`--data`);
            part of the fingerprint only when set, so the records' `config_hash` follows the file.
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
    params: TaskParams | tuple[tuple[str, Any], ...] = ()
    quick: tuple[tuple[str, Any], ...] = ()
    description: str = ""
    takes: Takes | None = None
    data_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.verb not in VERBS:
            raise ValueError(f"task {self.name!r}: verb {self.verb!r} is not one of {VERBS}")
        params = self.params.pairs() if isinstance(self.params, TaskParams) else tuple(sorted(self.params))
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "quick", tuple(sorted(self.quick)))

    def with_params(self, **changes: Any) -> "TaskSpec":
        """This spec with some parameters replaced (tests, ablations); `Params.of` checks them."""
        return replace(self, params=tuple({**dict(self.params), **changes}.items()))

    def quick_version(self) -> "TaskSpec":
        """The spec with its `--quick` overrides applied (model, parent, params)."""
        over = dict(self.quick)
        params = {**dict(self.params), **{k: v for k, v in over.items() if k not in ("model", "parent")}}
        return replace(self, model=over.get("model", self.model), parent=over.get("parent", self.parent),
                       params=tuple(params.items()), quick=())

    def fingerprint(self) -> str:
        fields = asdict(self)
        del fields["takes"]
        if fields["data_fingerprint"] is None:
            del fields["data_fingerprint"]
        text = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class RunEnv:
    """What a scoring function gets besides the spec and the method: seeds, cache, models.
    `not_applicable` collects, per `task/method`, why the run recorded a method as not applicable."""

    seed: int = 0
    quick: bool = False
    cache: Cache | None = None
    progress: bool = True
    split: str = "public"
    hidden_seed: int | None = None
    not_applicable: dict[str, str] = field(default_factory=dict)
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

    def reference(self, parts: dict, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Harness-side reference arrays every method shares (the full model's scores, random
        sets'): computed once per run, and on the public split also stored in the cache under
        `parts`, so later runs read them. `parts` must name everything they depend on (the task's
        spec fingerprint, the model's weights, the scoring examples, the seed, what is computed);
        the harness version is added by the cache. Never a method's answer. The hidden split's are
        not stored (their key would carry the scorer's secret seed); `neuronbench cache clear`
        drops the stored ones."""
        def read_or_compute() -> dict[str, np.ndarray]:
            if self.split != "public" or self.cache is None:
                return compute()

            def write(folder: Path) -> dict:
                np.savez(folder / "reference.npz", **compute())
                return {"kind": parts.get("kind", "harness-reference")}

            entry, _ = self.cache.get_or_put({**parts, "split": self.split}, write)
            with np.load(entry.path / "reference.npz") as stored:
                return {name: stored[name] for name in stored.files}

        return self.memo(("reference", json.dumps(parts, sort_keys=True, default=str)), read_or_compute)

    def model(self, name: str) -> LoadedModel:
        """Load (once per run) the model `name`, building its zoo entry first if it is missing."""
        if name not in self._models:
            self.build(name)
            self._models[name] = load_model(name)
        return self._models[name]

    def build(self, name: str) -> None:
        """Build the zoo entry behind `name` if it is one and is missing, or the missing members of
        the zoo family `name` (`zoo_family.FAMILIES`, e.g. ppl-trend's `ptb-grid`); no-op otherwise."""
        family = zoo_family.FAMILIES.get(name)
        if family is not None:
            for member in (*family.members, *family.planted):
                self.build(member)
            return
        base = catalogue.ModelRef.parse(name).name
        if base in {spec.name for spec in catalogue.entries()}:
            if catalogue.get_spec(base).kind != "hub" and not catalogue.status(base).built:
                build(base, progress=self.progress)


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
    """A registered task: its spec, its scoring function, its parameters' class and what it hands
    the methods it asks (`provides`; a second stage is also provided whenever the spec has a
    parent or asks `stage_change`)."""

    spec: TaskSpec
    score: Scorer
    params: type[TaskParams] | None = None
    provides: Provides = Provides()

    def provides_for(self, spec: TaskSpec) -> Provides:
        """What the task provides when run with `spec` (its own, `--quick` or replaced)."""
        stages = self.provides.stages or spec.parent is not None or spec.verb == "stage_change"
        return replace(self.provides, stages=stages)


def _registered_task(obj: object) -> object:
    """The task a `module:attr` name means: a `Task`, or the scoring function `register_task`
    decorated (importing its module registered it)."""
    if callable(obj) and not isinstance(obj, Task):
        return next((task for task in TASKS.values() if task.score is obj), obj)
    return obj


TASKS: Registry[Task] = Registry("task", "neuronbench.tasks", "neuronbench.tasks",
                                 accepts=lambda obj: isinstance(obj, Task),
                                 expected="a Task (a function decorated with @register_task(spec))",
                                 adapt=_registered_task)


def register_task(spec: TaskSpec, params: type[TaskParams] | None = None,
                  provides: Provides = Provides()) -> Callable[[Scorer], Scorer]:
    """Register `spec` with the decorated scoring function under `spec.name`.

    Args:
        spec: the task's spec.
        params: its `TaskParams` class; the spec's parameters, and those of its `--quick`
            version, are checked here, so a broken task fails when its module is imported.
        provides: what the task hands a method (labels, gradients through a task head, a
            training budget); the runner checks each method's `Needs` against it before scoring.
    """
    if params is not None:
        params.of(spec)
        params.of(spec.quick_version())

    def decorate(score: Scorer) -> Scorer:
        TASKS.register(spec.name)(Task(spec, score, params, provides))
        return score
    return decorate


def record(spec: TaskSpec, method: str, metric: str, value: float | None, seed: int, **kw) -> Record:
    """A Record of `spec` (task, version, model, fingerprint filled in)."""
    return Record(task=spec.name, task_version=spec.version, model=spec.model, method=method,
                  metric=metric, value=value, seed=seed, config_hash=spec.fingerprint(), **kw)
