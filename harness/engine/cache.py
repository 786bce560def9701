"""Content-addressed cache of collected statistics and activation matrices.

An entry is a folder named by the hash of everything that determines its content (model weights or
revision, tokenizer, data fingerprint, sites, alignment, statistics, harness version). It is written
in a temporary folder and renamed when complete, and `meta.json` lists every file with its size and
SHA-256, checked on every read, so a killed run or a damaged file never passes for a complete entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import __version__
from . import paths

log = logging.getLogger(__name__)

META = "meta.json"


def content_hash(parts: dict) -> str:
    """Stable hash of a JSON-able description."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def data_fingerprint(dataset) -> str:
    """Hash of a dataset's content (every column, in order)."""
    from .batching import columns

    h = hashlib.sha256()
    for name, values in sorted(columns(dataset).items()):
        h.update(name.encode())
        h.update(json.dumps(values, default=str).encode())
    return h.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (hex), read in chunks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass(frozen=True)
class Entry:
    key: str
    path: Path
    meta: dict

    @property
    def size_bytes(self) -> int:
        return sum(f["bytes"] for f in self.meta.get("files", []))


class Cache:
    """A folder of complete, verified entries.

    Args:
        root: the cache folder; default `$NEURONBENCH_HOME/cache`.
    """

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else paths.cache_dir()
        paths.clean_stale_tmp(self.root)  # what killed writers left

    def key(self, parts: dict) -> str:
        return content_hash({**parts, "harness_version": __version__})

    def get(self, key: str) -> Entry | None:
        """The complete entry for `key`, or None. A damaged entry is removed and reported."""
        folder = self.root / key
        if not folder.is_dir():
            return None
        problem = self._verify(folder)
        if problem:
            self.remove(key, problem)
            return None
        return Entry(key, folder, json.loads((folder / META).read_text()))

    @staticmethod
    def _verify(folder: Path) -> str | None:
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, ValueError) as err:
            return f"unreadable {META}: {err}"
        if not isinstance(meta, dict) or not isinstance(meta.get("files"), list):
            return f"{META} is not an entry description"
        for f in meta["files"]:
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or "sha256" not in f:
                return f"{META} lists a file without name and sha256 (written by an older version)"
            p = folder / f["name"]
            if not p.is_file():
                return f"missing file {f['name']}"
            if p.stat().st_size != f.get("bytes"):
                return f"file {f['name']} has {p.stat().st_size} bytes, expected {f.get('bytes')}"
            if file_sha256(p) != f["sha256"]:
                return f"file {f['name']} does not match the content hash written with it"
        return None

    def remove(self, key: str, problem: str) -> None:
        """Remove a damaged entry so that it is rebuilt (`problem` says what was wrong)."""
        log.warning("cache entry %s is damaged (%s); removing it so it is rebuilt", key, problem)
        shutil.rmtree(self.root / key, ignore_errors=True)

    def put(self, key: str, write: Callable[[Path], dict], parts: dict | None = None) -> Entry:
        """Create the entry for `key` by calling `write(tmp_folder) -> meta` then renaming atomically."""
        with paths.atomic_dir(self.root / key, "cache entry", keep_existing=True,
                              legacy=lambda f: (f / META).is_file()) as tmp:
            meta = dict(write(tmp))
            meta.update(key=key, created=time.strftime("%Y-%m-%dT%H:%M:%S"), harness_version=__version__,
                        parts=parts or {},
                        files=[{"name": p.name, "bytes": p.stat().st_size, "sha256": file_sha256(p)}
                               for p in sorted(tmp.iterdir()) if p.name != META])
            paths.atomic_write_json(tmp / META, meta)
        return Entry(key, self.root / key, json.loads((self.root / key / META).read_text()))

    def get_or_put(self, parts: dict, write: Callable[[Path], dict]) -> tuple[Entry, bool]:
        """The entry for `parts`, creating it on a miss. Returns (entry, hit)."""
        key = self.key(parts)
        entry = self.get(key)
        if entry is not None:
            return entry, True
        return self.put(key, write, parts), False

    def entries(self) -> list[Entry]:
        """Entries whose `meta.json` describes them (temporary folders of killed runs and folders
        with unreadable metadata are not listed; `get` verifies an entry's content)."""
        if not self.root.is_dir():
            return []
        out = []
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and not folder.name.startswith(".tmp-") and (folder / META).is_file():
                try:
                    meta = json.loads((folder / META).read_text())
                except (OSError, ValueError):
                    continue
                files = meta.get("files") if isinstance(meta, dict) else None
                if isinstance(files, list) and all(isinstance(f, dict) and isinstance(f.get("bytes"), int)
                                                   for f in files):
                    out.append(Entry(folder.name, folder, meta))
        return out

    def clear(self) -> int:
        """Remove every entry and leftover temporary folder; returns how many folders were removed."""
        if not self.root.is_dir():
            return 0
        removed = 0
        for folder in self.root.iterdir():
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed
