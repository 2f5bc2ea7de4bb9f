"""Benchmark: ``squant quantize IN.onnx OUT.onnx`` on a real ONNX model shipped in a wheel.

The model: PP-OCRv4's text recognizer (``ch_PP-OCRv4_rec_infer.onnx``, 10.9 MB, paddle2onnx,
opset 12; 38 Conv + 13 MatMul weights) from the ``rapidocr_onnxruntime`` wheel. Inputs: text
lines (words and numbers) rendered with the system's DejaVu and Liberation fonts, 48 px high,
preprocessed as rapidocr does; outputs decoded by greedy CTC with the model's own character
list (its ``character`` metadata).

For float, SQuant W8, SQuant W4 (KC) and round-to-nearest W4 (``--mode E``), and W4 with the
convs at 8 bits (``--layer-bits 'conv2d_*=8'``), all weight-only, it prints: line accuracy
and character accuracy against the rendered text, agreement with the float model's reading,
file size (x float), and onnxruntime latency at batch 1 (1 intra-op thread, sessions
interleaved, median of the rounds' per-call medians).

Run: ``pip install --no-deps rapidocr_onnxruntime pillow`` then
``python bench/bench_onnx_input.py [--lines 300] [--rounds 7] [--model PATH]``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import squant
from squant.core.options import QuantOptions
from squant.export.onnx_quantize import quantize_onnx

FONTS = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
         "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
         "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
         "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
         "/usr/share/fonts/truetype/liberation2/LiberationSerif-Regular.ttf"]
WORDS = ("invoice total amount date number order customer account balance payment due "
         "street road city station price quantity item code ticket flight gate seat "
         "quantization model weight channel kernel network layer").split()


def default_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")  # no import: it needs OpenCV
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps rapidocr_onnxruntime (or give --model)")
    return Path(spec.origin).parent / "models" / "ch_PP-OCRv4_rec_infer.onnx"


def text_lines(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(count):
        parts = [str(rng.choice(WORDS)).capitalize() if rng.random() < 0.3 else
                 str(rng.choice(WORDS)) for _ in range(rng.integers(1, 4))]
        if rng.random() < 0.6:
            parts.insert(int(rng.integers(0, len(parts) + 1)), str(rng.integers(0, 100000)))
        lines.append(" ".join(parts))
    return lines


def render(text: str, font_path: str, height: int = 48) -> np.ndarray:
    """The line as rapidocr feeds it: (3, 48, W) float32 in [-1, 1], W = 48 * ratio."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, 30)
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGB", (right - left + 16, height), "white")
    ImageDraw.Draw(image).text((8 - left, (height - (bottom - top)) // 2 - top), text,
                               font=font, fill="black")
    array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255
    return (array - 0.5) / 0.5


def decode(probabilities: np.ndarray, characters: list[str]) -> str:
    best = probabilities.argmax(-1)
    keep = np.ones_like(best, dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    return "".join(characters[i] for i in best[keep] if i != 0)


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = squant.onnx_session_options(path, threads=threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def read_all(path: Path, images: list[np.ndarray], characters: list[str]) -> list[str]:
    run = session(path, threads=0 if os.cpu_count() else 1)
    name = run.get_inputs()[0].name
    return [decode(run.run(None, {name: image[None]})[0][0], characters) for image in images]


def latency(paths: dict[str, Path], image: np.ndarray, rounds: int) -> dict[str, float]:
    """Median ms per call at batch 1, 1 thread, sessions interleaved round by round."""
    sessions = {key: session(path) for key, path in paths.items()}
    feeds = {key: {s.get_inputs()[0].name: image[None]} for key, s in sessions.items()}
    for key, s in sessions.items():
        s.run(None, feeds[key])
    times: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in range(rounds):
        for key, s in sessions.items():
            calls = []
            end = time.perf_counter() + 0.2
            while time.perf_counter() < end:
                start = time.perf_counter()
                s.run(None, feeds[key])
                calls.append(time.perf_counter() - start)
            times[key].append(statistics.median(calls))
    return {key: 1e3 * statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--lines", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    model = args.model or default_model()
    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False)
            .metadata_props}
    characters = ["blank", *meta["character"].splitlines(), " "]
    lines = text_lines(args.lines)
    images = [render(text, FONTS[i % len(FONTS)]) for i, text in enumerate(lines)]
    variants = {"float": None, "SQuant W8": QuantOptions(8), "SQuant W4": QuantOptions(4),
                "RTN W4 (--mode E)": QuantOptions(4, "E"), "SQuant W4, convs W8": QuantOptions(4),
                "RTN W4, convs W8": QuantOptions(4, "E")}
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for key, options in variants.items():
            if options is None:
                paths[key] = model
                continue
            paths[key] = Path(folder, f"{len(paths)}.onnx")
            quantize_onnx(model, paths[key], options,
                          layer_bits={"conv2d_*": 8} if "convs W8" in key else None)
        readings = {key: read_all(path, images, characters) for key, path in paths.items()}
        ms = latency(paths, images[0], args.rounds)
        sizes = {key: path.stat().st_size for key, path in paths.items()}
    total = sum(len(text) for text in lines)
    print(f"PP-OCRv4 rec ({model.name}), {len(lines)} rendered text lines; latency: batch 1, "
          f"1 thread, median of {args.rounds} interleaved rounds")
    print(f"{'model':<20} {'line acc':>9} {'char acc':>9} {'= float':>8} {'MB':>6} "
          f"{'x float':>8} {'ms':>7}")
    for key in variants:
        exact = np.mean([r == t for r, t in zip(readings[key], lines)])
        chars = 1 - sum(edit_distance(r, t) for r, t in zip(readings[key], lines)) / total
        same = np.mean([r == f for r, f in zip(readings[key], readings["float"])])
        print(f"{key:<20} {exact:>9.1%} {chars:>9.2%} {same:>8.1%} {sizes[key] / 1e6:>6.2f} "
              f"{sizes[key] / sizes['float']:>7.2f}x {ms[key]:>7.2f}")


if __name__ == "__main__":
    main()
