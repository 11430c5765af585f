"""`trt-latency` console script: one sub-command per arrow of the data flow.

Each verb lives in its own module exposing ``register(subparsers)`` (adds its parser and sets
``func``) so verbs can be read and changed one at a time. Exit codes: 0 ok, 1 failure, 2 usage.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from trt_latency.errors import TrtLatencyError

# Order = order in `trt-latency --help`: the data flow from engine to serving loop.
VERBS = ("calibrate", "inspect", "export", "sweep", "fit", "predict", "admit", "choose", "replay", "analyze",
         "compare", "bench", "loadtest", "serve")  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line on usage errors (its default), kept for clarity."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="trt-latency",
        description=(
            "Time an exported LLM/VLM engine per KV-cache position, fit a position-dependent decode "
            "model, and answer per-request latency / admission questions in well under a microsecond."
        ),
        epilog="Run `trt-latency VERB --help` for a verb's options and an example.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in VERBS:
        # A verb listed here must exist: a typo is an ImportError now, not a verb silently missing.
        importlib.import_module(f"trt_latency.cli.{verb}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from trt_latency.cli import _extras

    missing = _extras.missing_line(args)
    if missing:
        print(missing, file=sys.stderr)
        return 1
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as exc:
        line = _extras.message(args.verb, exc.name or "")
        if line is None or args.debug:
            raise
        print(line, file=sys.stderr)
        return 1
    except TrtLatencyError as exc:
        if args.debug:
            raise
        print(f"trt-latency {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"trt-latency {args.verb}: interrupted (finished rows are kept; rerun to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
