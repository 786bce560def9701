"""`ppl-trend`: do a method's stage changes track perplexity improvement over training? (TX-Ray RQ1)

The harness measures each checkpoint's perplexity on PTB valid; the method scores how much neuron
knowledge changed between consecutive checkpoints from PTB train text (never the scoring text);
the task correlates the two over the consecutive pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from neuronbench.harness.engine import catalogue
from neuronbench.harness.engine.catalogue import ModelRef
from neuronbench.harness.engine.data import load, subsample
from neuronbench.harness.engine.method import Method, MethodContext, Provides, call_verb
from neuronbench.harness.engine.metrics import kendall, spearman
from neuronbench.harness.suite.task import RunEnv, Takes, TaskParams, TaskSpec, record, register_task
from neuronbench.harness.zoo.train import lm_loss, token_stream

@dataclass(frozen=True)
class Params(TaskParams):
    """ppl-trend's parameters.

    Attributes:
        valid_tokens: first tokens of PTB valid whose perplexity each checkpoint is scored on.
        seq_len: tokens per scoring chunk (at least 2: one context token, one predicted).
        method_lines: train lines the method reads (a seeded subsample).
        bootstrap: bootstrap resamples of each interval.
    """

    valid_tokens: int
    seq_len: int
    method_lines: int
    bootstrap: int

    def __post_init__(self) -> None:
        for name in ("valid_tokens", "seq_len", "method_lines", "bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "seq_len" else 1):
                raise ValueError(f"ppl-trend: {name}={value!r} must be a positive integer (seq_len at least 2)")


SPEC = TaskSpec(
    name="ppl-trend", version=1, verb="stage_change", model="ptb-lm", data="ptb", sites="ffn",
    headline="ppl-trend.spearman", no_skill=0.0,
    params=Params(valid_tokens=50_000, seq_len=64, method_lines=1000, bootstrap=1000),
    quick=(("model", "ptb-lm-tiny"), ("valid_tokens", 512), ("seq_len", 16), ("method_lines", 40),
           ("bootstrap", 200)),
    description="Spearman/Kendall of stage change vs log-perplexity improvement between checkpoints",
    takes=Takes(models=("trajectory",)))


@torch.no_grad()
def chunk_losses(model, valid_ids: torch.Tensor, seq_len: int, batch_size: int = 64) -> torch.Tensor:
    """Summed next-token loss of each `seq_len` block of the validation stream: (n_blocks,)."""
    blocks = valid_ids[: len(valid_ids) // seq_len * seq_len].view(-1, seq_len)
    out = []
    for start in range(0, len(blocks), batch_size):
        x = blocks[start:start + batch_size].to(model.device)
        out.append(lm_loss(model.model, x, "none").view(x.shape[0], -1).sum(1).cpu())
    return torch.cat(out).double()


def valid_stream(tokenizer, n_tokens: int, seq_len: int, env: RunEnv, split_seed: int) -> torch.Tensor:
    """The scoring text: PTB valid, lines joined with <eos> (as the zoo measures it).

    Public split: its first `n_tokens`. Hidden split: as many `seq_len` blocks drawn with the
    scorer's secret seed from the rest of PTB valid (see `RunEnv.scoring_rows`)."""
    stream = token_stream(tokenizer, list(load("ptb").splits["dev"]["text"]))
    if env.split == "public":
        return stream[:n_tokens]
    blocks = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
    rows = env.scoring_rows(len(blocks), max(1, n_tokens // seq_len), split_seed)
    return blocks[torch.as_tensor(rows)].reshape(-1)


def _correlations(changes: np.ndarray, losses: np.ndarray, tokens_per_block: int, idx=None, pairs=None):
    """Spearman and Kendall of stage change vs log-perplexity improvement (optionally resampled)."""
    sel = losses if idx is None else losses[:, idx]
    log_ppl = sel.sum(1) / (sel.shape[1] * tokens_per_block)
    improvement = log_ppl[:-1] - log_ppl[1:]
    x, y = (changes, improvement) if pairs is None else (changes[pairs], improvement[pairs])
    return spearman(x, y), kendall(x, y)


@register_task(SPEC, Params, Provides(gradients=True))
def score(spec: TaskSpec, method: Method, env: RunEnv) -> list:
    steps = catalogue.steps(spec.model)
    models = [env.model(str(ModelRef.at_step(spec.model, s))) for s in steps]
    p = Params.of(spec)
    corpus = load("ptb", seed=spec.split_seed)
    text = subsample(corpus.splits["train"], p.method_lines, seed=spec.split_seed)
    changes = []
    for before, after in zip(models[:-1], models[1:]):
        ctx = MethodContext(after, after.sites(spec.sites), text, f"{corpus.fingerprint}:train:{len(text)}",
                            seed=env.seed, parent=before, cache=env.cache)
        out = call_verb(method, "stage_change", ctx)
        changes.append(float(out))
    seq_len = p.seq_len
    def measure():
        valid = valid_stream(models[0].tokenizer, p.valid_tokens, seq_len, env, spec.split_seed)
        return torch.stack([chunk_losses(m, valid, seq_len) for m in models]).numpy()  # (C, blocks)

    losses = env.memo(("ppl-trend", spec.fingerprint(), env.split), measure)
    changes_np = np.array(changes)
    rho, tau = _correlations(changes_np, losses, seq_len - 1)
    rng = np.random.default_rng(env.seed)
    boot = [_correlations(changes_np, losses, seq_len - 1, rng.integers(0, losses.shape[1], losses.shape[1]),
                          rng.integers(0, len(changes), len(changes))) for _ in range(p.bootstrap)]
    out = []
    for i, name in enumerate(("spearman", "kendall")):
        vals = np.array([b[i] for b in boot])
        vals = vals[np.isfinite(vals)]
        lo, hi = (float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))) if len(vals) else (None, None)
        value = (rho, tau)[i]
        out.append(record(spec, method.name, f"ppl-trend.{name}", None if math.isnan(value) else value,
                          env.seed, ci_low=lo, ci_high=hi))
    log_ppl = losses.sum(1) / (losses.shape[1] * (seq_len - 1))
    for step, change in zip(steps[1:], changes):
        out.append(record(spec, method.name, "ppl-trend.stage_change", change, env.seed, k=float(step)))
    for step, lp in zip(steps, log_ppl):
        out.append(record(spec, method.name, "ppl-trend.valid_ppl", float(math.exp(lp)), env.seed, k=float(step)))
    return out
