"""Command-line options for work past one process: which verbs a launcher (torchrun, accelerate
launch) may start, the suite's `--parallel`, and placing a model too large for one device."""
from __future__ import annotations

import argparse

from ..engine import distributed
from ..engine.models import Placement

LAUNCHABLE = ("collect", "run")  # the verbs that share their work across launched ranks


def refusal(verb: str) -> str | None:
    """Why `verb` must not run under a launcher, or None when it may (or nothing launched it)."""
    if distributed.launched() and verb not in LAUNCHABLE:
        return (f"`neuronbench {verb}` runs in one process; only {' and '.join(LAUNCHABLE)} split their work "
                "under torchrun / accelerate launch")
    return None


def add_parallel_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parallel", choices=distributed.PARALLEL_MODES, default="items",
                   help="under torchrun/accelerate launch: split the (task, method) items across ranks "
                        "(items), or run each item on all ranks with its data split (data)")


def add_placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device-map", choices=("auto", "balanced", "balanced_low_0", "sequential"),
                   help="spread a model too large for one device over the GPUs, CPU and disk (accelerate)")
    p.add_argument("--max-memory", help="with --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    p.add_argument("--offload-folder", help="with --device-map: folder for weights that fit on no device")


def placement(args: argparse.Namespace, ranks: distributed.Ranks | None) -> Placement | None:
    """The `--device-map` options as a `Placement`, or None; refused under a launcher."""
    if not args.device_map:
        return None
    if ranks is not None:
        raise ValueError("--device-map spreads one model over this machine's devices: launch it as one "
                         "process, not under torchrun / accelerate launch")
    memory = None
    if args.max_memory:
        memory = {}
        for part in args.max_memory.split(","):
            device, sep, amount = part.partition("=")
            if not sep:
                raise ValueError(f"--max-memory {args.max_memory!r}: write DEVICE=AMOUNT,... e.g. 0=70GiB,cpu=200GiB")
            memory[int(device) if device.isdigit() else device] = amount
    return Placement(args.device_map, memory, args.offload_folder)
