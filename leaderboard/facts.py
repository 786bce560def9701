"""What a task will ask a method, found by running the task's own code up to its first verb call
with a probe method: the neurons it scores, its vocabulary, its example pool, its checkpoints.

The validator checks submitted rows against these facts, so it needs no second, hand-kept list of
what each task asks; adding a task adds its facts.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from neuronbench.harness.engine.cache import Cache
from neuronbench.harness.engine.method import Method, MethodContext
from neuronbench.harness.engine.sites import NeuronIndex
from neuronbench.harness.suite.task import TASKS, RunEnv, TaskSpec

from .replay import example_ids, stage_key


@dataclass(frozen=True)
class TaskFacts:
    """What the first verb call of a task shows.

    Attributes:
        verb: the verb asked.
        index: the neurons the call is about (relevance, descriptors).
        num_layers: layers of the model under study.
        concept: the concept of the first relevance call (None: the task as a whole).
        vocabulary: the descriptors the task accepts (descriptors).
        stages: every stage pair asked, as (trajectory, labelling, from step, to step) (stage_change).
        first_layer: the layer of the first attribute_positions call.
        pool: example ids of the examples whose positions are attributed (attribute_positions).
    """

    verb: str
    index: NeuronIndex
    num_layers: int
    concept: str | None = None
    vocabulary: tuple[str, ...] = ()
    stages: tuple[tuple[str, str | None, int, int], ...] = ()
    first_layer: int | None = None
    pool: frozenset[int] = frozenset()


class _Probed(Exception):
    """Raised by the probe to stop the task at its first call (never escapes `task_facts`)."""


class _Probe(Method):
    """Records the first call's context and stops the task before any scoring work."""

    name = "neuronbench-probe"

    def __init__(self, verb: str):
        self.verb = verb
        self.facts: TaskFacts | None = None
        self.stages: list[tuple] = []

    def supports(self, verb: str) -> bool:
        return verb == self.verb

    def _stop(self, ctx: MethodContext, **extra) -> None:
        self.facts = TaskFacts(self.verb, ctx.index, ctx.model.num_layers, **extra)
        raise _Probed

    def relevance(self, ctx):
        self._stop(ctx, concept=ctx.concept)

    def stage_change(self, ctx):
        # A task asks about many stage pairs (several trajectories): record each, answer 0, and let
        # the task run to its end (`task_facts`); a pair the format cannot key fails here.
        self.stages.append(stage_key(ctx))
        if self.facts is None:
            self.facts = TaskFacts(self.verb, ctx.index, ctx.model.num_layers)
        return 0.0

    def descriptors(self, ctx, vocabulary):
        self._stop(ctx, vocabulary=tuple(vocabulary))

    def attribute_positions(self, ctx, layer):
        self._stop(ctx, first_layer=int(layer), pool=frozenset(example_ids(ctx)))


@functools.lru_cache(maxsize=32)
def task_facts(name: str, spec: TaskSpec) -> TaskFacts:
    """The facts of task `name` under `spec` (its resolved spec), cached per process.

    The probe runs with seed 0 on the public split: what a task asks (sites, vocabulary, pool,
    checkpoints) is fixed by the spec, not by the run seed or the scoring split.

    Raises:
        ValueError: the task never asks its verb.
    """
    probe = _Probe(spec.verb)
    env = RunEnv(seed=0, cache=Cache(), progress=False)
    try:
        TASKS.get(name).score(spec, probe, env)
    except _Probed:
        return probe.facts
    if probe.stages:
        return replace(probe.facts, stages=tuple(probe.stages))
    raise ValueError(f"task {name!r} finished without asking {spec.verb!r}; it cannot take submissions")
