"""The ``squant`` command line: argument parsing, paths, progress, exit codes, one line on
stderr per error. The checkpoint work itself is ``checkpoint.py``'s; the file's, ``file_io``'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from .core.errors import QuantizationError
from .core.options import GRANULARITIES, MODES, RANGES, SCHEMES, QuantOptions
from .io.checkpoint import (
    CHUNK_BYTES,
    INDEX_SUFFIX,
    SAFETENSORS_SUFFIX,
    STAT_FIELDS,
    TORCH_SUFFIXES,
    Item,
    Statistics,
    chunks,
    file_specs,
    open_source,
    plan,
    quantize_chunk,
)
from .io.file_format import QuantizedEntry, squant_metadata
from .io.file_io import SafetensorsWriter, SquantReader, atomic_path

ONNX_SUFFIX = ".onnx"

# ---------------------------------------------------------------------------------------------
# Paths.


def _check_input(path: Path, suffixes: Sequence[str], sharded: bool = False) -> None:
    """``path`` is an existing, non-empty file with one of ``suffixes`` (or, if ``sharded``, a
    folder or an ``*.index.json``)."""
    if sharded and (path.is_dir() or path.name.lower().endswith(INDEX_SUFFIX)):
        if not path.exists():
            raise QuantizationError(f"{path}: no such file")
        return
    if path.suffix.lower() not in suffixes:
        raise QuantizationError(f"{path}: unknown extension {path.suffix!r} (expected "
                                f"{', '.join(suffixes)}"
                                + (f", {INDEX_SUFFIX} or a folder of shards)" if sharded else ")"))
    if not path.is_file():
        raise QuantizationError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise QuantizationError(f"{path}: the file is empty")


def _check_output(path: Path, suffixes: Sequence[str], *inputs: Path,
                  what: str = "output") -> None:
    """``path`` (the ``what`` file) has one of ``suffixes``, its folder exists, it is not a
    folder, and it is none of ``inputs``."""
    if path.suffix.lower() not in suffixes:
        raise QuantizationError(f"{path}: unknown {what} extension {path.suffix!r} (expected "
                                f"{', '.join(suffixes)})")
    if not path.parent.is_dir():
        raise QuantizationError(f"{path}: the {what} folder {path.parent} does not exist")
    if path.is_dir():
        raise QuantizationError(f"{path}: is a folder; choose a file path for the {what}")
    for other in inputs:
        if path.resolve() == other.resolve() or (path.exists() and other.exists()
                                                 and path.samefile(other)):
            raise QuantizationError(f"{path}: the {what} is the same file as {other}; "
                                    f"choose another {what} path")


# ---------------------------------------------------------------------------------------------
# Commands.


def _progress(total: int, quiet: bool, what: str) -> tqdm:
    """A bytes progress bar on stderr, only on a terminal and only if the job takes > 1 s."""
    return tqdm(total=total, unit="B", unit_scale=True, desc=what, delay=1, file=sys.stderr,
                disable=quiet or not sys.stderr.isatty())


def _quantize(args: argparse.Namespace) -> None:
    source_path, out = Path(args.input), Path(args.output)
    report_path = Path(args.report) if args.report else None
    if source_path.suffix.lower() == ONNX_SUFFIX:
        return _quantize_onnx(args, source_path, out, report_path)
    if args.act_bits is not None or args.input_shape is not None:
        raise QuantizationError("--act-bits and --input-shape need an ONNX model (IN.onnx): "
                                "a checkpoint holds no graph to run")
    _check_input(source_path, (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX), sharded=True)
    _check_output(out, (SAFETENSORS_SUFFIX,), source_path)
    if report_path:
        _check_output(report_path, (".json",), source_path, out, what="report")
    start = time.perf_counter()
    source = open_source(source_path)
    _check_output(out, (SAFETENSORS_SUFFIX,), *source.files)
    items = plan(source, QuantOptions(args.bits, args.mode, args.scheme, args.granularity,
                                       args.range, args.group_size, args.include_zero),
                 args.skip, dict(args.layer_bits), args.transposed)
    stats = Statistics() if report_path else None
    total = sum(item.spec.nbytes for item in items)
    entries = [item.entry for item in items if item.entry]
    with ExitStack() as stack:  # the report's temporary first: it must not fail after OUT
        report_file = stack.enter_context(atomic_path(report_path)) if report_path else None
        with SafetensorsWriter(out, file_specs(items)) as writer, \
                _progress(total, args.quiet, "quantize") as bar:
            for chunk in chunks(items, CHUNK_BYTES):
                quantize_chunk(source, chunk, writer, stats)
                bar.update(sum(piece.nbytes for piece in chunk))
            report = stats.merged() if stats else None
            writer.metadata = squant_metadata(entries, report, source.ties, source.metadata)
            seconds = time.perf_counter() - start
            if report_file:
                report_file.write_text(_report_json(source_path, out, entries, report, seconds))
    if not args.quiet:  # the note only on success: an error stays one line
        if source.note:
            print(f"squant: {source.note}", file=sys.stderr)
        print(f"{out}: {len(entries)} of {len(items)} tensors quantized{_ties_note(items)}, "
              f"{_size(total)} -> {_size(out.stat().st_size)} in {seconds:.1f} s")


def _quantize_onnx(args: argparse.Namespace, source: Path, out: Path,
                   report_path: Path | None) -> None:
    """``squant quantize IN.onnx OUT.onnx`` (:func:`squant.export.onnx_quantize.quantize_onnx`)."""
    from .export.onnx_quantize import quantize_onnx

    _check_input(source, (ONNX_SUFFIX,))
    _check_output(out, (ONNX_SUFFIX,), source)
    if report_path:
        _check_output(report_path, (".json",), source, out, what="report")
    if args.transposed:
        raise QuantizationError("--transposed is for checkpoints: ONNX graphs give the layout")
    options = QuantOptions(args.bits, args.mode, args.scheme, args.granularity, args.range,
                           args.group_size)
    with _progress(1, args.quiet, "quantize") as bar:
        job = quantize_onnx(source, out, options, skip=args.skip,
                            layer_bits=dict(args.layer_bits), act_bits=args.act_bits,
                            input_shape=args.input_shape, report_path=report_path)
        bar.update()
    if not args.quiet:
        print(job.summary(out))


def _shape(text: str) -> tuple[int, ...]:  # C,H,W of --input-shape
    parts = text.replace("x", ",").split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected positive ints like 3,224,224, got {text!r}")
    return tuple(int(p) for p in parts)


def _ties_note(items: list[Item]) -> str:
    """``" (1 tied tensor stored once)"`` or ``""``."""
    tied = sum(len(item.tied) for item in items)
    return f" ({tied} tied tensor{'s' * (tied > 1)} stored once)" if tied else ""


def _report_json(source: Path, out: Path, entries: list[QuantizedEntry],
                 stats: dict[str, dict], seconds: float) -> str:
    """The per-tensor statistics as JSON (the same ones the file's metadata holds)."""
    tensors = {e.name: {"bits": e.bits, "mode": e.mode, "axis": e.axis, "shape": list(e.shape),
                        "scheme": e.scheme, "granularity": e.granularity, "range": e.range,
                        "group_size": e.group_size,
                        **stats[e.name]}
               for e in entries}
    report = {"input": str(source), "output": str(out), "seconds": seconds, "tensors": tensors}
    return json.dumps(report, indent=2) + "\n"


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
            _save_torch(reader.read_state_dict(), out)
    if not args.quiet:
        print(f"{out}: {len(names)} float tensors")


def _save_torch(state: dict[str, torch.Tensor], out: Path) -> None:
    """``torch.save`` through a Python file, so that a full disk is an ``OSError`` (torch's own
    writer turns it into a many-line ``RuntimeError``); tied tensors are saved once."""
    try:
        with atomic_path(out) as temporary, open(temporary, "wb") as file:
            torch.save(state, file)
    except OSError as error:
        raise QuantizationError(f"{out}: cannot write the output ({error.strerror or error}); "
                                "nothing was written") from None


def _inspect(args: argparse.Namespace) -> None:
    path = Path(args.file)
    if path.suffix.lower() == ONNX_SUFFIX:
        from .export.onnx_quantize import inspect_onnx

        _check_input(path, (ONNX_SUFFIX,))
        print(inspect_onnx(path))
        return
    _check_input(path, (SAFETENSORS_SUFFIX,))
    with SquantReader(path) as reader:
        print(_inspect_table(reader))


def _inspect_table(reader: SquantReader) -> str:
    """One row per tensor: what it was, how it is stored, and its error statistics."""
    header = ("tensor", "dtype", "bits", "mode", "shape", "stored", "max |W-Q|",
              "channel |sum| EQ -> SQuant")
    rows = [header]
    for name in reader.names:
        stored_name = reader.canonical(name)
        spec, entry = reader.spec(name), reader.entries.get(stored_name)
        stats = reader.report.get(stored_name)
        has_stats = isinstance(stats, dict) and all(isinstance(stats.get(f), (int, float))
                                                    for f in STAT_FIELDS)
        stored = (f"tied: {reader.ties[name]}" if name in reader.ties
                  else _size(reader.stored_bytes(name)))
        rows.append((name, str(spec.dtype).removeprefix("torch."),
                     str(entry.bits) if entry else "-", entry.mode if entry else "-",
                     "x".join(map(str, spec.shape)), stored,
                     f"{stats['max_abs_weight_error']:.3g}" if has_stats else "-",
                     f"{stats['channel_sum_eq_mean']:.3g} -> "
                     f"{stats['channel_sum_squant_mean']:.3g}" if has_stats else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    original = sum(reader.spec(name).nbytes for name in reader.names if name not in reader.ties)
    lines.append(f"{len(reader.entries)} quantized and {len(reader.float_names)} float tensors; "
                 f"{_size(reader.path.stat().st_size)} on disk, {_size(original)} unquantized; "
                 f"squant format {reader.format_version}, written by squant "
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
        "quantize", help="quantize a checkpoint (state_dict .pt/.pth/.bin/.ckpt, .safetensors, "
        "or a sharded one) to a squant .safetensors file, or an ONNX model to an ONNX model",
        description="Quantize every floating tensor whose name ends in 'weight' and that has "
        ">= 2 dims (output channels on axis 0, or 1 with --transposed; embedding tables per "
        "row); copy the others. "
        "Patterns (fnmatch) match a tensor's name or its layer's ('fc' for 'fc.weight'). "
        "IN.onnx OUT.onnx: every Conv, ConvTranspose, Gemm and MatMul weight initializer; "
        "patterns match node or initializer names.")
    parser.add_argument("input", metavar="IN", help="checkpoint: .pt, .pth, .bin, .ckpt, "
                        ".safetensors, an *.index.json of shards, or a folder of shards")
    parser.add_argument("output", metavar="OUT", help="the squant file to write (.safetensors; "
                        ".onnx for an .onnx input)")
    parser.add_argument("--bits", type=int, default=4, help="2..8 (default 4)")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="E = round to nearest, K/C = + kernel/channel flips (default KC)")
    parser.add_argument("--scheme", choices=SCHEMES, default="asymmetric")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="channel")
    parser.add_argument("--range", choices=RANGES, default=None,
                        help="minmax (default): each channel's full range; search: the best "
                             "shrunk range; fit: the best step and placement (with "
                             "--group-size: mode E, range fit by default)")
    parser.add_argument("--group-size", type=int, default=None, metavar="G",
                        help="a grid per group of G consecutive inputs of each output channel "
                             "(G >= 2; for convolutions a multiple of the kernel size); default: "
                             "one grid per output channel")
    parser.add_argument("--include-zero", action="store_true",
                        help="widen every range to include 0 (an integer zero point inside the "
                             "codes' range, as int8 runtimes need)")
    parser.add_argument("--skip", nargs="+", action="extend", default=[], metavar="PATTERN",
                        help="tensors left in float")
    parser.add_argument("--layer-bits", nargs="+", action="extend", default=[],
                        type=_pattern_bits, metavar="PATTERN=BITS",
                        help="bits for the tensors a pattern matches (first match wins)")
    parser.add_argument("--transposed", nargs="+", action="extend", default=[],
                        metavar="PATTERN", help="tensors with output channels on axis 1 "
                        "(ConvTranspose weights)")
    parser.add_argument("--act-bits", type=int, default=None, metavar="A",
                        help="ONNX input only: also quantize activations to A bits (data-free, "
                        "the paper's ranges; the last layer 8 bits) so convs run as QLinearConv")
    parser.add_argument("--input-shape", type=_shape, default=None, metavar="C,H,W",
                        help="ONNX input only: one input's shape without the batch dim, for "
                        "--act-bits on models with dynamic dims")
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
    inspect.add_argument("file", metavar="FILE", help="a squant .safetensors file, or an .onnx "
                         "file written by squant quantize")
    inspect.set_defaults(run=_inspect)
    return parser


class _Stopped(KeyboardInterrupt):
    """A SIGTERM or SIGHUP, raised like Ctrl-C so that partial outputs are removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, _frame: object) -> None:
    for each in _SIGNALS:  # a second signal must not interrupt the clean-up
        signal.signal(each, signal.SIG_IGN)
    raise _Stopped(signum)


_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                 if hasattr(signal, name))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``squant`` console script; returns the exit code: 0, 1 for an error
    (one line on stderr), 2 for bad usage, 128 + N when stopped by signal N (SIGINT, SIGTERM,
    SIGHUP; the partial output is removed)."""
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("squant")
    level = logger.level
    if getattr(args, "quiet", False):  # also silences "compiling the kernels" (a WARNING)
        logger.setLevel(logging.ERROR)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {each: signal.signal(each, _stop) for each in _SIGNALS}
    try:
        args.run(args)
    except (QuantizationError, TypeError, OSError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"squant: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        signum = getattr(error, "signum", signal.SIGINT)
        print(f"squant: stopped by {signal.Signals(signum).name}; no output left behind",
              file=sys.stderr)
        return 128 + signum
    finally:
        for each, handler in handlers.items():
            signal.signal(each, handler)
        logger.setLevel(level)
    return 0
