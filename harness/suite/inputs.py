"""Check a run's `--model`, `--parent` and `--data` against what each task takes, before any work.

Every refusal is one `ValueError` line (the CLI prints it and exits 2, writing nothing); a task
that cannot take a given data file keeps its own data and says so.
"""
from __future__ import annotations

import logging
from dataclasses import replace

from ..engine import catalogue, zoo_family
from ..engine.data import get_data, load
from .task import RunEnv, TaskSpec

log = logging.getLogger(__name__)


def model_kind(name: str, env: RunEnv) -> str:
    """`trajectory` or `classifier` for zoo entries of those kinds (without building them), and
    `trajectory` for a zoo family or a user's checkpoint list (`a,b;c,d`: ppl-trend reads it), else
    the kind of the loaded model (`classifier`, `causal-lm` or `base`)."""
    if name in zoo_family.FAMILIES or "," in name or ";" in name:
        return "trajectory"
    base = name.partition("@")[0]
    if base in _zoo_names():
        kind = catalogue.get_spec(base).kind
        if kind in ("trajectory", "classifier"):
            return kind
    return env.model(name).kind


def default_parent(model: str) -> str | None:
    """The parent a zoo entry records (the model it was fine-tuned from), else None: a stage
    method then has no earlier stage and is not applicable unless `--parent` names one."""
    base = model.partition("@")[0]
    return catalogue.get_spec(base).parent if base in _zoo_names() else None


def check_model(spec: TaskSpec, env: RunEnv) -> str:
    """The kind of `spec.model`, after refusing a kind the task does not take or an untrained head."""
    takes = spec.takes
    kind = model_kind(spec.model, env)
    if takes is None:
        raise ValueError(f"task {spec.name!r} takes neither another model nor your data (its protocol fixes "
                         f"both); drop {spec.name} from --tasks, or run it without --model and --data")
    if kind not in takes.models:
        wants = " or ".join(takes.models)
        extra = (" (a zoo trajectory or family, or checkpoints in training order: 'a,b,c;d,e,f')"
                 if "trajectory" in takes.models else "")
        raise ValueError(f"task {spec.name!r} scores a {wants} model{extra}; {spec.model!r} is a {kind} model: "
                         f"drop {spec.name} from --tasks or pass a model of that kind")
    if kind == "classifier" and spec.model not in _zoo_names():
        head = env.model(spec.model).untrained_head
        if head:
            raise ValueError(f"task {spec.name!r}: the classifier head of {spec.model!r} was never trained "
                             f"(newly initialised on load: {', '.join(head[:4])}); scoring it would score "
                             "random weights: fine-tune it and point --model at the fine-tuned folder")
    return kind


def _zoo_names() -> set[str]:
    return {e.name for e in catalogue.entries()}


def assign_data(specs: list[TaskSpec], kinds: dict[str, str], files: tuple[str, ...]) -> list[TaskSpec]:
    """Give each task the one file among `files` whose data kind it takes for its model's kind
    (`kinds[task]`); a task that takes none keeps its data (logged). Files are read and validated
    here (line-numbered errors); a file no task takes, or two files one task takes, are refused."""
    read = {f: get_data(f).kind for f in files}
    used: set[str] = set()
    out = []
    for spec in specs:
        accepted = spec.takes.data_kinds(kinds[spec.name]) if spec.takes else ()
        fits = [f for f in files if read[f] in accepted]
        if len(fits) > 1:
            raise ValueError(f"task {spec.name!r} takes {' or '.join(accepted)} data and several --data files "
                             f"are of that kind ({', '.join(fits)}): give one")
        if not fits:
            log.warning("%s keeps its data %s: it takes %s data with a %s model", spec.name, spec.data,
                        " or ".join(accepted) or "no other", kinds[spec.name])
            out.append(spec)
            continue
        used.add(fits[0])
        corpus = load(fits[0], spec.split_seed)
        out.append(replace(spec, data=fits[0], data_fingerprint=corpus.fingerprint[:16]))
    for f in files:
        if f not in used:
            wants = "; ".join(f"{s.name} takes {' or '.join(s.takes.data_kinds(kinds[s.name])) or 'none'}"
                              if s.takes else f"{s.name} takes none" for s in specs)
            raise ValueError(f"--data {f} is {read[f]} data, which none of the tasks takes with these models "
                             f"({wants}); data kinds: sentence = text+label, tokens = word/TAG lines, lm = plain text")
    return out


def check_inputs(specs: list[TaskSpec], env: RunEnv, model_given: bool, files: tuple[str, ...]) -> list[TaskSpec]:
    """`specs` checked against their tasks' `Takes` (models when `--model` replaced them, every
    parent, the data files), with the data files assigned. Raises ValueError on any refusal."""
    kinds = {}
    for spec in specs:
        kinds[spec.name] = check_model(spec, env) if model_given or files else model_kind(spec.model, env)
        if spec.parent and spec.parent != spec.model:
            env.model(spec.parent)  # a parent that cannot load fails here, before any work
    return assign_data(specs, kinds, files) if files else specs


def add_input_arguments(parser) -> None:
    """`run`'s --model, --parent and --data, which `check_inputs` checks."""
    parser.add_argument("--model", help="run the tasks on this model (alias, hub id or folder), checked first")
    parser.add_argument("--parent", help="the earlier stage of --model, for methods that compare stages "
                                         "(default: the zoo entry's parent, else none)")
    parser.add_argument("--data", nargs="+", help="your data files (CSV/JSON/JSONL text+label, word/TAG .txt, plain "
                                                  "text .txt); each task takes the file whose kind it accepts")
