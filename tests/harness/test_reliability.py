"""Nothing lost, nothing silently wrong (issue 13): outputs that never replace what is not
NeuronBench's, isolated and resumable runs, bound result files, and errors without tracebacks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from neuronbench.harness import paths
from neuronbench.harness.cli import main


# ---------------------------------------------------------------- outputs (case 1, 7, .tmp, concurrency)

def _write(final: Path, kind: str, text: str, **kw) -> None:
    with paths.atomic_dir(final, kind, **kw) as tmp:
        (tmp / "data.txt").write_text(text)


@pytest.mark.parametrize("content", ["file", "folder"])
def test_collect_out_never_removes_a_folder_that_is_not_a_collection(tmp_path, capsys, content):
    home = tmp_path / "home"
    (home / "zoo").mkdir(parents=True)
    (home / "zoo" / "weights.bin").write_bytes(b"precious")
    target = home if content == "folder" else home / "zoo" / "weights.bin"
    assert main(["collect", "--model", "no-such-model", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "Traceback" not in err and err.count("\n") == 1
    assert (home / "zoo" / "weights.bin").read_bytes() == b"precious"


def test_atomic_dir_replaces_its_own_kind_only(tmp_path):
    final = tmp_path / "out"
    _write(final, "collection", "one")
    _write(final, "collection", "two")
    assert (final / "data.txt").read_text() == "two" and paths.folder_kind(final) == "collection"
    with pytest.raises(ValueError, match="not a leaderboard-site output"):
        _write(final, "leaderboard-site", "three")
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty", "collection", "into an empty folder")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("keep_existing", [False, True])
def test_atomic_dir_is_safe_under_concurrent_writers(tmp_path, keep_existing):
    final, errors, n_threads, n_each = tmp_path / "entry", [], 8, 25

    def writer(i):
        for j in range(n_each):
            try:
                _write(final, "cache-entry", f"{i}-{j}", keep_existing=keep_existing)
                assert (final / "data.txt").read_text()
            except Exception as err:  # noqa: BLE001 - every failure is counted
                errors.append(repr(err))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [], f"{len(errors)} of {n_threads * n_each} attempts failed: {errors[:3]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
    assert sorted(p.name for p in final.iterdir()) == [paths.MARKER, "data.txt"]


def test_tmp_folders_of_dead_writers_are_cleaned_up_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_tmp = tmp_path / f".tmp-k1-pid{int(dead.stdout)}-abc"
    live_tmp = tmp_path / f".tmp-k2-pid{os.getpid()}-abc"
    old_style = tmp_path / ".tmp-k3-xyz"
    for p in (dead_tmp, live_tmp, old_style):
        (p / "sub").mkdir(parents=True)
    os.utime(old_style, (0, 0))
    assert paths.clean_stale_tmp(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == [live_tmp.name]


def test_a_killed_cache_writer_leaves_a_tmp_folder_the_next_start_removes(tmp_path):
    from neuronbench.harness.cache import Cache

    script = ("import os, sys; from pathlib import Path; from neuronbench.harness.cache import Cache\n"
              "def write(folder):\n    (folder / 'x.bin').write_bytes(b'x')\n    os._exit(9)\n"
              "Cache(Path(sys.argv[1])).put('k1', write)\n")
    assert subprocess.run([sys.executable, "-c", script, str(tmp_path)]).returncode == 9
    assert any(p.name.startswith(".tmp-k1") for p in tmp_path.iterdir())
    Cache(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["file", "under-file", "long-name"])
def test_bad_out_paths_fail_before_any_work_with_one_line(tmp_path, capsys, monkeypatch, bad):
    from neuronbench.harness import runner

    monkeypatch.setattr(runner, "run_one", lambda *a, **k: pytest.fail("work started before --out was checked"))
    (tmp_path / "f").write_text("x")
    out = {"file": tmp_path / "f", "under-file": tmp_path / "f" / "sub", "long-name": tmp_path / ("x" * 300)}[bad]
    assert main(["run", "--quick", "--tasks", "ppl-trend", "--methods", "random", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "--out" in err
