"""Shared test helpers: the conformance data and the spec oracle live beside the tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session", autouse=True)
def outside_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run the tests, and the subprocesses they start, from a folder outside the checkout: from
    its root, ``python -m squant`` and ``python -c`` would import the source folder instead of
    the installed package (and compile its kernels a second time)."""
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels() -> None:
    """Compile (or load) every numba function once, in this process, before any test: the
    subprocesses that tests start then load them from numba's cache, and their stderr holds
    only what the test is about, not the one-time "compiling the kernels" notice."""
    import squant
    from squant.io.packing import pack_codes, unpack_codes

    codes = squant.quantize_weight(np.ones((2, 3, 3), np.float32), bits=4).codes.numpy()
    squant.quantize_weights([np.ones((2, 3), np.float32)], bits=4, range="search")
    unpack_codes(pack_codes(codes.reshape(-1), 4), 4, codes.size)


@pytest.fixture(scope="session")
def native_kernels(tmp_path_factory: pytest.TempPathFactory):
    """The native kernels: the installed library, else one built for this test session (needs
    a C compiler: skipped without one, as squant then runs numba's JIT only)."""
    from squant.kernels import native

    installed, _ = native.try_load()
    if installed is not None:
        return installed
    if shutil.which(os.environ.get("CC", "cc").split()[0]) is None:
        pytest.skip("no C compiler: the native kernels cannot be built here")
    from squant.kernels.native.build import build

    folder = tmp_path_factory.mktemp("native")
    build(folder)
    built, why = native.try_load(folder)
    assert built is not None, why
    return built


@pytest.fixture(params=["native", "jit"])
def both_kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once with the native kernels and once with numba's JIT."""
    from squant import kernels
    from squant.core import batch

    if request.param == "native":
        entry: Callable = request.getfixturevalue("native_kernels").quantize_blocks
    else:
        entry = kernels.quantize_blocks
    other = batch.kernel
    monkeypatch.setattr(batch, "kernel",
                        lambda name: entry if name == "quantize_blocks" else other(name))
    return request.param
