/*
 * The clipping search of intn-group.v1 (shardstore/codecs/intn.py), fused into one pass per group.
 *
 *   clip_errors(groups, size, divisors, zeros, scales, qmax, out) -> None
 *
 * `groups` holds G contiguous groups of `size` float32 values; `divisors`, `zeros` and `scales`
 * hold S x G float32 (one row per clipping step); `out` (S x G float32) receives, for each step and
 * group, the sum over the group of ((clip(rint(x / d) + z, 0, qmax) - z) * s - x)^2.
 *
 * The numpy path in intn.py computes the same thing one whole-array pass per operation; this
 * computes it group by group while the group sits in L1, with the GIL released. It must give the
 * same float32 bits, since the search keeps the step with the smallest sum: every operation is
 * the same IEEE float32 operation in the same order (built as ISO C99, so nothing is contracted
 * into an FMA), and the sum is numpy's pairwise summation (8 accumulators over blocks of at most
 * 128, halves split at multiples of 8), which tests/codecs/test_intn_search.py checks bit for
 * bit against numpy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>

#define PW_BLOCKSIZE 128

/* numpy's pairwise sum for float32 (numpy/_core/src/umath/loops_utils.h.src), float accumulators. */
static float pairwise_sum(const float *a, Py_ssize_t n) {
    if (n < 8) {
        float res = 0.f;
        for (Py_ssize_t i = 0; i < n; i++)
            res += a[i];
        return res;
    }
    if (n <= PW_BLOCKSIZE) {
        float r[8];
        Py_ssize_t i;
        for (int j = 0; j < 8; j++)
            r[j] = a[j];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++)
                r[j] += a[i + j];
        float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++)
            res += a[i];
        return res;
    }
    Py_ssize_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

/* Round half to even, as np.rint: exact for |v| < 2^23 by adding and removing 2^23; larger floats
 * are already integers. Written without a libm call so that the loop vectorizes. */
static inline float rint_even(float v) {
    float a = v < 0.f ? -v : v;
    float r = (a + 8388608.f) - 8388608.f;
    r = v < 0.f ? -r : r;
    return a < 8388608.f ? r : v;
}

static PyObject *clip_errors(PyObject *self, PyObject *args) {
    Py_buffer groups, divisors, zeros, scales, out;
    Py_ssize_t size;
    float qmax;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*ny*y*y*fw*", &groups, &size, &divisors, &zeros, &scales, &qmax, &out))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = size > 0 ? (Py_ssize_t)(groups.len / sizeof(float)) / size : 0;
    Py_ssize_t cells = (Py_ssize_t)(out.len / sizeof(float));
    if (size <= 0 || count * size * (Py_ssize_t)sizeof(float) != groups.len || count == 0 ||
        cells % count != 0 || divisors.len != out.len || zeros.len != out.len || scales.len != out.len) {
        PyErr_SetString(PyExc_ValueError, "clip_errors: inconsistent buffer sizes");
        goto done;
    }
    float *work = malloc((size_t)size * sizeof(float));
    if (work == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t steps = cells / count;
    const float *x_all = groups.buf, *dv = divisors.buf, *zv = zeros.buf, *sv = scales.buf;
    float *err = out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t g = 0; g < count; g++) {
        const float *x = x_all + g * size;
        for (Py_ssize_t s = 0; s < steps; s++) {
            Py_ssize_t cell = s * count + g;
            float d = dv[cell], z = zv[cell], sc = sv[cell];
            for (Py_ssize_t i = 0; i < size; i++) {
                float w = rint_even(x[i] / d) + z;
                w = w < 0.f ? 0.f : w; /* np.clip(w, 0, qmax): max with 0, then min with qmax */
                w = w > qmax ? qmax : w;
                w = (w - z) * sc - x[i];
                work[i] = w * w;
            }
            err[cell] = pairwise_sum(work, size);
        }
    }
    Py_END_ALLOW_THREADS
    free(work);
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&groups);
    PyBuffer_Release(&divisors);
    PyBuffer_Release(&zeros);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"clip_errors", clip_errors, METH_VARARGS, "Squared error of every clipping step for every group."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_quantize", NULL, -1, methods};

PyMODINIT_FUNC PyInit__quantize(void) { return PyModule_Create(&module); }
