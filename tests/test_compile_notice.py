"""The one-line notice while numba compiles squant's kernels: once, only on a real compile."""

from __future__ import annotations

import logging
import subprocess
import sys
from types import SimpleNamespace

import numba
import pytest
import torch

import squant
from squant.core import compile_notice


def fresh_function(module: str):
    """A new numba function that appears to live in ``module`` (not compiled yet)."""

    def add_one(x):
        return x + 1

    add_one.__module__ = module
    return numba.njit(add_one)


@pytest.fixture
def notice():
    compile_notice.install()
    before = compile_notice._notice.said
    compile_notice._notice.said = False
    yield compile_notice._notice
    compile_notice._notice.said = before


def test_the_first_squant_compile_logs_one_warning(notice, caplog):
    with caplog.at_level(logging.WARNING, logger="squant"):
        fresh_function("tests.not_squant")(1)
        assert not caplog.records  # other packages' compiles say nothing
        fresh_function("squant.kernels.fake")(1)
        fresh_function("squant.kernels.fake")(2.0)
    assert [r.getMessage() for r in caplog.records] == [compile_notice.MESSAGE]
    assert caplog.records[0].levelno == logging.WARNING


def test_an_already_compiled_call_says_nothing(notice, caplog):
    squant.quantize_weight(torch.randn(4, 3, 3, 3), bits=4)  # compiled or loaded by now
    with caplog.at_level(logging.WARNING, logger="squant"):
        squant.quantize_weight(torch.randn(4, 3, 3, 3), bits=4)
    assert not caplog.records


def test_a_process_that_loads_the_cache_says_nothing():
    squant.quantize_weight(torch.randn(4, 3, 3, 3), bits=4)  # the cache holds them now
    code = "import squant, torch; squant.quantize_weight(torch.randn(4, 3, 3, 3), bits=4)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert "compiling" not in result.stderr


def test_the_cli_quiet_flag_silences_it_while_it_runs(tmp_path, monkeypatch):
    from squant import cli

    logger = logging.getLogger("squant")
    level = logger.level
    seen = {}
    parser = cli.build_parser()

    def record(args):
        seen[args.quiet] = logger.isEnabledFor(logging.WARNING)

    def parse(argv):
        args = parser.parse_args(argv)
        args.run = record
        return args

    monkeypatch.setattr(cli, "build_parser", lambda: SimpleNamespace(parse_args=parse))
    for quiet in (True, False):
        source, out = str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")
        assert cli.main(["quantize", source, out, *(["--quiet"] if quiet else [])]) == 0
        assert logger.level == level  # restored: main leaves the process's logging as it was
    assert seen == {True: False, False: logger.isEnabledFor(logging.WARNING)}
