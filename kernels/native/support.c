/* The numba runtime symbols that squant's native kernels reference (see native_build.py).
 *
 * numba's cfunc wrappers reference its helper library to turn an exception of the compiled code
 * into a Python exception, and its reference counting references the release of allocated
 * memory. The native entries allocate nothing, and an exception in them is a bug: these stubs
 * keep such a failure visible (the entry then does not return 1, and squant raises) instead of
 * resolving to numba's own library, which is not loaded when the native kernels are used.
 */
#include <stdio.h>
#include <stdlib.h>

typedef int PyGILState_STATE;
typedef struct _object PyObject;
extern PyGILState_STATE PyGILState_Ensure(void);
extern void PyGILState_Release(PyGILState_STATE state);
extern void PyErr_SetString(PyObject *type, const char *message);
extern PyObject *PyExc_RuntimeError;

static const char failure[] = "squant's native kernels raised an error (set SQUANT_KERNELS=jit "
                              "to run numba's JIT, which names it)";

void numba_gil_ensure(PyGILState_STATE *state) { *state = PyGILState_Ensure(); }

void numba_gil_release(PyGILState_STATE *state) { PyGILState_Release(*state); }

PyObject *numba_unpickle(const char *data, int n, const char *hashed) {
    (void)data; (void)n; (void)hashed;
    PyErr_SetString(PyExc_RuntimeError, failure);
    return NULL;
}

PyObject *numba_runtime_build_excinfo_struct(PyObject *struct_gv, PyObject *exc_args) {
    (void)struct_gv; (void)exc_args;
    PyErr_SetString(PyExc_RuntimeError, failure);
    return NULL;
}

int numba_do_raise(PyObject *exc_packed) {
    (void)exc_packed;
    PyErr_SetString(PyExc_RuntimeError, failure);
    return 0;
}

static void unreachable(const char *name) {
    fprintf(stderr, "squant: native kernels: %s called, but they allocate nothing\n", name);
    abort();
}

void NRT_MemInfo_call_dtor(void *meminfo) { (void)meminfo; unreachable("NRT_MemInfo_call_dtor"); }

void NRT_Free(void *pointer) { (void)pointer; unreachable("NRT_Free"); }
