"""Stored sanity verdicts (one JSON per task fingerprint under `<home>/sanity/`), which let every
table flag a task that failed its own check (`neuronbench sanity` writes them)."""
from __future__ import annotations

import json
from pathlib import Path

from ..engine import paths
from .task import TaskSpec


def verdict_path(task: str, fingerprint: str) -> Path:
    return paths.home() / "sanity" / f"{task}-{fingerprint}.json"


def load_verdict(task: str, fingerprint: str) -> dict | None:
    """The stored verdict of `task` at `fingerprint`, or None when it was never checked."""
    path = verdict_path(task, fingerprint)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def sanity_flags(fingerprints: dict[str, str]) -> dict[str, str]:
    """Task name -> short reason, for the tasks whose stored sanity check failed.

    Args:
        fingerprints: task name -> spec fingerprint (as in a results folder's config.json).
    """
    flags = {}
    for task, fingerprint in fingerprints.items():
        verdict = load_verdict(task, fingerprint)
        if verdict is not None and not verdict.get("passed", True):
            flags[task] = "; ".join(verdict.get("failures", [])) or "failed"
    return flags


def store_verdict(spec: TaskSpec, checks: list, survivors: dict[str, list[str]] | None = None) -> dict:
    """Write the task's verdict (what every table's sanity flag reads) and return it. It passes
    or fails on the headline (`checks`: the task's `sanity.Check`s); `survivors` (check ->
    metrics that kept skill) is recorded beside."""
    failures = [c.describe() for c in checks if c.verdict == "FAIL"]
    verdict = {"task": spec.name, "task_version": spec.version, "fingerprint": spec.fingerprint(),
               "passed": not failures, "failures": failures, "checks": [c.describe() for c in checks],
               "reference_skill": next((c.verdict for c in checks if c.check == "reference"), None),
               "surviving_metrics": survivors or {}}
    paths.atomic_write_json(verdict_path(spec.name, spec.fingerprint()), verdict)
    return verdict
