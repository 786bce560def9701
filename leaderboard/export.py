"""Export a method as a submission: run each task's scoring through a `Recorder` on the public
split, keep the method's outputs and discard the scores.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

import polars as pl

from neuronbench.harness.engine.cache import Cache
from neuronbench.harness.engine.method import Method, get_method
from neuronbench.harness.engine.records import to_frame
from neuronbench.harness.suite.runner import RunConfig, resolve_spec, timed_run
from neuronbench.harness.suite.task import TASKS, RunEnv

from .replay import Recorder
from .submission import NAME_PATTERN, manifest, task_entry, write_submission

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    """What `export_submission` exports.

    Attributes:
        method: a baseline name or `module:Class`.
        out: the submission folder to create (must not exist).
        tasks: task names (empty = every task whose verb the method implements).
        quick: export for the `--quick` specs (tiny models).
        seed: the run seed the method sees (scoring uses the same one).
        model: refused unless it is each selected task's own model (`--model`): the board scores a
            submission on the tasks' own models, so one exported on other checkpoints (a user's
            trajectory `a/step-1,a/step-2,...` on ppl-trend, a folder) could never be re-scored.
        authors, contact, description, code_url, license, method_version: manifest fields;
            `description` defaults to the method's docstring, `method_version` to a `version`
            attribute of the method or the version of the package that ships it.
    """

    method: str
    out: str
    tasks: tuple[str, ...] = ()
    quick: bool = False
    seed: int = 0
    model: str | None = None
    authors: tuple[str, ...] = ("anonymous",)
    contact: str = ""
    description: str | None = None
    code_url: str = ""
    license: str = "unspecified"
    method_version: str | None = None


@dataclass
class ExportResult:
    """The folder written and the records of the export run (the method's own scores on the
    public split: the CLI discards them; tests compare re-scoring against them)."""

    folder: Path
    records: pl.DataFrame
    seconds: dict[str, float] = field(default_factory=dict)


def method_version(method: Method) -> str:
    """A `version` attribute of the method, else the version of the distribution that ships it."""
    own = getattr(method, "version", None)
    if isinstance(own, str) and own:
        return own
    top = type(method).__module__.partition(".")[0]
    for dist in packages_distributions().get(top, []):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unversioned"


def _selected(config: ExportConfig, method: Method) -> list[str]:
    names = list(config.tasks or TASKS.names())
    tasks = [TASKS.get(n) for n in names]  # unknown names fail here, before any work
    if config.tasks:
        lacking = [t.spec.name for t in tasks if not method.supports(t.spec.verb)]
        if lacking:
            raise ValueError(f"method {method.name!r} does not implement the verb of {', '.join(lacking)}; "
                             "drop those tasks from --tasks")
    return [t.spec.name for t in tasks if method.supports(t.spec.verb)]


def _check_model(config: ExportConfig, names: list[str]) -> None:
    """Refuse a model other than the tasks' own, in one line that says why and what to run instead."""
    for name in names if config.model is not None else ():
        own = resolve_spec(TASKS.get(name), RunConfig(quick=config.quick)).model
        if config.model != own:
            raise ValueError(f"--model {config.model!r} cannot be exported: the leaderboard scores {name} on its own "
                             f"model {own!r} only, so it could not re-score answers about other checkpoints; "
                             f"score those with `neuronbench run --tasks {name} --model ...`")


def export_submission(config: ExportConfig, progress: bool = False, method: Method | None = None) -> ExportResult:
    """Run `config.method` on each selected task through a recorder and write its submission.

    Args:
        config: what to export.
        progress: print a line per task.
        method: an instance to export instead of looking `config.method` up (e.g. from a notebook).

    Returns:
        The folder, the export run's records and seconds per task.
    """
    method = method if method is not None else get_method(config.method)
    if not NAME_PATTERN.fullmatch(method.name):
        raise ValueError(f"method name {method.name!r} cannot name a submission; use {NAME_PATTERN.pattern}")
    if Path(config.out).exists():
        raise ValueError(f"{config.out} already exists; remove it or pass another --out")
    names = _selected(config, method)
    _check_model(config, names)
    env = RunEnv(seed=config.seed, quick=config.quick, cache=Cache(), progress=progress)
    frames, entries, records, seconds = {}, {}, [], {}
    for name in names:
        spec = resolve_spec(TASKS.get(name), RunConfig(quick=config.quick))
        recorder = Recorder(method)
        got, seconds[name] = timed_run(TASKS.get(name), spec, recorder, env,
                                       f"[export {name}] {method.name} ..." if progress else None)
        records += got
        if any(r.status == "not_applicable" for r in got):
            log.warning("%s is not applicable to %s here; the submission leaves the task out", method.name, name)
            continue
        frames[name], entries[name] = recorder.frame(spec.verb), task_entry(spec)
    if not frames:
        raise ValueError(f"method {method.name!r} answered none of the tasks {names}: nothing to submit")
    doc = (type(method).__doc__ or "").strip().splitlines()
    man = manifest(method.name, config.method_version or method_version(method), entries, config.seed,
                   config.quick, config.authors, config.contact,
                   config.description if config.description is not None else (doc[0] if doc else ""),
                   config.code_url, config.license)
    folder = write_submission(Path(config.out), man, frames)
    return ExportResult(folder, to_frame(records, "export"), seconds)
