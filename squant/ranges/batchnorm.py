"""``act_range="bn"``: activation ranges from the BatchNorm statistics, without data.

A BatchNorm in eval mode normalises its input by the running statistics, so per channel its
output is about ``N(beta, gamma**2)``. Walking the ``torch.fx`` graph from a layer's input back
to the BatchNorms that produce it gives that input's distribution as per-channel Gaussians:

- ReLU, ReLU6 and Hardtanh clamp them (``clamp(N(mean, std**2), low, high)``);
- Identity, Dropout (eval) and reshapes keep them;
- a residual ``a + b`` adds the means and the standard deviations of the two sides (a clamped
  side first becomes the Gaussian with its mean and variance): the widest the sum can be,
  since a residual branch reads the stream it is added to. (Adding variances, as if the sides
  were independent, gave too narrow ranges: MobileNetV2 agreed less with FP32 at every width.)

The layer's per-tensor range is then the one with the least expected squared error of the fake
quantizer over that mixture of channels: clipping error outside the range, plus ``step**2 / 12``
of rounding inside. So the range depends on the bits: 4-bit inputs clip more than 8-bit ones.
Anything else on the way (pooling, concatenation, a product) leaves the layer to the paper's rule.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

Range = tuple[torch.Tensor, torch.Tensor]
Moments = tuple[torch.Tensor, torch.Tensor]  # per channel (mean, variance), float64
Clip = tuple[float, float]

# Points of the grid on which the expected error is summed, and how many of them are first tried
# as each range end; the mixture is summed over mean +- TAIL_STDS std of its channels.
GRID_POINTS = 2049
COARSE_ENDS = 65
TAIL_STDS = 8.0

_PASS_FUNCTIONS = (torch.flatten, torch.reshape, "flatten", "view", "reshape", "contiguous")
_PASS_MODULES = (nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout)
_CLIP_FUNCTIONS: dict[object, Clip] = {
    F.relu: (0.0, math.inf), torch.relu: (0.0, math.inf), torch.relu_: (0.0, math.inf),
    "relu": (0.0, math.inf), "relu_": (0.0, math.inf), F.relu6: (0.0, 6.0),
}
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add, "add", "add_")


@dataclass(frozen=True)
class ChannelGaussians:
    """Per channel ``c``, the values ``clamp(N(mean[c], std[c]**2), low, high)`` (float64)."""

    mean: torch.Tensor
    std: torch.Tensor
    low: float = -math.inf
    high: float = math.inf

    @classmethod
    def of_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> ChannelGaussians:
        """The output of ``bn`` in eval mode: ``N(beta, gamma**2)`` per channel."""
        if bn.affine:
            return cls(bn.bias.detach().double().cpu(), bn.weight.detach().double().abs().cpu())
        ones = torch.ones(bn.num_features, dtype=torch.float64)
        return cls(torch.zeros_like(ones), ones)

    def clamped(self, low: float, high: float) -> ChannelGaussians:
        """These values passed through ``clamp(., low, high)``."""
        return ChannelGaussians(self.mean, self.std, min(max(self.low, low), high),
                                min(max(self.high, low), high))

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel mean and variance of the (clamped) values, in closed form: the clamp
        bounds' point masses plus the Gaussian's first two moments between them."""
        if self.low == -math.inf and self.high == math.inf:
            return self.mean, self.std**2
        mean, std = self.mean, self.std
        spread = std > 0
        safe_std = torch.where(spread, std, torch.ones_like(std))
        a, b = (self.low - mean) / safe_std, (self.high - mean) / safe_std
        below, above = torch.special.ndtr(a), torch.special.ndtr(-b)  # P(X < low), P(X > high)
        inside = 1.0 - below - above
        pdf_a, pdf_b = _normal_pdf(a), _normal_pdf(b)
        tails = _times_mass(self.low, below) + _times_mass(self.high, above)
        tail_squares = _times_mass(self.low**2, below) + _times_mass(self.high**2, above)
        first = tails + mean * inside + std * (pdf_a - pdf_b)
        second = (tail_squares + (mean**2 + std**2) * inside + 2 * mean * std * (pdf_a - pdf_b)
                  + std**2 * (_finite_times(a, pdf_a) - _finite_times(b, pdf_b)))
        constant = mean.clamp(self.low, self.high)
        return (torch.where(spread, first, constant),
                torch.where(spread, (second - first**2).clamp_min(0.0), torch.zeros_like(std)))

    def plus(self, other: ChannelGaussians) -> ChannelGaussians | None:
        """The sum of these values and ``other``'s, fully correlated (means and standard
        deviations add); ``None`` if their channel counts do not broadcast."""
        (mean_a, var_a), (mean_b, var_b) = self.moments(), other.moments()
        if mean_a.shape != mean_b.shape and 1 not in (mean_a.numel(), mean_b.numel()):
            return None
        return ChannelGaussians(mean_a + mean_b, var_a.sqrt() + var_b.sqrt())


def _normal_pdf(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)


def _times_mass(value: float, mass: torch.Tensor) -> torch.Tensor:
    """``value * mass``, 0 where the mass is 0 (so an infinite bound with no mass adds 0)."""
    return mass * value if math.isfinite(value) else torch.zeros_like(mass)


def _finite_times(z: torch.Tensor, pdf: torch.Tensor) -> torch.Tensor:
    """``z * pdf(z)``, 0 at ``z = +-inf``."""
    return torch.where(torch.isfinite(z), z * pdf, torch.zeros_like(pdf))


def least_error_range(values: ChannelGaussians, bits: int) -> Range | None:
    """The range ``(lo, hi)`` (float32, 0-dim) whose ``bits``-bit per-tensor fake quantizer has
    the least expected squared error over ``values`` (each channel weighted alike).

    The expectation is a sum over a grid of ``GRID_POINTS`` holding the mixture's probability
    (and each clamp bound's point mass), of the exact error of the fake quantizer, whose grid
    is ``round(S * lo) / S + k / S`` with ``S = (2**bits - 1) / (hi - lo)``: exact, so narrow
    channels (a BN gamma much smaller than the grid step) count by where they fall on it.
    Candidate ends are ``COARSE_ENDS`` points of the grid each, then every grid point within
    one coarse step of the best pair's ends. ``None`` if the values span no interval (every
    channel constant at one value).
    """
    std = values.std.clamp(min=0.0)
    low = max(values.low, float((values.mean - TAIL_STDS * std).min()))
    high = min(values.high, float((values.mean + TAIL_STDS * std).max()))
    if not high > low:
        return None
    x = torch.linspace(low, high, GRID_POINTS, dtype=torch.float64)
    std = std.clamp(min=(high - low) / (GRID_POINTS - 1))  # a constant channel: a narrow bump
    normal = torch.distributions.Normal(values.mean[:, None], std[:, None])
    mass_low = normal.cdf(torch.tensor(values.low, dtype=torch.float64)).mean()
    mass_high = 1.0 - normal.cdf(torch.tensor(values.high, dtype=torch.float64)).mean()
    density = normal.log_prob(x).exp().mean(0)
    mass = density * ((1.0 - mass_low - mass_high) / density.sum())
    mass[0] += mass_low if math.isfinite(values.low) else 0.0  # x[0] is the clamp bound then
    mass[-1] += mass_high if math.isfinite(values.high) else 0.0
    step = (GRID_POINTS - 1) // (COARSE_ENDS - 1)
    coarse = torch.arange(0, GRID_POINTS, step)
    best = _best_pair(x, mass, bits, coarse, coarse)
    fine = [torch.arange(max(i - step, 0), min(i + step, GRID_POINTS - 1) + 1) for i in best]
    lo, hi = _best_pair(x, mass, bits, *fine)
    return (torch.tensor(float(x[lo]), dtype=torch.float32),
            torch.tensor(float(x[hi]), dtype=torch.float32))


def _best_pair(x: torch.Tensor, mass: torch.Tensor, bits: int, lo_indices: torch.Tensor,
               hi_indices: torch.Tensor) -> tuple[int, int]:
    """The ``(lo, hi)`` grid indices among the candidates whose fake quantizer has the least
    error ``sum(mass * (fq(x) - x)**2)``; the earliest pair on ties."""
    levels = 2**bits - 1
    best_error, best = math.inf, (0, 0)
    his = x[hi_indices]
    for i in lo_indices.tolist():
        lo = x[i]
        scale = levels / torch.where(his > lo, his - lo, torch.inf)  # (H,)
        zero_point = torch.round(scale * lo)
        codes = torch.minimum(torch.maximum(torch.round(scale[:, None] * x), zero_point[:, None]),
                              (zero_point + levels)[:, None])
        error = ((codes / scale[:, None] - x) ** 2 * mass).sum(1)
        error = torch.where(his > lo, error, torch.inf)
        j = int(error.argmin())
        if error[j] < best_error:
            best_error, best = float(error[j]), (i, int(hi_indices[j]))
    return best


class _LeafTracer(fx.Tracer):
    """Traces a quantized model keeping quantized layers as single ``call_module`` nodes."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return hasattr(module, "enable_activation_quantization") or super().is_leaf_module(
            module, qualified_name)


def bn_ranges(model: nn.Module, layers: Sequence[nn.Module]) -> dict[int, Range]:
    """``{id(layer): range}`` for each layer of ``layers`` (with its ``act_bits`` set) whose
    every call takes an input that BatchNorms determine (see the module docstring).

    Layers missing here keep the paper's rule. A model ``torch.fx`` cannot trace gets a warning
    and no BN range at all (every layer keeps the paper's rule).
    """
    inputs = _layer_inputs(model, layers, 'act_range="bn"', 'use the "paper" range rule')
    found = {key: [None if values is None else least_error_range(values, int(layer.act_bits))
                   for values in calls] for key, (layer, calls) in inputs.items()}
    return {key: ranges[0] for key, ranges in found.items() if _all_same(ranges)}


def bn_input_moments(model: nn.Module, layers: Sequence[nn.Module], option: str,
                     fallback: str) -> dict[int, Moments]:
    """``{id(layer): (mean, variance)}``, float64 per input channel, for each layer of
    ``layers`` whose every call takes the same BatchNorm-determined input (see the module
    docstring) with one value per input channel of the layer (``in_channels`` or
    ``in_features``): what ``range="search"`` weighs the weight errors with, and what
    ``bias_correction`` corrects the biases with.

    A model ``torch.fx`` cannot trace gets a warning (``option`` cannot trace it; every layer
    will ``fallback`` instead) and no moments at all.
    """
    inputs = _layer_inputs(model, layers, option, fallback)
    moments = {}
    for key, (layer, calls) in inputs.items():
        width = getattr(layer, "in_channels", getattr(layer, "in_features", None))
        found = same_moments([None if values is None else values.moments() for values in calls])
        if found is not None and found[0].numel() == width:
            moments[key] = found
    return moments


def same_moments(found: Sequence[Moments | None]) -> Moments | None:
    """The first of ``found`` if every one is the same ``(mean, variance)``, else ``None`` (a
    layer fed by different inputs, or a weight shared by such layers, has no moments)."""
    first = found[0] if found else None
    if first is None or not all(f is not None and torch.equal(f[0], first[0])
                                and torch.equal(f[1], first[1]) for f in found):
        return None
    return first


def _layer_inputs(model: nn.Module, layers: Sequence[nn.Module], option: str, fallback: str
                  ) -> dict[int, tuple[nn.Module, list[ChannelGaussians | None]]]:
    """``{id(layer): (layer, [the BN-determined input of each of its calls, or None])}`` for
    the layers of ``layers`` that the traced ``model`` calls; ``{}`` with a warning naming
    ``option`` and its ``fallback`` if ``torch.fx`` cannot trace the model."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # noqa: BLE001 - tracing runs arbitrary user code
        warnings.warn(f"{option} cannot trace {type(model).__name__} with torch.fx "
                      f"({type(error).__name__}: {error}); every layer will {fallback} instead",
                      stacklevel=4)
        return {}
    wanted = {id(layer) for layer in layers}
    walker = _GraphWalker(model)
    found: dict[int, tuple[nn.Module, list[ChannelGaussians | None]]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if id(module) in wanted:
                values = walker.values(node.args[0]) if node.args else None
                found.setdefault(id(module), (module, []))[1].append(values)
    return found


def _all_same(ranges: list[Range | None]) -> bool:
    """Whether every call of a layer got the same BN range (a shared layer may be fed by
    different producers: then it keeps the paper's rule)."""
    first = ranges[0]
    return first is not None and all(
        r is not None and torch.equal(r[0], first[0]) and torch.equal(r[1], first[1])
        for r in ranges)


class _GraphWalker:
    """The BatchNorm-determined distribution of each node of a traced model, memoised."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.known: dict[fx.Node, ChannelGaussians | None] = {}

    def values(self, node: object) -> ChannelGaussians | None:
        """The distribution of ``node``'s output, or ``None`` if BatchNorms do not give it."""
        if not isinstance(node, fx.Node):
            return None
        if node not in self.known:
            self.known[node] = None  # a cycle cannot happen in fx, but never recurse forever
            self.known[node] = self._compute(node)
        return self.known[node]

    def _compute(self, node: fx.Node) -> ChannelGaussians | None:
        first = node.args[0] if node.args else None
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                return ChannelGaussians.of_batchnorm(module)
            if isinstance(module, nn.ReLU):
                return self._clamped(first, 0.0, math.inf)
            if isinstance(module, nn.Hardtanh):  # ReLU6 included
                return self._clamped(first, float(module.min_val), float(module.max_val))
            return self.values(first) if isinstance(module, _PASS_MODULES) else None
        if node.op not in ("call_function", "call_method"):
            return None
        if node.target in _CLIP_FUNCTIONS:
            return self._clamped(first, *_CLIP_FUNCTIONS[node.target])
        if node.target in _PASS_FUNCTIONS:
            return self.values(first)
        if node.target in _ADD_FUNCTIONS and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            left, right = self.values(a), self.values(b)
            return None if left is None or right is None else left.plus(right)
        return None

    def _clamped(self, node: object, low: float, high: float) -> ChannelGaussians | None:
        values = self.values(node)
        return None if values is None else values.clamped(low, high)
