"""Bad input: the same exception type on every backend, with a message naming the argument and
the value; never a crash, a hang or a wrong answer. The layer's errors are Keras' own (compared
with keras.layers.Conv2D); fastconv.ops.conv's are fastconv's (one place: fastconv.geometry)."""

import re

import keras
import numpy as np
import pytest

import fastconv

BACKEND = keras.backend.backend()

X = np.ones((1, 5, 6, 3), np.float32)
K = np.ones((3, 3, 3, 4), np.float32)


def _raises(fn, exc_type, *patterns):
    with pytest.raises(exc_type) as info:
        fn()
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {info.value}"
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), f"{pattern!r} not in {info.value}"
    return info.value


# ------------------------------------------------------------------- fastconv.ops.conv's checks

# (inputs shape, kernel shape, kwargs, exception type, patterns the message must contain)
OPS_ERRORS = [
    ((1, 5, 6), (3, 3, 3, 4), {}, ValueError, [r"rank 3", r"keras\.ops\.conv"]),
    ((1, 2, 5, 6, 3), (3, 3, 3, 4), {}, ValueError, [r"rank 5", r"keras\.ops\.conv"]),
    ((1, 5, 6, 3), (3, 3, 4), {}, ValueError, [r"kernel", r"\(3, 3, 4\)"]),
    ((1, 5, 6, 3), (3, 3, 3, 4, 1), {}, ValueError, [r"kernel", r"\(3, 3, 3, 4, 1\)"]),
    ((1, 5, 6, 5), (3, 3, 2, 4), {}, ValueError, [r"input channels=5", r"kernel.shape\[2\]=2"]),
    ((1, 5, 6, 4), (3, 3, 2, 3), {}, ValueError, [r"filters=3", r"groups=2"]),
    ((1, 4, 9, 2), (3, 3, 3, 3), dict(data_format="channels_first"), ValueError,
     [r"input channels=4", r"kernel.shape\[2\]=3"]),
    ((1, 5, 6, 3), (3, 3, 3, 0), {}, ValueError, [r"kernel", r"\(3, 3, 3, 0\)"]),
    ((1, 5, 6, 3), (0, 3, 3, 2), {}, ValueError, [r"kernel", r"\(0, 3, 3, 2\)"]),
    ((1, 5, 6, 3), (3, 3, 0, 2), {}, ValueError, [r"kernel", r"\(3, 3, 0, 2\)"]),
    ((1, 5, 6, 0), (3, 3, 1, 2), {}, ValueError, [r"input channels=0"]),
    ((1, 2, 6, 3), (3, 3, 3, 4), {}, ValueError, [r"height", r"input height=2", r"'valid'"]),
    ((1, 6, 4, 3), (3, 3, 3, 4), dict(dilation_rate=(1, 2)), ValueError,
     [r"width", r"input width=4", r"dilation_rate=2"]),
    ((1, 0, 6, 3), (3, 3, 3, 4), {}, ValueError, [r"input height=0"]),
    ((1, 5, 6, 3), (3, 3, 3, 4), dict(strides=0), ValueError, [r"strides=0"]),
    ((1, 5, 6, 3), (3, 3, 3, 4), dict(strides=(1, -2)), ValueError, [r"strides=\(1, -2\)"]),
    ((1, 5, 6, 3), (3, 3, 3, 4), dict(strides=(1, 2, 3)), ValueError, [r"strides=\(1, 2, 3\)"]),
    ((1, 5, 6, 3), (3, 3, 3, 4), dict(strides=1.5), TypeError, [r"strides=1.5"]),
    ((1, 5, 6, 3), (3, 3, 3, 4), dict(strides="2"), TypeError, [r"strides='2'"]),
    ((1, 5, 6, 3), (3, 3, 3, 4), dict(strides=True), TypeError, [r"strides=True"]),
    ((1, 5, 6, 3), (3, 3, 3, 4), dict(dilation_rate=0), ValueError, [r"dilation_rate=0"]),
    ((1, 5, 6, 3), (3, 3, 3, 4), dict(dilation_rate=(-1, 1)), ValueError,
     [r"dilation_rate=\(-1, 1\)"]),
    ((1, 5, 6, 3), (3, 3, 3, 4), dict(dilation_rate=None), TypeError, [r"dilation_rate=None"]),
    ((1, 5, 6, 3), (3, 3, 3, 4), dict(padding="full"), ValueError, [r"padding='full'"]),
    ((1, 5, 6, 3), (3, 3, 3, 4), dict(padding="causal"), ValueError, [r"padding='causal'"]),
    ((1, 5, 6, 3), (3, 3, 3, 4), dict(padding=None), TypeError, [r"padding=None"]),
    ((1, 5, 6, 3), (3, 3, 3, 4), dict(padding=((1, 1), (1, 1))), TypeError, [r"padding="]),
    ((1, 5, 6, 3), (3, 3, 3, 4), dict(data_format="NHWC"), ValueError, [r"data_format='NHWC'"]),
    ((1, 5, 6, 3), (3, 3, 3, 4), dict(data_format=1), TypeError, [r"data_format=1"]),
]


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
@pytest.mark.parametrize("x_shape,k_shape,kwargs,exc_type,patterns", OPS_ERRORS, ids=str)
def test_ops_conv_errors(x_shape, k_shape, kwargs, exc_type, patterns, kind):
    x, k = np.ones(x_shape, np.float32), np.ones(k_shape, np.float32)
    if kind == "tensor":
        x, k = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(k)
    _raises(lambda: fastconv.ops.conv(x, k, **kwargs), exc_type, *patterns)


@pytest.mark.parametrize("x_shape,k_shape,kwargs,exc_type,patterns",
                         [c for c in OPS_ERRORS if c[0][0] != 1 or len(c[0]) == 4], ids=str)
def test_ops_conv_errors_on_symbolic_inputs(x_shape, k_shape, kwargs, exc_type, patterns):
    x = keras.KerasTensor((None,) + x_shape[1:])
    k = keras.KerasTensor(k_shape)
    _raises(lambda: fastconv.ops.conv(x, k, **kwargs), exc_type, *patterns)


@pytest.mark.skipif(BACKEND not in ("jax", "tensorflow"), reason="jax.jit / tf.function only")
@pytest.mark.parametrize("x_shape,k_shape,kwargs,exc_type,patterns",
                         [OPS_ERRORS[i] for i in (0, 4, 5, 7, 11, 14, 23)], ids=str)
def test_ops_conv_errors_under_compilation(x_shape, k_shape, kwargs, exc_type, patterns):
    """With static shapes, a compiled function raises the eager error while tracing."""
    if BACKEND == "jax":
        import jax

        compile_ = jax.jit
    else:
        import tensorflow as tf

        compile_ = tf.function
    fn = compile_(lambda a, b: fastconv.ops.conv(a, b, **kwargs))
    _raises(lambda: fn(np.ones(x_shape, np.float32), np.ones(k_shape, np.float32)), exc_type,
            *patterns)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow graphs with unknown sizes only")
def test_tf_function_with_unknown_sizes_reports_the_error_at_run_time():
    """Known difference: with unknown spatial sizes in a tf.function, the size check can only
    run inside the graph, which turns fastconv's ValueError into tf.errors.InvalidArgumentError
    carrying the same message (Keras' own conv raises InvalidArgumentError there too). Keras'
    predict/fit retrace for concrete shapes and so raise ValueError."""
    import tensorflow as tf

    fn = tf.function(lambda a, b: fastconv.ops.conv(a, b), input_signature=[
        tf.TensorSpec((None, None, None, 3)), tf.TensorSpec((3, 3, 3, 4))])
    np.testing.assert_array_equal(fn(X, K).numpy(), 27.0)  # a valid call still works
    _raises(lambda: fn(np.ones((1, 2, 6, 3), np.float32), K), tf.errors.InvalidArgumentError,
            r"ValueError: The kernel \(size 3, dilation 1\) is larger than the input height",
            r"input height=2")
    model = keras.Sequential([keras.Input((None, None, 3)), fastconv.Conv2D(2, 3)])
    _raises(lambda: model.predict(np.ones((1, 2, 6, 3), np.float32), verbose=0), ValueError,
            r"input height=2")


@pytest.mark.parametrize("value,name,dtype", [
    ("abc", "inputs", "<U3"),
    (np.ones((1, 5, 6, 3), np.complex64), "inputs", "complex64"),
    (np.array([[[["a"]]]]), "inputs", "<U1"),
])
def test_non_real_inputs_raise_type_error(value, name, dtype):
    _raises(lambda: fastconv.ops.conv(value, K), TypeError, name, re.escape(dtype))
    _raises(lambda: fastconv.ops.conv(X, np.ones((3, 3, 3, 4), np.complex64)), TypeError,
            "kernel", "complex64")


def test_ragged_nested_lists_raise_value_error():
    with pytest.raises(ValueError):
        fastconv.ops.conv([[[[1.0]], [[1.0, 2.0]]]], K)


def test_valid_edge_cases_do_not_raise():
    """The limits of the checks: these are valid and must compute."""
    out = fastconv.ops.conv(np.ones((1, 3, 3, 3), np.float32), K)  # kernel == input: 1x1
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(out), np.full((1, 1, 1, 4), 27.0))
    out = fastconv.ops.conv(np.ones((1, 0, 6, 3), np.float32), K, padding="same")
    assert tuple(out.shape) == (1, 0, 6, 4)
    out = fastconv.ops.conv(np.ones((1, 5, 6, 3), np.float32), K, strides=np.int64(2))
    assert tuple(out.shape) == (1, 2, 2, 4)
    out = fastconv.ops.conv(X, K, strides=[2], dilation_rate=(1,))
    assert tuple(out.shape) == (1, 2, 2, 4)


# --------------------------------------------------------------------------- the layer's checks


def _both(fn):
    """(fastconv's exception, Keras' exception) from fn(cls)."""
    errors = []
    for cls in (fastconv.Conv2D, keras.layers.Conv2D):
        try:
            fn(cls)
        except Exception as e:  # noqa: BLE001 - compared below
            errors.append(e)
        else:
            errors.append(None)
    return errors


# (constructor kwargs, exception type, patterns naming the argument and the value)
INIT_ERRORS = [
    (dict(filters=0, kernel_size=3), ValueError, [r"filters", r"filters=0"]),
    (dict(filters=-1, kernel_size=3), ValueError, [r"filters", r"filters=-1"]),
    (dict(filters=5, kernel_size=3, groups=2), ValueError, [r"groups=2", r"filters=5"]),
    (dict(filters=4, kernel_size=3, groups=0), ValueError, [r"groups=0"]),
    (dict(filters=2, kernel_size=0), ValueError, [r"kernel_size", r"kernel_size=0"]),
    (dict(filters=2, kernel_size=(3, -2)), ValueError, [r"kernel_size", r"-2"]),
    (dict(filters=2, kernel_size=(3, 3, 3)), ValueError, [r"kernel_size"]),
    (dict(filters=2, kernel_size=3, strides=0), ValueError, [r"strides", r"strides=0"]),
    (dict(filters=2, kernel_size=3, strides=(1, -1)), ValueError, [r"strides", r"-1"]),
    (dict(filters=2, kernel_size=3, dilation_rate=0), ValueError, [r"dilation_rate=0"]),
    (dict(filters=2, kernel_size=3, dilation_rate=-1), ValueError, [r"dilation_rate=-1"]),
    (dict(filters=2, kernel_size=3, strides=2, dilation_rate=2), ValueError,
     [r"strides=\(2, 2\)", r"dilation_rate=\(2, 2\)"]),
    (dict(filters=2, kernel_size=3, strides=(1, 2), dilation_rate=(2, 1)), ValueError,
     [r"strides=\(1, 2\)", r"dilation_rate=\(2, 1\)"]),
    (dict(filters=2, kernel_size=3, padding="full"), ValueError, [r"padding", r"full"]),
    (dict(filters=2, kernel_size=3, padding="causal"), ValueError, [r"padding", r"causal"]),
    (dict(filters=2, kernel_size=3, data_format="NHWC"), ValueError,
     [r"data_format", r"nhwc"]),
    (dict(filters=2, kernel_size=3, activation="nope"), ValueError, [r"activation", r"nope"]),
    (dict(filters=2, kernel_size=3, kernel_initializer="nope"), ValueError,
     [r"initializer", r"nope"]),
    (dict(filters=2, kernel_size=3, foo=1), ValueError, [r"foo"]),
]


@pytest.mark.parametrize("kwargs,exc_type,patterns", INIT_ERRORS, ids=str)
def test_constructor_errors_are_keras_errors(kwargs, exc_type, patterns):
    ours, theirs = _both(lambda cls: cls(**kwargs))
    assert type(theirs) is exc_type
    _raises(lambda: fastconv.Conv2D(**kwargs), exc_type, *patterns)
    assert str(ours) == str(theirs)


@pytest.mark.parametrize("padding,exc_type", [(5, TypeError), (None, TypeError),
                                               (((1, 1), (1, 1)), ValueError)])
def test_non_string_padding(padding, exc_type):
    """Known difference: Keras raises AttributeError ("'int' object has no attribute 'lower'")
    for a non-string padding, and accepts an explicit (list/tuple) padding until the first call
    (ValueError there); fastconv raises TypeError / ValueError naming `padding` at once."""
    _raises(lambda: fastconv.Conv2D(2, 3, padding=padding), exc_type, r"padding=")
    _raises(lambda: fastconv.Conv2D(2, 3, (1, 1), padding), exc_type, r"padding=")


def _call(shape, **kwargs):
    return lambda cls: cls(**{"filters": 4, "kernel_size": 3, **kwargs})(
        np.ones(shape, np.float32))


# (how to fail, exception type, patterns)
CALL_ERRORS = [
    (_call((2, 5, 5)), ValueError, [r"min_ndim=4", r"ndim=3"]),
    (_call((5,)), ValueError, [r"min_ndim=4", r"ndim=1"]),
    (_call((2, 4, 5, 5, 3)), ValueError, [r"\(2, 4, 5, 5, 3\)"]),
    (_call((1, 2, 6, 3)), ValueError, [r"\(1, 2, 6, 3\)", r"negative"]),
    (_call((1, 6, 6, 3), dilation_rate=3), ValueError, [r"\(1, 6, 6, 3\)", r"dilation_rate"]),
    (_call((1, 3, 2, 6), data_format="channels_first"), ValueError, [r"\(1, 3, 2, 6\)"]),
    (_call((1, 6, 6, 3), groups=2), ValueError, [r"groups=2", r"3 channels"]),
    (_call((1, 6, 6, 6), filters=8, groups=4), ValueError, [r"groups=4", r"6 channels"]),
]


@pytest.mark.parametrize("index", range(len(CALL_ERRORS)))
def test_call_errors_are_keras_errors(index):
    fn, exc_type, patterns = CALL_ERRORS[index]
    ours, theirs = _both(fn)
    assert type(ours) is exc_type, f"{type(ours).__name__}: {ours}"
    for pattern in patterns:
        assert re.search(pattern, str(ours)), f"{pattern!r} not in {ours}"
    if not (BACKEND == "tensorflow" and index >= 6):  # Keras' grouped TF conv: not run here
        assert type(theirs) is exc_type


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("symbolic", [False, True])
def test_channel_count_that_changes_after_build(data_format, symbolic):
    layer = fastconv.Conv2D(4, 3, groups=2, data_format=data_format)
    first = (1, 6, 7, 4) if data_format == "channels_last" else (1, 4, 6, 7)
    second = (1, 6, 7, 6) if data_format == "channels_last" else (1, 6, 6, 7)
    layer(np.ones(first, np.float32))
    x = keras.Input(second[1:]) if symbolic else np.ones(second, np.float32)
    axis = -1 if data_format == "channels_last" else 1
    _raises(lambda: layer(x), ValueError, rf"axis {axis}", r"value 4", r"6")


def test_kernel_larger_than_the_input_under_valid_symbolic():
    for cls in (fastconv.Conv2D, keras.layers.Conv2D):
        _raises(lambda: cls(2, (3, 5))(keras.Input((4, 4, 3))), ValueError, r"\(None, 4, 4, 3\)")
    inputs = keras.Input((None, None, 3))  # unknown sizes: the check waits for the data
    model = keras.Model(inputs, fastconv.Conv2D(2, 3)(inputs))
    _raises(lambda: model(np.ones((1, 2, 6, 3), np.float32)), ValueError, r"input height=2")


@pytest.mark.parametrize("weights,patterns", [
    ([np.ones((3, 3, 2, 4)), np.ones(4)], [r"\(3, 3, 3, 4\)", r"\(3, 3, 2, 4\)"]),
    ([np.ones((3, 3, 3, 4)), np.ones(5)], [r"\(4,\)", r"\(5,\)"]),
    ([np.ones((3, 3, 3, 4))], [r"length 1", r"2 weights"]),
    ([np.ones((3, 3, 3, 4)), np.ones(4), np.ones(4)], [r"length 3", r"2 weights"]),
])
def test_set_weights_of_the_wrong_shape(weights, patterns):
    ours, theirs = _both(lambda cls: _built(cls).set_weights(weights))
    assert type(ours) is type(theirs) is ValueError
    for pattern in patterns:
        assert re.search(pattern, str(ours)), f"{pattern!r} not in {ours}"


def _built(cls):
    layer = cls(4, 3)
    layer.build((1, 5, 5, 3))
    return layer


BASE_CONFIG = keras.layers.Conv2D(2, 3, name="c").get_config()


@pytest.mark.parametrize("key,value", [
    ("filters", "abc"), ("filters", -3), ("kernel_size", "x"), ("kernel_size", 0),
    ("strides", "q"), ("strides", (0, 1)), ("padding", 5), ("padding", "full"),
    ("data_format", "NHWC"), ("dilation_rate", [1, 2, 3]), ("groups", 1.5), ("groups", 0),
    ("activation", 42), ("activation", "nope"),
    ("kernel_initializer", {"class_name": "Nope", "config": {}}),
    ("kernel_regularizer", "nope"), ("kernel_constraint", "nope"), ("unknown_key", 1),
])
def test_garbage_in_a_config(key, value):
    config = {**BASE_CONFIG, key: value}
    ours, theirs = _both(lambda cls: cls.from_config(config))
    assert ours is not None, f"fastconv accepted {key}={value!r}"
    assert type(ours) in (TypeError, ValueError), f"{type(ours).__name__}: {ours}"
    if not (key == "padding" and value == 5):  # see test_non_string_padding
        assert type(ours) is type(theirs)
    assert key in str(ours) or repr(value) in str(ours) or str(value) in str(ours)


def test_filters_none_fails_at_build_like_keras():
    """Keras accepts filters=None in the constructor (and in a config) and fails at build."""
    config = {**BASE_CONFIG, "filters": None}
    ours, theirs = _both(lambda cls: cls.from_config(config)(X))
    assert type(ours) is type(theirs) is ValueError
    assert "(3, 3, 3, None)" in str(ours)


def test_config_missing_a_required_argument():
    config = {k: v for k, v in BASE_CONFIG.items() if k != "filters"}
    ours, theirs = _both(lambda cls: cls.from_config(config))
    assert type(ours) is type(theirs) is TypeError
    assert "filters" in str(ours)
