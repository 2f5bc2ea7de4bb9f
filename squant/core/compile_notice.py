"""One line on stderr when squant's numba kernels compile, so that a first call is not silent.

Where the native kernels built at install are not used (``squant.kernels.native``: no C
compiler at install, or ``SQUANT_KERNELS=jit``), numba compiles the kernels on the first call
(10-30 s on a 2-core machine) and stores them in its on-disk cache; later processes load them
in a fraction of a second. The notice says why the native kernels are not used. A
numba event listener (numba's ``numba:compile`` event fires for real compiles only, not for
cache loads) logs a WARNING on the ``squant`` logger the first time one of squant's functions
compiles in a process. Without logging configured Python prints it on stderr; silence it with
``logging.getLogger("squant").setLevel(logging.ERROR)`` (the CLI's ``--quiet`` does).
"""

from __future__ import annotations

import logging

from numba.core import event

logger = logging.getLogger("squant")
MESSAGE = ("squant: compiling the numba kernels for this machine, once per install "
           "(about 10-30 s); later runs load them from numba's cache")
# Appended to MESSAGE when squant knows why its native kernels (built at install) are not used.
REASON = " (native kernels not used: {})"


class _CompileNotice(event.Listener):
    """Logs :data:`MESSAGE` at the first compile of a squant function in this process."""

    def __init__(self) -> None:
        self.said = False
        self.reason = ""

    def on_start(self, ev: event.Event) -> None:
        if self.said:
            return
        module = getattr(getattr(ev.data.get("dispatcher"), "py_func", None), "__module__", "")
        if module.startswith("squant."):
            self.said = True
            logger.warning(MESSAGE + (REASON.format(self.reason) if self.reason else ""))

    def on_end(self, ev: event.Event) -> None:
        """Nothing to do when a compile ends."""


_notice: _CompileNotice | None = None


def install(reason: str = "") -> None:
    """Listen to numba's compile events (once per process); ``reason``: why the native kernels
    are not used, said with the notice."""
    global _notice
    if _notice is None:
        _notice = _CompileNotice()
        event.register("numba:compile", _notice)
    _notice.reason = reason
