"""The kernels built ahead of time (:mod:`.build`), loaded with ctypes, without numba.

:func:`load` returns them when ``squant_kernels.so`` was built for this very source and CPU (its
record ``squant_kernels.json`` says so), else None, and squant runs numba's JIT. The environment
variable ``SQUANT_KERNELS`` chooses: ``auto`` (the default: native when it loads), ``jit``
(always numba's JIT) or ``native`` (refuse to run without the library: ``RuntimeError`` naming
why it did not load).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..constants import NATIVE_PASSES, error_stats_scratch, scratch_layout

LIBRARY = "squant_kernels.so"
RECORD = "squant_kernels.json"
HERE = Path(__file__).resolve().parent

# Each entry's one argument: an int64 array of these values in this order, addresses of arrays
# (their first element) and counts. The callers below fill it by name; native/build.py reads it
# by position. quantize_blocks_searched takes quantize_blocks' and unpack_groups pack_groups'.
ARGS = {
    "quantize_blocks": (
        "channels", "blocks", "first_block", "last_block", "ch_address", "ch_codes_address",
        "ch_inner", "ch_ksize", "ch_bits", "ch_flags", "ch_lo", "ch_hi", "block_start", "scale",
        "zero", "finite", "moments", "moment_count", "ch_moments_start", "scratch",
        "native_passes"),
    "pack_groups": ("codes", "code_count", "bits", "packed", "packed_count", "first", "last"),
    "add_error_stats": ("w", "codes", "channels", "kernels", "ksize", "scale", "zero", "t_min",
                        "t_max", "out", "scratch", "scratch_size"),
}


def source_digest() -> str:
    """SHA-256 of the kernels' sources: every ``.py``, ``.c`` and ``.h`` file of this folder and
    of the kernels' folder above it, by name."""
    digest = hashlib.sha256()
    for path in sorted([*HERE.parent.iterdir(), *HERE.iterdir()]):
        if path.suffix in (".py", ".c", ".h"):
            name = path.relative_to(HERE.parent).as_posix()
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def host_cpu() -> tuple[str, str]:
    """This machine's CPU name and features as LLVM names them (what the library targets)."""
    import llvmlite.binding as llvm  # numba's dependency; 0.05 s, numba itself is not imported

    return llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()


def cpu_identity() -> str:
    """What the library's machine code depends on, cheaply: on Linux the SHA-256 of the first
    CPU's vendor, family, model and flags in ``/proc/cpuinfo`` (what LLVM's name and features
    derive from), elsewhere LLVM's name and features (:func:`host_cpu`)."""
    try:
        with open("/proc/cpuinfo") as info:
            first = info.read().split("\n\n")[0].splitlines()
    except OSError:
        return "llvm:" + ":".join(host_cpu())
    keys = ("vendor_id", "cpu family", "model", "flags")
    kept = sorted(line for line in first if line.split(":")[0].strip() in keys)
    return "cpuinfo:" + hashlib.sha256("\n".join(kept).encode()).hexdigest()


def _address(library: ctypes.CDLL, name: str) -> int:
    """The address of the function ``name`` in ``library``, or 0 if it has none."""
    try:
        return ctypes.cast(getattr(library, name), ctypes.c_void_p).value or 0
    except AttributeError:
        return 0


def _check_arrays(*arrays: tuple, count: int | None = None) -> None:
    """Raise ``TypeError`` unless each ``(name, array, dtype)`` is a 1-D C-contiguous array of
    ``dtype`` with ``count`` elements (default: the first array's): the library reads raw
    memory, so a wrong one would be read as something else."""
    count = arrays[0][1].size if count is None else count
    for name, array, dtype in arrays:
        if (not isinstance(array, np.ndarray) or array.dtype != dtype or array.ndim != 1
                or array.size != count or not array.flags.c_contiguous):
            raise TypeError(f"native kernels: {name} must be a C-contiguous 1-D {np.dtype(dtype)} "
                            f"array of {count} elements, got {getattr(array, 'dtype', type(array))}"
                            f" {getattr(array, 'shape', '')}")


class NativeKernels:
    """The library's entries, called like :func:`..passes.quantize_blocks`."""

    def __init__(self, library: ctypes.CDLL, symbols: dict[str, str], path: Path) -> None:
        self.path = path
        self._entries = {}
        for name in ("quantize_blocks", "quantize_blocks_searched", "pack_groups",
                     "unpack_groups", "add_error_stats"):
            entry = library[symbols[name]]
            entry.restype = ctypes.c_int64
            entry.argtypes = [ctypes.c_void_p]
            self._entries[name] = entry
        # The passes in C (built for CPUs with AVX2): their addresses, 0 where absent
        self.native_passes = np.array([_address(library, name) for name in NATIVE_PASSES],
                                      np.int64)

    def quantize_blocks(self, ch_address, ch_codes_address, ch_inner, ch_ksize, ch_bits, ch_flags,
                        ch_lo, ch_hi, block_start, scale, zero, finite, first_block, last_block,
                        search_moments, ch_moments_start) -> None:
        """:func:`..passes.quantize_blocks` in the native library (same arguments and results;
        the arrays as the caller builds them: 1-D, C-contiguous, of the dtypes it documents).
        Releases the GIL. Raises ``RuntimeError`` if the library reports a failure."""
        self.prepare_quantize_blocks(ch_address, ch_codes_address, ch_inner, ch_ksize, ch_bits,
                                     ch_flags, ch_lo, ch_hi, block_start, scale, zero, finite,
                                     search_moments, ch_moments_start)(first_block, last_block)

    def prepare_quantize_blocks(self, ch_address, ch_codes_address, ch_inner, ch_ksize, ch_bits,
                                ch_flags, ch_lo, ch_hi, block_start, scale, zero, finite,
                                search_moments, ch_moments_start) -> Callable[[int, int], None]:
        """:meth:`quantize_blocks` with every argument but the block range checked and laid out
        once: returns ``run(first_block, last_block)``, which several threads may call at once
        (each call gets its own scratch). A call then costs microseconds of Python, not the
        checks' and the table's hundred: the driver calls it once per range of blocks."""
        _check_arrays(("ch_address", ch_address, np.int64),
                      ("ch_codes_address", ch_codes_address, np.int64),
                      ("ch_inner", ch_inner, np.int64), ("ch_ksize", ch_ksize, np.int64),
                      ("ch_bits", ch_bits, np.int64), ("ch_flags", ch_flags, np.int64),
                      ("ch_lo", ch_lo, np.float32), ("ch_hi", ch_hi, np.float32),
                      ("scale", scale, np.float32), ("zero", zero, np.float32),
                      ("finite", finite, np.bool_),
                      ("ch_moments_start", ch_moments_start, np.int64))
        _check_arrays(("block_start", block_start, np.int64), count=block_start.size)
        if search_moments is not None:
            _check_arrays(("search_moments", search_moments, np.float64), count=search_moments.size)
        size = ch_inner * ch_ksize
        scratch_bytes = scratch_layout(int(size.max(initial=1)), int(ch_inner.max(initial=1)),
                                       int(ch_ksize.max(initial=1)))[-1]
        moments = np.empty(0) if search_moments is None else search_moments
        name = "quantize_blocks" if search_moments is None else "quantize_blocks_searched"
        blocks = block_start.size - 1
        template = self._table(
            "quantize_blocks", channels=ch_address.size, blocks=blocks, first_block=0,
            last_block=0, ch_address=ch_address.ctypes.data,
            ch_codes_address=ch_codes_address.ctypes.data, ch_inner=ch_inner.ctypes.data,
            ch_ksize=ch_ksize.ctypes.data, ch_bits=ch_bits.ctypes.data,
            ch_flags=ch_flags.ctypes.data, ch_lo=ch_lo.ctypes.data, ch_hi=ch_hi.ctypes.data,
            block_start=block_start.ctypes.data, scale=scale.ctypes.data, zero=zero.ctypes.data,
            finite=finite.ctypes.data, moments=moments.ctypes.data, moment_count=moments.size,
            ch_moments_start=ch_moments_start.ctypes.data, scratch=0,
            native_passes=self.native_passes.ctypes.data)
        first_at, last_at, scratch_at = (ARGS["quantize_blocks"].index(key)
                                         for key in ("first_block", "last_block", "scratch"))

        def run(first_block: int, last_block: int) -> None:
            if not 0 <= first_block <= last_block <= blocks:
                raise ValueError(f"native quantize_blocks: blocks {first_block}..{last_block} "
                                 f"out of 0..{blocks}")
            table = template.copy()
            scratch = np.empty(scratch_bytes, np.uint8)
            table[first_at], table[last_at] = first_block, last_block
            table[scratch_at] = scratch.ctypes.data
            self._run_entry(name, table)

        # The arrays the table points into stay alive as long as run does.
        run.arrays = (ch_address, ch_codes_address, ch_inner, ch_ksize, ch_bits, ch_flags, ch_lo,
                      ch_hi, block_start, scale, zero, finite, moments, ch_moments_start,
                      self.native_passes)
        return run

    def _table(self, layout: str, **values: int) -> np.ndarray:
        """The int64 argument array of ``values`` in the order of ``ARGS[layout]`` (addresses
        and counts)."""
        if values.keys() != set(ARGS[layout]):
            raise TypeError(f"native {layout}: arguments {sorted(values)} are not {ARGS[layout]}")
        return np.array([values[key] for key in ARGS[layout]], np.int64)

    def _run_entry(self, name: str, table: np.ndarray) -> None:
        """The entry ``name`` on the argument array ``table`` (the caller keeps the arrays its
        addresses point into alive)."""
        if self._entries[name](table.ctypes.data) != 1:
            raise RuntimeError(f"squant's native kernels ({self.path}) failed in {name}; "
                               "SQUANT_KERNELS=jit runs numba's JIT, which names the error")

    def _call(self, name: str, layout: str, **values: int) -> None:
        """The entry ``name`` with the argument array of ``values`` (see :meth:`_table`; the
        caller keeps the arrays they point into alive)."""
        self._run_entry(name, self._table(layout, **values))

    def pack_groups(self, codes, bits, out, first, last) -> None:
        """:func:`..packing.pack_groups` in the native library (int8 ``codes`` and uint8
        ``out``, 1-D and C-contiguous)."""
        self._call("pack_groups", "pack_groups", codes=codes.ctypes.data, code_count=codes.size,
                   bits=bits, packed=out.ctypes.data, packed_count=out.size, first=first,
                   last=last)

    def unpack_groups(self, packed, bits, out, first, last) -> None:
        """:func:`..packing.unpack_groups` in the native library (uint8 ``packed`` and int8
        ``out``, 1-D and C-contiguous)."""
        self._call("unpack_groups", "pack_groups", codes=out.ctypes.data, code_count=out.size,
                   bits=bits, packed=packed.ctypes.data, packed_count=packed.size, first=first,
                   last=last)

    def add_error_stats(self, w, codes, scale, zero, t_min, t_max, out, scratch) -> None:
        """:func:`..error_stats.add_error_stats` in the native library (C-contiguous arrays of
        its dtypes; ``out`` of ``STAT_COUNT`` float64, ``scratch`` float64)."""
        channels, kernels, ksize = w.shape
        if codes.shape != w.shape or scratch.size < error_stats_scratch(channels, kernels, ksize):
            raise ValueError("add_error_stats: codes' shape or scratch's size does not fit w")
        self._call("add_error_stats", "add_error_stats", w=w.ctypes.data,
                   codes=codes.ctypes.data, channels=channels, kernels=kernels, ksize=ksize,
                   scale=scale.ctypes.data, zero=zero.ctypes.data, t_min=t_min, t_max=t_max,
                   out=out.ctypes.data, scratch=scratch.ctypes.data, scratch_size=scratch.size)


_loaded: list = []  # [NativeKernels | None, why not] once tried


def try_load(folder: Path = HERE) -> tuple[NativeKernels | None, str]:
    """The library in ``folder`` and ``""``, or None and why it cannot be used: not built, built
    from other sources than these kernels' (the record's digest), for another CPU, or not
    loadable."""
    record_path, library_path = folder / RECORD, folder / LIBRARY
    if not library_path.exists() or not record_path.exists():
        return None, f"{library_path} is not built (python -m squant.kernels.native.build)"
    try:
        record = json.loads(record_path.read_text())
        if record.get("source") != source_digest():
            return None, f"{library_path} was built from other sources of the kernels"
        if record.get("cpu_identity") != cpu_identity():
            return None, f"{library_path} was built for another CPU ({record.get('cpu')})"
        return NativeKernels(ctypes.CDLL(str(library_path)), record["symbols"],
                             library_path), ""
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
        return None, f"{library_path} does not load: {error}"


def load() -> NativeKernels | None:
    """The native kernels, or None when squant should run numba's JIT (see the module's doc).
    Tried once per process. Raises ``RuntimeError`` with ``SQUANT_KERNELS=native`` when the
    library does not load, and ``ValueError`` for another value of ``SQUANT_KERNELS``."""
    choice = os.environ.get("SQUANT_KERNELS", "auto")
    if choice not in ("auto", "jit", "native"):
        raise ValueError(f"SQUANT_KERNELS={choice!r}: expected 'auto', 'jit' or 'native'")
    if choice == "jit":
        return None
    if not _loaded:
        _loaded.extend(try_load())
    kernels, why = _loaded
    if kernels is None and choice == "native":
        raise RuntimeError(f"SQUANT_KERNELS=native, but {why}")
    return kernels


def why_not_native() -> str:
    """Why :func:`load` returned None (``SQUANT_KERNELS=jit``, or the library's problem)."""
    if os.environ.get("SQUANT_KERNELS") == "jit":
        return "SQUANT_KERNELS=jit"
    return _loaded[1] if _loaded else "not tried yet"
