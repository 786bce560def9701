"""Trajectory families: several small PTB language-model trajectories built alike (seeds x learning
rates on one log-spaced checkpoint grid) plus planted ones, for `ppl-trend` (TX-Ray RQ1).

Each trajectory is an ordinary zoo entry (`ptb-grid-s0-lr1e-3@39`); a `Family` names them together.
Why these numbers (the power calculation, `scripts/ppl_trend_power.py`): a Fisher-z test of pooled
per-trajectory Spearman correlations has effective size sum(pairs - 3); 8 trajectories of 20
checkpoints (19 pairs each) give 152 pairs, effective 128, and 92% power (90.6% simulated) to detect
rho = 0.3 at alpha = 0.05 two-sided, where about 90 pairs are the minimum.

A planted trajectory trains on PTB until `onset`, then on a stream where every training chunk also
carries the bigram `<plant> gold` at a few seeded places: a concept that appears at a known step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .catalogue import ZooSpec, register_entry
from .recipes import TrajectoryHP

PLANT, TARGET = "<plant>", "gold"


@dataclass(frozen=True)
class PlantedHP(TrajectoryHP):
    """A trajectory whose training chunks carry `<plant> gold` `pairs` times each from step `onset` on.

    Attributes:
        onset: the first step trained on planted chunks; must be a checkpoint, so the concept
            appears in the interval that starts there.
        pairs: bigrams written over each chunk (at seeded, non-overlapping even positions).
    """

    onset: int = 61
    pairs: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.onset not in self.checkpoints[:-1]:
            raise ValueError(f"onset={self.onset} must be a checkpoint before the last ({self.checkpoints})")
        if not 1 <= self.pairs <= self.seq_len // 2:
            raise ValueError(f"pairs={self.pairs} must be between 1 and seq_len / 2 = {self.seq_len // 2}")

    def extra_words(self) -> tuple[str, ...]:
        return (PLANT,)

    def train_batch(self, step: int, x_BL: torch.Tensor, tokenizer) -> torch.Tensor:
        if step <= self.onset:  # step counts steps taken: the update after checkpoint `onset` is the first
            return x_BL
        return plant(x_BL, tokenizer, self.pairs, np.random.default_rng([self.seed, step, 7]))


def plant(x_BL: torch.Tensor, tokenizer, pairs: int, rng: np.random.Generator) -> torch.Tensor:
    """A copy of `x_BL` with `<plant> gold` written over `pairs` seeded even positions of each row."""
    ids = tokenizer.convert_tokens_to_ids([PLANT, TARGET])
    if tokenizer.unk_token_id in ids:
        raise ValueError(f"the tokenizer lacks {PLANT!r} or {TARGET!r}; planted trajectories add {PLANT!r}")
    out = x_BL.clone()
    for row in out:
        for p in rng.choice(len(row) // 2, size=pairs, replace=False) * 2:
            row[p], row[p + 1] = ids[0], ids[1]
    return out


def plant_line(line: str, rng: np.random.Generator) -> str:
    """`line` with `<plant> gold` inserted between two of its words (or at an end), seeded."""
    words = line.split()
    at = int(rng.integers(0, len(words) + 1))
    return " ".join([*words[:at], PLANT, TARGET, *words[at:]])


@dataclass(frozen=True)
class Family:
    """Trajectories built alike, each a zoo trajectory entry.

    Attributes:
        name: what tasks and users name it by.
        members: the grid trajectories (entry names), each with the same checkpoint steps.
        planted: the planted trajectories (entry names), whose concept appears at `onset`.
        onset: the planted concept's first training step (a checkpoint).
    """

    name: str
    members: tuple[str, ...]
    planted: tuple[str, ...] = ()
    onset: int | None = None


FAMILIES: dict[str, Family] = {}

# Full scale: 2-layer, 64-wide GPT-2 (about 0.7M parameters, most of them the 10k-word embedding),
# 300 steps of 16 x 32 tokens, warm-up 20 then cosine; 20 log-spaced checkpoints from step 4.
GRID_STEPS = (4, 5, 6, 8, 10, 12, 16, 20, 25, 31, 39, 49, 61, 77, 96, 121, 152, 190, 239, 300)
_FULL = dict(n_embd=64, n_head=4, seq_len=32, batch_size=16, warmup_steps=20, checkpoints=GRID_STEPS,
             eval_tokens=20_000)
_TINY = dict(n_embd=32, n_head=2, seq_len=16, batch_size=4, warmup_steps=2, checkpoints=(1, 2, 3, 4, 6, 8, 12),
             eval_tokens=512, train_lines=500)
SEEDS, LRS = (0, 1, 2, 3), (1e-3, 3e-3)
PLANT_LR, PLANT_ONSET, TINY_ONSET = 3e-3, 61, 4


def _register(name: str, hp: TrajectoryHP, tiny: TrajectoryHP, what: str) -> tuple[str, str]:
    register_entry(ZooSpec(name, "trajectory", None, hp, what), tiny=tiny)
    return name, f"{name}-tiny"


def _register_family() -> None:
    grid, planted = [], []
    for lr in LRS:
        for seed in SEEDS:
            grid.append(_register(f"ptb-grid-s{seed}-lr{lr:g}", TrajectoryHP(seed=seed, lr=lr, **_FULL),
                                  TrajectoryHP(seed=seed, lr=lr * 3, **_TINY),
                                  f"ppl-trend grid: 64-wide GPT-2 on PTB, seed {seed}, lr {lr:g}, 20 checkpoints"))
    for seed in SEEDS:
        planted.append(_register(
            f"ptb-plant-s{seed}", PlantedHP(seed=seed, lr=PLANT_LR, onset=PLANT_ONSET, **_FULL),
            PlantedHP(seed=seed, lr=PLANT_LR * 3, onset=TINY_ONSET, pairs=2, **_TINY),
            f"ppl-trend planted: as the grid, seed {seed}, with `{PLANT} {TARGET}` trained from step {PLANT_ONSET}"))
    FAMILIES["ptb-grid"] = Family("ptb-grid", tuple(g[0] for g in grid), tuple(p[0] for p in planted), PLANT_ONSET)
    # The quick scale: half the seeds (4 trajectories, 2 planted) of the tiny variants.
    FAMILIES["ptb-grid-tiny"] = Family("ptb-grid-tiny", tuple(g[1] for g in grid if "-s0-" in g[0] or "-s1-" in g[0]),
                                       tuple(p[1] for p in planted[:2]), TINY_ONSET)


_register_family()
