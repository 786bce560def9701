"""Test helpers for the HTML pages: load a local file in headless Chromium (Debian's, driven by
Playwright) and read what a reader would see; synthetic results of every task and one real
`--quick` run, shared by the report and leaderboard tests.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from neuronbench.harness.engine.records import Record, save_results, to_frame

CHROMIUM_INSTALL = "apt-get install -y chromium"  # with sudo when not root; .ci/run does it
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
QUICK_TASKS = ("prune", "ppl-trend", "descriptors")
QUICK_METHODS = ("random", "txray", "contrast", "activation")  # ~10 s of quick runs; activation is n/a twice

# Everything a test asserts on, read in the page: tables (header texts, each row's cell texts and
# sort keys; `labels` = the first line of each header), images (decoded width), links (resolved
# URL and the raw href).
FACTS_JS = """() => ({
  tables: Array.from(document.querySelectorAll("table")).map(t => ({
    id: t.id,
    headers: Array.from(t.tHead.rows[0].cells).map(c => c.textContent.trim()),
    labels: Array.from(t.tHead.rows[0].cells).map(c => c.firstChild ? c.firstChild.textContent.trim() : ""),
    rows: Array.from(t.tBodies[0].rows).map(r => Array.from(r.cells).map(c => c.textContent.trim())),
    keys: Array.from(t.tBodies[0].rows).map(r => Array.from(r.cells).map(c => c.getAttribute("data-sort"))),
  })),
  images: Array.from(document.images).map(i => ({alt: i.alt, width: i.naturalWidth, complete: i.complete})),
  links: Array.from(document.querySelectorAll("a[href]")).map(a => ({href: a.getAttribute("href"), url: a.href})),
})"""


def chromium_path() -> str:
    """Debian's Chromium, or fail (never skip) naming the install command."""
    path = os.environ.get("NEURONBENCH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(f"the page tests need Chromium: install it with `{CHROMIUM_INSTALL}` "
                    "(or point NEURONBENCH_CHROMIUM at a Chromium binary)", pytrace=False)
    return path


@contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium browser (a Playwright `Browser`), closed on exit."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the page tests need Playwright's Python package: `pip install -e '.[test]'` "
                    "(never `playwright install`: the tests use Debian's Chromium)", pytrace=False)
    path = chromium_path()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, args=LAUNCH_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Loaded:
    """A page loaded from disk: `errors` holds console errors, script errors and any request that
    left the machine (all refused: the pages must open offline)."""

    page: object
    errors: list[str]

    def facts(self) -> dict:
        return self.page.evaluate(FACTS_JS)

    def table(self, table_id: str) -> dict:
        return next(t for t in self.facts()["tables"] if t["id"] == table_id)

    def click_header(self, table_id: str, label: str) -> None:
        self.page.locator(f"#{table_id} thead th", has_text=label).first.click()


def open_page(browser, path: Path) -> Loaded:
    """Load `path` in a new tab, wait for its images, and collect errors."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda err: errors.append(f"script error: {err}"))
    page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}"))

    def offline(route) -> None:
        if route.request.url.startswith(("file:", "data:")):
            route.continue_()
        else:
            errors.append(f"network request: {route.request.url}")
            route.abort()

    page.route("**/*", offline)
    page.goto(Path(path).resolve().as_uri())
    page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=10_000)
    return Loaded(page, errors)


@functools.lru_cache(maxsize=None)
def _quick_run(out: Path) -> Path:
    cmd = [sys.executable, "-m", "neuronbench.harness.cli", "run", "--quick", "--out", str(out),
           "--tasks", *QUICK_TASKS, "--methods", *QUICK_METHODS]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def quick_results(tmp_path_factory) -> Path:
    """A real `neuronbench run --quick` (prune, ppl-trend, descriptors; four methods) through the
    CLI, report included; run once per session however many test files use it."""
    return _quick_run(tmp_path_factory.getbasetemp() / "quick-run")


HEADLINES = {"prune": "prune.gap_auc", "ppl-trend": "ppl-trend.time_controlled", "descriptors": "descriptors.data.p_gap@2",
             "probe": "probe.tmb_gap@10", "erasure": "erasure.comp_gap_mean"}


def _task_metrics(task: str) -> list[tuple[str, float | None]]:
    """(metric, k) of every record a task writes, as its scoring function names them."""
    if task == "prune":
        conds = ("top", "bottom", "random_uniform", "random_matched")
        return [(f"prune.acc_drop.{c}", k) for c in conds for k in (0.01, 0.05, 0.2)] + [("prune.gap_auc", None)]
    if task == "ppl-trend":
        return ([("ppl-trend.valid_ppl", s) for s in (1, 2, 4, 8)] + [("ppl-trend.stage_change", s) for s in (2, 4, 8)]
                + [(f"ppl-trend.{m}", None) for m in ("pooled_spearman", "reference_spearman", "gap", "time_controlled")])
    if task == "descriptors":
        return [(f"descriptors.{t}.{m}@{k}", k) for t in ("data", "planted") for m in ("p", "r", "chance_p", "chance_r", "p_gap")
                for k in (1, 2, 5)]
    if task == "probe":
        return ([(f"probe.{m}.{c}", k) for m in ("acc", "selectivity") for c in ("top", "random", "bottom")
                 for k in (0.01, 0.05, 0.1, 0.2)]
                + [(f"probe.{m}", k) for m in ("top_minus_bottom", "top_minus_bottom.null", "tmb_gap")
                   for k in (0.01, 0.05, 0.1, 0.2)]
                + [("probe.full_accuracy", None), ("probe.tmb_gap@10", None), ("probe.top_minus_bottom@10", None),
                   ("probe.selectivity@10", None)])
    names = ("comprehensiveness", "sufficiency", "random_comprehensiveness", "random_sufficiency", "comp_gap",
             "suff_gap")
    return [(f"erasure.{n}", layer) for n in names for layer in range(6)] + [
        ("erasure.comp_gap_mean", None), ("erasure.suff_gap_mean", None)]


def synthetic_records(tasks=tuple(HEADLINES), methods=("alpha", "beta", "gamma"), n_a=("nope",), split="public",
                      version: int = 1, seed: int = 0) -> list[Record]:
    """Plausible records of every metric of `tasks` for `methods`, and a `not_applicable` record of
    each task for each method in `n_a`."""
    rng = np.random.default_rng(seed)
    out = []
    for task in tasks:
        common = dict(task=task, task_version=version, model="tiny", seed=0, split=split,
                      config_hash=config_hash(task, version))
        for method in methods:
            for metric, k in _task_metrics(task):
                value = float(rng.uniform(0.05, 0.9))
                bare = "chance" in metric or "valid_ppl" in metric  # as the tasks write them
                ci = {} if bare else dict(ci_low=value - 0.05, ci_high=value + 0.05)
                out.append(Record(method=method, metric=metric, value=value, k=None if k is None else float(k), **ci,
                                  **common))
        out += [Record(method=m, metric=f"{task}.not_applicable", value=None, status="not_applicable", **common)
                for m in n_a]
    return out


def config_hash(task: str, version: int = 1) -> str:
    return f"{task[:6]}{version:0>10}"[:16]


def write_results(folder: Path, records: list[Record], run_id: str = "synthetic") -> Path:
    """Save `records` as a results folder, with a config naming each task's headline."""
    tasks = sorted({r.task for r in records})
    config = {"run_id": run_id, "config": {"quick": True, "seed": 0},
              "tasks": {t: {"headline": HEADLINES[t], "description": f"the {t} task"} for t in tasks},
              "fingerprints": {t: next(r.config_hash for r in records if r.task == t) for t in tasks}}
    return save_results(to_frame(records, run_id), config, folder)
