"""`fastconv.ops.conv` against `keras.ops.conv` and the float64 reference, on this process's
backend: geometry, data formats, input kinds, dtypes, symbolic and compiled calls."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastconv
import reference
from conftest import keras_conv_runs, to_numpy

BACKEND = keras.backend.backend()
HERE = os.path.dirname(os.path.abspath(__file__))

# (N, H, W, C, KH, KW, F, groups, strides, dilation, padding)
CASES = [
    (2, 7, 9, 4, 3, 3, 6, 1, (1, 1), (1, 1), "valid"),
    (2, 7, 9, 4, 3, 3, 6, 1, (1, 1), (1, 1), "same"),
    (1, 8, 8, 6, 3, 2, 9, 3, (2, 1), (1, 1), "same"),  # grouped, stride on one axis
    (3, 10, 11, 8, 3, 3, 8, 8, (1, 1), (1, 1), "same"),  # depthwise
    (2, 10, 11, 5, 3, 3, 15, 5, (1, 1), (1, 1), "valid"),  # depthwise, multiplier 3
    (2, 9, 7, 3, 3, 3, 6, 3, (2, 2), (1, 1), "same"),  # depthwise x2, odd channels, stride
    (2, 12, 12, 4, 3, 3, 4, 2, (1, 1), (2, 3), "same"),  # dilation per axis
    (2, 12, 13, 3, 5, 4, 5, 1, (3, 2), (1, 1), "valid"),  # strides per axis
    (2, 12, 13, 3, 2, 4, 5, 1, (1, 1), (3, 1), "valid"),  # dilation on one axis
    (1, 1, 1, 3, 3, 3, 2, 1, (1, 1), (1, 1), "same"),  # 1x1 image, kernel larger
    (1, 1, 1, 5, 1, 1, 7, 1, (1, 1), (1, 1), "valid"),  # 1x1 image, 1x1 kernel
    (2, 4, 5, 3, 7, 6, 4, 1, (1, 2), (1, 1), "same"),  # kernel larger than the input
    (2, 6, 6, 20, 2, 2, 20, 20, (2, 2), (1, 1), "same"),  # even kernel, stride 2, depthwise
    (1, 5, 7, 7, 1, 1, 5, 1, (1, 1), (1, 1), "valid"),  # odd channels, 1x1 kernel
    (2, 6, 5, 12, 3, 3, 12, 6, (3, 3), (1, 1), "same"),  # stride larger than kernel
    (0, 5, 5, 4, 3, 3, 4, 2, (1, 1), (1, 1), "same"),  # empty batch
    # 1x1, stride 1: the pixels re-cut into wider rows (Geometry.pixel_rows)
    (3, 5, 5, 6, 1, 1, 10, 1, (1, 1), (1, 1), "same"),
    (2, 4, 6, 8, 1, 1, 12, 2, (1, 1), (1, 1), "valid"),
    (2, 8, 1, 4, 1, 1, 6, 1, (1, 2), (1, 1), "valid"),  # stride 2 on a 1-pixel axis
    (2, 1, 8, 4, 1, 1, 6, 1, (3, 1), (1, 1), "same"),
]
# ops may combine strides > 1 with dilation > 1 (the layer may not): reference only on TF.
MIXED = [
    (2, 9, 9, 4, 3, 3, 4, 1, (2, 2), (2, 2), "same"),
    (2, 11, 10, 6, 3, 2, 4, 2, (2, 3), (3, 2), "valid"),
]


def _arrays(case, data_format, seed=0, dtype=np.float32):
    n, h, w, c, kh, kw, f, groups, *_ = case
    rng = np.random.default_rng(seed)
    shape = (n, h, w, c) if data_format == "channels_last" else (n, c, h, w)
    x = rng.standard_normal(shape).astype(dtype)
    k = rng.standard_normal((kh, kw, c // groups, f)).astype(dtype)
    return x, k


def _check(case, data_format, seed=0, padding_as=None):
    n, h, w, c, kh, kw, f, groups, strides, dilation, padding = case
    x, k = _arrays(case, data_format, seed)
    out = fastconv.ops.conv(keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(k),
                            strides=strides, padding=padding_as or padding,
                            data_format=data_format, dilation_rate=dilation)
    assert keras.ops.is_tensor(out)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    out = to_numpy(out)
    expected = reference.conv(x, k, strides, padding, dilation, data_format)
    reference.assert_close(out, expected, 1e-4, "fastconv vs reference")
    if keras_conv_runs(data_format, groups, strides, dilation, n):
        theirs = to_numpy(keras.ops.conv(x, k, strides, padding, data_format, dilation))
        reference.assert_close(out, theirs, 1e-4, "fastconv vs keras.ops.conv")
    return out


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", CASES + MIXED, ids=str)
def test_matches_reference_and_keras(case, data_format):
    out = _check(case, data_format)
    assert case[0] == 0 or np.abs(out).max() > 0.1  # a result that a zero kernel would change


@pytest.mark.parametrize("padding", ["SAME", "Same", "VALID", "Valid"])
def test_padding_is_case_insensitive(padding):
    _check((2, 6, 7, 3, 3, 2, 4, 1, (2, 1), (1, 1), padding.lower()), "channels_last",
           padding_as=padding)


def test_data_format_none_follows_the_global_setting():
    case = (2, 6, 7, 3, 3, 3, 4, 1, (1, 1), (1, 1), "same")
    x, k = _arrays(case, "channels_first")
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        out = to_numpy(fastconv.ops.conv(x, k, padding="same"))
    finally:
        keras.config.set_image_data_format(previous)
    reference.assert_close(out, reference.conv(x, k, padding="same",
                                               data_format="channels_first"))


def test_defaults_are_keras_defaults():
    x, k = _arrays((2, 6, 7, 3, 3, 2, 4, 1, None, None, None), "channels_last")
    out = to_numpy(fastconv.ops.conv(x, k))
    assert out.shape == (2, 4, 6, 4)  # strides 1, "valid", channels_last, dilation 1
    reference.assert_close(out, to_numpy(keras.ops.conv(x, k)))


@st.composite
def configs(draw):
    groups = draw(st.integers(1, 4))
    cin_g = draw(st.integers(1, 3))
    fg = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    strides = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = draw(st.sampled_from(["valid", "same"]))
    min_h = (kh - 1) * dilation[0] + 1 if padding == "valid" else 1
    min_w = (kw - 1) * dilation[1] + 1 if padding == "valid" else 1
    h = draw(st.integers(min_h, min_h + 6))
    w = draw(st.integers(min_w, min_w + 6))
    n = draw(st.integers(0, 2))
    case = (n, h, w, groups * cin_g, kh, kw, groups * fg, groups, strides, dilation, padding)
    return case, draw(st.sampled_from(["channels_last", "channels_first"]))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(config=configs(), seed=st.integers(0, 2**16))
def test_random_configurations(config, seed):
    _check(*config, seed=seed)


@pytest.mark.parametrize("kind", ["tensor", "numpy", "list", "variable"])
def test_accepts_tensors_arrays_nested_lists_and_variables(kind):
    case = (2, 5, 4, 4, 3, 2, 6, 2, (1, 2), (1, 1), "same")
    x, k = _arrays(case, "channels_last", seed=3)
    convert = {
        "tensor": keras.ops.convert_to_tensor,
        "numpy": lambda a: a,
        "list": lambda a: a.tolist(),
        "variable": keras.Variable,
    }[kind]
    out = fastconv.ops.conv(convert(x), convert(k), strides=(1, 2), padding="same")
    assert keras.ops.is_tensor(out)
    reference.assert_close(to_numpy(out), reference.conv(x, k, (1, 2), "same"))


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_other_ranks_raise_and_point_to_keras_ops_conv(rank):
    x = np.ones((2,) + (5,) * (rank - 2) + (3,), np.float32) if rank >= 2 else np.ones(3)
    k = np.ones((3, 3, 3, 4), np.float32)
    with pytest.raises(ValueError, match=rf"rank {rank}\b.*") as info:
        fastconv.ops.conv(x, k)
    assert "keras.ops.conv" in str(info.value)


@pytest.mark.parametrize("rank", [2, 3, 5])
def test_kernel_of_another_rank_raises(rank):
    x = np.ones((1, 5, 5, 3), np.float32)
    k = np.ones((3,) * (rank - 1) + (4,), np.float32)
    with pytest.raises(ValueError, match="kernel"):
        fastconv.ops.conv(x, k)


def _keras_dtype(x, k):
    """keras.ops.conv's result dtype here, or None where Keras' own conv rejects the dtypes."""
    try:
        return keras.backend.standardize_dtype(keras.ops.conv(x, k).dtype)
    except Exception:
        return None


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int32", "int64",
                                   "uint8", "int8", "bool", "float64"])
def test_result_dtype_is_keras_result_dtype(dtype):
    if dtype == "float64" and BACKEND == "jax":
        pytest.skip("float64 on JAX needs jax_enable_x64: see test_float64_on_jax_with_x64")
    rng = np.random.default_rng(5)
    x_np = rng.integers(0, 3, (2, 6, 5, 4)).astype(np.float32)
    k_np = rng.integers(-1, 3, (3, 3, 2, 4)).astype(np.float32)
    if dtype in ("uint8", "bool"):
        k_np = np.abs(k_np)
    if dtype == "bool":
        x_np, k_np = x_np > 1, k_np > 1
    x = keras.ops.cast(keras.ops.convert_to_tensor(x_np), dtype)
    k = keras.ops.cast(keras.ops.convert_to_tensor(k_np), dtype)
    out = fastconv.ops.conv(x, k, padding="same")
    got = keras.backend.standardize_dtype(out.dtype)
    theirs = _keras_dtype(x, k)
    # Where keras.ops.conv rejects a dtype (TF: int64/uint8/int8/bool, torch: bool), fastconv
    # still answers, in Keras' promoted dtype.
    assert got == (theirs or keras.backend.result_type(x.dtype, k.dtype))
    if BACKEND in ("tensorflow", "torch"):
        assert got == dtype  # equal dtypes are kept, float64 and int64 included
    expected = reference.conv(x_np, k_np, padding="same")
    values = to_numpy(keras.ops.cast(out, "float32"))
    if dtype == "bool":
        np.testing.assert_array_equal(values, expected > 0)
    elif dtype in ("float16", "bfloat16"):
        reference.assert_close(values, expected, 1e-2)
    elif dtype == "float64" and got == "float64":
        reference.assert_close(to_numpy(out), expected, 1e-10)
    else:  # small integers: exact
        np.testing.assert_array_equal(values, expected)


def test_float64_keeps_float64_precision():
    if BACKEND == "jax":
        pytest.skip("float64 on JAX needs jax_enable_x64: see test_float64_on_jax_with_x64")
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 9, 8, 6))
    k = rng.standard_normal((3, 3, 3, 4))
    out = fastconv.ops.conv(keras.ops.convert_to_tensor(x, "float64"),
                            keras.ops.convert_to_tensor(k, "float64"), 2, "same")
    theirs = keras.ops.conv(x, k, 2, "same") if BACKEND != "tensorflow" else None
    expected = reference.conv(x, k, (2, 2), "same")
    if BACKEND == "numpy":  # keras' numpy conv (via JAX without x64) returns float32
        assert out.dtype == theirs.dtype == np.float32
        reference.assert_close(out, expected, 1e-4)
    else:
        assert keras.backend.standardize_dtype(out.dtype) == "float64"
        reference.assert_close(to_numpy(out), expected, 1e-10)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's eager results")
@pytest.mark.parametrize("private", [True, False])
def test_jax_eager_result_wraps_the_kernels_result(private, monkeypatch):
    """An eager call's float32 result is a jax.Array over the kernels' own result, by jaxlib's
    private dlpack entry point or (where that is missing) jax.dlpack.from_dlpack."""
    import jax

    from fastconv.backends import jax as bridge

    if private:
        assert bridge._from_host is not None  # (this jaxlib has it)
    else:
        monkeypatch.setattr(bridge, "_from_host", None)
    seen = []
    real = bridge.host.conv
    monkeypatch.setattr(bridge.host, "conv", lambda *a: seen.append(real(*a)) or seen[-1])
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 9, 8, 3)).astype("float32")
    k = rng.standard_normal((3, 3, 3, 5)).astype("float32")
    y = fastconv.ops.conv(jax.numpy.asarray(x), jax.numpy.asarray(k), padding="same")
    assert isinstance(y, jax.Array) and y.dtype == np.float32
    assert y.unsafe_buffer_pointer() == seen[-1].ctypes.data
    reference.assert_close(np.asarray(y), reference.conv(x, k, padding="same"), 1e-4)


@pytest.mark.skipif(BACKEND != "jax", reason="float64 under jax_enable_x64: JAX only")
def test_float64_on_jax_with_x64():
    script = textwrap.dedent("""
        import numpy as np, keras, jax, fastconv, reference
        assert jax.config.jax_enable_x64
        rng = np.random.default_rng(7)
        x = rng.standard_normal((2, 9, 8, 6)); k = rng.standard_normal((3, 3, 3, 4))
        for xx, kk in ((x, k), (keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(k))):
            out = fastconv.ops.conv(xx, kk, 2, "same")
            assert str(out.dtype) == str(keras.ops.conv(xx, kk, 2, "same").dtype) == "float64"
            reference.assert_close(np.asarray(out), reference.conv(x, k, (2, 2), "same"), 1e-10)
            out = jax.jit(lambda a, b: fastconv.ops.conv(a, b, 1, "valid"))(xx, kk)
            assert out.dtype == np.float64
            reference.assert_close(np.asarray(out), reference.conv(x, k), 1e-10)
        layer = fastconv.Conv2D(5, 3, padding="same", dtype="float64")
        ref = keras.layers.Conv2D(5, 3, padding="same", dtype="float64")
        y = layer(x); ref(x); ref.set_weights(layer.get_weights())
        assert y.dtype == np.float64
        reference.assert_close(np.asarray(y), np.asarray(ref(x)), 1e-10)
        print("OK")
    """)
    env = dict(os.environ, JAX_ENABLE_X64="1", KERAS_BACKEND="jax",
               PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-3000:]


def test_mixed_dtypes_promote_like_keras_result_type():
    """Keras' own conv differs here between backends (TF and torch raise, JAX casts the input
    to the kernel's dtype); fastconv promotes with keras.backend.result_type everywhere."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 5, 5, 2)).astype(np.float32)
    k = rng.standard_normal((3, 3, 2, 3)).astype(np.float32)
    for xd, kd in (("float16", "float32"), ("int32", "float32"), ("float32", "float16"),
                   ("bool", "float32")):
        xx = keras.ops.cast(x > 0 if xd == "bool" else x, xd)
        kk = keras.ops.cast(k, kd)
        out = fastconv.ops.conv(xx, kk)
        assert keras.backend.standardize_dtype(out.dtype) == keras.backend.result_type(xd, kd)
        expected = reference.conv(to_numpy(keras.ops.cast(xx, "float32")),
                                  to_numpy(keras.ops.cast(kk, "float32")))
        reference.assert_close(to_numpy(keras.ops.cast(out, "float32")), expected, 1e-2)


def test_nan_and_inf_reach_exactly_the_outputs_whose_window_covers_them():
    x = np.ones((1, 8, 9, 2), np.float32)
    x[0, 4, 4, 0] = np.nan
    x[0, 0, 8, 1] = np.inf
    k = np.ones((3, 3, 1, 4), np.float32)  # grouped: channel 0 -> filters 0, 1 only
    out = to_numpy(fastconv.ops.conv(x, k, padding="same"))
    expected = reference.conv(x, k, padding="same")
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(out), np.isinf(expected))
    assert np.isnan(out[0, 3:6, 3:6, :2]).all() and np.isnan(out).sum() == 18
    assert np.isinf(out[0, 0:2, 7:9, 2:]).all() and np.isinf(out).sum() == 8


def test_symbolic_inputs_give_keras_shapes_and_dtypes():
    for shape, kshape, kwargs in [
        ((None, None, None, 4), (3, 3, 4, 6), dict(padding="same", strides=2)),
        ((3, 11, None, 4), (3, 2, 4, 5), dict(dilation_rate=(2, 1))),
        ((None, 4, 9, 10), (1, 3, 4, 5), dict(data_format="channels_first", strides=(1, 3))),
        ((2, 9, 9, 3), (3, 3, 3, 2), dict(padding="SAME", strides=2, dilation_rate=2)),
    ]:
        x = keras.KerasTensor(shape)
        k = keras.KerasTensor(kshape)
        ours = fastconv.ops.conv(x, k, **kwargs)
        theirs = keras.ops.conv(x, k, **kwargs)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype


def test_symbolic_grouped_shapes():
    """keras.ops.conv's symbolic path rejects grouped kernels (its eager path accepts them);
    fastconv's accepts them and gives the eager result's shape."""
    for shape, kshape, kwargs, expected in [
        ((None, None, None, 4), (3, 3, 2, 6), dict(padding="same", strides=2),
         (None, None, None, 6)),
        ((3, 9, 11, 8), (3, 2, 1, 9), dict(data_format="channels_first", dilation_rate=2),
         (3, 9, 7, 6)),
    ]:
        ours = fastconv.ops.conv(keras.KerasTensor(shape), keras.KerasTensor(kshape), **kwargs)
        assert ours.shape == expected and ours.dtype == "float32"
        with pytest.raises(ValueError):
            keras.ops.conv(keras.KerasTensor(shape), keras.KerasTensor(kshape), **kwargs)


def test_symbolic_call_records_fastconv_in_a_functional_model():
    inputs = keras.Input((None, None, 3))
    kernel = np.random.default_rng(9).standard_normal((3, 3, 3, 4)).astype(np.float32)
    outputs = fastconv.ops.conv(inputs, kernel, padding="same")
    model = keras.Model(inputs, outputs)
    assert any(isinstance(op, fastconv.ops.Conv) for op in model.operations)
    x = np.random.default_rng(10).standard_normal((2, 7, 5, 3)).astype(np.float32)
    reference.assert_close(to_numpy(model(x)), reference.conv(x, kernel, padding="same"))


@pytest.mark.skipif(BACKEND not in ("jax", "tensorflow"), reason="jax.jit / tf.function only")
def test_compiled_call_matches_reference():
    x, k = _arrays((2, 7, 6, 4, 3, 3, 4, 2, None, None, None), "channels_last", seed=11)
    fn = lambda a, b: fastconv.ops.conv(a, b, (2, 1), "same", "channels_last", (1, 2))  # noqa
    if BACKEND == "jax":
        import jax

        compiled = jax.jit(fn)
    else:
        import tensorflow as tf

        compiled = tf.function(fn, input_signature=[
            tf.TensorSpec((None, None, None, 4)), tf.TensorSpec((3, 3, 2, 4))])
    expected = reference.conv(x, k, (2, 1), "same", (1, 2))
    reference.assert_close(to_numpy(compiled(x, k)), expected)
    x2 = x[:1, :5]  # another shape through the same compiled function
    reference.assert_close(to_numpy(compiled(x2, k)),
                           reference.conv(x2, k, (2, 1), "same", (1, 2)))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow graphs only")
@pytest.mark.parametrize("x_shape, data_format, dtype", [
    ((3, 5, 5, 5), "channels_first", np.float32),  # NHWC and NCHW shapes alike: a copy at the end
    ((2, 4, 7, 6), "channels_first", np.float32),
    ((0, 6, 7, 4), "channels_last", np.float32),
    ((2, 6, 7, 4), "channels_last", np.float64),
])
def test_graph_results_in_tensorflow_memory(x_shape, data_format, dtype):
    # in a graph the forward result is written into a tensor TensorFlow allocated (so that the
    # ops after it may reuse its buffer): here also read twice, and with a dynamic batch size
    import tensorflow as tf

    rng = np.random.default_rng(12)
    x = rng.standard_normal(x_shape).astype(dtype)
    c = x_shape[1] if data_format == "channels_first" else x_shape[3]
    k = rng.standard_normal((3, 3, c, 5)).astype(dtype)

    @tf.function(input_signature=[tf.TensorSpec((None,) + x_shape[1:], dtype)])
    def fn(a):
        y = fastconv.ops.conv(a, k, 1, "same", data_format)
        return y, tf.nn.relu(y * 2.0 + 1.0)

    y, z = fn(x)
    expected = reference.conv(x, k, padding="same", data_format=data_format)
    reference.assert_close(y.numpy(), expected)
    reference.assert_close(z.numpy(), np.maximum(expected * 2.0 + 1.0, 0))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow graphs only")
def test_graph_optimizer_sees_the_result_shape():
    # Grappler re-infers shapes from the ops' registrations, where a numpy_function's result is
    # unknown; with it unknown, TF leaves e.g. Keras' swish after a fastconv layer unfused
    import tensorflow as tf
    from tensorflow.python.grappler import item

    fn = tf.function(lambda a, b: fastconv.ops.conv(a, b, 1, "same"))
    graph = fn.get_concrete_function(tf.TensorSpec((None, 7, 6, 4)),
                                     tf.TensorSpec((3, 3, 4, 5))).graph
    meta = tf.compat.v1.train.export_meta_graph(graph_def=graph.as_graph_def(), graph=graph)
    name = graph.outputs[0].op.name
    meta.collection_def["train_op"].node_list.value.append(name)
    (result,) = item.Item(meta).GetOpProperties()[name]
    shape = result.shape
    assert not shape.unknown_rank
    assert [d.size for d in shape.dim][1:] == [7, 6, 5]


def test_eager_results_keep_their_memory_while_alive():
    # Eager results are the host's buffers, handed over without a copy (dlpack on TF and JAX,
    # from_numpy on torch, the array itself on numpy); a buffer is reused only once no tensor
    # holds it.
    from fastconv import _memory

    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 66, 66, 32), dtype=np.float32)
    k = rng.standard_normal((3, 3, 32, 64), dtype=np.float32)
    first = fastconv.ops.conv(x, k)
    assert 4 * np.prod(first.shape) >= _memory._POOLED  # 2 MB: from the pool
    expected = to_numpy(first).copy()
    for i in range(3):
        later = fastconv.ops.conv(x + i + 1, k)
        del later
    np.testing.assert_array_equal(to_numpy(first), expected)
    reference.assert_close(expected, reference.conv(x, k, (1, 1), "valid", (1, 1)))

@pytest.mark.skipif(keras.backend.backend() != "numpy", reason="numpy backend only")
def test_numpy_inputs_are_read_in_place(monkeypatch):
    # Keras' numpy backend copies every array it converts: fastconv reads arrays as they are.
    copies = []
    convert = keras.ops.convert_to_tensor
    monkeypatch.setattr(keras.ops, "convert_to_tensor", lambda v, *a, **kw: copies.append(v) or
                        convert(v, *a, **kw))
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 6, 6, 4), dtype=np.float32)
    k = rng.standard_normal((3, 3, 4, 5), dtype=np.float32)
    x.flags.writeable = False
    out = fastconv.ops.conv(x, k)
    assert copies == []
    reference.assert_close(out, reference.conv(x, k, (1, 1), "valid", (1, 1)))


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[7]], ids=str)
def test_conv_bias_adds_the_bias_in_the_kernel(case, data_format):
    """ops.conv_bias (what the layers call): the kernels add the bias per output row."""
    n, h, w, c, kh, kw, f, groups, strides, dilation, padding = case
    x, k = _arrays(case, data_format, seed=3)
    b = np.random.default_rng(4).standard_normal(f).astype(np.float32)
    spec = fastconv.geometry.ConvSpec.make(strides, padding, data_format, dilation)
    out = to_numpy(fastconv.ops.conv_bias(keras.ops.convert_to_tensor(x),
                                          keras.ops.convert_to_tensor(k),
                                          keras.ops.convert_to_tensor(b), spec))
    expected = reference.conv(x, k, strides, padding, dilation, data_format)
    reference.assert_close(out, expected + b.reshape(spec.bias_shape), 1e-4)


def test_conv_bias_checks_the_bias_shape():
    x, k = _arrays(CASES[0], "channels_last")
    spec = fastconv.geometry.ConvSpec.make(1, "valid", "channels_last", 1)
    with pytest.raises(ValueError, match=r"bias.shape=\(5,\)"):
        fastconv.ops.conv_bias(keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(k),
                               keras.ops.convert_to_tensor(np.zeros(5, np.float32)), spec)
