"""Planted neurons: extra FFN units added to a copy of a model (BERT-style or gated Llama-style
MLPs), whose input weights detect a known target and whose output weights are zero, so the model
computes exactly what it did while the new units' activations follow the target: ground truth for
explanation methods. Targets may be word-level or sentence-level (`engine.discovery.sentence_means` of the inputs)."""
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


@dataclass(frozen=True)
class FFNParts:
    """Where one block's FFN keeps its matrices: attribute paths inside the block (None for no gate).

    `up` (and `gate` when the MLP is gated, `act(gate(x)) * up(x)`) map the FFN input to the
    neurons; `down` maps the neurons back (the module `models` hooks for the `ffn` site)."""

    up: str
    down: str
    gate: str | None = None


def ffn_parts(model: nn.Module, layer: int) -> FFNParts:
    """Locate the FFN matrices of block `layer` structurally: the down projection comes from
    `models.arch_spec`, the up (and gate) projections are the block's other `nn.Linear`s whose
    output width is the down projection's input width, outside the attention submodule (a name
    containing "gate" marks the gate).

    Raises:
        ValueError: the layout is not one or two such `nn.Linear`s (e.g. GPT-2's Conv1D).
    """
    down_path = arch_spec(model).down_proj
    block = layer_modules(model)[layer]
    down = block.get_submodule(down_path)
    width = getattr(down, "in_features", None)
    # Attention projections can have the same width (hidden == intermediate in tiny models);
    # every supported family names its attention submodule `attention`, `attn` or `self_attn`.
    ins = {name: m for name, m in block.named_modules()
           if isinstance(m, nn.Linear) and name != down_path and m.out_features == width
           and not any(part in ("attention", "attn", "self_attn") for part in name.split("."))}
    gates = [n for n in ins if "gate" in n.rsplit(".", 1)[-1]]
    ups = [n for n in ins if n not in gates]
    if not isinstance(down, nn.Linear) or len(ups) != 1 or len(gates) > 1:
        raise ValueError(f"planting needs an FFN of nn.Linear layers (up [+ gate] -> down); block {layer} of "
                         f"{model.config.model_type!r} has down {type(down).__name__} and inputs {sorted(ins)}: "
                         "use a BERT, GPT-NeoX or Llama-family model")
    return FFNParts(ups[0], down_path, gates[0] if gates else None)


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
    up = layer_modules(model.model)[layer].get_submodule(ffn_parts(model.model, layer).up)
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
    """A copy of `model` whose FFN at `layer` has P more units: unit j computes act(`weight[j]` . x +
    `bias[j]`) and writes nothing (a zero column of the down projection), at a seeded random position.

    In a gated MLP (`act(gate(x)) * up(x)`, Llama-style) the gate row is the detector and the up row
    is zero with bias 1, so the unit is act(weight . x + bias) too; projections without a bias get
    one, zero on the original units. The model's outputs are unchanged (up to float summation
    order). `config.intermediate_size` still describes the other layers; `LoadedModel.width`
    reads the module and reports the new width.
    """
    net = copy.deepcopy(model.model)
    block, parts = layer_modules(net)[layer], ffn_parts(net, layer)
    detector = block.get_submodule(parts.gate or parts.up)
    n_old, n_new = detector.out_features, weight.shape[0]
    if weight.shape != (n_new, detector.in_features) or bias.shape != (n_new,):
        raise ValueError(f"weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must be "
                         f"(P, {detector.in_features}) and (P,)")
    pos = np.random.default_rng(seed).choice(n_old + n_new, n_new, replace=False)
    old = np.setdiff1d(np.arange(n_old + n_new), pos)  # original units keep their order
    grown = {(parts.gate or parts.up): _grown_rows(detector, weight, bias, pos, old)}
    if parts.gate:
        up = block.get_submodule(parts.up)
        grown[parts.up] = _grown_rows(up, torch.zeros(n_new, up.in_features), torch.ones(n_new), pos, old)
    grown[parts.down] = _grown_columns(block.get_submodule(parts.down), pos, old)
    for path, module in grown.items():
        parent, _, leaf = path.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, leaf, module)
    planted = LoadedModel(net.eval(), model.tokenizer, f"{model.name}+planted", "<planted>", model.kind)
    return Planted(planted, Site.ffn(layer), tuple(int(p) for p in pos))


def _grown_rows(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor, pos, old) -> nn.Linear:
    """`linear` with output rows `weight`/`bias` inserted at `pos` (its own rows move to `old`)."""
    out = nn.Linear(linear.in_features, len(pos) + len(old), bias=True,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    pos_t, old_t = (torch.as_tensor(i, device=linear.weight.device) for i in (pos, old))
    with torch.no_grad():
        out.weight[old_t] = linear.weight
        out.weight[pos_t] = weight.to(linear.weight)
        out.bias[old_t] = linear.bias if linear.bias is not None else 0.0
        out.bias[pos_t] = bias.to(linear.weight)
    return out


def _grown_columns(linear: nn.Linear, pos, old) -> nn.Linear:
    """`linear` reading `len(pos)` more inputs, at `pos`, with zero weights."""
    out = nn.Linear(len(pos) + len(old), linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.zero_()
        out.weight[:, torch.as_tensor(old, device=linear.weight.device)] = linear.weight
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
    return out
