"""TensorFlow bridge: the convolution and each gradient an op, joined by tf.custom_gradient.

In a graph (tf.function, Keras' trainer), float32 convolutions run as fastconv._tf_ops, native
TensorFlow ops that call the kernels on TensorFlow's tensors; the rest (and builds without
them) as tf.numpy_function. Eagerly the kernels are called directly on the tensors' memory.
Not under XLA, so the layer sets supports_jit = False on this backend. Every result carries its
static shape, for the graph optimizer too (unknown spatial sizes stay unknown). A bare
numpy_function's gradient is silently None: here every gradient is defined, and a second-order
one raises.
"""

import os
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from fastconv import _dispatch, _memory
from fastconv.backends import numpy as host
from fastconv.geometry import Geometry

try:
    from tensorflow.python.ops.gradients_util import PossibleTapeGradientTypes
except ImportError:  # not public API: without it, every eager call is recorded
    def PossibleTapeGradientTypes(tensors):
        return 1

try:
    from tensorflow.python.eager.record import record_operation
except ImportError:  # not public API: without it, tf.custom_gradient records eager calls too
    record_operation = None

try:
    from tensorflow.python.eager.record import (could_possibly_record, should_record_backprop,
                                                stop_recording)
    from tensorflow.python.framework.ops import EagerTensor
    from tensorflow.python.ops.resource_variable_ops import ResourceVariable, variable_accessed
except ImportError:  # not public API: without them, eager calls take the general path
    could_possibly_record = None


_dispatch.wake_on_calls()


def _recorded(tensors):
    """Whether a gradient of these tensors may be asked for: in a graph always; eagerly only
    while a GradientTape or ForwardAccumulator watches one of them. tf.custom_gradient costs
    ~0.2 ms a call in eager mode (an identity op per result, signature inspection), as much as
    a small layer's kernel, and most eager calls are inference."""
    return not tf.executing_eagerly() or PossibleTapeGradientTypes(tensors) != 0


def on_accelerator(*tensors):
    for t in tensors:
        device = getattr(t, "device", "") or ""
        if device:
            if "CPU" not in device.upper():
                return True
        elif tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
            return True  # graph tensor without a placement: it would land on the accelerator
    return False


def _numpy_function(fn, args, dtype, shape, prunable=True):
    """fn (a host function) on tensors. Eagerly it is called directly on zero-copy views of the
    tensors and its result becomes a tensor without a copy (dlpack; host results are 64-byte
    aligned, as TensorFlow requires): tf.numpy_function would copy every input and the result,
    which costs more than a small layer's kernel. In a graph, tf.numpy_function, or with
    prunable=False, `_into_tf_buffer`."""
    if tf.executing_eagerly():
        return _tensor(fn(*(np.from_dlpack(a) for a in args)))
    if not prunable and None not in list(shape)[1:]:
        return _into_tf_buffer(fn, args, dtype, shape)
    out = tf.numpy_function(lambda *a: host.contiguous(fn(*a)), args, tf.as_dtype(dtype),
                            stateful=False)
    # not set_shape: Grappler re-infers shapes from the ops, and a numpy_function's is unknown;
    # without it Keras' swish, x * sigmoid(1.0 * x), is neither simplified nor fused into
    # _MklSwish after a fastconv layer (EfficientNetB0 predict 158 -> 141 ms)
    return tf.ensure_shape(out, shape)


def _tensor(out):
    """A host result as an eager tensor, without a copy where it is 64-byte aligned."""
    out = host.contiguous(out)
    if _memory.address(out) % host.ALIGN == 0:
        return tf.experimental.dlpack.from_dlpack(out.__dlpack__())
    return tf.convert_to_tensor(out)


def _into_tf_buffer(fn, args, dtype, shape):
    """fn in a graph, its result written into a tensor that TensorFlow allocated (an Empty op,
    whose batch size may be dynamic). TensorFlow runs an elementwise op in place on an input
    whose buffer it owns and nobody else holds; a numpy_function's result is numpy's memory and
    never qualifies, so the BatchNormalization and activation after every convolution each wrote
    a new tensor: MobileNetV2 predict spent 61 ms in Mul/AddV2/Relu6 against Keras' 34 ms, and
    took 100 ms -> 93 ms this way (Keras 73). But tf.py_function is stateful, so TensorFlow
    runs it even when its result is unused: only for results that are always used (forward)."""
    dims = list(shape)
    if dims[0] is None:
        dims[0] = tf.shape(args[0])[0]
    buffer = tf.raw_ops.Empty(shape=tf.stack(dims), dtype=tf.as_dtype(dtype), init=False)

    def call(*tensors):
        *inputs, buf = tensors
        out = _memory.writable(np.from_dlpack(buf), buf)
        with _memory.into(out):
            result = host.contiguous(fn(*(np.from_dlpack(a) for a in inputs)))
        if _memory.address(result) != _memory.address(out):
            np.copyto(out, result)  # the kernels wrote elsewhere (e.g. a small transposed result)
        return buf

    return tf.ensure_shape(tf.py_function(call, [*args, buffer], tf.as_dtype(dtype)), shape)


def _output_cache_limit():
    """Bytes of freed large outputs the ops keep for reuse (see ReuseAllocator in _tf_ops.cc):
    FASTCONV_TF_OUTPUT_CACHE_MB, 512 by default (MobileNetV2's training step at batch 8 keeps
    ~300 MB), 0 to keep none (each freed output goes back to the heap at once)."""
    value = os.environ.get("FASTCONV_TF_OUTPUT_CACHE_MB", "512")
    try:
        megabytes = int(value)
    except ValueError:
        megabytes = -1
    if megabytes < 0:
        raise ValueError(f"FASTCONV_TF_OUTPUT_CACHE_MB={value!r}: expected a number of megabytes "
                         "(an integer >= 0)")
    return megabytes << 20


def _load_ops():
    """fastconv._tf_ops (the convolution and its gradients as TensorFlow ops), or None if it
    was not built or does not load (e.g. built against another TensorFlow)."""
    import importlib.util

    found = importlib.util.find_spec("fastconv._tf_ops")
    if found is None:
        return None
    try:
        # first: loading registers the ops and makes their Python wrappers (the module import
        # then finds the library loaded, with the same state)
        wrappers = tf.load_op_library(found.origin)
        from fastconv import _tf_ops
    except (ImportError, tf.errors.NotFoundError, tf.errors.InvalidArgumentError):
        return None
    if not hasattr(wrappers, "fastconv_forward"):
        return None  # imported as a module before TensorFlow loaded it: no wrappers were made
    _tf_ops.set_threads(_dispatch.get_num_threads())
    _dispatch.thread_listeners.append(_tf_ops.set_threads)
    _tf_ops.set_output_cache(_output_cache_limit())
    _tf_ops.ops = wrappers
    return _tf_ops


_OPS = _load_ops()


def _native_geometry(spec, dtype, x_shape, k_shape, channels_first=False):
    """(g, batch_known) where the native ops serve a call, else None: in a graph, float32,
    channels_last (or with `channels_first` either: only the forward op takes both), known
    spatial sizes, the ops built and the kernels exporting float32 entry points (which are
    handed to the ops here). g has batch 1 where the batch is unknown."""
    n, h, w, c = spec.to_nhwc(list(x_shape))
    if (dtype != np.float32 or not (spec.channels_last or channels_first) or None in (h, w, c)
            or None in list(k_shape) or not _ops_ready()):
        return None
    g = spec.geometry(spec.from_nhwc((1 if n is None else n, h, w, c)), tuple(k_shape))
    return g, n is not None


def _ops_ready():
    """Whether the native ops can run here (in a graph, built, and the kernels exporting
    float32 entry points, which are handed to them)."""
    return _OPS is not None and not tf.executing_eagerly() and _hand_kernels()


def _hand_kernels():
    """Hand the float32 entry points of the kernel build in use (which tests may switch) to the
    ops; False if it exports none."""
    global _handed
    kernels = _dispatch.kernels
    if kernels is _handed:
        return True
    if not hasattr(kernels, "ffi_forward"):
        return False
    _OPS.set_kernels(kernels.ffi_forward(), kernels.ffi_grad_input(), kernels.ffi_grad_kernel(),
                     kernels.ffi_channel_sums(), kernels.ffi_transpose(),
                     kernels.ffi_regroup())
    _handed = kernels
    return True


_handed = None  # the kernel build whose entry points the ops have


def _swap(t, rows, dims, inverse):
    """t, each sample seen as (rows, r), transposed to (r, rows) and shaped (N, *dims) by the
    kernels' own transpose (TensorFlow's took 5-15x as long): in a graph an op, eagerly on the
    host into its pooled buffers (the op's fresh tensors took up to 2x as long there), recorded
    for the tape with `inverse` as its gradient."""
    src_shape = (-1, rows, t.shape[1:].num_elements() // rows)
    if tf.executing_eagerly():
        if record_operation is None and _recorded([t]):
            return tf.reshape(tf.transpose(tf.reshape(t, src_shape), (0, 2, 1)), (-1, *dims))
        out = _tensor(host._transposed(np.from_dlpack(t), rows, (t.shape[0], *dims)))
        if _recorded([t]):
            record_operation("FastconvTranspose", [out], [t], lambda g: [inverse(g)])
        return out
    size = t.shape.num_elements()
    threads = 1 << 30 if size is None else host._threads(size, host._ELEMENTS_PER_THREAD)
    out = _OPS.ops.fastconv_transpose(tf.reshape(t, src_shape), max_threads=threads)
    return tf.reshape(out, (-1, *dims))


# A recorded eager channels_first call runs as the channels_last convolution between these two
# (each the other's gradient): x is transposed once (its NHWC copy is what the gradient wrt the
# kernel keeps), dy once for both gradients, the result and dx once each. In graphs the ops
# write the result and dx NCHW themselves (_conv_nchw).
def _to_nhwc(t):
    _, c, h, w = t.shape
    return _swap(t, c, (h, w, c), _to_nchw)


def _to_nchw(t):
    _, h, w, c = t.shape
    return _swap(t, h * w, (c, h, w), _to_nhwc)


@tf.RegisterGradient("FastconvTranspose")
def _swap_grad(op, grad):
    return _OPS.ops.fastconv_transpose(grad, max_threads=op.get_attr("max_threads"))


def _swaps_serve(spec, dtype, x_shape, k_shape, recorded):
    """Whether a channels_first call runs as channels_last between _to_nhwc and _to_nchw:
    eagerly when recorded (the host's own channels_first gradients would transpose x and dy
    again, each), unless the host's gradients read NCHW x and dy as they are
    (host.nchw_gradients; its forward reads and writes NCHW a band of rows at a time in cache,
    as unrecorded eager calls do); graphs take the ops' (_conv_nchw)."""
    return (recorded and tf.executing_eagerly() and not spec.channels_last
            and dtype == np.float32 and None not in x_shape[1:]
            and not host.nchw_gradients(spec, spec.geometry(x_shape, k_shape)))


# Geometry.blocks' arrays built in the graph (the host's helpers with TensorFlow's ops)
_TF_OPS = dict(pad=tf.pad, reshape=tf.reshape, transpose=tf.transpose)


def _geometry_attrs(spec, g, batch_known):
    sh, sw, dh, dw, pad_top, pad_left, groups, threads = host._args(spec, g)
    # an unknown batch size: as many threads as set (the work per call is not known)
    return dict(sh=sh, sw=sw, dh=dh, dw=dw, pad_top=pad_top, pad_left=pad_left, groups=groups,
                max_threads=threads if batch_known else 1 << 30)


def _recut(spec, g, batch_known, t, shape):
    """t (NHWC) and the NHWC result shape, re-cut as the host does, when the batch is known."""
    if not batch_known:
        return t, shape
    threads = host._args(spec, g)[-1]
    return (tf.reshape(t, host.recut_shape(spec, g, threads, t.shape)),
            host.recut_shape(spec, g, threads, shape))


def _native_forward(spec, x, k, b, dtype, nchw_out=False):
    """The forward op on x as `spec` has it (channels_first: the kernels transpose x's rows and
    the result's in cache, a band at a time); with `nchw_out`, a channels_last x's result
    (N, F, OH, OW). None where the op does not serve."""
    found = _native_geometry(spec, dtype, x.shape, k.shape, channels_first=True)
    if found is None:
        return None
    g, known = found
    none = tf.zeros((0,), tf.float32)
    b = none if b is None else b
    nchw = (0 if spec.channels_last else _dispatch.kernels.NCHW_X) | (
        _dispatch.kernels.NCHW_OUT if nchw_out or not spec.channels_last else 0)
    if nchw:
        return _OPS.ops.fastconv_forward(x, k, b, none, oh=g.oh, ow=g.ow, f=g.f, nchw=nchw,
                                         **_geometry_attrs(spec, g, known))
    xin, (_, oh, ow, f) = _recut(spec, g, known, x, (None, g.oh, g.ow, g.f))
    out = _OPS.ops.fastconv_forward(xin, k, b, none, oh=oh, ow=ow, f=f,
                                    **_geometry_attrs(spec, g, known))
    if known and out.shape != g.output_shape_nhwc:
        out = tf.reshape(out, g.output_shape_nhwc)  # undo the re-cut
    return out


def _native_grad_input(spec, dy, k, x_shape, dtype, nchw=False):
    """The gradient wrt the input of a channels_last call; with `nchw`, as an NCHW dx (written
    so by the op, a band at a time, where the space-to-depth blocks do not serve). None where
    the ops do not serve."""
    found = _native_geometry(spec, dtype, x_shape, k.shape)
    if found is None:
        return None
    g, known = found
    return host.blocked_grad_input(spec, g, dy, k,
                                   lambda *a, **kw: _grad_input_op(*a, known=known, **kw),
                                   _TF_OPS, _to_nchw if nchw else None)


def _grad_input_op(spec, g, dy, k, known, nchw=0):
    """The native grad_input on an NHWC dy; with `nchw` (the kernels' layout bits, or True:
    NCHW_X), into an NCHW dx (and with NCHW_OUT from an NCHW dy)."""
    wt = _regrouped_kernel(g, k)
    if nchw:
        return _OPS.ops.fastconv_grad_input(dy, wt, h=g.h, w=g.w, c=g.c, nchw=int(nchw),
                                            **_geometry_attrs(spec, g, known))
    dyin, (_, h, w, c) = _recut(spec, g, known, dy, (None, g.h, g.w, g.c))
    dx = _OPS.ops.fastconv_grad_input(dyin, wt, h=h, w=w, c=c,
                                      **_geometry_attrs(spec, g, known))
    if known and dx.shape != g.input_shape_nhwc:
        dx = tf.reshape(dx, g.input_shape_nhwc)  # undo the re-cut
    return dx


def _regrouped_kernel(g, k):
    """host.regrouped_kernel in the graph; with groups == 1 each tap's (C, F) matrix transposed
    by the kernels' transpose op (_swap): tf.transpose (_MklTranspose) of every kernel cost a
    MobileNetV2 training step 10.7 ms of its 470 (AVX-512 Xeon, 2 threads)."""
    if g.groups == 1:
        # (only in graphs, where the op's registered gradient serves: no eager `inverse`)
        wt = _swap(tf.reshape(k, (g.kh * g.kw, g.c, g.f)), g.c, (g.f, g.c), None)
        return tf.reshape(wt, (g.kh, g.kw, g.f, g.c))
    return host.regrouped_kernel(k, g, tf.reshape, tf.transpose)


def _native_grad_kernel(spec, x, dy, k_shape, dtype, bias=False):
    """The native gradient wrt the kernel, with `bias` (dk, db), or None where it does not
    serve."""
    found = _native_geometry(spec, dtype, x.shape, k_shape)
    if found is None:
        return None
    g, known = found
    return host.blocked_grad_kernel(spec, g, x, dy,
                                    lambda *a: _grad_kernel_op(*a, known=known, bias=bias),
                                    _TF_OPS, bias)


def _grad_kernel_op(spec, g, x, dy, known, bias=False, nchw=0):
    """The native grad_kernel on NHWC x and dy (or as the kernels' layout bits `nchw` have
    them); with `bias` (dk, db), from one pass over dy."""
    op = _OPS.ops.fastconv_grad_kernel_bias if bias else _OPS.ops.fastconv_grad_kernel
    return op(x, dy, kernel_shape=list(g.kernel_shape), nchw=nchw,
              **_geometry_attrs(spec, g, known))


def _native_bias_grad(spec, dy, dtype):
    """The bias gradient of a channels_last dy as fastconv's op (the kernels' channel sums; TF's
    reduce_sum over (0, 1, 2) took 5-8x as long), or None where it does not serve."""
    if dtype != np.float32 or not spec.channels_last or dy.shape[3] is None or not _ops_ready():
        return None
    size = dy.shape.num_elements()
    threads = 1 << 30 if size is None else host._threads(size, host._ELEMENTS_PER_THREAD)
    return _OPS.ops.fastconv_bias_grad(dy, max_threads=threads)


# Inference epilogues: a BatchNormalization with its moving statistics (an affine map a
# channel) and a ReLU / ReLU6 / swish after a convolution, computed by the convolution's op while
# each output row is in cache. Separately, each is a pass over the whole tensor in memory: Mul, AddV2
# and Relu6 took 36 of 84 ms of a converted MobileNetV2's predict step (AVX-512 Xeon, 2 threads).
_GEOMETRY_ATTRS = ("sh", "sw", "dh", "dw", "pad_top", "pad_left", "groups", "max_threads")
_SIZE_ATTRS = ("oh", "ow", "f")  # FastconvForward's output sizes


def fusable_source(t):
    """(the FastconvForward op that made t, the shape tensor of the Reshape between them or
    None) where `fused` can fold into that op, else None."""
    if (tf.executing_eagerly() or _OPS is None or not isinstance(t, tf.Tensor)
            or t.dtype != tf.float32 or PossibleTapeGradientTypes([t]) != 0 or t.consumers()):
        return None
    reshape = None
    op = t.op
    if op.type == "IdentityN":  # tf.custom_gradient's wrapper (not recorded: no tape)
        t = op.inputs[t.value_index]
        op = t.op
    if op.type == "Reshape":  # undoing a 1x1 convolution's re-cut (_recut)
        reshape = op.inputs[1]
        op = op.inputs[0].op
    if op.type != "FastconvForward" or op.get_attr("act"):
        return None
    return op, reshape


def fused(t, scale=None, shift=None, activation=None):
    """t, the result of a fastconv convolution in a graph, computed again with t * scale + shift
    (scale, shift: (F,) tensors) or an activation (("clip", lo, hi) or ("swish",)) fused into
    the convolution's op, or None where that cannot be done (eagerly, t is not a convolution's
    float32 result, a gradient tape is recording, the op already has an activation, or
    something already uses t). The op that made t stays in the graph and runs only if something
    else uses t: TensorFlow prunes unused stateless ops from a function's graph. (A use of t
    made after this call therefore runs the convolution a second time, with right results:
    ops.fusable's layer check keeps functional models from that.)"""
    source = fusable_source(t)
    if source is None:
        return None
    op, reshape = source
    x, k, b, s = op.inputs
    attrs = {name: op.get_attr(name) for name in _GEOMETRY_ATTRS + _SIZE_ATTRS}
    attrs["nchw"] = op.get_attr("nchw")
    if scale is not None:
        # (conv * s + b) * scale + shift, with s and b each possibly absent (0 elements)
        s_new = scale if s.shape[0] == 0 else s * scale
        b_new = shift if b.shape[0] == 0 else b * scale + shift
        s, b = s_new, b_new
    if activation is not None:
        attrs.update(host.act_attrs(activation))
    out = _OPS.ops.fastconv_forward(x, k, b, s, **attrs)
    return out if reshape is None else tf.reshape(out, reshape)


def batch_norm(layer, x, training):
    """ops.batch_norm on TensorFlow: (outputs, batch mean, batch variance) in training, by
    TensorFlow's FusedBatchNormV3 op (oneDNN's kernels), forward and gradient one pass each over
    the tensor: Keras' own is a dozen ops over the whole tensor each way (Mean,
    SquaredDifference, Mul, Sub, AddV2, Tile, Sum, ...), ~330 ms of op time in a MobileNetV2
    training step (batch 8, 2 threads) whose converted convolutions took 211 ms. In inference
    (where it does not fold into a convolution) Keras' own: None."""
    if not training:
        return None
    channels = x.shape[-1]
    gamma = layer.gamma.value if layer.scale else tf.ones((channels,), tf.float32)
    beta = layer.beta.value if layer.center else tf.zeros((channels,), tf.float32)
    empty = tf.zeros((0,), tf.float32)
    outputs, mean, variance = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=layer.epsilon,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=True)[:3]
    # the op's variance has Bessel's correction (n / (n - 1)); Keras' is the batch's own
    n = tf.cast(tf.size(x) // channels, tf.float32)
    return outputs, mean, variance * (tf.maximum(n - 1, 1) / n)


def forward_variables(x, kernel, kernel_shape, bias, spec, activation=None, plans=None):
    """A layer's eager convolution on its kernel (seen as `kernel_shape`) and bias variables:
    (outputs, whether `activation` (as `fused` takes it, or None) was applied), or None where
    this does not serve: not eager, not float32 on the CPU, a kernel or bias that
    is not a plain variable (a LoRA kernel is a sum), the ops not built, or a call that several
    tapes, a persistent tape or a forward accumulator watch (those take the general path).
    The call is kept in `plans` (a dict of the layer's, or None), for `run_plan`.

    Eagerly every op costs 30-150 us here (the most right after a large kernel has pushed
    TensorFlow's code out of the caches), and the general path runs three or four (reading each
    variable, a depthwise kernel's reshape, the result's conversion) plus their recording under
    a tape. An inference call is one FastconvForwardVariables op that reads the variables
    itself; a call one GradientTape watches, `_taped_forward`."""
    if (_OPS is None or not tf.executing_eagerly() or not isinstance(x, tf.Tensor)
            or x.dtype != tf.float32 or x.shape.rank != 4 or could_possibly_record is None
            or not _hand_kernels()):
        return None
    variables = _values(kernel, bias)
    if any(type(v) is not ResourceVariable or v.dtype != tf.float32 for v in variables):
        return None
    if on_accelerator(x, *(v.handle for v in variables)):
        return None
    spec.check_call(x.shape, kernel_shape, None if bias is None else variables[1].shape)
    g = spec.geometry(tuple(x.shape), tuple(kernel_shape))
    geometry = list(_geometry_attrs(spec, g, True).values())
    view = []
    if spec.channels_last:
        cut = host.recut_shape(spec, g, geometry[-1], g.input_shape_nhwc)
        view = [] if cut == g.input_shape_nhwc else [*cut[:3], *cut[1:3]]
    # (channels_first: the kernels' channels_first forward inside the op: channels_first
    # inference as one eager op, not the general path (the variables read as two ops, then the
    # host's convolution; when the op transposed x and the result whole, A/B, eager layer
    # calls: 4x256x28x28 in 32 groups 1.24x, depthwise 4x128x56x56 1.23x, 3x3 64 on 4x64x56x56
    # 1.10x, 4x16x8x8 1.8x)

    def attrs(activation):
        act = host.act_attrs(activation)
        sizes = [*geometry, g.oh, g.ow, g.f, act["act"], int(not spec.channels_last), *view]
        return dict(sizes=sizes, clip=[act["lo"], act["hi"]]) if activation else dict(sizes=sizes)

    # (channels_first under a tape: x's NHWC copy for the kernel gradient, unless the
    # gradients read NCHW x and dy as they are)
    nx = not spec.channels_last and not host.nchw_gradients(spec, g)
    taped = dict(attrs(None), nkernel=1, nx=int(nx))
    gradients = None
    if spec.channels_last and host.direct_gradients(spec, g):
        # FastconvGradients' sizes without dx, with dx
        start = [*geometry, *g.kernel_shape, *variables[0].shape]
        gradients = tuple([*start, need_dx, int(len(variables) > 1), *view]
                          for need_dx in (0, 1))
    plan = _Plan(x.device, variables, attrs(activation), activation is not None,
                 tuple(kernel_shape), spec, taped, gradients)
    done = _run(plan, x)
    if done is not None and plans is not None:
        plans[tuple(x.shape), _plan_threads] = plan
    return done


def _values(kernel, bias):
    # a keras.Variable's value is its tf.Variable, unless a StatelessScope gives another value
    # (stateless_call) or autocasting a cast: those take the general path
    return [getattr(v, "value", v) for v in (kernel, bias) if v is not None]


class _Plan(NamedTuple):
    """What forward_variables made of a call, for `_run` (and `run_plan`)."""
    device: str  # x's
    variables: list  # the tf.Variables: kernel, and bias if any
    attrs: dict  # the variables op's attributes
    activated: bool  # whether the op computes the activation
    kernel_shape: tuple
    spec: object
    taped_attrs: dict  # the op's under a tape: no activation; the kernel's value, x's NHWC copy
    gradients_sizes: tuple  # FastconvGradients' sizes without and with dx, or None


def _run(plan, x):
    """The convolution of x on the plan's variables (checked), as forward_variables gives it."""
    handles = [v.handle for v in plan.variables]
    for v in plan.variables:
        variable_accessed(v)  # what reading it tells TensorFlow's tapes and variable watchers
    if could_possibly_record():
        watched = PossibleTapeGradientTypes([x, *handles])
        if (watched == 1 and record_operation is not None
                and should_record_backprop([x, *handles])):
            return _taped_forward(x, handles, plan), False
        if watched != 0:
            return None
    out = _OPS.ops.fastconv_forward_variables(x, handles[0], handles[1:], **plan.attrs).y
    return out, plan.activated


# Plans are kept per input shape and thread count (their max_threads attribute): the count
# fastconv's kernels are set to now
_plan_threads = _dispatch.get_num_threads()


def _set_plan_threads(threads):
    global _plan_threads
    _plan_threads = threads


_dispatch.thread_listeners.append(_set_plan_threads)


def run_plan(plans, x, kernel, bias):
    """forward_variables for a call like one it kept in `plans`: x of the same shape on the
    same device, the same variables read as the same tf.Variables (not in a stateless scope or
    autocast), the same thread count (the benchmark alternates 1 and 2); without remaking its
    checks and attributes. (outputs, activated) as forward_variables gives them, or None. The
    caller (the layer) answers for everything about the layer and the call (see
    layers._Fastconv._planned).

    An eager layer call costs 60 us warm and ~190-240 us right after a large kernel
    (TensorFlow's and fastconv's Python out of the caches), of which the op itself 15 and
    ~80-110: a plan leaves 33 and ~140-190 us. Under a tape it saves the same share."""
    if type(x) is not EagerTensor or x.dtype != tf.float32 or not tf.executing_eagerly():
        return None
    plan = plans.get((tuple(x.shape), _plan_threads))
    if plan is None:
        return None
    values = _values(kernel, bias)
    if (x.device != plan.device or len(values) != len(plan.variables)
            or any(v is not p for v, p in zip(values, plan.variables)) or not _hand_kernels()):
        return None
    return _run(plan, x)


def _taped_forward(x, handles, plan):
    """The convolution of a call that exactly one non-persistent GradientTape watches (no
    accumulator), recorded on it with the variables' handles as inputs, as the tape sees a
    variable read. The general path reads each variable as a recorded op and converts more:
    a training step's time beyond the kernels (tape.gradient with output_gradients, AVX-512
    Xeon) 0.55 -> 0.37 ms on 2x8x8x16, 0.89 -> 0.63 ms on 1x56x56x64, 1.05 -> 0.80 ms on
    4x28x28x256 in 32 groups. The forward is one FastconvForwardVariables op that also gives
    the kernel's value as read, unrecorded: a snapshot (TensorFlow copies a variable's buffer
    on assignment while a read holds it), so the gradients are those of the values the forward
    used."""
    with stop_recording():
        out, (kernel,), x_nhwc = _OPS.ops.fastconv_forward_variables(x, handles[0], handles[1:],
                                                                     **plan.taped_attrs)
    spec, kernel_shape = plan.spec, plan.kernel_shape
    need_dx = _recorded([x])  # (an input no tape watches: see conv)
    variable_shape = tuple(kernel.shape)
    bias = len(handles) > 1
    out_shape = out.shape  # (not out: the closure would keep it alive until the gradient)

    def gradients(dy):
        _dispatch.wake()
        if (plan.gradients_sizes is not None and dy.dtype == tf.float32
                and dy.shape == out_shape):
            # (the op reads dy as the result's shape; its registered gradient raises:
            # _second_order)
            dx, dk, *db = _OPS.ops.fastconv_gradients(
                dy, kernel, x, sizes=plan.gradients_sizes[need_dx])
            return [dx if need_dx else None, dk, *(db if bias else ())]
        # (_first_order_only: where a tape records this gradient's computation, e.g. an outer
        # tape watching dy, differentiating it raises)
        dx = None
        # (the compute functions take dy as it is here; NCHW as it is where there is no NHWC
        # copy of x: host.nchw_gradients)
        dy_host = _host_dy(dy, spec) if x_nhwc or spec.channels_last else np.from_dlpack(dy)
        if need_dx:
            dx = _first_order_only(lambda g, k: _tensor(host.grad_input(
                dy_host, np.from_dlpack(k).reshape(kernel_shape), spec, tuple(x.shape),
                c_contiguous=True)), [dy, kernel])
        return [dx, *_first_order_only(lambda a, g: _taped_grad_kernel(
            _host_x(a, x_nhwc, spec), dy_host, spec, kernel_shape, variable_shape, bias),
            [x, dy])]

    record_operation("FastconvConv2D", [out], [x, *handles], gradients)
    return out


def _host_dy(dy, spec):
    """dy for the host's gradients: channels_first, transposed to NHWC memory (seen as NCHW,
    which the host takes as it is) once for both gradients, each of which would transpose it."""
    return host._from_nhwc(host._nhwc(np.from_dlpack(dy), spec, np.float32), spec)


def _host_x(x, x_nhwc, spec):
    """x for the host's gradient wrt the kernel: channels_first, the op's NHWC copy of it (seen
    as NCHW, which the host takes as it is), not a second transpose."""
    return host._from_nhwc(np.from_dlpack(x_nhwc[0]), spec) if x_nhwc else np.from_dlpack(x)


def _taped_grad_kernel(x_host, dy_host, spec, kernel_shape, variable_shape, bias):
    """[dkernel in the variable's shape, dbias if `bias`] for `_taped_forward`."""
    dk = host.grad_kernel(x_host, dy_host, spec, kernel_shape, bias=bias)
    dk, *db = dk if bias else (dk,)
    return [_tensor(dk.reshape(variable_shape)), *map(_tensor, db)]


def _fused_geometry(op, x_nhwc):
    """The Geometry of a FastconvForward op, from its NHWC input, its kernel's shape and its
    attributes."""
    n, h, w, c = x_nhwc.shape
    kh, kw, cin_g, f = op.inputs[1].shape
    return Geometry(n, h, w, c, kh, kw, cin_g, f, op.get_attr("groups"), op.get_attr("oh"),
                    op.get_attr("ow"), op.get_attr("pad_top"), op.get_attr("pad_left"))


@tf.RegisterGradient("FastconvForward")
def _forward_grad(op, dy):
    """The gradient of a FastconvForward op with its epilogue (`fused`), for symbolic
    gradients of a graph that holds one (tf.gradients, or a tape around a tf.function call).
    Unfused convolutions get theirs from conv's tf.custom_gradient; so does a traced inference
    call (unrecorded) when a tape differentiates its function later."""
    x, k, b, s = op.inputs
    geometry = {name: op.get_attr(name) for name in _GEOMETRY_ATTRS}
    sizes = {name: op.get_attr(name) for name in _SIZE_ATTRS}
    nchw = op.get_attr("nchw")
    none = tf.zeros((0,), tf.float32)
    act = op.get_attr("act")
    if act == _dispatch.kernels.ACT_CLIP:
        y = op.outputs[0]
        dy = tf.where((y > op.get_attr("lo")) & (y < op.get_attr("hi")), dy, tf.zeros_like(dy))
    elif act == _dispatch.kernels.ACT_SWISH:
        u = _OPS.ops.fastconv_forward(x, k, b, s, nchw=nchw, **sizes, **geometry)  # pre-swish
        sig = tf.sigmoid(u)
        dy = dy * (sig * (1 + u * (1 - sig)))
    # channels_first: the gradients read NHWC copies of dy and x and write dx NCHW
    if nchw & _dispatch.kernels.NCHW_OUT:
        dy = _to_nhwc(dy)
    x_nchw = bool(nchw & _dispatch.kernels.NCHW_X)
    if x_nchw:
        x = _to_nhwc(x)
    db = none if b.shape[0] == 0 else tf.reduce_sum(dy, axis=(0, 1, 2))
    ds = none
    if s.shape[0] != 0:
        z = _OPS.ops.fastconv_forward(x, k, none, none, **sizes, **geometry)
        ds = tf.reduce_sum(dy * z, axis=(0, 1, 2))
        dy = dy * s
    g = _fused_geometry(op, x)
    dx = _OPS.ops.fastconv_grad_input(dy, _regrouped_kernel(g, k), h=g.h, w=g.w, c=g.c,
                                      nchw=int(x_nchw), **geometry)
    dk = _OPS.ops.fastconv_grad_kernel(x, dy, kernel_shape=list(g.kernel_shape), **geometry)
    return [dx, dk, db, ds]


def _first_order_only(compute, args):
    """compute(*args) (a gradient's op) such that differentiating it raises. The raising
    gradient must be attached to the op's *inputs* (dy, kernel, x): a numpy_function is not
    differentiable, so a wrapper around its output alone is never reached and the second-order
    gradient is silently None."""

    def op(*args):
        return compute(*args), _second_order

    if _recorded(args):
        return tf.custom_gradient(op)(*args)
    return compute(*args)


@tf.RegisterGradient("FastconvGradients")
def _second_order(*_):
    raise NotImplementedError(
        "fastconv computes first-order gradients only: a gradient of fastconv's gradient (e.g. "
        "a Hessian or a gradient penalty) is not supported. Use keras.layers.Conv2D."
    )


def conv(x, k, b, spec, result):
    dtype = host.host_dtype(result)
    out_shape = spec.output_shape(x.shape.as_list(), k.shape.as_list())

    def forward(x, k, *b):
        out = _native_forward(spec, x, k, b[0] if b else None, dtype)
        if out is not None:
            return out
        return _numpy_function(lambda a, w, *c: host.forward(a, w, spec, dtype, *c),
                               [x, k, *b], dtype, out_shape, prunable=False)

    def grad_input(dy, k):
        dx = _native_grad_input(spec, dy, k, x.shape, dtype)
        if dx is not None:
            return dx
        return _numpy_function(lambda g, w, s: host.grad_input(g, w, spec, tuple(s), dtype),
                               [dy, k, tf.shape(x)], dtype, x.shape)

    def grad_kernel(x, dy):
        dk = _native_grad_kernel(spec, x, dy, k.shape, dtype)
        if dk is not None:
            return dk
        return _numpy_function(lambda a, g: host.grad_kernel(a, g, spec, k.shape, dtype),
                               [x, dy], dtype, k.shape)

    def grad_kernel_bias(x, dy):
        # (dk, db) from one call: eagerly on the host, in a graph where the native ops serve
        if tf.executing_eagerly():
            dk, db = host.grad_kernel(np.from_dlpack(x), np.from_dlpack(dy), spec, k.shape,
                                      dtype, bias=True)
            return _tensor(dk), _tensor(db)
        return _native_grad_kernel(spec, x, dy, k.shape, dtype, bias=True)

    def bias_grad(dy):
        # in a graph where the native grad_kernel does not serve (else grad_kernel_bias)
        db = _native_bias_grad(spec, dy, dtype)
        return tf.reduce_sum(dy, axis=spec.reduce_axes) if db is None else db

    def gradients(dy, x, k, *b, need_dx=True):
        _dispatch.wake()
        dx = _first_order_only(grad_input, [dy, k]) if need_dx else None
        if b and (tf.executing_eagerly()
                  or _native_geometry(spec, dtype, x.shape, k.shape) is not None):
            # the bias gradient from the dy that grad_kernel reads anyway
            dk, db = _first_order_only(grad_kernel_bias, [x, dy])
            return [dx, dk, db]
        dk = _first_order_only(grad_kernel, [x, dy])
        return [dx, dk, *(bias_grad(dy) for _ in b)]

    def _conv(x, k, *b):
        return forward(x, k, *b), lambda dy: gradients(dy, x, k, *b)

    args = [_cast(x, dtype), _cast(k, dtype)] + ([] if b is None else [_cast(b, dtype)])
    recorded = _recorded(args)
    if (recorded and not spec.channels_last and not tf.executing_eagerly()
            and _native_geometry(spec, dtype, x.shape, k.shape, channels_first=True) is not None):
        return _cast(_conv_nchw(spec, dtype, *args), result)
    if _swaps_serve(spec, dtype, x.shape.as_list(), k.shape.as_list(), recorded):
        y = conv(_to_nhwc(args[0]), args[1], None if b is None else args[2], spec.nhwc,
                 "float32")
        return _cast(_to_nchw(y), result)
    if not recorded:
        return _cast(forward(*args), result)
    if tf.executing_eagerly() and record_operation is not None:
        # what tf.custom_gradient does eagerly, without its Identity op on the result (a fresh
        # tensor here) and its signature inspection: every eager op costs 0.1-0.4 ms here when
        # it follows other work; a training step took 0.3-0.6 ms less (small8x8 1.68 -> 1.36,
        # depthwise 6.44 -> 5.85, resnet3x3 17.9 -> 17.5 ms)
        out = forward(*args)
        # An input no tape watches now (a model's images) can get no gradient through this
        # op later: its grad_input is skipped (in a graph, pruning drops it). A 7x7/2 stem's
        # grad_input costs more than its forward and grad_kernel together.
        need_dx = _recorded(args[:1])
        record_operation("FastconvConv2D", [out], args,
                         lambda dy: gradients(dy, *args, need_dx=need_dx))
        return _cast(out, result)
    # decorated per call (the gradient needs this call's spec)
    return _cast(tf.custom_gradient(_conv)(*args), result)


def _conv_nchw(spec, dtype, x, k, *b):
    """A channels_first call in a graph where the ops serve. The forward reads x NCHW and
    writes the result NCHW, a band at a time. Where the gradients read NCHW x and dy so too
    (host.nchw_gradients), they take them as they are. Elsewhere, under a tape, x is transposed
    once, into the NHWC copy the gradient wrt the kernel reads, which the forward then reads
    too; dy is transposed once for both gradients; dx is written NCHW by its op (unless on
    space-to-depth blocks). Around the channels_last convolution (_to_nhwc, _to_nchw) the
    result and dx were transposed whole too. With no tape (inference; a graph differentiated
    only later, as a tf.function called under a tape), the gradient transposes x itself."""
    nhwc = spec.nhwc
    taped = PossibleTapeGradientTypes([x, k, *b]) != 0
    g, known = _native_geometry(spec, dtype, x.shape, k.shape, channels_first=True)
    as_is = host.nchw_gradients(spec, g)

    def _conv(x, k, *b):
        bias = b[0] if b else None
        if taped and not as_is:
            x_nhwc = _to_nhwc(x)
            y = _native_forward(nhwc, x_nhwc, k, bias, dtype, nchw_out=True)
        else:
            x_nhwc, y = None, _native_forward(spec, x, k, bias, dtype)

        def gradients(dy):
            _dispatch.wake()
            if as_is:
                nchw = _dispatch.kernels.NCHW_X | _dispatch.kernels.NCHW_OUT
                dx = _first_order_only(
                    lambda d, w: _grad_input_op(spec, g, d, w, known, nchw), [dy, k])
                # (the bias gradient from the dy that grad_kernel reads anyway)
                dk = _first_order_only(lambda a, d: _grad_kernel_op(
                    spec, g, a, d, known, bias=bool(b), nchw=nchw), [x, dy])
                return [dx, *(dk if b else (dk,))]
            xt = _to_nhwc(x) if x_nhwc is None else x_nhwc
            dy_nhwc = _to_nhwc(dy)
            dx = _first_order_only(lambda g, w: _native_grad_input(
                nhwc, g, w, xt.shape, dtype, nchw=True), [dy_nhwc, k])
            # (the bias gradient from the dy that grad_kernel reads anyway)
            dk = _first_order_only(lambda a, g: _native_grad_kernel(
                nhwc, a, g, k.shape, dtype, bias=bool(b)), [xt, dy_nhwc])
            return [dx, *(dk if b else (dk,))]

        return y, gradients

    return tf.custom_gradient(_conv)(x, k, *b)


def _cast(t, dtype):
    # tf.cast costs ~10 us even when the dtype is already right; a variable is read first
    # (tf.cast hands a tf.Variable of the right dtype back as it is, which the tape checks
    # cannot take)
    if not isinstance(t, tf.Tensor):
        t = tf.convert_to_tensor(t)
    return t if t.dtype == dtype else tf.cast(t, dtype)
