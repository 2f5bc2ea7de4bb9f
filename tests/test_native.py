"""The native kernels (built at install, loaded without numba) give numba's JIT's results bit for
bit, and squant uses them only when they were built from these sources for this CPU."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from squant.kernels import native
from squant.kernels.constants import NATIVE_PASSES

import squant
from squant import kernels
from squant.core import batch
from squant.core.options import QuantOptions


def _run(entry, weights, options, ranges=None, moments=None):
    """``batch.quantize_batch`` with the kernel ``entry``."""
    before = batch.kernel
    batch.kernel = lambda name: entry if name == "quantize_blocks" else before(name)
    try:
        return batch.quantize_batch(weights, options, ranges, moments)
    finally:
        batch.kernel = before


@st.composite
def batches(draw):
    """A few weights ``(O, I, K)`` (some with a NaN, some degenerate) and their options."""
    weights, options, moments = [], [], []
    for _ in range(draw(st.integers(1, 4))):
        o, i = draw(st.integers(1, 6)), draw(st.integers(1, 40))
        k = draw(st.sampled_from([1, 3, 9]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        w = (rng.standard_normal((o, i, k)) * draw(st.sampled_from([1e-3, 1.0, 50.0])))
        w = w.astype(np.float32)
        kind = draw(st.sampled_from(["plain", "nan", "constant", "tiny"]))
        if kind == "nan":
            w[0, 0, 0] = np.nan
        elif kind == "constant":
            w[:] = 0.5
        elif kind == "tiny":
            w[0] *= np.float32(1e-30)
        group_size = draw(st.one_of(st.none(), st.sampled_from([max(k, 2), 2 * k, 5 * k])))
        rule = draw(st.sampled_from(["minmax", "search", "fit"]))
        options.append(QuantOptions(
            bits=draw(st.integers(2, 8)), mode=draw(st.sampled_from(["E", "K", "C", "KC"])),
            scheme=draw(st.sampled_from(["asymmetric", "symmetric"])), group_size=group_size,
            range=rule, include_zero=draw(st.booleans())))
        weights.append(w)
        moments.append(np.abs(rng.standard_normal((1, 2, i))) if rule == "search" and
                       group_size is None and draw(st.booleans()) else None)
    return weights, options, moments


@settings(max_examples=60, deadline=None)
@given(batch_args=batches())
def test_native_kernels_give_the_jits_results_bit_for_bit(native_kernels, batch_args) -> None:
    weights, options, moments = batch_args
    jit = _run(kernels.quantize_blocks, weights, options, moments=moments)
    ours = _run(native_kernels.quantize_blocks, weights, options, moments=moments)
    for a, b in zip(jit, ours):
        assert a.finite == b.finite
        if a.finite:
            np.testing.assert_array_equal(a.codes, b.codes)
            np.testing.assert_array_equal(a.scale, b.scale)
            np.testing.assert_array_equal(a.zero_point, b.zero_point)


def _assert_same_as_jit(native_kernels, weights, options) -> None:
    """Both kernels give the same codes, scales and zero points for ``weights``."""
    jit = _run(kernels.quantize_blocks, weights, options)
    ours = _run(native_kernels.quantize_blocks, weights, options)
    for a, b in zip(jit, ours):
        assert a.finite == b.finite
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scale, b.scale)
        np.testing.assert_array_equal(a.zero_point, b.zero_point)


def test_the_c_passes_are_there_exactly_on_avx2(native_kernels) -> None:
    has_avx2 = "+avx2" in native.host_cpu()[1].split(",")
    assert native_kernels.native_passes.shape == (len(NATIVE_PASSES),)
    assert bool(np.all(native_kernels.native_passes != 0)) == has_avx2
    assert bool(np.any(native_kernels.native_passes != 0)) == has_avx2


def _awkward(rng, shape, kind):
    """Normal weights of ``shape``, or on a 1/4 lattice with some a hair off it (errors too fine
    for the fast sum), or with outliers (clamped codes)."""
    w = rng.standard_normal(shape).astype(np.float32)
    if kind == "near grid":
        w = np.round(w * 4) / 4
        w += (rng.random(shape) < 0.3) * rng.standard_normal(shape) * 1e-6
    elif kind == "outliers":
        w[rng.random(shape) < 0.05] *= 6
    return w.astype(np.float32)


def test_the_3x3_kernel_pass_in_c_gives_the_jits_codes(native_kernels) -> None:
    """KQ in C on 3x3 kernels: every count of kernels around its blocks of eight (the last
    ``inner % 8`` and the kernels it leaves run numba's single-kernel pass), awkward weights,
    every width, both grids, with and without CQ; 4000 kernels: errors whose magnitudes may sum
    past the fast sum's bound (the exact sum then runs)."""
    rng = np.random.default_rng(7)
    weights, options = [], []
    for inner in (1, 2, 7, 8, 9, 15, 16, 17, 40, 67, 4000):
        for kind in ("normal", "near grid", "outliers"):
            w = _awkward(rng, (4, inner, 9), kind)
            for bits, scheme in ((2, "asymmetric"), (4, "asymmetric"), (4, "symmetric"),
                                 (8, "asymmetric")):
                for mode in ("K", "KC"):
                    weights.append(w)
                    options.append(QuantOptions(bits=bits, mode=mode, scheme=scheme))
    _assert_same_as_jit(native_kernels, weights, options)


def test_the_channel_pass_after_kernels_in_c_gives_the_jits_codes(native_kernels) -> None:
    """CQ after the C KQ, in C: channels whose kernels all err the same way (more than 64 flips:
    left to numba), ranges that clip (kernels with no candidate to hand on, so fewer handed-on
    elements than flips: left to numba), kernels the C KQ leaves, both directions, CQ alone."""
    rng = np.random.default_rng(5)
    weights, options = [], []
    for inner in (8, 64, 512):
        for offset in (0.95, 0.05, 0.55):  # every weight errs by the same fraction of a step
            w = (rng.integers(0, 14, (3, inner, 9)) + offset).astype(np.float32)
            w[:, 0, 0], w[:, 0, 1] = 0.0, 15.0  # S = 1, Z = 8 at 4 bits
            weights.append(w)
            options.append(QuantOptions(bits=4, mode="KC"))
        # the last half of the kernels above the grid's top code (x = 7.3: no candidate up,
        # their hand-ons of priority 0 point down), the channel's sum pulling up: fewer
        # hand-ons than flips, so CQ flips the first elements of the other kernels too
        w = rng.uniform(0.3, 15.3, (3, inner, 9)).astype(np.float32)
        w[:, inner // 2 :] = 15.3
        w[:, 0, 0] = 0.3
        weights.append(w)
        options.append(QuantOptions(bits=4, mode="KC"))
        # S = 1, Z = 8: kernels x = [0, 3.375, 7.25 x 3, 0 x 4] (KQ flips the 2nd and hands on
        # the 1st up with priority 0) but the first two: hand-ons of priority 0 in the
        # channel's direction
        w = np.tile(np.float32([8, 11.375, 15.25, 15.25, 15.25, 8, 8, 8, 8]), (3, inner, 1))
        w[:, :2] = rng.uniform(0.25, 15.25, (3, 2, 9))
        w[:, 0, 0] = 0.25
        weights.append(w)
        options.append(QuantOptions(bits=4, mode="KC"))
        for kind in ("normal", "near grid", "outliers"):
            w = _awkward(rng, (3, inner, 9), kind)
            for rule in ("minmax", "search"):
                weights.append(w)
                options.append(QuantOptions(bits=3, mode="KC", range=rule))
            weights.append(np.clip(w, -0.5, None))  # one-sided: every kernel errs up or down
            options.append(QuantOptions(bits=2, mode="KC", range="search"))
    _assert_same_as_jit(native_kernels, weights, options)


def test_the_channel_pass_in_c_gives_the_jits_codes(native_kernels) -> None:
    """CQ after EQ in C (1x1 kernels, Linear rows, mode C on 3x3): lengths around its blocks of
    eight, awkward weights, channels it leaves to numba (more than 64 flips, a huge constant
    channel whose grid overflows, errors too fine for the fast sum), channels whose first k
    are not above the level it tries first, every width, both grids."""
    rng = np.random.default_rng(11)
    weights, options = [], []
    shapes = [(3, n, 1) for n in (1, 2, 7, 8, 9, 63, 64, 65, 1000, 2048)]
    shapes += [(2, 80_000, 1), (3, 50, 9)]
    for shape in shapes:
        for kind in ("normal", "near grid", "outliers"):
            w = _awkward(rng, shape, kind)
            if kind == "outliers":
                w[0] = np.float32(1e30)  # S * w overflows: not finite on the grid
            for bits, scheme in ((2, "asymmetric"), (4, "asymmetric"), (4, "symmetric"),
                                 (8, "asymmetric"), (8, "symmetric")):
                weights.append(w)
                options.append(QuantOptions(bits=bits, mode="C" if shape[2] > 1 else "KC",
                                            scheme=scheme))
    for n in (64, 256, 512):  # priorities all 0.1 or so: none above the level it tries first
        w = (rng.integers(0, 14, (3, n, 1)) + 0.9 + rng.uniform(-0.02, 0.02, (3, n, 1)))
        w[:, 0], w[:, 1] = 0.0, 15.0  # S = 1, Z = 8 at 4 bits
        weights.append(w.astype(np.float32))
        options.append(QuantOptions(bits=4, mode="KC"))
    _assert_same_as_jit(native_kernels, weights, options)


def test_a_library_for_a_cpu_without_avx2_runs_numbas_passes(native_kernels, tmp_path,
                                                              monkeypatch) -> None:
    """Built for a CPU without AVX2, the library holds no C pass (their addresses are 0) and its
    numba code runs its own KQ and CQ: the same codes as the JIT's."""
    from squant.kernels.native import build as native_build

    cpu, features = native.host_cpu()
    monkeypatch.setattr(native_build, "host_cpu",
                        lambda: (cpu, features.replace("+avx2", "-avx2")))
    native_build.build(tmp_path)
    library, why = native.try_load(tmp_path)
    assert library is not None, why
    assert not library.native_passes.any()
    rng = np.random.default_rng(3)
    weights = [_awkward(rng, (5, 20, 9), "normal"), _awkward(rng, (6, 70, 1), "near grid")]
    options = [QuantOptions(bits=4, mode="KC")] * 2
    jit = _run(kernels.quantize_blocks, weights, options)
    ours = _run(library.quantize_blocks, weights, options)
    for a, b in zip(jit, ours):
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scale, b.scale)


def test_a_whole_model_is_the_same_with_both_kernels(native_kernels) -> None:
    """A ResNet-like batch, split among threads: same state_dict with either kernel."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 7), torch.nn.Conv2d(64, 64, 3),
                                torch.nn.Conv2d(64, 256, 1), torch.nn.Flatten(),
                                torch.nn.Linear(256, 1000))
    states = []
    for entry in (kernels.quantize_blocks, native_kernels.quantize_blocks):
        before = batch.kernel
        batch.kernel = lambda name, entry=entry, before=before: (
            entry if name == "quantize_blocks" else before(name))
        try:
            states.append(squant.quantize(model, bits=4).state_dict())
        finally:
            batch.kernel = before
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_a_library_of_other_sources_or_another_cpu_is_refused(native_kernels, tmp_path) -> None:
    folder = native_kernels.path.parent
    for name in (native.LIBRARY, native.RECORD):
        shutil.copy(folder / name, tmp_path / name)
    record = json.loads((tmp_path / native.RECORD).read_text())
    assert native.try_load(tmp_path)[0] is not None
    (tmp_path / native.RECORD).write_text(json.dumps({**record, "source": "0" * 64}))
    loaded, why = native.try_load(tmp_path)
    assert loaded is None and "other sources" in why
    (tmp_path / native.RECORD).write_text(json.dumps({**record, "cpu": "i386",
                                                      "cpu_identity": "another"}))
    loaded, why = native.try_load(tmp_path)
    assert loaded is None and "another CPU (i386)" in why
    bad = tmp_path / "bad"  # not the loaded copy: rewriting a mapped library crashes
    bad.mkdir()
    (bad / native.LIBRARY).write_bytes(b"not a library")
    (bad / native.RECORD).write_text(json.dumps(record))
    loaded, why = native.try_load(bad)
    assert loaded is None and "does not load" in why
    loaded, why = native.try_load(tmp_path / "empty")
    assert loaded is None and "is not built" in why


def test_squant_kernels_chooses_and_names_a_bad_value(monkeypatch) -> None:
    monkeypatch.setenv("SQUANT_KERNELS", "jit")
    assert native.load() is None and native.why_not_native() == "SQUANT_KERNELS=jit"
    monkeypatch.setenv("SQUANT_KERNELS", "fast")
    with pytest.raises(ValueError, match="SQUANT_KERNELS='fast'"):
        native.load()
    monkeypatch.setenv("SQUANT_KERNELS", "native")
    monkeypatch.setattr(native, "_loaded", [None, "it is not built"])
    with pytest.raises(RuntimeError, match="SQUANT_KERNELS=native, but it is not built"):
        native.load()


def test_with_the_native_kernels_a_process_never_imports_numba(native_kernels, tmp_path) -> None:
    """import squant + quantize + save + load, in a fresh process: numba stays unimported
    (its import alone takes about half a second) when squant uses the installed library."""
    if native.try_load()[0] is None:
        pytest.skip("the native kernels are not installed (only built for this session)")
    code = ("import sys, torch, squant\n"
            "m = squant.quantize(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), "
            "torch.nn.Linear(8, 4)), bits=4)\n"
            f"squant.save(m, {str(tmp_path / 'm.safetensors')!r})\n"
            f"squant.load({str(tmp_path / 'm.safetensors')!r})\n"
            "print('numba' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env={**__import__("os").environ, "SQUANT_KERNELS": "auto"})
    assert result.stdout.split() == ["False"], result.stderr


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), groups=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_native_packing_is_the_jits(native_kernels, bits: int, groups: int, seed: int) -> None:
    from squant.kernels import packing

    rng = np.random.default_rng(seed)
    codes = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), groups * 8).astype(np.int8)
    first, last = sorted(rng.integers(0, groups + 1, 2))
    packed = [np.zeros(groups * bits, np.uint8) for _ in range(2)]
    packing.pack_groups(codes, bits, packed[0], first, last)
    native_kernels.pack_groups(codes, bits, packed[1], first, last)
    np.testing.assert_array_equal(packed[0], packed[1])
    unpacked = [np.zeros(groups * 8, np.int8) for _ in range(2)]
    packing.unpack_groups(packed[0], bits, unpacked[0], first, last)
    native_kernels.unpack_groups(packed[0], bits, unpacked[1], first, last)
    np.testing.assert_array_equal(unpacked[0], unpacked[1])
    np.testing.assert_array_equal(unpacked[1][first * 8 : last * 8], codes[first * 8 : last * 8])


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 30), st.sampled_from([1, 4, 9])),
       seed=st.integers(0, 2**32 - 1))
def test_native_error_statistics_are_the_jits(native_kernels, shape, seed) -> None:
    from squant.kernels.constants import STAT_COUNT, error_stats_scratch
    from squant.kernels.error_stats import add_error_stats

    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    codes = rng.integers(-8, 8, shape).astype(np.int8)
    scale = (rng.random(shape[0]) * 8 + 1).astype(np.float32)
    zero = rng.integers(-3, 3, shape[0]).astype(np.float32)
    outs = [np.full(STAT_COUNT, 0.25) for _ in range(2)]  # accumulated into
    for entry, out in zip((add_error_stats, native_kernels.add_error_stats), outs):
        scratch = np.full(error_stats_scratch(*shape), np.nan)
        entry(w, codes, scale, zero, -8, 7, out, scratch)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.any(outs[0] != 0.25)  # something was added


def test_native_kernels_refuse_arrays_they_would_misread(native_kernels) -> None:
    """The library reads raw memory: a table of another dtype or layout is an error."""
    weights = [np.ones((2, 3, 1), np.float32)]
    good = _run(native_kernels.quantize_blocks, weights, [QuantOptions()])
    assert good[0].finite
    captured = {}

    def capture(*args):
        captured["args"] = args

    _run(capture, weights, [QuantOptions()])
    args = list(captured["args"])
    for position, bad in ((2, args[2].astype(np.int32)), (6, args[6].astype(np.float64)),
                          (8, np.repeat(args[8], 2)[::2])):
        wrong = args.copy()
        wrong[position] = bad
        with pytest.raises(TypeError, match="must be a C-contiguous 1-D"):
            native_kernels.quantize_blocks(*wrong)


def test_prepared_runner_takes_any_block_range_and_refuses_others(native_kernels) -> None:
    """``prepare_quantize_blocks`` checks once; its runner quantizes any range of blocks (the
    driver's threads each take some) into the same codes as one call, and refuses a range
    outside the table before the library reads it."""
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((60, 200, 9)).astype(np.float32)]  # 4 blocks
    captured = {}

    def capture(*args):
        captured["args"] = args

    _run(capture, weights, [QuantOptions()])
    args = list(captured["args"])
    block_start = args[8]
    blocks = block_start.size - 1
    outputs = {}
    for label, ranges in (("one call", [(0, blocks)]),
                          ("in pieces", [(b, b + 1) for b in range(blocks)][::-1])):
        codes = np.zeros(sum(w.size for w in weights), np.int8)
        tables = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        tables[1] = codes.ctypes.data + (args[1] - args[1][0])  # codes at a fresh address
        scale, zero, finite = tables[9], tables[10], tables[11]
        scale[:], zero[:], finite[:] = 0, 0, False
        run = native_kernels.prepare_quantize_blocks(*tables[:12], *tables[14:])
        for first, last in ranges:
            run(first, last)
        outputs[label] = (codes, scale.copy(), zero.copy(), finite.copy())
    assert blocks > 1 and outputs["one call"][3].all()
    for a, b in zip(outputs["one call"], outputs["in pieces"]):
        np.testing.assert_array_equal(a, b)
    finite = run.arrays[11]
    finite[:] = False
    run(blocks - 1, blocks)  # the last block only
    assert finite[block_start[-2]:].all() and not finite[:block_start[-2]].any()
    for first, last in ((0, blocks + 1), (-1, 1), (2, 1)):
        with pytest.raises(ValueError, match="out of"):
            run(first, last)
