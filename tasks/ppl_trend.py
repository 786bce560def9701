"""`ppl-trend`: do a method's stage changes track perplexity improvement over training? (TX-Ray RQ1)

The harness measures each checkpoint's perplexity on held-out text (PTB valid by default); the
method scores how much neuron knowledge changed between consecutive checkpoints from PTB train text
(never the scoring text). Over several trajectories (a zoo family, or the user's own), per-trajectory
Spearman correlations are pooled by Fisher z, and reported minus `weight-distance`'s (`gap`), since
anything that decays over training tracks perplexity. The headline, `time_controlled`, correlates
change with improvement across trajectories at each interval, which a shared decay cannot win and
where a method without skill scores 0 (a no-skill method's `gap` is minus weight-distance's
correlation, so `gap` cannot be a sanity-checked headline). Planted trajectories add a ground truth:
a concept trained in from a known step.

Protocol: the `ptb-grid` family is 8 trajectories (4 seeds x 2 learning rates of a 2-layer, 64-wide
GPT-2 on PTB, 20 log-spaced checkpoints each: 152 pairs, 92% power for rho = 0.3 by Fisher z,
`scripts/ppl_trend_power.py`). Intervals: a paired bootstrap resampling trajectories and, within
each, the scoring blocks (method and reference see the same replicate). Planted: 4 trajectories
trained on `<plant> gold` from step 61; per interval, the change on text carrying the bigram
(`ctx.labelling = "planted"`) minus the change on plain text; `planted.onset_rank` is the onset
interval's rank among all (0.5 = chance) and `planted.hit` whether it is the peak (chance
`planted.chance_hit`), bootstrapped over the planted trajectories. `--model` also takes a user's
own checkpoints (see `trajectories`), with perplexity text `ppl_text` (PTB valid by default).
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neuronbench.harness.engine import catalogue, zoo_family
from neuronbench.harness.engine.cache import Cache
from neuronbench.harness.engine.data import load, subsample
from neuronbench.harness.engine.method import Method, MethodContext, Provides, call_verb, get_method
from neuronbench.harness.engine.models import LoadedModel, load_model
from neuronbench.harness.engine.pooled import fisher_pool, onset_scores, spearman_rows, time_controlled
from neuronbench.harness.suite.task import RunEnv, Takes, TaskParams, TaskSpec, record, register_task
from neuronbench.harness.zoo.train import token_stream

@dataclass(frozen=True)
class Params(TaskParams):
    """ppl-trend's parameters.

    Attributes:
        valid_tokens: first tokens of the perplexity text each checkpoint is scored on.
        seq_len: tokens per scoring chunk (at least 2: one context token, one predicted).
        method_lines: PTB train lines the method reads (a seeded subsample).
        bootstrap: bootstrap replicates.
        ppl_text: the perplexity text: `ptb` (PTB valid) or a local text file.
        reference: the method whose pooled correlation `gap` subtracts.
    """

    valid_tokens: int
    seq_len: int
    method_lines: int
    bootstrap: int
    ppl_text: str = "ptb"
    reference: str = "weight-distance"

    def __post_init__(self) -> None:
        for name in ("valid_tokens", "seq_len", "method_lines", "bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "seq_len" else 1):
                raise ValueError(f"ppl-trend: {name}={value!r} must be a positive integer (seq_len at least 2)")
        if self.ppl_text != "ptb" and not Path(self.ppl_text).is_file():
            raise ValueError(f"ppl-trend: ppl_text={self.ppl_text!r} is neither `ptb` nor a local text file")


SPEC = TaskSpec(
    name="ppl-trend", version=3, verb="stage_change", model="ptb-grid", data="ptb", sites="ffn",
    headline="ppl-trend.time_controlled", no_skill=0.0,
    params=Params(valid_tokens=20_000, seq_len=32, method_lines=500, bootstrap=1000),
    quick=(("model", "ptb-grid-tiny"), ("valid_tokens", 512), ("seq_len", 16), ("method_lines", 40),
           ("bootstrap", 200)),
    description="Spearman of stage change vs log-ppl improvement across trajectories at each interval, pooled",
    takes=Takes(models=("trajectory",)))


# --------------------------------------------------------------------------- trajectories

@dataclass(frozen=True)
class Trajectory:
    """One training run's checkpoints, in training order.

    Attributes:
        name: how records name it (a zoo entry, or `user<i>`).
        refs: model references (zoo `NAME@STEP`, local folders, `hub-id@revision`).
        steps: the training step of each checkpoint where known, else its position.
        onset: for a planted trajectory, the index of the interval in which its concept appears.
    """

    name: str
    refs: tuple[str, ...]
    steps: tuple[int, ...]
    onset: int | None = None


def trajectories(model: str) -> tuple[list[Trajectory], list[Trajectory]]:
    """(trajectories, planted trajectories) of `model`: a zoo family (`ptb-grid`), one zoo
    trajectory (`ptb-lm`), or the user's own: checkpoints in training order separated by commas,
    trajectories by semicolons, each a local folder or `hub-id@revision` (`a/step-1,a/step-2;b/...`).

    Raises:
        ValueError: a trajectory with fewer than three checkpoints (two intervals).
    """
    family = zoo_family.FAMILIES.get(model)
    if family is not None:
        onset = lambda name: catalogue.get_spec(name).hparams.checkpoints.index(family.onset)  # noqa: E731
        return ([_zoo_trajectory(m) for m in family.members],
                [replace(_zoo_trajectory(p), onset=onset(p)) for p in family.planted])
    if "," not in model and model in {s.name for s in catalogue.entries()} and catalogue.get_spec(model).kind == "trajectory":
        return [_zoo_trajectory(model)], []
    out = []
    for i, part in enumerate(p for p in model.split(";") if p.strip()):
        refs = tuple(r.strip() for r in part.split(",") if r.strip())
        if len(refs) < 3:
            raise ValueError(f"trajectory {part!r} has {len(refs)} checkpoint(s); ppl-trend needs at least 3 in "
                             "training order, comma-separated (a zoo family such as ptb-grid, a zoo trajectory "
                             "such as ptb-lm, or local folders / hub-id@revision names)")
        out.append(Trajectory(f"user{i}", refs, tuple(_step(r, j) for j, r in enumerate(refs))))
    return out, []


def _zoo_trajectory(name: str) -> Trajectory:
    steps = tuple(catalogue.get_spec(name).hparams.checkpoints)
    return Trajectory(name, tuple(f"{name}@{s}" for s in steps), steps)


def _step(ref: str, position: int) -> int:
    """The step a reference names (`...@step1000`, `.../step-000300`), else its position."""
    found = re.search(r"(?:@step|@|step-?)(\d+)/?$", ref)
    return int(found.group(1)) if found else position


def load_checkpoint(env: RunEnv, ref: str) -> LoadedModel:
    """A zoo name or local folder through `env.model`; `hub-id@revision` loaded at that revision."""
    base, at, revision = ref.partition("@")
    if not at or Path(ref).exists() or base in {s.name for s in catalogue.entries()}:
        return env.model(ref)
    return env.memo(("ppl-trend:model", ref), lambda: replace(load_model(base, revision=revision), name=ref))


# --------------------------------------------------------------------------- measuring

@torch.inference_mode()
def chunk_losses(model, valid_ids: torch.Tensor, seq_len: int, batch_tokens: int = 256) -> torch.Tensor:
    """Summed next-token loss of each `seq_len` block of the validation stream: (n_blocks,).

    Small batches and the full logits (contiguous; the last position's target ignored) keep the
    vocabulary-wide logits of a batch in cache and uncopied: most of a small LM's cost."""
    blocks = valid_ids[: len(valid_ids) // seq_len * seq_len].view(-1, seq_len)
    step = max(1, batch_tokens // seq_len)
    out = []
    for start in range(0, len(blocks), step):
        x = blocks[start:start + step].to(model.device)
        logits = model.model(input_ids=x).logits.float()  # (B, L, V)
        target = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], 1)  # nothing after the last
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        out.append(loss.view(x.shape[0], -1).sum(1).cpu())
    return torch.cat(out).double()


def scoring_lines(ppl_text: str) -> list[str]:
    """The perplexity text: `ptb` (PTB valid) or a local text file, one line per line."""
    if ppl_text == "ptb":
        return list(load("ptb").splits["dev"]["text"])
    path = Path(ppl_text)
    if not path.is_file():
        raise FileNotFoundError(f"ppl_text {ppl_text!r}: use `ptb` or a local text file")
    return [line for line in path.read_text().splitlines() if line.strip()]


def valid_stream(tokenizer, n_tokens: int, seq_len: int, env: RunEnv, split_seed: int,
                 ppl_text: str = "ptb") -> torch.Tensor:
    """The scoring text, lines joined with <eos> (as the zoo measures it).

    Public split: its first `n_tokens`. Hidden split: as many `seq_len` blocks drawn with the
    scorer's secret seed from the rest of the text (see `RunEnv.scoring_rows`)."""
    stream = token_stream(tokenizer, scoring_lines(ppl_text))
    if env.split == "public":
        return stream[:n_tokens]
    blocks = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
    rows = env.scoring_rows(len(blocks), max(1, n_tokens // seq_len), split_seed)
    return blocks[torch.as_tensor(rows)].reshape(-1)


def _losses(spec: TaskSpec, env: RunEnv, traj: Trajectory) -> np.ndarray:
    """(checkpoints, blocks) summed loss of each scoring block under each checkpoint (memoised)."""
    def measure():
        params = Params.of(spec)
        models = [load_checkpoint(env, r) for r in traj.refs]
        valid = valid_stream(models[0].tokenizer, params.valid_tokens, params.seq_len, env, spec.split_seed,
                             params.ppl_text)
        return np.stack([_cached_losses(env, m, valid, params.seq_len) for m in models])
    return env.memo(("ppl-trend:losses", spec.fingerprint(), env.split, traj.refs), measure)


def _cached_losses(env: RunEnv, model: LoadedModel, valid: torch.Tensor, seq_len: int) -> np.ndarray:
    """`chunk_losses`, kept in the activation cache under the checkpoint's weights and the scoring
    tokens' content, so every method and rerun shares one pass (public split only: hidden-split
    scores stay in memory)."""
    if env.split != "public":
        return chunk_losses(model, valid, seq_len).numpy()
    parts = {"kind": "ppl-trend:losses", "model": model.fingerprint(), "seq_len": seq_len,
             "tokens": hashlib.sha256(valid.numpy().astype(np.int64).tobytes()).hexdigest()[:24]}

    def write(folder: Path) -> dict:
        np.save(folder / "losses.npy", chunk_losses(model, valid, seq_len).numpy())
        return {}

    entry, _ = (env.cache or Cache()).get_or_put(parts, write)
    return np.load(entry.path / "losses.npy")


def _ask(method: Method, spec: TaskSpec, env: RunEnv, traj: Trajectory, text, text_id: str,
         labelling: str | None = None) -> np.ndarray:
    """The method's stage change for each consecutive pair of `traj`'s checkpoints."""
    models = [load_checkpoint(env, r) for r in traj.refs]
    out = []
    for before, after in zip(models[:-1], models[1:]):
        ctx = MethodContext(after, after.sites(spec.sites), text, text_id, seed=env.seed, parent=before,
                            labelling=labelling, cache=env.cache)
        out.append(float(call_verb(method, "stage_change", ctx)))
    return np.array(out)


def gains(losses: np.ndarray, tokens_per_block: int, idx: np.ndarray | None = None) -> np.ndarray:
    """Log-perplexity improvement between consecutive checkpoints (optionally on resampled blocks)."""
    sel = losses if idx is None else losses[:, idx]
    log_ppl = sel.sum(1) / (sel.shape[1] * tokens_per_block)
    return log_ppl[:-1] - log_ppl[1:]


# --------------------------------------------------------------------------- statistics

def statistics(changes: list[np.ndarray], reference: list[np.ndarray], improvement: list[np.ndarray]) -> dict:
    """Pooled Spearman of the method and of the reference, their gap, and the time-controlled
    correlation (when every trajectory has the same number of intervals; else NaN)."""
    pts = np.array([len(c) for c in changes])
    rho = np.array([spearman_rows(c[None], g[None])[0] for c, g in zip(changes, improvement)])
    ref = np.array([spearman_rows(c[None], g[None])[0] for c, g in zip(reference, improvement)])
    out = {"pooled_spearman": fisher_pool(rho, pts), "reference_spearman": fisher_pool(ref, pts)}
    out["gap"] = out["pooled_spearman"] - out["reference_spearman"]
    same = len(set(pts)) == 1 and len(changes) >= 3
    out["time_controlled"] = time_controlled(np.stack(changes), np.stack(improvement)) if same else math.nan
    return out


def bootstrap(changes, reference, losses, tokens_per_block: int, reps: int, rng) -> dict[str, np.ndarray]:
    """`statistics` on `reps` replicates resampling trajectories and, within each, scoring blocks;
    the method and the reference always see the same replicate (a paired bootstrap)."""
    n = len(changes)
    draws = {k: [] for k in ("pooled_spearman", "reference_spearman", "gap", "time_controlled")}
    for _ in range(reps):
        pick = rng.integers(0, n, n)
        imp = [gains(losses[t], tokens_per_block, rng.integers(0, losses[t].shape[1], losses[t].shape[1]))
               for t in pick]
        stats = statistics([changes[t] for t in pick], [reference[t] for t in pick], imp)
        for k, v in stats.items():
            draws[k].append(v)
    return {k: np.array(v) for k, v in draws.items()}


def _interval(draws: np.ndarray) -> tuple[float | None, float | None]:
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return None, None
    return float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))


# --------------------------------------------------------------------------- the task

def method_text(spec: TaskSpec) -> tuple:
    """(plain text, its id, planted text, its id): PTB train lines the method reads; the planted copy
    carries `<plant> gold` once per line (at a seeded place)."""
    corpus = load("ptb", seed=spec.split_seed)
    text = subsample(corpus.splits["train"], Params.of(spec).method_lines, seed=spec.split_seed)
    text_id = f"{corpus.fingerprint}:train:{len(text)}"
    probe = text.map(lambda row, i: {"text": zoo_family.plant_line(row["text"], np.random.default_rng([spec.split_seed, i]))},
                     with_indices=True)
    return text, text_id, probe, f"{text_id}:planted"


def _reference(spec: TaskSpec, method: Method, env: RunEnv, grid, text, text_id) -> list[np.ndarray]:
    name = Params.of(spec).reference
    if method.name == name:
        return None
    return env.memo(("ppl-trend:reference", spec.fingerprint(), name, tuple(t.refs for t in grid)),
                    lambda: [_ask(get_method(name), spec, env, t, text, text_id) for t in grid])


@register_task(SPEC, Params, Provides(gradients=True))
def score(spec: TaskSpec, method: Method, env: RunEnv) -> list:
    grid, planted = trajectories(spec.model)
    text, text_id, probe, probe_id = method_text(spec)
    changes = [_ask(method, spec, env, traj, text, text_id) for traj in grid]
    reference = _reference(spec, method, env, grid, text, text_id) or changes
    losses = [_losses(spec, env, t) for t in grid]
    tpb = Params.of(spec).seq_len - 1
    stats = statistics(changes, reference, [gains(l, tpb) for l in losses])
    draws = bootstrap(changes, reference, losses, tpb, Params.of(spec).bootstrap, np.random.default_rng(env.seed))
    out = [record(spec, method.name, f"ppl-trend.{k}", None if math.isnan(v) else v, env.seed,
                  **dict(zip(("ci_low", "ci_high"), _interval(draws[k]))))
           for k, v in stats.items() if not (k == "time_controlled" and math.isnan(v))]
    out += _per_trajectory(spec, method, env, grid, changes, losses, tpb)
    if planted:
        out += _planted(spec, method, env, planted, (text, text_id), (probe, probe_id))
    return out


def _per_trajectory(spec, method, env, grid, changes, losses, tpb) -> list:
    out = []
    for traj, change, loss in zip(grid, changes, losses):
        tag = lambda r: replace(r, model=traj.name)  # noqa: E731  (records of one trajectory)
        rho = spearman_rows(change[None], gains(loss, tpb)[None])[0]
        out.append(tag(record(spec, method.name, "ppl-trend.spearman", None if math.isnan(rho) else float(rho), env.seed)))
        out += [tag(record(spec, method.name, "ppl-trend.stage_change", float(c), env.seed, k=float(s)))
                for s, c in zip(traj.steps[1:], change)]
        log_ppl = loss.sum(1) / (loss.shape[1] * tpb)
        out += [tag(record(spec, method.name, "ppl-trend.valid_ppl", float(math.exp(lp)), env.seed, k=float(s)))
                for s, lp in zip(traj.steps, log_ppl)]
    return out


def _planted(spec, method, env, planted, plain, probe) -> list:
    """Per planted trajectory, excess = change on text carrying the planted concept minus change on
    plain text; where it peaks against the known onset (`pooled.onset_scores`), bootstrapped over
    planted trajectories."""
    out, scores = [], []
    for traj in planted:
        excess = _ask(method, spec, env, traj, *probe, labelling="planted") - _ask(method, spec, env, traj, *plain)
        scores.append(onset_scores(excess, traj.onset))
        out += [replace(record(spec, method.name, "ppl-trend.planted.excess", float(e), env.seed, k=float(s)),
                        model=traj.name) for s, e in zip(traj.steps[1:], excess)]
    scores = np.array(scores)  # (planted, 2): rank, hit
    rng = np.random.default_rng([env.seed, 1])
    boot = scores[rng.integers(0, len(scores), (Params.of(spec).bootstrap, len(scores)))].mean(1)
    for i, name in enumerate(("onset_rank", "hit")):
        lo, hi = _interval(boot[:, i])
        out.append(record(spec, method.name, f"ppl-trend.planted.{name}", float(scores[:, i].mean()), env.seed,
                          ci_low=lo, ci_high=hi))
    chance = float(np.mean([1 / (len(t.refs) - 1) for t in planted]))
    out.append(record(spec, method.name, "ppl-trend.planted.chance_hit", chance, env.seed))
    return out
