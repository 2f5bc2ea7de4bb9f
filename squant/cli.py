"""The ``squant`` command line: argument parsing, exit codes, one line on stderr per error.

``squant quantize`` works on checkpoints without architecture (a state_dict from ``torch.save``
or a safetensors file): every floating tensor whose name ends in ``weight`` and that has at
least 2 dims is quantized. Safetensors inputs are streamed: tensors are read, quantized (one
batched kernel call per chunk of at most ``CHUNK_BYTES`` of float32) and written chunk by
chunk, so memory holds one chunk, never the checkpoint.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import pickle
import sys
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from .errors import QuantizationError
from .file_format import (
    FORMAT_VERSION,
    TORCH_DTYPES,
    QuantizedEntry,
    TensorSpec,
    squant_metadata,
    tensor_spec,
)
from .file_io import SafetensorsWriter, SquantReader, atomic_path, first_line
from .options import GRANULARITIES, MODES, SCHEMES, QuantOptions, check_bits
from .report import layer_report
from .tensor import QuantizedTensor, quantize_with_options

CHUNK_BYTES = 64 << 20  # float32 bytes per batched kernel call: bounds the peak memory
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
STAT_FIELDS = ("kernel_sum_eq_mean", "kernel_sum_eq_max", "kernel_sum_squant_mean",
               "kernel_sum_squant_max", "channel_sum_eq_mean", "channel_sum_eq_max",
               "channel_sum_squant_mean", "channel_sum_squant_max", "max_abs_weight_error")
_STATS_ELEMENTS = 1 << 20  # elements per block of the statistics (float64 temporaries)


# ---------------------------------------------------------------------------------------------
# Paths.


def _check_input(path: Path, suffixes: Sequence[str]) -> None:
    """``path`` is an existing, non-empty file with one of ``suffixes``."""
    if path.suffix.lower() not in suffixes:
        raise QuantizationError(f"{path}: unknown extension {path.suffix!r} (expected "
                                f"{', '.join(suffixes)})")
    if not path.is_file():
        raise QuantizationError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise QuantizationError(f"{path}: the file is empty")


def _check_output(path: Path, suffixes: Sequence[str], *inputs: Path) -> None:
    """``path`` has one of ``suffixes``, its folder exists, and it is none of ``inputs``."""
    if path.suffix.lower() not in suffixes:
        raise QuantizationError(f"{path}: unknown output extension {path.suffix!r} (expected "
                                f"{', '.join(suffixes)})")
    if not path.parent.is_dir():
        raise QuantizationError(f"{path}: the output folder {path.parent} does not exist")
    for other in inputs:
        if path.resolve() == other.resolve() or (path.exists() and path.samefile(other)):
            raise QuantizationError(f"{path}: the output is the same file as the input {other}; "
                                    "choose another output path")


# ---------------------------------------------------------------------------------------------
# Reading checkpoints without architecture.


class _Source(ABC):
    """A checkpoint's tensors: their specs at once, their data a few at a time."""

    def __init__(self, path: Path, specs: dict[str, TensorSpec]) -> None:
        self.path = path
        self.specs = specs

    @abstractmethod
    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The data of the tensors ``names``."""


class _SafetensorsSource(_Source):
    """A safetensors file, read through ``safe_open``."""

    def __init__(self, path: Path) -> None:
        try:
            with safe_open(str(path), framework="pt") as file:
                if "squant" in (file.metadata() or {}):
                    raise QuantizationError(f"{path}: is already a squant file "
                                            "(`squant dequantize` it first)")
                slices = {name: file.get_slice(name) for name in file.keys()}
                specs = {name: TensorSpec(name, _torch_dtype(path, name, s.get_dtype()),
                                          tuple(s.get_shape())) for name, s in slices.items()}
        except SafetensorError as error:
            raise QuantizationError(f"{path}: not a readable safetensors file "
                                    f"({first_line(error)})") from None
        super().__init__(path, specs)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        # Opened anew for each chunk: the pages of the memory map read so far are released
        # (they count as resident memory while the file is open).
        try:
            with safe_open(str(self.path), framework="pt") as file:
                return {name: file.get_tensor(name) for name in names}
        except SafetensorError as error:
            raise QuantizationError(f"{self.path}: cannot read its tensors "
                                    f"({first_line(error)})") from None


class _TorchSource(_Source):
    """A state_dict saved by ``torch.save``, loaded whole with ``weights_only=True``."""

    def __init__(self, path: Path) -> None:
        self.tensors = _load_state_dict(path)
        super().__init__(path, {n: tensor_spec(n, t) for n, t in self.tensors.items()})

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self.tensors[name] for name in names}


def _torch_dtype(path: Path, name: str, code: str) -> torch.dtype:
    if code not in TORCH_DTYPES:
        raise QuantizationError(f"{path}: tensor {name!r} has dtype {code}, which squant "
                                "does not read")
    return TORCH_DTYPES[code]


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code.

    Any failure is the file's (a refused pickle, a truncated zip, random bytes), so every
    exception becomes one ``QuantizationError`` line.
    """
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise QuantizationError(
            f"{path}: refused by torch.load(weights_only=True), which loads tensors and plain "
            f"containers only and never runs code: {_unpickling_reason(error)}") from None
    except Exception as error:  # any failure is the file's: see the docstring
        raise QuantizationError(f"{path}: not a readable torch checkpoint "
                                f"({first_line(error)})") from None
    if not isinstance(state, Mapping):
        raise QuantizationError(f"{path}: holds a {type(state).__name__}, not a state_dict "
                                "(a mapping of names to tensors)")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise QuantizationError(f"{path}: entry {name!r} is a {type(value).__name__}, not a "
                                    "tensor; squant reads flat state_dicts of tensors")
    return dict(state)


def _unpickling_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's long weights-only message that says what was refused."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(boilerplate)]
    return reasons[0] if reasons else "unsupported pickle content"


def _open_source(path: Path) -> _Source:
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return _SafetensorsSource(path)
    return _TorchSource(path)


# ---------------------------------------------------------------------------------------------
# What to quantize, and how.


@dataclass(frozen=True)
class _Item:
    """A tensor of the checkpoint: quantized as ``entry`` says, or copied if it has none."""

    spec: TensorSpec
    entry: QuantizedEntry | None

    @property
    def memory(self) -> int:
        """Bytes it takes in a chunk (a quantized tensor also as the kernels' float32 copy)."""
        copy = 4 * self.spec.nbytes // self.spec.dtype.itemsize if self.entry else 0
        return self.spec.nbytes + copy

    @property
    def options(self) -> QuantOptions:
        """The quantization options of a quantized tensor."""
        e = self.entry
        return QuantOptions(e.bits, e.mode, e.scheme, e.granularity)


def _is_quantizable(spec: TensorSpec) -> bool:
    return (spec.dtype.is_floating_point and spec.name.endswith("weight")
            and len(spec.shape) >= 2 and spec.nbytes > 0)


def _matches(pattern: str, name: str) -> bool:
    """A pattern matches a tensor by its name or by its layer's (``fc`` for ``fc.weight``)."""
    return (fnmatch.fnmatchcase(name, pattern)
            or fnmatch.fnmatchcase(name.removesuffix(".weight"), pattern))


def _check_patterns(patterns: Sequence[str], option: str, names: list[str]) -> None:
    """Each pattern matches some quantizable tensor: a typo must not pass silently."""
    for pattern in patterns:
        if not any(_matches(pattern, name) for name in names):
            known = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise QuantizationError(f"{option} pattern {pattern!r} matches no quantizable "
                                    f"tensor (they are: {known or 'none'})")


def _plan(source: _Source, args: argparse.Namespace) -> list[_Item]:
    """Every tensor of the checkpoint with what to do with it, in the checkpoint's order."""
    default = QuantOptions(args.bits, args.mode, args.scheme, args.granularity)
    layer_bits = dict(args.layer_bits)
    for pattern, bits in layer_bits.items():
        check_bits(bits, f"--layer-bits {pattern!r}")
    candidates = [n for n, spec in source.specs.items() if _is_quantizable(spec)]
    _check_patterns(args.skip, "--skip", candidates)
    _check_patterns(list(layer_bits), "--layer-bits", candidates)
    _check_patterns(args.transposed, "--transposed", candidates)
    items = []
    for name, spec in source.specs.items():
        entry = None
        if _is_quantizable(spec) and not any(_matches(p, name) for p in args.skip):
            bits = next((b for p, b in layer_bits.items() if _matches(p, name)), default.bits)
            axis = 1 if any(_matches(p, name) for p in args.transposed) else 0
            entry = QuantizedEntry(name, bits, default.mode, axis, spec.shape, spec.dtype,
                                   default.scheme, default.granularity)
        items.append(_Item(spec, entry))
    if not any(item.entry for item in items):
        raise QuantizationError(f"{source.path}: nothing to quantize (no floating tensor named "
                                "*weight with at least 2 dims, or every one is skipped)")
    return items


def _chunks(items: list[_Item], limit: int) -> Iterator[list[_Item]]:
    """Consecutive items in groups of at most ``limit`` bytes (a larger item alone)."""
    chunk, size = [], 0
    for item in items:
        if chunk and size + item.memory > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += item.memory
    if chunk:
        yield chunk


def _file_specs(items: list[_Item]) -> list[TensorSpec]:
    return [spec for item in items
            for spec in (item.entry.specs() if item.entry else [item.spec])]


# ---------------------------------------------------------------------------------------------
# Statistics.


def _tensor_stats(name: str, weight: torch.Tensor, qweight: QuantizedTensor) -> dict[str, float]:
    """``squant.report``'s error statistics of one tensor, computed on blocks of channels (the
    report's float64 temporaries stay small) and merged: means weighted by channel count."""
    axis, channels = qweight.axis, weight.shape[qweight.axis]
    step = max(1, _STATS_ELEMENTS * channels // weight.numel())
    rows, counts = [], []
    for start in range(0, channels, step):
        n = min(step, channels - start)
        part = QuantizedTensor(qweight.codes.narrow(axis, start, n),
                               qweight.scale[start : start + n],
                               qweight.zero_point[start : start + n], qweight.bits, qweight.mode,
                               axis, qweight.scheme, qweight.granularity)
        block = weight.narrow(axis, start, n)
        rows.append(asdict(layer_report(name, "", block.shape, [block], [part], 0.0)))
        counts.append(n)
    merged = {}
    for field in STAT_FIELDS:
        values = [row[field] for row in rows]
        is_max = field.endswith("_max") or field.startswith("max_")
        merged[field] = (max(values) if is_max
                         else sum(v * c for v, c in zip(values, counts)) / channels)
    return merged


# ---------------------------------------------------------------------------------------------
# Commands.


def _progress(total: int, quiet: bool, what: str) -> tqdm:
    """A bytes progress bar on stderr, only on a terminal and only if the job takes > 1 s."""
    return tqdm(total=total, unit="B", unit_scale=True, desc=what, delay=1, file=sys.stderr,
                disable=quiet or not sys.stderr.isatty())


def _quantize_chunk(source: _Source, chunk: list[_Item], writer: SafetensorsWriter,
                    stats: dict[str, dict] | None) -> None:
    """Read a chunk, quantize its tensors in one kernel call, write everything it holds."""
    tensors = source.read([item.spec.name for item in chunk])
    quantized = [item for item in chunk if item.entry]
    names = [item.spec.name for item in quantized]
    results = quantize_with_options([tensors[n] for n in names],
                                    [item.entry.axis for item in quantized],
                                    [item.options for item in quantized], names)
    for item, qweight in zip(quantized, results):
        for name, tensor in item.entry.file_tensors(qweight).items():
            writer.write(name, tensor)
        if stats is not None:
            stats[item.spec.name] = _tensor_stats(item.spec.name, tensors[item.spec.name],
                                                  qweight)
    for item in chunk:
        if item.entry is None:
            writer.write(item.spec.name, tensors[item.spec.name])


def _quantize(args: argparse.Namespace) -> None:
    source_path, out = Path(args.input), Path(args.output)
    report_path = Path(args.report) if args.report else None
    _check_input(source_path, (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX))
    _check_output(out, (SAFETENSORS_SUFFIX,), source_path)
    if report_path:
        _check_output(report_path, (".json",), source_path, out)
    start = time.perf_counter()
    source = _open_source(source_path)
    items = _plan(source, args)
    stats: dict[str, dict] | None = {} if report_path else None
    total = sum(item.spec.nbytes for item in items)
    with SafetensorsWriter(out, _file_specs(items)) as writer, \
            _progress(total, args.quiet, "quantize") as bar:
        for chunk in _chunks(items, CHUNK_BYTES):
            _quantize_chunk(source, chunk, writer, stats)
            bar.update(sum(item.spec.nbytes for item in chunk))
        entries = [item.entry for item in items if item.entry]
        writer.metadata = squant_metadata(entries, stats)
    seconds = time.perf_counter() - start
    if report_path:
        _write_report(report_path, source_path, out, entries, stats, seconds)
    if not args.quiet:
        print(f"{out}: {len(entries)} of {len(items)} tensors quantized, {_size(total)} -> "
              f"{_size(out.stat().st_size)} in {seconds:.1f} s")


def _write_report(path: Path, source: Path, out: Path, entries: list[QuantizedEntry],
                  stats: dict[str, dict], seconds: float) -> None:
    """The per-tensor statistics as JSON (the same ones the file's metadata holds)."""
    tensors = {e.name: {"bits": e.bits, "mode": e.mode, "axis": e.axis, "shape": list(e.shape),
                        "scheme": e.scheme, "granularity": e.granularity, **stats[e.name]}
               for e in entries}
    report = {"input": str(source), "output": str(out), "seconds": seconds, "tensors": tensors}
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(report, indent=2) + "\n")


def _dequantize(args: argparse.Namespace) -> None:
    source_path, out = Path(args.input), Path(args.output)
    _check_input(source_path, (SAFETENSORS_SUFFIX,))
    _check_output(out, (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES), source_path)
    with SquantReader(source_path) as reader:
        names = reader.names
        if out.suffix.lower() == SAFETENSORS_SUFFIX:
            with SafetensorsWriter(out, [reader.spec(n) for n in names]) as writer, \
                    _progress(len(names), args.quiet, "dequantize") as bar:
                for name in names:
                    writer.write(name, reader.read_dequantized(name))
                    bar.update()
                writer.metadata = {"format": "pt"}
        else:
            state = {name: reader.read_dequantized(name) for name in names}
            with atomic_path(out) as temporary:
                torch.save(state, temporary)
    if not args.quiet:
        print(f"{out}: {len(names)} float tensors")


def _inspect(args: argparse.Namespace) -> None:
    path = Path(args.file)
    _check_input(path, (SAFETENSORS_SUFFIX,))
    with SquantReader(path) as reader:
        print(_inspect_table(reader))


def _inspect_table(reader: SquantReader) -> str:
    """One row per tensor: what it was, how it is stored, and its error statistics."""
    header = ("tensor", "dtype", "bits", "mode", "shape", "stored", "max |W-Q|",
              "channel |sum| EQ -> SQuant")
    rows = [header]
    for name in reader.names:
        spec, entry, stats = reader.spec(name), reader.entries.get(name), reader.report.get(name)
        has_stats = isinstance(stats, dict) and all(isinstance(stats.get(f), (int, float))
                                                    for f in STAT_FIELDS)
        rows.append((name, str(spec.dtype).removeprefix("torch."),
                     str(entry.bits) if entry else "-", entry.mode if entry else "-",
                     "x".join(map(str, spec.shape)), _size(reader.stored_bytes(name)),
                     f"{stats['max_abs_weight_error']:.3g}" if has_stats else "-",
                     f"{stats['channel_sum_eq_mean']:.3g} -> "
                     f"{stats['channel_sum_squant_mean']:.3g}" if has_stats else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    original = sum(reader.spec(name).nbytes for name in reader.names)
    lines.append(f"{len(reader.entries)} quantized and {len(reader.float_names)} float tensors; "
                 f"{_size(reader.path.stat().st_size)} on disk, {_size(original)} unquantized; "
                 f"squant format {FORMAT_VERSION}, written by squant "
                 f"{reader.squant_version}")
    return "\n".join(lines)


def _size(count: int) -> str:
    """A byte count for people: ``1.5 MB``."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            break
        value /= 1000
    return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"


def _demo(_: argparse.Namespace) -> None:
    from .demo import main

    main()


# ---------------------------------------------------------------------------------------------
# Parser and entry point.


def _pattern_bits(text: str) -> tuple[str, int]:
    """``PATTERN=BITS`` of ``--layer-bits``."""
    pattern, sep, bits = text.rpartition("=")
    if not sep or not pattern or not bits.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected PATTERN=BITS (like 'fc*=8'), got {text!r}")
    return pattern, int(bits)


def _add_quantize(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "quantize", help="quantize a checkpoint (state_dict .pt/.pth/.bin or .safetensors) to "
        "a squant .safetensors file",
        description="Quantize every floating tensor whose name ends in 'weight' and that has "
        ">= 2 dims (output channels on axis 0, or 1 with --transposed); copy the others. "
        "Patterns (fnmatch) match a tensor's name or its layer's ('fc' for 'fc.weight').")
    parser.add_argument("input", metavar="IN", help="checkpoint: .pt, .pth, .bin or .safetensors")
    parser.add_argument("output", metavar="OUT", help="the squant file to write (.safetensors)")
    parser.add_argument("--bits", type=int, default=4, help="2..8 (default 4)")
    parser.add_argument("--mode", choices=MODES, default="KC",
                        help="E = round to nearest, K/C = + kernel/channel flips (default KC)")
    parser.add_argument("--scheme", choices=SCHEMES, default="asymmetric")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="channel")
    parser.add_argument("--skip", nargs="+", action="extend", default=[], metavar="PATTERN",
                        help="tensors left in float")
    parser.add_argument("--layer-bits", nargs="+", action="extend", default=[],
                        type=_pattern_bits, metavar="PATTERN=BITS",
                        help="bits for the tensors a pattern matches (first match wins)")
    parser.add_argument("--transposed", nargs="+", action="extend", default=[],
                        metavar="PATTERN", help="tensors with output channels on axis 1 "
                        "(ConvTranspose weights)")
    parser.add_argument("--report", metavar="REPORT.json",
                        help="write per-tensor error statistics (also stored in OUT)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    parser.set_defaults(run=_quantize)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="squant", description="Data-free SQuant quantization.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="quantize the bundled Fashion-MNIST model and "
                               "compare round-to-nearest with SQuant")
    demo.set_defaults(run=_demo)
    _add_quantize(commands)
    dequantize = commands.add_parser("dequantize", help="a squant file back to a float "
                                     "state_dict (.safetensors or .pt/.pth/.bin)")
    dequantize.add_argument("input", metavar="IN", help="a squant .safetensors file")
    dequantize.add_argument("output", metavar="OUT", help="float state_dict to write")
    dequantize.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    dequantize.set_defaults(run=_dequantize)
    inspect = commands.add_parser("inspect", help="per-tensor table of a squant file")
    inspect.add_argument("file", metavar="FILE", help="a squant .safetensors file")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``squant`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (QuantizationError, TypeError, OSError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"squant: error: {message}", file=sys.stderr)
        return 1
    return 0
