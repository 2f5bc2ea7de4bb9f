"""Build hook: compile squant's kernels for this machine at install (metadata: pyproject.toml).

``build_py`` copies the package as usual, then runs ``kernels/native/build.py`` (numba + the C
compiler, from the build environment) to write ``squant_kernels.so`` beside the installed
kernels (an editable install: beside the sources). squant then starts without numba's JIT
compile. Any failure (no C compiler, say) is a warning, not an error: squant falls back to
numba's JIT. ``SQUANT_KERNELS=jit`` at install skips the build.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent

# Loads kernels/ as a package of its own, without squant's __init__ (which needs torch, absent
# from the build environment), then builds into the folder given.
_BUILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location(
    "squant_kernels_build", sys.argv[1] + "/__init__.py", submodule_search_locations=[sys.argv[1]])
package = importlib.util.module_from_spec(spec)
sys.modules["squant_kernels_build"] = package
spec.loader.exec_module(package)
from squant_kernels_build.native.build import build
from pathlib import Path
print(build(Path(sys.argv[2])))
"""


class BuildWithNativeKernels(build_py):
    """``build_py``, then the native kernels (see the module's doc)."""

    def run(self) -> None:
        super().run()
        if os.environ.get("SQUANT_KERNELS") == "jit":
            return
        editable = getattr(self, "editable_mode", False)
        out = ROOT / "kernels" / "native"
        if not editable:
            out = Path(self.build_lib) / "squant" / "kernels" / "native"
        if importlib.util.find_spec("numba") is None:
            self.warn("numba is not in the build environment: squant will use numba's JIT")
            return
        with tempfile.TemporaryDirectory() as cache:  # numba's cache: not into the package
            result = subprocess.run(
                [sys.executable, "-c", _BUILD, str(ROOT / "kernels"), str(out)],
                env={**os.environ, "NUMBA_CACHE_DIR": cache}, capture_output=True, text=True)
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
            self.warn(f"squant's native kernels were not built ({reason}); squant will use "
                      "numba's JIT, which compiles on first use")


class PlatformDistribution(Distribution):
    """A wheel holding the library is for this platform and Python only (not ``py3-none-any``)."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildWithNativeKernels}, distclass=PlatformDistribution)
