import os

import numpy as np
import pytest

# Keras reads KERAS_BACKEND once, at its first import: each backend runs in its own pytest
# process (see the Makefile's `test` target). Torch goes before TensorFlow (the other order can
# crash here).
BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
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
