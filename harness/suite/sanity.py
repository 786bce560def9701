"""Sanity checks: can each task's headline tell a real method from noise?

Stored verdicts (one JSON per task fingerprint under `<home>/sanity/`) let every table flag a task
that failed its own check.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import datasets
import polars as pl
import torch

from ..engine.cache import Cache
from ..engine.data import permute_labels
from ..engine.method import Method, MethodContext, get_method
from ..engine.models import LoadedModel
from ..engine.records import per_k_last, save_results, to_frame
from .runner import RunConfig, resolve_spec, run_one
from .task import TASKS, RunEnv, Task, TaskSpec
from .report import text_table
from .verdicts import store_verdict


# --------------------------------------------------------------------------- perturbed methods

# The method each task's sanity check perturbs, by verb, unless the task names its own: one that
# shows skill on the real model, so that a drop to chance under perturbation means something.
REFERENCE = {"relevance": "lca", "descriptors": "contrast", "stage_change": "weight-distance",
             "attribute_positions": "gradxact"}
# Tasks where the verb's reference has no skill on the real model. probe: lca at NeuroX's lambda
# (its default, issue 19) scores -0.011 [-0.042, +0.016] on probe.tmb_gap@10, so its checks were
# vacuous; probeless scores +0.137 [+0.113, +0.160] (full scale, seed 0).
TASK_REFERENCE = {"probe": "probeless"}
CHECKS = ("random", "reference", "reinit", "permuted")


def reinitialised(loaded: LoadedModel, seed: int) -> LoadedModel:
    """A copy of `loaded` with every weight re-drawn by the model's own initialiser (seeded by
    `seed` and the model's name, so two checkpoints get different draws)."""
    model = copy.deepcopy(loaded.model)
    digest = hashlib.sha256(f"{seed}:{loaded.name}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    if not hasattr(model, "_init_weights"):
        raise ValueError(f"{loaded.name}: the model has no `_init_weights`; cannot re-initialise it")
    model.apply(model._init_weights)
    model.eval()
    return LoadedModel(model=model, tokenizer=loaded.tokenizer, name=f"{loaded.name}~reinit", source=loaded.source,
                       kind=loaded.kind, revision=loaded.revision)


def permuted_labels(data: datasets.Dataset, seed: int) -> datasets.Dataset:
    """`data` with its labels shuffled within the split (`data.permute_labels`), seeded by `seed`."""
    return permute_labels(data, (seed, 7))


class Perturbed(Method):
    """`inner`, asked through a perturbed context: a re-initialised model (`reinit`) or labels
    permuted within the split (`permuted`). The harness still scores on the real model and data."""

    def __init__(self, inner: Method, mode: str, seed: int):
        if mode not in ("reinit", "permuted"):
            raise ValueError(f"perturbation {mode!r}: use reinit or permuted")
        self.inner, self.mode, self.seed, self._models = inner, mode, seed, {}
        self.name = f"{inner.name}~{mode}"
        self.needs = inner.needs

    def supports(self, verb: str) -> bool:
        return self.inner.supports(verb)

    def _model(self, loaded: LoadedModel | None) -> LoadedModel | None:
        if loaded is None:
            return None
        if id(loaded) not in self._models:
            self._models[id(loaded)] = (loaded, reinitialised(loaded, self.seed))
        return self._models[id(loaded)][1]

    def _ctx(self, ctx: MethodContext) -> MethodContext:
        if self.mode == "reinit":
            return replace(ctx, model=self._model(ctx.model), parent=self._model(ctx.parent))
        return replace(ctx, data=permuted_labels(ctx.data, self.seed), data_id=f"{ctx.data_id}~permuted:{self.seed}")

    def relevance(self, ctx):
        return self.inner.relevance(self._ctx(ctx))

    def stage_change(self, ctx):
        return self.inner.stage_change(self._ctx(ctx))

    def descriptors(self, ctx, vocabulary):
        return self.inner.descriptors(self._ctx(ctx), vocabulary)

    def attribute_positions(self, ctx, layer):
        return self.inner.attribute_positions(self._ctx(ctx), layer)


# --------------------------------------------------------------------------- the check

@dataclass(frozen=True)
class Check:
    """One sanity measurement of a task's headline."""

    task: str
    check: str
    method: str
    value: float | None
    ci_low: float | None
    ci_high: float | None
    no_skill: float

    @property
    def at_chance(self) -> bool:
        """The interval covers the no-skill value (an undefined headline, e.g. a correlation of
        constant scores, counts as chance)."""
        if self.value is None:
            return True
        if self.ci_low is None or self.ci_high is None:
            return math.isclose(self.value, self.no_skill, abs_tol=1e-9)
        return self.ci_low <= self.no_skill <= self.ci_high

    @property
    def verdict(self) -> str:
        if self.check == "reference":
            return "skill" if self.value is not None and not self.at_chance and self.value > self.no_skill else "no skill"
        if self.check == "permuted" and self.method.endswith("(n/a)"):
            return "n/a"
        if self.check == "random":  # no skill either way: the interval must cover the no-skill value
            return "chance" if self.at_chance else "FAIL"
        # A perturbed method fails when skill survives (its interval lies above no skill); one
        # whose interval lies below has lost its skill too, and is reported as such.
        if self.at_chance:
            return "chance"
        return "FAIL" if self.value > self.no_skill else "below chance"

    def describe(self) -> str:
        ci = "" if self.ci_low is None else f" [{self.ci_low:+.3f}, {self.ci_high:+.3f}]"
        value = "undefined" if self.value is None else f"{self.value:+.3f}"
        return f"{self.check}: {self.method} {value}{ci} vs no-skill {self.no_skill:+.3f}"


def _headline(frame: pl.DataFrame, spec: TaskSpec, check: str, method: str) -> Check:
    row = per_k_last(frame.filter((pl.col("metric") == spec.headline) & (pl.col("method") == method)))
    if row.is_empty():
        return Check(spec.name, check, f"{method} (n/a)", None, None, None, spec.no_skill)
    r = row.row(0, named=True)
    return Check(spec.name, check, method, r["value"], r["ci_low"], r["ci_high"], spec.no_skill)


def surviving_metrics(frame: pl.DataFrame, reference: str, perturbed: str) -> list[str]:
    """Every metric (`name` or `name@k`) on which `perturbed` keeps `reference`'s skill.

    Chance for a metric is what the `random` method gets. The reference has skill where its value
    lies outside random's interval; the skill survives where the perturbed method's interval lies
    wholly beyond random's, on the same side (random is noisy too: its interval, not its value).
    Metrics without intervals are not judged.
    """
    keys = ["metric", "k"]

    def of(method: str, tag: str) -> pl.DataFrame:
        rows = frame.filter((pl.col("method") == method) & pl.col("value").is_not_null()
                            & pl.col("ci_low").is_not_null() & pl.col("ci_high").is_not_null())
        return rows.select(*keys, *(pl.col(c).alias(f"{c}_{tag}") for c in ("value", "ci_low", "ci_high")))

    both = of("random", "r").join(of(reference, "ref"), on=keys, nulls_equal=True) \
        .join(of(perturbed, "p"), on=keys, nulls_equal=True)
    up = (pl.col("value_ref") > pl.col("ci_high_r")) & (pl.col("ci_low_p") > pl.col("ci_high_r"))
    down = (pl.col("value_ref") < pl.col("ci_low_r")) & (pl.col("ci_high_p") < pl.col("ci_low_r"))
    kept = both.filter(up | down).sort(keys, nulls_last=False)
    return [m if k is None or m.endswith(f"@{k:g}") else f"{m}@{k:g}" for m, k in zip(kept["metric"], kept["k"])]


def check_task(task: Task, spec: TaskSpec, env: RunEnv,
               reference: str | Method | None = None) -> tuple[list[Check], list]:
    """Run the four sanity measurements of one task; returns the checks and all their records.

    Args:
        reference: the method to perturb (a name or an instance); default the task's `TASK_REFERENCE`, else `REFERENCE[spec.verb]`.
    """
    if not isinstance(reference, Method):
        reference = get_method(reference or TASK_REFERENCE.get(spec.name) or REFERENCE[spec.verb])
    ref = reference
    methods = {"random": get_method("random"), "reference": ref,
               "reinit": Perturbed(ref, "reinit", env.seed)}
    if ref.needs.labels:
        methods["permuted"] = Perturbed(ref, "permuted", env.seed)
    records = []
    for method in methods.values():
        records.extend(run_one(task, spec, method, env))
    frame = to_frame(records, "sanity")
    checks = [_headline(frame, spec, check, m.name) for check, m in methods.items()]
    if "permuted" not in methods:
        checks.append(Check(spec.name, "permuted", f"{ref.name} uses no labels (n/a)", None, None, None, spec.no_skill))
    return checks, records


def surviving(checks: list[Check], records: list) -> dict[str, list[str]]:
    """Perturbation check -> the metrics on which it keeps the reference's skill (see
    `surviving_metrics`): what the headline's verdict leaves out."""
    frame = to_frame(records, "sanity")
    reference = next(c.method for c in checks if c.check == "reference")
    return {c.check: surviving_metrics(frame, reference, c.method) for c in checks
            if c.check in ("reinit", "permuted") and not c.method.endswith("(n/a)")}


def run_sanity(config: RunConfig, progress: bool = True) -> tuple[list[Check], pl.DataFrame, dict]:
    """The sanity check of every selected task (`config.tasks`, all when empty); records and
    verdicts are written to `config.out` when set, verdicts always to the NeuronBench home."""
    tasks = [TASKS.get(n) for n in (config.tasks or TASKS.names())]
    env = RunEnv(seed=config.seed, quick=config.quick, cache=Cache(), progress=progress)
    reference = config.methods[0] if config.methods else None
    checks, records, verdicts = [], [], {}
    for task in tasks:
        spec = resolve_spec(task, config)
        if progress:
            print(f"[sanity] {spec.name} ...", flush=True)
        task_checks, task_records = check_task(task, spec, env, reference)
        checks += task_checks
        records += task_records
        verdicts[spec.name] = store_verdict(spec, task_checks, surviving(task_checks, task_records))
    run_id = uuid.uuid4().hex[:12]
    frame = to_frame(records, run_id)
    run_config = {"run_id": run_id, "kind": "sanity", "config": asdict(config), "verdicts": verdicts,
                  "fingerprints": {name: v["fingerprint"] for name, v in verdicts.items()}}
    if config.out:
        save_results(frame, run_config, Path(config.out))
    return checks, frame, run_config


def checks_table(checks: list[Check]) -> pl.DataFrame:
    return pl.DataFrame([{"task": c.task, "check": c.check, "method": c.method,
                          "value": c.value, "ci_low": c.ci_low, "ci_high": c.ci_high,
                          "no_skill": c.no_skill, "verdict": c.verdict} for c in checks])


def _cli(args) -> int:
    config = RunConfig(tasks=tuple(args.tasks or ()), methods=(args.reference,) if args.reference else (),
                       quick=args.quick, seed=args.seed, out=args.out)
    checks, _, run_config = run_sanity(config)
    print(text_table(checks_table(checks)))
    for task, verdict in run_config["verdicts"].items():
        for check, metrics in verdict["surviving_metrics"].items():
            if metrics:
                shown = ", ".join(metrics[:8]) + (f" and {len(metrics) - 8} more" if len(metrics) > 8 else "")
                print(f"{task}: skill survives the {check} check on {shown}")
    failed = {t: v["failures"] for t, v in run_config["verdicts"].items() if not v["passed"]}
    for task, failures in failed.items():
        print(f"SANITY FAILED {task}: " + "; ".join(failures))
    # A reference without skill makes its reinit and permuted checks vacuous: say so, never a bare pass.
    vacuous = [t for t, v in run_config["verdicts"].items() if v["reference_skill"] == "no skill"]
    for task in vacuous:
        print(f"{task}: inconclusive: the reference shows no skill on the headline, so its reinit and permuted "
              "checks cannot show a drop; rerun with --reference METHOD (one with skill on this task)")
    verdict = "all tasks pass their sanity checks" if not failed else f"{len(failed)} task(s) failed"
    print(verdict + (f" ({len(vacuous)} inconclusive: {', '.join(vacuous)})" if vacuous else ""))
    return 1 if failed else 0


def add_sanity_parser(sub) -> None:
    p = sub.add_parser("sanity", help="check that every task's headline drops to chance for noise")
    p.add_argument("--tasks", nargs="+", help="task names (default: all)")
    p.add_argument("--reference", help="the method to perturb (default: one per task or verb, see sanity.TASK_REFERENCE, REFERENCE)")
    p.add_argument("--quick", action="store_true", help="tiny models, fewer k, seeds and examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for the sanity records (results.parquet, config.json)")
    p.set_defaults(fn=_cli)
