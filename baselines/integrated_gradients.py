"""`integrated-gradients`: Integrated Gradients (Sundararajan et al., 2017) at each neuron site."""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from neuronbench.harness.engine.batching import Batch
from neuronbench.harness.engine.data import subsample
from neuronbench.harness.engine.hooks import site_hooks
from neuronbench.harness.engine.intervene import copied_forward
from neuronbench.harness.engine.method import Method, MethodContext, Needs, NeuronScores, register_method
from neuronbench.harness.engine.models import LoadedModel
from neuronbench.harness.engine.objective import (Target, neuron_relevance, objective, position_scores,
                                                  require_task_head, run)
from neuronbench.harness.engine.sites import Site

log = logging.getLogger(__name__)


RULES = ("midpoint", "gausslegendre")


def path_nodes(steps: int, rule: str = "midpoint") -> tuple[np.ndarray, np.ndarray]:
    """The quadrature nodes alpha in (0, 1) and their weights (summing to 1) of the path integral:
    `midpoint` (alpha = (k + 1/2) / steps, equal weights; the IG paper's Riemann sum) or
    `gausslegendre` (Gauss-Legendre nodes mapped to (0, 1); Captum's default, exact for polynomials
    of degree up to 2 * steps - 1)."""
    if steps < 1:
        raise ValueError(f"integrated gradients needs at least 1 step, got {steps}")
    if rule == "midpoint":
        return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return (x + 1) / 2, w / 2
    raise ValueError(f"unknown IG quadrature rule {rule!r}; use one of {RULES}")


def integrated_gradients(loaded: LoadedModel, batch: Batch, target: Target | torch.Tensor | None, site: Site,
                         steps: int = 16, baseline: torch.Tensor | None = None,
                         prefix_once: bool = True, rule: str = "midpoint") -> torch.Tensor:
    """IG of the objective w.r.t. one site's activations: (B, T, N).

    The site is replaced by `baseline + alpha * (act - baseline)` at the `steps` nodes of the
    quadrature `rule` (`path_nodes`), all in one pass over `steps` copies of the batch; IG =
    (act - baseline) * sum_k w_k grad(alpha_k). Completeness: the sum over tokens and neurons is
    approximately objective(act) - objective(site set to the baseline at every token).

    Args:
        target: the batch's `Target` (from `gradient_batches`: what the objective explains).
        baseline: (N,) value of every neuron at every token on the path's start; None = zero.
        prefix_once: the blocks before the site are the same on every copy: run them once on the
            plain batch and copy from there (`intervene.copied_forward`): from the block after
            `resid.L`, from block L for `ffn.L` (its FFN sits inside it). The same attributions up
            to float rounding; a model whose output is not one row per copy copies the inputs.
    """
    nodes, weights = path_nodes(steps, rule)
    alphas = torch.as_tensor(nodes, dtype=torch.float32, device=loaded.device)
    B = batch.input_ids.shape[0]
    state: dict[str, torch.Tensor] = {}

    def fn(acts: torch.Tensor) -> torch.Tensor:
        # acts: the plain batch (B rows) where the copies begin after this site, else `steps`
        # identical copies (copy-major): copy 0 is the batch either way.
        base = torch.zeros((), device=acts.device) if baseline is None else baseline.to(acts.device)
        state["delta"] = acts.detach()[:B] - base.to(acts.dtype)
        # The path points are leaves: only this site's gradient is wanted, nothing upstream.
        state["path"] = (base + alphas.view(-1, 1, 1, 1) * state["delta"]).to(acts.dtype).requires_grad_()
        return state["path"].reshape(steps * B, *acts.shape[1:])

    first = site.layer + 1 if site.kind == "resid" else site.layer
    with site_hooks(loaded.model, {site: fn}):
        out = copied_forward(loaded, batch, steps, first) if prefix_once and steps > 1 and first > 0 else None
        obj = objective(loaded, out if out is not None else run(loaded, batch, steps), batch, target)
    (grad_KBTN,) = torch.autograd.grad(obj.sum(), [state["path"]])
    w = torch.as_tensor(weights, dtype=grad_KBTN.dtype, device=grad_KBTN.device)
    return state["delta"] * torch.einsum("k,kbtn->btn", w, grad_KBTN)


BASELINES = ("mean", "zero")
# steps="auto": the quadratures tried on a site's first batch, cheapest first; the first whose
# completeness error is under AUTO_TOLERANCE for AUTO_QUANTILE of the batch's examples is kept for
# the site, and the last is kept when none is (see `IntegratedGradients`).
AUTO_LADDER = (("gausslegendre", 4), ("gausslegendre", 8), ("midpoint", 16))
AUTO_TOLERANCE, AUTO_QUANTILE = 0.05, 0.9


def baseline_gap(loaded: LoadedModel, batch: Batch, target, site: Site,
                 baseline: torch.Tensor | None) -> torch.Tensor:
    """Per example, objective(input) - objective(site at its baseline at every token): what IG's
    sum over tokens and neurons approximates (completeness)."""
    base = torch.zeros((), device=loaded.device) if baseline is None else baseline.to(loaded.device)
    with torch.no_grad():
        full = objective(loaded, run(loaded, batch), batch, target)
        with site_hooks(loaded.model, {site: lambda a: base.to(a.dtype).expand_as(a)}):
            return full - objective(loaded, run(loaded, batch), batch, target)


def completeness_error(ig_BTN: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """Per example, |sum of IG - gap| / |gap| (`baseline_gap`; the gap clamped at 1e-6)."""
    return (ig_BTN.detach().sum((1, 2)).float() - gap).abs() / gap.abs().clamp_min(1e-6)


@register_method("integrated-gradients")
class IntegratedGradients(Method):
    """Integrated Gradients of the task's objective (`ctx.objective`, see `harness.engine.objective`)
    at each site.

    Baseline (path start): by default each neuron's mean activation over `ctx.data` (the
    harness's mean ablation), so IG splits objective(act) - objective(mean-ablated site) over
    tokens and neurons. `zero` is the textbook choice but breaks completeness at a post-LayerNorm
    residual site: the next LayerNorm is scale invariant, so objective(alpha * h) has a jump at
    alpha = 0 that no path integral sees. Each site gets its own path (only that site moves).

    relevance: per neuron, mean over every real token (special tokens included) of |IG|.
    attribute_positions: per position, the signed sum over hidden dims of IG at `resid.layer`.
    `ctx.concept` is not used.

    Args:
        steps: "auto" (the default) or a number of path nodes. "auto" picks a quadrature per
            site on the site's first batch, from `AUTO_LADDER`: Gauss-Legendre with 4 nodes (Captum's
            default rule), then with 8, then the IG paper's midpoint Riemann sum with 16 steps; the
            first whose completeness error |sum IG - gap| / |gap| is under 5% (Sundararajan et
            al.'s check) for 90% of the batch's examples, the last when none is. The choices are
            kept in `chosen` (site -> (rule, steps, that 90th percentile)). Measured on
            `minilm-polarity` (48 train sentences, mean baseline; `scripts/ig_steps.py`), error
            median / 90th percentile:
            - FFN sites (what `prune` ranks) are smooth paths: Gauss-Legendre with 4 nodes gives
              0.33% / 1.3% at `ffn.0`, 0.02% / 0.09% at `ffn.3`, 0.01% / 0.06% at `ffn.5`, better
              than 16 midpoint steps (0.22% / 1.2%, 0.18% / 0.39%, 0.02% / 0.07%);
            - hidden states (what `erasure` ranks positions by) are not: at `resid.2` 16 midpoint
              steps give 0.35% / 1.6% and 8 Gauss-Legendre nodes 4.0% / 26%; `resid.3` and
              `resid.4` pass at 8 nodes (0.07% / 4.0%, 0.03% / 0.9%); at `resid.0` and `resid.1`
              nothing up to 16 steps is complete (16 midpoint steps: 139% / 721% and 3.7% / 15%;
              `resid.0` needs about 128 steps for 1.3% / 5.5%), but the position ranks of 16
              midpoint steps agree with 128 steps' (mean per-example Spearman 0.996 on 24
              sentences; 16 Gauss-Legendre nodes: 0.941), hence the ladder's last rung. Raising it
              would multiply `erasure`'s cost for ranks that barely move.
            An integer runs that many nodes of `rule` at every site.
        rule: `midpoint` (default) or `gausslegendre`, for an integer `steps`.
        baseline: `mean` or `zero`.
        max_tokens: padded tokens per pass, copies included (a batch is run `steps` times at once;
            under "auto", batches are sized for the ladder's largest step count).
        max_examples: examples `relevance` attributes (a seeded subset; None = all). The baseline
            (path start) is still the mean over all of `ctx.data`.
    """

    name = "integrated-gradients"
    needs = Needs(labels=True, gradients=True)

    def __init__(self, steps: int | str = "auto", baseline: str = "mean", max_tokens: int = 8192,
                 max_examples: int | None = 256, rule: str = "midpoint"):
        if steps != "auto":
            path_nodes(steps, rule)  # checks both
        if baseline not in BASELINES:
            raise ValueError(f"unknown IG baseline {baseline!r}; use one of {BASELINES}")
        self.steps, self.baseline, self.max_tokens, self.max_examples = steps, baseline, max_tokens, max_examples
        self.rule = rule
        self._chosen: dict[Site, tuple[str, int, float | None]] = {}

    @property
    def chosen(self) -> dict[Site, tuple[str, int, float | None]]:
        """The last call's quadrature per site: (rule, steps, the completeness error's 90th
        percentile on the site's first batch; None for an integer `steps`, which is not checked)."""
        return dict(self._chosen)

    def _batch_tokens(self) -> int:
        most = max(n for _, n in AUTO_LADDER) if self.steps == "auto" else self.steps
        return max(1, self.max_tokens // most)

    def _choose(self, loaded: LoadedModel, batch: Batch, target, site: Site,
                baseline: torch.Tensor | None) -> torch.Tensor:
        """A site's first batch under "auto": climb the ladder; returns the attributions kept."""
        gap = baseline_gap(loaded, batch, target, site, baseline)  # the same for every rung
        for rule, steps in AUTO_LADDER:
            ig = integrated_gradients(loaded, batch, target, site, steps, baseline, rule=rule)
            q = float(torch.quantile(completeness_error(ig, gap), AUTO_QUANTILE))
            if q <= AUTO_TOLERANCE or (rule, steps) == AUTO_LADDER[-1]:
                self._chosen[site] = (rule, steps, q)
                log.info("integrated-gradients at %s: %s with %d steps (completeness error, 90th percentile: %.2g)",
                         site, rule, steps, q)
                return ig
        raise AssertionError("unreachable: the ladder's last rung is always kept")

    def _baselines(self, ctx: MethodContext) -> dict[Site, torch.Tensor | None]:
        if self.baseline == "zero":
            return {s: None for s in ctx.sites}
        moments = ctx.collect(("moments",))
        return {s: moments[s].moments.mean.float() for s in ctx.sites}

    def _attribute(self, loaded: LoadedModel, baselines: dict[Site, torch.Tensor | None]):
        fixed = self.steps != "auto"
        self._chosen = {s: (self.rule, self.steps, None) for s in baselines} if fixed else {}

        def one(batch: Batch, target, s: Site) -> torch.Tensor:
            if s not in self._chosen:
                return self._choose(loaded, batch, target, s, baselines[s])
            rule, steps, _ = self._chosen[s]
            return integrated_gradients(loaded, batch, target, s, steps, baselines[s], rule=rule)

        def attribute(batch: Batch, target, sites):
            return {s: one(batch, target, s) for s in sites}
        return attribute

    def relevance(self, ctx: MethodContext) -> NeuronScores:
        """Mean |IG| per neuron over at most `max_examples` examples of `ctx.data` (a subset drawn
        with `ctx.seed`): each site needs `steps` forward and backward passes of its own, so the
        whole 3,200-sentence polarity train split would take about an hour on 2 CPU cores (256: ~5 min)."""
        require_task_head(ctx.model, self.name)
        attribute = self._attribute(ctx.model, self._baselines(ctx))
        if self.max_examples is not None and len(ctx.data) > self.max_examples:
            ctx = replace(ctx, data=subsample(ctx.data, self.max_examples, ctx.seed),
                          data_id=f"{ctx.data_id}:sample{self.max_examples}:{ctx.seed}")
        return neuron_relevance(ctx, attribute, self._batch_tokens())

    def attribute_positions(self, ctx: MethodContext, layer: int) -> list[torch.Tensor]:
        require_task_head(ctx.model, self.name)
        at_layer = replace(ctx, sites=(Site.resid(layer),))
        attribute = self._attribute(ctx.model, self._baselines(at_layer))
        return position_scores(ctx, layer, attribute, self._batch_tokens())
