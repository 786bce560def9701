"""Where a model keeps its neuron sites, read from its module structure: the repeated blocks, the
FFN's down projection and the projections that feed it (`ArchSpec`), with `ARCHS` for overrides."""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .sites import Site


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture keeps its blocks and FFN (paths from `base_model`, then from a block).

    Found from the module structure by `arch_spec` (see `resolve_arch`); `ARCHS` holds overrides.

    Attributes:
        layers: the repeated blocks (an `nn.ModuleList`), from `base_model`.
        down_proj: the FFN's down (output) projection, from a block: its input is the `ffn` site.
        up_proj: the projections that read the block's stream and produce the FFN's input, from a
            block: `(up,)` for a plain MLP, `(gate, up)` for a gated one (`act(gate) * up`; the gate
            first when its name says so), or one fused `gate_up` projection of twice the FFN width
            (`fused_gate_up`; gate half first, as Phi-3 splits it). Empty in overrides written
            before this field existed.
        fused_gate_up: `up_proj` is a single projection holding gate and up.
    """

    layers: str
    down_proj: str
    up_proj: tuple[str, ...] = ()
    fused_gate_up: bool = False

    @property
    def gated(self) -> bool:
        return self.fused_gate_up or len(self.up_proj) == 2


# Overrides by `model_type`, for an architecture whose structure `resolve_arch` cannot read (or
# reads wrongly). Empty: every family the tests build resolves from its structure.
ARCHS: dict[str, ArchSpec] = {}


def arch_spec(model: nn.Module) -> ArchSpec:
    """Where `model` keeps its blocks and FFN: the override in `ARCHS` for its `model_type`, else
    what `resolve_arch` reads from its structure (once per model object)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type in ARCHS:
        return ARCHS[model_type]
    if model not in _RESOLVED:
        _RESOLVED[model] = resolve_arch(model)
    return _RESOLVED[model]


_RESOLVED: "weakref.WeakKeyDictionary[nn.Module, ArchSpec]" = weakref.WeakKeyDictionary()
_ATTENTION = ("attention", "attn")  # class-name parts of attention modules, whose projections are not the FFN


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear layer: `nn.Linear` and subclasses, or transformers' `Conv1D` (GPT-2),
    which stores its weight as (in, out); None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0]), int(weight.shape[1])
    return None


def _blocks_path(base: nn.Module) -> str:
    """The `nn.ModuleList` of same-class modules holding linear layers with the most parameters."""
    best, size = None, -1
    for name, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or not name:
            continue
        if len({type(m) for m in module}) != 1 or not any(linear_dims(m) for m in module[0].modules()):
            continue
        n = sum(p.numel() for p in module.parameters())
        if n > size:
            best, size = name, n
    if best is None:
        raise ValueError(f"{type(base).__name__} has no repeated transformer blocks (an nn.ModuleList of "
                         "same-class modules with linear layers): NeuronBench cannot place its sites. "
                         "Register an override with harness.engine.arch.register_arch")
    return best


def _ffn_linears(block: nn.Module, hidden: int) -> tuple[str, list[tuple[str, int]], int]:
    """(down path, [(up path, out width)], FFN width) of a block, outside its attention modules."""
    inside_attention: set[str] = set()
    linears: list[tuple[str, int, int]] = []
    for name, module in block.named_modules():
        if any(name.startswith(p + ".") for p in inside_attention):
            continue
        if name and any(part in type(module).__name__.lower() for part in _ATTENTION):
            inside_attention.add(name)
            continue
        dims = linear_dims(module)
        if dims:
            linears.append((name, *dims))
    # The down projection maps F -> hidden, fed by projections registered before it (module order
    # is definition order in every family tested) mapping hidden -> F or hidden -> 2F. Where F equals
    # the hidden size, several layers qualify and the last is the down projection.
    found = []
    for i, (name, d_in, d_out) in enumerate(linears):
        ups = [(n, o) for n, i_, o in linears[:i] if i_ == hidden and o in (d_in, 2 * d_in)]
        if d_out == hidden and ups:
            found.append((name, d_in, ups))
    wide = [f for f in found if f[1] != hidden]
    found = wide if wide else found[-1:]
    if len(found) != 1:
        seen = ", ".join(f"{n} ({i}->{o})" for n, i, o in linears) or "none"
        why = "several candidates" if found else "none"
        raise ValueError(
            f"no recognisable MLP in {type(block).__name__} ({why}): looked for one linear layer outside "
            f"attention mapping the FFN width F -> hidden size {hidden} (the down projection), fed by "
            f"linear layers mapping {hidden} -> F (up, gate) or {hidden} -> 2F (fused gate_up); its linear "
            f"layers outside attention: {seen}. Register an override with harness.engine.arch.register_arch")
    down, width, ups = found[0]
    return down, ups, width


def resolve_arch(model: nn.Module) -> ArchSpec:
    """Read an `ArchSpec` from the module structure.

    The blocks are the largest `nn.ModuleList` of same-class modules with linear layers under
    `base_model`. In the first block, outside modules whose class name contains "Attention"/"Attn",
    the down projection is the one linear layer (`nn.Linear` or `Conv1D`) mapping some width F to
    the hidden size H fed by linear layers registered before it mapping H -> F (up, and a gate when
    gated) or H -> 2F (a fused gate/up); where F = H, the last such layer.

    Raises:
        ValueError: no blocks, or no (or no single) recognisable MLP; the message names what was
            looked for and the block's linear layers.
    """
    base = model.base_model
    layers = _blocks_path(base)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(config, "hidden_size", None)
    block = _get(base, layers)[0]
    if not isinstance(hidden, int):
        raise ValueError(f"{type(model).__name__}'s config has no integer hidden_size: NeuronBench cannot "
                         "tell the residual width. Register an override with harness.engine.arch.register_arch")
    down, ups, width = _ffn_linears(block, hidden)
    fused = [name for name, out in ups if out == 2 * width]
    plain = sorted((name for name, out in ups if out == width), key=lambda n: "gate" not in n.rsplit(".", 1)[-1])
    if fused and not plain:
        return ArchSpec(layers, down, (fused[0],), fused_gate_up=True)
    if len(plain) > 2:
        raise ValueError(f"{type(block).__name__}: {len(plain)} projections feed the FFN ({', '.join(plain)}); "
                         "expected an up projection and at most a gate. Register an override with "
                         "harness.engine.arch.register_arch")
    return ArchSpec(layers, down, tuple(plain))


def register_arch(model_type: str, spec: ArchSpec) -> None:
    """Override structural resolution for every model of `model_type` (paths as in `ArchSpec`)."""
    ARCHS[model_type] = spec


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def layer_modules(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks, in order."""
    return _get(model.base_model, arch_spec(model).layers)


def check_site(model: nn.Module, site: Site) -> None:
    n = len(layer_modules(model))
    if site.layer >= n:
        raise ValueError(f"site {site} is outside the model: it has {n} layers (0..{n - 1})")


def site_module(model: nn.Module, site: Site) -> nn.Module:
    """The module to hook for `site`: the block (output hook) for `resid`, the down projection
    (input pre-hook) for `ffn`."""
    check_site(model, site)
    block = layer_modules(model)[site.layer]
    return block if site.kind == "resid" else _get(block, arch_spec(model).down_proj)


def site_width(model: nn.Module, site: Site) -> int:
    check_site(model, site)
    d_in, d_out = linear_dims(_get(layer_modules(model)[site.layer], arch_spec(model).down_proj))
    return d_out if site.kind == "resid" else d_in
