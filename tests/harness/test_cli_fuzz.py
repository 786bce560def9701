"""Fuzzing the command line with hypothesis (issue 13): arguments drawn from each verb's options and
from small malformed files (damaged model folders, data files, result folders, submissions, seed
files, output paths). Whatever the input, no traceback reaches stderr without -v and the exit status
is 0, 1 or 2. The test prints how many cases ran."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuronbench.harness.suite import runner
from neuronbench.harness.cli import main
from neuronbench.harness.engine.records import Record, save_results, to_frame
from neuronbench.harness.zoo.tiny import tiny_model

CASES = int(os.environ.get("NEURONBENCH_FUZZ_CASES", 150))
FUZZ = settings(max_examples=CASES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _model_folders(root: Path) -> dict[str, Path]:
    good = root / "model"
    loaded = tiny_model("bert")
    loaded.model.save_pretrained(good)
    loaded.tokenizer.save_pretrained(good)
    out = {"good": good}
    for name in ("only-config", "no-tokenizer", "truncated", "unknown-arch"):
        folder = root / f"model-{name}"
        folder.mkdir()
        for p in good.iterdir():
            if name == "only-config" and p.name != "config.json":
                continue
            if name == "no-tokenizer" and "token" in p.name or name == "no-tokenizer" and p.name == "vocab.txt":
                continue
            (folder / p.name).write_bytes(p.read_bytes())
        out[name] = folder
    weights = out["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    config = json.loads((out["unknown-arch"] / "config.json").read_text())
    (out["unknown-arch"] / "config.json").write_text(json.dumps({**config, "model_type": "nope"}))
    return out


def _data_files(root: Path) -> dict[str, Path]:
    files = {"good.csv": "text,label\na good film,1\na bad film,0\nfine,1\nawful,0\n",
             "nocol.csv": "sentence,label\na good film,1\n", "empty.csv": "", "list.json": "[1, 2, 3]",
             "bad.jsonl": '{"text": "a"}\n{"text": \n', "tags.txt": "The/DT cat/NN\nsat on/IN\n",
             "good.txt": "The/DT cat/NN sat/VBD\n"}
    out = {}
    for name, text in files.items():
        (root / name).write_text(text)
        out[name] = root / name
    (root / "utf16.csv").write_bytes("text,label\nhello,1\n".encode("utf-16"))
    (root / "binary.csv").write_bytes(bytes(range(256)) * 4)
    out["utf16.csv"], out["binary.csv"] = root / "utf16.csv", root / "binary.csv"
    return out


def _result_folders(root: Path) -> dict[str, Path]:
    out = {}
    for name in ("good", "other", "mixed", "truncated", "not-parquet", "config-list"):
        folder = root / f"results-{name}"
        frame = to_frame([Record("prune", 1, "m", "random", "prune.gap_auc", 0.1, 0, "abc")], name)
        save_results(frame, {"run_id": name}, folder)
        out[name] = folder
    (out["mixed"] / "config.json").write_bytes((out["good"] / "config.json").read_bytes())
    parquet = out["truncated"] / "results.parquet"
    parquet.write_bytes(parquet.read_bytes()[:40])
    (out["not-parquet"] / "results.parquet").write_text("not parquet")
    (out["config-list"] / "config.json").write_text("[]")
    return out


def _misc(root: Path) -> dict[str, Path]:
    (root / "a-file").write_text("x")
    (root / "seed-text").write_text("my secret seed")
    (root / "seed-dir").mkdir()
    sub = root / "submission-dup"
    sub.mkdir()
    (sub / "submission.json").write_text('{"method": "a", "method": "b"}')
    (root / "submission-empty").mkdir()
    precious = root / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    return {"file": root / "a-file", "seed-text": root / "seed-text", "seed-dir": root / "seed-dir",
            "submission-dup": sub, "submission-empty": root / "submission-empty", "precious": precious,
            "under-file": root / "a-file" / "out", "long": root / ("x" * 300), "proc": Path("/proc/nb-x"),
            "missing": root / "missing"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-inputs")
    return {"model": _model_folders(root), "data": _data_files(root), "results": _result_folders(root),
            "misc": _misc(root)}


def _argv(draw, inputs: dict, out_root: Path) -> list[str]:
    pick = lambda *options: draw(st.sampled_from(options))  # noqa: E731
    models = [str(p) for p in inputs["model"].values()] + ["no-such-model", ""]
    data = [str(p) for p in inputs["data"].values()] + ["no-such-data", str(inputs["misc"]["missing"])]
    results = [str(p) for p in inputs["results"].values()] + [str(inputs["misc"]["file"]), str(inputs["misc"]["missing"])]
    misc = inputs["misc"]
    outs = [str(misc[k]) for k in ("file", "under-file", "long", "proc", "precious")] + [
        str(out_root / f"out-{draw(st.integers(0, 3))}")]
    numbers = ["-5", "0", "1", "3", "abc", "1e309", "nan", ""]
    verb = pick("collect", "models", "explain", "run", "regress", "report", "leaderboard", "validate", "score",
                "cache")
    if verb == "models":
        return ["models", pick(*models)]
    if verb in ("collect", "explain"):
        argv = [verb, "--model", pick(*models), "--data", pick(*data)]
        for flag, values in (("--limit", numbers), ("--out", outs), ("--split", ["train", "all", "nope"]),
                             ("--sites", ["ffn", "resid.0", "ffn.9", "x"]), ("--text-column", ["text", "sentence"]),
                             ("--format", ["csv", "json", "tagged", "text", "xml"])):
            if draw(st.booleans()):
                argv += [flag, pick(*values)]
        if verb == "collect" and draw(st.booleans()):
            argv += ["--topk", pick(*numbers)]
        if verb == "explain":
            argv += ["--method", pick("random", "activation", "nosuch", "os:path", "no.module:X", "")]
        return argv
    if verb == "run":
        argv = ["run", "--quick", "--no-report", "--tasks", pick("prune", "ppl-trend", "nosuch"),
                "--methods", pick("random", "activation", "nosuch", "os:path")]
        if draw(st.booleans()):
            argv = ["run", "--resume", pick(*results, *outs)]
        return argv + ["--out", pick(*outs)] + (["--item-timeout", pick(*numbers)] if draw(st.booleans()) else [])
    if verb == "regress":
        argv = ["regress", pick(*results), "--against", pick(*results)]
        if draw(st.booleans()):
            argv += ["--tolerance", pick(*numbers)]
        if draw(st.booleans()):
            argv += ["--tolerances", pick(*data, str(misc["seed-dir"]))]
        return argv
    if verb == "report":
        return ["report", pick(*results)] + (["--out", pick(*outs)] if draw(st.booleans()) else [])
    if verb == "leaderboard":
        return ["leaderboard", "build", pick(*results), "--out", pick(*outs)]
    submissions = [str(misc["submission-dup"]), str(misc["submission-empty"]), str(misc["file"]), str(misc["missing"])]
    if verb == "validate":
        return ["submit", "validate", pick(*submissions)]
    if verb == "score":
        return ["submit", "score", pick(*submissions), "--out", pick(*outs), "--split", "hidden",
                "--hidden-seed-file", pick(str(misc["seed-text"]), str(misc["seed-dir"]), str(misc["missing"]))]
    return ["cache", "ls"]


def test_no_traceback_reaches_stderr_without_verbose(inputs, tmp_path, monkeypatch, isolated_home):
    def no_work(task, spec, method, env):  # a fuzzed `run` must not run the suite
        raise RuntimeError("fuzz: items are not run")

    monkeypatch.setattr(runner, "run_one", no_work)
    ran, statuses = [0], {}

    @FUZZ
    @given(st.data())
    def case(data):
        argv = _argv(data.draw, inputs, tmp_path)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse rejected the arguments
                code = exit_.code
        ran[0] += 1
        statuses[code] = statuses.get(code, 0) + 1
        assert code in (0, 1, 2), (argv, code, err.getvalue())
        assert "Traceback" not in err.getvalue(), (argv, err.getvalue())
        assert "my secret seed" not in err.getvalue()

    case()
    assert (inputs["misc"]["precious"] / "thesis.tex").read_text() == "keep me"
    print(f"CLI fuzz: {ran[0]} cases, exit statuses {dict(sorted(statuses.items()))}")
    assert ran[0] >= min(CASES, 50)
