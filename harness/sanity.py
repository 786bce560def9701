"""Sanity checks: can each task's headline tell a real method from noise?

Stored verdicts (one JSON per task fingerprint under `<home>/sanity/`) let every table flag a task
that failed its own check.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import paths


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
