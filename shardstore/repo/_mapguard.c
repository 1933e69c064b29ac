/*
 * Keeps a memory-mapped input file that shrinks under a push from killing the process.
 *
 * push maps its .safetensors inputs (shardstore/repo/model_files.py). When another program
 * truncates a file while it is mapped (torch.save and safetensors' save_file rewrite a
 * checkpoint in place), the next read of a page past the new end raises SIGBUS, which kills
 * Python with "Bus error" and no word about which file. Python cannot handle SIGBUS itself: its
 * handler only runs later, and the faulting load would fault again first.
 *
 * So a SIGBUS handler, installed with the first watched range: a fault inside a watched range
 * maps a page of zeros over the faulting page and counts it, and the load goes on reading zeros.
 * The push checks the count (and the file's size and times) before it writes a manifest, and
 * fails in one line naming the file: the zeros reach at most some content-addressed shards that
 * no manifest names, which gc removes. A fault anywhere else goes to the handler that was there
 * before (Python's faulthandler, say) or, with none, kills the process as it always did.
 *
 *   watch(buffer) -> slot     a range to guard (slot -1: the table is full, the range unguarded)
 *   faults(slot) -> int       pages of the range replaced by zeros so far
 *   unwatch(slot) -> int      stop guarding; the count, one last time
 *
 * Only the thread that holds the GIL writes the table; the handler, on any thread, reads it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SLOTS 4096

static uintptr_t starts[SLOTS];
static size_t lengths[SLOTS]; /* 0: a free slot; written last on watch, first on unwatch */
static long fault_counts[SLOTS];
static uintptr_t page_mask;
static int installed;
static struct sigaction previous;

static void pass_on(int sig, siginfo_t *info, void *context) {
    /* sa_handler and sa_sigaction share storage: SIG_DFL and SIG_IGN are checked first, whatever
     * the flags. Ignoring a SIGBUS raised by a fault is not possible (the kernel kills anyway), so
     * both die of it, as the process would have without us. */
    if (previous.sa_handler == SIG_DFL || previous.sa_handler == SIG_IGN) {
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    if (previous.sa_flags & SA_SIGINFO)
        previous.sa_sigaction(sig, info, context);
    else
        previous.sa_handler(sig);
}

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    uintptr_t address = (uintptr_t)info->si_addr;
    /* si_code <= 0: sent by kill() or the like, whose si_addr is no address at all. */
    for (int slot = 0; info->si_code > 0 && slot < SLOTS; slot++) {
        size_t length = __atomic_load_n(&lengths[slot], __ATOMIC_ACQUIRE);
        if (length == 0 || address - starts[slot] >= length) continue;
        /* mmap is a plain system call on Linux, safe here in practice (POSIX does not list it). */
        void *page = (void *)(address & page_mask);
        if (mmap(page, (size_t)(~page_mask + 1), PROT_READ, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) ==
            MAP_FAILED)
            break;
        __atomic_add_fetch(&fault_counts[slot], 1, __ATOMIC_RELAXED);
        return; /* the load runs again, and reads zeros */
    }
    pass_on(sig, info, context);
}

static int install(void) {
    if (installed) return 0;
    long size = sysconf(_SC_PAGESIZE);
    page_mask = ~(uintptr_t)((size > 0 ? size : 4096) - 1);
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, &previous) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    installed = 1;
    return 0;
}

static PyObject *watch(PyObject *self, PyObject *args) {
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "y*", &view)) return NULL;
    uintptr_t start = (uintptr_t)view.buf;
    size_t length = (size_t)view.len;
    /* The address stays valid after the export is released, for as long as the map is open;
     * holding the export would stop the caller from closing its map. */
    PyBuffer_Release(&view);
    if (install() != 0) return NULL;
    if (length == 0) return PyLong_FromLong(-1);
    for (int slot = 0; slot < SLOTS; slot++) {
        if (__atomic_load_n(&lengths[slot], __ATOMIC_RELAXED) != 0) continue;
        starts[slot] = start;
        fault_counts[slot] = 0;
        __atomic_store_n(&lengths[slot], length, __ATOMIC_RELEASE);
        return PyLong_FromLong(slot);
    }
    return PyLong_FromLong(-1);
}

static int slot_of(PyObject *args, int *slot) {
    if (!PyArg_ParseTuple(args, "i", slot)) return -1;
    if (*slot < -1 || *slot >= SLOTS) {
        PyErr_SetString(PyExc_ValueError, "no such slot");
        return -1;
    }
    return 0;
}

static PyObject *faults(PyObject *self, PyObject *args) {
    int slot;
    if (slot_of(args, &slot) != 0) return NULL;
    return PyLong_FromLong(slot < 0 ? 0 : __atomic_load_n(&fault_counts[slot], __ATOMIC_RELAXED));
}

static PyObject *unwatch(PyObject *self, PyObject *args) {
    int slot;
    if (slot_of(args, &slot) != 0) return NULL;
    if (slot < 0) return PyLong_FromLong(0);
    __atomic_store_n(&lengths[slot], 0, __ATOMIC_RELEASE);
    return PyLong_FromLong(__atomic_load_n(&fault_counts[slot], __ATOMIC_RELAXED));
}

static PyMethodDef methods[] = {
    {"watch", watch, METH_VARARGS, "watch(buffer) -> slot: guard a mapped range against SIGBUS (-1: unguarded)"},
    {"faults", faults, METH_VARARGS, "faults(slot) -> pages of the range replaced by zeros so far"},
    {"unwatch", unwatch, METH_VARARGS, "unwatch(slot) -> the count of faults; the range is no longer guarded"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_mapguard", NULL, -1, methods};

PyMODINIT_FUNC PyInit__mapguard(void) { return PyModule_Create(&module); }
