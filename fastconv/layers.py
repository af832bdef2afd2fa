"""`fastconv.Conv2D`: keras.layers.Conv2D whose convolution runs in fastconv's kernels."""

import keras

from fastconv import _export, ops


class _Fastconv:
    """What fastconv's layers change in their Keras parents: the convolution, and the few steps
    around it that Keras' own call gets wrong on some backend."""

    def _init_backend(self):
        if keras.backend.backend() == "tensorflow":
            # The TensorFlow bridge calls the host through tf.numpy_function, which XLA cannot
            # compile; on JAX the trainer's jit works and must stay on.
            self.supports_jit = False

    def _cast(self, inputs):
        # Keras casts float inputs to the compute dtype; ints and bools are cast here too, so
        # every input dtype behaves the same on every backend.
        if keras.backend.standardize_dtype(inputs.dtype) != self.compute_dtype:
            inputs = keras.ops.cast(inputs, self.compute_dtype)
        return inputs

    def _conv(self, inputs, kernel):
        return ops.conv(inputs, kernel, strides=self.strides, padding=self.padding,
                        data_format=self.data_format, dilation_rate=self.dilation_rate)

    def _bias_and_activation(self, outputs):
        if self.use_bias:
            shape = (1, 1, 1, -1) if self.data_format == "channels_last" else (1, -1, 1, 1)
            bias = keras.ops.reshape(self.bias, shape)
            if keras.backend.backend() == "tensorflow":
                # keras.ops.add on TF turns a (1, F, 1, 1) bias into bias_add(..., "NHWC")
                # whenever the output width is also F, putting the bias on the width axis
                # (Keras' own Conv2D has that bug, channels_first); tf's `+` goes by shape.
                outputs = outputs + bias
            else:
                outputs = keras.ops.add(outputs, bias)  # Keras' dtype rules (numpy backend)
        return outputs if self.activation is None else self.activation(outputs)


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
        return self._bias_and_activation(self.convolution_op(inputs, self.kernel))

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
        kernel = keras.ops.reshape(self.kernel, (kh, kw, 1, channels * multiplier))
        return self._bias_and_activation(self._conv(inputs, kernel))
