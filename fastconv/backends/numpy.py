"""The host side every bridge shares, and the numpy backend itself.

`forward`, `grad_input` and `grad_kernel` take numpy-convertible arrays in the spec's data_format
(any dtype, read-only, non-contiguous or Fortran-ordered), validate them through
fastconv.geometry, and run the compiled kernels in float32 (or float64 when asked) into freshly
allocated arrays. Bridges for the other backends only move tensors to and from these functions.
"""

import functools
from typing import NamedTuple, Optional

import keras
import numpy as np

from fastconv import _dispatch, _memory
from fastconv.geometry import ConvSpec


def result_dtype(x_dtype, k_dtype):
    """The dtype of a convolution's result, as keras.ops.conv gives it: on tensorflow, jax and
    torch equal input dtypes are kept (float64, int64 too), mixed ones follow Keras' promotion;
    Keras' numpy backend always promotes (float64 inputs give float32)."""
    return _result_dtype(keras.backend.backend(), x_dtype, k_dtype)


@functools.lru_cache(maxsize=256)
def _result_dtype(backend, x_dtype, k_dtype):
    # cached: Keras' dtype standardisation took ~30 us a call, a tenth of a small layer's
    if x_dtype == k_dtype and backend != "numpy":
        return keras.backend.standardize_dtype(x_dtype)
    return keras.backend.result_type(x_dtype, k_dtype)


def host_dtype(dtype):
    """The dtype the kernels compute in for a result of `dtype`: float64 stays, all else float32."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _transposed(array, a, shape):
    """A C-contiguous array seen as (N, a, B) transposed to (N, B, a), as a new array of
    `shape` (NCHW <-> NHWC), on the kernels' threads."""
    n = array.shape[0]
    out = _empty(shape, array.dtype)
    if out.size == 0:
        return out
    _dispatch.kernels.transpose(array.reshape(n, a, -1), out.reshape(n, -1, a),
                                _threads(array.size, _ELEMENTS_PER_THREAD))
    return out


# a transpose moves ~4 bytes an element a few times over; below this a second thread costs more
_ELEMENTS_PER_THREAD = 1 << 16


def _nhwc_memory(array, dtype):
    """Whether an NCHW array of dtype is NHWC in memory (torch's channels_last format, e.g. a
    fastconv result passed on, or its gradient): then used as it is. Copied to NCHW and
    transposed back, it cost two passes over the array."""
    return array.dtype == dtype and array.transpose(0, 2, 3, 1).flags.c_contiguous


def _nhwc(array, spec, dtype):
    if not spec.channels_last:
        array = np.asarray(array)
        if _nhwc_memory(array, dtype):
            return array.transpose(0, 2, 3, 1)
    array = np.ascontiguousarray(array, dtype=dtype)
    if spec.channels_last:
        return array
    return _transposed(array, array.shape[1], spec.to_nhwc(array.shape))


def _from_nhwc(array, spec):
    # a view: numpy and torch take the strides as they are; TF and JAX need `contiguous`
    return array if spec.channels_last else array.transpose(0, 3, 1, 2)


def contiguous(array):
    """A host result as a C-contiguous array: a channels_first one (a transposed view of the
    kernels' NHWC result) is transposed by the kernels, 3-4x faster than numpy's copy."""
    if array.flags.c_contiguous:
        return array
    nhwc = array.transpose(0, 2, 3, 1)
    if not nhwc.flags.c_contiguous or array.dtype not in (np.float32, np.float64):
        return np.ascontiguousarray(array)
    n, h, w, c = nhwc.shape
    return _transposed(nhwc, h * w, array.shape)


ALIGN = _memory.ALIGN
_empty = _memory.empty


def _shifted_rows_offset(x, g, spec):
    """The result's offset from a 64-byte boundary for x (C-contiguous, channels_last), as the
    kernels want it (kernels.shifted_rows_offset): x's own where a depthwise 3x3 layer's rows
    run over x's lines (numpy arrays start 16, 32 or 48 bytes off a line), so that the rows'
    stores are aligned too, and large ones stored past the caches; else 0. Time with x 16 bytes
    off over x aligned (2 threads, Zen 4), the result aligned -> as far off as x: 4x56x56x128
    1.24x -> 1.07-1.15x, 8x112x112x32 1.48-1.52x -> 1.07-1.10x, 8x56x56x144 1.66-1.72x ->
    1.05-1.14x. The next layers take such a result at full speed (1x1 and 3x3 dense:
    0.99-1.00x)."""
    return _dispatch.kernels.shifted_rows_offset(
        _memory.address(x), x.itemsize, g.c, g.kh, g.kw, g.cin_g, g.f, g.groups,
        spec.strides[1], spec.dilation_rate[1])


def _aligned_kernel(kernel, dtype):
    """kernel as a C-contiguous array of dtype whose data starts on a 64-byte boundary (a copy
    only where it does not): the kernels read weights in whole vectors, and a vector across two
    cache lines costs two loads (grad_input of 4x28x28x256 in 8 groups: 1.44 ms on an aligned
    kernel, 1.78-1.87 ms on numpy's 16-byte-aligned copy). For grad_input's regrouped kernel,
    a copy anyway; the forward takes the caller's kernel as it is (most of its paths pack the
    weights into the kernels' own aligned buffers; grouped8's forward measured the same with
    the kernel 0, 16, 32 or 48 bytes off a line), no extra copy a call."""
    kernel = np.asarray(kernel)
    if (kernel.dtype == dtype and kernel.flags.c_contiguous
            and _memory.address(kernel) % ALIGN == 0):
        return kernel
    # (not _empty: inside `_memory.into` a result's buffer goes to the first array of its shape)
    out = _memory.aligned_empty(kernel.shape, dtype)
    np.copyto(out, kernel, casting="unsafe")
    return out


# Below this many multiply-adds per thread, waking another OpenMP thread costs more than it
# saves (and on a busy machine a spinning team can stall for milliseconds).
_MACS_PER_THREAD = 1 << 20


def _threads(work, per_thread):
    return max(1, min(_dispatch.get_num_threads(), work // per_thread))


def _args(spec, g):
    return (spec.strides[0], spec.strides[1], spec.dilation_rate[0], spec.dilation_rate[1],
            g.pad_top, g.pad_left, g.groups, _threads(g.macs, _MACS_PER_THREAD))


def recut_shape(spec, g, threads, shape):
    """An NHWC shape as it is, or as (1, rows, width, channels) where g.pixel_rows re-cuts a
    1x1 convolution's pixels for `threads` threads."""
    cut = g.pixel_rows(spec.strides, threads)
    return tuple(shape) if cut is None else (1, *cut, shape[3])


def _recut(spec, g, args, *arrays):
    """The NHWC arrays, re-cut by recut_shape (args: _args(spec, g), whose last item is the
    thread count)."""
    return tuple(a.reshape(recut_shape(spec, g, args[-1], a.shape)) for a in arrays)


def act_attrs(activation):
    """The forward kernels' act, lo and hi for an activation (None, ("clip", lo, hi) or
    ("swish",)), as the TensorFlow ops and the XLA custom call take them: the kernels' codes
    (every build has the same), and floats for lo and hi (an int sends an eager TensorFlow call
    to the op wrapper's slow path, ~70 us; the XLA call's attributes are typed)."""
    kernels = _dispatch.kernels
    name, *bounds = activation or (None,)
    act = {None: kernels.ACT_NONE, "clip": kernels.ACT_CLIP, "swish": kernels.ACT_SWISH}[name]
    lo, hi = map(float, bounds) if name == "clip" else (0.0, 0.0)
    return dict(act=act, lo=lo, hi=hi)


def forward(x, kernel, spec, dtype=np.float32, bias=None, nhwc_memory=False, activation=None):
    """The convolution of x with kernel (plus bias, shape (filters,), if given), computed in
    `dtype` (float32 or float64). channels_first with `nhwc_memory`: the result is NCHW with
    NHWC memory (torch's channels_last format), which the next fastconv layer and its
    gradients take without a transpose. `activation` (as act_attrs takes it, channels_last
    only): computed by the kernels on each output row."""
    x, kernel = np.asarray(x), np.asarray(kernel)
    if spec.channels_last:
        g, args, out_cut, in_cut, _ = _recipe(spec, x.shape, kernel.shape, dtype)
        if bias is not None:
            bias = np.ascontiguousarray(bias, dtype=dtype).reshape(g.f)
        x = np.ascontiguousarray(x, dtype=dtype)
        out = _empty(g.output_shape_nhwc, dtype, _shifted_rows_offset(x, g, spec))
        _dispatch.kernels.forward(x.reshape(in_cut), np.ascontiguousarray(kernel, dtype=dtype),
                                  out.reshape(out_cut), *args, bias,
                                  **(act_attrs(activation) if activation else {}))
        return out
    if activation is not None:
        raise ValueError("forward computes an activation on channels_last data only")
    g = spec.geometry(x.shape, kernel.shape)
    if bias is not None:
        bias = np.ascontiguousarray(bias, dtype=dtype).reshape(g.f)
    kernel = np.ascontiguousarray(kernel, dtype=dtype)
    args = _args(spec, g)
    if not _nhwc_memory(x, dtype):
        # the kernels' channels_first forward: x's rows (and the result's) are transposed a
        # band at a time, in cache (whole transposes of x and of the result cost up to 1.7x
        # channels_last's time on grouped layers, 3x on depthwise ones)
        kernels = _dispatch.kernels
        nchw = kernels.NCHW_X if nhwc_memory else kernels.NCHW_X | kernels.NCHW_OUT
        out = _empty(g.output_shape_nhwc if nhwc_memory
                     else spec.from_nhwc(g.output_shape_nhwc), dtype)
        kernels.forward(np.ascontiguousarray(x, dtype=dtype), kernel, out, *args, bias,
                        nchw=nchw)
        return _from_nhwc(out, spec) if nhwc_memory else out
    out = _empty(g.output_shape_nhwc, dtype)
    xv, outv = _recut(spec, g, args, _nhwc(x, spec, dtype), out)
    _dispatch.kernels.forward(xv, kernel, outv, *args, bias)
    return _from_nhwc(out, spec)


def regrouped_kernel(kernel, g, reshape, transpose):
    """A (KH, KW, C/G, F) kernel regrouped to (KH, KW, F/G, C): the transposed convolution's
    kernel in the same layout, which grad_input's kernels take; `reshape` and `transpose` of
    the caller's array library (the bridges regroup in their framework's graph). One input and
    one output channel a group (depthwise): the same memory order, a reshape."""
    if g.cin_g == 1 and g.f == g.groups:
        return reshape(kernel, (g.kh, g.kw, 1, g.c))
    wt = reshape(kernel, (g.kh, g.kw, g.cin_g, g.groups, g.f // g.groups))
    return reshape(transpose(wt, (0, 1, 4, 3, 2)), (g.kh, g.kw, g.f // g.groups, g.c))


def _nchw_memory(array, dtype):
    """Whether a channels_first array is NCHW in memory, of dtype: the gradients then take it
    as it is where nchw_gradients says they read it a band at a time."""
    return isinstance(array, np.ndarray) and array.dtype == dtype and array.flags.c_contiguous


def _check_dy(dy, spec, g):
    """The output gradient has the convolution's output shape (TensorFlow's tape hands over
    output_gradients as given; the kernels take their sizes from the arrays)."""
    expected = tuple(spec.from_nhwc(g.output_shape_nhwc))
    if tuple(dy.shape) != expected:
        raise ValueError(
            "The gradient wrt the convolution's output (output_gradients) must have the "
            f"output's shape {expected}. Received: shape {tuple(dy.shape)}"
        )


def _input_kernel(kernel, g, dtype):
    """The kernel regrouped (KH, KW, C/G, G*F/G) -> (KH, KW, F/G, G*C/G), C-contiguous,
    aligned, of dtype: the transposed convolution's kernel in the same layout, which
    grad_input's kernels take (so one kernel tap routine serves both directions)."""
    if g.groups == 1:
        # a transpose of each tap's (C, F) matrix, by the kernels: numpy's strided copy of a
        # 2048 x 512 kernel took 6 ms, as long as the convolution on 8x7x7 pixels
        taps = np.ascontiguousarray(kernel, dtype=dtype).reshape(g.kh * g.kw, g.c, g.f)
        return _transposed(taps, g.c, (g.kh, g.kw, g.f, g.c))
    if g.cin_g == 1 and g.f == g.groups:
        return _aligned_kernel(regrouped_kernel(kernel, g, np.reshape, np.transpose), dtype)
    # each tap's and group's block transposed by the kernels (numpy's strided copy took 33 us
    # for a 3x3 256 -> 256 kernel in 8 groups, 83 with cold caches)
    out = _memory.aligned_empty((g.kh, g.kw, g.f // g.groups, g.c), dtype)
    _dispatch.kernels.regroup(
        np.ascontiguousarray(kernel, dtype=dtype).reshape(g.kh * g.kw, g.cin_g, g.f),
        out.reshape(g.kh * g.kw, g.f // g.groups, g.c), g.groups)
    return out


def grad_input(dy, kernel, spec, input_shape, dtype=np.float32, c_contiguous=False):
    """d(loss)/d(inputs) given dy = d(loss)/d(outputs). channels_first: NCHW with NHWC memory,
    or with `c_contiguous`, or from a dy with NCHW memory (nchw_gradients), a C-contiguous
    array (written so by the kernels, a band at a time)."""
    kernel = np.asarray(kernel)
    g = spec.geometry(input_shape, kernel.shape)
    dy = np.asarray(dy)
    _check_dy(dy, spec, g)
    as_is = nchw_gradients(spec, g) and _nchw_memory(dy, dtype)
    blocks = _blocks_unless(spec, g, dtype, _dispatch.kernels.grad_input_gemm)
    if blocks is not None:
        s, gb, covers = blocks
        dxb = grad_input(_nhwc(dy, spec, dtype), _kernel_blocks(kernel, s, gb), UNIT,
                         gb.input_shape_nhwc, dtype)
        dx = _empty(g.input_shape_nhwc, dtype)
        if not covers:
            dx.fill(0)
        _dispatch.kernels.depth_to_space(dxb, dx, s, g.pad_top, g.pad_left,
                                         _threads(dx.size, _ELEMENTS_PER_THREAD))
        dx = _from_nhwc(dx, spec)
        return contiguous(dx) if c_contiguous else dx
    wt = _input_kernel(kernel, g, dtype)
    args = _args(spec, g)
    kernels = _dispatch.kernels
    if as_is:
        dx = _empty(input_shape, dtype)
        kernels.grad_input(dy, wt, dx, *args, nchw=kernels.NCHW_X | kernels.NCHW_OUT)
        return dx
    if c_contiguous and not spec.channels_last:
        dx = _empty(input_shape, dtype)
        kernels.grad_input(_nhwc(dy, spec, dtype), wt, dx, *args, nchw=kernels.NCHW_X)
        return dx
    dx = _empty(g.input_shape_nhwc, dtype)
    dyv, dxv = _recut(spec, g, args, _nhwc(dy, spec, dtype), dx)
    _dispatch.kernels.grad_input(dyv, wt, dxv, *args)
    return _from_nhwc(dx, spec)


def grad_kernel(x, dy, spec, kernel_shape, dtype=np.float32, bias=False):
    """d(loss)/d(kernel) given dy = d(loss)/d(outputs); with `bias`, also d(loss)/d(bias) (dy's
    channel sums, taken by the kernels from the dy they read anyway): (dw, db)."""
    x, dy = np.asarray(x), np.asarray(dy)
    g = spec.geometry(x.shape, kernel_shape)
    _check_dy(dy, spec, g)
    kernels = _dispatch.kernels
    if nchw_gradients(spec, g) and _nchw_memory(x, dtype) and _nchw_memory(dy, dtype):
        dw = _empty(g.kernel_shape, dtype)
        db = _empty((g.f,), dtype) if bias else None
        kernels.grad_kernel(x, dy, dw, *_args(spec, g), db,
                            nchw=kernels.NCHW_X | kernels.NCHW_OUT)
        return (dw, db) if bias else dw
    dy = _nhwc(dy, spec, dtype)
    blocks = _blocks_unless(spec, g, dtype, _dispatch.kernels.grad_kernel_merged)
    if blocks is not None:
        s, gb, _ = blocks
        xb = _empty(gb.input_shape_nhwc, dtype)
        _dispatch.kernels.space_to_depth(_nhwc(x, spec, dtype), xb, s, g.pad_top, g.pad_left,
                                         _threads(xb.size, _ELEMENTS_PER_THREAD))
        dwb = grad_kernel(xb, dy, UNIT, gb.kernel_shape, dtype, bias)
        dwb, db = dwb if bias else (dwb, None)
        dw = _kernel_from_blocks(dwb, s, g)
    else:
        dw = _empty(g.kernel_shape, dtype)
        db = _empty((g.f,), dtype) if bias else None
        _dispatch.kernels.grad_kernel(_nhwc(x, spec, dtype), dy, dw, *_args(spec, g), db)
    return (dw, db) if bias else dw


class _Recipe(NamedTuple):
    """What `forward` (channels_last) and `gradients` work out once per (spec, shapes, dtype,
    thread count, kernel build): a layer calls with the same shapes step after step, and the
    geometry, the kernels' arguments and the recut shapes cost ~15 us of Python a call right
    after a kernel has evicted the caches (2 us warm)."""
    g: object  # Geometry
    args: tuple  # the kernels' (strides, dilation, padding, groups, threads)
    out_cut: tuple  # recut_shape of the output (dy)
    in_cut: tuple  # ... of the input (dx)
    direct: bool  # channels_last, and no space-to-depth blocks for either gradient in dtype


_recipes = {}
_MAX_RECIPES = 256


def _recipe(spec, x_shape, k_shape, dtype):
    kernels = _dispatch.kernels  # (tests switch builds: the blocks decision asks the build)
    key = (spec, x_shape, k_shape, dtype, _dispatch.get_num_threads(), kernels)
    r = _recipes.get(key)
    if r is None:
        g = spec.geometry(x_shape, k_shape)
        args = _args(spec, g)
        direct = spec.channels_last and direct_gradients(spec, g, dtype)
        if len(_recipes) >= _MAX_RECIPES:
            _recipes.clear()
        r = _recipes[key] = _Recipe(g, args, recut_shape(spec, g, args[-1], g.output_shape_nhwc),
                                    recut_shape(spec, g, args[-1], g.input_shape_nhwc), direct)
    return r


def gradients(x, dy, kernel, spec, need_dx, bias, dtype=np.float32):
    """(dx or None, dk, db or None) of a channels_last convolution in `dtype`, for C-contiguous
    x and dy of that dtype, or None where the kernels take space-to-depth blocks (as
    direct_gradients, for dtype): what grad_input and grad_kernel give, from one call whose
    geometry, arguments and recut shapes are worked out once per shape (_recipe). (Their Python
    around the kernels took ~40 us each in a torch training step, right after a kernel had
    evicted the caches, against a depthwise 4x56x56x128 kernel's ~260.)"""
    g, args, out_cut, in_cut, direct = _recipe(spec, x.shape, kernel.shape, dtype)
    if not direct:
        return None
    if dy.shape != g.output_shape_nhwc:
        _check_dy(dy, spec, g)
    kernels = _dispatch.kernels
    dx = db = None
    if need_dx:
        dx = _empty(x.shape, dtype)
        kernels.grad_input(dy.reshape(out_cut), _input_kernel(kernel, g, dtype),
                           dx.reshape(in_cut), *args)
    dk = _empty(g.kernel_shape, dtype)
    if bias:
        db = _empty((g.f,), dtype)
    kernels.grad_kernel(x, dy, dk, *args, db)
    return dx, dk, db


def bias_grad(dy, spec, dtype=np.float32):
    """d(loss)/d(bias) given dy = d(loss)/d(outputs): dy summed over all but its channels."""
    dy = np.ascontiguousarray(dy, dtype=dtype)
    if not spec.channels_last:
        return dy.sum(axis=spec.reduce_axes)  # numpy sums contiguous rows (H*W) fast
    rows = dy.reshape(-1, dy.shape[3])
    db = _empty((rows.shape[1],), dtype)
    _dispatch.kernels.channel_sums(rows, db, _threads(rows.size, _ELEMENTS_PER_THREAD))
    return db


# A stride-1 "valid" convolution on channels_last arrays: the blocked form of Geometry.blocks.
UNIT = ConvSpec()

# The blocked convolution's arrays (Geometry.blocks), in the ops of the caller's array library
# (numpy here; the TensorFlow and JAX bridges build them in their graphs, where the gradients
# then run as the native ops on the blocked geometry). The blocked layout is
# xb[n, i, j, (a*s + b)*C + c] = padded x[n, i*s + a, j*s + b, c] and
# kb[p, q, (a*s + b)*C + c] = kernel[p*s + a, q*s + b, c] (zero beyond the kernel), as the
# kernels' space_to_depth / depth_to_space lay it out.


def kernel_blocks(kernel, s, gb, pad, reshape, transpose):
    """A (KH, KW, C, F) kernel as the blocked convolution's (KBH, KBW, s*s*C, F) one."""
    kh, kw, c, f = kernel.shape
    padded = pad(kernel, ((0, gb.kh * s - kh), (0, gb.kw * s - kw), (0, 0), (0, 0)))
    blocks = transpose(reshape(padded, (gb.kh, s, gb.kw, s, c, f)), (0, 2, 1, 3, 4, 5))
    return reshape(blocks, gb.kernel_shape)


def kernel_from_blocks(kb, s, g, reshape, transpose):
    """The inverse of kernel_blocks: the (KH, KW, C, F) kernel gradient in a blocked one."""
    kbh, kbw = kb.shape[:2]
    full = transpose(reshape(kb, (kbh, kbw, s, s, g.c, g.f)), (0, 2, 1, 3, 4, 5))
    return reshape(full, (kbh * s, kbw * s, g.c, g.f))[:g.kh, :g.kw]


def input_blocks(x, s, g, gb, pad, reshape, transpose):
    """An NHWC input as the blocked convolution's (N, HB, WB, s*s*C) input: the zero-padded
    input cut into s x s blocks (rows and columns past the last block dropped)."""
    h, w = g.block_extent(s, gb)
    x = pad(x[:, :h, :w], ((0, 0), (g.pad_top, gb.h * s - g.pad_top - h),
                           (g.pad_left, gb.w * s - g.pad_left - w), (0, 0)))
    blocks = transpose(reshape(x, (-1, gb.h, s, gb.w, s, g.c)), (0, 1, 3, 2, 4, 5))
    return reshape(blocks, (-1, gb.h, gb.w, s * s * g.c))


def input_from_blocks(xb, s, g, gb, pad, reshape, transpose):
    """The inverse of input_blocks for a gradient: an NHWC (N, H, W, C) one from the blocked
    one, zero where no block reaches."""
    full = transpose(reshape(xb, (-1, gb.h, gb.w, s, s, g.c)), (0, 1, 3, 2, 4, 5))
    full = reshape(full, (-1, gb.h * s, gb.w * s, g.c))
    h, w = g.block_extent(s, gb)
    inside = full[:, g.pad_top:g.pad_top + h, g.pad_left:g.pad_left + w]
    return pad(inside, ((0, 0), (0, g.h - h), (0, g.w - w), (0, 0)))


def _blocks_unless(spec, g, dtype, direct):
    """Geometry.blocks for one gradient, or None where the kernels compute it better on the
    input as it is: `direct` is kernels.grad_input_gemm (grad_input as a GEMM and col2im: 147
    columns for a 7x7/2 stem against 192 on the blocks, A/B 6.42 -> 5.38 ms at 4x224x224x3 ->
    64) or kernels.grad_kernel_merged (tiles of a kernel row's (kw, c) pairs, no zero taps:
    GFLOP/s blocks -> merged 7x7/2 3 -> 64 187 -> 208, 5x5/2 3 -> 32 126 -> 160, 3x3/2 3 -> 32
    60 -> 102, 4x4/4 3 -> 96 88 -> 127)."""
    blocks = g.blocks(spec.strides, spec.dilation_rate)
    if blocks is not None and direct(g.c, g.kh, g.kw, g.f, spec.dilation_rate[1], g.groups,
                                     np.dtype(dtype).itemsize):
        return None
    return blocks


def direct_gradients(spec, g, dtype=np.float32):
    """Whether the kernels compute both gradients of a convolution in dtype on x, dy and dx as
    they are, not on Geometry.blocks' space-to-depth blocks."""
    kernels = _dispatch.kernels
    return (_blocks_unless(spec, g, dtype, kernels.grad_input_gemm) is None
            and _blocks_unless(spec, g, dtype, kernels.grad_kernel_merged) is None)


def nchw_gradients(spec, g):
    """Whether both gradients of a channels_first float32 convolution take NCHW x and dy as
    they are (the kernels' nchw layouts): where the gradient wrt the kernel reads them a band
    of rows at a time (kernels.grad_kernel_nchw) and neither gradient runs on space-to-depth
    blocks. Elsewhere x and dy are transposed whole, once for both gradients. (grouped32
    4x28x28x256, kernels on 2 threads: whole transposes of x and dy 0.26-0.38 ms beside the
    three directions' ~1.8 ms; read in bands, 0.03-0.06 ms more in each gradient.)"""
    kernels = _dispatch.kernels
    return (not spec.channels_last
            and kernels.grad_kernel_nchw(g.n, g.h, g.w, g.c, g.oh, g.ow, g.f, g.kh, g.kw,
                                         g.cin_g, *spec.strides, spec.dilation_rate[1],
                                         g.groups, 4)
            and direct_gradients(spec, g))


def blocked_grad_input(spec, g, dy, k, call, ops, to_nchw=None):
    """The gradient wrt the input for an NHWC dy by `call(spec, g, dy, k)` (a bridge's native
    grad_input on NHWC arrays), on the space-to-depth blocks where Geometry.blocks has them;
    ops: the caller's pad, reshape and transpose. (float32: the bridges' native ops) With
    `to_nchw` (the bridge's whole transpose), an NCHW dx: written so by `call(..., nchw=True)`,
    or on the blocks transposed by to_nchw."""
    blocks = _blocks_unless(spec, g, np.float32, _dispatch.kernels.grad_input_gemm)
    if blocks is None:
        return call(spec, g, dy, k, nchw=True) if to_nchw else call(spec, g, dy, k)
    s, gb, _ = blocks
    dx = input_from_blocks(call(UNIT, gb, dy, kernel_blocks(k, s, gb, **ops)), s, g, gb, **ops)
    return to_nchw(dx) if to_nchw else dx


def blocked_grad_kernel(spec, g, x, dy, call, ops, bias=False):
    """The gradient wrt the kernel for NHWC x and dy by `call(spec, g, x, dy)`, as
    blocked_grad_input; with `bias`, call returns (dk, db) and so does this (dy, and so db, is
    the same on the blocks)."""
    blocks = _blocks_unless(spec, g, np.float32, _dispatch.kernels.grad_kernel_merged)
    if blocks is None:
        return call(spec, g, x, dy)
    s, gb, _ = blocks
    dk = call(UNIT, gb, input_blocks(x, s, g, gb, **ops), dy)
    dk, db = dk if bias else (dk, None)
    dk = kernel_from_blocks(dk, s, g, ops["reshape"], ops["transpose"])
    return (dk, db) if bias else dk


def _kernel_blocks(kernel, s, gb):
    return np.ascontiguousarray(kernel_blocks(np.asarray(kernel), s, gb, np.pad, np.reshape,
                                              np.transpose))


def _kernel_from_blocks(kb, s, g):
    return np.ascontiguousarray(kernel_from_blocks(kb, s, g, np.reshape, np.transpose))


def on_accelerator(x, k):
    return False


def conv(x, k, b, spec, result, activation=None):
    """The numpy backend: Keras' own hands convolutions to JAX; here the kernels serve them.
    (`activation`: as forward takes it.)"""
    return forward(x, k, spec, host_dtype(result), b, activation=activation).astype(
        result, copy=False)


def fused_activation(activation, spec, result):
    """The activation (as act_attrs takes it) that an eager forward_variables call computes in
    the kernels, or None: channels_last float32 only (the general way, e.g. channels_first,
    leaves it to the layer)."""
    return activation if spec.channels_last and result == "float32" else None


def forward_variables(x, kernel, kernel_shape, bias, spec, activation=None, plans=None):
    """A layer's call on its kernel (seen as `kernel_shape`) and bias variables: (outputs,
    whether `activation` (as act_attrs takes it, or None) was computed by the kernels), or None
    where this does not serve (x not a float32 NHWC-or-NCHW numpy array, variables not float32
    numpy arrays: a LoRA kernel is a sum, which the general path takes). What ops.conv_bias
    does, without its conversions (Keras' numpy backend copies the kernel and the bias at
    each conversion) and checks of what the layer's call has already made arrays of its
    compute dtype. The call is kept in `plans` (a dict, or None), for `run_plan`.

    Right after a large kernel has pushed Python's objects out of the caches, every step of
    a layer call costs several times its warm time: a depthwise 4x56x56x128 layer call took
    0.334 ms by the general path and takes 0.296 by a plan, the kernel 0.26 (AVX-512 Xeon, 2
    threads)."""
    if type(x) is not np.ndarray or x.dtype != np.float32 or x.ndim != 4:
        return None
    k, b = (getattr(v, "value", v) for v in (kernel, bias))
    if (type(k) is not np.ndarray or k.dtype != np.float32
            or (b is not None and (type(b) is not np.ndarray or b.dtype != np.float32))):
        return None
    spec.check_call(x.shape, kernel_shape, None if b is None else b.shape)
    plan = _Plan(k, b, tuple(kernel_shape), tuple(k.shape) != tuple(kernel_shape), spec,
                 fused_activation(activation, spec, "float32"))
    if plans is not None:
        plans[x.shape] = plan
    return _run(plan, x)


class _Plan(NamedTuple):
    """What forward_variables made of a call, for `_run` (and `run_plan`). The variables'
    values: Keras' numpy Variable replaces its array at each assignment, and an array changed
    in place is read as it is at each call."""
    kernel: np.ndarray
    bias: Optional[np.ndarray]
    kernel_shape: tuple
    reshape: bool  # whether the kernel is seen in kernel_shape (a depthwise layer's)
    spec: ConvSpec
    activation: Optional[tuple]  # computed by the kernels (channels_last), or None


def _run(plan, x):
    k = plan.kernel.reshape(plan.kernel_shape) if plan.reshape else plan.kernel
    return (forward(x, k, plan.spec, np.float32, plan.bias, activation=plan.activation),
            plan.activation is not None)


def run_plan(plans, x, kernel, bias):
    """forward_variables for a call like one it kept in `plans`: x a numpy array of the same
    shape and dtype, the same variables' values; without remaking its checks. (outputs,
    activated), or None. The caller (the layer) answers for everything about the layer and
    the call (see layers._Fastconv._planned)."""
    if type(x) is not np.ndarray or x.dtype != np.float32:
        return None
    plan = plans.get(x.shape)
    if (plan is None or getattr(kernel, "value", None) is not plan.kernel
            or (None if bias is None else getattr(bias, "value", None)) is not plan.bias):
        return None
    return _run(plan, x)
