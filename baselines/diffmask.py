"""`diffmask`: DiffMask (De Cao et al., EMNLP 2020): learn hard-concrete gates that mask as much as
possible while the masked model's output distribution stays within KL `eps` of the original's."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from neuronbench.baselines.diffmask_train import (LAGRANGE_MAX, DiffMaskConfig, Fit, LagrangeMultiplier,
                                                  batches_with_logits, fit_gates, save_fit, split_train_dev)
from neuronbench.harness.engine.activations import collect_cached
from neuronbench.harness.engine.batching import Batch
from neuronbench.harness.engine.cache import Cache, data_fingerprint
from neuronbench.harness.engine.collect import CollectConfig
from neuronbench.harness.engine.hooks import site_hooks
from neuronbench.harness.engine.method import Method, MethodContext, Needs, NeuronScores, register_method
from neuronbench.harness.engine.objective import gradient_batches, require_task_head, run
from neuronbench.harness.engine.sites import Site

__all__ = ["DiffMask", "DiffMaskConfig", "LAGRANGE_MAX", "LagrangeMultiplier", "NeuronGates", "PositionGate",
           "expected_l0", "hard_concrete_sample"]

log = logging.getLogger(__name__)

# The paper's hard concrete: binary concrete at temperature 0.2, stretched to (-0.2, 1.0), clamped.
BETA, STRETCH_L, STRETCH_R = 0.2, -0.2, 1.0


def hard_concrete_sample(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reparameterised gate samples in [0, 1], with point masses at exactly 0 and 1."""
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (STRETCH_R - STRETCH_L) + STRETCH_L).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(gate != 0), closed form: sigmoid(log_alpha - beta * log(-l / r))."""
    return torch.sigmoid(log_alpha - BETA * math.log(-STRETCH_L / STRETCH_R))


class NeuronGates(nn.Module):
    """One input-independent gate per neuron of each site (log_alpha is a parameter, not a network).

    A closed gate replaces the neuron with its baseline value at every token of an example; one
    gate sample is drawn per example and neuron (shared across its tokens).
    """

    def __init__(self, baselines: dict[Site, torch.Tensor], init_log_alpha: float, learn_baseline: bool):
        super().__init__()
        self.sites = tuple(baselines)
        values = list(baselines.values())
        self.log_alpha = nn.ParameterList([nn.Parameter(torch.full_like(b, init_log_alpha)) for b in values])
        self.baseline = nn.ParameterList([nn.Parameter(b.clone(), requires_grad=learn_baseline) for b in values])
        self._batch = 0

    def prepare(self, batch: Batch) -> None:
        self._batch = batch.input_ids.shape[0]

    def site_fns(self, generator: torch.Generator):
        def make(i: int):
            def fn(acts: torch.Tensor) -> torch.Tensor:
                z = hard_concrete_sample(self.log_alpha[i].expand(acts.shape[0], 1, -1), generator)
                return z * acts + (1 - z) * self.baseline[i]
            return fn
        return {site: make(i) for i, site in enumerate(self.sites)}

    def l0(self, batch: Batch) -> torch.Tensor:
        """(B,) expected fraction of open gates (the same for every example)."""
        return torch.cat([expected_l0(la) for la in self.log_alpha]).mean().expand(batch.input_ids.shape[0])


class PositionGate(nn.Module):
    """The authors' hidden-state gate: per position, log_alpha = 10 tanh(g(h)) + b from the hidden
    state h at the gated layer (their `DiffMaskGateHidden` with `MLPMaxGate`).

    g is a weight-normalised MLP (hidden -> hidden/4 -> 1, tanh); b starts at 5 (gates open). A
    closed gate replaces the hidden state at that position with `baseline`. Only the positions the
    batch counts (word tokens; special tokens stay) are gated, as the `erasure` task masks them.
    """

    def __init__(self, site: Site, baseline: torch.Tensor, learn_baseline: bool):
        super().__init__()
        self.site = site
        hidden = baseline.shape[-1]
        width = max(1, hidden // 4)
        self.g = nn.Sequential(weight_norm(nn.Linear(hidden, width)), nn.Tanh(),
                               weight_norm(nn.Linear(width, 1, bias=False)), nn.Tanh())
        self.bias = nn.Parameter(torch.tensor(5.0))
        self.baseline = nn.Parameter(baseline.detach().clone().float(), requires_grad=learn_baseline)
        self.last_log_alpha: torch.Tensor | None = None
        self._gated: torch.Tensor | None = None

    def log_alpha(self, hidden_BTH: torch.Tensor) -> torch.Tensor:
        return self.g(hidden_BTH.float()).squeeze(-1) * 10.0 + self.bias

    def prepare(self, batch: Batch) -> None:
        B, T = batch.input_ids.shape
        self._gated = batch.view.weight.view(B, T) > 0  # (B, T) the counted positions

    def site_fns(self, generator: torch.Generator):
        def fn(acts: torch.Tensor) -> torch.Tensor:
            # The gate reads the unmasked hidden state; the model's own graph is not trained.
            self.last_log_alpha = self.log_alpha(acts.detach())  # (B, T)
            z = hard_concrete_sample(self.last_log_alpha, generator)
            z = torch.where(self._gated, z, torch.ones_like(z)).unsqueeze(-1).to(acts.dtype)
            return z * acts + (1 - z) * self.baseline.to(acts.dtype)
        return {self.site: fn}

    def l0(self, batch: Batch) -> torch.Tensor:
        """(B,) mean expected L0 over each example's gated positions (from the last forward pass)."""
        mask = self._gated.to(self.last_log_alpha.dtype)
        return (expected_l0(self.last_log_alpha) * mask).sum(1) / mask.sum(1).clamp(min=1)


@register_method("diffmask")
class DiffMask(Method):
    """DiffMask: what can be masked (replaced by a baseline) without changing the output.

    attribute_positions (position mode, the paper's hidden-state DiffMask, amortized): a gate
        network reads the hidden state at `resid.layer` and gates each word position. It is trained
        once per (model, layer, training split, config, seed) on `ctx.train`, the model's own
        training split (a seeded `dev_fraction` of it held out as the dev split), and cached; then
        it predicts gates for `ctx.data`, which it never trained on. A position's score is its
        expected keep probability (expected L0). The artifact (checkpoint, training curves as JSON
        (drawn in the report), dev KL and L0 of the selected step) sits in the cache folder, `kind` =
        `diffmask-position-gate`. Without `ctx.train` it trains on `ctx.data` instead (the
        per-example search the paper replaces; logged).
    relevance (neuron mode, NeuronBench's extension, not in the paper): one input-independent
        gate per neuron of `ctx.sites`, all sites gated together, trained on `ctx.data` by the same
        `fit_gates` (optimiser, warm-up, multiplier, train constraint, dev check, selection; a dev
        split held out of `ctx.data`), at its own learning rate `lr_neuron_gates`; cached like the
        position gates, under the content of `ctx.data` (`ctx.data_id`, else its fingerprint), the
        sites, the model's weights, the config and the seed (`kind` = `diffmask-neuron-gates`), so a
        rerun on the same data does not retrain. A neuron's score is P(gate open) = expected L0. Its
        baseline is the neuron's mean on `ctx.data`.
    Training: minimise alpha * (KL(original || masked) - eps_train) + expected L0, the multiplier
    alpha ascended by RMSprop inside Lookahead (lr 0.3, clamped to [0, 200]); the gates by centred
    RMSprop inside Lookahead (lr 3e-4 with a linear warm-up); every `eval_every` steps the dev KL
    and L0 are measured and the sparsest checkpoint whose dev KL <= eps is kept; past `steps`,
    training goes on until a dev check meets eps (`max_steps` at most). The model is frozen, in eval
    mode. A `base` model has no output distribution to preserve: NoObjectiveError (not applicable).

    Departures from the authors' code (nicola-decao/diffmask), with reasons:
    - the replacement vector is the layer's train-split mean hidden state over word tokens, fixed,
      not a learned vector: it is exactly what the `erasure` task writes into masked positions, so
      the gates learn the intervention they are scored under (`learn_baseline=True` learns it from
      that start at the authors' 1e-3);
    - special tokens are never gated, as `erasure` never masks them (the authors gate [CLS] too);
    - the L0 term is the expected L0 itself, as in the paper (the code minimises its log);
    - one training run per layer with its own multiplier and optimiser, where the code draws one
      of all layers per step in a single run; the warm-up (1200 steps there, about 150 a layer for
      MiniLM's 8) is 100 steps per layer here;
    - `steps` (300 per layer) and `batch` (32) are a budget for 2 CPU cores, not the code's 300
      epochs of SST at batch 64;
    - batches are length-sorted groups (at most `batch` examples and `max_tokens` tokens) drawn in
      a seeded order each epoch, not freshly shuffled examples;
    - the dev check is KL <= eps (0.1); the code accepts dev KL <= 0.8 with >= 75% agreement.
      So that it can hold, the multiplier enforces eps_train = eps / 2 on the training batches
      (the code: eps itself): a Lagrangian holds the train batches' mean KL at its constraint and
      the gates' KL on unseen examples sits above it (see `DiffMaskConfig.eps_train`);
    - past `steps`, training goes on until a dev check meets eps (`max_steps` at most), where the
      code trains a fixed 300 epochs;
    - the gate reads only the gated layer (the code's hidden mode), with `resid.l` = the output of
      block l (the code's hidden_states[l + 2]); there is no input-embedding mode.

    Args:
        **settings: fields of `DiffMaskConfig` (e.g. `steps=1000`).
    """

    name = "diffmask"
    needs = Needs(gradients=True, train_budget=DiffMaskConfig.steps)

    def __init__(self, **settings):
        self.cfg = DiffMaskConfig(**settings)
        self.history: dict[str, list[float]] = {}
        self.summary: dict = {}
        self._batches: dict[tuple, tuple[list, list]] = {}

    def _split_batches(self, ctx: MethodContext, data, data_id: str, include_special: bool) -> tuple[list, list]:
        """(train, dev) batches with the unmasked logits, computed once per model and split: every
        layer's gate trains on the same ones."""
        key = (ctx.model.fingerprint(), data_id, ctx.seed, include_special)
        if key not in self._batches:
            fit_on, dev = split_train_dev(data, self.cfg, ctx.seed)
            self._batches = {key: tuple(batches_with_logits(ctx.model, d, self.cfg, include_special)
                                        for d in (fit_on, dev))}
        return self._batches[key]

    def settings(self) -> dict:
        """The config only: `history` and `summary` are the last fit's curves, not settings."""
        return {"cfg": asdict(self.cfg)}

    def relevance(self, ctx: MethodContext) -> NeuronScores:
        require_task_head(ctx.model, "diffmask")
        index = ctx.index
        data_id = ctx.data_id or data_fingerprint(ctx.data)
        parts = {"kind": "diffmask-neuron-gates", "method": self.name, "model": ctx.model.fingerprint(),
                 "model_name": ctx.model.name, "sites": [str(s) for s in index.sites], "data": data_id,
                 "config": asdict(self.cfg), "seed": ctx.seed}

        def build() -> NeuronGates:
            moments = ctx.collect(("moments",))
            baselines = {s: moments[s].moments.mean.to(ctx.model.device).float() for s in index.sites}
            return NeuronGates(baselines, self.cfg.init_log_alpha, self.cfg.learn_baseline).to(ctx.model.device)

        def train_gates(gates: NeuronGates) -> Fit:
            train_b, dev_b = self._split_batches(ctx, ctx.data, data_id, include_special=True)
            return fit_gates(ctx.model, train_b, dev_b, gates, self.cfg, ctx.seed, self.cfg.lr_neuron_gates)

        last = f" .. {index.sites[-1]}" if len(index.sites) > 1 else ""
        title = f"{ctx.model.name} neurons of {index.sites[0]}{last}"
        gates, self.history, self.summary = cached_gate(ctx.cache or Cache(), parts, build, train_gates, title,
                                                        self.cfg)
        with torch.no_grad():
            scores = {s: expected_l0(la).cpu() for s, la in zip(gates.sites, gates.log_alpha)}
        return NeuronScores(index, index.concat(scores))

    def attribute_positions(self, ctx: MethodContext, layer: int) -> list[torch.Tensor]:
        require_task_head(ctx.model, "diffmask")
        gate = self.position_gate(ctx, layer)
        return self._keep_probabilities(ctx, gate)

    def position_gate(self, ctx: MethodContext, layer: int) -> PositionGate:
        """The trained gate network of `resid.layer` (from the cache, trained there on a miss)."""
        site = Site.resid(layer)
        ctx.model.width(site)  # an out-of-range layer fails before any work
        train, train_id = ctx.train, ctx.train_id
        if train is None:
            log.info("diffmask: the task offers no training split; training the gates on the examples asked about")
            train, train_id = ctx.data, ctx.data_id
        train_id = train_id or data_fingerprint(train)
        sites = ctx.sites if site in ctx.sites else (site,)
        cfg_means = CollectConfig(sites=sites, stats=("moments",))
        parts = {"kind": "diffmask-position-gate", "method": self.name, "model": ctx.model.fingerprint(), "model_name": ctx.model.name,
                 "layer": layer, "train": train_id, "config": asdict(self.cfg), "seed": ctx.seed}

        def baseline() -> torch.Tensor:
            col, _ = collect_cached(ctx.model, train, cfg_means, data_id=train_id, label_names=ctx.label_names,
                                    cache=ctx.cache, progress=False)
            return col[site].moments.mean.float()

        def build() -> PositionGate:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.seed)  # the gate network's initialisation
                return PositionGate(site, baseline(), self.cfg.learn_baseline).to(ctx.model.device)

        def train_gate(gate: PositionGate) -> Fit:
            train_b, dev_b = self._split_batches(ctx, train, train_id, include_special=False)
            return fit_gates(ctx.model, train_b, dev_b, gate, self.cfg, ctx.seed, self.cfg.lr_gate)

        gate, self.history, self.summary = cached_gate(ctx.cache or Cache(), parts, build, train_gate,
                                                       f"{ctx.model.name} resid.{layer}", self.cfg)
        return gate

    def _keep_probabilities(self, ctx: MethodContext, gate: PositionGate) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [torch.zeros(0)] * len(ctx.data)

        def read(acts: torch.Tensor) -> None:
            gate.last_log_alpha = gate.log_alpha(acts)

        for batch, _ in gradient_batches(ctx.model, ctx.data, self.cfg.max_tokens, self.cfg.batch):
            with torch.no_grad(), site_hooks(ctx.model.model, {gate.site: read}):
                run(ctx.model, batch)
            keep_BT = expected_l0(gate.last_log_alpha).float().cpu()
            lengths = batch.attention_mask.sum(1).tolist()
            for b, i in enumerate(batch.indices):
                out[i] = keep_BT[b, : lengths[b]].clone()
        return out


def curves_description(title: str, summary: dict, cfg: DiffMaskConfig) -> dict:
    """How the report draws a gate's `curves.json` (see `report.trained_artifacts`)."""
    verdict = "met" if summary["met"] else "NOT met"
    return {"name": title, "title": f"{title}: kept step {summary['selected_step']}, dev KL {summary['dev_kl']:.3f} "
                     f"(budget {cfg.eps}, {verdict}), dev keep {summary['dev_l0']:.3f}, {summary['seconds']:.0f} s",
            "panels": [["kl", "KL(original || masked)"], ["l0", "expected L0 (keep probability)"],
                       ["lagrange", "Lagrange multiplier"]],
            "lines": {"kl": [[cfg.eps, "dev budget eps"], [cfg.eps_train, "train constraint"]]},
            "marked_step": summary["selected_step"], "log_panels": ["kl"]}


def cached_gate(cache: Cache, parts: dict, build: Callable[[], nn.Module], train: Callable[[nn.Module], Fit],
                title: str, cfg: DiffMaskConfig):
    """(gate, curves, summary): the gate for `parts` from `cache`, trained and stored on a miss."""
    gate = build()

    def write(folder) -> dict:
        fit = train(gate)
        summary = save_fit(fit, folder)
        return {"summary": summary, "curves": curves_description(title, summary, cfg)}

    entry, hit = cache.get_or_put(parts, write)
    gate.load_state_dict(torch.load(entry.path / "gate.pt", map_location=next(gate.parameters()).device))
    curves = json.loads((entry.path / "curves.json").read_text())
    summary = entry.meta["summary"]
    log.info("diffmask %s: %s gate (step %s, dev KL %.4f, dev L0 %.3f)", title, "cached" if hit else "trained",
             summary["selected_step"], summary["dev_kl"], summary["dev_l0"])
    return gate, curves, summary
