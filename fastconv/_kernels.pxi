# The arithmetic of fastconv. Included by _kernels_<variant>.pyx, which setup.py compiles once per
# target (baseline x86-64, x86-64-v3 = AVX2+FMA, x86-64-v4 = AVX-512); _dispatch picks one at
# import. Shapes are validated by fastconv.geometry before any function here runs: no checks here.
#
# Layouts: input NHWC, kernel HWIO with I = channels per group (Keras' own), output NHWC.
# Every output element is owned by one thread and summed in a fixed order, so results are
# bit-identical whatever the thread count.

from cython.parallel cimport prange
from libc.string cimport memset

ctypedef fused floating:
    float
    double

cdef extern from *:
    """
    #ifdef _OPENMP
      #include <omp.h>
      #define FASTCONV_OPENMP 1
    #else
      #define FASTCONV_OPENMP 0
      #define omp_get_max_threads() 1
    #endif
    """
    bint FASTCONV_OPENMP
    int omp_get_max_threads() noexcept nogil

OPENMP = bool(FASTCONV_OPENMP)


cdef inline void _tap(const floating* xin, const floating* wtap, floating* acc,
                      Py_ssize_t groups, Py_ssize_t cin_g, Py_ssize_t cout_g) noexcept nogil:
    # acc[g*cout_g + o] += sum_i xin[g*cin_g + i] * wtap[i, g*cout_g + o], wtap of shape
    # (cin_g, groups*cout_g): one kernel tap applied to one pixel, every group.
    cdef Py_ssize_t g, i, o, cout = groups * cout_g
    cdef floating v
    cdef const floating* wr
    cdef floating* a
    if cin_g == 1 and cout_g == 1:
        # Depthwise: one multiply per channel, a vector over contiguous channels.
        for o in range(cout):
            acc[o] += xin[o] * wtap[o]
        return
    for g in range(groups):
        a = acc + g * cout_g
        for i in range(cin_g):
            v = xin[g * cin_g + i]
            wr = wtap + i * cout + g * cout_g
            for o in range(cout_g):
                a[o] += v * wr[o]


cdef void _forward_row(const floating* x, const floating* w, floating* out,
                       Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                       Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t cin_g, Py_ssize_t F,
                       Py_ssize_t OW, Py_ssize_t ih0, Py_ssize_t sw, Py_ssize_t dh,
                       Py_ssize_t dw, Py_ssize_t pad_left, Py_ssize_t groups) noexcept nogil:
    # One output row: x points at image n, out at output row (n, oh), ih0 = oh*sh - pad_top.
    cdef Py_ssize_t ow, kh, kw, ih, iw
    cdef Py_ssize_t cout_g = F // groups
    cdef floating* o
    memset(out, 0, OW * F * sizeof(floating))
    for ow in range(OW):
        o = out + ow * F
        for kh in range(KH):
            ih = ih0 + kh * dh
            if ih < 0 or ih >= H:
                continue
            for kw in range(KW):
                iw = ow * sw - pad_left + kw * dw
                if iw < 0 or iw >= W:
                    continue
                _tap(x + (ih * W + iw) * C, w + (kh * KW + kw) * cin_g * F, o,
                     groups, cin_g, cout_g)


def forward(const floating[:, :, :, ::1] x,   # IN  (N, H, W, C)
            const floating[:, :, :, ::1] w,   # IN  (KH, KW, C // groups, F)
            floating[:, :, :, ::1] out,       # OUT (N, OH, OW, F)
            int sh, int sw, int dh, int dw, int pad_top, int pad_left, int groups,
            int n_threads):
    cdef Py_ssize_t N = out.shape[0], OH = out.shape[1], OW = out.shape[2], F = out.shape[3]
    cdef Py_ssize_t H = x.shape[1], W = x.shape[2], C = x.shape[3]
    cdef Py_ssize_t KH = w.shape[0], KW = w.shape[1], cin_g = w.shape[2]
    cdef Py_ssize_t r, n, oh
    if N * OH * OW * F == 0:
        return
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef const floating* wp = &w[0, 0, 0, 0]
    cdef floating* op = &out[0, 0, 0, 0]
    for r in prange(N * OH, nogil=True, schedule="static", num_threads=n_threads):
        n = r // OH
        oh = r % OH
        _forward_row(xp + n * H * W * C, wp, op + r * OW * F, H, W, C, KH, KW, cin_g, F,
                     OW, oh * sh - pad_top, sw, dh, dw, pad_left, groups)


cdef void _grad_input_row(const floating* dy, const floating* wt, floating* dx,
                          Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t F,
                          Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t cout_g, Py_ssize_t C,
                          Py_ssize_t W, Py_ssize_t ih, Py_ssize_t sh, Py_ssize_t sw,
                          Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t pad_top,
                          Py_ssize_t pad_left, Py_ssize_t groups) noexcept nogil:
    # One input row of the gradient, gather form: input pixel (ih, iw) collects every output
    # pixel whose window covers it. dy points at image n, dx at input row (n, ih); wt is the
    # kernel regrouped to (KH, KW, F // groups, C) so that _tap serves both directions.
    cdef Py_ssize_t iw, kh, kw, th, tw, oh, ow
    cdef Py_ssize_t cin_g = C // groups
    cdef floating* d
    memset(dx, 0, W * C * sizeof(floating))
    for iw in range(W):
        d = dx + iw * C
        for kh in range(KH):
            th = ih + pad_top - kh * dh
            if th < 0 or th % sh != 0:
                continue
            oh = th // sh
            if oh >= OH:
                continue
            for kw in range(KW):
                tw = iw + pad_left - kw * dw
                if tw < 0 or tw % sw != 0:
                    continue
                ow = tw // sw
                if ow >= OW:
                    continue
                _tap(dy + (oh * OW + ow) * F, wt + (kh * KW + kw) * cout_g * C, d,
                     groups, cout_g, cin_g)


def grad_input(const floating[:, :, :, ::1] dy,   # IN  (N, OH, OW, F)
               const floating[:, :, :, ::1] wt,   # IN  (KH, KW, F // groups, C) regrouped kernel
               floating[:, :, :, ::1] dx,         # OUT (N, H, W, C)
               int sh, int sw, int dh, int dw, int pad_top, int pad_left, int groups,
               int n_threads):
    cdef Py_ssize_t N = dx.shape[0], H = dx.shape[1], W = dx.shape[2], C = dx.shape[3]
    cdef Py_ssize_t OH = dy.shape[1], OW = dy.shape[2], F = dy.shape[3]
    cdef Py_ssize_t KH = wt.shape[0], KW = wt.shape[1], cout_g = wt.shape[2]
    cdef Py_ssize_t r, n, ih
    if N * H * W * C == 0:
        return
    if OH * OW * F == 0:
        dx[...] = 0
        return
    cdef const floating* gp = &dy[0, 0, 0, 0]
    cdef const floating* wp = &wt[0, 0, 0, 0]
    cdef floating* dp = &dx[0, 0, 0, 0]
    for r in prange(N * H, nogil=True, schedule="static", num_threads=n_threads):
        n = r // H
        ih = r % H
        _grad_input_row(gp + n * OH * OW * F, wp, dp + r * W * C, OH, OW, F, KH, KW, cout_g,
                        C, W, ih, sh, sw, dh, dw, pad_top, pad_left, groups)


cdef void _grad_kernel_task(const floating* x, const floating* dy, floating* dw_rows,
                            Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                            Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t F,
                            Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t i0, Py_ssize_t i1,
                            Py_ssize_t cin_g, Py_ssize_t sh, Py_ssize_t sw,
                            Py_ssize_t dh, Py_ssize_t dwl, Py_ssize_t pad_top,
                            Py_ssize_t pad_left, Py_ssize_t groups) noexcept nogil:
    # Rows i0..i1 of dW[kh, kw] (shape (cin_g, F)): a sum over every (n, oh, ow), in order.
    cdef Py_ssize_t n, oh, ow, ih, iw, g, i, o
    cdef Py_ssize_t cout_g = F // groups
    cdef const floating* xp
    cdef const floating* gp
    cdef floating* row
    cdef floating v
    memset(dw_rows, 0, (i1 - i0) * F * sizeof(floating))
    for n in range(N):
        for oh in range(OH):
            ih = oh * sh - pad_top + kh * dh
            if ih < 0 or ih >= H:
                continue
            for ow in range(OW):
                iw = ow * sw - pad_left + kw * dwl
                if iw < 0 or iw >= W:
                    continue
                xp = x + ((n * H + ih) * W + iw) * C
                gp = dy + ((n * OH + oh) * OW + ow) * F
                if cin_g == 1 and cout_g == 1:
                    for o in range(F):
                        dw_rows[o] += xp[o] * gp[o]
                    continue
                for i in range(i0, i1):
                    row = dw_rows + (i - i0) * F
                    for g in range(groups):
                        v = xp[g * cin_g + i]
                        for o in range(g * cout_g, (g + 1) * cout_g):
                            row[o] += v * gp[o]


def grad_kernel(const floating[:, :, :, ::1] x,    # IN  (N, H, W, C)
                const floating[:, :, :, ::1] dy,   # IN  (N, OH, OW, F)
                floating[:, :, :, ::1] dw,         # OUT (KH, KW, C // groups, F)
                int sh, int sw, int dh, int dwl, int pad_top, int pad_left, int groups,
                int n_threads):
    # Work is split into (tap, block of kernel rows) tasks that own disjoint rows of dW, so no
    # reduction crosses threads and the summation order never depends on the thread count.
    cdef Py_ssize_t N = x.shape[0], H = x.shape[1], W = x.shape[2], C = x.shape[3]
    cdef Py_ssize_t OH = dy.shape[1], OW = dy.shape[2], F = dy.shape[3]
    cdef Py_ssize_t KH = dw.shape[0], KW = dw.shape[1], cin_g = dw.shape[2]
    cdef Py_ssize_t block = 16 if cin_g > 16 else cin_g
    cdef Py_ssize_t nblocks = (cin_g + block - 1) // block
    cdef Py_ssize_t t, tap, b, i0, i1
    if N * OH * OW == 0:
        dw[...] = 0
        return
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef const floating* gp = &dy[0, 0, 0, 0]
    cdef floating* dp = &dw[0, 0, 0, 0]
    for t in prange(KH * KW * nblocks, nogil=True, schedule="static", num_threads=n_threads):
        tap = t // nblocks
        b = t % nblocks
        i0 = b * block
        i1 = i0 + block
        if i1 > cin_g:
            i1 = cin_g
        _grad_kernel_task(xp, gp, dp + (tap * cin_g + i0) * F, N, H, W, C, OH, OW, F,
                          tap // KW, tap % KW, i0, i1, cin_g, sh, sw, dh, dwl, pad_top,
                          pad_left, groups)
