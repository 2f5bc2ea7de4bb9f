"""The ``squant`` command line: argument parsing, exit codes, one line on stderr per error."""

from __future__ import annotations

import argparse
import sys

from .errors import QuantizationError


def _demo(_: argparse.Namespace) -> None:
    from .demo import main

    main()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="squant", description="Data-free SQuant quantization.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="quantize the bundled Fashion-MNIST model and "
                               "compare round-to-nearest with SQuant")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``squant`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (QuantizationError, TypeError, OSError) as error:
        print(f"squant: error: {error}", file=sys.stderr)
        return 1
    return 0
