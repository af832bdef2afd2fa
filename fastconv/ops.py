"""`fastconv.ops.conv`: keras.ops.conv for rank-4 inputs, computed by fastconv's kernels."""

import importlib

import keras
import numpy as np

from fastconv import _dispatch, _export
from fastconv.backends import numpy as host
from fastconv.geometry import ConvSpec


def _bridge():
    """The module that moves this Keras backend's tensors to and from the kernels."""
    name = keras.backend.backend()
    if name not in ("numpy", "tensorflow", "jax", "torch"):
        raise ValueError(
            f"fastconv supports the numpy, tensorflow, jax and torch backends. "
            f"Received: keras.backend.backend()={name!r}"
        )
    return importlib.import_module(f"fastconv.backends.{name}")


class Conv(keras.Operation):
    """The convolution as a Keras operation, so that symbolic (functional-model) calls record
    fastconv's convolution, not Keras' own."""

    def __init__(self, spec, name=None):
        super().__init__(name=name)
        self.spec = spec

    def call(self, inputs, kernel, bias=None):
        return _run(inputs, kernel, self.spec, bias)

    def compute_output_spec(self, inputs, kernel, bias=None):
        shape = self.spec.output_shape(inputs.shape, kernel.shape)
        return keras.KerasTensor(shape, dtype=host.result_dtype(inputs.dtype, kernel.dtype))


def _check_numeric(value, name):
    """A TypeError for strings, complex numbers and other non-real dtypes, on every backend
    (each backend's own conversion would fail differently, or drop an imaginary part)."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        dtype = np.asarray(value).dtype  # nested lists, scalars, strings
    try:
        name_of_dtype = keras.backend.standardize_dtype(dtype)
    except (ValueError, TypeError):
        name_of_dtype = str(dtype)
    if not (name_of_dtype == "bool" or name_of_dtype.startswith(("int", "uint", "float",
                                                                   "bfloat"))):
        raise TypeError(
            f"`{name}` must hold real numbers (float, int or bool). "
            f"Received: {name} of dtype {name_of_dtype}"
        )


def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
    """General 2-D convolution, like `keras.ops.conv` (same arguments, defaults and result).

    Args:
        inputs: rank-4 tensor, array or nested list, `(batch, height, width, channels)` for
            "channels_last" or `(batch, channels, height, width)` for "channels_first".
        kernel: `(kernel_height, kernel_width, channels // groups, filters)`; the number of
            groups is `channels // kernel.shape[2]` (depthwise when `kernel.shape[2] == 1`).
        strides: int or tuple of 2 ints.
        padding: "valid" or "same" (case-insensitive), with Keras' split of "same" padding.
        data_format: "channels_last", "channels_first" or None (`keras.config.image_data_format()`).
        dilation_rate: int or tuple of 2 ints.

    Differentiable on the tensorflow, jax and torch backends.
    """
    _dispatch.wake()
    spec = ConvSpec.make(strides, padding, data_format, dilation_rate)
    return conv_bias(inputs, kernel, None, spec)


def conv_bias(inputs, kernel, bias, spec):
    """`conv(...) + bias` (bias of shape (filters,), or None) for fastconv's layers: the kernels
    add the bias while each output row is in cache, and the bridges sum its gradient."""
    _check_numeric(inputs, "inputs")
    _check_numeric(kernel, "kernel")
    if isinstance(inputs, keras.KerasTensor) or isinstance(kernel, keras.KerasTensor):
        return Conv(spec).symbolic_call(inputs, kernel, bias)
    return _run(inputs, kernel, spec, bias)


def conv_variables(inputs, kernel, kernel_shape, bias, spec, activation=None, plans=None):
    """conv_bias on a layer's variables (`kernel` seen as `kernel_shape`, `bias` or None), where
    the backend has a faster path for that than the general one (eager calls on every backend:
    see forward_variables in the bridges): (outputs, whether
    `activation` (as `epilogue` takes it) was computed by the kernels); else None. `plans`: a
    dict (or None) into which the bridges put what `planned` needs to make this call again."""
    backend = keras.backend.backend()
    if (backend not in ("numpy", "tensorflow", "jax", "torch")
            or isinstance(inputs, keras.KerasTensor)
            or _export.use_keras_convolution(inputs)):
        return None
    return _bridge().forward_variables(inputs, kernel, kernel_shape, bias, spec, activation,
                                       plans)


def planned(plans, inputs, kernel, bias):
    """conv_variables again, for a call like one kept in `plans`, or None."""
    return _bridge().run_plan(plans, inputs, kernel, bias)


def epilogue(outputs, scale=None, shift=None, activation=None, layer=None):
    """`outputs` (a fastconv convolution's result) computed again with `outputs * scale + shift`
    (per channel) or an activation (("clip", lo, hi) or ("swish",)) done by the convolution
    itself, or None where the backend cannot (TensorFlow graphs and jax.jit traces can, not
    differentiated there: see fastconv.backends.tensorflow.fused and jax.fused) or
    `fusable(outputs, layer)` says no. Nothing to fold (no scale, no activation): None."""
    if (scale is None and activation is None) or not fusable(outputs, layer):
        return None
    return _bridge().fused(outputs, scale, shift, activation)


def batch_norm(layer, inputs, training):
    """The BatchNormalization `layer` (a fastconv.layers twin) on NHWC float32 `inputs` by the
    backend's own fused batch normalization, the moving statistics updated as Keras does in
    training; None where the backend has none (JAX, whose compiler fuses Keras' ops; numpy)."""
    if isinstance(inputs, keras.KerasTensor):
        return None
    bridge = _bridge()
    result = bridge.batch_norm(layer, inputs, training) if hasattr(bridge, "batch_norm") else None
    if result is None:
        return None
    outputs, mean, variance = result
    if training:  # Keras' BatchNormalization.call
        momentum = layer.momentum
        layer.moving_mean.assign(layer.moving_mean * momentum + mean * (1.0 - momentum))
        layer.moving_variance.assign(layer.moving_variance * momentum
                                     + variance * (1.0 - momentum))
    return outputs


def fusable(outputs, layer=None):
    """Whether `epilogue` can fold into the convolution that made `outputs`: a TensorFlow graph
    in inference, and `outputs` not used by anything else yet, or a jax.jit trace not
    differentiated inside; nor, where `layer` (the layer that would fold) was called in
    functional models, by any other layer there."""
    if (keras.backend.backend() not in ("tensorflow", "jax")
            or isinstance(outputs, keras.KerasTensor)):
        return False
    return _bridge().fusable_source(outputs) is not None and not (
        layer is not None and _input_shared(layer))


def _input_shared(layer):
    """Whether another layer also takes the input of `layer`, in the functional graphs that
    call it. TensorFlow graphs are built one layer at a time: the fold makes a new op for the
    convolution, and a user of the input called later would still need the original op, which
    then runs too (the convolution twice)."""
    for node in layer._inbound_nodes:
        for tensor in node.input_tensors[:1]:
            history = getattr(tensor, "_keras_history", None)  # absent: no recorded graph
            producer = getattr(history, "operation", None)
            users = [n for n in getattr(producer, "_outbound_nodes", ())
                     if any(t is tensor for t in n.input_tensors)]
            if len(users) > 1:
                return True
    return False


def add_bias(outputs, bias, spec):
    """outputs + bias (shape (filters,)) along the channel axis, where the kernels cannot add it."""
    bias = keras.ops.reshape(bias, spec.bias_shape)
    if keras.backend.backend() == "tensorflow":
        # keras.ops.add on TF turns a (1, F, 1, 1) bias into bias_add(..., "NHWC") whenever the
        # output width is also F, putting the bias on the width axis (Keras' own Conv2D has that
        # bug, channels_first); tf's `+` goes by shape.
        return outputs + bias
    return keras.ops.add(outputs, bias)


def _tensor(value):
    # Keras' numpy backend copies every array it converts, a whole input per layer call; the
    # kernels only read their inputs, so an array is used as it is.
    if isinstance(value, np.ndarray) and keras.backend.backend() == "numpy":
        return value
    return keras.ops.convert_to_tensor(value)


def _run(inputs, kernel, spec, bias=None):
    """Convert, step aside where fastconv must not run, validate, then hand over to the bridge."""
    bridge = _bridge()
    x, k = _tensor(inputs), _tensor(kernel)
    b = None if bias is None else _tensor(bias)
    exporting = _export.use_keras_convolution(x, k)
    if exporting or bridge.on_accelerator(x, k):
        # Tracing for an exported artifact (which must not call back into fastconv), or data
        # on an accelerator (fastconv never copies it to the host behind the user's back).
        if exporting and not spec.channels_last and keras.backend.backend() == "tensorflow":
            # TF's CPU Conv2D takes NHWC only where TF runs without oneDNN (AMD CPUs, for
            # one): an NCHW convolution in the artifact would fail there when served
            y = keras.ops.transpose(keras.ops.conv(
                keras.ops.transpose(x, (0, 2, 3, 1)), k, spec.strides, spec.padding,
                "channels_last", spec.dilation_rate), (0, 3, 1, 2))
        else:
            y = keras.ops.conv(x, k, spec.strides, spec.padding, spec.data_format,
                               spec.dilation_rate)
        return y if b is None else add_bias(y, b, spec)
    spec.check_call(x.shape, k.shape, None if b is None else b.shape)
    return bridge.conv(x, k, b, spec, host.result_dtype(x.dtype, k.dtype))
