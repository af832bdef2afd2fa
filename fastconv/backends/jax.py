"""JAX bridge: each direction an XLA custom call (fastconv._xla_ffi, float32) or a
jax.pure_callback, joined by jax.custom_vjp.

Works eagerly and under jax.jit (Keras' JAX trainer jits the train step), jax.grad and jax.vmap
(one call per mapped element). Callbacks receive read-only arrays; the kernels take them as
const. float64 needs jax_enable_x64, as everywhere in JAX. Under jax.jit in inference, a
BatchNormalization or activation after a convolution may fold into its custom call (`fused`).
"""

import functools
import weakref
from typing import NamedTuple, Optional

import jax
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.interpreters.partial_eval import DynamicJaxprTracer

from fastconv import _dispatch, _memory
from fastconv.backends import numpy as host


def on_accelerator(*arrays):
    for a in arrays:
        if isinstance(a, jax.core.Tracer):
            if jax.default_backend() != "cpu":
                return True
        elif any(d.platform != "cpu" for d in a.devices()):
            return True
    return False


@functools.lru_cache(maxsize=1024)
def _host(direction, spec, dtype, shape=None):
    """One callable per (direction, spec, dtype, shape). JAX caches a compiled callback by its
    callable: a fresh lambda per call would recompile every eager call (~40 ms)."""
    fn = getattr(host, direction)
    if direction == "forward":
        return lambda a, w, c=None: host.contiguous(fn(a, w, spec, dtype, c))
    return lambda a, b: host.contiguous(fn(a, b, spec, shape, dtype))


def _callback(fn, shape, dtype, *args):
    return jax.pure_callback(fn, jax.ShapeDtypeStruct(tuple(shape), dtype), *args,
                             vmap_method="sequential")


def _register_ffi():
    """The convolution and its gradients as XLA custom calls (fastconv._xla_ffi), if it was
    built: XLA runs the kernels on its own buffers, where a pure_callback copies the inputs and
    the result (a third of ResNet50's prediction time at batch 8). None where not available."""
    try:
        from fastconv import _xla_ffi
    except ImportError:
        return None
    for name, handler in _xla_ffi.handlers().items():
        jax.ffi.register_ffi_target(name, handler, platform="cpu")
    _xla_ffi.set_threads(_dispatch.get_num_threads())
    _dispatch.thread_listeners.append(_xla_ffi.set_threads)
    return _xla_ffi


_FFI = _register_ffi()


def _ffi_ready(dtype, spec):
    """Whether the custom calls serve this convolution (float32, channels_last, kernels that
    export them), handing them the kernels _dispatch loaded. (channels_first: _conv_nchw.)"""
    kernels = _dispatch.kernels
    if (_FFI is None or dtype != np.float32 or not spec.channels_last
            or not hasattr(kernels, "ffi_forward")):
        return False
    _FFI.set_kernels(kernels.ffi_forward(), kernels.ffi_grad_input(), kernels.ffi_grad_kernel(),
                     kernels.ffi_channel_sums(), kernels.ffi_transpose(),
                     kernels.ffi_regroup())
    return True


def _ffi_call(name, shape, dtype, args, spec, g, **extra):
    """The custom call `name`; shape: its result's, or a tuple of shapes for several."""
    sh, sw, dh, dw, pad_top, pad_left, groups, threads = host._args(spec, g)
    several = isinstance(shape[0], tuple)
    results = [jax.ShapeDtypeStruct(tuple(s), dtype) for s in (shape if several else [shape])]
    call = jax.ffi.ffi_call(name, results if several else results[0],
                            vmap_method="sequential")
    return call(*args, sh=np.int64(sh), sw=np.int64(sw), dh=np.int64(dh), dw=np.int64(dw),
                pad_top=np.int64(pad_top), pad_left=np.int64(pad_left),
                groups=np.int64(groups), max_threads=np.int64(threads),
                **{k: np.float32(v) if isinstance(v, float) else np.int64(v)
                   for k, v in extra.items()})


def _swap(a):
    """a (N, A, B) -> (N, B, A) by the kernels' own transpose, a custom call: XLA's took 3-9x
    as long. (With XLA's transposes around each custom call, dy and x transposed again inside
    each gradient, channels_first cost up to 4.4x channels_last's time under jit: depthwise
    forward; 1.56x this way.)"""
    n, rows, cols = a.shape
    return jax.ffi.ffi_call("fastconv_transpose", jax.ShapeDtypeStruct((n, cols, rows), a.dtype),
                            vmap_method="sequential")(
        a, max_threads=np.int64(host._threads(a.size, host._ELEMENTS_PER_THREAD)))


# The layout changes of a differentiated channels_first convolution (_conv_nchw): x is
# transposed once (its NHWC copy serves the forward and the gradient wrt the kernel), dy once for
# both gradients (the kernels write the result and dx NCHW themselves). Each is the other's
# gradient.
@jax.custom_vjp
def _to_nhwc(a):
    n, c, h, w = a.shape
    return _swap(a.reshape(n, c, h * w)).reshape(n, h, w, c)


@jax.custom_vjp
def _to_nchw(a):
    n, h, w, c = a.shape
    return _swap(a.reshape(n, h * w, c)).reshape(n, c, h, w)


_to_nhwc.defvjp(lambda a: (_to_nhwc(a), None), lambda _, g: (_to_nchw(g),))
_to_nchw.defvjp(lambda a: (_to_nchw(a), None), lambda _, g: (_to_nhwc(g),))


def _pixel_rows(spec, g, array, shape):
    """host._recut for jax: the array and its result's shape, re-cut by host.recut_shape."""
    threads = host._args(spec, g)[-1]
    return (array.reshape(host.recut_shape(spec, g, threads, array.shape)),
            host.recut_shape(spec, g, threads, shape))


def _ffi_forward(spec, x, k, b, dtype, shape, scale=None, activation=None):
    """The forward through the custom call, or None where only the callback serves; with
    `scale` (F,) and `activation` (as `fused` takes it), act(conv * scale + b). channels_first
    by the kernels' own channels_first forward."""
    if not _ffi_ready(dtype, spec.nhwc):
        return None
    g = spec.geometry(x.shape, k.shape)
    if not spec.channels_last:
        kernels = _dispatch.kernels
        return _forward_call(spec, g, x, k, b, dtype, shape, kernels.NCHW_X | kernels.NCHW_OUT,
                             scale, activation)
    x, out_shape = _pixel_rows(spec, g, x, shape)
    return _forward_call(spec, g, x, k, b, dtype, out_shape, 0, scale,
                         activation).reshape(shape)


def _forward_call(spec, g, x, k, b, dtype, shape, nchw, scale=None, activation=None):
    """The forward custom call (the kernels' `nchw` layouts) into a result of `shape`."""
    none = jax.numpy.zeros((0,), dtype)
    return _ffi_call("fastconv_forward", shape, dtype,
                     (x, k, none if b is None else b, none if scale is None else scale), spec, g,
                     has_bias=b is not None, nchw=nchw, **host.act_attrs(activation))



# Geometry.blocks' arrays built by XLA (the host's helpers with jax.numpy)
_JNP_OPS = dict(pad=jax.numpy.pad, reshape=jax.numpy.reshape, transpose=jax.numpy.transpose)


def _ffi_grad_input(spec, dy, k, x_shape, dtype, nchw=False):
    """The gradient wrt the input of a channels_last convolution through the custom call,
    with `nchw` as an NCHW dx, or None where only the callback serves."""
    if not _ffi_ready(dtype, spec):
        return None
    g = spec.geometry(x_shape, k.shape)
    return host.blocked_grad_input(spec, g, dy, k,
                                   lambda *a, **kw: _grad_input_call(*a, dtype, **kw), _JNP_OPS,
                                   _to_nchw if nchw else None)


def _grad_input_call(spec, g, dy, k, dtype, nchw=False):
    """The grad_input custom call on an NHWC dy; with `nchw`, into an NCHW dx."""
    wt = host.regrouped_kernel(k, g, jax.numpy.reshape, jax.numpy.transpose)
    if nchw:
        n, h, w, c = g.input_shape_nhwc
        return _ffi_call("fastconv_grad_input", (n, c, h, w), dtype, (dy, wt), spec, g, nchw=1)
    dy, dx_shape = _pixel_rows(spec, g, dy, g.input_shape_nhwc)
    dx = _ffi_call("fastconv_grad_input", dx_shape, dtype, (dy, wt), spec, g, nchw=0)
    return dx.reshape(g.input_shape_nhwc)


def _ffi_grad_kernel(spec, x, dy, k_shape, dtype, bias=False):
    """The gradient wrt the kernel through the custom call, with `bias` (dk, db), or None
    where only the callback serves."""
    if not _ffi_ready(dtype, spec):
        return None
    g = spec.geometry(x.shape, k_shape)
    return host.blocked_grad_kernel(spec, g, x, dy,
                                    lambda *a: _grad_kernel_call(*a, dtype, bias), _JNP_OPS,
                                    bias)


def _grad_kernel_call(spec, g, x, dy, dtype, bias=False):
    """The grad_kernel custom call on NHWC x and dy; with `bias` (dk, db) from one pass over
    dy."""
    if not bias:
        return _ffi_call("fastconv_grad_kernel", g.kernel_shape, dtype, (x, dy), spec, g,
                         nchw=0)
    return _ffi_call("fastconv_grad_kernel_bias", (g.kernel_shape, (g.f,)), dtype, (x, dy),
                     spec, g, nchw=0)


def _ffi_bias_grad(spec, dy, dtype):
    """The bias gradient of a channels_last dy by the kernels' channel sums (XLA's reduction
    over (0, 1, 2) took 2-4x as long), or None where the custom calls do not serve. For a bias
    trained under a frozen kernel; else it comes with grad_kernel's call."""
    if not _ffi_ready(dtype, spec):
        return None
    return jax.ffi.ffi_call("fastconv_bias_grad", jax.ShapeDtypeStruct(dy.shape[3:], dtype),
                            vmap_method="sequential")(
        dy, max_threads=np.int64(host._threads(dy.size, host._ELEMENTS_PER_THREAD)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(spec, x, k, b):
    dtype = np.dtype(x.dtype)
    shape = spec.output_shape(x.shape, k.shape)
    out = _ffi_forward(spec, x, k, b, dtype, shape)
    if out is not None:
        return out
    return _callback(_host("forward", spec, dtype), shape, dtype,
                     x, k, *([] if b is None else [b]))


def _conv_fwd(spec, x, k, b):
    # symbolic_zeros: x, k and b (unless None) come as CustomVJPPrimal(value, perturbed); the
    # bias gradient rides on grad_kernel's call only where both are differentiated (a
    # trained bias under a frozen kernel gets its own sum, and no kernel gradient)
    both = () if b is not None and k.perturbed and b.perturbed else None  # (static: a pytree)
    x, k, b = x.value, k.value, None if b is None else b.value
    return _conv(spec, x, k, b), (x, k, b, both)


_SECOND_ORDER = (
    "fastconv computes first-order gradients only: a gradient of fastconv's gradient (e.g. a "
    "Hessian or a gradient penalty) is not supported. Use keras.layers.Conv2D."
)


@jax.custom_jvp
def _first_order_only(*args):
    """Identity on the gradient callbacks' inputs; differentiating it raises (a bare
    pure_callback would say "use jax.custom_jvp", which misleads a user)."""
    return args


@_first_order_only.defjvp
def _(primals, tangents):
    raise NotImplementedError(_SECOND_ORDER)


def _conv_bwd(spec, residuals, dy, nchw_dx=False):
    # dx and dk from separate calls, not one: jit drops a call whose result is unused (the
    # first layer's dx, a frozen layer's dk), measured. The bias gradient rides on
    # grad_kernel's call where both are differentiated (_conv_fwd): one pass over dy fewer.
    # nchw_dx: dx as NCHW (_conv_nchw_bwd).
    x, k, b, both = residuals
    if isinstance(dy, SymbolicZero):
        return None, None, None  # (zero cotangents)
    x, k, dy = _first_order_only(x, k, dy)
    dtype = np.dtype(x.dtype)
    dx = _ffi_grad_input(spec, dy, k, tuple(x.shape), dtype, nchw_dx)
    if dx is None:
        dx = _callback(_host("grad_input", spec, dtype, tuple(x.shape)), x.shape, dtype, dy, k)
        dx = _to_nchw(dx) if nchw_dx else dx
    if both is not None:
        # the bias gradient from the dy that grad_kernel reads anyway
        fused = _ffi_grad_kernel(spec, x, dy, tuple(k.shape), dtype, bias=True)
        if fused is not None:
            return (dx, *fused)
    dk = _ffi_grad_kernel(spec, x, dy, tuple(k.shape), dtype)
    if dk is None:
        dk = _callback(_host("grad_kernel", spec, dtype, tuple(k.shape)), k.shape, dtype, x, dy)
    db = None
    if b is not None:
        db = _ffi_bias_grad(spec, dy, dtype)
        if db is None:
            db = dy.sum(axis=spec.reduce_axes)
    return dx, dk, db


_conv.defvjp(_conv_fwd, _conv_bwd, symbolic_zeros=True)


def conv(x, k, b, spec, result):
    if any(isinstance(a, jax.core.Tracer) for a in (x, k, b)):
        out = _conv_cast(spec, result, x, k, b)
        if (type(out) is DynamicJaxprTracer and spec.channels_last
                and all(a is None or a.dtype == np.float32 for a in (out, x, k, b))
                and _ffi_ready(np.dtype(np.float32), spec)):
            _record(out, (spec, x, k, b, None, None))
        return out
    return _eager(np.asarray(x), np.asarray(k), None if b is None else np.asarray(b), spec,
                  result)


def _eager(x, k, b, spec, result, activation=None):
    # Eager (concrete CPU arrays, nothing to differentiate): the host runs on zero-copy views
    # and its result becomes a jax.Array without a copy. A jitted call with a pure_callback
    # costs ~100 us more per call and copies the result into XLA's buffer (~0.4 ms per 6 MB).
    out = host.contiguous(host.conv(x, k, b, spec, result, activation))
    # (numpy cannot export bfloat16 through dlpack; the kernels' own dtypes it can)
    if out.dtype in (np.float32, np.float64) and _memory.address(out) % host.ALIGN == 0:
        if out.dtype == np.float32 and _from_host is not None:
            return _from_host(out)
        return jax.dlpack.from_dlpack(out)
    return jax.numpy.asarray(out)


def forward_variables(x, kernel, kernel_shape, bias, spec, activation=None, plans=None):
    """A layer's eager convolution on its kernel (seen as `kernel_shape`) and bias variables:
    (outputs, whether `activation` (as `fused` takes it, or None) was computed by the kernels:
    channels_last float32), or None where this does not serve
    (tracing, x not a concrete CPU float array of the kernel's dtype, not rank 4). What
    ops.conv_bias does eagerly, without its conversions and checks of values that a layer's
    call has already made arrays of its compute dtype: ~7 us of Python a call (38 -> 31 us
    with the kernel stubbed), which runs slower right after a kernel has filled the caches.
    The call is kept in `plans` (a dict, or None), for `run_plan`."""
    k, b = (getattr(v, "value", v) for v in (kernel, bias))
    arrays = (x, k) if b is None else (x, k, b)
    if (any(not isinstance(a, jax.Array) or isinstance(a, jax.core.Tracer)
            or a.dtype != x.dtype for a in arrays)
            or x.dtype not in (np.float32, np.float64) or x.ndim != 4 or on_accelerator(*arrays)):
        return None
    spec.check_call(x.shape, kernel_shape, None if b is None else b.shape)
    plan = _Plan(x.sharding, tuple(k.shape), None if b is None else tuple(b.shape),
                 tuple(kernel_shape), spec, x.dtype.name,
                 host.fused_activation(activation, spec, x.dtype.name))
    if plans is not None:
        plans[x.shape, x.dtype] = plan
    return _run(plan, x, k, b)


class _Plan(NamedTuple):
    """What forward_variables made of a call, for `_run` (and `run_plan`). No arrays: a
    variable's value is replaced at each assignment (JAX arrays are immutable), so each call
    reads it, and a plan keeps no old kernel alive."""
    sharding: object  # x's, and the variables' (a CPU device's)
    kernel_shape: tuple  # the variable's
    bias_shape: Optional[tuple]
    conv_kernel_shape: tuple  # the kernel seen as (KH, KW, C // groups, F) (a depthwise one's)
    spec: object
    result: str
    activation: Optional[tuple]  # computed by the kernels, or None


def _run(plan, x, k, b):
    k = np.asarray(k)
    if plan.conv_kernel_shape != plan.kernel_shape:
        k = k.reshape(plan.conv_kernel_shape)
    return (_eager(np.asarray(x), k, None if b is None else np.asarray(b), plan.spec,
                   plan.result, plan.activation), plan.activation is not None)


def run_plan(plans, x, kernel, bias):
    """forward_variables for a call like one it kept in `plans`: x a concrete array of the same
    shape and dtype on the same CPU device, the variables' values (read now: a stateless
    scope's too) concrete arrays of x's dtype and their shapes on that device; without remaking
    its checks. (outputs, activated), or None. The caller (the layer) answers for everything
    about the layer and the call (see layers._Fastconv._planned)."""
    if type(x) is not _ARRAY:
        return None
    plan = plans.get((x.shape, x.dtype))
    if plan is None:
        return None
    k = getattr(kernel, "value", None)
    b = None if bias is None else getattr(bias, "value", None)
    for value, shape in ((k, plan.kernel_shape), (b, plan.bias_shape)):
        if shape is None and value is None:
            continue
        if (type(value) is not _ARRAY or value.dtype != x.dtype or value.shape != shape
                or not _same_device(value, plan)):
            return None
    if not _same_device(x, plan):
        return None
    return _run(plan, x, k, b)


def _same_device(a, plan):
    return a.sharding is plan.sharding or a.sharding == plan.sharding


def _host_wrapper():
    """f(a): a jax.Array over a float32 host array's memory, without jax.dlpack.from_dlpack's
    device lookups and its jnp.asarray of the result (20-40 us of a small layer's 80 us call
    here); or None where this jaxlib's private entry point differs (checked on an array)."""
    try:
        from jax._src import xla_bridge
        from jax._src.lib import _jax

        cpu = xla_bridge.get_backend("cpu").device_from_local_hardware_id(0)

        def wrap(a):
            return _jax.dlpack_managed_tensor_to_buffer(a.__dlpack__(), cpu, None, None, 1)

        probe = host._empty((2, 8), np.float32)  # (64-byte aligned, as results are)
        probe[...] = np.arange(16).reshape(2, 8)
        got = wrap(probe)
        if (isinstance(got, jax.Array) and got.dtype == np.float32 and got.shape == (2, 8)
                and got.unsafe_buffer_pointer() == probe.ctypes.data
                and np.array_equal(np.asarray(got), probe)):
            return wrap
    except Exception:  # any change of the private API: the public path
        pass
    return None


_from_host = _host_wrapper()
_ARRAY = type(jax.numpy.zeros((), np.float32))  # (jaxlib's concrete array; tracers are others)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _conv_cast(spec, result, x, k, b):
    # Jitted so that an eager call dispatches a cached executable instead of tracing the
    # custom_vjp anew each time; inside the trainer's jit it simply inlines.
    dtype = host.host_dtype(result)
    x, k, b = x.astype(dtype), k.astype(dtype), None if b is None else b.astype(dtype)
    if not spec.channels_last and _ffi_ready(dtype, spec.nhwc):
        return _conv_nchw(spec, x, k, b).astype(result)
    return _conv(spec, x, k, b).astype(result)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv_nchw(spec, x, k, b):
    # channels_first, float32: one custom call, the kernels' channels_first forward (x's rows
    # and the result's transposed in cache, a band at a time)
    return _ffi_forward(spec, x, k, b, np.dtype(x.dtype), spec.output_shape(x.shape, k.shape))


def _conv_nchw_fwd(spec, x, k, b):
    # differentiated: where the gradients read NCHW x and dy as they are (host.nchw_gradients),
    # x is the residual; elsewhere x's NHWC copy (grad_kernel reads it) serves the forward too,
    # whose result the kernels write NCHW, a band at a time, and the gradients share dy's NHWC
    # copy. (Residuals and symbolic zeros as _conv_fwd's; the last residual, () or None,
    # tells which.)
    both = () if b is not None and k.perturbed and b.perturbed else None
    x, k, b = x.value, k.value, None if b is None else b.value
    g = spec.geometry(x.shape, k.shape)
    if host.nchw_gradients(spec, g):
        args = _first_order_only(x, k, *([] if b is None else [b]))
        kernels = _dispatch.kernels
        y = _forward_call(spec, g, *args[:2], None if b is None else args[2], np.dtype(x.dtype),
                          spec.output_shape(x.shape, k.shape),
                          kernels.NCHW_X | kernels.NCHW_OUT)
        return y, (x, k, b, both, ())
    x_nhwc = _to_nhwc(x)
    # (through _first_order_only: a gradient of this gradient raises fastconv's error, as
    # _conv's does, not JAX's about a custom call it cannot differentiate)
    args = _first_order_only(x_nhwc, k, *([] if b is None else [b]))
    y = _forward_call(spec, g, *args[:2], None if b is None else args[2], np.dtype(x.dtype),
                      spec.output_shape(x.shape, k.shape), _dispatch.kernels.NCHW_OUT)
    return y, (x_nhwc, k, b, both, None)


def _conv_nchw_bwd(spec, residuals, dy):
    if isinstance(dy, SymbolicZero):
        return None, None, None
    *residuals, as_is = residuals
    if as_is is None:
        return _conv_bwd(spec.nhwc, residuals, _to_nhwc(dy), nchw_dx=True)
    # NCHW x and dy as they are (as _conv_bwd's calls otherwise)
    x, k, b, both = residuals
    x, k, dy = _first_order_only(x, k, dy)
    dtype = np.dtype(x.dtype)
    g = spec.geometry(x.shape, k.shape)
    kernels = _dispatch.kernels
    nchw = kernels.NCHW_X | kernels.NCHW_OUT
    wt = host.regrouped_kernel(k, g, jax.numpy.reshape, jax.numpy.transpose)
    dx = _ffi_call("fastconv_grad_input", x.shape, dtype, (dy, wt), spec, g, nchw=nchw)
    if both is not None:
        dk, db = _ffi_call("fastconv_grad_kernel_bias", (g.kernel_shape, (g.f,)), dtype,
                           (x, dy), spec, g, nchw=nchw)
        return dx, dk, db
    dk = _ffi_call("fastconv_grad_kernel", g.kernel_shape, dtype, (x, dy), spec, g, nchw=nchw)
    return dx, dk, None if b is None else dy.sum(axis=(0, 2, 3))


_conv_nchw.defvjp(_conv_nchw_fwd, _conv_nchw_bwd, symbolic_zeros=True)


# Results of convolutions traced under jax.jit and not differentiated there (inference, or a
# jit that a gradient transforms afterwards: _conv_epilogue's own gradient serves that), which
# an inference BatchNormalization, ReLU or Activation right after may fold into (`fused`):
# id -> (weak reference to the result, (spec, x, k, bias, scale, activation)). Weak, so that an
# entry goes when its trace ends and no tracer outlives it here (jax.checking_leaks).
_SOURCES = {}


def _record(out, source):
    key = id(out)

    def forget(ref):
        if _SOURCES.get(key, (None,))[0] is ref:
            del _SOURCES[key]

    _SOURCES[key] = (weakref.ref(out, forget), source)


def fusable_source(t):
    """The convolution (spec, x, k, bias, scale, activation) that made t, where `fused` can
    fold into it, else None (not a recorded result, or one that has an activation already)."""
    entry = _SOURCES.get(id(t))
    if entry is None or entry[0]() is not t or entry[1][5] is not None:
        return None
    return entry[1]


def fused(t, scale=None, shift=None, activation=None):
    """t, a fastconv convolution's result traced under jax.jit, computed again by one custom
    call with t * scale + shift (scale, shift: (F,)) or an activation (("clip", lo, hi) or
    ("swish",)) done by the kernels; None where it cannot (see fusable_source). XLA drops the
    first call when nothing else uses its result (a use of t elsewhere keeps both: ops.fusable's
    layer check keeps functional models from that), as on TensorFlow."""
    source = fusable_source(t)
    if source is None:
        return None
    spec, x, k, b, s, act = source
    if scale is not None:
        # (conv * s + b) * scale + shift, s and b each possibly absent
        s, b = (scale if s is None else s * scale), (shift if b is None else b * scale + shift)
    if activation is not None:
        act = activation
    out = _conv_epilogue(spec, act, x, k, b, s)
    _record(out, (spec, x, k, b, s, act))
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _conv_epilogue(spec, activation, x, k, b, s):
    """act(conv(x, k) * s + b), float32 NHWC, s and b (F,) or None."""
    return _ffi_forward(spec, x, k, b, np.dtype(np.float32), spec.output_shape(x.shape, k.shape),
                        s, activation)


def _conv_epilogue_fwd(spec, activation, x, k, b, s):
    y = _conv_epilogue(spec, activation, x, k, b, s)
    return y, (x, k, b, s, y)


def _conv_epilogue_bwd(spec, activation, residuals, dy):
    # as TensorFlow's _forward_grad: through the activation (a clip's mask from the output; the
    # swish from the convolution computed again), then the scale and bias, then the convolution
    x, k, b, s, y = residuals
    dtype = np.dtype(np.float32)
    shape = spec.output_shape(x.shape, k.shape)
    z = None
    if activation is not None and activation[0] == "clip":
        dy = jax.numpy.where((y > activation[1]) & (y < activation[2]), dy, 0)
    elif activation is not None:
        z = _ffi_forward(spec, x, k, None, dtype, shape)
        u = z if s is None else z * s
        u = u if b is None else u + b
        sig = jax.nn.sigmoid(u)
        dy = dy * (sig * (1 + u * (1 - sig)))
    db = None if b is None else dy.sum(axis=(0, 1, 2))
    ds = None
    if s is not None:
        z = _ffi_forward(spec, x, k, None, dtype, shape) if z is None else z
        ds = (dy * z).sum(axis=(0, 1, 2))
        dy = dy * s
    x, k, dy = _first_order_only(x, k, dy)
    dx = _ffi_grad_input(spec, dy, k, tuple(x.shape), dtype)
    dk = _ffi_grad_kernel(spec, x, dy, tuple(k.shape), dtype)
    return dx, dk, db, ds


_conv_epilogue.defvjp(_conv_epilogue_fwd, _conv_epilogue_bwd)
