"""fastconv.DepthwiseConv2D, fastconv.convert / revert on user and keras.applications models,
and standalone export. One pytest process per backend (see conftest.py).

On TensorFlow no Keras grouped convolution runs in this process (DESIGN.md): Keras'
DepthwiseConv2D (tf.nn.depthwise_conv2d) is fine, Conv2D(groups > 1) only appears off TensorFlow.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import BACKEND, autodiff, keras_conv_runs, only_numpy, to_numpy

import keras  # noqa: E402  (after conftest: torch before keras)

import fastconv  # noqa: E402
from fastconv import _dispatch  # noqa: E402
from reference import assert_close, conv as ref_conv, grads as ref_grads  # noqa: E402

if BACKEND == "tensorflow":
    import tensorflow as tf
elif BACKEND == "jax":
    import jax
    import jax.numpy as jnp
elif BACKEND == "torch":
    import torch

TRAINS = BACKEND != "numpy"
needs_autodiff = pytest.mark.skipif(not TRAINS, reason="the numpy backend only predicts")


# ------------------------------------------------------------------------------------------------
# An independent depthwise reference: one single-channel convolution per (channel, multiplier).

def _nhwc(a, data_format):
    return a.transpose(0, 2, 3, 1) if data_format == "channels_first" else a


def _from_nhwc(a, data_format):
    return a.transpose(0, 3, 1, 2) if data_format == "channels_first" else a


def depthwise_reference(x, w, strides, padding, dilation, data_format):
    x = _nhwc(np.asarray(x, np.float64), data_format)
    c, m = w.shape[2], w.shape[3]
    outs = [ref_conv(x[..., i:i + 1], w[:, :, i:i + 1, j:j + 1], strides, padding, dilation)
            for i in range(c) for j in range(m)]  # output channel i * M + j
    return _from_nhwc(np.concatenate(outs, axis=-1), data_format)


def depthwise_reference_grads(x, w, dy, strides, padding, dilation, data_format):
    x = _nhwc(np.asarray(x, np.float64), data_format)
    dy = _nhwc(np.asarray(dy, np.float64), data_format)
    c, m = w.shape[2], w.shape[3]
    dx, dw = np.zeros_like(x), np.zeros(w.shape)
    for i in range(c):
        for j in range(m):
            gx, gw = ref_grads(x[..., i:i + 1], w[:, :, i:i + 1, j:j + 1],
                               dy[..., i * m + j:i * m + j + 1], strides, padding, dilation)
            dx[..., i:i + 1] += gx
            dw[:, :, i:i + 1, j:j + 1] = gw
    return _from_nhwc(dx, data_format), dw


class CountingKernels:
    """Counts calls of the compiled forward kernel (looked up at each call by the host side of
    every bridge, or run by XLA's custom call under jax.jit): proof that fastconv ran."""

    def __init__(self, monkeypatch):
        self.host_calls = 0
        self.ffi_start = _ffi_calls()
        real = _dispatch.kernels.forward

        def forward(*args, **kwargs):
            self.host_calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(_dispatch.kernels, "forward", forward)

    @property
    def calls(self):
        return self.host_calls + _ffi_calls() - self.ffi_start


def _ffi_calls():
    """Kernel calls made by the C++ bridges: XLA custom calls, fastconv's TensorFlow ops."""
    total = 0
    try:
        from fastconv import _xla_ffi

        total += _xla_ffi.calls()
    except ImportError:
        pass
    if BACKEND == "tensorflow":
        from fastconv.backends import tensorflow as bridge

        total += 0 if bridge._OPS is None else bridge._OPS.calls()
    return total


@pytest.fixture
def kernel_calls(monkeypatch):
    return CountingKernels(monkeypatch)


# ------------------------------------------------------------------------------------------------
# fastconv.DepthwiseConv2D

# (n, h, w, c, k, multiplier, strides, dilation, padding, data_format)
DEPTHWISE_CASES = [
    (2, 9, 9, 4, (3, 3), 1, 1, 1, "same", "channels_last"),
    (2, 10, 8, 5, (3, 3), 2, 1, 1, "valid", "channels_last"),
    (1, 12, 12, 3, (5, 5), 3, 2, 1, "same", "channels_last"),
    (2, 11, 9, 6, (3, 2), 2, (2, 1), 1, "valid", "channels_last"),
    (1, 13, 13, 4, (3, 3), 1, 1, 2, "same", "channels_last"),
    (2, 8, 10, 3, (3, 3), 2, 1, 1, "same", "channels_first"),
    (2, 9, 9, 7, (1, 1), 4, 2, 1, "valid", "channels_first"),
    (1, 5, 7, 1, (3, 3), 1, 1, 1, "same", "channels_last"),  # one channel: a plain conv
    (0, 6, 6, 2, (3, 3), 2, 1, 1, "same", "channels_last"),  # empty batch
]


def _depthwise_case(case, seed=0, use_bias=True):
    n, h, w, c, k, m, strides, dilation, padding, data_format = case
    rng = np.random.default_rng(seed)
    shape = (n, h, w, c) if data_format == "channels_last" else (n, c, h, w)
    x = rng.normal(size=shape).astype("float32")
    kwargs = dict(kernel_size=k, depth_multiplier=m, strides=strides, dilation_rate=dilation,
                  padding=padding, data_format=data_format, use_bias=use_bias)
    layer = fastconv.DepthwiseConv2D(**kwargs)
    layer.build(shape)
    kernel = rng.normal(size=layer.kernel.shape).astype("float32")
    weights = [kernel] + ([rng.normal(size=(c * m,)).astype("float32")] if use_bias else [])
    layer.set_weights(weights)
    return x, layer, kwargs, weights


def _strides_and_dilation(strides, dilation):
    return max(np.atleast_1d(strides)) > 1 and max(np.atleast_1d(dilation)) > 1


@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=str)
def test_depthwise_matches_reference_and_keras(case, kernel_calls):
    x, layer, kwargs, (kernel, bias) = _depthwise_case(case)
    strides, dilation = layer.strides, layer.dilation_rate
    out = to_numpy(layer(x))
    expected = depthwise_reference(x, kernel, strides, layer.padding, dilation, layer.data_format)
    channel_axis = -1 if layer.data_format == "channels_last" else 1
    expected = expected + np.expand_dims(bias, [a for a in range(4) if a != channel_axis % 4])
    assert_close(out, expected, name="depthwise forward")
    if len(x):  # (JAX skips a callback whose result is empty)
        assert kernel_calls.calls == 1, "fastconv's kernels did not serve the layer"

    if not len(x):
        return  # Keras' own DepthwiseConv2D fails on an empty batch (TF, JAX): nothing to compare
    if not keras_conv_runs(layer.data_format, strides=strides, dilation=dilation, depthwise=True):
        return
    keras_layer = keras.layers.DepthwiseConv2D(**kwargs)
    keras_layer.build(x.shape)
    keras_layer.set_weights([kernel, bias])
    assert_close(out, to_numpy(keras_layer(x)), name="vs keras.layers.DepthwiseConv2D")


def test_depthwise_follows_new_weights_between_calls():
    """The kernel seen as a grouped one (kept between eager calls on JAX) follows every change
    of the variable: set_weights, assign, and a tensor of this backend as input."""
    x, layer, _, (kernel, bias) = _depthwise_case(DEPTHWISE_CASES[0])
    xt = keras.ops.convert_to_tensor(x)
    for step in range(3):
        out = to_numpy(layer(xt))
        expected = depthwise_reference(x, kernel, layer.strides, layer.padding,
                                       layer.dilation_rate, layer.data_format) + bias
        assert_close(out, expected, name=f"depthwise forward, weights {step}")
        kernel = kernel * -0.5 + 0.25
        if step == 0:
            layer.set_weights([kernel, bias])
        else:
            layer.kernel.assign(kernel)


@needs_autodiff
@pytest.mark.parametrize("case", DEPTHWISE_CASES[:-1], ids=str)
def test_depthwise_gradients(case):
    x, layer, _, (kernel, bias) = _depthwise_case(case, seed=1)
    out_shape = layer.compute_output_shape(x.shape)
    dy = np.random.default_rng(2).normal(size=out_shape).astype("float32")

    def loss(x, k, b):
        y, _ = layer.stateless_call([k, b], [], x)
        return keras.ops.sum(y * keras.ops.convert_to_tensor(dy))

    dx, dk, db = autodiff(loss, x, kernel, bias)
    ex, ek = depthwise_reference_grads(x, kernel, dy, layer.strides, layer.padding,
                                       layer.dilation_rate, layer.data_format)
    channel_axis = -1 if layer.data_format == "channels_last" else 1
    eb = dy.sum(axis=tuple(a for a in range(4) if a != channel_axis % 4))
    assert_close(dx, ex, name="d input")
    assert_close(dk, ek, name="d kernel")
    assert_close(db, eb, name="d bias")


@st.composite
def depthwise_configs(draw):
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = 1 if max(strides) > 1 else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = draw(st.sampled_from(["same", "valid"]))
    span = [(k[i] - 1) * np.atleast_1d(dilation)[-1 if i else 0] + 1 for i in range(2)]
    low = 1 if padding == "same" else max(span)
    h, w = draw(st.integers(low, low + 8)), draw(st.integers(low, low + 8))
    return (draw(st.integers(1, 2)), h, w, draw(st.integers(1, 9)), k, draw(st.integers(1, 3)),
            strides, dilation, padding, draw(st.sampled_from(["channels_last", "channels_first"])))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=depthwise_configs(), seed=st.integers(0, 2**16))
def test_depthwise_hypothesis(case, seed):
    x, layer, _, (kernel, bias) = _depthwise_case(case, seed=seed)
    expected = depthwise_reference(x, kernel, layer.strides, layer.padding, layer.dilation_rate,
                                   layer.data_format)
    channel_axis = -1 if layer.data_format == "channels_last" else 1
    expected = expected + np.expand_dims(bias, [a for a in range(4) if a != channel_axis % 4])
    assert_close(to_numpy(layer(x)), expected, name=f"depthwise {case}")


def test_depthwise_config_matches_keras():
    kwargs = dict(kernel_size=(3, 5), depth_multiplier=3, strides=2, padding="same",
                  activation="relu", use_bias=False, name="dw")
    ours, theirs = fastconv.DepthwiseConv2D(**kwargs), keras.layers.DepthwiseConv2D(**kwargs)
    assert ours.get_config() == theirs.get_config()
    clone = fastconv.DepthwiseConv2D.from_config(ours.get_config())
    assert type(clone) is fastconv.DepthwiseConv2D and clone.get_config() == ours.get_config()
    assert keras.saving.get_registered_name(fastconv.DepthwiseConv2D) == "fastconv>DepthwiseConv2D"
    ours.build((None, 8, 8, 4))
    assert tuple(ours.kernel.shape) == (3, 5, 4, 3)  # Keras' own layout: (KH, KW, C, M)
    assert ours.supports_jit == (BACKEND != "tensorflow")


def test_depthwise_errors_are_keras_errors():
    with pytest.raises(ValueError, match="depth_multiplier"):
        fastconv.DepthwiseConv2D(3, depth_multiplier=0)
    with pytest.raises(ValueError, match="kernel_size"):
        fastconv.DepthwiseConv2D((0, 3))
    layer = fastconv.DepthwiseConv2D(5)
    with pytest.raises(ValueError):
        layer(np.zeros((1, 3, 3, 2), "float32"))  # kernel larger than the input, "valid"


def test_depthwise_integer_input_is_cast():
    x = np.arange(2 * 6 * 6 * 3).reshape(2, 6, 6, 3) % 7
    layer = fastconv.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False)
    out = to_numpy(layer(x))
    expected = depthwise_reference(x, to_numpy(layer.kernel), (1, 1), "same", (1, 1),
                                   "channels_last")
    assert out.dtype == np.float32
    assert_close(out, expected)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_depthwise_dtype_policies(policy):
    """The kernel is reshaped per call outside keras.ops (every backend): it must still be the
    variable autocast to the compute dtype, as Keras' own layer reads it."""
    x = np.random.default_rng(3).normal(size=(2, 7, 6, 4))
    kwargs = dict(kernel_size=3, depth_multiplier=2, padding="same", dtype=policy)
    fast, ref = fastconv.DepthwiseConv2D(**kwargs), keras.layers.DepthwiseConv2D(**kwargs)
    fast.build(x.shape)
    ref.build(x.shape)
    weights = [np.random.default_rng(4).normal(size=w.shape).astype("float32")
               for w in ref.get_weights()]
    fast.set_weights(weights)
    ref.set_weights(weights)
    out, theirs = fast(x), ref(x)
    compute = keras.dtype_policies.get(policy).compute_dtype
    assert keras.backend.standardize_dtype(out.dtype) == compute
    assert theirs.dtype == out.dtype
    rtol = 1e-4 if policy == "float32" else 1e-2
    out = to_numpy(keras.ops.cast(out, "float32"))
    assert_close(out, to_numpy(keras.ops.cast(theirs, "float32")), rtol=rtol)


# ------------------------------------------------------------------------------------------------
# convert / revert on user models

@keras.saving.register_keras_serializable(package="test_convert")
class ConvBlock(keras.layers.Layer):
    """A subclassed layer holding Keras convolutions (converted in place inside the clone)."""

    def __init__(self, filters=4, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = keras.layers.Conv2D(filters, 3, padding="same", name="inner_conv")
        self.depthwise = keras.layers.DepthwiseConv2D(3, padding="same", name="inner_dw")

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.depthwise.build(self.conv.compute_output_shape(input_shape))

    def call(self, x):
        return self.depthwise(keras.ops.relu(self.conv(x)))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="test_convert")
class MyConv2D(keras.layers.Conv2D):
    """A user subclass of Conv2D: not Keras' class, so it stays as it is."""


def mixed_model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12, 12, 3), name="image")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, strides=2, name="dw1")(h)
    if BACKEND != "tensorflow":  # Keras' grouped conv must not run on TF (see module docstring)
        h = keras.layers.Conv2D(8, 1, groups=4, name="grouped")(h)
    inner = keras.Sequential([keras.layers.Conv2D(6, 3, padding="same", name="seq_conv"),
                              keras.layers.BatchNormalization(name="seq_bn")], name="seq")
    h = inner(h)
    sub_in = keras.Input((None, None, 6))
    sub_out = keras.layers.DepthwiseConv2D(3, padding="same", name="sub_dw")(sub_in)
    h = keras.Model(sub_in, sub_out, name="sub")(h)
    h = ConvBlock(6, name="block")(h)
    h = MyConv2D(6, 1, name="mine")(h)
    h = keras.layers.SeparableConv2D(6, 3, padding="same", name="sep")(h)
    h = keras.layers.Conv2DTranspose(4, 3, strides=2, name="tconv")(h)
    h3 = keras.layers.Reshape((-1, 4), name="to_seq")(h)
    h3 = keras.layers.Conv1D(4, 3, name="c1d")(h3)
    v = keras.layers.Reshape((3, 3, 4, 1))(keras.layers.AveragePooling2D(3)(h))
    v = keras.layers.Conv3D(2, 2, name="c3d")(v)
    out = keras.layers.Concatenate()([keras.layers.Flatten()(h3), keras.layers.Flatten()(v)])
    out = keras.layers.Dense(5, name="head")(out)
    model = keras.Model(inp, out, name="mixed")
    # Non-trivial BatchNormalization statistics, so that copying them matters.
    bn = model.get_layer("seq").get_layer("seq_bn")
    bn.set_weights([w + np.float32(0.3) for w in bn.get_weights()])
    return model


def _all_layers(model, prefix=""):
    """{"outer/inner/name": layer} for every layer nested in model."""
    layers = {}
    for layer in model._flatten_layers(include_self=False, recursive=False):
        if isinstance(layer, keras.layers.InputLayer):
            continue  # clone_model renames the input layers of nested models (no weights)
        layers[prefix + layer.name] = layer
        layers.update(_all_layers(layer, prefix + layer.name + "/"))
    return layers


def _images(shape=(3, 12, 12, 3), seed=1):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def test_convert_functional_model(kernel_calls):
    model = mixed_model()
    before = {path: type(layer) for path, layer in _all_layers(model).items()}
    converted = fastconv.convert(model)
    assert converted is not model and converted.name == model.name

    old, new = _all_layers(model), _all_layers(converted)
    assert sorted(old) == sorted(new), "layer names (paths) must be kept"
    swapped = {keras.layers.Conv2D: fastconv.Conv2D,
               keras.layers.DepthwiseConv2D: fastconv.DepthwiseConv2D,
               keras.layers.BatchNormalization: fastconv.layers.BatchNormalization}
    for path, layer in old.items():
        assert type(layer) is before[path], f"the original's {path} was modified"
        assert type(new[path]) is swapped.get(type(layer), type(layer)), path
        for a, b in zip(layer.weights, new[path].weights):
            np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=path)
        assert len(layer.weights) == len(new[path].weights), path
    expected_twins = 6 + (BACKEND != "tensorflow")  # convolutions; and 1 normalization
    assert sum(type(layer).__module__.startswith("fastconv") for layer in new.values()) \
        == expected_twins + 1
    assert isinstance(new["mine"], MyConv2D) and isinstance(new["sep"],
                                                                  keras.layers.SeparableConv2D)

    x = _images()
    expected = to_numpy(model(x))
    calls = kernel_calls.calls
    assert_close(to_numpy(converted(x)), expected, name="converted")
    assert kernel_calls.calls - calls == expected_twins
    assert_close(to_numpy(converted.predict(x, verbose=0)), expected, name="converted.predict")

    reverted = fastconv.revert(converted)
    assert not any(type(layer).__module__.startswith("fastconv")
                   for layer in reverted._flatten_layers())
    calls = kernel_calls.calls
    assert_close(to_numpy(reverted(x)), expected, name="reverted")
    assert kernel_calls.calls == calls


def test_convert_model_with_operations_on_keras_tensors():
    # A functional model may apply operations to Keras tensors (`x + y`, `keras.ops.*`), as
    # keras.applications' ConvNeXt does: clone_model clones them too, and they hold no weights
    # (convert raised AttributeError on them).
    inp = keras.Input((8, 8, 4))
    h = keras.layers.Conv2D(4, 3, padding="same", groups=4, name="dw")(inp)
    h = keras.ops.add(h, inp) * 2.0
    out = keras.layers.Conv2D(3, 1, name="pw")(h)
    model = keras.Model(inp, out)
    converted = fastconv.convert(model)
    assert [type(converted.get_layer(n)) for n in ("dw", "pw")] == [fastconv.Conv2D] * 2
    x = _images((2, 8, 8, 4))
    expected = to_numpy(model(x))
    assert_close(to_numpy(converted(x)), expected, name="converted")
    reverted = fastconv.revert(converted)
    assert [type(reverted.get_layer(n)) for n in ("dw", "pw")] == [keras.layers.Conv2D] * 2
    assert_close(to_numpy(reverted(x)), expected, name="reverted")


def test_convert_sequential_and_single_layer():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((10, 10, 2)),
                              keras.layers.Conv2D(4, 3, activation="relu", name="a"),
                              keras.Sequential([keras.layers.DepthwiseConv2D(3, name="b")],
                                               name="inner"),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3)])
    converted = fastconv.convert(model)
    assert isinstance(converted, keras.Sequential)
    assert type(converted.get_layer("a")) is fastconv.Conv2D
    assert type(converted.get_layer("inner").get_layer("b")) is fastconv.DepthwiseConv2D
    x = _images((2, 10, 10, 2))
    assert_close(to_numpy(converted(x)), to_numpy(model(x)))

    layer = model.get_layer("a")
    twin = fastconv.convert(layer)
    assert type(twin) is fastconv.Conv2D and twin.name == "a"
    assert_close(to_numpy(twin(x)), to_numpy(layer(x)))
    assert type(fastconv.revert(twin)) is keras.layers.Conv2D
    unbuilt = fastconv.convert(keras.layers.DepthwiseConv2D(3, depth_multiplier=2))
    assert type(unbuilt) is fastconv.DepthwiseConv2D and unbuilt.depth_multiplier == 2


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(6, 3, strides=2, name="conv")
        self.blocks = [keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2),
                       keras.layers.Conv2D(4, 1)]
        self.head = keras.layers.Dense(2)

    def call(self, x):
        h = self.conv(x)
        for block in self.blocks:
            h = block(h)
        return self.head(keras.ops.mean(h, axis=(1, 2)))


def test_convert_subclassed_model_in_place(kernel_calls):
    keras.utils.set_random_seed(4)
    model = Subclassed()
    x = _images((2, 11, 11, 3))
    expected = to_numpy(model(x))
    model.compile(optimizer="sgd", loss="mse")
    model.predict(x, verbose=0)  # traces a predict function with Keras' convolutions
    weights = [id(v) for v in model.weights]
    assert fastconv.convert(model) is model
    assert [type(layer) for layer in (model.conv, *model.blocks)] == [
        fastconv.Conv2D, fastconv.DepthwiseConv2D, fastconv.Conv2D]
    assert [id(v) for v in model.weights] == weights, "in place: the same variables"
    calls = kernel_calls.calls
    assert_close(to_numpy(model.predict(x, verbose=0)), expected)
    assert kernel_calls.calls > calls, "predict still ran the function traced before convert"
    if TRAINS:
        model.fit(x, np.zeros((2, 2), "float32"), epochs=1, verbose=0)
        assert not np.allclose(to_numpy(model(x)), expected)
    assert fastconv.revert(model) is model and type(model.conv) is keras.layers.Conv2D


@pytest.mark.parametrize("bad", [None, "model", np.zeros(3)])
def test_convert_rejects_non_models(bad):
    for fn in (fastconv.convert, fastconv.revert):
        with pytest.raises(TypeError, match="model="):
            fn(bad)


@needs_autodiff
def test_converted_model_trains_like_keras():
    model = mixed_model(seed=5)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    converted = fastconv.convert(model)
    assert converted.compiled and converted.get_compile_config() == model.get_compile_config()
    x, y = _images(seed=6), np.random.default_rng(7).normal(size=(3, 5)).astype("float32")
    for _ in range(2):
        expected = model.train_on_batch(x, y)
        loss = converted.train_on_batch(x, y)
        np.testing.assert_allclose(loss, expected, rtol=1e-4)
    for a, b in zip(model.weights, converted.weights):
        # atol: a bias followed by BatchNormalization gets a zero gradient (rounding noise).
        np.testing.assert_allclose(to_numpy(b), to_numpy(a), rtol=1e-4, atol=1e-6,
                                   err_msg=a.path)
    changed = [not np.array_equal(to_numpy(a), to_numpy(b))
               for a, b in zip(model.weights, mixed_model(seed=5).weights)]
    assert sum(changed) >= len(changed) // 2, "the training steps did not train"


def test_converted_model_save_load(tmp_path):
    converted = fastconv.convert(mixed_model(seed=8))
    path = tmp_path / "m.keras"
    converted.save(path)
    loaded = keras.models.load_model(path)
    types = {p: type(layer) for p, layer in _all_layers(converted).items()}
    # A subclassed layer rebuilds its sublayers in __init__: Keras' classes again after loading.
    types["block/inner_conv"] = keras.layers.Conv2D
    types["block/inner_dw"] = keras.layers.DepthwiseConv2D
    assert {p: type(layer) for p, layer in _all_layers(loaded).items()} == types
    x = _images(seed=9)
    assert_close(to_numpy(loaded(x)), to_numpy(converted(x)))
    again = fastconv.convert(loaded)
    assert {p: type(layer) for p, layer in _all_layers(again).items()} == \
        {p: type(layer) for p, layer in _all_layers(converted).items()}
    assert_close(to_numpy(again(x)), to_numpy(converted(x)))


# ------------------------------------------------------------------------------------------------
# keras.applications (weights=None, small inputs: these tests must stay fast)
#
# One function does the work and returns plain numbers, so that on JAX it can run in a child
# process with XLA's backend optimisation off: building an application there compiles one small
# XLA program per weight shape (30-70 s per model on this machine otherwise, 2-3x less at -O0).

APPS = ["MobileNetV2", "EfficientNetB0", "ResNet50"]
APP_SIZE = 64


def check_application(name, size=APP_SIZE):
    """Build `name`, convert it, compare predictions, train a step, save/load: measurements."""
    keras.utils.set_random_seed(10)
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None)
    # Random BatchNormalization statistics: random-init models otherwise shrink the signal to
    # ~1e-10 at the logits, which would hide errors.
    rng = np.random.default_rng(11)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                               rng.normal(0, 0.1, beta.shape).astype("float32"),
                               rng.normal(0, 0.1, mean.shape).astype("float32"),
                               rng.uniform(0.5, 1.5, var.shape).astype("float32")])
    converted = fastconv.convert(model)
    x = np.random.default_rng(12).uniform(0, 255, (2, size, size, 3)).astype("float32")

    def count(m, cls):
        return sum(type(layer) is cls for layer in m._flatten_layers())

    result = {"keras": [count(model, keras.layers.Conv2D),
                        count(model, keras.layers.DepthwiseConv2D)],
              "converted_keras": [count(converted, keras.layers.Conv2D),
                                  count(converted, keras.layers.DepthwiseConv2D)],
              "converted_fastconv": [count(converted, fastconv.Conv2D),
                                     count(converted, fastconv.DepthwiseConv2D)]}
    expected = to_numpy(model(x)).astype(np.float64)
    calls, real, ffi_start = [0], _dispatch.kernels.forward, _ffi_calls()

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    _dispatch.kernels.forward = counting
    try:
        out = to_numpy(converted(x))
    finally:
        _dispatch.kernels.forward = real
    result["expected_max"] = float(np.abs(expected).max())
    result["predict_err"] = float(np.abs(out - expected).max() / np.abs(expected).max())
    result["kernel_calls"] = calls[0] + _ffi_calls() - ffi_start

    # On JAX, compiling a train step costs 20-40 s per application here: MobileNetV2 (dense and
    # depthwise layers) stands for the three.
    if TRAINS and (BACKEND != "jax" or name == "MobileNetV2"):
        y = np.arange(len(x)) % 10
        convs = [layer.kernel for layer in converted._flatten_layers()
                 if type(layer) in (fastconv.Conv2D, fastconv.DepthwiseConv2D)]
        before = [to_numpy(v) for v in convs]
        converted.compile(optimizer=keras.optimizers.SGD(1e-3),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        result["loss"] = float(converted.train_on_batch(x, y))
        result["kernels"] = len(convs)
        result["kernels_moved"] = sum(not np.array_equal(b, to_numpy(v))
                                      for b, v in zip(before, convs))

    if name == "MobileNetV2":  # one application is enough for the .keras round trip (time)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            converted.save(os.path.join(tmp, "app.keras"))
            loaded = keras.models.load_model(os.path.join(tmp, "app.keras"))
        result["reloaded_types"] = [type(loaded.get_layer("Conv1")).__name__,
                                    type(loaded.get_layer("expanded_conv_depthwise")).__module__]
        now = to_numpy(converted(x))
        result["reload_err"] = float(np.abs(to_numpy(loaded(x)) - now).max() / np.abs(now).max())
    return result


@pytest.fixture(scope="module")
def jax_apps(tmp_path_factory):
    """On JAX, all applications checked in one child process: one JAX start-up, and the small
    XLA programs that build weights of shapes the models share compiled once."""
    out = tmp_path_factory.mktemp("app") / "result.json"
    env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS="--xla_backend_optimization_level=0")
    done = subprocess.run([sys.executable, __file__, str(out), *APPS], env=env,
                          capture_output=True, text=True, timeout=900,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module", params=APPS)
def app(request):
    if BACKEND != "jax":
        return request.param, check_application(request.param)
    return request.param, request.getfixturevalue("jax_apps")[request.param]


def test_application_converts_and_predicts_like_keras(app):
    name, r = app
    assert r["converted_keras"] == [0, 0], "a Keras convolution was left unconverted"
    assert r["converted_fastconv"] == r["keras"] and r["keras"][0] > 0
    if name != "ResNet50":
        assert r["keras"][1] > 0
    assert r["expected_max"] > 1e-3
    assert r["predict_err"] <= 1e-4, f"{name}: logits differ by {r['predict_err']:.2g} (relative)"
    assert r["kernel_calls"] == sum(r["converted_fastconv"]), "not every layer ran fastconv"


@needs_autodiff
def test_application_train_step(app):
    name, r = app
    if "loss" not in r:
        pytest.skip("on JAX, MobileNetV2 alone is trained (compile time)")
    assert np.isfinite(r["loss"])
    assert r["kernels"] == sum(r["keras"]) and r["kernels_moved"] == r["kernels"], \
        "some convolution kernels received no gradient"


def test_application_save_load(app):
    name, r = app
    if name != "MobileNetV2":
        pytest.skip("one application is enough for the .keras round trip (time)")
    assert r["reloaded_types"] == ["Conv2D", "fastconv.layers"]
    assert r["reload_err"] <= 1e-6

# Export: a standalone artifact, served where fastconv cannot be imported

LOADER = textwrap.dedent("""
    import importlib.abc, json, sys
    class NoFastconv(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "fastconv" or name.startswith("fastconv."):
                raise ImportError("fastconv is not installed here")
    sys.meta_path.insert(0, NoFastconv())
    import numpy as np
    path, x = sys.argv[1], np.load(sys.argv[2])
    if path.endswith(".pt2"):
        import torch
        module = torch.export.load(path).module()
        out = np.concatenate([module(torch.from_numpy(x[i:i + 1])).detach().numpy()
                              for i in range(len(x))])
    else:
        import tensorflow as tf
        loaded = tf.saved_model.load(path)
        out = loaded.serve(x).numpy()
    np.save(sys.argv[3], out)
    print(json.dumps({"fastconv_imported": "fastconv" in sys.modules}))
""")


def _serve_without_fastconv(path, x, tmp_path):
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "loader.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(
        [sys.executable, str(tmp_path / "loader.py"), str(path), str(tmp_path / "x.npy"),
         str(tmp_path / "y.npy")],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"fastconv_imported": False}
    return np.load(tmp_path / "y.npy")


def _export_model():
    keras.utils.set_random_seed(13)
    inp = keras.Input((12, 12, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, strides=2)(h)
    h = keras.layers.Conv2D(4, 3, dilation_rate=2, padding="same")(h)
    return fastconv.convert(keras.Model(inp, keras.layers.Flatten()(h)))


@pytest.mark.skipif(BACKEND == "numpy", reason="Keras cannot export on the numpy backend")
@pytest.mark.parametrize("how", ["model.export", "fastconv.export", "ExportArchive"])
def test_export_serves_without_fastconv(how, tmp_path, kernel_calls):
    if BACKEND == "torch" and how == "ExportArchive":
        pytest.skip("torch: the .pt2 format, through model.export / fastconv.export")
    model = _export_model()
    x = _images((3, 12, 12, 3), seed=14)
    expected = to_numpy(model(x))
    assert kernel_calls.calls == 3
    fmt = "torch" if BACKEND == "torch" else "tf_saved_model"
    path = tmp_path / ("artifact.pt2" if BACKEND == "torch" else "artifact")
    if how == "model.export":
        model.export(str(path), format=fmt, verbose=False)
    elif how == "fastconv.export":
        fastconv.export(model, str(path), format=fmt, verbose=False)
    else:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serve", model.call,
                             input_signature=[keras.InputSpec(shape=(None, 12, 12, 3), dtype="float32")])
        archive.write_out(str(path), verbose=False)
    served = _serve_without_fastconv(path, x, tmp_path)
    assert_close(served, expected, name="served artifact")
    # Exporting did not switch the model itself to Keras' convolution.
    calls = kernel_calls.calls
    assert_close(to_numpy(model(x)), expected)
    assert kernel_calls.calls == calls + 3


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TF SavedModel of a channels_first model")
def test_export_channels_first_serves_on_any_cpu(tmp_path, kernel_calls):
    # TF's CPU Conv2D is NHWC-only without oneDNN: the artifact must not hold an NCHW Conv2D
    keras.utils.set_random_seed(16)
    inp = keras.Input((3, 9, 10))
    h = keras.layers.Conv2D(5, 3, padding="same", data_format="channels_first")(inp)
    h = keras.layers.Conv2D(4, 2, strides=2, data_format="channels_first")(h)
    model = fastconv.convert(keras.Model(inp, keras.layers.Flatten()(h)))
    x = _images((2, 3, 9, 10), seed=17)
    expected = to_numpy(model(x))
    assert kernel_calls.calls == 2
    model.export(str(tmp_path / "artifact"), format="tf_saved_model", verbose=False)
    assert_close(_serve_without_fastconv(tmp_path / "artifact", x, tmp_path), expected,
                 name="served channels_first artifact")


def test_keras_convolution_context(kernel_calls):
    model = _export_model()
    x = _images((2, 12, 12, 3), seed=15)
    expected = to_numpy(model(x))
    calls = kernel_calls.calls
    with fastconv.keras_convolution():
        inside = to_numpy(model(x))
    assert kernel_calls.calls == calls, "fastconv's kernels ran inside keras_convolution()"
    assert_close(inside, expected)
    model(x)
    assert kernel_calls.calls == calls + 3


if __name__ == "__main__":  # the JAX child of `jax_apps`: python test_convert.py OUT NAME...
    results = {name: check_application(name) for name in sys.argv[2:]}
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
