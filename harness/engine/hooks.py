"""Scoped forward hooks on neuron sites: added in a context manager, always removed in `finally`."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .models import site_module
from .sites import Site

# A site function sees the site's activations (B, T, N) and returns None (observe only) or a
# tensor of the same shape that replaces them downstream.
SiteFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def _resid_hook(fn: SiteFn):
    def hook(module, args, output):
        acts = output[0] if isinstance(output, tuple) else output
        new = fn(acts)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return hook


def _ffn_pre_hook(fn: SiteFn, lead: dict[str, torch.Size]):
    def hook(module, args):
        acts = args[0]
        if acts.dim() == 2 and "shape" in lead:  # e.g. OPT flattens tokens to (B*T, N) around its MLP
            acts = acts.view(*lead["shape"], acts.shape[-1])
        new = fn(acts)
        return None if new is None else (new.view_as(args[0]), *args[1:])
    return hook


def _block_shape_hook(lead: dict[str, torch.Size]):
    """Remember the (B, T) of the block's input, to give a flattened FFN input back its shape."""
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
            lead["shape"] = hidden.shape[:-1]
    return hook


@contextmanager
def site_hooks(model: nn.Module, fns: dict[Site, SiteFn]) -> Iterator[None]:
    """Run `fns[site]` on each site's activations during forward passes inside the block.

    `resid` sites hook the block's output; `ffn` sites hook the input of the FFN down projection
    (seen as (B, T, N) even where the block flattens tokens). Hooks run in the order of `fns`, after
    any hooks already on the module.
    """
    handles = []
    try:
        for site, fn in fns.items():
            module = site_module(model, site)
            if site.kind == "resid":
                handles.append(module.register_forward_hook(_resid_hook(fn)))
            else:
                lead: dict[str, torch.Size] = {}
                block = site_module(model, Site.resid(site.layer))
                handles.append(block.register_forward_pre_hook(_block_shape_hook(lead), with_kwargs=True))
                handles.append(module.register_forward_pre_hook(_ffn_pre_hook(fn, lead)))
        yield
    finally:
        for handle in handles:
            handle.remove()
