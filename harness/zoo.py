"""The model zoo: models the offline world lacks (a fine-tuned classifier, a training trajectory),
built deterministically into `$NEURONBENCH_HOME/zoo` and loadable by name, plus hub aliases.

Each entry is a frozen `ZooSpec`; `build` runs its builder (see `zoo_train`) into an atomic folder
with a manifest.json recording how it was made and every file's size, so damage is detected.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from . import __version__, zoo_train
from .models import default_device, register_alias
from .paths import atomic_dir, atomic_write_json, zoo_dir
from .records import utc_stamp
from .zoo_train import ClassifierHP, TrajectoryHP, step_dir

log = logging.getLogger(__name__)

KINDS = ("classifier", "trajectory", "hub")
SCALES = ("full", "tiny")
MANIFEST = "manifest.json"
_PACKAGES = ("torch", "transformers", "datasets", "tokenizers", "numpy")


@dataclass(frozen=True)
class HubRef:
    """A model on the Hugging Face hub: repo id and revision (None = the default branch)."""

    repo: str
    revision: str | None = None


@dataclass(frozen=True)
class ZooSpec:
    """One zoo entry, declared.

    Attributes:
        name: what users type (`ptb-lm`, `ptb-lm@300`, `pythia-70m@step1000`).
        kind: "classifier" (one model folder), "trajectory" (a folder per checkpoint step) or
            "hub" (resolved to a hub id and revision, never built).
        parent: the zoo or model alias it was made from, or None.
        hparams: ClassifierHP, TrajectoryHP or HubRef, matching `kind`.
        description: one line for `neuronbench models` and `zoo ls`.
        scale: "full", or "tiny" for the few-second variants tests and `--quick` runs use.
    """

    name: str
    kind: Literal["classifier", "trajectory", "hub"]
    parent: str | None
    hparams: ClassifierHP | TrajectoryHP | HubRef
    description: str
    scale: Literal["full", "tiny"] = "full"

    def __post_init__(self) -> None:
        want = {"classifier": ClassifierHP, "trajectory": TrajectoryHP, "hub": HubRef}.get(self.kind)
        if want is None or not isinstance(self.hparams, want):
            raise ValueError(f"zoo entry {self.name!r}: kind {self.kind!r} must be one of {KINDS} "
                             f"with hparams of its type, got {type(self.hparams).__name__}")
        if "@" in self.name or self.scale not in SCALES:
            raise ValueError(f"zoo entry {self.name!r}: names hold no '@'; scale is one of {SCALES}")


@dataclass
class Manifest:
    """How an entry was made; stored as manifest.json beside its weights.

    `files` maps each file (relative path) to its size in bytes. `path` and `cached` (True when
    `build` found the entry already built) describe this copy and are not stored.
    """

    name: str
    kind: str
    parent: str | None
    scale: str
    seed: int | None
    data: dict | None
    hparams: dict
    step: int | None
    metrics: dict
    files: dict[str, int]
    versions: dict[str, str | None]
    harness_version: str
    machine: dict
    wall_time_s: float
    created: str
    path: Path | None = field(default=None, compare=False)
    cached: bool = field(default=False, compare=False)

    @classmethod
    def stored_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("path", "cached"))

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in self.stored_fields()}

    @classmethod
    def from_json(cls, obj: dict, path: Path | None = None) -> Manifest:
        missing = [n for n in cls.stored_fields() if n not in obj]
        if missing:
            raise ValueError(f"manifest lacks {missing}")
        return cls(**{n: obj[n] for n in cls.stored_fields()}, path=path)


@dataclass(frozen=True)
class EntryStatus:
    """Where an entry stands: state "built", "missing", "corrupt", "stale" (built with other
    hyper-parameters) or "hub"; `reason` says why; `manifest` is set when built or stale."""

    name: str
    state: Literal["built", "missing", "corrupt", "stale", "hub"]
    reason: str
    path: Path | None
    manifest: Manifest | None = None

    @property
    def built(self) -> bool:
        return self.state == "built"


# --------------------------------------------------------------------------- registry

_ENTRIES: dict[str, ZooSpec] = {}


def register_entry(spec: ZooSpec, tiny: ClassifierHP | TrajectoryHP | None = None) -> ZooSpec:
    """Add `spec` (and `<name>-tiny` built with `tiny` hyper-parameters) to the zoo.

    Every name becomes a model alias; so does `<name>@<step>` for each declared trajectory step.

    Raises:
        ValueError: a name is already taken.
    """
    specs = [spec]
    if tiny is not None:
        specs.append(dataclasses.replace(spec, name=f"{spec.name}-tiny", hparams=tiny, scale="tiny",
                                         parent=None, description=f"tiny test variant of {spec.name}"))
    for s in specs:
        if s.name in _ENTRIES:
            raise ValueError(f"zoo entry {s.name!r} is already registered")
        _ENTRIES[s.name] = s
        _register_aliases(s)
    return spec


def _register_aliases(spec: ZooSpec) -> None:
    if spec.kind == "hub":
        register_alias(spec.name, lambda r=spec.hparams.repo: r, f"{spec.description} [hub]")
        return
    register_alias(spec.name, lambda n=spec.name: resolve_zoo(n), f"{spec.description} [zoo]")
    if spec.kind == "trajectory":
        for step in spec.hparams.checkpoints:
            register_alias(f"{spec.name}@{step}", lambda n=f"{spec.name}@{step}": resolve_zoo(n),
                           f"{spec.name} checkpoint at step {step} [zoo]")


def entries() -> tuple[ZooSpec, ...]:
    """Every zoo entry, in registration order."""
    return tuple(_ENTRIES.values())


def get_spec(name: str) -> ZooSpec:
    """The spec of entry `name` (without any `@step`).

    Raises:
        KeyError: unknown name, with close matches.
    """
    if name in _ENTRIES:
        return _ENTRIES[name]
    close = difflib.get_close_matches(name, list(_ENTRIES), n=3)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    raise KeyError(f"unknown zoo entry {name!r}: {hint}Zoo entries: {', '.join(_ENTRIES)} "
                   "(`neuronbench zoo ls` lists them)")


def scaled_name(name: str, scale: str = "full") -> str:
    """The entry `build(name, scale=scale)` builds: `<name>-tiny` for tiny local entries."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} must be one of {SCALES}")
    spec = get_spec(name)
    if scale == "full" or spec.kind == "hub" or spec.scale == "tiny":
        return spec.name
    return get_spec(f"{spec.name}-tiny").name


def entry_dir(name: str) -> Path:
    """The folder of local entry `name` (it may not exist yet)."""
    return zoo_dir() / get_spec(name).name


# --------------------------------------------------------------------------- status

def status(name: str) -> EntryStatus:
    """Check entry `name` on disk: manifest present and parseable, built with the current
    hyper-parameters, every recorded file present at its recorded size."""
    spec = get_spec(name)
    if spec.kind == "hub":
        return EntryStatus(spec.name, "hub", "on the Hugging Face hub, not stored locally", None)
    folder = entry_dir(spec.name)
    if not folder.is_dir():
        return EntryStatus(spec.name, "missing", "not built", folder)
    try:
        manifest = Manifest.from_json(json.loads((folder / MANIFEST).read_text()), folder)
    except FileNotFoundError:
        return EntryStatus(spec.name, "corrupt", f"no {MANIFEST}", folder)
    except (ValueError, TypeError) as err:
        return EntryStatus(spec.name, "corrupt", f"unreadable {MANIFEST} ({err})", folder)
    problem = _check_files(folder, manifest.files)
    if problem:
        return EntryStatus(spec.name, "corrupt", problem, folder)
    if manifest.hparams != _jsonable(dataclasses.asdict(spec.hparams)):
        return EntryStatus(spec.name, "stale", "built with other hyper-parameters", folder, manifest)
    return EntryStatus(spec.name, "built", f"built {manifest.created}", folder, manifest)


def _check_files(folder: Path, files: object) -> str | None:
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    for rel, size in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def _jsonable(obj):
    return json.loads(json.dumps(obj))


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
    builder = {"classifier": zoo_train.build_classifier, "trajectory": zoo_train.build_trajectory}[spec.kind]
    start = time.perf_counter()
    final = entry_dir(spec.name)
    with atomic_dir(final) as tmp:
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
    from .records import package_versions

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


# --------------------------------------------------------------------------- resolving

def locate(name: str) -> tuple[str, str | None] | None:
    """(model id or folder, hub revision or None) of a zoo name, or None if it is not one.

    `ptb-lm` is the last checkpoint, `ptb-lm@300` (or `@step300`) the one at step 300;
    `pythia-70m@step1000` is ("EleutherAI/pythia-70m", "step1000").

    Raises:
        FileNotFoundError: a local entry that is not built (or is damaged): run `zoo build`.
        KeyError: a step the trajectory does not have, or `@` on a classifier.
    """
    base, at, suffix = name.partition("@")
    spec = _ENTRIES.get(base)
    if spec is None:
        return None
    if spec.kind == "hub":
        return spec.hparams.repo, (suffix if at else spec.hparams.revision)
    if at and spec.kind != "trajectory":
        raise KeyError(f"zoo entry {base!r} is a {spec.kind} with no checkpoints; drop '@{suffix}'")
    step = _parse_step(spec, suffix) if at else None
    st = status(base)
    if not st.built:
        raise FileNotFoundError(f"zoo model {base!r} is {st.state} ({st.reason}): run "
                                f"`neuronbench zoo build {base}` to build it")
    if spec.kind == "classifier":
        return str(st.path), None
    return str(step_dir(st.path, step or spec.hparams.checkpoints[-1])), None


def resolve_zoo(name: str) -> str | None:
    """The local folder or hub id of zoo name `name` (see `locate`), or None if it is not one."""
    found = locate(name)
    return found[0] if found else None


def _parse_step(spec: ZooSpec, suffix: str) -> int:
    steps = spec.hparams.checkpoints
    text = suffix[4:] if suffix.startswith("step") else suffix
    if text.isdigit() and int(text) in steps:
        return int(text)
    near = [min(steps, key=lambda s: abs(s - int(text)))] if text.isdigit() else []
    hint = f"did you mean {spec.name}@{near[0]}? " if near else ""
    raise KeyError(f"{spec.name!r} has no checkpoint {suffix!r}: {hint}its steps are "
                   f"{', '.join(map(str, steps))}")


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
    return ""


# --------------------------------------------------------------------------- command line

def add_zoo_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `zoo` verb (`zoo ls [--json]`, `zoo build [NAME ...]`) to the CLI's subparsers."""
    p = subparsers.add_parser("zoo", help="list and build the model zoo (fine-tuned and trajectory models)")
    sub = p.add_subparsers(dest="zoo_command", required=True)
    ls = sub.add_parser("ls", help="list zoo entries, whether built, and their metrics")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    b = sub.add_parser("build", help="build zoo entries (all local full-size ones by default); cached")
    b.add_argument("names", nargs="*", metavar="NAME", help="entries to build")
    b.add_argument("--tiny", action="store_true", help="build the tiny variants (seconds)")
    b.add_argument("--force", action="store_true", help="rebuild even if built")
    b.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(fn=zoo_cli)
    return p


def zoo_cli(args: argparse.Namespace) -> int:
    """Run `zoo ls` or `zoo build` from parsed arguments; prints, returns the exit code."""
    if args.zoo_command == "ls":
        rows = ls_json()
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for r in rows:
            print(f"{r['name']:<26} {r['kind']:<10} {r['state']:<8} {_describe(r)}")
        return 0
    scale = "tiny" if args.tiny else "full"
    names = args.names or [s.name for s in entries() if s.kind != "hub" and s.scale == "full"]
    names = [scaled_name(n, scale) for n in names]  # unknown names fail here, before any build
    built = [build(n, force=args.force, progress=not args.no_progress) for n in names]
    print(f"{'entry':<26} {'result':<20} metrics")
    for m in built:
        what = ("hub, not local" if m.kind == "hub" else "cache hit" if m.cached
                else f"built in {m.wall_time_s:.0f} s")
        row = {"metrics": _summary_metrics(get_spec(m.name), m) if m.kind != "hub" else {}}
        print(f"{m.name:<26} {what:<20} {_describe(row)}")
    return 0


# --------------------------------------------------------------------------- the entries

register_entry(
    ZooSpec("minilm-polarity", "classifier", "minilm", ClassifierHP(),
            "all-MiniLM-L6-v2 fully fine-tuned on the Pang & Lee polarity sentences"),
    tiny=ClassifierHP(init="tiny-bert", lr=3e-3, batch_size=32, max_length=32, epochs=3, limit=None,
                      probe_l2=(1e-2,)))
register_entry(
    ZooSpec("ptb-lm", "trajectory", None, TrajectoryHP(),
            "2-layer 128-wide GPT-2 trained from scratch on PTB; ptb-lm@STEP for its 10 checkpoints"),
    tiny=TrajectoryHP(n_embd=32, n_head=2, seq_len=16, batch_size=4, warmup_steps=2,
                      checkpoints=(1, 2, 3, 5, 8), eval_tokens=512, train_lines=500))
register_entry(ZooSpec("pythia-70m", "hub", None, HubRef("EleutherAI/pythia-70m"),
                       "Pythia 70M; pythia-70m@stepN is its training checkpoint N"))
register_entry(ZooSpec("bert-base-uncased", "hub", None, HubRef("bert-base-uncased"),
                       "BERT base, uncased"))
register_entry(ZooSpec("bert-base-uncased-sst2", "hub", "bert-base-uncased",
                       HubRef("textattack/bert-base-uncased-SST-2"), "BERT base fine-tuned on SST-2 (TextAttack)"))
