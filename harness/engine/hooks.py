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


def _ffn_pre_hook(fn: SiteFn):
    def hook(module, args):
        new = fn(args[0])
        return None if new is None else (new, *args[1:])
    return hook


@contextmanager
def site_hooks(model: nn.Module, fns: dict[Site, SiteFn]) -> Iterator[None]:
    """Run `fns[site]` on each site's activations during forward passes inside the block.

    `resid` sites hook the block's output; `ffn` sites hook the input of the FFN down projection.
    Hooks run in the order of `fns`, after any hooks already on the module.
    """
    handles = []
    try:
        for site, fn in fns.items():
            module = site_module(model, site)
            if site.kind == "resid":
                handles.append(module.register_forward_hook(_resid_hook(fn)))
            else:
                handles.append(module.register_forward_pre_hook(_ffn_pre_hook(fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()
