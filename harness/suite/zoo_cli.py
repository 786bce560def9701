"""The `zoo` verbs of the command line: `zoo ls [--json]` and `zoo build [NAME ...]`."""
from __future__ import annotations

import argparse
import json

from ..engine.catalogue import entries, get_spec, scaled_name
from ..zoo.build import _describe, _summary_metrics, build, ls_json


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
    # By default every local full-size entry, or with --tiny each one that has a tiny variant.
    tiny = {s.name for s in entries() if s.scale == "tiny"}
    names = args.names or [s.name for s in entries() if s.kind != "hub" and s.scale == "full"
                           and (scale == "full" or f"{s.name}-tiny" in tiny)]
    names = [scaled_name(n, scale) for n in names]  # unknown names fail here, before any build
    built = [build(n, force=args.force, progress=not args.no_progress) for n in names]
    print(f"{'entry':<26} {'result':<20} metrics")
    for m in built:
        what = ("hub, not local" if m.kind == "hub" else "cache hit" if m.cached
                else f"built in {m.wall_time_s:.0f} s")
        row = {"metrics": _summary_metrics(get_spec(m.name), m) if m.kind != "hub" else {}}
        print(f"{m.name:<26} {what:<20} {_describe(row)}")
    return 0
