"""Import paths of modules that moved into subpackages (squant 0.1's flat layout).

``import squant.tensor`` or ``from squant.bn_ranges import ChannelGaussians`` keep working: the
old name is an alias of the new module (the same module object, imported on first use), so
pickles and user code written against the flat layout still resolve. New code should use the
new paths; this table is the one place that knows the old ones.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

MOVED = {
    "squant.errors": "squant.core.errors",
    "squant.options": "squant.core.options",
    "squant.batch": "squant.core.batch",
    "squant.tensor": "squant.core.tensor",
    "squant.report": "squant.core.report",
    "squant.module_tree": "squant.nn.module_tree",
    "squant.activations": "squant.ranges.activations",
    "squant.bn_ranges": "squant.ranges.batchnorm",
    "squant.bias_correction": "squant.ranges.bias_correction",
    "squant.packing": "squant.io.packing",
    "squant.file_format": "squant.io.file_format",
    "squant.file_io": "squant.io.file_io",
    "squant.checkpoint": "squant.io.checkpoint",
    "squant.storage": "squant.io.storage",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names of :data:`MOVED` and loads them as their new module."""

    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the new module is already imported."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
