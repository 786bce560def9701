"""Placing a model too large for one device: accelerate's big-model dispatch options, and a
fingerprint of weights that were offloaded (not held in memory) read from their files."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn


@dataclass(frozen=True)
class Placement:
    """Where `load_model` puts the parts of a model that does not fit one device (passed to
    `from_pretrained`; needs `accelerate`).

    Attributes:
        device_map: `auto`, `balanced`, `balanced_low_0`, `sequential`, or a module -> device dict.
        max_memory: per device (`0`, `1`, ..., `cpu`) the memory it may use, e.g. {0: "70GiB",
            "cpu": "200GiB"}; default: what is free.
        offload_folder: where weights that fit nowhere go (`disk` in the map).
    """

    device_map: str | dict = "auto"
    max_memory: dict | None = None
    offload_folder: str | None = None

    def kwargs(self) -> dict:
        out: dict = {"device_map": self.device_map}
        if self.max_memory is not None:
            out["max_memory"] = self.max_memory
        if self.offload_folder is not None:
            out["offload_folder"] = self.offload_folder
        return out


def files_fingerprint(model: nn.Module, folder: Path) -> str:
    """Hash of the config and the weight files of a local model folder (read in 16 MiB blocks)."""
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")])
    if not files:
        raise ValueError(f"cannot fingerprint the offloaded weights of {folder}: no *.safetensors or *.bin "
                         "files there; load it from a local folder or a hub revision")
    h = hashlib.sha256(b"files")
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "_commit_hash")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for path in files:
        h.update(path.name.encode())
        with path.open("rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()[:16]
