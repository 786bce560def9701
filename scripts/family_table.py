"""Model families x tasks at --quick scale: each family as a tiny random model from its config, saved
as a user's folder, run through every task with the `random` method (plumbing, not skill).

Encoder families run as classifiers (labelled file); decoder families as causal LMs (plain text) and
as classifiers. A cell is `ok` with the task's headline, or the one-line reason it cannot run.
Usage: python scripts/family_table.py OUT_DIR [FAMILY ...]
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from neuronbench.harness.suite.runner import RunConfig, run_suite
from neuronbench.harness.suite.task import TASKS
from neuronbench.harness.zoo.tiny import TINY_FAMILIES, tiny_model

ENCODERS = ("bert", "roberta", "distilbert", "electra")
WORDS = ("the", "cat", "sat", "on", "mat", "a", "dog", "was", "running", "movie", "wonderful", "boring", "plot")


def write_data(root: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 8)) for _ in range(120)]
    labels = [int("wonderful" in t) for t in texts]
    (root / "labelled.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)))
    (root / "plain.txt").write_text("\n".join(texts) + "\n")
    tags = {"the": "DT", "a": "DT", "on": "IN", "was": "VBD", "sat": "VBD", "running": "VBG",
            "wonderful": "JJ", "boring": "JJ"}
    (root / "tags.txt").write_text("\n".join(" ".join(f"{w}/{tags.get(w, 'NN')}" for w in t.split())
                                             for t in texts[:80]) + "\n")
    return {"classifier": str(root / "labelled.csv"), "causal-lm": str(root / "plain.txt"),
            "tokens": str(root / "tags.txt")}


def cell(task: str, folder: str, data: list[str]) -> str:
    spec = TASKS.get(task).spec
    start = time.perf_counter()
    try:
        frame, _ = run_suite(RunConfig(tasks=(task,), methods=("random",), model=folder, data=tuple(data),
                                       quick=True), progress=False)
    except Exception as err:  # noqa: BLE001 (the table names why a cell cannot run)
        return f"no: {str(err).splitlines()[0][:160]}"
    row = frame.filter(frame["metric"] == spec.headline)
    value = row["value"][0] if row.height else None
    return f"ok ({time.perf_counter() - start:.0f} s, {spec.headline} = {value if value is None else round(value, 3)})"


def main(out: str, families: list[str]) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = write_data(root)
        for family in families:
            kinds = ("classifier",) if family in ENCODERS else ("causal-lm", "classifier")
            for kind in kinds:
                model = tiny_model(family, kind)
                folder = root / f"{family}-{kind}"
                model.model.save_pretrained(folder)
                model.tokenizer.save_pretrained(folder)
                data = {"prune": [files[kind]], "erasure": [files[kind]], "probe": [files["tokens"]]}
                results[f"{family} ({kind})"] = row = {t: cell(t, str(folder), data.get(t, []))
                                                       for t in TASKS.names()}
                print(f"{family} ({kind}): " + " | ".join(f"{t}: {v}" for t, v in row.items()), flush=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "family_table.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(TINY_FAMILIES))
