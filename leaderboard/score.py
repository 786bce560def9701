"""Re-score a submission: validate it, then run the same task scoring functions as `neuronbench run`
with a `Replay` method answering from the submitted data, on the public or the hidden split.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import polars as pl

from neuronbench.harness.engine import paths
from neuronbench.harness.engine.cache import Cache
from neuronbench.harness.engine.records import save_results, to_frame, utc_stamp
from neuronbench.harness.suite.runner import RunConfig, resolve_spec, timed_run
from neuronbench.harness.suite.task import TASKS, RunEnv

from .checks import Problem
from .replay import Replay
from .submission import MANIFEST, file_name, read_frame, read_manifest, submission_id
from .validate import validate


class InvalidSubmission(ValueError):
    """A submission failed validation; `problems` lists every defect."""

    def __init__(self, folder: Path, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{folder} is not a valid submission ({len(problems)} problems):\n{lines}{more}")


def checked_manifest(folder: Path) -> tuple[dict, bytes]:
    """The manifest of a valid submission, parsed and raw; raises InvalidSubmission listing every problem."""
    problems = validate(folder)
    if problems:
        raise InvalidSubmission(folder, problems)
    return read_manifest(folder), (folder / MANIFEST).read_bytes()


@dataclass(frozen=True)
class ScoreConfig:
    """What `score_submission` scores.

    Attributes:
        submission: the submission folder.
        out: folder for results.parquet, config.json and a copy of submission.json, or None.
        split: `public` (the examples fixed by each spec) or `hidden` (drawn with the scorer's
            secret seed, passed to `score_submission` and never written anywhere).
        tasks: a subset of the submission's tasks (empty = all of them).
        submitter: who sent the submission, as the scorer knows them; names its rows
            `submitter/method@version` (default: the manifest's contact; see `submission_id`).
    """

    submission: str
    out: str | None = None
    split: str = "public"
    tasks: tuple[str, ...] = ()
    submitter: str | None = None


def score_submission(config: ScoreConfig, hidden_seed: int | None = None,
                     progress: bool = False) -> tuple[pl.DataFrame, dict]:
    """Validate, then score every task of the submission through the harness.

    Args:
        config: what to score.
        hidden_seed: the scorer's secret seed (needed for `split="hidden"`).
        progress: print a line per task.

    Returns:
        The long-format records (method = the manifest's method name) and the run's config record.

    Raises:
        InvalidSubmission: the submission has problems (all of them listed).
    """
    folder = Path(config.submission)
    # Built first so that a hidden split without its seed fails before any work.
    env = RunEnv(seed=0, cache=Cache(), progress=progress, split=config.split, hidden_seed=hidden_seed)
    man, raw = checked_manifest(folder)
    names = list(config.tasks or man["tasks"])
    unknown = [n for n in names if n not in man["tasks"]]
    if unknown:
        raise KeyError(f"tasks {unknown} are not in the submission; it covers {', '.join(man['tasks'])}")
    env = replace(env, seed=man["seed"], quick=man["quick"])
    records, seconds, specs = _replay_tasks(folder, man, submission_id(man, config.submitter), names, env, progress)
    run_id = uuid.uuid4().hex[:12]
    record_config = {"run_id": run_id, "created": utc_stamp(), "kind": "submission", "method": man["method"],
                     "submission_id": submission_id(man, config.submitter), "split": config.split,
                     "seed": man["seed"], "quick": man["quick"], "submission_sha256": hashlib.sha256(raw).hexdigest(),
                     "tasks": {n: asdict(s) for n, s in specs.items()},
                     "fingerprints": {n: s.fingerprint() for n, s in specs.items()}, "seconds": seconds}
    frame = to_frame(records, run_id)
    if config.out:
        save_results(frame, record_config, Path(config.out))
        paths.atomic_write_text(Path(config.out) / MANIFEST, raw.decode("utf-8"))
    return frame, record_config


def _replay_tasks(folder: Path, man: dict, name_as: str, names: list[str], env: RunEnv, progress: bool):
    """Each task's scoring function with a `Replay` of its file: records, seconds and specs."""
    records, seconds, specs = [], {}, {}
    for name in names:
        task = TASKS.get(name)
        specs[name] = spec = resolve_spec(task, RunConfig(quick=man["quick"]))
        replay = Replay(name_as, spec.verb, read_frame(folder / file_name(name)), file_name(name))
        got, seconds[name] = timed_run(task, spec, replay, env,
                                       f"[score {name}] {replay.name} ({env.split}) ..." if progress else None)
        records.extend(got)
    return records, seconds, specs
