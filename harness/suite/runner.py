"""The suite runner: every selected task with every applicable method, as one recorded run."""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import polars as pl

from ..engine import distributed, paths
from ..engine.cache import Cache
from ..engine.method import METHODS, Method, get_method, not_applicable
from ..engine.records import RESULTS, Record, headline_table, save_results, to_frame, utc_stamp
from .journal import JOURNAL, Journal, Outcome, call_isolated
from .inputs import check_inputs, default_parent
from .task import TASKS, RunEnv, Task, TaskSpec, record
from .verdicts import sanity_flags

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """What `run_suite` runs.

    Attributes:
        tasks: task names (empty = all registered).
        methods: method names or `module:Class` (empty = every registered baseline).
        model: replace each task's model (a compatible model of your own), or None. Checked
            against each task's `Takes` before any work.
        parent: the earlier stage of `model` for tasks that compare stages (default: the parent a
            zoo entry records, else none, and stage methods are not applicable).
        data: user data files (`--data`); each task takes the one whose kind it accepts.
        quick: apply each task's `--quick` overrides (tiny models, fewer k, seeds and examples).
        seed: the run's seed (method randomness, random neuron sets, bootstrap).
        out: folder for results.parquet and config.json, or None.
        split: which scoring examples: `public` (fixed by each spec) or `hidden` (drawn with the
            scorer's secret seed, passed to `run_suite` and never written anywhere).
        item_timeout: seconds one (task, method) item may take before it is recorded as an error
            (None: no limit).
        params: task parameter settings `TASK.PARAM=VALUE` (`--set`; VALUE read as JSON, else a
            string; a list becomes a tuple), applied after `--quick`, checked before any work. The
            spec's fingerprint changes with them, so their records never pass for the default's.
        parallel: under a launcher (`torchrun`, `accelerate launch`): `items` splits the (task,
            method) items across ranks, `data` runs every item on all ranks with each item's
            collection and mask evaluation split across them (see `distributed.map_items`).
            Ignored in a plain process.
    """

    tasks: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    model: str | None = None
    parent: str | None = None
    data: tuple[str, ...] = ()
    quick: bool = False
    seed: int = 0
    out: str | None = None
    split: str = "public"
    item_timeout: float | None = None
    parallel: str = "items"
    params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.item_timeout is not None and not self.item_timeout > 0:
            raise ValueError(f"--item-timeout {self.item_timeout!r}: give a number of seconds above 0")


def parse_settings(settings: tuple[str, ...], tasks: list[Task]) -> dict[str, dict[str, object]]:
    """`TASK.PARAM=VALUE` settings as {task: {param: value}}; a ValueError naming the bad one (an
    unknown task or parameter, or no `=`) with the fix."""
    known = {t.spec.name: t for t in tasks}
    out: dict[str, dict[str, object]] = {}
    for setting in settings:
        name, eq, text = setting.partition("=")
        task_name, dot, param = name.strip().rpartition(".")
        if not eq or not dot or not param:
            raise ValueError(f"--set {setting!r}: write TASK.PARAM=VALUE, e.g. --set txray-prune.ffn_config=true")
        if task_name not in known:
            raise ValueError(f"--set {setting!r}: task {task_name!r} is not in this run; its tasks are "
                             f"{sorted(known)}")
        params = dict(known[task_name].spec.params)
        if param not in params:
            raise ValueError(f"--set {setting!r}: {task_name} has no parameter {param!r}; its parameters are "
                             f"{sorted(params)}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out.setdefault(task_name, {})[param] = tuple(value) if isinstance(value, list) else value
    return out


def resolve_spec(task: Task, config: RunConfig, changes: dict[str, object] | None = None) -> TaskSpec:
    """`task`'s spec for this run: `--quick`, then `changes` (its `--set` settings, parsed by
    `parse_settings` over all the run's tasks), then `--model` / `--parent`."""
    spec = task.spec.quick_version() if config.quick else task.spec
    if changes:
        spec = spec.with_params(**changes)
        try:
            if task.params:
                task.params.of(spec)  # the task's own checks, before any work
        except (TypeError, ValueError) as err:
            raise ValueError(f"--set on {spec.name}: {err}") from err
    if config.model:
        parent = config.parent or default_parent(config.model)
        return replace(spec, model=config.model, parent=parent if spec.parent else None)
    return replace(spec, parent=config.parent) if config.parent and spec.parent else spec


def resolved_specs(tasks: list[Task], config: RunConfig, env: RunEnv) -> dict[str, TaskSpec]:
    """Each task's spec for this run; with `--model`, `--parent` or `--data`, checked against what
    the task takes and given its data file (`inputs.check_inputs`: a ValueError on any refusal)."""
    settings = parse_settings(config.params, tasks)  # a setting naming no task of this run fails here
    specs = [resolve_spec(t, config, settings.get(t.spec.name)) for t in tasks]
    if config.model or config.parent or config.data:
        specs = check_inputs(specs, env, bool(config.model), tuple(config.data))
    return {spec.name: spec for spec in specs}


def run_one(task: Task, spec: TaskSpec, method: Method, env: RunEnv) -> list[Record]:
    """`task` scored for `method`, or its not-applicable record; every record says which scoring
    split (`env.split`) scored it."""
    return [replace(r, split=env.split) for r in _score(task, spec, method, env)]


def timed_run(task: Task, spec: TaskSpec, method: Method, env: RunEnv,
              announce: str | None = None) -> tuple[list[Record], float]:
    """`run_one` and its wall time in seconds (to 0.01); prints `announce` first when given."""
    start = time.perf_counter()
    if announce:
        print(announce, flush=True)
    records = run_one(task, spec, method, env)
    return records, round(time.perf_counter() - start, 2)


def _score(task: Task, spec: TaskSpec, method: Method, env: RunEnv) -> list[Record]:
    # The one place where "not applicable" is decided: the verb and the method's needs against what
    # the task provides, before the call; a NotImplementedError from inside (e.g. a gradient
    # method on a model without a task head, with `--model`) is recorded the same way.
    reason = not_applicable(method, spec.verb, task.provides_for(spec))
    if reason is None:
        try:
            return task.score(spec, method, env)
        except NotImplementedError as err:
            reason = str(err)
            log.warning("%s on %s: not applicable (%s)", method.name, spec.name, reason)
    else:
        log.info("%s on %s: not applicable (%s)", method.name, spec.name, reason)
    env.not_applicable[f"{spec.name}/{method.name}"] = reason
    return [record(spec, method.name, f"{spec.name}.not_applicable", None, env.seed, status="not_applicable")]


def run_suite(config: RunConfig, progress: bool = True, hidden_seed: int | None = None,
              resume: bool = False) -> tuple[pl.DataFrame, dict]:
    """Run the suite; returns the long-format records and the run's config record.

    Each (task, method) item runs isolated (`journal.call_isolated`): an exception or a hang past
    `config.item_timeout` becomes an `error` record, named in the config record's `errors`, and the
    other items go on. With `config.out`, each finished item is journalled there at once.

    Args:
        config: what to run.
        progress: print a line per task and method.
        hidden_seed: the scorer's secret seed, needed for `config.split == "hidden"`.
        resume: continue the journalled run in `config.out` (see `resume_config`): its finished
            items are taken from the journal, the rest (and failed ones) are run.
    """
    task_names = config.tasks or tuple(TASKS.names())
    method_names = config.methods or tuple(METHODS.names())
    tasks = [TASKS.get(n) for n in task_names]  # unknown names fail here, before any work
    methods = [get_method(n) for n in method_names]
    env = RunEnv(seed=config.seed, quick=config.quick, cache=Cache(), progress=progress,
                 split=config.split, hidden_seed=hidden_seed)
    resolved = resolved_specs(tasks, config, env)  # refusals come before the journal writes anything
    ranks = distributed.current()
    journal = _open_journal(config, resume) if ranks is None or ranks.is_main else None  # rank 0 journals
    items = [(task, resolved[task.spec.name], method) for task in tasks for method in methods]
    run_id = journal.header["run_id"] if journal else uuid.uuid4().hex[:12]
    run_id, outcomes, owner = _run_items(items, env, config, journal, run_id, progress)
    records: list[Record] = []
    timings, errors = {}, {}
    for it, outcome, rank in zip(items, outcomes, owner):
        records.extend(outcome.records)
        timings[_name(it)] = outcome.seconds
        if outcome.error:
            errors[_name(it)] = outcome.error if rank is None else f"rank {rank}: {outcome.error}"
    record_config = {"run_id": run_id, "created": utc_stamp(),
                     "config": asdict(config), "tasks": {n: asdict(s) for n, s in resolved.items()},
                     "fingerprints": {n: s.fingerprint() for n, s in resolved.items()},
                     "methods": [m.name for m in methods], "seconds": timings, "errors": errors,
                     "method_settings": {m.name: m.settings() for m in methods},
                     "not_applicable": dict(env.not_applicable)}
    if ranks is not None:
        record_config["distributed"] = {"world_size": ranks.world_size, "parallel": config.parallel,
                                        "rank_of": {_name(it): r for it, r in zip(items, owner)}}
        record_config["not_applicable"] = {k: v for part in distributed.gather_objects(env.not_applicable)
                                           for k, v in part.items()}
    frame = to_frame(records, run_id)
    if config.out and journal:
        save_results(frame, record_config, Path(config.out))
        journal.close(keep=bool(errors))
    return frame, record_config


def _run_items(items, env: RunEnv, config: RunConfig, journal: Journal | None, run_id: str,
               progress: bool) -> tuple[str, list[Outcome], list[int | None]]:
    """Each item's outcome, from the journal when it finished before (resume), else run isolated and
    journalled; under a launcher spread over the ranks (`distributed.map_items`), rank 0's run id
    and journal serving all. Returns the run id, the outcomes in item order and the rank that ran
    each (`distributed.owners`; None: a plain process)."""
    ranks = distributed.current()
    finished = {_name(it): o for it in items if journal and (o := journal.finished(_name(it), it[1].fingerprint()))}
    if ranks is not None:
        run_id, finished = distributed.broadcast_object((run_id, finished))
    shown = progress and (ranks is None or ranks.is_main or config.parallel == "items")
    tag = f"[rank {ranks.rank}] " if ranks is not None and config.parallel == "items" else ""

    def one(it) -> Outcome:
        if _name(it) in finished:
            return finished[_name(it)]
        task, spec, method = it
        outcome, trace = _run_item(task, spec, method, env, config.item_timeout,
                                   f"{tag}[{spec.name}] {method.name} ..." if shown else None)
        if journal:
            journal.add(_name(it), spec.fingerprint(), outcome, trace)
        return outcome

    idle = _idle(items, finished)
    outcomes = distributed.map_items(items, one, label=_name, parallel=config.parallel,
                                     prepare=lambda: _build_models(items, env), idle=idle)
    owner = distributed.owners(len(items), ranks, config.parallel, idle)
    for it, outcome, rank in zip(items, outcomes, owner):
        if journal and rank not in (None, 0) and _name(it) not in finished:  # another rank ran it
            journal.add(_name(it), it[1].fingerprint(), outcome, None)
    return run_id, outcomes, owner


def _idle(items, finished: dict) -> list[bool]:
    """Per item, whether it does no work: finished in the run resumed, or not applicable by the
    method's verb and needs alone (`_score` records it without calling the task)."""
    return [_name(it) in finished or not_applicable(it[2], it[1].verb, it[0].provides_for(it[1])) is not None
            for it in items]


def _name(item) -> str:
    """A (task, spec, method) item's name, `task/method`."""
    return f"{item[1].name}/{item[2].name}"


def _build_models(items, env: RunEnv) -> None:
    """Build the zoo entries the items need before ranks split them: two ranks must never build
    one entry at the same time."""
    for name in dict.fromkeys(n for _, spec, _ in items for n in (spec.model, spec.parent) if n):
        env.build(name)


def _run_item(task: Task, spec: TaskSpec, method: Method, env: RunEnv, timeout_s: float | None,
              announce: str | None) -> tuple[Outcome, str | None]:
    start = time.perf_counter()
    got, error, trace = call_isolated(lambda: timed_run(task, spec, method, env, announce), timeout_s)
    if not error:
        return Outcome(*got), None
    log.error("%s on %s failed: %s", method.name, spec.name, error)
    failed = record(spec, method.name, f"{spec.name}.error", None, env.seed, status="error", split=env.split)
    return Outcome([failed], round(time.perf_counter() - start, 2), error), trace


def _open_journal(config: RunConfig, resume: bool) -> Journal | None:
    if not config.out:
        return None
    out = Path(config.out)
    if resume:
        journal = Journal.resume(out)
        settings = {**json.loads(json.dumps(asdict(config))), "out": None}
        if {**journal.header.get("config", {}), "out": None} != settings:
            raise ValueError(f"{out}: --resume continues a run with its own settings; they differ from these")
        return journal
    check_run_out(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / paths.MARKER).write_text(json.dumps({"kind": RESULTS_KIND}) + "\n")
    return Journal.start(out, {"run_id": uuid.uuid4().hex[:12], "config": asdict(config)})


RESULTS_KIND = "results"


def check_run_out(out: Path) -> None:
    """Raise before any work unless `out` can take a run's results (see `paths.check_output_dir`)."""
    paths.check_output_dir(out, RESULTS_KIND, lambda f: (f / RESULTS).is_file() or (f / JOURNAL).is_file())


def resume_config(folder: Path) -> RunConfig:
    """The config of the journalled run in `folder`, for `run_suite(..., resume=True)`."""
    saved = Journal.resume(Path(folder)).header["config"]
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    return RunConfig(**{**fields, "out": str(folder)})


def summary(frame: pl.DataFrame) -> pl.DataFrame:
    """The tasks x methods table of headline metrics with intervals; the column of a task whose
    stored sanity check failed (see `neuronbench sanity`) is marked `SANITY FAILED`."""
    heads = {}
    for name in frame["task"].unique().to_list():
        heads[name] = TASKS.get(name).spec.headline
    table = headline_table(frame, heads)
    hashes = dict(frame.select("task", "config_hash").unique(subset="task").iter_rows())
    flagged = sanity_flags(hashes)
    return table.rename({c: f"{c} SANITY FAILED" for c in table.columns if c.split(" ")[0] in flagged})
