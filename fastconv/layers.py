"""`fastconv.Conv2D`: keras.layers.Conv2D whose convolution runs in fastconv's kernels."""

import functools

import keras
import numpy as np
from keras.src import backend as _kbackend  # get_autocast_scope, get_keras_mask: no public API

from fastconv import _dispatch, _export, ops
from fastconv.geometry import ConvSpec


class _PlainCall:
    """Keras' Layer.__call__ costs 50-70 us a call (a call spec binding the signature, name
    scopes, training and mask resolution), as much as a small layer's kernel. For a plain eager
    call (built layer, one tensor of its compute dtype, nothing for Keras to add) `call` runs
    directly; anything else, and any error, takes Keras' way. `_plain_kwargs`: the keyword
    arguments such a call must pass (a layer whose call takes `training` gets it from Keras'
    call context when it is not passed: that call goes through Keras)."""

    _plain_kwargs = frozenset()

    def __call__(self, *args, **kwargs):
        _dispatch.wake()  # (the kernels run soon: their workers wake behind this Python)
        if (len(args) != 1 or kwargs.keys() != self._plain_kwargs
                or getattr(self, "_lock", True)  # (Keras' error for a missing super().__init__)
                or not _plain_call(self, args[0])):
            return super().__call__(*args, **kwargs)
        if not self._called:  # (Keras' __setattr__ tracks values: ~5 us a call)
            self._called = True
        try:
            return self.call(args[0], **kwargs)
        except Exception:
            return super().__call__(*args, **kwargs)  # raises Keras' error, with its context


class _Fastconv(_PlainCall):
    """What fastconv's layers change in their Keras parents: the convolution, and the few steps
    around it that Keras' own call gets wrong on some backend."""

    def __call__(self, *args, **kwargs):
        plans = self.__dict__.get("_fastconv_plans")
        if plans and len(args) == 1 and not kwargs:
            outputs = self._planned(plans, args[0])
            if outputs is not None:
                return outputs
        return super().__call__(*args, **kwargs)

    def __setattr__(self, name, value):
        # A plan holds for the layer as it was when the plan was made (variables, LoRA,
        # quantization, dtype policy, regularizers, input spec): any change forgets the plans.
        self.__dict__.pop("_fastconv_plans", None)
        super().__setattr__(name, value)

    def __delattr__(self, name):
        self.__dict__.pop("_fastconv_plans", None)
        super().__delattr__(name)

    def _planned(self, plans, x):
        """An eager call (TensorFlow, JAX, torch) like a plain one (see `_plain_call`) that kept
        its plan, made again by ops.planned (which checks x, the variables and, on TensorFlow,
        the tapes). What `_plain_call` checks of the layer holds while the layer is unchanged
        (`__setattr__`); what may change between calls without the layer knowing (scopes,
        x's mask, torch's module hooks, tracing and compiling) is checked here. Or None."""
        if (not _eager(self, x) or _kbackend.get_autocast_scope() is not None
                or keras.distribution.distribution() is not None
                or _kbackend.get_keras_mask(x) is not None or _export.use_keras_convolution(x)):
            return None
        _dispatch.wake()
        done = ops.planned(plans, x, self.kernel, self.bias if self.use_bias else None)
        if done is None:
            return None
        outputs, activated = done
        return outputs if self.activation is None or activated else self.activation(outputs)

    def _init_backend(self):
        if keras.backend.backend() == "tensorflow":
            # On TensorFlow the convolution is fastconv's own ops (or a tf.numpy_function),
            # which XLA cannot compile; on JAX the trainer's jit works and must stay on.
            self.supports_jit = False

    def _cast(self, inputs):
        # Keras casts float inputs to the compute dtype; ints and bools are cast here too, so
        # every input dtype behaves the same on every backend.
        if _dtype_name(inputs.dtype) != self.compute_dtype:
            inputs = keras.ops.cast(inputs, self.compute_dtype)
        return inputs

    def _spec(self):
        return _spec(self.strides, self.padding, self.data_format, self.dilation_rate)

    def _conv(self, inputs, kernel):
        return ops.conv_bias(inputs, kernel, None, self._spec())

    def _reshaped(self, kernel, kernel_shape):
        """The kernel variable's value as kernel_shape. JAX: an eager reshape is an op
        dispatch (70-100 us warm, 260 us after an idle spell, against a 0.3 ms depthwise
        kernel), so the reshape of a concrete value is kept while the variable holds that same
        (immutable) array; traced values are never kept."""
        if keras.backend.backend() != "jax" or keras.config.is_nnx_enabled():
            return _reshape(kernel, kernel_shape)  # (nnx would see the kept arrays as state)
        import jax

        value = kernel.value
        if isinstance(value, jax.core.Tracer):
            return _reshape(kernel, kernel_shape)
        kept = self.__dict__.get("_fastconv_reshaped")  # (not tracked by Keras' __setattr__)
        if kept is None or kept[0] is not value or kept[1].shape != tuple(kernel_shape):
            kept = self.__dict__["_fastconv_reshaped"] = (
                value, value.reshape(tuple(kernel_shape)))
        return kept[1]

    def _conv_bias_activation(self, inputs, kernel, kernel_shape=None):
        # The kernels add the bias (and compute a ReLU or swish) while each output row is
        # still in cache; Keras adds it in a separate pass over the whole output. kernel_shape:
        # the (KH, KW, C // groups, F) shape the kernel is seen as, if not its own.
        bias = self.bias if self.use_bias else None
        spec = self._spec()
        fusable = None if self.activation is None else _activation(self.activation)
        # (filled by the bridges that keep plans: see ops.conv_variables; none under nnx,
        # which would take a layer's dict of plans for its state, as it would kept arrays)
        plans = None if keras.backend.backend() == "jax" and keras.config.is_nnx_enabled() else {}
        done = ops.conv_variables(inputs, kernel, kernel_shape or tuple(kernel.shape), bias,
                                  spec, fusable, plans)
        if plans and type(self).call in _PLANNED_CALLS and _plain_call(self, inputs):
            # (not a call through Keras' __call__ for what Keras adds, e.g. an activity
            # regularizer's loss; not a subclass's own `call`)
            kept = self.__dict__.setdefault("_fastconv_plans", {})
            if len(kept) >= _MAX_PLANS:  # (a layer fed images of ever new sizes)
                kept.clear()
            kept.update(plans)
        if done is not None:
            outputs, activated = done
            if self.activation is None or activated:
                return outputs
            return self.activation(outputs)
        if kernel_shape is not None:
            kernel = self._reshaped(kernel, kernel_shape)
        outputs = ops.conv_bias(inputs, kernel, bias, spec)
        if self.activation is None:
            return outputs
        fused = ops.epilogue(outputs, activation=fusable)
        return self.activation(outputs) if fused is None else fused


@keras.saving.register_keras_serializable(package="fastconv")
class Conv2D(_Fastconv, keras.layers.Conv2D):
    """A drop-in replacement for `keras.layers.Conv2D`: same arguments, defaults, errors,
    weights (HWIO kernel) and config; the convolution runs in fastconv's CPU kernels.

    Keras does everything else (argument handling, weights, LoRA, config), so a fastconv layer
    and a Keras layer holding the same weights compute the same function.
    """

    def __init__(self, *args, **kwargs):
        padding = args[3] if len(args) > 3 else kwargs.get("padding", "valid")
        # Keras raises AttributeError for a non-string padding here, and ValueError at the first
        # call for explicit (list/tuple) paddings: fastconv fails at once, in Keras' types.
        if isinstance(padding, (list, tuple)):
            raise ValueError(f"`padding` must be 'valid' or 'same'. Received: padding={padding!r}")
        if not isinstance(padding, str):
            raise TypeError(f"`padding` must be 'valid' or 'same'. Received: padding={padding!r}")
        super().__init__(*args, **kwargs)
        self._init_backend()

    def call(self, inputs):
        inputs = self._cast(inputs)
        if type(self).convolution_op is not Conv2D.convolution_op:
            # A subclass' own convolution_op is honoured, as keras.layers.Conv2D does.
            outputs = self.convolution_op(inputs, self.kernel)
            if self.use_bias:
                outputs = ops.add_bias(outputs, self.bias, self._spec())
            return outputs if self.activation is None else self.activation(outputs)
        return self._conv_bias_activation(inputs, self.kernel)

    def convolution_op(self, inputs, kernel):
        return self._conv(inputs, kernel)


@keras.saving.register_keras_serializable(package="fastconv")
class DepthwiseConv2D(_Fastconv, keras.layers.DepthwiseConv2D):
    """A drop-in replacement for `keras.layers.DepthwiseConv2D`: same arguments, kernel layout
    `(KH, KW, C, depth_multiplier)`, weights and config; the convolution runs in fastconv's CPU
    kernels, forward and backward.

    A depthwise convolution with multiplier M is the grouped convolution with groups = C whose
    kernel is this one reshaped to `(KH, KW, 1, C * M)`: output channel `c * M + m` comes from
    input channel c, which is Keras' (and TensorFlow's) channel order.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_backend()

    def call(self, inputs):
        inputs = self._cast(inputs)
        if _export.use_keras_convolution(inputs):
            return super().call(inputs)  # tracing for export: Keras' own depthwise conv
        kh, kw, channels, multiplier = self.kernel.shape
        return self._conv_bias_activation(inputs, self.kernel,
                                          (kh, kw, 1, channels * multiplier))


# calls that planned calls stand for: a subclass's own `call` is always run
_PLANNED_CALLS = (Conv2D.call, DepthwiseConv2D.call)
_MAX_PLANS = 16  # plans a layer keeps (one an input shape and thread count, or dtype)


def _plain_call(layer, x):
    """Whether Keras' Layer.__call__ would do nothing but call `layer.call(x)`: the layer built
    and neither quantized, rematerialized nor regularizing its activity; x an eager tensor of
    this backend in the layer's compute dtype (no conversion), without a mask, fitting the input
    spec; no autocast scope or distribution; on torch, no module hooks or tracing."""
    return (layer.built and _eager(layer, x) and layer.activity_regularizer is None
            and not layer._remat_mode and getattr(layer, "quantization_mode", None) is None
            and layer.compute_dtype == layer.variable_dtype
            and _dtype_name(x.dtype) == layer.compute_dtype
            and _kbackend.get_autocast_scope() is None
            and keras.distribution.distribution() is None
            and _kbackend.get_keras_mask(x) is None and _fits(layer.input_spec, x.shape))


def _fits(spec, shape):
    # none, or the InputSpec Keras' convolutions and normalizations build (ndim or min_ndim
    # and the channel axis), checked as Keras does; any other spec goes through Keras
    if spec is None:
        return True
    return (isinstance(spec, keras.InputSpec) and spec.shape is None and spec.dtype is None
            and spec.max_ndim is None and len(shape) == (spec.ndim or len(shape))
            and len(shape) >= (spec.min_ndim or 0)
            and all(shape[axis] == size for axis, size in (spec.axes or {}).items()))


_DTYPE_NAMES = {}


def _dtype_name(dtype):
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):
        name = keras.backend.standardize_dtype(dtype)
        try:
            _DTYPE_NAMES[dtype] = name
        except TypeError:  # unhashable
            pass
        return name


def _eager(layer, x):
    global _eager
    _eager = _EAGER[keras.backend.backend()]()
    return _eager(layer, x)


def _eager_numpy():
    return lambda layer, x: type(x) is np.ndarray


def _eager_tensorflow():
    import tensorflow as tf

    # inside tf.function (not executing eagerly) Keras' name scopes name the graph's ops
    return lambda layer, x: isinstance(x, tf.Tensor) and tf.executing_eagerly()


def _eager_jax():
    import jax

    return lambda layer, x: isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def _eager_torch():
    import torch
    from torch.nn.modules import module

    def eager(layer, x):
        # what torch.nn.Module.__call__ would add: hooks, compiled modules, tracing
        return (isinstance(x, torch.Tensor) and layer._compiled_call_impl is None
                and not (layer._forward_hooks or layer._forward_pre_hooks
                         or layer._backward_hooks or layer._backward_pre_hooks
                         or module._global_forward_hooks or module._global_forward_pre_hooks
                         or module._global_backward_hooks
                         or module._global_backward_pre_hooks)
                and not torch._C._get_tracing_state() and not torch.compiler.is_compiling())

    return eager


_EAGER = {"numpy": _eager_numpy, "tensorflow": _eager_tensorflow, "jax": _eager_jax,
          "torch": _eager_torch}


@functools.lru_cache(maxsize=256)
def _spec(strides, padding, data_format, dilation_rate):
    # cached: made at every call, it took ~15 us of a small layer's ~120 (TensorFlow, eager)
    return ConvSpec.make(strides, padding, data_format, dilation_rate)


def _activation(activation, negative_slope=0.0, max_value=None, threshold=0.0):
    """The activation as the kernels' epilogue computes it (("clip", lo, hi): ReLU, ReLU6;
    ("swish",): swish / silu), or None."""
    if negative_slope != 0 or threshold != 0:
        return None
    if activation is keras.activations.relu:
        return ("clip", 0.0, float("inf") if max_value is None else float(max_value))
    if activation is keras.activations.relu6 and max_value is None:
        return ("clip", 0.0, 6.0)
    if activation in (keras.activations.swish, keras.activations.silu) and max_value is None:
        return ("swish",)
    return None


@keras.saving.register_keras_serializable(package="fastconv")
class BatchNormalization(_PlainCall, keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` (same arguments, config, weights and function) that, in
    inference on TensorFlow (graphs) and JAX (jax.jit), is computed by the fastconv convolution
    whose result it normalizes: with its moving statistics it is an affine map a channel, which
    the kernels apply to each output row while it is in cache. On TensorFlow in training and on
    torch it is the framework's own fused batch normalization (`ops.batch_norm`). Elsewhere (JAX
    in training, whose compiler fuses Keras' ops, numpy, other inputs) it is Keras' own.
    `fastconv.convert` swaps it in."""

    _plain_kwargs = frozenset({"training"})

    def call(self, inputs, training=None, mask=None):
        training = bool(training and self.trainable)
        fused = None if training else self._folded(inputs)
        if fused is None and mask is None and self._plain(inputs):
            fused = ops.batch_norm(self, inputs, training)
        if fused is not None:
            return fused
        return super().call(inputs, training=training, mask=mask)

    def _channels_last(self, inputs):
        return len(inputs.shape) == 4 and self.axis in (-1, 3)

    def _plain(self, inputs):
        # what the frameworks' fused batch normalizations serve: NHWC float32, not renorm or
        # synchronized (multi-device) statistics, a batch
        return (self._channels_last(inputs) and not self.renorm and not self.synchronized
                and self.compute_dtype == "float32"
                and keras.backend.standardize_dtype(inputs.dtype) == "float32"
                and inputs.shape[0] != 0)

    def _folded(self, inputs):
        if not self._channels_last(inputs) or not ops.fusable(inputs, self):
            return None
        # the arithmetic of Keras' batch_normalization on TensorFlow and JAX, folded
        scale = keras.ops.rsqrt(self.moving_variance.value + self.epsilon)
        if self.scale:
            scale = scale * self.gamma.value
        shift = -self.moving_mean.value * scale
        if self.center:
            shift = self.beta.value + shift
        return ops.epilogue(inputs, scale=scale, shift=shift)  # (self checked: fusable above)


@keras.saving.register_keras_serializable(package="fastconv")
class ReLU(_PlainCall, keras.layers.ReLU):
    """`keras.layers.ReLU` that a fastconv convolution before it computes in inference on
    TensorFlow and JAX, as for `fastconv.layers.BatchNormalization`."""

    def call(self, inputs):
        fused = ops.epilogue(inputs, activation=_activation(
            keras.activations.relu, self.negative_slope, self.max_value, self.threshold),
            layer=self)
        return super().call(inputs) if fused is None else fused


@keras.saving.register_keras_serializable(package="fastconv")
class Activation(_PlainCall, keras.layers.Activation):
    """`keras.layers.Activation` that a fastconv convolution before it computes in inference
    on TensorFlow and JAX where it is "relu", "relu6", "swish" or "silu", as for
    `fastconv.layers.BatchNormalization`."""

    def call(self, inputs):
        fused = ops.epilogue(inputs, activation=_activation(self.activation), layer=self)
        return super().call(inputs) if fused is None else fused


def _reshape(variable, shape):
    """keras.ops.reshape(variable, shape), for a kernel reshaped at every call, on the
    variable's value (autocast as Keras does). On TensorFlow, eagerly, Keras' costs 350-470 us a
    call here (as much as a small depthwise layer's kernel), tf.reshape with a numpy shape
    70-120 us; on torch, JAX and numpy the array's own reshape skips Keras' symbolic-tensor
    check (a tree walk over the arguments)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.reshape(variable.value, np.asarray(shape, np.int32))
    return variable.value.reshape(tuple(shape))
