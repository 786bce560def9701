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

from neuronbench.harness.engine import paths
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
    with pytest.raises(ValueError, match="not a leaderboard site output"):
        _write(final, "leaderboard site", "three")
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty", "collection", "into an empty folder")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("keep_existing", [False, True])
def test_atomic_dir_is_safe_under_concurrent_writers(tmp_path, keep_existing):
    final, errors, n_threads, n_each = tmp_path / "entry", [], 8, 25

    def writer(i):
        for j in range(n_each):
            try:
                _write(final, "cache entry", f"{i}-{j}", keep_existing=keep_existing)
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
    host = paths._host()
    dead_tmp = tmp_path / f".tmp-k1-{host}-pid{int(dead.stdout)}-abc"
    live_tmp = tmp_path / f".tmp-k2-{host}-pid{os.getpid()}-abc"
    other_host = tmp_path / f".tmp-k4-elsewhere-pid{int(dead.stdout)}-abc"  # its writer may be alive there
    old_style = tmp_path / ".tmp-k3-xyz"
    for p in (dead_tmp, live_tmp, old_style, other_host):
        (p / "sub").mkdir(parents=True)
    os.utime(old_style, (0, 0))
    assert paths.clean_stale_tmp(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live_tmp.name, other_host.name])
    os.utime(other_host, (0, 0))
    assert paths.clean_stale_tmp(tmp_path) == 1


def test_a_killed_cache_writer_leaves_a_tmp_folder_the_next_start_removes(tmp_path):
    from neuronbench.harness.engine.cache import Cache

    script = ("import os, sys; from pathlib import Path; from neuronbench.harness.engine.cache import Cache\n"
              "def write(folder):\n    (folder / 'x.bin').write_bytes(b'x')\n    os._exit(9)\n"
              "Cache(Path(sys.argv[1])).put('k1', write)\n")
    assert subprocess.run([sys.executable, "-c", script, str(tmp_path)]).returncode == 9
    assert any(p.name.startswith(".tmp-k1") for p in tmp_path.iterdir())
    Cache(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["file", "under-file", "long-name"])
def test_bad_out_paths_fail_before_any_work_with_one_line(tmp_path, capsys, monkeypatch, bad):
    from neuronbench.harness.suite import runner

    monkeypatch.setattr(runner, "run_one", lambda *a, **k: pytest.fail("work started before --out was checked"))
    (tmp_path / "f").write_text("x")
    out = {"file": tmp_path / "f", "under-file": tmp_path / "f" / "sub", "long-name": tmp_path / ("x" * 300)}[bad]
    assert main(["run", "--quick", "--tasks", "ppl-trend", "--methods", "random", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "--out" in err


# ---------------------------------------------------------------- isolated items, resume (case 2)

USER_METHODS = '''
import os, time
from neuronbench.baselines.chance import RandomMethod


class Raiser(RandomMethod):
    name = "raiser"

    def stage_change(self, ctx):
        raise ValueError("boom from Raiser")

    def attribute_positions(self, ctx, layer):
        raise ValueError("boom from Raiser")


class Sleeper(RandomMethod):
    name = "sleeper"

    def stage_change(self, ctx):
        time.sleep(3600)


class Killer(RandomMethod):
    """`random` under another name, killing its process (no clean-up) when KILL_ME is set."""
    name = "killer"

    def stage_change(self, ctx):
        if os.environ.get("KILL_ME"):
            os._exit(9)
        return super().stage_change(ctx)
'''
COLS = ["task", "task_version", "model", "method", "metric", "k", "seed", "value", "ci_low", "ci_high",
        "config_hash", "split", "status"]


@pytest.fixture
def user_methods(tmp_path, monkeypatch):
    (tmp_path / "mymods").mkdir()
    (tmp_path / "mymods" / "reliability_methods.py").write_text(USER_METHODS)
    monkeypatch.syspath_prepend(str(tmp_path / "mymods"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "mymods"), *sys.path]))
    return "reliability_methods"


def _records(folder: Path, methods=None):
    from neuronbench.harness.engine.records import load_results

    frame, _ = load_results(folder)
    frame = frame.filter(frame["method"].is_in(methods)) if methods else frame
    return frame.select(COLS).sort("task", "method", "metric", "k", "seed", nulls_last=True)


def test_a_raising_and_a_hanging_method_are_isolated_in_a_quick_suite(tmp_path, capsys, user_methods):
    tasks = ["--quick", "--tasks", "ppl-trend", "erasure", "--no-report"]
    assert main(["run", *tasks, "--methods", "random", "--out", str(tmp_path / "clean")]) == 0
    capsys.readouterr()
    bad = ["random", f"{user_methods}:Raiser", f"{user_methods}:Sleeper"]
    assert main(["run", *tasks, "--methods", *bad, "--item-timeout", "20", "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "ppl-trend/raiser failed: ValueError: boom from Raiser" in err
    assert "ppl-trend/sleeper failed: TimeoutError" in err and "Traceback" not in err
    assert "erasure/raiser failed: ValueError" in err
    assert _records(tmp_path / "bad", ["random"]).equals(_records(tmp_path / "clean"))
    frame = _records(tmp_path / "bad")
    errors = frame.filter(frame["status"] == "error")
    assert sorted(zip(errors["task"], errors["method"])) == [("erasure", "raiser"), ("ppl-trend", "raiser"),
                                                            ("ppl-trend", "sleeper")]
    log = (tmp_path / "bad" / "errors.log").read_text()
    assert "Traceback" in log and "boom from Raiser" in log


def test_a_killed_run_resumes_to_the_records_of_an_uninterrupted_one(tmp_path, user_methods):
    argv = [sys.executable, "-m", "neuronbench.harness.cli", "run", "--quick", "--tasks", "ppl-trend",
            "--methods", "random", f"{user_methods}:Killer", "activation", "--no-report"]
    killed = subprocess.run([*argv, "--out", str(tmp_path / "run")], capture_output=True, text=True,
                            env={**os.environ, "KILL_ME": "1"})
    assert killed.returncode == 9, killed.stderr
    journal = (tmp_path / "run" / "progress.jsonl").read_text().splitlines()
    assert len(journal) == 2 and json.loads(journal[1])["item"] == "ppl-trend/random"  # kept what it finished
    assert main(["run", "--resume", str(tmp_path / "run"), "--no-report"]) == 0
    assert main(["run", "--quick", "--tasks", "ppl-trend", "--methods", "random", f"{user_methods}:Killer",
                 "activation", "--no-report", "--out", str(tmp_path / "whole")]) == 0
    assert _records(tmp_path / "run").equals(_records(tmp_path / "whole"))
    assert not (tmp_path / "run" / "progress.jsonl").exists()  # a finished run needs no journal


# ---------------------------------------------------------------- model folders (case 4, tracebacks)

@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from neuronbench.harness.zoo.tiny import tiny_model

    folder = tmp_path_factory.mktemp("model") / "tiny-bert"
    loaded = tiny_model("bert")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def _copy(folder: Path, dest: Path, keep=lambda name: True) -> Path:
    dest.mkdir()
    for p in folder.iterdir():
        if keep(p.name):
            (dest / p.name).write_bytes(p.read_bytes())
    return dest


def test_a_model_folder_without_tokenizer_files_is_refused_naming_them(model_folder, tmp_path):
    from neuronbench.harness.engine.models import TOKENIZER_FILES, load_model

    assert load_model(str(model_folder), device="cpu").tokenizer is not None
    bare = _copy(model_folder, tmp_path / "bare", lambda name: name not in TOKENIZER_FILES)
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the model has \d+ embeddings.*no tokenizer files"):
        load_model(str(bare), device="cpu")


@pytest.mark.parametrize("damage", ["only-config", "truncated-weights", "unknown-architecture"])
def test_a_damaged_model_folder_gives_one_line_naming_it(model_folder, tmp_path, capsys, damage):
    if damage == "only-config":
        folder = _copy(model_folder, tmp_path / "m", lambda name: name == "config.json")
    else:
        folder = _copy(model_folder, tmp_path / "m")
    if damage == "truncated-weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    if damage == "unknown-architecture":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "no-such-arch"}))
    assert main(["models", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(folder) in err
    assert "not a local folder" not in err


# ---------------------------------------------------------------- bound results (case 6)

def _results(folder: Path, run_id: str, value: float) -> Path:
    import polars as pl

    from neuronbench.harness.engine.records import Record, save_results, to_frame

    frame = to_frame([Record("prune", 1, "m", "random", "prune.gap_auc", value, 0, "abc")], run_id)
    save_results(frame, {"run_id": run_id}, folder)
    assert isinstance(frame, pl.DataFrame)
    return folder


@pytest.mark.parametrize("verb", ["regress", "report", "leaderboard"])
def test_results_and_config_of_two_runs_are_refused_by_every_reader(tmp_path, capsys, verb):
    a, b = _results(tmp_path / "a", "run-a", 0.1), _results(tmp_path / "b", "run-b", 0.2)
    (a / "config.json").write_bytes((b / "config.json").read_bytes())
    argv = {"regress": ["regress", str(a), "--against", str(b)], "report": ["report", str(a)],
            "leaderboard": ["leaderboard", "build", str(a), "--out", str(tmp_path / "site")]}[verb]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "different runs" in err and str(a) in err and err.count("\n") == 1


def test_records_changed_after_writing_are_refused(tmp_path):
    import polars as pl

    from neuronbench.harness.engine.records import load_results

    a = _results(tmp_path / "a", "run-a", 0.1)
    pl.read_parquet(a / "results.parquet").with_columns(value=pl.lit(0.9)).write_parquet(a / "results.parquet")
    with pytest.raises(ValueError, match="hash mismatch"):
        load_results(a)


@pytest.mark.parametrize("damage", ["truncated", "not-parquet", "no-config", "config-list"])
def test_a_damaged_results_folder_gives_one_line(tmp_path, capsys, damage):
    a, b = _results(tmp_path / "a", "run-a", 0.1), _results(tmp_path / "b", "run-b", 0.2)
    results = a / "results.parquet"
    if damage == "truncated":
        results.write_bytes(results.read_bytes()[:50])
    elif damage == "not-parquet":
        results.write_text("task,value\nprune,1\n")
    elif damage == "no-config":
        (a / "config.json").unlink()
    else:
        (a / "config.json").write_text("[1]")
    for argv in (["regress", str(a), "--against", str(b)], ["report", str(a)],
                 ["leaderboard", "build", str(a), "--out", str(tmp_path / "site")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and str(a) in err, (argv, err)


# ---------------------------------------------------------------- seeds from stable identities (case 8)

def test_random_stage_change_depends_on_the_stage_names_not_their_weights(tiny, sentence_data):
    from dataclasses import replace

    from neuronbench.baselines.chance import RandomMethod
    from neuronbench.harness.engine.method import MethodContext

    a, b = tiny("gpt2", seed=0), tiny("gpt2", seed=1)
    assert a.fingerprint() != b.fingerprint()
    same_names = replace(b, name=a.name, _fingerprint=None)

    def change(model, parent):
        ctx = MethodContext(model, model.sites("ffn"), sentence_data, "d", seed=3, parent=parent)
        return RandomMethod().stage_change(ctx)

    assert change(a, a) == change(same_names, same_names)  # retrained weights, same stages: same draw
    assert change(a, replace(a, name="other-stage")) != change(a, a)


# ---------------------------------------------------------------- unclear messages

def _collect(model_folder: Path, data: Path, *extra: str) -> list[str]:
    return ["collect", "--model", str(model_folder), "--data", str(data), "--sites", "ffn.0", *extra]


def test_a_data_file_without_a_text_column_names_the_flag_that_fixes_it(model_folder, tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\na good film,1\na bad film,0\nfine,1\nawful,0\n")
    assert main(_collect(model_folder, data)) == 2
    err = capsys.readouterr().err
    assert "--text-column" in err and "text_column=" not in err.replace("(text_column= in Python)", "")
    assert main(_collect(model_folder, data, "--text-column", "sentence")) == 0


@pytest.mark.parametrize("content", [b"\xff\xfe" + "text\nhello\n".encode("utf-16-le"), bytes(range(256)) * 3])
def test_binary_and_utf16_data_files_are_named(model_folder, tmp_path, capsys, content):
    data = tmp_path / "d.csv"
    data.write_bytes(content)
    assert main(_collect(model_folder, data)) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "UTF-8" in err and err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--limit", "--topk", "--max-tokens"])
def test_zero_or_negative_counts_are_refused_not_read_as_no_limit(capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        main(["collect", flag, "0"])
    assert exit_.value.code == 2 and "not above 0" in capsys.readouterr().err


def test_an_unwritable_out_is_named_not_its_temporary_folder(model_folder, tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("text\nhello there\nhow are you\nfine thanks\n")
    assert main(_collect(model_folder, data, "--out", "/proc/nb-x")) == 2
    err = capsys.readouterr().err
    assert "/proc/nb-x" in err and ".tmp-" not in err and err.count("\n") == 1


@pytest.mark.parametrize("content", ["my secret seed 123", None])
def test_a_bad_hidden_seed_file_is_refused_without_echoing_it(tmp_path, capsys, content):
    from neuronbench.harness.suite.task import read_hidden_seed

    path = tmp_path / "seed"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    with pytest.raises(ValueError) as err:
        read_hidden_seed(str(path))
    assert str(path) in str(err.value) and "secret" not in str(err.value).replace("the secret seed", "")
    assert main(["submit", "score", str(tmp_path), "--split", "hidden", "--hidden-seed-file", str(path),
                 "--out", str(tmp_path / "scored")]) == 2
    out = capsys.readouterr()
    assert "my secret seed" not in out.err + out.out and "Traceback" not in out.err
