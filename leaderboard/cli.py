"""`neuronbench submit export|validate|score`: make a submission, check it, re-score it."""
from __future__ import annotations

import json
import time


def _export(args) -> int:
    from .export import ExportConfig, export_submission

    config = ExportConfig(method=args.method, out=args.out, tasks=tuple(args.tasks or ()), quick=args.quick,
                          seed=args.seed, model=args.model, authors=tuple(args.authors), contact=args.contact,
                          description=args.description, code_url=args.code_url, license=args.license,
                          method_version=args.method_version)
    start = time.perf_counter()
    result = export_submission(config, progress=True)
    print(f"wrote {result.folder}/ ({', '.join(result.seconds)}) in {time.perf_counter() - start:.0f} s; "
          f"check it with `neuronbench submit validate {result.folder}`")
    return 0


def _validate(args) -> int:
    from .validate import validate

    problems = validate(args.folder)
    if args.json:
        print(json.dumps([{"file": p.file, "row": p.row, "field": p.field, "message": p.message}
                          for p in problems], indent=2))
    elif problems:
        print(f"{args.folder}: {len(problems)} problems")
        for p in problems:
            print(f"  {p}")
    else:
        print(f"{args.folder}: valid submission")
    return 1 if problems else 0


def _score(args) -> int:
    from neuronbench.harness.suite.report import text_table
    from neuronbench.harness.suite.runner import summary
    from neuronbench.harness.suite.task import read_hidden_seed

    from .score import InvalidSubmission, ScoreConfig, score_submission

    hidden_seed = read_hidden_seed(args.hidden_seed_file) if args.split == "hidden" else None
    config = ScoreConfig(submission=args.folder, out=args.out, split=args.split, tasks=tuple(args.tasks or ()),
                         submitter=args.submitter)
    try:
        frame, _ = score_submission(config, hidden_seed=hidden_seed, progress=True)
    except InvalidSubmission as err:
        print(err)
        return 1
    print(text_table(summary(frame)))
    print(f"{len(frame)} records ({args.split} split); written to {args.out}/")
    return 0


def add_submit_parser(sub) -> None:
    """Add `submit export|validate|score` to the `neuronbench` command line."""
    p = sub.add_parser("submit", help="leaderboard submissions: export, validate, score")
    ssub = p.add_subparsers(dest="action", required=True)
    e = ssub.add_parser("export", help="run a method on the tasks and write its outputs as a submission")
    e.add_argument("--method", required=True, help="a baseline name or path.to.module:Class")
    e.add_argument("--tasks", nargs="+", help="task names (default: every task the method's verbs cover)")
    e.add_argument("--quick", action="store_true", help="export for the quick specs (tiny models)")
    e.add_argument("--seed", type=int, default=0, help="the run seed (scoring uses the same)")
    e.add_argument("--model", help="refused unless it is the tasks' own model: the board scores only those")
    e.add_argument("--out", required=True, help="the submission folder to create (must not exist)")
    e.add_argument("--authors", nargs="+", default=["anonymous"])
    e.add_argument("--contact", default="", help="an e-mail address or URL")
    e.add_argument("--description", help="one paragraph (default: the method's docstring)")
    e.add_argument("--code-url", default="", help="where the method's code lives")
    e.add_argument("--license", default="unspecified", help="the licence of the method's code")
    e.add_argument("--method-version", help="default: the method's `version` or its package's version")
    e.set_defaults(fn=_export)
    v = ssub.add_parser("validate", help="check a submission strictly; exit 0 valid, 1 invalid")
    v.add_argument("folder")
    v.add_argument("--json", action="store_true", help="print the problems as JSON")
    v.set_defaults(fn=_validate)
    s = ssub.add_parser("score", help="validate, then score a submission through the tasks")
    s.add_argument("folder")
    s.add_argument("--split", choices=("public", "hidden"), default="public")
    s.add_argument("--hidden-seed-file", help="file holding the scorer's secret seed (else $NEURONBENCH_HIDDEN_SEED)")
    s.add_argument("--tasks", nargs="+", help="a subset of the submission's tasks")
    s.add_argument("--submitter", help="who sent it (names its rows SUBMITTER/method@version; default: its contact)")
    s.add_argument("--out", required=True, help="folder for results.parquet, config.json and submission.json")
    s.set_defaults(fn=_score)
