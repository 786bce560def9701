"""The method API: one small base class that every neuron-explanation method implements.

A method answers up to four questions (verbs); a task asks one of them through `call_verb`, which
rejects malformed answers with a message naming the method and the defect. Whether a method
applies to a task at all (the verb, its `Needs` against the task's `Provides`) is decided once,
by the runner, before the task is asked to score it (`not_applicable`). Methods read data only
through the split in their `MethodContext` and activations only through `MethodContext.collect`
(the harness's cached collectors).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import ClassVar

import datasets
import torch

from .activations import collect_cached
from .cache import Cache
from .collect import CollectConfig, Collection
from .models import LoadedModel
from .registry import Registry
from .sites import NeuronIndex, NeuronScores, Site  # noqa: F401  (NeuronScores: part of the method API)
from .validate import MethodOutputError, check_output  # noqa: F401

VERBS = ("relevance", "stage_change", "descriptors", "attribute_positions")


@dataclass(frozen=True)
class Needs:
    """What a method needs from a task; the runner checks it against the task's `Provides` before
    asking, and records the method as not applicable to the task, with the reason, when it is unmet.

    Attributes:
        labels: the split's labels (sentence or word labels).
        stages: a second model stage (`MethodContext.parent`).
        gradients: backpropagation through the model (and a model with a task head).
        train_budget: optimisation steps it may spend per call, or None.
    """

    labels: bool = False
    stages: bool = False
    gradients: bool = False
    train_budget: int | None = None


@dataclass(frozen=True)
class Provides:
    """What a task hands the methods it asks (the counterpart of `Needs`).

    Attributes:
        labels: the split carries labels (sentence or word labels).
        stages: the method gets a second model stage (`MethodContext.parent`).
        gradients: the model has a task head to backpropagate an objective through.
        train_budget: the most optimisation steps a method may spend per call, or None (no limit).
    """

    labels: bool = False
    stages: bool = False
    gradients: bool = False
    train_budget: int | None = None


def not_applicable(method: "Method", verb: str, provides: Provides) -> str | None:
    """Why `method` cannot answer `verb` for a task that provides `provides`, or None when it can."""
    if not method.supports(verb):
        return f"method {method.name!r} does not implement {verb!r}"
    needs = method.needs
    missing = [what for what, need, have in (("labels", needs.labels, provides.labels),
                                             ("a second model stage", needs.stages, provides.stages),
                                             ("a model with a task head for gradients", needs.gradients,
                                              provides.gradients)) if need and not have]
    if missing:
        return f"method {method.name!r} needs {' and '.join(missing)}, which the task does not provide"
    budget = provides.train_budget
    if needs.train_budget is not None and budget is not None and needs.train_budget > budget:
        return (f"method {method.name!r} trains for {needs.train_budget} steps a call; the task allows "
                f"{budget}")
    return None


@dataclass
class MethodContext:
    """Everything a task hands a method.

    Attributes:
        model: the model under study (for stage questions: the later stage).
        sites: the sites whose neurons are scored.
        data: the only examples the method may read (`text` or `words`, labels if `Needs.labels`).
        data_id: a fingerprint of `data` (for the cache).
        seed: the seed the method must use for any randomness.
        label_names: names of the label ids, or None.
        parent: the earlier stage (pre-trained parent, previous checkpoint), or None.
        concept: which label/concept relevance is asked for, or None for the task as a whole.
        labelling: which labels `data` carries: None for the split's own, or a task's name for a
            relabelled copy (e.g. `permuted:0`, the first permutation of a task's label null). It
            keys recorded answers (submissions); a method has no need to read it.
        train: the model's own training split, for methods that learn an amortized explainer on
            it and then answer about `data` (DiffMask's gate network), or None when the task
            offers none. Like `data`, it never holds a scoring example.
        train_id: a fingerprint of `train` (for the cache).
        cache: the activation cache.
        collect_defaults: batching settings for `collect`.
        proposer: the generative LM a task provides for methods that propose descriptors (a model
            alias such as `smollm2-135m`, or `stub` for a keyword stand-in), or None.
        objective: what the task's score explains, for methods that differentiate an objective
            (one of `objective.OBJECTIVES`, e.g. `predicted-next-token` for `erasure` on a causal
            LM), or None for the model kind's default (gold label; mean next-token likelihood).
    """

    model: LoadedModel
    sites: tuple[Site, ...]
    data: datasets.Dataset
    data_id: str
    seed: int = 0
    label_names: tuple[str, ...] | None = None
    parent: LoadedModel | None = None
    concept: str | None = None
    labelling: str | None = None
    train: datasets.Dataset | None = None
    train_id: str | None = None
    cache: Cache | None = None
    collect_defaults: dict = field(default_factory=dict)
    proposer: str | None = None
    objective: str | None = None

    @property
    def index(self) -> NeuronIndex:
        return NeuronIndex.build({s: self.model.width(s) for s in self.sites})

    def generator(self, *salt: str) -> torch.Generator:
        """A generator seeded by `seed` (and `salt`, e.g. to differ between stage pairs)."""
        if not salt:
            return torch.Generator().manual_seed(self.seed)
        digest = hashlib.sha256(repr((self.seed, *salt)).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def collect(self, stats: tuple[str, ...] = ("moments",), model: LoadedModel | None = None,
                **options) -> Collection:
        """Streaming statistics of `self.sites` over `self.data` (cached).

        Args:
            stats: any of `moments`, `max1`, `topk`, `labels`.
            model: another stage (e.g. `self.parent`); default `self.model`.
            **options: further `CollectConfig` fields (alignment, dense_words, topk, ...).
        """
        cfg = CollectConfig(sites=self.sites, stats=stats, **{**self.collect_defaults, **options})
        col, _ = collect_cached(model or self.model, self.data, cfg, data_id=self.data_id,
                                label_names=self.label_names, cache=self.cache, progress=False)
        return col


class Method:
    """Base class of neuron-explanation methods. Override the verbs the method supports.

    Class attributes:
        name: registry name.
        needs: what it needs from a task.
    """

    name: ClassVar[str] = "method"
    needs: ClassVar[Needs] = Needs()

    def relevance(self, ctx: MethodContext) -> NeuronScores:
        """Score every neuron of `ctx.sites` (higher = more relevant to the task or `ctx.concept`)."""
        raise NotImplementedError

    def stage_change(self, ctx: MethodContext) -> float:
        """How much neuron knowledge changed from `ctx.parent` to `ctx.model`, on `ctx.data`."""
        raise NotImplementedError

    def descriptors(self, ctx: MethodContext, vocabulary: tuple[str, ...]) -> dict[int, list[str]]:
        """Up to 10 descriptors from `vocabulary` per neuron (flat id), best first.

        `ctx.data` has `words` and `word_descriptors` (per word, the descriptors that hold).
        """
        raise NotImplementedError

    def attribute_positions(self, ctx: MethodContext, layer: int) -> list[torch.Tensor]:
        """Per example of `ctx.data`, one score per token position (the model's tokenisation,
        special tokens included) of how much the hidden state at `layer` drives the prediction."""
        raise NotImplementedError

    def settings(self) -> dict:
        """The method's own settings, recorded in a run's `config.json` (`method_settings`): its
        public attributes that are JSON values (dataclasses as dicts); anything else is left out.
        Override to record what the attributes do not show."""
        return {k: v for k, v in ((k, _json_value(v)) for k, v in vars(self).items() if not k.startswith("_"))
                if v is not _SKIP}

    @classmethod
    def supports(cls, verb: str) -> bool:
        if verb not in VERBS:
            raise ValueError(f"unknown verb {verb!r}; verbs are {VERBS}")
        return getattr(cls, verb) is not getattr(Method, verb)


_SKIP = object()


def _json_value(value):
    """`value` as a JSON value (tuples as lists, dataclasses as dicts), or `_SKIP` when it has none."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        items = [_json_value(v) for v in value]
        return _SKIP if any(v is _SKIP for v in items) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _json_value(v) for k, v in value.items()}
        return _SKIP if any(v is _SKIP for v in items.values()) else items
    return _SKIP


class NotApplicable(NotImplementedError):
    """A method cannot answer what it was asked (the runner records it as not applicable, with
    this message as the reason; never a crash)."""


def call_verb(method: Method, verb: str, ctx: MethodContext, *args):
    """Ask `method` for `verb` and validate the answer.

    Raises:
        NotApplicable: the method does not implement `verb`.
        MethodOutputError: the answer cannot be scored.
    """
    if not method.supports(verb):
        raise NotApplicable(f"method {method.name!r} does not implement {verb!r}")
    out = getattr(method, verb)(ctx, *args)
    check_output(method.name, verb, ctx, out, *args)
    return out


METHODS: Registry[type[Method]] = Registry(
    "method", "neuronbench.baselines", "neuronbench.methods",
    accepts=lambda obj: isinstance(obj, type) and issubclass(obj, Method), expected="a Method subclass")
register_method = METHODS.register


def get_method(name: str, **kwargs) -> Method:
    """An instance of the method `name` (a baseline, `module:Class`, or an entry point)."""
    return METHODS.get(name)(**kwargs)
