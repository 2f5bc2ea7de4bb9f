"""A busy machine for benchmarks: other processes spinning on the cores while squant runs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_SPIN = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end: pass\n"


@contextmanager
def busy_cores(count: int, limit_seconds: float = 1800.0) -> Iterator[None]:
    """Run ``count`` busy-loop processes for the duration of the block (each stops by itself
    after ``limit_seconds`` at the latest, should this process die first)."""
    spinners = [subprocess.Popen([sys.executable, "-c", _SPIN.format(limit=limit_seconds)])
                for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
