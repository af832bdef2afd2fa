"""`fastconv.Conv2D` against `keras.layers.Conv2D` holding the same weights and against the
float64 reference: arguments, models, unknown sizes, dtype policies, config, odd inputs, and
Keras' own `run_layer_test`."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from absl.testing import parameterized
from keras.src import testing

import fastconv
import reference
from conftest import keras_conv_runs, to_numpy

BACKEND = keras.backend.backend()
HERE = os.path.dirname(os.path.abspath(__file__))
TRAINS = BACKEND != "numpy"  # the numpy backend has no training


def _keras_can_run(layer, batch=1):
    return keras_conv_runs(layer.data_format, layer.groups, layer.strides, layer.dilation_rate,
                           batch)


def _randomize(layer, seed=0):
    """Random weights everywhere (bias and LoRA's zero-initialised factor included)."""
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.standard_normal(w.shape).astype(w.dtype) * 0.5
                       for w in layer.get_weights()])


def _conv_kernel(layer):
    """The layer's kernel (LoRA included) in float64 as a convolution's: a DepthwiseConv2D's
    regrouped."""
    kernel = to_numpy(layer.kernel).astype(np.float64)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kernel = reference.depthwise_kernel(kernel)
    return kernel


def _reference(layer, x, dtype=np.float64):
    """The layer's function computed with the float64 reference from its weights."""
    kernel = _conv_kernel(layer)
    out = reference.conv(np.asarray(to_numpy(x), np.float64), kernel, layer.strides,
                         layer.padding, layer.dilation_rate, layer.data_format)
    if layer.use_bias:
        shape = (1, 1, 1, -1) if layer.data_format == "channels_last" else (1, -1, 1, 1)
        out = out + to_numpy(layer.bias).astype(np.float64).reshape(shape)
    if layer.activation is not None:
        out = to_numpy(layer.activation(keras.ops.convert_to_tensor(out.astype(dtype))))
    return out


def _pair(kwargs, input_shape, seed=0, direction="fast_to_keras"):
    """A fastconv layer and a Keras layer built alike, holding the same (random) weights."""
    fast = fastconv.Conv2D(**kwargs)
    ref = keras.layers.Conv2D(**kwargs)
    fast.build(input_shape)
    ref.build(input_shape)
    if direction == "fast_to_keras":
        _randomize(fast, seed)
        ref.set_weights(fast.get_weights())
    else:
        _randomize(ref, seed)
        fast.set_weights(ref.get_weights())
    return fast, ref


def _input(shape, seed=1, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# (layer kwargs, input shape)
LAYER_CASES = [
    (dict(filters=4, kernel_size=3), (2, 7, 8, 3)),
    (dict(filters=5, kernel_size=(3, 2), strides=(2, 1), padding="same"), (2, 9, 7, 3)),
    (dict(filters=6, kernel_size=3, padding="SAME", dilation_rate=(2, 1)), (1, 9, 8, 4)),
    (dict(filters=6, kernel_size=3, groups=2, activation="relu"), (2, 8, 8, 4)),
    (dict(filters=6, kernel_size=3, groups=3, padding="same", activation="tanh",
          data_format="channels_first"), (2, 3, 7, 6)),
    (dict(filters=10, kernel_size=3, groups=5, padding="same"), (2, 6, 6, 5)),  # depthwise x2
    (dict(filters=5, kernel_size=5, groups=5, strides=2, padding="same",
          use_bias=False), (1, 9, 11, 5)),  # depthwise
    (dict(filters=7, kernel_size=1, data_format="channels_first", activation="sigmoid"),
     (2, 5, 4, 3)),
    (dict(filters=3, kernel_size=(5, 4), padding="same", strides=3), (1, 2, 3, 7)),
    (dict(filters=2, kernel_size=3, dilation_rate=2, padding="valid", use_bias=False,
          data_format="channels_first"), (3, 1, 9, 10)),
    (dict(filters=4, kernel_size=3, padding="same"), (0, 5, 5, 3)),  # empty batch
]


@pytest.mark.parametrize("direction", ["fast_to_keras", "keras_to_fast"])
@pytest.mark.parametrize("kwargs,input_shape", LAYER_CASES, ids=str)
def test_layer_matches_keras_and_reference(kwargs, input_shape, direction):
    fast, ref = _pair(kwargs, input_shape, direction=direction)
    x = _input(input_shape)
    out = fast(x)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    out = to_numpy(out)
    expected = _reference(fast, x)
    reference.assert_close(out, expected, 1e-4, "fastconv vs reference")
    if _keras_can_run(fast, input_shape[0]):
        theirs = ref(x)
        assert out.shape == tuple(theirs.shape)
        reference.assert_close(out, to_numpy(theirs), 1e-4, "fastconv vs keras")
    assert out.shape == fast.compute_output_shape(input_shape) == ref.compute_output_shape(
        input_shape)
    assert input_shape[0] == 0 or np.abs(out).max() > 0.05


@pytest.mark.parametrize("kwargs,input_shape", LAYER_CASES[:4], ids=str)
def test_weights_layout_is_keras_layout(kwargs, input_shape):
    fast, ref = _pair(kwargs, input_shape)
    assert [w.shape for w in fast.weights] == [w.shape for w in ref.weights]
    assert [w.path.split("/")[-1] for w in fast.weights] == [
        w.path.split("/")[-1] for w in ref.weights]
    for a, b in zip(fast.get_weights(), ref.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_initializers_give_keras_weights():
    kwargs = dict(filters=6, kernel_size=3, groups=2,
                  kernel_initializer=keras.initializers.GlorotUniform(seed=3),
                  bias_initializer=keras.initializers.RandomNormal(seed=4))
    fast = fastconv.Conv2D(**kwargs)
    ref = keras.layers.Conv2D(**{**kwargs,
                                 "kernel_initializer": keras.initializers.GlorotUniform(seed=3),
                                 "bias_initializer": keras.initializers.RandomNormal(seed=4)})
    fast.build((1, 5, 5, 4))
    ref.build((1, 5, 5, 4))
    for a, b in zip(fast.get_weights(), ref.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert np.abs(fast.get_weights()[1]).max() > 0  # the bias initializer was used
    fast = fastconv.Conv2D(3, 2, kernel_initializer="ones", bias_initializer="zeros")
    fast.build((1, 4, 4, 2))
    np.testing.assert_array_equal(fast.get_weights()[0], np.ones((2, 2, 2, 3)))


def test_regularizers_give_keras_losses():
    kwargs = dict(filters=4, kernel_size=3, padding="same",
                  kernel_regularizer=keras.regularizers.L2(0.1),
                  bias_regularizer=keras.regularizers.L1(0.2),
                  activity_regularizer=keras.regularizers.L2(0.01))
    fast, ref = _pair(kwargs, (2, 6, 6, 3))
    x = _input((2, 6, 6, 3))
    fast(x)
    ref(x)
    ours = [float(to_numpy(v)) for v in fast.losses]
    theirs = [float(to_numpy(v)) for v in ref.losses]
    assert len(ours) == len(theirs) == 3
    np.testing.assert_allclose(sorted(ours), sorted(theirs), rtol=1e-5)
    activity = 0.01 * np.sum(_reference(fast, x) ** 2) / x.shape[0]
    assert any(abs(v - activity) <= 1e-4 * activity for v in ours)


@pytest.mark.skipif(not TRAINS, reason="the numpy backend does not train")
def test_constraints_apply_and_one_training_step_matches_keras():
    kwargs = dict(filters=4, kernel_size=3, padding="same",
                  kernel_constraint=keras.constraints.NonNeg(),
                  bias_constraint=keras.constraints.MaxNorm(0.1))
    models = []
    for cls in (fastconv.Conv2D, keras.layers.Conv2D):
        model = keras.Sequential([keras.Input((6, 6, 3)), cls(**kwargs)])
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        models.append(model)
    _randomize(models[0].layers[0], 5)
    models[1].set_weights(models[0].get_weights())
    x, y = _input((4, 6, 6, 3), 6), _input((4, 6, 6, 4), 7)
    for model in models:
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    kernel, bias = models[0].get_weights()
    assert kernel.min() >= 0 and np.linalg.norm(bias) <= 0.1 + 1e-6
    assert isinstance(models[0].layers[0].kernel.constraint, keras.constraints.NonNeg)
    for a, b in zip(models[0].get_weights(), models[1].get_weights()):
        reference.assert_close(a, b, 1e-4, "weights after one step")


@pytest.mark.parametrize("at", ["constructor", "enable_lora"])
def test_lora_matches_keras(at):
    kwargs = dict(filters=6, kernel_size=3, padding="same", groups=2)
    if at == "constructor":
        kwargs.update(lora_rank=2, lora_alpha=3.0)
    fast, ref = _pair(kwargs, (2, 6, 7, 4))
    if at == "enable_lora":
        for layer in (fast, ref):
            layer.enable_lora(2, lora_alpha=3.0)
        _randomize(fast, 9)
        ref.set_weights(fast.get_weights())
    assert fast.lora_enabled and len(fast.get_weights()) == 4
    assert len(fast.trainable_weights) == 3  # kernel frozen: bias + the two LoRA factors
    x = _input((2, 6, 7, 4))
    out = to_numpy(fast(x))
    reference.assert_close(out, _reference(fast, x), 1e-4)
    without_lora = reference.conv(x, fast._kernel.numpy() if hasattr(fast._kernel, "numpy")
                                  else to_numpy(fast._kernel), padding="same")
    assert np.abs(out - without_lora - to_numpy(fast.bias)).max() > 1e-2  # LoRA counted
    if _keras_can_run(fast):
        reference.assert_close(out, to_numpy(ref(x)), 1e-4)


def _models(kind, cls, groups):
    conv1 = dict(filters=6, kernel_size=3, padding="same", groups=groups, activation="relu")
    conv2 = dict(filters=4, kernel_size=(2, 3), strides=2)
    if kind == "sequential":
        return keras.Sequential([keras.Input((9, 8, 3 * groups)), cls(**conv1), cls(**conv2)])
    if kind == "functional":
        inputs = keras.Input((9, 8, 3 * groups))
        return keras.Model(inputs, cls(**conv2)(cls(**conv1)(inputs)))

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.b = cls(**conv1), cls(**conv2)

        def call(self, x):
            return self.b(self.a(x))

    model = Subclassed()
    model(np.zeros((1, 9, 8, 3 * groups), np.float32))
    return model


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_models_predict_like_keras(kind, groups):
    fast = _models(kind, fastconv.Conv2D, groups)
    x = _input((5, 9, 8, 3 * groups), 2)
    a, b = fast.layers[-2], fast.layers[-1]
    _randomize(a, 1)
    _randomize(b, 2)
    out = fast.predict(x, batch_size=2, verbose=0)
    expected = _reference(b, _reference(a, x).astype(np.float32))
    reference.assert_close(out, expected, 1e-4, "predict vs reference")
    reference.assert_close(to_numpy(fast(x)), expected, 1e-4, "eager vs reference")
    if not (BACKEND == "tensorflow" and groups > 1):
        ref = _models(kind, keras.layers.Conv2D, groups)
        ref.set_weights(fast.get_weights())
        reference.assert_close(out, ref.predict(x, batch_size=2, verbose=0), 1e-4)


def test_unknown_spatial_sizes_fully_convolutional():
    inputs = keras.Input((None, None, 3))
    y = fastconv.Conv2D(4, 3, padding="same", strides=2, activation="relu")(inputs)
    y = fastconv.Conv2D(2, 3, groups=2, dilation_rate=2)(y)
    assert tuple(y.shape) == (None, None, None, 2)
    model = keras.Model(inputs, y)
    a, b = model.layers[1], model.layers[2]
    _randomize(a, 3)
    _randomize(b, 4)
    for shape in [(2, 11, 9, 3), (1, 16, 21, 3), (3, 10, 10, 3)]:
        x = _input(shape, 5)
        expected = _reference(b, _reference(a, x).astype(np.float32))
        reference.assert_close(model.predict(x, verbose=0), expected, 1e-4, f"predict {shape}")
        reference.assert_close(to_numpy(model(x)), expected, 1e-4, f"call {shape}")


POLICIES = ["float32", "float64", "mixed_float16", "mixed_bfloat16"]


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("policy", POLICIES)
def test_dtype_policies(policy, groups):
    if policy == "float64" and BACKEND == "jax":
        pytest.skip("float64 on JAX needs jax_enable_x64: checked in a child process by "
                    "test_ops.py::test_float64_on_jax_with_x64")
    kwargs = dict(filters=4, kernel_size=3, padding="same", groups=groups, dtype=policy)
    fast, ref = _pair(kwargs, (2, 7, 6, 4))
    x = _input((2, 7, 6, 4), 3, np.float64)
    out = fast(x)
    compute = keras.dtype_policies.get(policy).compute_dtype
    rtol = {"float32": 1e-4, "float64": 1e-10}.get(policy, 1e-2)
    if policy == "float64" and BACKEND == "numpy":
        # Keras' numpy backend promotes float64 to float32 (its conv runs in JAX without x64):
        # keras.layers.Conv2D(dtype="float64") returns float32 there, and so does fastconv.
        compute, rtol = "float32", 1e-4
    assert keras.backend.standardize_dtype(out.dtype) == compute
    assert fast.kernel.dtype == ref.kernel.dtype
    out = to_numpy(keras.ops.cast(out, "float64"))
    reference.assert_close(out, _reference(fast, x), rtol, "vs reference")
    if _keras_can_run(fast):
        theirs = ref(x)
        assert theirs.dtype == fast(x).dtype
        reference.assert_close(out, to_numpy(keras.ops.cast(theirs, "float64")), rtol)


@pytest.mark.parametrize("groups", [1, 2])
def test_channels_first_bias_when_the_output_width_equals_filters(groups):
    """keras.layers.Conv2D on TensorFlow adds the bias along the width axis here (keras.ops.add
    turns it into tf.nn.bias_add(..., "NHWC") when the last axis has `filters` entries);
    fastconv adds it along the channels on every backend."""
    kwargs = dict(filters=6, kernel_size=3, padding="same", groups=groups,
                  data_format="channels_first")
    fast, ref = _pair(kwargs, (2, 4, 5, 6))
    x = _input((2, 4, 5, 6), 16)
    out = to_numpy(fast(x))
    reference.assert_close(out, _reference(fast, x), 1e-4)
    if BACKEND != "tensorflow":
        reference.assert_close(out, to_numpy(ref(x)), 1e-4)


def test_config_equals_keras_config():
    kwargs = dict(filters=6, kernel_size=(3, 2), strides=(2, 1), padding="same",
                  data_format="channels_first", dilation_rate=1, groups=3, activation="relu",
                  use_bias=False, kernel_initializer="he_normal", bias_initializer="ones",
                  kernel_regularizer="l2", bias_regularizer=keras.regularizers.L1(0.3),
                  activity_regularizer="l1", kernel_constraint="non_neg",
                  bias_constraint=keras.constraints.MaxNorm(2.0), lora_rank=2, lora_alpha=4,
                  dtype="mixed_float16", name="conv")
    fast = fastconv.Conv2D(**kwargs)
    ref = keras.layers.Conv2D(**kwargs)
    assert fast.get_config() == ref.get_config()
    restored = fastconv.Conv2D.from_config(fast.get_config())
    assert type(restored) is fastconv.Conv2D
    assert restored.get_config() == fast.get_config()
    # Keras' config also rebuilds a fastconv layer, and the reverse.
    assert fastconv.Conv2D.from_config(ref.get_config()).get_config() == ref.get_config()
    serialized = keras.saving.serialize_keras_object(fast)
    assert serialized["registered_name"] == "fastconv>Conv2D"
    again = keras.saving.deserialize_keras_object(serialized)
    assert type(again) is fastconv.Conv2D and again.get_config() == fast.get_config()


def test_json_round_trip():
    model = _models("functional", fastconv.Conv2D, 1)
    _randomize(model.layers[1], 6)
    _randomize(model.layers[2], 7)
    text = model.to_json()
    assert "fastconv>Conv2D" in text
    json.loads(text)
    restored = keras.models.model_from_json(text)
    assert [type(layer) for layer in restored.layers[1:]] == [fastconv.Conv2D] * 2
    restored.set_weights(model.get_weights())
    x = _input((2, 9, 8, 3), 8)
    np.testing.assert_array_equal(to_numpy(restored(x)), to_numpy(model(x)))
    # Swapping the class name in the JSON gives Keras' own model, computing the same.
    keras_model = keras.models.model_from_json(text.replace('"registered_name": "fastconv>Conv2D"',
                                                            '"registered_name": null')
                                               .replace('"module": "fastconv.layers"',
                                                        '"module": "keras.layers"'))
    assert [type(layer) for layer in keras_model.layers[1:]] == [keras.layers.Conv2D] * 2
    keras_model.set_weights(model.get_weights())
    reference.assert_close(to_numpy(keras_model(x)), to_numpy(model(x)), 1e-4)


# ------------------------------------------------------------------- odd inputs to the layer


@pytest.mark.parametrize("dtype", ["float64", "float16", "int32", "uint8", "bool"])
def test_input_dtypes_are_cast_to_the_compute_dtype(dtype):
    layer = fastconv.Conv2D(4, 3, padding="same", groups=2)
    layer.build((2, 6, 5, 4))
    _randomize(layer, 10)
    values = np.random.default_rng(11).integers(0, 3, (2, 6, 5, 4))
    x = values > 1 if dtype == "bool" else values.astype(dtype)
    for given in (x, keras.ops.convert_to_tensor(x)):
        out = layer(given)
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
        reference.assert_close(to_numpy(out), _reference(layer, x.astype(np.float32)), 1e-4)


@pytest.mark.parametrize("kind", ["readonly", "strided", "fortran", "transposed"])
def test_odd_numpy_inputs(kind):
    base = _input((2, 8, 6, 4), 12)
    x = {
        "readonly": base.copy(),
        "strided": np.repeat(base, 2, axis=2)[:, :, ::2, :],
        "fortran": np.asfortranarray(base),
        "transposed": np.ascontiguousarray(base.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3),
    }[kind]
    if kind == "readonly":
        x.flags.writeable = False
    assert np.array_equal(x, base)
    for data_format in ("channels_last", "channels_first"):
        layer = fastconv.Conv2D(6, 3, padding="same", groups=2, data_format=data_format)
        layer.build(x.shape)
        _randomize(layer, 13)
        reference.assert_close(to_numpy(layer(x)), _reference(layer, base), 1e-4, data_format)


def test_empty_batch_has_the_right_shape():
    for data_format, shape, expected in [("channels_last", (0, 9, 7, 4), (0, 5, 4, 6)),
                                         ("channels_first", (0, 4, 9, 7), (0, 6, 5, 4))]:
        layer = fastconv.Conv2D(6, 3, strides=2, padding="same", groups=2,
                                data_format=data_format)
        out = layer(np.zeros(shape, np.float32))
        assert tuple(out.shape) == expected
        assert keras.backend.standardize_dtype(out.dtype) == "float32"


def test_nan_and_inf_reach_exactly_the_outputs_whose_window_covers_them():
    layer = fastconv.Conv2D(3, 3, padding="same", kernel_initializer="ones",
                            bias_initializer="zeros")
    x = np.ones((2, 7, 8, 2), np.float32)
    x[0, 3, 3, 0] = np.nan
    x[1, 6, 0, 1] = np.inf
    out = to_numpy(layer(x))
    expected = reference.conv(x, np.ones((3, 3, 2, 3)), padding="same")
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(out), np.isinf(expected))
    assert np.isnan(out[0, 2:5, 2:5]).all() and np.isnan(out).sum() == 27
    assert np.isinf(out[1, 5:7, 0:2]).all() and np.isinf(out).sum() == 12
    finite = np.isfinite(expected)
    reference.assert_close(out[finite], expected[finite])


# ------------------------------------------------------------------ Keras' own layer checks


class KerasLayerTest(testing.TestCase):
    @parameterized.named_parameters(
        ("dense", dict(filters=5, kernel_size=3), (2, 8, 7, 3), (2, 6, 5, 5)),
        ("grouped_first", dict(filters=6, kernel_size=3, groups=3, padding="same",
                               data_format="channels_first"), (2, 6, 5, 7), (2, 6, 5, 7)),
        ("depthwise_dilated", dict(filters=8, kernel_size=3, groups=4, dilation_rate=2,
                                   activation="relu"), (2, 9, 9, 4), (2, 5, 5, 8)),
        ("no_bias_lora", dict(filters=4, kernel_size=2, use_bias=False, lora_rank=2),
         (2, 5, 5, 4), (2, 4, 4, 4)),
    )
    def test_run_layer_test(self, kwargs, input_shape, output_shape):
        lora = "lora_rank" in kwargs
        self.run_layer_test(
            fastconv.Conv2D,
            init_kwargs=kwargs,
            input_shape=input_shape,
            expected_output_shape=output_shape,
            expected_num_trainable_weights=(2 if lora else 1) + kwargs.get("use_bias", True),
            expected_num_non_trainable_weights=1 if lora else 0,
            expected_num_losses=0,
            supports_masking=False,
            run_training_check=True,
        )

    @parameterized.parameters(("valid",), ("same",))
    def test_expected_output(self, padding):
        x = _input((1, 5, 6, 2), 14)
        kernel = np.random.default_rng(15).standard_normal((3, 3, 2, 3)).astype("float32")
        layer = fastconv.Conv2D(3, 3, padding=padding, use_bias=False)
        layer.build(x.shape)
        layer.set_weights([kernel])
        self.assertAllClose(layer(x), reference.conv(x, kernel, padding=padding), atol=1e-4)


def test_depthwise_channels_first_bias_when_the_output_width_equals_channels():
    """The same trap for fastconv.DepthwiseConv2D: output channels (C * M = 6) = output width."""
    layer = fastconv.DepthwiseConv2D(3, depth_multiplier=2, padding="same",
                                     data_format="channels_first",
                                     bias_initializer=keras.initializers.RandomNormal(seed=1))
    x = np.random.default_rng(5).standard_normal((2, 3, 4, 6)).astype("float32")
    out = to_numpy(layer(x))
    kernel, bias = (to_numpy(w) for w in layer.weights)
    grouped = kernel.reshape(3, 3, 1, 6)  # output channel c * M + m reads input channel c
    expected = reference.conv(x, grouped, padding="same", data_format="channels_first")
    reference.assert_close(out, expected + bias.reshape(1, 6, 1, 1), 1e-4)


@pytest.mark.parametrize("width", [12, 21])
@pytest.mark.parametrize("use_bias", [False, True])
def test_depthwise_channels_first_rows_of_vectors(width, use_bias):
    """Depthwise 3x3 channels_first with rows of a (half) vector or more: the kernels' plane by
    plane path (no transposes), against the reference."""
    layer = fastconv.DepthwiseConv2D(3, padding="same", data_format="channels_first",
                                     use_bias=use_bias,
                                     bias_initializer=keras.initializers.RandomNormal(seed=2))
    x = np.random.default_rng(6).standard_normal((2, 5, 9, width)).astype("float32")
    out = to_numpy(layer(x))
    grouped = to_numpy(layer.kernel).reshape(3, 3, 1, 5)  # (KH, KW, C, 1) as 5 groups
    expected = reference.conv(x, grouped, padding="same", data_format="channels_first")
    if use_bias:
        expected = expected + to_numpy(layer.bias).reshape(1, 5, 1, 1)
    reference.assert_close(out, expected, 1e-4)


def test_a_subclass_convolution_op_is_honoured():
    """Like keras.layers.Conv2D, call() goes through an overridden convolution_op (then bias
    and activation as usual)."""

    class Doubled(fastconv.Conv2D):
        def convolution_op(self, inputs, kernel):
            return 2.0 * super().convolution_op(inputs, kernel)

    layer = Doubled(3, 3, padding="same", activation="relu",
                    bias_initializer=keras.initializers.RandomNormal(seed=2))
    x = np.random.default_rng(6).standard_normal((2, 5, 6, 2)).astype("float32")
    out = to_numpy(layer(x))
    kernel, bias = (to_numpy(w) for w in layer.weights)
    expected = np.maximum(2.0 * reference.conv(x, kernel, padding="same") + bias, 0.0)
    reference.assert_close(out, expected, 1e-4)


@pytest.mark.parametrize("kwargs, input_shape", LAYER_CASES[:6])
def test_plain_eager_calls_skip_keras_call_and_give_its_result(kwargs, input_shape, monkeypatch):
    """An eager call of a built layer on a tensor of its dtype runs `call` directly (Keras'
    Layer.__call__ costs 50-70 us) and gives what Keras' __call__ gives."""
    fast, _ = _pair(kwargs, input_shape)
    x = keras.ops.convert_to_tensor(_input(input_shape))
    keras_call = keras.layers.Layer.__call__
    entered = []

    def counting(self, *args, **kw):
        entered.append(self)
        return keras_call(self, *args, **kw)

    monkeypatch.setattr(keras.layers.Layer, "__call__", counting)
    out = to_numpy(fast(x))
    assert entered == []
    np.testing.assert_array_equal(out, to_numpy(keras_call(fast, x)))
    reference.assert_close(out, _reference(fast, x), 1e-4)
    fast(_input(input_shape, 2, np.float64))  # converted by Keras: its way
    assert entered == [fast]


def _message(call):
    with pytest.raises(Exception) as info:
        call()
    return type(info.value), str(info.value)


def test_calls_with_work_for_keras_go_through_keras():
    """Masks, activity regularizers and errors (wrong channels, an input too small for the
    kernel) behave as in Keras' own __call__, also for tensors that take the direct way."""
    fast = fastconv.Conv2D(3, 3, activity_regularizer=keras.regularizers.L2(0.01))
    fast.build((2, 5, 5, 2))
    x = keras.ops.convert_to_tensor(_input((2, 5, 5, 2)))
    fast(x)
    assert len(fast.losses) == 1
    activity = 0.01 * np.sum(_reference(fast, x) ** 2) / 2
    np.testing.assert_allclose(float(to_numpy(fast.losses[0])), activity, rtol=1e-4)

    plain = fastconv.Conv2D(3, 3)
    plain.build((2, 5, 5, 2))
    masked = keras.ops.convert_to_tensor(_input((2, 5, 5, 2)))
    keras.src.backend.set_keras_mask(masked, keras.ops.ones((2, 5, 5), "bool"))
    with pytest.warns(UserWarning, match="does not support masking"):
        plain(masked)

    wrong = keras.ops.convert_to_tensor(_input((2, 5, 5, 3)))
    small = keras.ops.convert_to_tensor(_input((2, 2, 5, 2)))
    for bad in (wrong, small):
        ours = _message(lambda: plain(bad))
        assert ours == _message(lambda: keras.layers.Layer.__call__(plain, bad))
        assert ours[0] is ValueError
    assert "is incompatible with the layer" in _message(lambda: plain(wrong))[1]


def test_a_subclass_without_super_init_gets_keras_error():
    class Forgot(fastconv.Conv2D):
        def __init__(self):
            pass

    with pytest.raises(RuntimeError, match="forgot to call `super"):
        Forgot()(keras.ops.convert_to_tensor(_input((1, 4, 4, 2))))


@pytest.mark.skipif(BACKEND != "torch", reason="torch modules' hooks")
def test_torch_module_hooks_run():
    import torch

    layer = fastconv.DepthwiseConv2D(3, padding="same")
    layer.build((1, 4, 4, 2))
    x = torch.ones((1, 4, 4, 2))
    seen = []
    handles = [layer.register_forward_pre_hook(lambda m, args: seen.append("pre")),
               layer.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))]
    layer(x)
    assert seen == ["pre", (1, 4, 4, 2)]
    for handle in handles:
        handle.remove()
    layer(x)
    assert len(seen) == 2


@pytest.mark.skipif(BACKEND != "torch", reason="torch's plans (TensorFlow's: test_tf_eager.py)")
@pytest.mark.parametrize("kwargs, input_shape", [LAYER_CASES[1], LAYER_CASES[3], LAYER_CASES[4]])
def test_torch_repeated_calls_run_the_kept_plan(kwargs, input_shape, monkeypatch):
    """The second eager call of a shape runs from the first call's plan (no forward_variables),
    with the same result and, through autograd, the reference's gradients; another dtype takes
    the general way."""
    import torch

    from fastconv.backends import torch as bridge

    made = []
    real = bridge.forward_variables
    monkeypatch.setattr(bridge, "forward_variables", lambda *a: made.append(1) or real(*a))
    fast, _ = _pair(kwargs, input_shape)
    x = torch.from_numpy(_input(input_shape)).requires_grad_(True)
    first = to_numpy(fast(x))
    y = fast(x)
    assert len(made) == 1
    np.testing.assert_array_equal(first, to_numpy(y))
    reference.assert_close(first, _reference(fast, x.detach()), 1e-4)
    if fast.activation in (None, keras.activations.linear):
        dy = _input(tuple(y.shape), 3)
        got = torch.autograd.grad(y, [x, fast.kernel.value], torch.from_numpy(dy))
        dx, dk = reference.grads(to_numpy(x.detach()), to_numpy(fast.kernel), dy, fast.strides,
                                 fast.padding, fast.dilation_rate, fast.data_format)
        reference.assert_close(to_numpy(got[0]), dx, 1e-4)
        reference.assert_close(to_numpy(got[1]), dk, 1e-4)
    fast(x.detach().double())  # cast by Keras: its way
    assert len(made) == 2


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's plans")
@pytest.mark.parametrize("kwargs, input_shape", [LAYER_CASES[1], LAYER_CASES[3], LAYER_CASES[4],
                                                 LAYER_CASES[6]])
def test_jax_repeated_calls_run_the_kept_plan(kwargs, input_shape, monkeypatch):
    """The second eager call of a shape runs from the first call's plan (no forward_variables),
    with the same result, and so do calls after the kernel is assigned (a new array: JAX's are
    immutable), with the new values; another dtype takes the general way; jax.grad (traced) has
    the reference's gradients."""
    import jax

    from fastconv.backends import jax as bridge

    made = []
    real = bridge.forward_variables
    monkeypatch.setattr(bridge, "forward_variables", lambda *a: made.append(1) or real(*a))
    fast, _ = _pair(kwargs, input_shape)
    x = jax.numpy.asarray(_input(input_shape))
    first = to_numpy(fast(x))
    assert len(made) == 1
    np.testing.assert_array_equal(to_numpy(fast(x)), first)
    assert len(made) == 1
    reference.assert_close(first, _reference(fast, x), 1e-4)

    fast.kernel.assign(_input(tuple(fast.kernel.shape), 5))
    reference.assert_close(to_numpy(fast(x)), _reference(fast, x), 1e-4)
    assert len(made) == 1
    fast(x.astype("float16"))  # cast by Keras: its way
    assert len(made) == 2

    if fast.activation in (None, keras.activations.linear):
        dy = _input(tuple(first.shape), 3)
        dx, dk = jax.grad(lambda a, k: (fast.stateless_call([k, *fast.trainable_variables[1:]],
                                                            [], a)[0] * dy).sum(),
                          argnums=(0, 1))(x, fast.kernel.value)
        ref_dx, ref_dk = reference.grads(_input(input_shape), to_numpy(fast.kernel), dy,
                                         fast.strides, fast.padding, fast.dilation_rate,
                                         fast.data_format)
        reference.assert_close(to_numpy(dx), ref_dx, 1e-4)
        reference.assert_close(to_numpy(dk), ref_dk, 1e-4)


@pytest.mark.skipif(BACKEND != "numpy", reason="numpy's plans")
@pytest.mark.parametrize("cls, kwargs, input_shape", [
    (fastconv.Conv2D, *LAYER_CASES[1]), (fastconv.Conv2D, *LAYER_CASES[3]),
    (fastconv.Conv2D, *LAYER_CASES[4]), (fastconv.Conv2D, *LAYER_CASES[6]),
    (fastconv.Conv2D, dict(filters=4, kernel_size=3, activation="relu6"), (2, 6, 7, 3)),
    (fastconv.Conv2D, dict(filters=7, kernel_size=1, activation="swish"), (3, 5, 6, 4)),
    (fastconv.DepthwiseConv2D, dict(kernel_size=3, depth_multiplier=2, padding="same",
                                    activation="relu"), (2, 7, 6, 3)),
], ids=str)
def test_numpy_repeated_calls_run_the_kept_plan(cls, kwargs, input_shape, monkeypatch):
    """numpy: the second call of a shape runs from the first call's plan (no
    forward_variables), with the same result, the activation computed by the kernels where
    they can; the kernel's array changed in place or assigned shows at the next call; other
    dtypes, non-contiguous inputs and LoRA give the reference's results."""
    from fastconv.backends import numpy as bridge

    made = []
    real = bridge.forward_variables
    monkeypatch.setattr(bridge, "forward_variables", lambda *a: made.append(1) or real(*a))
    keras.utils.set_random_seed(0)
    fast = cls(**kwargs, bias_initializer="random_normal")
    fast.build(input_shape)
    x = _input(input_shape)
    first = fast(x)
    assert len(made) == 1
    np.testing.assert_array_equal(fast(x), first)
    assert len(made) == 1
    reference.assert_close(first, _reference(fast, x), 1e-4)

    fast.kernel.value[...] *= -0.5  # in place: the plan holds the array, not its values
    reference.assert_close(fast(x), _reference(fast, x), 1e-4)
    fast.kernel.assign(_input(tuple(fast.kernel.shape), 5))  # a new array: a new plan
    reference.assert_close(fast(x), _reference(fast, x), 1e-4)
    assert len(made) == 2
    reference.assert_close(fast(np.asfortranarray(x)[:, ::-1][:, ::-1]), _reference(fast, x),
                           1e-4)
    assert len(made) == 2
    reference.assert_close(fast(x.astype(np.float64)), _reference(fast, x), 1e-4)  # cast
    assert len(made) == 3

    if hasattr(fast, "enable_lora"):  # (Keras' DepthwiseConv2D has no LoRA)
        fast.enable_lora(2)
        fast.lora_kernel_b.assign(_input(tuple(fast.lora_kernel_b.shape), 6))
        for _ in range(2):
            reference.assert_close(fast(x), _reference(fast, x), 1e-4)
    double = cls(**kwargs, dtype="float64")
    double.build(input_shape)
    double.set_weights(fast.get_weights()[:2] if fast.use_bias else fast.get_weights()[:1])
    reference.assert_close(double(x), _reference(double, x), 1e-4)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="TensorFlow's: test_tf_eager.py")
@pytest.mark.parametrize("activation", ["relu", "relu6", "swish", "tanh"])
@pytest.mark.parametrize("cls, kwargs, input_shape", [
    (fastconv.Conv2D, dict(filters=5, kernel_size=3, padding="same"), (2, 6, 7, 4)),
    (fastconv.Conv2D, dict(filters=6, kernel_size=3, groups=3, strides=2), (2, 9, 8, 6)),
    (fastconv.Conv2D, dict(filters=4, kernel_size=3, data_format="channels_first"),
     (2, 3, 7, 6)),
    (fastconv.DepthwiseConv2D, dict(kernel_size=3, padding="same"), (2, 6, 7, 5)),
], ids=str)
def test_eager_calls_with_an_activation(cls, kwargs, input_shape, activation):
    """Eager calls (the first, then the planned ones) with an activation the kernels can
    compute (relu, relu6, swish: channels_last float32, nothing to differentiate on torch) or
    not (tanh) give the reference's results; on torch with gradients too, whose dx and dk are
    the reference's through the activation."""
    keras.utils.set_random_seed(0)
    fast = cls(**kwargs, activation=activation, bias_initializer="random_normal")
    fast.build(input_shape)
    x = _input(input_shape)
    expected = _reference(fast, x)
    for _ in range(3):
        reference.assert_close(to_numpy(fast(keras.ops.convert_to_tensor(x))), expected, 1e-4)
    if BACKEND == "torch":
        import torch

        with torch.no_grad():
            for _ in range(2):
                reference.assert_close(to_numpy(fast(torch.from_numpy(x))), expected, 1e-4)
        xt = torch.from_numpy(x).requires_grad_(True)
        y = fast(xt)
        reference.assert_close(to_numpy(y.detach()), expected, 1e-4)
        dy = torch.from_numpy(_input(tuple(y.shape), 3))
        dx, dk = torch.autograd.grad(y, [xt, fast.kernel.value], dy)
        # the reference's through the activation: d act(z) / dz at the reference's z
        act = {"relu": lambda z: (z > 0) * 1.0, "relu6": lambda z: ((z > 0) & (z < 6)) * 1.0,
               "swish": lambda z: (1 + np.exp(-z) + z * np.exp(-z)) / (1 + np.exp(-z)) ** 2,
               "tanh": lambda z: 1 - np.tanh(z) ** 2}[activation]
        linear = cls(**kwargs, bias_initializer="random_normal")
        linear.build(input_shape)
        linear.set_weights(fast.get_weights())
        z = _reference(linear, x)
        ref_dx, ref_dk = reference.grads(x.astype(np.float64), _conv_kernel(fast),
                                         to_numpy(dy).astype(np.float64) * act(z),
                                         fast.strides, fast.padding, fast.dilation_rate,
                                         fast.data_format)
        reference.assert_close(to_numpy(dx), ref_dx, 1e-4)
        reference.assert_close(to_numpy(dk).reshape(ref_dk.shape), ref_dk, 1e-4)


@pytest.mark.skipif(BACKEND not in ("torch", "jax", "numpy"), reason="plans "
                    "(TensorFlow's: test_tf_eager.py)")
def test_plans_give_way_to_hooks_scopes_and_subclasses():
    """After a planned call: (torch) a module hook registered later runs; stateless_call uses
    its values (of another dtype: the general way); (JAX) a plan keeps no replaced kernel array
    alive; a new kernel variable is used; a subclass's own call always runs."""
    import gc
    import weakref

    layer = fastconv.DepthwiseConv2D(3, padding="same",
                                     bias_initializer=keras.initializers.RandomNormal(seed=3))
    x = keras.ops.convert_to_tensor(_input((2, 5, 5, 3)))
    layer(x)
    layer(x)
    assert layer.__dict__.get("_fastconv_plans")
    if BACKEND == "torch":
        seen = []
        handle = layer.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
        layer(x)
        handle.remove()
        assert seen == [(2, 5, 5, 3)]

    values = [np.full(v.shape, 0.5, np.float32) for v in layer.trainable_variables]
    expected = reference.conv(_input((2, 5, 5, 3)), values[0].reshape(3, 3, 1, 3),
                              padding="same") + 0.5
    for dtype in (np.float32, np.float16):
        out, _ = layer.stateless_call(
            [keras.ops.convert_to_tensor(v.astype(dtype)) for v in values], [], x)
        reference.assert_close(to_numpy(out), expected, 1e-4)

    if BACKEND == "jax":
        old = weakref.ref(layer.kernel.value)
        layer.kernel.assign(np.zeros(layer.kernel.shape, np.float32))
        gc.collect()
        assert old() is None
        reference.assert_close(to_numpy(layer(x)),
                               np.broadcast_to(to_numpy(layer.bias), (2, 5, 5, 3)), 1e-6)

    layer._tracker.unlock()  # (as Keras' quantize() does)
    new = _input((3, 3, 3, 1), 4)
    layer.kernel = layer.add_weight(shape=new.shape, initializer=keras.initializers.Constant(new))
    expected = reference.conv(_input((2, 5, 5, 3)), new.reshape(3, 3, 1, 3), padding="same")
    reference.assert_close(to_numpy(layer(x)), expected + to_numpy(layer.bias), 1e-4)

    class Doubled(fastconv.Conv2D):
        def call(self, inputs):
            return 2.0 * super().call(inputs)

    doubled = Doubled(2, 3)
    doubled.build((2, 5, 5, 3))
    first = to_numpy(doubled(x))
    assert not doubled.__dict__.get("_fastconv_plans")
    reference.assert_close(to_numpy(doubled(x)), first, 1e-6)
    reference.assert_close(first, 2.0 * _reference(doubled, x), 1e-4)
