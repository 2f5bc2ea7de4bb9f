"""Process set-up that must happen before squant's other modules (and torch) are imported."""

import importlib.util
import os
import sys

# numba's and torch's OpenMP threads take turns on small machines; busy-waiting ones slow the
# other side down several-fold (see PERFORMANCE_NOTES). Only applies if torch is not loaded yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _map_checkout_kernels() -> None:
    """Installed, ``kernels/`` is ``squant/kernels``. In a source checkout imported from its
    root (``python -m squant`` there), ``kernels/`` sits beside this folder: map it the same
    way, so that the checkout behaves as the installed package does."""
    here = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.join(os.path.dirname(here), "kernels")
    if os.path.isdir(os.path.join(here, "kernels")) or "squant.kernels" in sys.modules:
        return
    if not os.path.isfile(os.path.join(checkout, "__init__.py")):
        return  # not a checkout either: the import of squant.kernels fails on its own
    spec = importlib.util.spec_from_file_location(
        "squant.kernels", os.path.join(checkout, "__init__.py"),
        submodule_search_locations=[checkout])
    module = importlib.util.module_from_spec(spec)
    sys.modules["squant.kernels"] = module
    spec.loader.exec_module(module)
    sys.modules["squant"].kernels = module  # what importing a subpackage does


_map_checkout_kernels()
