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
