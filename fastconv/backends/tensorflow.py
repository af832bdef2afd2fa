"""TensorFlow bridge: tf.numpy_function for each direction, joined by tf.custom_gradient.

Works eagerly and inside tf.function (Keras' TF trainer); not under XLA, so the layer sets
supports_jit = False on this backend. Every result carries its static shape, for the graph
optimizer too (unknown spatial sizes stay unknown). A bare numpy_function's gradient is silently
None: here every gradient is defined, and a second-order one raises.
"""

import numpy as np
import tensorflow as tf

from fastconv import _memory
from fastconv.backends import numpy as host

try:
    from tensorflow.python.ops.gradients_util import PossibleTapeGradientTypes
except ImportError:  # not public API: without it, every eager call is recorded
    def PossibleTapeGradientTypes(tensors):
        return 1


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
        out = host.contiguous(fn(*(np.from_dlpack(a) for a in args)))
        if out.ctypes.data % host.ALIGN == 0:
            return tf.experimental.dlpack.from_dlpack(out.__dlpack__())
        return tf.convert_to_tensor(out)
    if not prunable and None not in list(shape)[1:]:
        return _into_tf_buffer(fn, args, dtype, shape)
    out = tf.numpy_function(lambda *a: host.contiguous(fn(*a)), args, tf.as_dtype(dtype),
                            stateful=False)
    # not set_shape: Grappler re-infers shapes from the ops, and a numpy_function's is unknown;
    # without it Keras' swish, x * sigmoid(1.0 * x), is neither simplified nor fused into
    # _MklSwish after a fastconv layer (EfficientNetB0 predict 158 -> 141 ms)
    return tf.ensure_shape(out, shape)


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
        if result.ctypes.data != out.ctypes.data:
            np.copyto(out, result)  # the kernels wrote elsewhere (e.g. a small transposed result)
        return buf

    return tf.ensure_shape(tf.py_function(call, [*args, buffer], tf.as_dtype(dtype)), shape)


def _first_order_only(fn, args, dtype, shape):
    """`_numpy_function` for a gradient: differentiating it raises. The raising gradient must be
    attached to the op's *inputs* (dy, kernel, x): a numpy_function is not differentiable, so a
    wrapper around its output alone is never reached and the second-order gradient is silently
    None."""

    def op(*args):
        def grad(*_):
            raise NotImplementedError(
                "fastconv computes first-order gradients only: a gradient of fastconv's "
                "gradient (e.g. a Hessian or a gradient penalty) is not supported. Use "
                "keras.layers.Conv2D."
            )

        return _numpy_function(fn, list(args), dtype, shape), grad

    if _recorded(args):
        return tf.custom_gradient(op)(*args)
    return _numpy_function(fn, list(args), dtype, shape)


def conv(x, k, b, spec, result):
    out_shape = spec.output_shape(x.shape.as_list(), k.shape.as_list())
    dtype = host.host_dtype(result)

    def forward(*args):
        return _numpy_function(lambda a, w, *c: host.forward(a, w, spec, dtype, *c), list(args),
                               dtype, out_shape, prunable=False)

    def _conv(x, k, *b):
        def grad(dy):
            dx = _first_order_only(
                lambda g, w, s: host.grad_input(g, w, spec, tuple(s), dtype),
                [dy, k, tf.shape(x)], dtype, x.shape)
            dk = _first_order_only(
                lambda a, g: host.grad_kernel(a, g, spec, k.shape, dtype),
                [x, dy], dtype, k.shape)
            return (dx, dk, *(tf.reduce_sum(dy, axis=spec.reduce_axes) for _ in b))

        return forward(x, k, *b), grad

    args = [_cast(x, dtype), _cast(k, dtype)] + ([] if b is None else [_cast(b, dtype)])
    # decorated per call (the gradient needs this call's spec), and only when it is recorded:
    # tf.custom_gradient inspects the function's signature, ~0.1 ms
    return _cast(tf.custom_gradient(_conv)(*args) if _recorded(args) else forward(*args), result)


def _cast(t, dtype):
    # tf.cast costs ~10 us even when the dtype is already right (variables are read by it)
    return t if isinstance(t, tf.Tensor) and t.dtype == dtype else tf.cast(t, dtype)
