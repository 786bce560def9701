"""Build zoo entries: models the offline world lacks (a fine-tuned classifier, a training
trajectory), built deterministically into `$NEURONBENCH_HOME/zoo`, and list them with their metrics.

Entries are declared in the engine's `catalogue`; `build` runs an entry's recipe (see `train`) into
an atomic folder with a manifest.json recording how it was made and every file's size, so damage
is detected.
"""
from __future__ import annotations

import dataclasses
import logging
import platform
import time
from pathlib import Path

from .. import __version__
from ..engine.catalogue import (MANIFEST, Manifest, ZooSpec, _jsonable, entries, entry_dir, get_spec,
                                scaled_name, status)
from ..engine.models import default_device
from ..engine.paths import atomic_dir, atomic_write_json, clean_stale_tmp
from ..engine.records import utc_stamp
from . import gguf as zoo_gguf
from . import train as zoo_train

log = logging.getLogger(__name__)

_PACKAGES = ("torch", "transformers", "datasets", "tokenizers", "numpy")


# --------------------------------------------------------------------------- build

def build(name: str, *, scale: str = "full", force: bool = False, progress: bool = True) -> Manifest:
    """Build zoo entry `name` unless it is already built and intact.

    Args:
        name: a zoo entry (`zoo ls`); hub entries are a no-op.
        scale: "full", or "tiny" to build `<name>-tiny` (seconds, for tests and `--quick` runs).
        force: rebuild even when a complete entry exists.
        progress: show tqdm progress bars.

    Returns:
        The entry's manifest; `.cached` is True when nothing was built. A missing, corrupt or
        stale entry is (re)built into a temporary folder renamed into place only when complete.

    Full builds take minutes on a CPU (`minilm-polarity` about 10, `ptb-lm` about 8 on two shared
    cores); where other processes share the cores, run with OMP_WAIT_POLICY=PASSIVE.
    """
    spec = get_spec(scaled_name(name, scale))
    if spec.kind == "hub":
        return _hub_manifest(spec)
    st = status(spec.name)
    if st.built and not force:
        log.info("zoo entry %s is built (%s): cache hit", spec.name, st.path)
        st.manifest.cached = True
        return st.manifest
    if st.state in ("corrupt", "stale"):
        log.warning("zoo entry %s is %s (%s); rebuilding it", spec.name, st.state, st.reason)
    builder = {"classifier": zoo_train.build_classifier, "trajectory": zoo_train.build_trajectory,
               "packaged": zoo_gguf.build_packaged}[spec.kind]
    start = time.perf_counter()
    final = entry_dir(spec.name)
    clean_stale_tmp(final.parent)  # what killed builds left
    with atomic_dir(final, "zoo entry", legacy=lambda f: (f / MANIFEST).is_file()) as tmp:
        result = builder(spec.hparams, tmp, progress)
        manifest = _manifest(spec, result, _file_sizes(tmp), time.perf_counter() - start)
        atomic_write_json(tmp / MANIFEST, manifest.to_json())
    manifest.path = final
    log.info("built zoo entry %s in %.1f s into %s", spec.name, manifest.wall_time_s, final)
    return manifest


def _file_sizes(folder: Path) -> dict[str, int]:
    # Every file but the entry's own manifest (checkpoint manifests are listed too).
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / MANIFEST}


def _versions() -> dict[str, str | None]:
    from ..engine.records import package_versions

    return package_versions(_PACKAGES)


def _manifest(spec: ZooSpec, result: zoo_train.BuildResult, files: dict, wall: float) -> Manifest:
    import torch

    machine = {"device": str(default_device()), "torch_threads": torch.get_num_threads(),
               "platform": platform.platform(), "python": platform.python_version()}
    return Manifest(
        name=spec.name, kind=spec.kind, parent=spec.parent, scale=spec.scale,
        seed=getattr(spec.hparams, "seed", None), data=result.data,
        hparams=_jsonable(dataclasses.asdict(spec.hparams)), step=result.step,
        metrics=_jsonable(result.metrics), files=files, versions=_versions(),
        harness_version=__version__, machine=machine, wall_time_s=round(wall, 2),
        created=utc_stamp())


def _hub_manifest(spec: ZooSpec) -> Manifest:
    return Manifest(
        name=spec.name, kind="hub", parent=spec.parent, scale=spec.scale, seed=None, data=None,
        hparams=dataclasses.asdict(spec.hparams), step=None, metrics={}, files={},
        versions=_versions(), harness_version=__version__, machine={}, wall_time_s=0.0,
        created="", cached=True)


# --------------------------------------------------------------------------- listing

def ls_json() -> list[dict]:
    """One JSON-able object per entry: name, kind, scale, state, built, parent, source, metrics.

    `metrics` holds `test_accuracy` (and dev / probe accuracies) for classifiers, `checkpoints`
    (`[{"step", "valid_ppl"}]`, in step order) for trajectories, nothing for hub or unbuilt entries.
    """
    rows = []
    for spec in entries():
        st = status(spec.name)
        source = spec.hparams.repo if spec.kind == "hub" else str(st.path)
        rows.append({"name": spec.name, "kind": spec.kind, "scale": spec.scale, "state": st.state,
                     "built": st.built, "parent": spec.parent, "source": source,
                     "metrics": _summary_metrics(spec, st.manifest) if st.built else {}})
    return rows


def _summary_metrics(spec: ZooSpec, manifest: Manifest) -> dict:
    m = manifest.metrics
    if spec.kind == "classifier":
        keys = ("test_accuracy", "dev_accuracy", "probe_test_accuracy", "best_epoch")
        return {k: m[k] for k in keys if k in m}
    if spec.kind == "packaged":
        return {k: m[k] for k in ("n_parameters", "source") if k in m}
    points = sorted(m.get("checkpoints", []), key=lambda p: p["step"])
    return {"checkpoints": [{"step": p["step"], "valid_ppl": p["valid_ppl"]} for p in points]}


def _describe(row: dict) -> str:
    m = row["metrics"]
    if "test_accuracy" in m:
        return (f"test {m['test_accuracy']:.1%}, dev {m['dev_accuracy']:.1%}, "
                f"frozen probe {m['probe_test_accuracy']:.1%}")
    if m.get("checkpoints"):
        c = m["checkpoints"]
        return f"{len(c)} checkpoints, valid ppl {c[0]['valid_ppl']:.0f} -> {c[-1]['valid_ppl']:.0f}"
    if "source" in m:
        src = m["source"]
        return f"{m['n_parameters'] / 1e6:.1f}M parameters from {src['package']}=={src['version']} ({src['file']})"
    return ""
