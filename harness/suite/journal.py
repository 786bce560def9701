"""Suite items run in isolation and journalled: an item's exception or hang becomes an `error`
record, and each finished item is appended to the run folder's journal, so a killed run keeps what it
finished and `neuronbench run --resume DIR` continues it to the records an uninterrupted run writes."""
from __future__ import annotations

import json
import logging
import os
import threading
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..engine.records import Record

log = logging.getLogger(__name__)

JOURNAL = "progress.jsonl"  # line 1: the run (config, run id); then one line per finished item
ERRORS_LOG = "errors.log"  # the traceback of every failed item


@dataclass(frozen=True)
class Outcome:
    """What one item left: its records, wall time, and `Type: message` when it failed."""

    records: list[Record]
    seconds: float
    error: str | None = None


def call_isolated(fn: Callable[[], list[Record]], timeout_s: float | None) -> tuple[list[Record] | None, str | None, str | None]:
    """`fn()` with its exception caught, and abandoned after `timeout_s` seconds (None: no limit).

    Returns:
        (records, error, traceback): records is None when it failed; error is `Type: message`.
        A timed-out item keeps running in a daemon worker thread until the process exits (Python
        cannot stop a thread); its answer is discarded.
    """
    if timeout_s is None:
        try:
            return fn(), None, None
        except Exception as err:  # noqa: BLE001 - isolation is the point; KeyboardInterrupt still stops
            return None, _describe(err), traceback.format_exc()
    box: dict = {}

    def work() -> None:
        try:
            box["records"] = fn()
        except BaseException as err:  # noqa: BLE001 - reported to the waiting thread
            box["error"], box["traceback"] = _describe(err), traceback.format_exc()

    worker = threading.Thread(target=work, daemon=True, name="neuronbench-item")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return None, f"TimeoutError: no answer within --item-timeout {timeout_s:g} s", None
    return box.get("records"), box.get("error"), box.get("traceback")


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else '(no message)'}"


class Journal:
    """The append-only record of a run's finished items in `folder/progress.jsonl`."""

    def __init__(self, folder: Path, header: dict, done: dict[str, dict] | None = None):
        self.folder, self.header, self.done = Path(folder), header, done or {}

    @classmethod
    def start(cls, folder: Path, header: dict) -> "Journal":
        """A new journal for the run `header` describes (replacing an earlier run's)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ERRORS_LOG).unlink(missing_ok=True)
        with open(folder / JOURNAL, "w") as fh:
            fh.write(json.dumps({"run": header}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return cls(folder, header)

    @classmethod
    def resume(cls, folder: Path) -> "Journal":
        """The journal of the run in `folder`; a line cut short by a kill is ignored."""
        path = Path(folder) / JOURNAL
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume in {folder}: no {JOURNAL} (a run that finished without "
                                    "errors removes it); start a new run with --out instead")
        lines = path.read_text().splitlines()
        try:
            header = json.loads(lines[0])["run"]
        except (IndexError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} does not start with a run description; start a new run with --out") from err
        done = {}
        for line in lines[1:]:
            try:
                item = json.loads(line)
                done[item["item"]] = item
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a cut-short line in %s (a killed run)", path)
        return cls(folder, header, done)

    def finished(self, item: str, fingerprint: str) -> Outcome | None:
        """The outcome journalled for `item` under the same spec, unless it failed (retried)."""
        got = self.done.get(item)
        if got is None or got.get("fingerprint") != fingerprint or got.get("error"):
            return None
        return Outcome([Record(**r) for r in got["records"]], got["seconds"])

    def add(self, item: str, fingerprint: str, outcome: Outcome, trace: str | None = None) -> None:
        """Append one finished item (flushed to disk before returning)."""
        line = {"item": item, "fingerprint": fingerprint, "seconds": outcome.seconds, "error": outcome.error,
                "records": [asdict(r) for r in outcome.records]}
        with open(self.folder / JOURNAL, "a") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if outcome.error:
            with open(self.folder / ERRORS_LOG, "a") as fh:
                fh.write(f"=== {item}: {outcome.error}\n{trace or ''}\n")
        self.done[item] = line

    def close(self, keep: bool) -> None:
        """Remove the journal once the run's results are written, unless items failed (`keep`)."""
        if not keep:
            (self.folder / JOURNAL).unlink(missing_ok=True)
