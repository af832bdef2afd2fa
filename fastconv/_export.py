"""When fastconv steps aside: tracing a model for an exported, standalone artifact.

fastconv's convolutions run in this Python process (tf.numpy_function, XLA custom calls or
jax.pure_callback, a torch custom op). An exported artifact (TF SavedModel, jax2tf, ONNX, torch.export, LiteRT) must
run where fastconv is not installed, so while a model is traced *for export* the fastconv layers
compute with Keras' own convolution instead; the weights are the same, so is the function.

"For export" means: inside `fastconv.keras_convolution()` (what `fastconv.export` uses), or a
trace started by Keras' export machinery (`model.export`, `keras.export.ExportArchive`, which live
in `keras.src.export`), or `tf.saved_model.save` (TF's save context), or `torch.export`.
"""

import contextlib
import contextvars
import sys

import keras

_forced = contextvars.ContextVar("fastconv_keras_convolution", default=False)


@contextlib.contextmanager
def keras_convolution():
    """Within this context, fastconv layers and `fastconv.ops.conv` compute with Keras' own
    convolution (`keras.ops.conv` / `keras.ops.depthwise_conv`): for tracing a model into an
    artifact that must not depend on fastconv."""
    token = _forced.set(True)
    try:
        yield
    finally:
        _forced.reset(token)


def _traced_by_keras_export():
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("keras.src.export"):
            return True
        frame = frame.f_back
    return False


def use_keras_convolution(*tensors):
    """True when the convolution being traced must be Keras' own (see the module docstring).

    Cheap on the hot path: the stack is only looked at while a graph is being traced.
    """
    if _forced.get():
        return True
    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        if tf.executing_eagerly():
            return False
        from tensorflow.python.saved_model import save_context

        return save_context.in_save_context() or _traced_by_keras_export()
    if name == "jax":
        import jax

        if not any(isinstance(t, jax.core.Tracer) for t in tensors):
            return False
        return _traced_by_keras_export()
    if name == "torch":
        import torch

        if torch.compiler.is_exporting():
            return True
        if torch.jit.is_tracing():
            return _traced_by_keras_export()
    return False
