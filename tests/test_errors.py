"""Bad input raises ``TypeError`` (wrong type) or ``squant.QuantizationError`` (a ``ValueError``:
wrong value) with a message that names the problem."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import pytest
import torch

import squant
from squant import QuantizationError

WEIGHT = (np.arange(12, dtype=np.float32).reshape(4, 3) - 5) / 7


def weight_with(index: tuple[int, ...], value: float, dtype: type = np.float32) -> np.ndarray:
    """``WEIGHT`` as ``dtype`` with one value replaced."""
    weight = WEIGHT.astype(dtype)
    weight[index] = value
    return weight


def test_quantization_error_is_a_value_error() -> None:
    """Callers may catch bad values as ``ValueError``."""
    assert issubclass(QuantizationError, ValueError)


@pytest.mark.parametrize(("weight", "error", "message"), [
    pytest.param(weight_with((2, 1), np.nan), QuantizationError, r"NaN or Inf.*index \(2, 1\)",
                 id="nan"),
    pytest.param(weight_with((1, 2), -np.inf), QuantizationError, r"NaN or Inf.*index \(1, 2\)",
                 id="inf"),
    pytest.param(torch.from_numpy(weight_with((3, 0), np.inf)), QuantizationError,
                 r"NaN or Inf.*index \(3, 0\)", id="inf-torch"),
    pytest.param(torch.from_numpy(weight_with((0, 2), np.nan)).bfloat16(), QuantizationError,
                 r"NaN or Inf.*index \(0, 2\)", id="nan-bfloat16"),
    pytest.param(weight_with((3, 1), 1e39, np.float64), QuantizationError,
                 r"overflow float32.*index \(3, 1\)", id="float64-beyond-float32"),
    pytest.param(torch.from_numpy(weight_with((2, 2), -4e38, np.float64)), QuantizationError,
                 r"overflow float32.*index \(2, 2\)", id="float64-beyond-float32-torch"),
    pytest.param(np.ones(3, np.float32), QuantizationError,
                 r"at least 2 dims.*shape \(3,\)", id="1-d"),
    pytest.param(np.array(1.0, np.float32), QuantizationError, r"at least 2 dims.*shape \(\)",
                 id="0-d"),
    pytest.param(torch.tensor(1.0), QuantizationError, r"at least 2 dims.*shape \(\)",
                 id="0-d-torch"),
    pytest.param(np.ones((0, 3), np.float32), QuantizationError, r"empty.*shape \(0, 3\)",
                 id="no-channels"),
    pytest.param(np.ones((3, 0), np.float32), QuantizationError, r"empty.*shape \(3, 0\)",
                 id="no-inputs"),
    pytest.param(torch.ones(3, 2, 0), QuantizationError, r"empty.*shape \(3, 2, 0\)",
                 id="no-kernel-torch"),
    pytest.param(np.ones((3, 3), np.int32), TypeError, r"dtype int32 is not a floating type",
                 id="int32"),
    pytest.param(torch.ones(3, 3, dtype=torch.int64), TypeError,
                 r"dtype torch\.int64 is not a floating type", id="int64-torch"),
    pytest.param(np.ones((3, 3), bool), TypeError, r"dtype bool is not a floating type",
                 id="bool"),
    pytest.param(torch.ones(3, 3, dtype=torch.bool), TypeError,
                 r"dtype torch\.bool is not a floating type", id="bool-torch"),
    pytest.param(np.ones((3, 3), np.complex64), TypeError,
                 r"dtype complex64 is not a floating type", id="complex"),
    pytest.param(torch.ones(3, 3, dtype=torch.complex64), TypeError,
                 r"dtype torch\.complex64 is not a floating type", id="complex-torch"),
    pytest.param([[1.0, 2.0], [3.0, 4.0]], TypeError,
                 r"expected a torch\.Tensor or numpy\.ndarray, got list", id="python-list"),
    pytest.param(np.ma.masked_array(WEIGHT, mask=WEIGHT > 0), TypeError,
                 r"masked arrays are not supported", id="masked-array"),
    pytest.param(torch.empty(4, 3, device="meta"), TypeError, r"meta device.*holds no values",
                 id="meta-tensor"),
    pytest.param(np.array([[-3e38, 3e38, 1.0]], np.float32), QuantizationError,
                 r"grid overflows float32 at channel 0 \(max - min", id="range-overflows-float32"),
    pytest.param(np.concatenate([np.ones((2, 1000), np.float32),
                                 np.full((1, 1000), 1e30, np.float32)]), QuantizationError,
                 r"grid overflows float32 at channel 2 .*scale \* min",
                 id="huge-constant-channel-overflows-the-zero-point"),
])
def test_bad_weight_is_refused_with_its_problem_named(weight: object, error: type[Exception],
                                                      message: str) -> None:
    """NaN/Inf (with the index of the first), values beyond float32, too few dims, no elements,
    non-float dtypes and non-array types."""
    with pytest.raises(error, match=message):
        squant.quantize_weight(weight)


def test_nan_index_is_given_in_the_weights_own_layout() -> None:
    """With output channels on axis 1 the index still points into the weight as passed."""
    with pytest.raises(QuantizationError, match=r"NaN or Inf.*index \(1, 3\)"):
        squant.quantize_weight(weight_with((3, 1), np.nan).T, axis=1)


@pytest.mark.parametrize(("bits", "error", "message"), [
    pytest.param(1, QuantizationError, r"bits .*2\.\.8, got 1$", id="1"),
    pytest.param(9, QuantizationError, r"bits .*2\.\.8, got 9$", id="9"),
    pytest.param(4.0, TypeError, r"bits .*an int in 2\.\.8, got 4\.0$", id="float"),
    pytest.param(True, TypeError, r"bits .*an int in 2\.\.8, got True$", id="bool"),
    pytest.param("4", TypeError, r"bits .*an int in 2\.\.8, got '4'$", id="str"),
])
def test_bits_outside_2_to_8_or_not_an_int_are_refused(bits: object, error: type[Exception],
                                                       message: str) -> None:
    """Bits are an int (not a float, bool or string) in 2..8."""
    with pytest.raises(error, match=message):
        squant.quantize_weight(WEIGHT, bits)


@pytest.mark.parametrize(("axis", "error", "message"), [
    pytest.param(2, QuantizationError, r"axis 2 is out of range for 2 dims", id="2"),
    pytest.param(-3, QuantizationError, r"axis -3 is out of range for 2 dims", id="-3"),
    pytest.param(1.0, TypeError, r"axis must be an int, got 1\.0", id="float"),
    pytest.param(None, TypeError, r"axis must be an int, got None", id="none"),
])
def test_bad_axis_is_refused(axis: object, error: type[Exception], message: str) -> None:
    """The output-channel axis is an int in ``-ndim..ndim-1``."""
    with pytest.raises(error, match=message):
        squant.quantize_weight(WEIGHT, axis=axis)


@pytest.mark.parametrize(("options", "message"), [
    pytest.param({"mode": "X"}, r"unknown mode 'X': choose one of E, K, C, KC", id="mode-X"),
    pytest.param({"mode": "kc"}, r"unknown mode 'kc': choose one of E, K, C, KC", id="mode-kc"),
    pytest.param({"scheme": "sym"}, r"unknown scheme 'sym': choose one of asymmetric, symmetric",
                 id="scheme"),
    pytest.param({"granularity": "layer"},
                 r"unknown granularity 'layer': choose one of channel, tensor",
                 id="granularity"),
])
def test_unknown_mode_scheme_or_granularity_is_refused_with_the_choices(
        options: dict[str, str], message: str) -> None:
    """Modes, schemes and granularities are spelled exactly; the message lists the choices."""
    with pytest.raises(QuantizationError, match=message):
        squant.quantize_weight(WEIGHT, **options)


BatchCall = Callable[[], object]


@pytest.mark.parametrize(("call", "error", "message"), [
    pytest.param(lambda: squant.quantize_weights([WEIGHT, WEIGHT], [4]), QuantizationError,
                 r"got 1 bits for 2 weights", id="bits-list-length"),
    pytest.param(lambda: squant.quantize_weights([WEIGHT, WEIGHT], [4, 1]), QuantizationError,
                 r"bits of weight 1 must be in 2\.\.8, got 1", id="bits-list-value"),
    pytest.param(lambda: squant.quantize_weights([WEIGHT, WEIGHT], axes=[0]),
                 QuantizationError, r"got 1 axes for 2 weights", id="axes-list-length"),
    pytest.param(lambda: squant.quantize_weights([WEIGHT, WEIGHT], names=["fc1"]),
                 QuantizationError, r"got 1 names for 2 weights", id="names-length"),
    pytest.param(lambda: squant.quantize_weights([WEIGHT, weight_with((0, 0), np.nan)],
                                                 names=["fc1", "fc2"]),
                 QuantizationError, r"^fc2: .*NaN or Inf.*index \(0, 0\)", id="names-in-message"),
    pytest.param(lambda: squant.quantize_weights([WEIGHT, np.ones((2, 2), np.int8)],
                                                 names=["fc1", "fc2"]),
                 TypeError, r"^fc2: dtype int8", id="names-in-type-error"),
])
def test_bad_batch_arguments_are_refused_naming_the_weight(call: BatchCall,
                                                           error: type[Exception],
                                                           message: str) -> None:
    """Per-weight lists must match the number of weights; errors name the weight at fault."""
    with pytest.raises(error, match=message):
        call()


def test_a_single_array_is_refused_by_the_batched_call() -> None:
    """Iterating an array's rows would quantize them as separate (1-D, refused) weights."""
    with pytest.raises(TypeError, match=r"sequence of weights; for one weight use quantize_weight"):
        squant.quantize_weights(WEIGHT)


def test_names_as_one_string_are_refused() -> None:
    """A str is a sequence of letters: one name per weight is meant."""
    with pytest.raises(TypeError, match=r"names must be a sequence of str"):
        squant.quantize_weights([WEIGHT, WEIGHT], names="ab")


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix itself warns
def test_numpy_matrix_is_quantized_as_a_plain_array() -> None:
    """``np.matrix`` (an ndarray subclass) gives the same codes as the plain array."""
    plain = squant.quantize_weight(WEIGHT)
    matrix = squant.quantize_weight(np.asmatrix(WEIGHT))
    assert np.array_equal(matrix.codes.numpy(), plain.codes.numpy())


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
def test_channels_below_the_range_floor_are_warned_about(scheme: str) -> None:
    """A channel of tiny non-zero values comes back as about 0 (the paper's grid): a warning
    names the weight and counts such channels; constant and all-zero channels say nothing."""
    weight = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    weight[1] *= 1e-12
    weight[4] *= 3e-11
    weight[2] = 0.5  # constant: its range is 0, it dequantizes exactly
    weight[3] = 0.0
    with pytest.warns(UserWarning, match=r"^layer 'fc' \(Linear\) weight: 2 of 6 channel"):
        layer = torch.nn.Linear(5, 6)
        with torch.no_grad():
            layer.weight.copy_(weight)
        qmodel = squant.quantize(torch.nn.Sequential(OrderedDict(fc=layer)), 4, scheme=scheme)
    dequantized = qmodel.fc.weight
    assert torch.all(dequantized[1].abs() < 1e-9) and torch.all(dequantized[4].abs() < 1e-9)
    assert torch.equal(dequantized[2], weight[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        squant.quantize_weight(weight[[0, 2, 3, 5]], 4, scheme=scheme)
