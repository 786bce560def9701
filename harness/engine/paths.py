"""Where NeuronBench keeps fetched corpora, built models and cached statistics, and how it writes
folders: atomically, never over something that is not its own output of the same kind."""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

MARKER = ".neuronbench"  # {"kind": ...}: written into every folder atomic_dir creates
_TMP = re.compile(r"^\.tmp-.*-([A-Za-z0-9_]*)-pid(\d+)-[^-]*$")
_FOREIGN_TMP_AGE_S = 24 * 3600  # a .tmp-* entry of another host (a shared home), or of an older version


def home() -> Path:
    """The NeuronBench home folder: `$NEURONBENCH_HOME`, else `~/.cache/neuronbench`."""
    root = os.environ.get("NEURONBENCH_HOME")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "neuronbench"


def data_dir() -> Path:
    return home() / "data"


def cache_dir() -> Path:
    return home() / "cache"


def zoo_dir() -> Path:
    return home() / "zoo"


def folder_kind(folder: Path) -> str | None:
    """The kind `atomic_dir` stamped on `folder`, or None (not a NeuronBench output)."""
    try:
        kind = json.loads((Path(folder) / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def check_output_dir(final: Path, kind: str, legacy: Callable[[Path], bool] | None = None) -> None:
    """Raise unless `final` may become (or be replaced by) a NeuronBench output of `kind`.

    Allowed: a missing path, an empty folder, a folder `atomic_dir` wrote with the same `kind`, or one
    `legacy` recognises (outputs of versions before the marker). Checked before any work is done.

    Raises:
        ValueError: `final` is a file, or a folder holding anything else.
    """
    final = Path(final)
    for parent in final.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"cannot write {final}: {parent} is a file, not a folder; choose another --out")
    if len(final.name.encode()) > 200:
        raise ValueError(f"cannot write {final}: the folder name has {len(final.name.encode())} bytes "
                         "(at most 200); choose a shorter --out")
    try:
        mode = os.lstat(final).st_mode
    except FileNotFoundError:
        _check_writable(final)
        return
    if not stat.S_ISDIR(mode):
        raise ValueError(f"cannot write {final}: it exists and is not a folder; choose another --out")
    found = folder_kind(final)
    try:
        if found == kind or (found is None and (legacy is not None and legacy(final) or not any(final.iterdir()))):
            return
    except FileNotFoundError:  # removed meanwhile (a concurrent writer)
        return
    what = f"a NeuronBench {found} folder" if found else "a folder NeuronBench did not write"
    raise ValueError(f"refusing to replace {final}: it is {what}, not a {kind} output, and everything in it "
                     "would be deleted; choose a new or empty folder for --out")


def _check_writable(final: Path) -> None:
    # A folder made and removed in the nearest existing ancestor: a real test (permission bits say
    # nothing about /proc, read-only mounts or a full quota).
    ancestor = next(p for p in final.parents if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tmp-probe-", dir=ancestor))
    except OSError as err:
        raise ValueError(f"cannot write {final}: {err.strerror or err} in {ancestor}; choose a folder you can "
                         "write to") from None


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40]


def _tmp_prefix(name: str) -> str:
    return f".tmp-{name[:100]}-{_host()}-pid{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_tmp(folder: Path) -> int:
    """Remove the `.tmp-*` entries of writers that died (killed mid-write) in `folder`; returns how many.

    A writer names its temporary folder with its host and pid, so a live writer's folder on this
    host is never touched; one of another host (a home shared between machines, where this host
    cannot see the writer) or without a pid (older versions) goes once it is a day old.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for p in folder.iterdir():
        if not p.name.startswith(".tmp-"):
            continue
        m = _TMP.match(p.name)
        try:
            if m and m.group(1) == _host():
                stale = not _alive(int(m.group(2)))
            else:
                stale = time.time() - p.stat().st_mtime > _FOREIGN_TMP_AGE_S
        except OSError:
            continue  # removed meanwhile
        if stale:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("removed %d temporary entries of killed writers from %s", removed, folder)
    return removed


@contextmanager
def atomic_dir(final: Path, kind: str, *, keep_existing: bool = False,
               legacy: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder that is renamed to `final` only if the block succeeds.

    A run killed inside the block leaves a `.tmp-*` folder, never a folder named `final`, so nothing
    half-written ever looks complete (`clean_stale_tmp` removes it later). `final` is checked first
    (`check_output_dir`): a file, or a folder that is not a NeuronBench output of the same `kind`, is
    never removed. Concurrent writers of the same `final` are safe: the last to finish wins, or with
    `keep_existing` (content-addressed entries, where every writer writes the same) the first.

    Args:
        final: the folder to create or replace.
        kind: what the folder is (`collection`, `cache entry`, `zoo entry`, ...), stamped into it.
        keep_existing: keep a complete `final` that appeared meanwhile and discard this one.
        legacy: recognises a folder of this kind written before folders were stamped.
    """
    final = Path(final)
    check_output_dir(final, kind, legacy)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final.name), dir=final.parent))
    except OSError as err:  # named by `final`, not by an internal temporary path
        raise ValueError(f"cannot write {final}: {err.strerror or err}; choose a folder you can write to") from None
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        _commit(tmp, final, kind, keep_existing, legacy)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, final: Path, kind: str, keep_existing: bool,
            legacy: Callable[[Path], bool] | None) -> None:
    # rename(2) onto an empty folder succeeds and onto a non-empty one fails, atomically: a loser
    # moves the existing folder aside (after checking it again) and retries.
    for _ in range(1000):
        try:
            os.rename(tmp, final)
            return
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
        if keep_existing and folder_kind(final) == kind:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        check_output_dir(final, kind, legacy)
        try:
            if _exchange(tmp, final):  # readers never see `final` missing
                shutil.rmtree(tmp, ignore_errors=True)  # now the replaced folder
                return
        except FileNotFoundError:
            continue
        aside = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final.name), dir=final.parent))
        try:
            os.rename(final, aside)  # replaces the empty `aside`
        except FileNotFoundError:  # another writer moved it first
            aside.rmdir()
            continue
        shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"could not replace {final}: other writers kept replacing it")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.ENOENT:
        raise FileNotFoundError(code, os.strerror(code), str(b))
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
