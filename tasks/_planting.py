"""Planted neurons: extra FFN units added to a copy of a model (the plain or gated MLP of any
architecture `engine.arch` resolves, GPT-2's `Conv1D` and Phi-3's fused gate/up included), whose
input weights detect a known target and whose output weights are zero, so the model computes
exactly what it did while the new units' activations follow the target: ground truth for
explanation methods. Targets may be word-level or sentence-level (`engine.discovery.sentence_means`
of the inputs)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from neuronbench.harness.engine.batching import encode
from neuronbench.harness.engine.collect import CollectConfig, run_batches
from neuronbench.harness.engine.arch import linear_dims
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
    """Where one block's FFN keeps its matrices, as `engine.arch.arch_spec` resolved them (paths
    inside the block).

    Attributes:
        up: the projection whose rows make the neurons of a plain MLP (`act(up(x))`), the up
            projection of a gated one (`act(gate(x)) * up(x)`), or a fused `gate_up` projection
            (gate rows first, then up rows, as Phi-3 splits it).
        down: the projection mapping the neurons back (whose input is the `ffn` site).
        gate: the gate projection of a gated MLP with separate gate and up, else None.
        fused: `up` holds the gate and up rows together.
    """

    up: str
    down: str
    gate: str | None = None
    fused: bool = False


def ffn_parts(model: nn.Module, layer: int) -> FFNParts:
    """The FFN matrices of block `layer`, read from `arch_spec(model)` (its `up_proj`, `down_proj` and
    `fused_gate_up`; `nn.Linear` or GPT-2's transposed `Conv1D`).

    Raises:
        ValueError: the resolved layout names no input projection (an override without `up_proj`),
            or a projection that is not a linear layer.
    """
    spec = arch_spec(model)
    block = layer_modules(model)[layer]
    if not spec.up_proj:
        raise ValueError(f"planting needs the FFN's input projections; the {model.config.model_type!r} override in "
                         "harness.engine.arch.ARCHS has no up_proj: add it (ArchSpec.up_proj)")
    for path in (*spec.up_proj, spec.down_proj):
        if linear_dims(block.get_submodule(path)) is None:
            raise ValueError(f"planting needs linear FFN projections; block {layer} of {model.config.model_type!r} "
                             f"has {path} = {type(block.get_submodule(path)).__name__}")
    gate = spec.up_proj[0] if len(spec.up_proj) == 2 else None
    return FFNParts(spec.up_proj[-1], spec.down_proj, gate, spec.fused_gate_up)


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
    inputs = np.zeros((int(offsets[-1]), linear_dims(up)[0]), dtype=np.float32)
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

    The layout comes from `arch_spec` (`ffn_parts`). In a gated MLP (`act(gate(x)) * up(x)`,
    Llama-style, or Phi-3's fused gate/up) the gate row is the detector and the up row is zero with
    bias 1, so the unit is act(weight . x + bias) too; projections without a bias get one, zero on
    the original units. GPT-2's `Conv1D` stores its weight as (in, out) and is grown along the
    other axis. The model's outputs are unchanged (up to float summation order).
    `config.intermediate_size` still describes the other layers; `LoadedModel.width` reads the
    module and reports the new width.
    """
    net = copy.deepcopy(model.model)
    block, parts = layer_modules(net)[layer], ffn_parts(net, layer)
    down = block.get_submodule(parts.down)
    n_old, n_new = linear_dims(down)[0], weight.shape[0]
    d_in = linear_dims(block.get_submodule(parts.up))[0]
    if weight.shape != (n_new, d_in) or bias.shape != (n_new,):
        raise ValueError(f"weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must be (P, {d_in}) and (P,)")
    pos = np.random.default_rng(seed).choice(n_old + n_new, n_new, replace=False)
    old = np.setdiff1d(np.arange(n_old + n_new), pos)  # original units keep their order
    constant = (torch.zeros(n_new, d_in), torch.ones(n_new))  # the up rows of a gated unit: always 1
    up = block.get_submodule(parts.up)
    if parts.fused:
        (w_gate, w_up), (b_gate, b_up) = (t.chunk(2, 0) for t in _rows(up))
        _set_rows(up, torch.cat([_insert(w_gate, weight, pos, old), _insert(w_up, constant[0], pos, old)]),
                  torch.cat([_insert(b_gate, bias, pos, old), _insert(b_up, constant[1], pos, old)]))
    else:
        detector = block.get_submodule(parts.gate) if parts.gate else up
        _grow_rows(detector, weight, bias, pos, old)
        if parts.gate:
            _grow_rows(up, *constant, pos, old)
    _grow_inputs(down, pos, old)
    planted = LoadedModel(net.eval(), model.tokenizer, f"{model.name}+planted", "<planted>", model.kind)
    return Planted(planted, Site.ffn(layer), tuple(int(p) for p in pos))


def _rows(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight and (out,) bias of a linear layer (zeros where it has no bias)."""
    weight = module.weight.detach()
    weight = weight.T if not isinstance(module, nn.Linear) else weight  # Conv1D stores (in, out)
    bias = module.bias.detach() if module.bias is not None else torch.zeros(len(weight), dtype=weight.dtype,
                                                                            device=weight.device)
    return weight, bias


def _insert(original: torch.Tensor, new: torch.Tensor, pos, old) -> torch.Tensor:
    """`original`'s rows moved to `old` and `new`'s rows (cast to its dtype and device) at `pos`."""
    out = original.new_zeros((len(pos) + len(old), *original.shape[1:]))
    out[torch.as_tensor(old, device=out.device)] = original
    out[torch.as_tensor(pos, device=out.device)] = new.to(original)
    return out


def _set_rows(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Give a linear layer (of the planted copy) new (out, in) weights and (out,) bias, in place."""
    if isinstance(module, nn.Linear):
        module.weight, module.out_features = nn.Parameter(weight), len(weight)
    else:  # Conv1D: weight (in, out), output width `nf`
        module.weight, module.nf = nn.Parameter(weight.T.contiguous()), len(weight)
    module.bias = nn.Parameter(bias)


def _grow_rows(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor, pos, old) -> None:
    """Insert output rows `weight`/`bias` at `pos` (the layer's own rows move to `old`)."""
    w, b = _rows(module)
    _set_rows(module, _insert(w, weight, pos, old), _insert(b, bias, pos, old))


def _grow_inputs(module: nn.Module, pos, old) -> None:
    """Make a linear layer read `len(pos)` more inputs, at `pos`, with zero weights (its bias kept)."""
    w = _rows(module)[0]  # (out, in)
    grown = _insert(w.T, torch.zeros(len(pos), len(w)), pos, old).T.contiguous()
    if isinstance(module, nn.Linear):
        module.weight, module.in_features = nn.Parameter(grown), grown.shape[1]
    else:
        module.weight = nn.Parameter(grown.T.contiguous())
        if hasattr(module, "nx"):
            module.nx = grown.shape[1]
