"""`.keras` files: saved here, loaded in a fresh process, on this backend and on another one."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import keras

import fastconv
from conftest import BACKEND

NEXT_BACKEND = {"numpy": "tensorflow", "tensorflow": "jax", "jax": "torch", "torch": "numpy"}

LOAD_AND_PREDICT = """
import sys, os
if os.environ["KERAS_BACKEND"] == "torch":
    import torch
import numpy as np, keras
import fastconv  # registers fastconv>Conv2D
model = keras.models.load_model(sys.argv[1])
x = np.load(sys.argv[2])
np.save(sys.argv[3], keras.ops.convert_to_numpy(model(x)))
names = sorted({type(l).__module__ + "." + type(l).__name__ for l in model.layers})
print("\\n".join(names))
"""


def _model():
    inputs = keras.Input((None, None, 6))
    y = fastconv.Conv2D(12, 3, padding="same", groups=3, activation="relu", name="grouped")(inputs)
    y = fastconv.Conv2D(12, 3, padding="same", groups=12, dilation_rate=2, name="dw")(y)
    y = fastconv.Conv2D(8, (3, 2), strides=(2, 1), use_bias=False, name="strided",
                        kernel_regularizer="l2")(y)
    y = keras.layers.Conv2D(5, 1, name="keras_conv")(y)
    y = keras.layers.GlobalAveragePooling2D()(y)
    return keras.Model(inputs, keras.layers.Dense(3)(y))


def _load_in_fresh_process(backend, path, x_path, out_path):
    env = dict(os.environ, KERAS_BACKEND=backend)
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, str(path), str(x_path), str(out_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out_path), result.stdout.split()


@pytest.mark.parametrize("target", ["same", "other"])
def test_keras_file_round_trips_in_a_fresh_process(tmp_path, target):
    model = _model()
    x = np.random.default_rng(0).standard_normal((2, 11, 9, 6)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x))
    path = tmp_path / "model.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    backend = BACKEND if target == "same" else NEXT_BACKEND[BACKEND]
    got, layer_types = _load_in_fresh_process(backend, path, tmp_path / "x.npy",
                                              tmp_path / "y.npy")
    assert "fastconv.layers.Conv2D" in layer_types
    assert "keras.src.layers.convolutional.conv2d.Conv2D" in layer_types
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_saved_config_names_the_fastconv_class(tmp_path):
    model = _model()
    config = json.loads(model.to_json())
    classes = [layer["class_name"] for layer in config["config"]["layers"]]
    registered = [layer.get("registered_name") for layer in config["config"]["layers"]]
    assert "fastconv>Conv2D" in registered and "Conv2D" in classes
    restored = keras.models.model_from_json(model.to_json())
    assert isinstance(restored.get_layer("grouped"), fastconv.Conv2D)
    assert not isinstance(restored.get_layer("keras_conv"), fastconv.Conv2D)
