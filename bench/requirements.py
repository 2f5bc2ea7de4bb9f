"""The one way a benchmark says what it lacks: one line per missing package, model or data set,
each naming the pip or apt package that provides it, then exit status 2."""

from __future__ import annotations

import sys


def exit_if_missing(benchmark: str, missing: list[str]) -> None:
    """Print ``missing`` (one install line each) and exit with status 2, if it is not empty."""
    if missing:
        print(f"missing, so {benchmark} cannot run:", *missing, sep="\n  ", file=sys.stderr)
        raise SystemExit(2)
