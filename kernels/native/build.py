"""Build the kernels ahead of time: numba's machine code for :func:`quantize_blocks`, linked by
the system's C compiler into a shared library that :mod:`squant.kernels.native` loads with
ctypes.

Why: numba compiles the kernels on their first call after installation (about 20 s on a 2-core
machine), and even cached it must be imported and load them (about 1 s). The library is made of
the very functions the JIT runs (``quantize_block`` and what it calls, compiled by numba for this
machine's CPU): the same code, so the same codes bit for bit, loaded in milliseconds.

How: two ``numba.cfunc`` entries (without and with the range search's inputs) take one int64
array of addresses and counts (:data:`squant.kernels.native.ARGS`); they allocate nothing
(the caller passes scratch memory laid out by :func:`squant.kernels.constants.scratch_layout`).
numba's finalized module of each is emitted as a position-independent object for the host
CPU and linked with a few C stubs (``support.c``) for the numba runtime symbols the wrappers
reference: only their error paths use them, and those report a failure to the caller, which
raises. On a CPU with AVX2 the library also holds three passes written in C with AVX2
intrinsics, KQ on 3x3 kernels (``kernel_pass_3x3.c``), CQ after it (``channel_pass_handed.c``)
and CQ after EQ (``channel_pass_eq.c``), which numba's code calls through the addresses the
driver passes (see :mod:`..native_passes`).

Run ``python -m squant.kernels.native.build`` (at install, setup.py does it) to write
``squant_kernels.so`` and its record ``squant_kernels.json`` next to this file, or
``--out DIR``. Needs numba and a C compiler (``cc``, or ``$CC``); without one it says so and
squant uses numba's JIT.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import llvmlite.binding as llvm
import numba
import numpy as np
from numba import cfunc, types

from ..constants import STAT_COUNT
from ..error_stats import add_error_stats
from ..memory import view_at
from ..packing import pack_groups, unpack_groups
from ..passes import block_extent, quantize_block
from . import ARGS, LIBRARY, RECORD, cpu_identity, host_cpu, source_digest

# Positions in the argument arrays, in the order of ARGS (globals: numba freezes them).
(_CHANNELS, _BLOCKS, _FIRST_BLOCK, _LAST_BLOCK, _CH_ADDRESS, _CH_CODES_ADDRESS, _CH_INNER,
 _CH_KSIZE, _CH_BITS, _CH_FLAGS, _CH_LO, _CH_HI, _BLOCK_START, _SCALE, _ZERO, _FINITE, _MOMENTS,
 _MOMENT_COUNT, _CH_MOMENTS_START, _SCRATCH, _NATIVE_PASSES) = range(len(ARGS["quantize_blocks"]))
_COUNT = len(ARGS["quantize_blocks"])
_CODES, _CODE_COUNT, _BITS, _PACKED, _PACKED_COUNT, _FIRST, _LAST = range(len(ARGS["pack_groups"]))
_PACK_COUNT = len(ARGS["pack_groups"])
(_W, _STAT_CODES, _STAT_CHANNELS, _STAT_KERNELS, _STAT_KSIZE, _STAT_SCALE, _STAT_ZERO, _T_MIN,
 _T_MAX, _OUT, _STAT_SCRATCH, _STAT_SCRATCH_SIZE) = range(len(ARGS["add_error_stats"]))
_STAT_ARG_COUNT = len(ARGS["add_error_stats"])
_SIGNATURE = types.int64(types.CPointer(types.int64))
HERE = Path(__file__).resolve().parent


@numba.njit(inline="always")
def _tables(a):
    """The batch's per-channel tables and outputs, viewed from the argument array ``a``."""
    n = a[_CHANNELS]
    return (view_at(a[_CH_ADDRESS], n, np.int64), view_at(a[_CH_CODES_ADDRESS], n, np.int64),
            view_at(a[_CH_INNER], n, np.int64), view_at(a[_CH_KSIZE], n, np.int64),
            view_at(a[_CH_BITS], n, np.int64), view_at(a[_CH_FLAGS], n, np.int64),
            view_at(a[_CH_LO], n, np.float32), view_at(a[_CH_HI], n, np.float32),
            view_at(a[_SCALE], n, np.float32), view_at(a[_ZERO], n, np.float32),
            view_at(a[_FINITE], n, np.bool_))


@numba.njit(inline="always")
def _run(a, moments):
    """Blocks ``a[first_block] .. a[last_block] - 1``, as :func:`.passes.quantize_blocks`."""
    (ch_address, ch_codes_address, ch_inner, ch_ksize, ch_bits, ch_flags, ch_lo, ch_hi, scale,
     zero, finite) = _tables(a)
    block_start = view_at(a[_BLOCK_START], a[_BLOCKS] + 1, np.int64)
    ch_moments_start = view_at(a[_CH_MOMENTS_START], a[_CHANNELS], np.int64)
    for b in range(a[_FIRST_BLOCK], a[_LAST_BLOCK]):
        first, last = block_start[b], block_start[b + 1]
        max_size, max_inner, max_ksize = block_extent(ch_inner, ch_ksize, first, last)
        quantize_block(ch_address, ch_codes_address, ch_inner, ch_ksize, ch_bits, ch_flags, ch_lo,
                       ch_hi, scale, zero, finite, first, last, moments, ch_moments_start,
                       a[_SCRATCH], max_size, max_inner, max_ksize, a[_NATIVE_PASSES])
    return np.int64(1)


@cfunc(_SIGNATURE, cache=False)
def _quantize_blocks(args):
    return _run(numba.carray(args, _COUNT), None)


@cfunc(_SIGNATURE, cache=False)
def _quantize_blocks_searched(args):
    a = numba.carray(args, _COUNT)
    return _run(a, view_at(a[_MOMENTS], a[_MOMENT_COUNT], np.float64))


@cfunc(_SIGNATURE, cache=False)
def _pack_groups(args):
    a = numba.carray(args, _PACK_COUNT)
    pack_groups(view_at(a[_CODES], a[_CODE_COUNT], np.int8), a[_BITS],
                view_at(a[_PACKED], a[_PACKED_COUNT], np.uint8), a[_FIRST], a[_LAST])
    return np.int64(1)


@cfunc(_SIGNATURE, cache=False)
def _unpack_groups(args):
    a = numba.carray(args, _PACK_COUNT)
    unpack_groups(view_at(a[_PACKED], a[_PACKED_COUNT], np.uint8), a[_BITS],
                  view_at(a[_CODES], a[_CODE_COUNT], np.int8), a[_FIRST], a[_LAST])
    return np.int64(1)


@cfunc(_SIGNATURE, cache=False)
def _error_stats(args):
    a = numba.carray(args, _STAT_ARG_COUNT)
    shape = (a[_STAT_CHANNELS], a[_STAT_KERNELS], a[_STAT_KSIZE])
    add_error_stats(view_at(a[_W], shape, np.float32), view_at(a[_STAT_CODES], shape, np.int8),
                    view_at(a[_STAT_SCALE], shape[0], np.float32),
                    view_at(a[_STAT_ZERO], shape[0], np.float32), a[_T_MIN], a[_T_MAX],
                    view_at(a[_OUT], STAT_COUNT, np.float64),
                    view_at(a[_STAT_SCRATCH], a[_STAT_SCRATCH_SIZE], np.float64))
    return np.int64(1)


def _object_code(entry, machine: llvm.TargetMachine) -> bytes:
    """The entry's finalized module (its callees linked in) as an object made by ``machine``."""
    library = entry._library
    library._ensure_finalized()
    return machine.emit_object(library._final_module)


def build(out: Path) -> Path:
    """Compile and link the library into ``out`` (a folder); returns the library's path.

    Raises ``RuntimeError`` naming the command when the C compiler fails or is missing.
    Writes the library and its record atomically (a failed build leaves the old ones or none).
    """
    out.mkdir(parents=True, exist_ok=True)
    compiler = shlex.split(os.environ.get("CC", "cc"))
    entries = {"quantize_blocks": _quantize_blocks,
               "quantize_blocks_searched": _quantize_blocks_searched,
               "pack_groups": _pack_groups, "unpack_groups": _unpack_groups,
               "add_error_stats": _error_stats}
    cpu, features = host_cpu()
    machine = llvm.Target.from_triple(llvm.get_process_triple()).create_target_machine(
        cpu=cpu, features=features, opt=3, reloc="pic", codemodel="default")
    with tempfile.TemporaryDirectory(dir=out) as work:
        objects = []
        for name, entry in entries.items():
            path = Path(work) / f"{name}.o"
            path.write_bytes(_object_code(entry, machine))
            objects.append(str(path))
        library = Path(work) / LIBRARY
        sources = [str(HERE / "support.c")]
        flags = ["-O2"]
        if "+avx2" in features.split(","):  # the passes in C with AVX2 intrinsics
            sources += [str(HERE / name) for name in (
                "kernel_pass_3x3.c", "channel_pass_handed.c", "channel_pass_eq.c")]
            flags += ["-mavx2", "-ffp-contract=off"]  # no fused multiply-adds: numba has none
        command = [*compiler, "-shared", "-fPIC", *flags, "-o", str(library), *objects,
                   *sources, "-lm"]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or str(error)
            raise RuntimeError(f"linking the native kernels failed: {' '.join(command)}: "
                               f"{detail.strip()}") from error
        try:  # every symbol resolved now (numba's own helpers are not loaded at run time)
            ctypes.CDLL(str(library), mode=os.RTLD_NOW | os.RTLD_LOCAL)
        except OSError as error:
            raise RuntimeError(f"the native kernels do not load: {error}") from error
        record = {"source": source_digest(), "cpu_identity": cpu_identity(), "cpu": cpu,
                  "features": features,
                  "numba": numba.__version__, "platform": sys.platform,
                  "symbols": {name: entry.native_name for name, entry in entries.items()}}
        (Path(work) / RECORD).write_text(json.dumps(record, indent=1))
        (out / RECORD).unlink(missing_ok=True)  # never a new library under an old record
        os.replace(library, out / LIBRARY)
        os.replace(Path(work) / RECORD, out / RECORD)
    return out / LIBRARY


def main() -> None:
    """``python -m squant.kernels.native.build [--out DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write the library to")
    args = parser.parse_args()
    print(f"squant: native kernels written to {build(args.out)}")


if __name__ == "__main__":
    main()
