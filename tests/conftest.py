import functools
import os

import numpy as np
import pytest

# Keras reads KERAS_BACKEND once, at its first import: each backend runs in its own pytest
# process (see the Makefile's `test` target). Torch goes before TensorFlow (the other order can
# crash here).
BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
# XLA compiles every new shape of Keras' own JAX convolution (also behind Keras' numpy backend);
# unoptimised compilation is several times faster and just as exact for these small tests.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
if BACKEND == "torch":
    import torch  # noqa: F401
import keras  # noqa: E402


def pytest_report_header(config):
    import fastconv

    return (f"keras {keras.__version__}, backend {keras.backend.backend()}, fastconv kernels "
            f"{fastconv._dispatch.variant}, threads {fastconv.get_num_threads()}")


only_numpy = pytest.mark.skipif(
    BACKEND != "numpy", reason="backend-independent: runs once, in the numpy process"
)


@functools.cache
def _keras_tf_runs(what):
    """Whether Keras' own TensorFlow convolution runs `what` on this CPU. Without oneDNN (TF
    enables it by default only on recent Intel CPUs; not on AMD's Zen 3, for one) TF's CPU
    Conv2D takes NHWC only and DepthwiseConv2dNative equal strides only, so Keras' layer raises
    where fastconv serves the call."""
    import tensorflow as tf

    x = np.zeros((1, 1, 4, 4), np.float32)
    try:
        if what == "channels_first":
            keras.ops.conv(x, np.zeros((1, 1, 1, 1), np.float32), data_format="channels_first")
        elif what == "uneven_depthwise_strides":
            keras.layers.DepthwiseConv2D(1, strides=(2, 1))(x.reshape(1, 4, 4, 1))
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
        return False
    return True


def keras_conv_runs(data_format="channels_last", groups=1, strides=(1, 1), dilation=(1, 1),
                    batch=1, depthwise=False, gradients=False):
    """Whether Keras' own convolution (keras.ops.conv, Conv2D, DepthwiseConv2D with
    `depthwise`) may serve as a second opinion here. Only TensorFlow has exceptions; the
    float64 numpy reference checks fastconv in every case."""
    if BACKEND != "tensorflow":
        return True
    if batch == 0:
        return False  # Keras' TF conv fails on an empty batch
    if groups > 1 and not depthwise:
        return False  # TF's grouped CPU conv goes through XLA and corrupts the heap here
    if max(strides) > 1 and max(dilation) > 1:
        return False  # tf.nn.convolution refuses strides and dilation together
    if data_format == "channels_first" and not depthwise and (
            gradients or not _keras_tf_runs("channels_first")):
        return False  # TF's CPU conv backprop is NHWC only, and so is its forward without oneDNN
    if depthwise and strides[0] != strides[1] and not _keras_tf_runs("uneven_depthwise_strides"):
        return False
    return True


def to_numpy(t):
    return keras.ops.convert_to_numpy(t)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def autodiff(fn, *arrays):
    """Gradients of the scalar fn(*tensors) wrt each of its arguments, by the backend's autodiff
    (jitted on JAX, as Keras' JAX trainer does; one compilation beats many eager ones)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        ts = [tf.constant(a) for a in arrays]
        with tf.GradientTape() as tape:
            tape.watch(ts)
            loss = fn(*ts)
        grads = tape.gradient(loss, ts)
    elif BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        grads = jax.jit(jax.grad(fn, argnums=tuple(range(len(arrays)))))(
            *[jnp.asarray(a) for a in arrays])
    else:
        import torch

        ts = [torch.tensor(a, requires_grad=True) for a in arrays]
        fn(*ts).backward()
        grads = [t.grad for t in ts]
    assert all(g is not None for g in grads), "a gradient is None"
    return [np.asarray(to_numpy(g)) for g in grads]
