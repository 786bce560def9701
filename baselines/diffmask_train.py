"""DiffMask's training discipline, as the authors' code trains its gates: RMSprop inside Lookahead
with a warm-up, a Lagrange multiplier per gated layer, the KL budget checked on a dev split and the
sparsest checkpoint that meets it kept; and the cache of trained position gates."""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from neuronbench.harness.engine.batching import Batch
from neuronbench.harness.engine.hooks import site_hooks
from neuronbench.harness.engine.models import LoadedModel
from neuronbench.harness.engine.objective import frozen, gradient_batches, run

log = logging.getLogger(__name__)

LAGRANGE_MAX = 200.0


@dataclass(frozen=True)
class DiffMaskConfig:
    """Training settings: the authors' values (nicola-decao/diffmask, `run_sst_diffmask.py` and
    `sentiment_classification_sst_diffmask.py`) unless said otherwise.

    Attributes:
        steps: optimisation steps per gated layer (position mode) or per call (neuron mode).
            NeuronBench's budget for 2 CPU cores; the authors train 300 epochs of SST (thousands
            of steps per layer). On minilm-polarity every layer's train KL settles at eps_train
            by step 75-100 and its dev checks meet eps from then on (two single checks at
            0.107 and 0.115 excepted); the keep probability plateaus by step 100-150 at layers
            1-3 but was still moving at layer 0 (0.80 at step 125, 0.53 at 250, 0.66 at 300).
            300 steps and 12 dev checks took 10-13 min a layer on 2 CPU cores shared with other
            jobs (load 13-17; 4 min for the top layer at load 5-10), built once and cached.
        max_steps: training goes on past `steps`, a dev check at a time, until a dev check meets
            the budget, `max_steps` at most (the authors' fixed 300 epochs need no such rule).
        batch: examples per step (authors: 64; 32 here halves a step's cost on 2 CPU cores, and the
            step count, not the batch, limits what the gates learn in this budget).
        max_tokens: padded tokens per step at most (a step may hold fewer than `batch` examples).
        eps: the KL budget the gates promise on examples they never trained on: the sparsest
            checkpoint whose mean dev KL(original || masked) <= eps is kept (authors: 0.1, their
            training constraint; their dev check accepts 0.8 with 75% prediction agreement).
        eps_train: the constraint the multiplier enforces on the training batches' mean KL
            (authors: eps itself). Half of eps here, so that the dev check can hold: a Lagrangian
            holds the *train* batches' mean KL at its constraint, and an amortized gate's KL on
            unseen examples sits above it; at eps_train = eps every dev check of the tiny test
            model after convergence read 0.107-0.125, and only a transient checkpoint from before
            convergence passed (the authors' 8x looser dev rule hides this gap). On
            minilm-polarity at eps_train = 0.05 the dev checks after step 50 read 0.032-0.115
            while the train KL's running mean stayed near 0.05.
        lr_gate: the gate network's learning rate (authors: 3e-4).
        warmup: linear warm-up steps of `lr_gate` (authors: 1200 steps of one run that draws one of
            num_layers + 2 gated layers per step, about 150 per layer for MiniLM's 8, a few % of
            each layer's steps; 100 here, a third of this shorter budget).
        lr_neuron_gates: learning rate of neuron mode's per-neuron log_alpha (NeuronBench's
            extension: a free parameter, not a network output scaled by 10, so it needs more).
        learn_baseline: train the replacement vector from its start (the train-split mean) at
            `lr_baseline`; off by default so the gates learn the intervention the `erasure` task
            scores (the authors learn it at 1e-3).
        lr_baseline: learning rate of the replacement vector when it is learned (authors: 1e-3).
        lr_lagrange: learning rate of the multiplier's ascent (authors: 0.3, one per layer).
        lookahead_k: fast steps between Lookahead's slow updates (authors: 6).
        lookahead_alpha: how far the slow weights move toward the fast ones (authors: 0.5).
        eval_every: steps between dev checks (authors: once an epoch).
        dev_fraction: share of the train split held out as the dev split (at most `max_dev`).
        max_dev: dev examples at most.
        init_log_alpha: initial log_alpha of neuron gates (5: open, like the gate network's bias).
    """

    steps: int = 300
    max_steps: int = 600
    batch: int = 32
    max_tokens: int = 4096
    eps: float = 0.1
    eps_train: float = 0.05
    lr_gate: float = 3e-4
    warmup: int = 100
    lr_neuron_gates: float = 0.1
    learn_baseline: bool = False
    lr_baseline: float = 1e-3
    lr_lagrange: float = 0.3
    lookahead_k: int = 6
    lookahead_alpha: float = 0.5
    eval_every: int = 25
    dev_fraction: float = 0.1
    max_dev: int = 256
    init_log_alpha: float = 5.0

    def __post_init__(self) -> None:
        if self.max_steps < self.steps:
            raise ValueError(f"diffmask max_steps={self.max_steps} must be >= steps={self.steps}")
        if self.steps < 1 or self.eval_every < 1 or self.batch < 1:
            raise ValueError(f"diffmask needs steps, eval_every and batch >= 1, got steps={self.steps}, "
                             f"eval_every={self.eval_every}, batch={self.batch}")
        if not 0 < self.dev_fraction < 1:
            raise ValueError(f"diffmask dev_fraction={self.dev_fraction!r} must lie in (0, 1), e.g. 0.1")
        if not 0 < self.eps_train <= self.eps:
            raise ValueError(f"diffmask eps_train={self.eps_train!r} must lie in (0, eps={self.eps!r}]: the "
                             "training constraint holds the gates below the budget checked on the dev split")


class Lookahead:
    """Lookahead (Zhang et al., 2019) around an inner optimiser: every `k` steps the slow weights
    move `alpha` of the way to the fast weights, and the fast weights restart from them."""

    def __init__(self, inner: torch.optim.Optimizer, k: int = 6, alpha: float = 0.5):
        self.inner, self.k, self.alpha, self.steps = inner, k, alpha, 0
        self.slow = [[p.detach().clone() for p in g["params"]] for g in inner.param_groups]

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()
        self.steps += 1
        if self.steps % self.k:
            return
        for group, slow in zip(self.inner.param_groups, self.slow):
            for p, s in zip(group["params"], slow):
                s.add_(p - s, alpha=self.alpha)
                p.copy_(s)


class LagrangeMultiplier(nn.Module):
    """The multiplier of the constraint `violation <= 0`, trained by gradient ascent in [0, 200].

    Its gradient in `multiplier(violation).backward()` is the mean violation, so `ascend` raises it
    while the constraint is violated and lowers it (to 0 at least) once it holds. RMSprop without
    momentum inside Lookahead, as in the authors' code: it turns as soon as the sign does.
    """

    def __init__(self, lr: float = 0.3, init: float = 1.0, k: int = 6, alpha: float = 0.5):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(init)))
        self._opt = Lookahead(torch.optim.RMSprop([self.value], lr=lr, maximize=True), k, alpha)

    def forward(self, violation: torch.Tensor) -> torch.Tensor:
        return self.value * violation

    def ascend(self) -> None:
        self._opt.step()
        self._opt.zero_grad()
        with torch.no_grad():
            self.value.clamp_(0.0, LAGRANGE_MAX)
            for slow in self._opt.slow[0]:
                slow.clamp_(0.0, LAGRANGE_MAX)


def kl_per_example(logits_orig: torch.Tensor, logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) KL(original || masked) of the output distribution; for a causal LM, of the next-token
    distribution averaged over the example's real tokens."""
    log_p, log_q = torch.log_softmax(logits_orig.float(), -1), torch.log_softmax(logits.float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if kl.dim() == 1:
        return kl
    mask = attention_mask.to(kl.dtype)
    return (kl * mask).sum(1) / mask.sum(1).clamp(min=1)


@dataclass
class Fit:
    """A finished training run.

    Attributes:
        state: the selected checkpoint's state_dict (the sparsest that met the dev budget, else
            the one with the lowest dev KL).
        curves: `step`, `kl`, `l0`, `lagrange` per training step (batch means); `dev_step`,
            `dev_kl`, `dev_l0` per dev check.
        selected_step: the step of the selected checkpoint.
        met: whether any dev check met the budget.
        seconds: wall time.
    """

    state: dict
    curves: dict[str, list[float]]
    selected_step: int
    met: bool
    seconds: float
    summary: dict = field(default_factory=dict)


def batches_with_logits(loaded: LoadedModel, data, cfg: DiffMaskConfig, include_special: bool):
    """The batches of `data` (fixed, length-sorted), each with the unmasked model's logits (a
    classifier's are computed once here; a causal LM's, too large to keep, per step)."""
    out = []
    for batch, _ in gradient_batches(loaded, data, cfg.max_tokens, cfg.batch, include_special=include_special):
        logits = None
        if loaded.kind == "classifier":
            with torch.no_grad():
                logits = run(loaded, batch).logits.float()
        out.append((batch, logits))
    return out


def _masked_pass(loaded: LoadedModel, gates: nn.Module, batch: Batch, logits_orig, generator):
    """(kl_B, l0_B) of one batch under freshly drawn gates."""
    if logits_orig is None:
        with torch.no_grad():
            logits_orig = run(loaded, batch).logits
    gates.prepare(batch)
    with site_hooks(loaded.model, gates.site_fns(generator)):
        logits = run(loaded, batch).logits
    return kl_per_example(logits_orig, logits, batch.attention_mask), gates.l0(batch)


def evaluate(loaded: LoadedModel, gates: nn.Module, batches, seed: int) -> tuple[float, float]:
    """Mean dev KL and mean expected L0 per example, under gate draws that repeat at every check."""
    gen = torch.Generator(device=loaded.device).manual_seed(seed)
    kls, l0s = [], []
    with torch.no_grad():
        for batch, logits_orig in batches:
            kl_B, l0_B = _masked_pass(loaded, gates, batch, logits_orig, gen)
            kls.append(kl_B)
            l0s.append(l0_B)
    return float(torch.cat(kls).mean()), float(torch.cat(l0s).mean())


def _step(loaded: LoadedModel, gates: nn.Module, batch_logits, generator, optimisers, eps: float):
    """One descent step of the gates and one ascent step of the multiplier; (mean KL, mean L0)."""
    opt, schedule, lagrange = optimisers
    kl_B, l0_B = _masked_pass(loaded, gates, *batch_logits, generator)
    loss = (lagrange(kl_B - eps) + l0_B).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    schedule.step()
    lagrange.ascend()
    return float(kl_B.detach().mean()), float(l0_B.detach().mean())


def _optimiser(gates: nn.Module, cfg: DiffMaskConfig, lr: float):
    named = list(gates.named_parameters())
    groups = [{"params": [p for n, p in named if not n.startswith("baseline")], "lr": lr}]
    learned = [p for n, p in named if n.startswith("baseline") and p.requires_grad]
    if learned:
        groups.append({"params": learned, "lr": cfg.lr_baseline})
    inner = torch.optim.RMSprop(groups, centered=True)
    warm = max(1, cfg.warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: min(1.0, (s + 1) / warm))
    return Lookahead(inner, cfg.lookahead_k, cfg.lookahead_alpha), schedule


def fit_gates(loaded: LoadedModel, train_b: list, dev_b: list, gates: nn.Module, cfg: DiffMaskConfig,
              seed: int, lr: float) -> Fit:
    """Minimise alpha * (KL(original || masked) - eps_train) + expected L0 over the gates on
    `train` (model frozen, in eval mode), check the budget eps on `dev` every `cfg.eval_every`
    steps, and keep the sparsest checkpoint whose dev KL is within eps. Training runs `cfg.steps`
    steps, then on (up to `cfg.max_steps`) until a dev check meets the budget.

    Args:
        train_b, dev_b: `batches_with_logits` of the training and the dev split.
        gates: a module with `prepare(batch)`, `site_fns(generator)`, `l0(batch)` and parameters
            named `baseline*` for the replacement values; trained at `lr`.
    """
    start = time.perf_counter()
    order_gen = torch.Generator().manual_seed(seed)
    sample_gen = torch.Generator(device=loaded.device).manual_seed(seed + 1)
    opt, schedule = _optimiser(gates, cfg, lr)
    lagrange = LagrangeMultiplier(cfg.lr_lagrange, k=cfg.lookahead_k, alpha=cfg.lookahead_alpha).to(loaded.device)
    curves: dict[str, list[float]] = {k: [] for k in ("step", "kl", "l0", "lagrange", "dev_step", "dev_kl", "dev_l0")}
    best: tuple[tuple, dict, int] | None = None
    order: list[int] = []
    loaded.model.eval()  # the authors' explainer runs the model in eval mode (no dropout)
    with frozen(loaded.model), torch.inference_mode(False), torch.enable_grad():
        for step in range(1, cfg.max_steps + 1):
            if not order:
                order = torch.randperm(len(train_b), generator=order_gen).tolist()
            kl, l0 = _step(loaded, gates, train_b[order.pop()], sample_gen, (opt, schedule, lagrange), cfg.eps_train)
            for key, value in (("step", step), ("kl", kl), ("l0", l0), ("lagrange", float(lagrange.value.detach()))):
                curves[key].append(value)
            if step % cfg.eval_every and step not in (cfg.steps, cfg.max_steps):
                continue
            dev_kl, dev_l0 = _dev_check(loaded, gates, dev_b, seed + 2, curves, step)
            # Met checkpoints rank by L0; unmet ones only by KL, below every met one.
            rank = (0, dev_l0) if dev_kl <= cfg.eps else (1, dev_kl)
            if best is None or rank < best[0]:
                best = (rank, copy.deepcopy(gates.state_dict()), step)
            if step >= cfg.steps and dev_kl <= cfg.eps:
                break
    return _finish(best, curves, cfg, (train_b, dev_b), time.perf_counter() - start)


def _dev_check(loaded: LoadedModel, gates: nn.Module, dev_b: list, seed: int, curves: dict, step: int):
    dev_kl, dev_l0 = evaluate(loaded, gates, dev_b, seed)
    for key, value in (("dev_step", step), ("dev_kl", dev_kl), ("dev_l0", dev_l0)):
        curves[key].append(value)
    return dev_kl, dev_l0


def _finish(best: tuple, curves: dict, cfg: DiffMaskConfig, splits: tuple[list, list], seconds: float) -> Fit:
    met = best[0][0] == 0
    if not met:
        log.warning("diffmask: no dev check met the KL budget eps=%s in %d steps; keeping the checkpoint "
                    "with the lowest dev KL (%.3f)", cfg.eps, len(curves["step"]), best[0][1])
    at = curves["dev_step"].index(best[2])
    summary = {"dev_kl": curves["dev_kl"][at], "dev_l0": curves["dev_l0"][at], "selected_step": best[2],
               "met": met, "steps": len(curves["step"]), "n_train": sum(len(b.indices) for b, _ in splits[0]),
               "n_dev": sum(len(b.indices) for b, _ in splits[1])}
    return Fit(best[1], curves, best[2], met, seconds, summary)


def split_train_dev(data, cfg: DiffMaskConfig, seed: int):
    """(train, dev): a seeded `dev_fraction` of `data` (at most `max_dev`, at least 1) held out."""
    n = len(data)
    if n < 2:
        raise ValueError(f"diffmask needs at least 2 training examples to hold out a dev split, got {n}")
    n_dev = min(cfg.max_dev, max(1, round(cfg.dev_fraction * n)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return data.select(sorted(perm[n_dev:])), data.select(sorted(perm[:n_dev]))


def save_fit(fit: Fit, folder: Path) -> dict:
    """Write the checkpoint and the curves (JSON, drawn by the report) into `folder`; returns the summary."""
    torch.save(fit.state, folder / "gate.pt")
    (folder / "curves.json").write_text(json.dumps(fit.curves))
    return {**fit.summary, "seconds": round(fit.seconds, 1)}
