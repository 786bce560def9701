"""Tasks: a frozen, versioned spec plus one scoring function, registered by name.

A task file in `tasks/` declares its `TaskSpec` and decorates its scoring function with
`register_task(spec)`; the registry discovers the package, so adding a task is adding a file.
Only the harness scores: a scoring function asks the method one verb (through `call_verb`) and
measures the answer by intervening on the model.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from .cache import Cache
from .method import VERBS, Method
from .models import LoadedModel, load_model
from .records import Record
from .registry import Registry


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
    _models: dict = field(default_factory=dict)
    _memo: dict = field(default_factory=dict)

    def memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """`compute()` once per run for `key`: harness-side work every method shares (e.g. the
        full model's scores), never a method's answer."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def model(self, name: str) -> LoadedModel:
        """Load (once per run) the model `name`, building its zoo entry first if it is missing."""
        if name not in self._models:
            from . import zoo

            base = name.partition("@")[0]
            if base in {spec.name for spec in zoo.entries()}:
                if zoo.get_spec(base).kind != "hub" and not zoo.status(base).built:
                    zoo.build(base, progress=self.progress)
            self._models[name] = load_model(name)
        return self._models[name]


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
