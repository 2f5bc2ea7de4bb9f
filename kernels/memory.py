"""Views of the callers' arrays from their addresses, so that weights are read where they lie.

The batch entry point takes each channel's address instead of one flat buffer of all weights:
that saves copying every weight once. The caller (``squant.batch``) owns the arrays and keeps
them alive during the call; an address is only ever made from an array's own data pointer.
"""

import numba
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def _address_as_pointer(typingctx, address):
    """An int64 address as a ``void*``."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@njit(cache=True, inline="always")
def view_at(address, size, dtype):
    """A C-contiguous array of ``dtype`` at ``address``: 1-D of ``size`` elements, or of the
    shape ``size`` (a tuple)."""
    return numba.carray(_address_as_pointer(address), size, dtype)


@njit(cache=True, inline="always")
def unowned(array):
    """A view of a 1-D ``array``'s memory that holds no reference to it (no meminfo): passing it
    to a function costs no reference counting (two atomic operations per array and call, which
    dominate the work of a channel of a few dozen elements). The caller keeps ``array`` alive
    (uses it after the last use of the view)."""
    return view_at(array.ctypes.data, array.size, array.dtype)
