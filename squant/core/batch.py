"""Many weights -> per-channel tables (addresses, shapes, options) -> one kernel call -> codes.

The kernels run over blocks of channels of similar total size, drawn from every weight at once,
so a model's layers are quantized in parallel rather than one after another. The threads are
Python threads running the GIL-free kernel on disjoint block ranges (numba's ``prange`` would
cost seconds of compile time on first use), as many as :func:`max_threads` allows and the work
justifies: a small batch runs on the calling thread alone, so it pays for no parallel
region it cannot use, and a busy machine's threads pick chunks as they come free.

The kernel is the native build of the kernels when it loads (``squant.kernels.native``: no
numba import, no compile), else numba's JIT (compiled on first use, with a notice).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..kernels import native
from .groups import group_count, group_moments, group_rows
from .options import QuantOptions

_BLOCK_ELEMENTS = 1 << 15  # work per block: big enough to amortise its scratch
_MIN_ELEMENTS_PER_THREAD = 1 << 17  # about half a millisecond of KC: worth a thread hand-off
_KERNEL_PASS_COST = 3  # work of an element under KQ (kernels of 2+ elements), relative to CQ
_SEARCH_COST = len(kernels.SHRINK_FACTORS)  # the range search quantizes a channel that often
_FIT_COST = 3  # range="fit": ~3x mode E's time per element (9.4 vs 3.0 ns, SmolLM2's groups of 64)
_pool: ThreadPoolExecutor | None = None


@dataclass(frozen=True)
class BatchResult:
    """Kernel output for one weight: ``codes`` ``(O, I, K)``, ``scale``/``zero_point`` ``(O,)``
    (``(O, n_groups)`` with a ``group_size``); ``finite`` is False if the weight (as float32)
    holds a NaN or Inf: then the rest is junk."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    finite: bool


def _flags(options: QuantOptions) -> int:
    flags = 0
    if options.kernel_pass:
        flags |= kernels.KERNEL_PASS
    if options.channel_pass:
        flags |= kernels.CHANNEL_PASS
    if options.scheme == "symmetric":
        flags |= kernels.SYMMETRIC
    if options.granularity == "tensor":
        flags |= kernels.GIVEN_RANGE
    if options.range == "search":
        flags |= kernels.RANGE_SEARCH
    if options.range == "fit":
        flags |= kernels.RANGE_FIT
    if options.include_zero:
        flags |= kernels.INCLUDE_ZERO
    return flags


def _block_starts(sizes: np.ndarray) -> np.ndarray:
    """Split consecutive channels into blocks of about ``_BLOCK_ELEMENTS`` elements each."""
    ends = np.cumsum(sizes)
    cuts = np.searchsorted(ends, np.arange(_BLOCK_ELEMENTS, ends[-1], _BLOCK_ELEMENTS), "right")
    starts = np.concatenate(([0], cuts, [sizes.shape[0]])).astype(np.int64)  # non-decreasing
    return starts[np.concatenate(([True], starts[1:] != starts[:-1]))]


def max_threads() -> int:
    """The most threads squant uses: numba's setting (``numba.set_num_threads``) when numba is
    imported, else ``NUMBA_NUM_THREADS`` or the CPUs this process may run on (numba's default)."""
    if "numba" in sys.modules:
        return sys.modules["numba"].get_num_threads()
    if os.environ.get("NUMBA_NUM_THREADS", "").strip():
        return max(1, int(os.environ["NUMBA_NUM_THREADS"]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# The kernels squant calls, and the module of kernels/ that holds each one's JIT version.
_JIT_MODULES = {"quantize_blocks": "passes", "pack_groups": "packing",
                "unpack_groups": "packing", "add_error_stats": "error_stats"}


def kernel(name: str) -> Callable:
    """The kernel ``name`` (a key of ``_JIT_MODULES``): the native library's when it loads, else
    numba's JIT version (imported now; the compile notice says so when it compiles)."""
    loaded = native.load()
    if loaded is not None:
        return getattr(loaded, name)
    from . import compile_notice

    compile_notice.install(native.why_not_native())
    return getattr(importlib.import_module(f"...kernels.{_JIT_MODULES[name]}", __name__), name)


def _thread_count(elements: int, blocks: int) -> int:
    """Threads for a batch: :func:`max_threads`, fewer for little work, never more than blocks."""
    return max(1, min(max_threads(), blocks, elements // _MIN_ELEMENTS_PER_THREAD))


def _channel_work(sizes: np.ndarray, ksize: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """A rough relative cost per channel: its elements, more under KQ, the range search and
    the fit."""
    kernel_pass = (flags & kernels.KERNEL_PASS != 0) & (ksize > 1)
    search = flags & kernels.RANGE_SEARCH != 0
    fit = (flags & kernels.RANGE_FIT != 0) & ~search
    return (sizes * np.where(kernel_pass, _KERNEL_PASS_COST, 1)
            * np.where(search, _SEARCH_COST, np.where(fit, _FIT_COST, 1))).astype(np.float64)


def _chunk_cuts(block_work: np.ndarray, threads: int) -> list[int]:
    """Cut the blocks into ranges for ``threads`` threads that take them in turn, of decreasing
    work (guided scheduling): each about ``1 / (2 * threads)`` of the work left, down to
    ``1 / (16 * threads)`` of the whole, so that the threads finish close together even when
    one of them is slowed down (a busy machine) or the blocks' costs differ."""
    ends = np.cumsum(block_work)
    total = float(ends[-1])
    count = block_work.shape[0]
    cuts = [0]
    done = 0.0
    while cuts[-1] < count:
        size = max((total - done) / (2 * threads), total / (16 * threads))
        stop = int(np.searchsorted(ends, done + size, "left")) + 1
        stop = min(max(stop, cuts[-1] + 1), count)
        cuts.append(stop)
        done = float(ends[stop - 1])
    return cuts


def _run_blocks(args: tuple, search_args: tuple, block_start: np.ndarray, elements: int) -> None:
    """Run ``kernels.quantize_blocks`` over every block, on the calling thread and pool threads
    (``args`` before the block range, ``search_args`` after it), in ranges of decreasing work
    (:func:`_chunk_cuts`, weighed by :func:`_channel_work`). Each channel is quantized by
    exactly one call, so the codes do not depend on the number of threads or on which thread
    ran what."""
    count = block_start.shape[0] - 1
    threads = _thread_count(elements, count)
    run = _block_runner(kernel("quantize_blocks"), args, search_args)
    if threads == 1:
        run(0, count)
        return
    inner, ksize, flags = args[2], args[3], args[5]
    block_work = np.add.reduceat(_channel_work(inner * ksize, ksize, flags), block_start[:-1])
    _run_ranges(run, _chunk_cuts(block_work, threads), threads)


def _block_runner(quantize_blocks: Callable, args: tuple, search_args: tuple
                  ) -> Callable[[int, int], None]:
    """``run(first_block, last_block)``: ``quantize_blocks`` on that range of blocks. The
    native library's entry checks and lays out its arguments once for every range
    (``prepare_quantize_blocks``); numba's JIT function takes them as they are."""
    owner = getattr(quantize_blocks, "__self__", None)
    if isinstance(owner, native.NativeKernels):
        return owner.prepare_quantize_blocks(*args, *search_args)
    return lambda first, last: quantize_blocks(*args, first, last, *search_args)


def run_in_threads(task: Callable[[int, int], None], count: int, elements: int) -> None:
    """Call ``task(first, last)`` on ranges that cover ``range(count)`` once, items of about
    equal work, on the calling thread and pool threads (as many as :func:`max_threads`
    and ``elements``, the work's size, justify). ``task`` must release the GIL to run in
    parallel (a ``nogil`` kernel). An exception of any thread is raised here."""
    threads = _thread_count(elements, count)
    if threads == 1:
        task(0, count)
        return
    _run_ranges(task, _chunk_cuts(np.ones(count), threads), threads)


def _run_ranges(task: Callable[[int, int], None], cuts: list[int], threads: int) -> None:
    """``task`` over the ranges between consecutive ``cuts``, which ``threads`` threads (the
    calling one and pool threads) take in turn. The calling thread waits only for ranges that a
    helper has taken, never for a helper the OS has not started yet: on a busy machine a helper
    may wait milliseconds for a core, and by then the calling thread may have done all the work
    itself (the late helper then finds nothing left)."""
    pending = iter(zip(cuts[:-1], cuts[1:]))
    taken = threading.Condition()
    running = [0]  # ranges taken and not yet finished
    failures: list[BaseException] = []

    def work() -> None:
        while True:
            with taken:
                item_range = next(pending, None)
                if item_range is None:
                    return
                running[0] += 1
            try:
                task(*item_range)
            except BaseException as error:  # re-raised by the calling thread
                failures.append(error)
            finally:
                with taken:
                    running[0] -= 1
                    taken.notify_all()

    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1),
                                   thread_name_prefix="squant")
    for _ in range(threads - 1):
        _pool.submit(work)
    work()
    with taken:
        taken.wait_for(lambda: running[0] == 0)
    if failures:
        raise failures[0]


def _moment_table(arrays: list[np.ndarray], moments: list[np.ndarray | None],
                  options: list[QuantOptions]) -> tuple[np.ndarray, np.ndarray]:
    """One flat float64 table of every weight's input moments, and per kernel channel (an output
    channel, or one of its groups) the start of its ``2 * inner`` values in it
    (``kernels.NO_MOMENTS`` for one without)."""
    parts = []
    starts = []
    offset = 0
    for array, given, opts in zip(arrays, moments, options):
        o, i, k = array.shape
        if given is None:
            starts.append(np.full(o * group_count(i * k, opts.group_size), kernels.NO_MOMENTS,
                                  np.int64))
            continue
        given = np.ascontiguousarray(given, np.float64)
        groups = given.shape[0]
        if given.ndim != 3 or given.shape[1:] != (2, i) or groups == 0 or o % groups:
            raise ValueError(f"input moments of shape {given.shape} do not fit a weight "
                             f"{array.shape} (expected (G, 2, {i}) with G dividing {o})")
        group_of_channel = np.arange(o, dtype=np.int64) // (o // groups)
        channel_starts = offset + group_of_channel * 2 * i
        if opts.group_size is not None:  # each group's moments contiguous, from 2 * j * m on
            per_group = opts.group_size // k
            given = group_moments(given, i, per_group)
            within = 2 * per_group * np.arange(group_count(i * k, opts.group_size),
                                               dtype=np.int64)
            channel_starts = (channel_starts[:, None] + within).reshape(-1)
        starts.append(channel_starts)
        parts.append(given.reshape(-1))
        offset += given.size
    table = np.concatenate(parts) if parts else np.empty(0, np.float64)
    return table, np.concatenate(starts) if starts else np.empty(0, np.int64)


def _as_float32_contiguous(weight: np.ndarray) -> np.ndarray:
    """The weight itself if it is C-contiguous float32 (read in place), else a float32 copy."""
    if weight.dtype == np.float32 and weight.flags.c_contiguous:
        return weight
    with np.errstate(over="ignore"):  # float64 beyond float32's range: flagged as Inf later
        return np.ascontiguousarray(weight, dtype=np.float32)


def quantize_batch(weights: list[np.ndarray], options: list[QuantOptions],
                   ranges: list[tuple[float, float] | None] | None = None,
                   moments: list[np.ndarray | None] | None = None) -> list[BatchResult]:
    """Quantize weights viewed as ``(O, I, K)`` arrays of any float dtype and any memory layout.

    C-contiguous float32 weights are read where they lie; others are first copied as float32.
    Inputs are never modified. A weight with a NaN or Inf is flagged (``finite``), not quantized.
    ``ranges`` may give a per-tensor grid's ``(min, max)`` for a weight that is one part of a
    larger tensor (a ConvTranspose group); by default it is the weight's own.
    ``moments`` may give, for a weight searched with ``range="search"``, its inputs' variances
    and means as a ``(G, 2, I)`` array: ``[g, 0]`` the variances and ``[g, 1]`` the means of the
    ``I`` input channels of group ``g`` (output channels split evenly into ``G`` groups); the
    search then minimises the output error they imply instead of the weight error.
    """
    ranges = [None] * len(weights) if ranges is None else ranges
    moments = [None] * len(weights) if moments is None else moments
    arrays = [_as_float32_contiguous(w) for w in weights]  # kept alive during the kernel call
    sizes = np.array([a.size for a in arrays], np.int64)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    codes = np.empty(int(offsets[-1]), np.int8)
    counts = [group_count(a.shape[1] * a.shape[2], opts.group_size)
              for a, opts in zip(arrays, options)]
    channels = sum(a.shape[0] * c for a, c in zip(arrays, counts))
    ch_address = np.empty(channels, np.int64)
    ch_codes_address = np.empty(channels, np.int64)
    ch_inner = np.empty(channels, np.int64)
    ch_ksize = np.empty(channels, np.int64)
    ch_bits = np.empty(channels, np.int64)
    ch_flags = np.empty(channels, np.int64)
    ch_lo = np.zeros(channels, np.float32)
    ch_hi = np.zeros(channels, np.float32)
    table, ch_moments_start = _moment_table(arrays, moments, options)
    codes_address = codes.ctypes.data
    first = 0
    for array, opts, given, start, count in zip(arrays, options, ranges, offsets[:-1], counts):
        o, i, k = array.shape
        rows = slice(first, first + o * count)
        if opts.group_size is None:
            channel_elements, inner = np.arange(o, dtype=np.int64) * (i * k), i
        else:  # each group is a channel of the kernels: contiguous, whole kernels
            channel_elements, inner = group_rows(o, i * k, k, opts.group_size)
        ch_address[rows] = array.ctypes.data + channel_elements * 4
        ch_codes_address[rows] = codes_address + int(start) + channel_elements
        ch_inner[rows], ch_ksize[rows] = inner, k
        ch_bits[rows], ch_flags[rows] = opts.bits, _flags(opts)
        if opts.granularity == "tensor":
            ch_lo[rows], ch_hi[rows] = (array.min(), array.max()) if given is None else given
        first += o * count
    scale = np.empty(channels, np.float32)
    zero = np.empty(channels, np.float32)
    finite = np.empty(channels, np.bool_)
    blocks = _block_starts(ch_inner * ch_ksize)
    searched = any(opts.range in ("search", "fit") for opts in options)
    _run_blocks((ch_address, ch_codes_address, ch_inner, ch_ksize, ch_bits, ch_flags, ch_lo,
                 ch_hi, blocks, scale, zero, finite),
                (table if searched else None, ch_moments_start), blocks, int(offsets[-1]))
    results = []
    first = 0
    every_finite = bool(finite.all() and np.isfinite(ch_lo).all() and np.isfinite(ch_hi).all())
    for array, start, opts, count in zip(arrays, offsets[:-1], options, counts):
        o = array.shape[0]
        rows = slice(first, first + o * count)
        all_finite = every_finite or bool(finite[rows].all() and np.isfinite(ch_lo[rows]).all()
                                          and np.isfinite(ch_hi[rows]).all())
        shape = (o,) if opts.group_size is None else (o, count)
        results.append(BatchResult(codes[start : start + array.size].reshape(array.shape),
                                   scale[rows].reshape(shape), zero[rows].reshape(shape),
                                   all_finite))
        first += o * count
    return results
