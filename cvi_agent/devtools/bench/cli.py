"""`cvi-agent bench`'s command: run it, print the table or the JSON."""

from __future__ import annotations

import argparse
import json
import sys

from cvi_agent.devtools.bench.options import params_from_args
from cvi_agent.devtools.bench.report import format_table
from cvi_agent.devtools.bench.run import run_bench


def run_cli(args: argparse.Namespace) -> int:
    """Run `cvi-agent bench`; exit status 1 when any request failed, 2 when it could not run."""
    params = params_from_args(args)
    try:
        report = run_bench(params, progress=sys.stderr.isatty() and not args.json)
    except RuntimeError as exc:
        print(f"cvi-agent bench: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    return 1 if report["errors"] else 0
