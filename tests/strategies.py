"""Hypothesis strategies for squant's property tests: shapes, bits, modes and nasty weights.

A weight is drawn as a *kind*, a shape and a seed, then built with numpy: much faster than
hypothesis arrays of floats, and each kind aims at one corner of SQUANT_SPEC.md (rounding ties,
codes exactly on the grid, clamping at the grid's ends, tiny and denormal errors, degenerate
ranges, heavy tails). Every weight is float32 and finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

F32 = np.float32
MODES = ("E", "K", "C", "KC")
SCHEMES = ("asymmetric", "symmetric")
GRANULARITIES = ("channel", "tensor")
KINDS = (
    "normal",  # N(mu, sigma) with sigma from 1e-4 to 1e3
    "student_t",  # heavy tails: Student-t with 1 (Cauchy), 2 or 3 degrees of freedom
    "constant_channels",  # some channels hold one value (hi == lo: the 1e-8 floor)
    "zeros",  # all +0.0 and -0.0
    "outlier",  # N(0, 1) with one +-1e4
    "tiny",  # N(0, 1) scaled to 1e-44 .. 1e-28 (often denormal: below 1.2e-38)
    "mixed_magnitudes",  # log-uniform magnitudes from 1e-45 (denormal) to 1e3, mixed signs
    "ties",  # x = S*W - Z exactly on .5 for most elements: round-half-even ties
    "grid_points",  # x exactly on integers: errors exactly 0
    "dyadic",  # x on a grid of 1/4 .. 1/32 steps: exact errors, many equal priorities
    "sparse",  # mixed-sign normal weights with 50-95 % exact zeros
)
# K -> the kernel dims of a weight with that many elements per kernel (K = 1: Linear or 1x1).
KERNEL_DIMS = {1: ((), (1, 1)), 3: ((3,),), 9: ((3, 3),), 25: ((5, 5),), 27: ((3, 3, 3),)}


@dataclass(frozen=True, repr=False)
class Case:
    """One quantization problem: a weight (output channels on axis 0) and its options.

    ``source`` says how to rebuild the weight (the ``make_weight`` call), so that a falsifying
    example prints as something one can paste, not as a page of numbers.
    """

    weight: np.ndarray
    source: str
    bits: int
    mode: str
    scheme: str = "asymmetric"
    granularity: str = "channel"

    @property
    def as_oik(self) -> np.ndarray:
        """The weight viewed as ``(O, I, K)``, as the spec does."""
        o, i = self.weight.shape[:2]
        return self.weight.reshape(o, i, -1)

    def __repr__(self) -> str:
        return (f"Case({self.source}, bits={self.bits}, mode={self.mode!r}, "
                f"scheme={self.scheme!r}, granularity={self.granularity!r})")


def _on_grid(rng: np.random.Generator, shape: tuple[int, ...], bits: int, scheme: str,
             granularity: str, denominator: int, odd: float) -> np.ndarray:
    """Weights whose grid value ``x`` is a multiple of ``1/denominator``, and exactly so.

    The step ``h`` is a power of two and each channel's range is exactly ``(2**b - 1) * h``
    (asymmetric) or ``amax = (n - 1) * h`` (symmetric), so ``S = 1/h`` and ``Z`` are exact and
    ``x = t / denominator - n`` (asymmetric) or ``t / denominator`` (symmetric) with integer ``t``.
    ``odd`` is the share of elements whose ``t`` is moved off the integer grid when
    ``denominator == 2``: those are the rounding ties. With granularity "tensor" only the first
    channel holds both ends of the range, so the others may use less of it.
    """
    n = 2 ** (bits - 1)
    o = shape[0]
    flat = np.empty((o, int(np.prod(shape[1:]))), np.float64)
    h = 2.0 ** int(rng.integers(-4, 19))
    if scheme == "symmetric":
        top = (n - 1) * denominator
        t = rng.integers(-top, top + 1, size=flat.shape)
        ends = np.array([-top, top])
        base = np.zeros((o, 1))
    else:
        top = (2**bits - 1) * denominator
        t = rng.integers(0, top + 1, size=flat.shape)
        ends = np.array([0, top])
        shared = granularity == "tensor"
        offset = rng.integers(-(2**bits), 2**bits + 1, size=1 if shared else o)
        base = np.broadcast_to(offset, (o,))[:, None] * float(denominator)
    if denominator == 2:
        ties = rng.random(flat.shape) < odd
        t = np.where(ties, t | 1, t & ~1)
        t = np.clip(t, ends[0], ends[1])
    holders = 1 if granularity == "tensor" else o
    for c in range(holders):
        where = rng.choice(flat.shape[1], size=min(2, flat.shape[1]), replace=False)
        if scheme == "symmetric" and flat.shape[1] == 1:
            t[c, where] = ends[rng.integers(0, 2)]
        else:
            t[c, where] = ends[: len(where)]
    flat[...] = (base + t) * (h / denominator)
    return flat.astype(F32).reshape(shape)


def make_weight(kind: str, shape: tuple[int, ...], seed: int, bits: int = 4,
                scheme: str = "asymmetric", granularity: str = "channel") -> np.ndarray:
    """A float32 weight of ``shape`` of the given kind, from ``seed``.

    The grid options only matter to the kinds that place ``x`` exactly (ties, grid points,
    dyadic); the rest ignore them.
    """
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal(shape)
    if kind == "normal":
        sigma = 10.0 ** rng.uniform(-4, 3)
        w = sigma * (normal + rng.choice([0.0, 0.0, 3.0, -3.0]))
    elif kind == "student_t":
        w = rng.standard_t(int(rng.integers(1, 4)), size=shape)
    elif kind == "constant_channels":
        w = normal.copy()
        constant = rng.random(shape[0]) < 0.5
        constant[rng.integers(0, shape[0])] = True
        values = rng.choice([0.0, 1.0, -3.5, 1e-3, 1e4, rng.standard_normal()], size=shape[0])
        w[constant] = values[constant].reshape((-1,) + (1,) * (len(shape) - 1))
    elif kind == "zeros":
        w = np.where(rng.random(shape) < 0.5, 0.0, -0.0)
    elif kind == "outlier":
        w = normal.copy()
        w.flat[rng.integers(0, w.size)] = rng.choice([1e4, -1e4])
    elif kind == "tiny":
        w = normal * 10.0 ** rng.uniform(-44, -28)
    elif kind == "mixed_magnitudes":
        w = np.sign(normal) * 10.0 ** rng.uniform(-45, 3, size=shape)
    elif kind in ("ties", "grid_points", "dyadic"):
        denominator = {"ties": 2, "grid_points": 1, "dyadic": 2 ** int(rng.integers(2, 6))}[kind]
        return _on_grid(rng, shape, bits, scheme, granularity, denominator, rng.uniform(0.5, 1))
    elif kind == "sparse":
        w = np.where(rng.random(shape) < rng.uniform(0.5, 0.95), 0.0, normal)
    else:
        raise ValueError(f"unknown weight kind {kind!r}")
    return np.asarray(w, dtype=F32)


@st.composite
def shapes(draw: st.DrawFn, ks: tuple[int, ...] = tuple(KERNEL_DIMS)) -> tuple[int, ...]:
    """A weight shape ``(O, I, *kernel)`` with O, I in 1..64 and K in ``ks``."""
    o = draw(st.integers(1, 64))
    i = draw(st.integers(1, 64))
    kernel = draw(st.sampled_from(KERNEL_DIMS[draw(st.sampled_from(ks))]))
    return (o, i, *kernel)


bits_values = st.integers(2, 8)
modes = st.sampled_from(MODES)
schemes = st.sampled_from(SCHEMES)
granularities = st.sampled_from(GRANULARITIES)
kinds = st.sampled_from(KINDS)
seeds = st.integers(0, 2**32 - 1)


@st.composite
def cases(draw: st.DrawFn, mode: st.SearchStrategy[str] = modes,
          scheme: st.SearchStrategy[str] = schemes,
          granularity: st.SearchStrategy[str] = granularities,
          shape: st.SearchStrategy[tuple[int, ...]] | None = None) -> Case:
    """A weight of a drawn kind with bits, mode and grid: grid-placing kinds use that grid."""
    kind, bits, mode_, scheme_, gran = (draw(kinds), draw(bits_values), draw(mode),
                                        draw(scheme), draw(granularity))
    shape_, seed = draw(shapes() if shape is None else shape), draw(seeds)
    weight = make_weight(kind, shape_, seed, bits, scheme_, gran)
    source = f"make_weight({kind!r}, {shape_}, {seed}, {bits}, {scheme_!r}, {gran!r})"
    return Case(weight, source, bits, mode_, scheme_, gran)


@st.composite
def case_lists(draw: st.DrawFn, max_size: int = 4, min_elements: int = 0) -> list[Case]:
    """1..max_size cases sharing mode, scheme and granularity but not shapes or bits.

    Cases of shape ``(64, 64, 3, 3, 3)`` are added until the weights hold ``min_elements``.
    """
    mode, scheme, gran = (st.just(draw(modes)), st.just(draw(schemes)),
                          st.just(draw(granularities)))
    found = draw(st.lists(cases(mode, scheme, gran), min_size=1, max_size=max_size))
    while sum(c.weight.size for c in found) < min_elements:
        found.append(draw(cases(mode, scheme, gran, shape=st.just((64, 64, 3, 3, 3)))))
    return found
