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
