"""The package's layout: imports point one way, no circles, small modules and folders, optional
dependencies stay out of ``import squant``, and squant 0.1's flat import paths still resolve."""

from __future__ import annotations

import ast
import importlib
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import squant
from squant._compat import MOVED

ROOT = Path(__file__).resolve().parent.parent
# Floors, bottom up: a module imports only its own folder and the floors below it. ``api`` is
# squant/__init__.py; ``private`` the process and version set-up (squant/_*.py); ``top`` the
# pipeline's entry points (model, cli, demo). Folders on one floor never import each other.
FLOORS = {"kernels": 0, "private": 0, "core": 1, "nn": 2, "ranges": 3, "io": 3, "top": 4,
          "api": 5}
MAX_MODULES_PER_FOLDER = 12
MAX_LINES_PER_MODULE = 400
OPTIONAL_DEPENDENCIES = ("onnx", "onnxruntime", "onnxscript", "transformers", "matplotlib",
                         "skimage", "PIL", "hypothesis")


def package_modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the installed layout (kernels/ as
    squant.kernels)."""
    modules = {}
    for base, prefix in ((ROOT / "squant", "squant"), (ROOT / "kernels", "squant.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([prefix, *parts])] = path
    return modules


def imported_names(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that the module ``name`` at ``path`` imports, anywhere in it
    (lazy imports and TYPE_CHECKING blocks included)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        for target in targets:
            while target and target not in known:  # squant.core.options.X -> squant.core.options
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
                break
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    known = set(modules)
    return {name: imported_names(path, name, known) for name, path in modules.items()}


def floor_of(name: str) -> str:
    parts = name.split(".")
    if name == "squant":
        return "api"
    if parts[1] in ("kernels", "core", "nn", "ranges", "io"):
        return parts[1]
    return "private" if parts[1].startswith("_") and parts[1] != "__main__" else "top"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a list of names, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_imports_point_down_the_floors():
    graph = import_graph(package_modules())
    upward = []
    for name, targets in graph.items():
        for target in targets:
            here, there = floor_of(name), floor_of(target)
            if here != there and FLOORS[there] >= FLOORS[here]:
                upward.append(f"{name} ({here}) imports {target} ({there})")
    assert not upward, "\n".join(sorted(upward))


def test_kernels_import_neither_torch_nor_squant():
    for name, path in package_modules().items():
        if floor_of(name) != "kernels":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert not {"torch", "squant"} & set(roots), f"{name} imports {roots}"


def test_no_import_circle_in_the_package():
    assert find_cycle(import_graph(package_modules())) is None


def test_no_import_circle_in_the_benches():
    scripts = {path.stem: path for path in (ROOT / "bench").glob("*.py")}
    graph = {name: {t for t in imported_names(path, name, set(scripts))}
             for name, path in scripts.items()}
    assert find_cycle(graph) is None


def test_the_finder_sees_circles():
    """The circle check can fail: a made-up graph with a circle is caught."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_folders_and_modules_stay_small():
    too_big = []
    folders: dict[Path, int] = {}
    for path in package_modules().values():
        if path.name != "__init__.py":
            folders[path.parent] = folders.get(path.parent, 0) + 1
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES_PER_MODULE:
            too_big.append(f"{path.relative_to(ROOT)}: {lines} lines")
    too_big += [f"{folder.relative_to(ROOT)}/: {count} modules"
                for folder, count in folders.items() if count > MAX_MODULES_PER_FOLDER]
    assert not too_big, "\n".join(too_big)


def test_import_squant_loads_no_optional_dependency():
    code = ("import sys, squant; print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & "
            f"set({OPTIONAL_DEPENDENCIES!r}))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    assert loaded == []


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_old_module_paths_are_the_new_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_old_names_resolve_to_the_same_objects():
    from squant.activations import fake_quantize
    from squant.bn_ranges import ChannelGaussians
    from squant.storage import load
    from squant.tensor import QuantizedTensor

    assert QuantizedTensor is squant.QuantizedTensor
    assert load is squant.load
    assert ChannelGaussians is squant.ranges.batchnorm.ChannelGaussians
    assert fake_quantize is squant.core.fake_quant.fake_quantize
    assert squant.nn.QuantizedLinear.__module__.startswith("squant.nn")


def test_a_pickle_written_with_the_old_path_loads():
    qtensor = squant.quantize_weight(torch.randn(4, 3), bits=4)
    written = pickle.dumps(qtensor, protocol=0)  # text protocol: module paths spelled out
    assert b"squant.core.tensor" in written
    again = pickle.loads(written.replace(b"squant.core.tensor", b"squant.tensor"))
    assert type(again) is squant.QuantizedTensor
    assert torch.equal(again.codes, qtensor.codes)


def test_every_package_folder_is_installed():
    """pyproject.toml lists the packages explicitly: a new subpackage missing there would be
    absent from a (non-editable) install."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {"squant." + ".".join(p.parent.relative_to(ROOT / "squant").parts)
             for p in (ROOT / "squant").rglob("__init__.py")}
    found = {name.rstrip(".") for name in found}
    found |= {"squant.kernels" + "".join("." + part for part in
                                        p.parent.relative_to(ROOT / "kernels").parts)
              for p in (ROOT / "kernels").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
