"""Planted neurons: extra FFN units added to a copy of a BERT-style model, whose input weights
detect a known target and whose output weights are zero, so the model computes exactly what it
did while the new units' activations follow the target: ground truth for explanation methods."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from neuronbench.harness.engine.batching import encode
from neuronbench.harness.engine.collect import CollectConfig, run_batches
from neuronbench.harness.engine.models import LoadedModel, arch_spec, layer_modules
from neuronbench.harness.engine.sites import Site


@dataclass(frozen=True)
class Planted:
    """A model with planted units.

    Attributes:
        model: the copy holding the units (the original is untouched).
        site: the `ffn` site the units appear at.
        units: `units[j]` is the index, within `site`, of planted unit j (seeded random positions
            among the original units, so a unit's place does not give it away).
    """

    model: LoadedModel
    site: Site
    units: tuple[int, ...]


def ffn_linears(model: nn.Module, layer: int) -> tuple[nn.Linear, nn.Linear]:
    """The FFN up projection (`intermediate.dense`) and down projection (`output.dense`) of a
    BERT-style block. Other architectures have no planting support yet."""
    spec = arch_spec(model)
    block = layer_modules(model)[layer]
    up = getattr(getattr(block, "intermediate", None), "dense", None)
    down = getattr(getattr(block, "output", None), "dense", None)
    if spec.down_proj != "output.dense" or not isinstance(up, nn.Linear) or not isinstance(down, nn.Linear):
        raise ValueError(f"planting needs a BERT-style FFN (intermediate.dense -> output.dense); "
                         f"{model.config.model_type!r} has another layout: use a BERT, RoBERTa or ELECTRA model")
    return up, down


def ffn_inputs(model: LoadedModel, layer: int, dataset, max_length: int = 256,
               max_tokens: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The input of the FFN of `layer` at each word's last sub-token, batched as the collector does.

    Args:
        model: the model.
        layer: the block.
        dataset: examples with a `words` column.
        max_length: truncation length in tokens (the collector's).
        max_tokens: padded tokens per batch.

    Returns:
        (W, H) float32 inputs, words in dataset order, and (W,) bool `kept`: False for a word left
        with no token (cut by truncation), whose row is zero.
    """
    up, _ = ffn_linears(model.model, layer)
    enc = encode(model.tokenizer, dataset, min(max_length, model.max_length), with_words=True)
    offsets = np.concatenate([[0], np.cumsum(enc.n_words)]).astype(np.int64)
    inputs = np.zeros((int(offsets[-1]), up.in_features), dtype=np.float32)
    kept = np.zeros(len(inputs), dtype=bool)
    state = {}

    def grab(module, args):
        batch = state["batch"]
        x = args[0].reshape(-1, args[0].shape[-1]).index_select(0, batch.word_rows)
        rows = batch.word_index.cpu().numpy()
        inputs[rows] = x.float().cpu().numpy()
        kept[rows] = True

    cfg = CollectConfig(sites=(Site.ffn(layer),), stats=(), max_tokens=max_tokens, alignment="last")
    handle = up.register_forward_pre_hook(grab)
    try:
        run_batches(model, enc, cfg, lambda batch: state.update(batch=batch),
                    word_offsets=offsets[:-1].tolist(), progress=False)
    finally:
        handle.remove()
    return inputs, kept


def fit_detectors(inputs: np.ndarray, targets: np.ndarray, ridge: float = 1e-3,
                  gain: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Up-projection rows that make GELU(row . x + bias) follow each target column.

    Per column a class-balanced ridge least-squares probe p(x) ~ target (positives and negatives
    weigh half each, so rare targets are not predicted 0 everywhere) on standardised inputs; the
    row computes gain * (p(x) - 1/2): about +gain/2 on positives (GELU passes it) and -gain/2 on
    negatives (GELU gives ~0).

    Args:
        inputs: (W, H) FFN inputs.
        targets: (W, P) bool, each column with positives and negatives.
        ridge: L2 penalty on the standardised weights (the sample weights sum to 1).
        gain: pre-activation scale.

    Returns:
        weight (P, H) and bias (P,), float32.
    """
    y = torch.as_tensor(targets, dtype=torch.bool)
    pos = y.sum(0)
    if bool(((pos == 0) | (pos == len(y))).any()):
        raise ValueError(f"every target needs positives and negatives; counts {pos.tolist()} of {len(y)}")
    x = torch.as_tensor(inputs, dtype=torch.float64)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=torch.float64)], 1)  # (W, H+1)
    gram_all = z.T @ z
    penalty = ridge * torch.eye(z.shape[1], dtype=torch.float64)
    penalty[-1, -1] = 0.0  # the intercept is not shrunk
    rows = []
    for j in range(y.shape[1]):
        zp = z[y[:, j]]
        gram_pos = zp.T @ zp
        a, b = 0.5 / pos[j].item(), 0.5 / (len(y) - pos[j].item())
        lhs = a * gram_pos + b * (gram_all - gram_pos) + penalty
        beta = torch.linalg.solve(lhs, a * zp.sum(0))  # positives have target 1, negatives 0
        rows.append(beta)
    beta = torch.stack(rows)  # (P, H+1)
    weight = beta[:, :-1] / sd
    bias = beta[:, -1] - weight @ mu
    return (gain * weight).float(), (gain * (bias - 0.5)).float()


def plant_units(model: LoadedModel, layer: int, weight: torch.Tensor, bias: torch.Tensor,
                seed: int = 0) -> Planted:
    """A copy of `model` whose FFN at `layer` has P more units: unit j reads `weight[j]`, `bias[j]`
    and writes nothing (a zero column of the down projection), at a seeded random position.

    The model's outputs are unchanged (up to float summation order). `config.intermediate_size`
    still describes the other layers; `LoadedModel.width(Site.ffn(layer))` reads the module and
    reports the new width.
    """
    net = copy.deepcopy(model.model)
    up, down = ffn_linears(net, layer)
    n_old, n_new = up.out_features, weight.shape[0]
    if weight.shape != (n_new, up.in_features) or bias.shape != (n_new,):
        raise ValueError(f"weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must be "
                         f"(P, {up.in_features}) and (P,)")
    pos = np.random.default_rng(seed).choice(n_old + n_new, n_new, replace=False)
    old = np.setdiff1d(np.arange(n_old + n_new), pos)  # original units keep their order
    new_up = nn.Linear(up.in_features, n_old + n_new, device=up.weight.device, dtype=up.weight.dtype)
    new_down = nn.Linear(n_old + n_new, down.out_features, bias=down.bias is not None,
                         device=down.weight.device, dtype=down.weight.dtype)
    pos_t, old_t = (torch.as_tensor(i, device=up.weight.device) for i in (pos, old))
    with torch.no_grad():
        new_up.weight[old_t] = up.weight
        new_up.weight[pos_t] = weight.to(up.weight)
        new_up.bias[old_t] = up.bias
        new_up.bias[pos_t] = bias.to(up.bias)
        new_down.weight.zero_()
        new_down.weight[:, old_t] = down.weight
        if down.bias is not None:
            new_down.bias.copy_(down.bias)
    block = layer_modules(net)[layer]
    block.intermediate.dense, block.output.dense = new_up, new_down
    planted = LoadedModel(net.eval(), model.tokenizer, f"{model.name}+planted", "<planted>", model.kind)
    return Planted(planted, Site.ffn(layer), tuple(int(p) for p in pos))
