"""First-order gradients of fastconv.ops.conv and fastconv.Conv2D on tensorflow, jax and torch.

Every gradient is checked against the float64 reference's analytic adjoint (`reference.grads`),
against the backend's own autodiff of Keras' convolution holding the same weights, and (small
float64 cases) against finite differences. Then each backend's machinery: tf.function, jax.jit /
vmap, torch opcheck / gradcheck / compile. A second-order gradient must raise, never be silently
None or zero. float64 on JAX needs jax_enable_x64: those cases run in a child process.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastconv
import reference
from fastconv.geometry import ConvSpec
from conftest import BACKEND, autodiff, keras_conv_runs, to_numpy

import keras  # noqa: E402  (conftest imported torch first where needed)

pytestmark = pytest.mark.skipif(
    BACKEND == "numpy", reason="the numpy backend has no autodiff (see test_training.py)"
)

if BACKEND == "tensorflow":
    import tensorflow as tf
elif BACKEND == "jax":
    import jax
    import jax.numpy as jnp
elif BACKEND == "torch":
    import torch

JAX_X64 = BACKEND == "jax" and bool(jax.config.jax_enable_x64)
RTOL = {"float32": 1e-4, "float64": 1e-10}

# (N, H, W, C, KH, KW, F, groups, strides, dilation, padding)
CASES = [
    (2, 7, 9, 4, 3, 3, 6, 1, (1, 1), (1, 1), "valid"),
    (2, 7, 9, 4, 3, 3, 6, 1, (1, 1), (1, 1), "same"),
    (1, 8, 8, 6, 3, 2, 9, 3, (2, 1), (1, 1), "same"),  # grouped, stride on one axis
    (3, 9, 10, 8, 3, 3, 8, 8, (1, 1), (1, 1), "same"),  # depthwise
    (2, 9, 10, 5, 3, 3, 15, 5, (1, 1), (1, 1), "valid"),  # depthwise, channel multiplier 3
    (2, 8, 9, 4, 3, 3, 8, 4, (2, 2), (1, 1), "same"),  # depthwise, multiplier 2, stride 2
    (2, 12, 12, 4, 3, 3, 4, 2, (1, 1), (2, 3), "same"),  # dilation per axis
    (2, 12, 13, 3, 5, 4, 5, 1, (3, 2), (1, 1), "valid"),  # strides per axis
    (2, 10, 11, 3, 2, 2, 4, 1, (3, 3), (1, 1), "valid"),  # stride > kernel: rows never read
    (2, 9, 9, 4, 3, 3, 4, 1, (2, 2), (2, 2), "same"),  # ops may combine stride and dilation
    (1, 1, 1, 3, 3, 3, 2, 1, (1, 1), (1, 1), "same"),  # 1x1 image, kernel larger than input
    (2, 4, 5, 3, 7, 6, 4, 1, (1, 2), (1, 1), "same"),  # even kernel wider than the input
    (1, 5, 7, 10, 1, 1, 7, 1, (1, 1), (1, 1), "valid"),  # 1x1 kernel
    (3, 5, 5, 6, 1, 1, 10, 2, (1, 1), (1, 1), "same"),  # 1x1: pixels re-cut into rows of 25
    (2, 8, 1, 4, 1, 1, 6, 1, (1, 2), (1, 1), "valid"),  # 1x1, stride 2 on a 1-pixel axis
    (0, 5, 5, 4, 3, 3, 4, 2, (1, 1), (1, 1), "same"),  # empty batch
]


def _id(case):
    n, h, w, c, kh, kw, f, g, s, d, p = case
    return f"n{n}-{h}x{w}x{c}-k{kh}x{kw}x{f}-g{g}-s{s[0]}{s[1]}-d{d[0]}{d[1]}-{p}"


def skip_dtype(dtype):
    if dtype == "float64" and BACKEND == "jax" and not JAX_X64:
        pytest.skip("float64 on JAX needs JAX_ENABLE_X64=1: run by test_jax_float64_in_child")


def keras_comparable(groups, strides, dilation, data_format="channels_last"):
    """Whether Keras' own conv may run here for this configuration."""
    return keras_conv_runs(data_format, groups, strides, dilation, gradients=True)


def torch_backward_fails(case):
    """torch 2.13's own conv2d backward raises "slow_conv2d: grad_weight must be contiguous"
    for one filter and a kernel larger than 1x1 (found by hypothesis: one image, and two
    images on a 1x2 input with a 1x2 kernel, in float64): Keras' conv cannot be
    differentiated there, fastconv's can."""
    n, h, w, c, kh, kw, f = case[:7]
    return BACKEND == "torch" and f == 1 and kh * kw > 1


def make_case(case, dtype, data_format, seed=0):
    n, h, w, c, kh, kw, f, groups, strides, dilation, padding = case
    rng = np.random.default_rng(seed)
    x_shape = (n, h, w, c) if data_format == "channels_last" else (n, c, h, w)
    x = rng.standard_normal(x_shape).astype(dtype)
    k = rng.standard_normal((kh, kw, c // groups, f)).astype(dtype)
    y = reference.conv(x, k, strides, padding, dilation, data_format)
    dy = rng.standard_normal(y.shape).astype(dtype)
    args = dict(strides=strides, padding=padding, data_format=data_format, dilation_rate=dilation)
    return x, k, dy, args


def check_ops_gradients(case, dtype, data_format, seed=0):
    groups, strides, dilation = case[7], case[8], case[9]
    x, k, dy, args = make_case(case, dtype, data_format, seed)
    rtol = RTOL[dtype]

    def loss(conv):
        return lambda x, k: keras.ops.sum(conv(x, k, **args) * keras.ops.convert_to_tensor(dy))

    dx, dk = autodiff(loss(fastconv.ops.conv), x, k)
    assert dx.dtype == dtype and dk.dtype == dtype
    ref_dx, ref_dk = reference.grads(x, k, dy, strides, args["padding"], dilation, data_format)
    reference.assert_close(dx, ref_dx, rtol, "d/dinputs vs reference")
    reference.assert_close(dk, ref_dk, rtol, "d/dkernel vs reference")
    if (keras_comparable(groups, strides, dilation, data_format) and x.shape[0] > 0
            and not torch_backward_fails(case)):
        kdx, kdk = autodiff(loss(keras.ops.conv), x, k)
        reference.assert_close(dx, kdx, rtol, "d/dinputs vs Keras")
        reference.assert_close(dk, kdk, rtol, "d/dkernel vs Keras")


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_ops_conv_gradients(case, dtype, data_format):
    skip_dtype(dtype)
    check_ops_gradients(case, dtype, data_format)


@st.composite
def configs(draw):
    groups = draw(st.integers(1, 4))
    cin_g = draw(st.sampled_from([1, 1, 2, 3]))
    f_g = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = draw(st.sampled_from(["valid", "same"]))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    if padding == "valid":  # the dilated kernel must fit
        h = max(h, (kh - 1) * dilation[0] + 1)
        w = max(w, (kw - 1) * dilation[1] + 1)
    n = draw(st.integers(0, 2))
    return (n, h, w, groups * cin_g, kh, kw, groups * f_g, groups, strides, dilation, padding)


@settings(max_examples=20, deadline=None)
@given(case=configs(), data_format=st.sampled_from(["channels_last", "channels_first"]),
       seed=st.integers(0, 2**16))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ops_conv_gradients_hypothesis(dtype, case, data_format, seed):
    skip_dtype(dtype)
    check_ops_gradients(case, dtype, data_format, seed)


LAYER_CASES = [
    # filters, kernel_size, strides, padding, dilation, groups, C, data_format
    (6, 3, 1, "same", 1, 1, 4, "channels_last"),
    (6, (3, 2), (2, 1), "valid", 1, 1, 3, "channels_first"),
    (8, 3, 1, "same", (2, 1), 4, 8, "channels_last"),  # grouped, dilated
    (12, 3, 2, "same", 1, 6, 6, "channels_first"),  # depthwise, multiplier 2
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("config", LAYER_CASES, ids=str)
def test_layer_gradients_with_bias(config, dtype):
    """d/d(inputs, kernel, bias) through fastconv.Conv2D(activation="relu") by stateless_call:
    the path Keras' trainers take. (relu, not tanh: Keras' tanh on JAX float64 is itself off by
    ~1e-6 from numpy's, for Keras' layer as for fastconv's.)"""
    skip_dtype(dtype)
    filters, ksize, strides, padding, dilation, groups, c, data_format = config
    rng = np.random.default_rng(1)
    shape = (2, 9, 8, c) if data_format == "channels_last" else (2, c, 9, 8)
    x = rng.standard_normal(shape).astype(dtype)
    kwargs = dict(filters=filters, kernel_size=ksize, strides=strides, padding=padding,
                  dilation_rate=dilation, groups=groups, data_format=data_format,
                  activation="relu", dtype=dtype, kernel_initializer="zeros")
    layers = {"fastconv": fastconv.Conv2D(**kwargs)}
    if keras_comparable(groups, (1,), (1,), data_format):
        layers["keras"] = keras.layers.Conv2D(**kwargs)
    for layer in layers.values():
        layer.build(shape)
    k = rng.standard_normal(layers["fastconv"].kernel.shape).astype(dtype) * 0.3
    b = rng.standard_normal(filters).astype(dtype)
    sp = layers["fastconv"].strides
    dl = layers["fastconv"].dilation_rate
    z = reference.conv(x, k, sp, padding, dl, data_format)
    z = z + (b if data_format == "channels_last" else b[:, None, None])
    dy = rng.standard_normal(z.shape).astype(dtype)
    dz = dy * (z > 0)
    ref_dx, ref_dk = reference.grads(x, k, dz, sp, padding, dl, data_format)
    ref_db = dz.sum(axis=(0, 1, 2) if data_format == "channels_last" else (0, 2, 3))
    rtol = RTOL[dtype]
    results = {}
    for name, layer in layers.items():
        assert [v.path.split("/")[-1] for v in layer.trainable_variables] == ["kernel", "bias"]

        def loss(x, k, b, layer=layer):
            y, _ = layer.stateless_call([k, b], [], x)
            return keras.ops.sum(y * keras.ops.convert_to_tensor(dy))

        results[name] = autodiff(loss, x, k, b)
        for got, want, what in zip(results[name], (ref_dx, ref_dk, ref_db), "xkb"):
            reference.assert_close(got, want, rtol, f"{name} d/d{what}")
    if "keras" in results:
        for got, want, what in zip(results["fastconv"], results["keras"], "xkb"):
            reference.assert_close(got, want, rtol, f"fastconv vs Keras d/d{what}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_gradients(dtype):
    """float16/bfloat16 tensors compute in float32 and give gradients of their own dtype."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 6, 7, 4)).astype("float32")
    k = rng.standard_normal((3, 3, 2, 4)).astype("float32") * 0.3
    dy = rng.standard_normal((2, 6, 7, 4)).astype("float32")

    def loss(x, k):
        y = fastconv.ops.conv(keras.ops.cast(x, dtype), keras.ops.cast(k, dtype), padding="same")
        assert keras.backend.standardize_dtype(y.dtype) == dtype
        return keras.ops.sum(keras.ops.cast(y, "float32") * keras.ops.convert_to_tensor(dy))

    dx, dk = autodiff(loss, x, k)
    ref_dx, ref_dk = reference.grads(x, k, dy, (1, 1), "same")
    reference.assert_close(dx, ref_dx, 1e-2, "d/dinputs")
    reference.assert_close(dk, ref_dk, 1e-2, "d/dkernel")


# Finite differences: small float64 cases, with the central differences done by each backend's
# own checker. A convolution is linear in each argument, so they are exact up to rounding.
FD_CASES = [
    (1, 4, 5, 2, 2, 2, 3, 1, (1, 1), (1, 1), "same", "channels_last"),
    (1, 4, 5, 4, 3, 2, 4, 2, (2, 1), (1, 2), "valid", "channels_first"),
    (1, 4, 5, 3, 3, 2, 6, 3, (1, 2), (2, 1), "same", "channels_last"),  # depthwise x2
]


@pytest.mark.parametrize("fd_case", FD_CASES, ids=lambda c: _id(c[:-1]) + "-" + c[-1])
def test_finite_differences(fd_case):
    skip_dtype("float64")
    case, data_format = fd_case[:-1], fd_case[-1]
    x, k, _, args = make_case(case, "float64", data_format)

    def f(x, k):
        return fastconv.ops.conv(x, k, **args)

    if BACKEND == "torch":
        assert torch.autograd.gradcheck(
            f, (torch.tensor(x, requires_grad=True), torch.tensor(k, requires_grad=True)),
            eps=1e-6, atol=1e-8, rtol=1e-7)
    elif BACKEND == "jax":
        from jax.test_util import check_grads

        check_grads(f, (jnp.asarray(x), jnp.asarray(k)), order=1, modes=["rev"], eps=1e-3)
    else:
        theoretical, numerical = tf.test.compute_gradient(f, [tf.constant(x), tf.constant(k)])
        for t, n, what in zip(theoretical, numerical, ("inputs", "kernel")):
            assert np.abs(t).max() > 0.1
            reference.assert_close(t, n, 1e-7, f"Jacobian wrt {what}")


def test_jax_float64_in_child():
    """The float64 cases on JAX, in a fresh interpreter with JAX_ENABLE_X64=1 (channels_first
    ones only in float32 here: each case is a fresh XLA compilation, and time is short)."""
    if BACKEND != "jax" or JAX_X64:
        pytest.skip("JAX without x64 only: runs this file's float64 cases in a child process")
    env = dict(os.environ, JAX_ENABLE_X64="1", KERAS_BACKEND="jax")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "float64 and not channels_first or finite",
         os.path.abspath(__file__)],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
        capture_output=True, text=True, timeout=300)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


# ----------------------------------------------------------------------------------------------
# Second-order gradients: raise, never None or zeros.

SECOND_ORDER = "fastconv computes first-order gradients only"


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("wrt", ["kernel", "inputs"])
def test_second_order_raises(wrt, data_format):
    """The gradient of a gradient norm (a gradient penalty) raises a clear error."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 5, 3)).astype("float32")
    if data_format == "channels_first":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    k = rng.standard_normal((3, 3, 3, 4)).astype("float32")

    def conv(x, k):
        return fastconv.ops.conv(x, k, data_format=data_format)

    def grad_norm(x, k):
        """|d loss / d wrt|^2 for loss = sum(conv(x, k)^2), as a function of (x, k)."""
        if BACKEND == "jax":
            g = jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2),
                         argnums=0 if wrt == "inputs" else 1)(x, k)
            return jnp.sum(g ** 2)
        if BACKEND == "torch":
            y = conv(x, k)
            (g,) = torch.autograd.grad((y ** 2).sum(), x if wrt == "inputs" else k,
                                       create_graph=True)
            return (g ** 2).sum()
        with tf.GradientTape() as inner:
            inner.watch([x, k])
            loss = tf.reduce_sum(conv(x, k) ** 2)
        g = inner.gradient(loss, x if wrt == "inputs" else k)
        return tf.reduce_sum(g ** 2)

    with pytest.raises(NotImplementedError, match=SECOND_ORDER):
        grads = autodiff(grad_norm, x, k)
        pytest.fail(f"second-order gradient returned {grads!r}")
    if BACKEND == "tensorflow":
        with pytest.raises(NotImplementedError, match=SECOND_ORDER):
            tf.function(lambda x, k: autodiff_graph(grad_norm, x, k))(x, k)


def autodiff_graph(fn, x, k):
    with tf.GradientTape() as tape:
        tape.watch([x, k])
        loss = fn(x, k)
    return tape.gradient(loss, [x, k])


# ----------------------------------------------------------------------------------------------
# TensorFlow mechanics

only_tf = pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow only")


@only_tf
def test_tf_function_unknown_spatial_sizes():
    """Inside tf.function with unknown height/width, gradients are defined, shaped, correct."""
    rng = np.random.default_rng(4)
    k = tf.Variable(rng.standard_normal((3, 3, 3, 5)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32),
                                  tf.TensorSpec((None, None, None, 5), tf.float32)])
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fastconv.ops.conv(x, k, strides=2, padding="same")
            assert y.shape.as_list() == [None, None, None, 5]
            loss = tf.reduce_sum(y * dy)
        dx, dk = tape.gradient(loss, [x, k])
        assert dx.shape.as_list() == [None, None, None, 3]
        assert dk.shape.as_list() == [3, 3, 3, 5]
        return dx, dk

    for shape in [(2, 7, 9, 3), (1, 4, 4, 3)]:
        x = rng.standard_normal(shape).astype("float32")
        out = reference.conv(x, k.numpy(), (2, 2), "same")
        dy = rng.standard_normal(out.shape).astype("float32")
        dx, dk = step(x, dy)
        ref_dx, ref_dk = reference.grads(x, k.numpy(), dy, (2, 2), "same")
        reference.assert_close(dx.numpy(), ref_dx, 1e-4, "dx")
        reference.assert_close(dk.numpy(), ref_dk, 1e-4, "dk")
    assert len(step.get_concrete_function().graph.as_graph_def().node) > 0


@only_tf
def test_tf_layer_variables_gradient_in_tf_function():
    """What Keras' TF trainer does: a tape over the layer's variables inside tf.function."""
    rng = np.random.default_rng(5)
    layer = fastconv.Conv2D(4, 3, padding="same")
    x = rng.standard_normal((2, 6, 6, 3)).astype("float32")
    layer.build(x.shape)
    dy = rng.standard_normal((2, 6, 6, 4)).astype("float32")

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x) * dy)
        return tape.gradient(loss, layer.trainable_variables)

    dk, db = step(x)
    assert dk is not None and db is not None
    _, ref_dk = reference.grads(x, layer.kernel.numpy(), dy, (1, 1), "same")
    reference.assert_close(dk.numpy(), ref_dk, 1e-4, "dk")
    reference.assert_close(db.numpy(), dy.sum((0, 1, 2)), 1e-4, "db")


@only_tf
@pytest.mark.parametrize("route", ["record_operation", "custom_gradient"])
def test_tf_eager_tape_gradients(route, monkeypatch):
    """Eagerly the convolution is recorded on the tape by record_operation (tf.custom_gradient
    without its Identity op), or by tf.custom_gradient where that private API is missing: the
    layer's variables and the input get their gradients either way, also from a persistent tape
    asked twice and through a float16 result's cast."""
    from fastconv.backends import tensorflow as bridge

    if route == "custom_gradient":
        monkeypatch.setattr(bridge, "record_operation", None)
    else:
        assert bridge.record_operation is not None  # (this TensorFlow has it)

        def unused(*args):
            raise AssertionError("tf.custom_gradient called eagerly")

        monkeypatch.setattr(tf, "custom_gradient", unused)
    rng = np.random.default_rng(6)
    layer = fastconv.Conv2D(5, 3, padding="same", groups=1)
    x = tf.constant(rng.standard_normal((2, 7, 6, 4)).astype("float32"))
    layer.build(x.shape)
    dy = rng.standard_normal((2, 7, 6, 5)).astype("float32")
    ref_dx, ref_dk = reference.grads(x.numpy(), layer.kernel.numpy(), dy, (1, 1), "same")
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = layer(x)
        half = tf.reduce_sum(tf.cast(layer(x), "float16") * tf.constant(dy, "float16"))
    for _ in range(2):
        dx, dk, db = tape.gradient(y, [x, layer.kernel, layer.bias], output_gradients=dy)
        reference.assert_close(dx.numpy(), ref_dx, 1e-4, "dx")
        reference.assert_close(dk.numpy(), ref_dk, 1e-4, "dk")
        reference.assert_close(db.numpy(), dy.sum((0, 1, 2)), 1e-4, "db")
    dk16 = tape.gradient(half, layer.kernel)
    reference.assert_close(dk16.numpy(), ref_dk, 2e-2, "dk via float16")


# The C++ bridges' cases (TensorFlow ops, XLA custom calls):
# (x shape, kernel shape, strides, padding, dilation, bias, data_format)
FFI_CASES = [
    ((2, 9, 11, 8), (3, 3, 8, 16), (1, 1), "same", (1, 1), True, "channels_last"),
    ((2, 9, 11, 8), (3, 3, 2, 8), (2, 1), "valid", (1, 2), False, "channels_last"),  # groups 4
    ((2, 7, 7, 6), (3, 3, 1, 6), (1, 1), "same", (1, 1), True, "channels_last"),  # depthwise
    ((3, 7, 7, 16), (1, 1, 16, 40), (1, 1), "valid", (1, 1), True, "channels_last"),  # re-cut
    ((0, 5, 6, 4), (3, 3, 4, 5), (1, 1), "same", (1, 1), False, "channels_last"),  # empty
    ((2, 8, 9, 11), (3, 3, 8, 6), (2, 2), "same", (1, 1), True, "channels_first"),
    ((3, 16, 7, 7), (1, 1, 16, 12), (1, 1), "valid", (1, 1), False, "channels_first"),
    ((0, 4, 5, 6), (3, 3, 4, 5), (1, 1), "same", (1, 1), True, "channels_first"),  # empty
    # channels_first gradients that read NCHW x and dy as they are (host.nchw_gradients)
    ((2, 32, 14, 14), (3, 3, 4, 32), (1, 1), "same", (1, 1), True, "channels_first"),
    ((4, 16, 24, 20), (3, 3, 8, 32), (2, 1), "valid", (1, 1), False, "channels_first"),
    ((2, 16, 24, 20), (3, 3, 8, 16), (1, 1), "same", (2, 2), True, "channels_first"),
    ((2, 32, 12, 12), (3, 3, 1, 32), (1, 1), "same", (1, 1), True, "channels_first"),  # depthwise
    ((2, 16, 13, 15), (5, 5, 1, 16), (2, 2), "same", (1, 1), False, "channels_first"),
    # gradients on space-to-depth blocks (Geometry.blocks), built in the graph around the ops
    ((2, 15, 17, 3), (7, 7, 3, 8), (2, 2), "same", (1, 1), True, "channels_last"),  # a stem
    ((2, 3, 9, 10), (4, 4, 3, 5), (4, 4), "valid", (1, 1), False, "channels_first"),  # misses
    ((0, 9, 9, 2), (3, 3, 2, 4), (2, 2), "same", (1, 1), False, "channels_last"),  # empty
]


def _bridge_problem(case, seed):
    """x, kernel, bias (or None), spec, the reference result (bias included) and a dy of one of
    FFI_CASES."""
    x_shape, k_shape, strides, padding, dilation, with_bias, data_format = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(np.float32)
    k = rng.standard_normal(k_shape).astype(np.float32)
    b = rng.standard_normal(k_shape[3]).astype(np.float32) if with_bias else None
    spec = ConvSpec.make(strides, padding, data_format, dilation)
    expected = reference.conv(x, k, strides, padding, dilation, data_format)
    if with_bias:
        expected = expected + (b if data_format == "channels_last" else b[:, None, None])
    dy = rng.standard_normal(expected.shape).astype(np.float32)
    return x, k, b, spec, expected, dy


def _tf_ops():
    from fastconv.backends import tensorflow as bridge

    return bridge._OPS


@only_tf
def test_tf_ops_were_built():
    # (as test_jax_custom_calls_were_built: a compile error must not pass as a silent fallback
    # to tf.numpy_function)
    assert _tf_ops() is not None, ("fastconv._tf_ops was not built for this TensorFlow or does "
                                   "not load: reinstall fastconv and read the compiler's output")


@only_tf
@pytest.mark.parametrize("case", FFI_CASES)
def test_tf_function_runs_the_native_ops(case):
    # in a graph, float32 convolutions and both gradients run as fastconv's TensorFlow ops on
    # TensorFlow's tensors (no numpy_function): the same results, bias included, with a known
    # or an unknown batch size
    if _tf_ops() is None:
        pytest.skip("fastconv._tf_ops was not built")
    x_shape, k_shape, strides, padding, dilation, with_bias, data_format = case
    x, k, b, spec, expected, dy = _bridge_problem(case, 14)

    def conv(x, k):
        if with_bias:
            return fastconv.ops.conv_bias(x, k, b, spec)
        return fastconv.ops.conv(x, k, strides, padding, data_format, dilation)

    ref_dx, ref_dk = reference.grads(x, k, dy, strides, padding, dilation, data_format)
    for batch in (x_shape[0], None):
        signature = [tf.TensorSpec((batch, *x_shape[1:])), tf.TensorSpec(k_shape)]
        before = _tf_ops().calls()
        out = tf.function(conv, input_signature=signature)(x, k).numpy()
        assert _tf_ops().calls() == before + 1
        reference.assert_close(out, expected, 1e-4)
        for i, ref in enumerate((ref_dx, ref_dk)):
            @tf.function(input_signature=signature)
            def grad(x, k):
                with tf.GradientTape() as tape:
                    tape.watch([x, k])
                    loss = tf.reduce_sum(conv(x, k) * dy)
                return tape.gradient(loss, [x, k][i])

            before = _tf_ops().calls()
            value = grad(x, k).numpy()
            # only this gradient, the rest pruned; with an unknown batch size the forward too,
            # whose result's shape the gradient of reduce_sum reads
            assert _tf_ops().calls() == before + (1 if batch is not None else 2)
            reference.assert_close(value, ref, 1e-4)


BIAS_CASES = [c for c in FFI_CASES if c[5]]


def _all_gradients_reference(case, x, k, spec, dy):
    x_shape, k_shape, strides, padding, dilation, with_bias, data_format = case
    ref_dx, ref_dk = reference.grads(x, k, dy, strides, padding, dilation, data_format)
    return ref_dx, ref_dk, dy.astype(np.float64).sum(axis=spec.reduce_axes)


@only_tf
@pytest.mark.parametrize("case", BIAS_CASES)
def test_tf_function_bias_gradient_rides_on_grad_kernel(case):
    # a training step's three gradients in a graph: grad_input's op and grad_kernel's op with
    # the bias gradient (its second output), two native calls, all three right
    if _tf_ops() is None:
        pytest.skip("fastconv._tf_ops was not built")
    x_shape, k_shape = case[:2]
    x, k, b, spec, expected, dy = _bridge_problem(case, 16)
    refs = _all_gradients_reference(case, x, k, spec, dy)
    for batch in (x_shape[0], None):
        @tf.function(input_signature=[tf.TensorSpec((batch, *x_shape[1:])),
                                      tf.TensorSpec(k_shape), tf.TensorSpec(b.shape)])
        def grads(x, k, b):
            with tf.GradientTape() as tape:
                tape.watch([x, k, b])
                loss = tf.reduce_sum(fastconv.ops.conv_bias(x, k, b, spec) * dy)
            return tape.gradient(loss, [x, k, b])

        before = _tf_ops().calls()
        values = [v.numpy() for v in grads(x, k, b)]
        # (with an unknown batch size the forward too, as above)
        assert _tf_ops().calls() == before + (2 if batch is not None else 3)
        for value, ref, name in zip(values, refs, ("dx", "dk", "db")):
            reference.assert_close(value, ref, 1e-4, name)


@only_tf
def test_tf_ops_reuse_freed_outputs_and_overwrite_them_in_full():
    # large outputs (>= 1 MB) come from a cache of freed ones: a stride-2 1x1 convolution's dx
    # is zero at odd rows and columns, so its buffer, just freed by a forward output of the same
    # size full of 7680s, must be written everywhere, not only where taps land
    if _tf_ops() is None:
        pytest.skip("fastconv._tf_ops was not built")
    from fastconv.backends import tensorflow as bridge

    ops = _tf_ops()
    limit = ops.output_cache()[1]
    assert limit == bridge._output_cache_limit()  # 512 MB unless FASTCONV_TF_OUTPUT_CACHE_MB
    if "FASTCONV_TF_OUTPUT_CACHE_MB" not in os.environ:
        assert limit == 512 << 20
    ops.set_output_cache(64 << 20)
    try:
        rng = np.random.default_rng(5)
        x = rng.standard_normal((2, 64, 64, 64)).astype(np.float32)
        full_bytes = x.nbytes  # 2 MB
        k = rng.standard_normal((1, 1, 64, 32)).astype(np.float32)
        dy = rng.standard_normal((2, 32, 32, 32)).astype(np.float32)
        forward = tf.function(lambda x, k: fastconv.ops.conv(x, k, 1, "valid"))

        @tf.function
        def grad_x(x, k):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(fastconv.ops.conv(x, k, 2, "valid") * dy)
            return tape.gradient(loss, x)

        ref_dx = reference.grads(x, k, dy, (2, 2), "valid", (1, 1), "channels_last")[0]
        for i in range(3):
            full = forward(np.full_like(x, 2.0), np.full((1, 1, 64, 64), 60.0, np.float32))
            low = float(tf.reduce_min(full))
            del full  # back to the cache (not after the first, tracing call: pytest keeps it)
            kept, _, reuses = ops.output_cache()
            dx = grad_x(x, k).numpy()
            reference.assert_close(dx, ref_dx, 1e-4)
            if i:
                assert low == 7680.0 and kept >= full_bytes
                assert ops.output_cache()[2] == reuses + 1
        ops.set_output_cache(0)
        assert ops.output_cache()[0] == 0  # the kept buffers freed at once
        reference.assert_close(grad_x(x, k).numpy(), ref_dx, 1e-4)
        assert ops.output_cache()[0] == 0
    finally:
        ops.set_output_cache(limit)


@only_tf
@pytest.mark.parametrize("value", ["-1", "lots", "1.5"])
def test_tf_output_cache_size_is_checked(value):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", FASTCONV_TF_OUTPUT_CACHE_MB=value)
    proc = subprocess.run([sys.executable, "-c", "import fastconv.backends.tensorflow"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"ValueError: FASTCONV_TF_OUTPUT_CACHE_MB={value!r}" in proc.stderr, proc.stderr[-2000:]


@only_tf
@pytest.mark.parametrize("value", ["0", "100"])
def test_tf_output_cache_size_from_the_environment(value):
    if _tf_ops() is None:
        pytest.skip("fastconv._tf_ops was not built")
    env = dict(os.environ, KERAS_BACKEND="tensorflow", FASTCONV_TF_OUTPUT_CACHE_MB=value)
    code = ("from fastconv.backends import tensorflow as b; "
            "print('limit', b._OPS.output_cache()[1])")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert f"limit {int(value) << 20}" in proc.stdout, proc.stderr[-2000:]


CHANNELS_FIRST_CASES = [c for c in FFI_CASES if c[6] == "channels_first" and c[0][0] > 0]


def _nchw_as_is(case, batch=-1):
    """Whether the gradients of a channels_first case read NCHW x and dy as they are, a band
    of rows at a time (host.nchw_gradients): then nothing is transposed whole. batch None: a
    graph's unknown batch, which the TensorFlow bridge takes as 1."""
    from fastconv.backends import numpy as host

    spec = ConvSpec.make(case[2], case[3], "channels_first", case[4])
    x_shape = case[0] if batch == -1 else (batch or 1, *case[0][1:])
    return host.nchw_gradients(spec, spec.geometry(x_shape, case[1]))


def test_channels_first_cases_read_nchw_gradients_as_they_are_or_not():
    assert {_nchw_as_is(c) for c in CHANNELS_FIRST_CASES} == {False, True}


def _channels_first_step(case, seed):
    """x, kernel, bias (or None), the reference result, a loss(x, k, b) of the convolution and
    dy, and the reference gradients wrt x, k (and b)."""
    x, k, b, spec, expected, dy = _bridge_problem(case, seed)
    x_shape, k_shape, strides, padding, dilation, with_bias, data_format = case

    def conv(x, k, b):
        if b is not None:
            return fastconv.ops.conv_bias(x, k, b, spec)
        return fastconv.ops.conv(x, k, strides, padding, data_format, dilation)

    def loss(x, k, b):
        return keras.ops.sum(conv(x, k, b) * keras.ops.convert_to_tensor(dy))

    refs = _all_gradients_reference(case, x, k, spec, dy)
    return x, k, b, conv, loss, expected, refs[:3 if with_bias else 2]


@only_tf
@pytest.mark.parametrize("case", CHANNELS_FIRST_CASES)
def test_tf_function_channels_first_transposed_once_each(case):
    # channels_first in a graph: inference is one FastconvForward op (the kernels' channels_first
    # forward, no whole transposes); differentiated, where the gradients read NCHW x and dy as
    # they are (_nchw_as_is) no transposes either; elsewhere fastconv's transpose ops turn x
    # into NHWC once (its copy serves the forward and grad_kernel) and dy once for both
    # gradients; the result and dx are written NCHW by the ops, a band at a time (dx on
    # space-to-depth blocks transposed once)
    from fastconv.backends import numpy as host

    if _tf_ops() is None:
        pytest.skip("fastconv._tf_ops was not built")
    x, k, b, conv, loss, expected, refs = _channels_first_step(case, 18)
    spec = ConvSpec.make(case[2], case[3], "channels_first", case[4])
    blocked = host._blocks_unless(spec.nhwc, spec.geometry(x.shape, k.shape), np.float32,
                                  fastconv._dispatch.kernels.grad_input_gemm) is not None
    bias = None if b is None else tf.constant(b)
    for batch in (x.shape[0], None):
        signature = [tf.TensorSpec((batch, *x.shape[1:])), tf.TensorSpec(k.shape)]
        forward = tf.function(lambda x, k: conv(x, k, bias), input_signature=signature)
        ops = forward.get_concrete_function().graph.get_operations()
        assert sum(op.type == "FastconvTranspose" for op in ops) == 0
        assert [op.get_attr("nchw") for op in ops if op.type == "FastconvForward"] == [3]
        reference.assert_close(forward(x, k).numpy(), expected, 1e-4)

        @tf.function(input_signature=signature)
        def grads(x, k):
            wrt = [x, k] + ([] if bias is None else [bias])
            with tf.GradientTape() as tape:
                tape.watch(wrt)
                value = loss(x, k, bias)
            return tape.gradient(value, wrt)

        ops = grads.get_concrete_function().graph.get_operations()
        # the activations' transposes (samples first), and the kernel's regrouping for
        # grad_input: fastconv's transpose of each tap's (C, F) matrix where groups == 1
        swaps = [op for op in ops if op.type == "FastconvTranspose"]
        samples = [op for op in swaps if op.inputs[0].shape[0] in (batch, None)]
        dense = x.shape[1] == k.shape[2]
        assert (len(samples), len(swaps) - len(samples)) == (
            0 if _nchw_as_is(case, batch) else 2 + blocked, int(dense))
        for value, ref, name in zip(grads(x, k), refs, ("dx", "dk", "db")):
            reference.assert_close(value.numpy(), ref, 1e-4, name)


@only_tf
@pytest.mark.parametrize("case", CHANNELS_FIRST_CASES)
@pytest.mark.parametrize("activation", [None, "relu6", "swish"])
def test_tf_traced_channels_first_inference_differentiated(case, activation):
    # a function traced without a tape (its channels_first convolution one FastconvForward op
    # with NCHW x and result, the activation fused into it) and differentiated when a tape
    # watches its call: the op's registered gradient reads NCHW dy and x
    if _tf_ops() is None:
        pytest.skip("fastconv._tf_ops was not built")
    x, k, b, spec, expected, dy = _bridge_problem(case, 23)
    x_shape, k_shape, strides, padding, dilation, with_bias, data_format = case
    layer = fastconv.Conv2D(k_shape[-1], k_shape[:2], strides=strides, padding=padding,
                            data_format=data_format, dilation_rate=dilation,
                            groups=x_shape[1] // k_shape[2], use_bias=with_bias,
                            activation=activation)
    layer.build(x_shape)
    layer.set_weights([k, b] if with_bias else [k])
    forward = tf.function(lambda x: layer(x))
    ops = forward.get_concrete_function(tf.TensorSpec(x_shape)).graph.get_operations()
    # (a fused activation's op is a second one: the first, unused, is pruned when it runs)
    convs = [op for op in ops if op.type == "FastconvForward"]
    assert [op.get_attr("nchw") for op in convs] == [3] * (1 + (activation is not None))
    assert (convs[-1].get_attr("act") != 0) == (activation is not None)
    # the reference: the activation and its derivative applied to the float64 convolution
    pre = expected.astype(np.float64)
    if activation == "relu6":
        want, slope = np.clip(pre, 0, 6), (pre > 0) & (pre < 6)
    elif activation == "swish":
        sig = 1 / (1 + np.exp(-pre))
        want, slope = pre * sig, sig * (1 + pre * (1 - sig))
    else:
        want, slope = pre, 1.0
    refs = _all_gradients_reference(case, x, k, spec, dy * slope)
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = forward(x)
        value = tf.reduce_sum(y * dy)
    grads = tape.gradient(value, [x, *layer.trainable_variables])
    reference.assert_close(y.numpy(), want, 1e-4, "y")
    for got, ref, name in zip(grads, refs, ("dx", "dk", "db")):
        reference.assert_close(got.numpy(), ref, 1e-4, name)


@only_tf
@pytest.mark.parametrize("case", CHANNELS_FIRST_CASES)
def test_tf_eager_channels_first_transposed_once_each(case, monkeypatch):
    # eagerly, under a tape, channels_first runs between the host's transposes as in a graph:
    # four (x, the result, dy, dx), where the host's channels_first path took six (x and dy
    # again for the kernel gradient); none where the host's gradients read NCHW x and dy as
    # they are (_nchw_as_is: the host's path then)
    from fastconv.backends import numpy as host

    x, k, b, conv, loss, expected, refs = _channels_first_step(case, 19)
    calls = []  # activations (4-D; the gradient's kernel regrouping is a transpose too)
    transposed = host._transposed
    monkeypatch.setattr(host, "_transposed",
                        lambda a, *rest: calls.append(a.ndim == 4) or transposed(a, *rest))
    x, k = tf.constant(x), tf.Variable(k)
    bias = None if b is None else tf.Variable(b)
    wrt = [x, k] + ([] if bias is None else [bias])
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss(x, k, bias)
    grads = tape.gradient(value, wrt)
    assert sum(calls) == (0 if _nchw_as_is(case) else 4)
    for value, ref, name in zip(grads, refs, ("dx", "dk", "db")):
        reference.assert_close(value.numpy(), ref, 1e-4, name)


@pytest.mark.skipif(BACKEND != "torch", reason="torch only")
@pytest.mark.parametrize("case", CHANNELS_FIRST_CASES)
def test_torch_eager_channels_first_transposed_once_each(case, monkeypatch):
    # eagerly, channels_first with NCHW-contiguous x and dy: dy is transposed once for both
    # gradients, x for grad_kernel (the forward transposes x's rows in its kernel, a band at a
    # time); the result and dx are NCHW tensors with NHWC memory (no transposes). Each gradient
    # transposed its own dy before, and the forward x: four. Where the gradients read NCHW x
    # and dy as they are (_nchw_as_is), none (dx then NCHW in memory).
    import torch

    from fastconv.backends import numpy as host

    x, k, b, conv, loss, expected, refs = _channels_first_step(case, 20)
    dy = _bridge_problem(case, 20)[5]
    calls = []
    transposed = host._transposed
    monkeypatch.setattr(host, "_transposed",
                        lambda a, *rest: calls.append(a.ndim == 4) or transposed(a, *rest))
    x = torch.tensor(x, requires_grad=True)
    k = torch.tensor(k, requires_grad=True)
    bias = None if b is None else torch.tensor(b, requires_grad=True)
    wrt = [x, k] + ([] if bias is None else [bias])
    y = conv(x, k, bias)
    reference.assert_close(y.detach().numpy(), expected, 1e-4)
    assert y.permute(0, 2, 3, 1).is_contiguous() and sum(calls) == 0
    grads = torch.autograd.grad(y, wrt, torch.tensor(dy))
    assert sum(calls) == (0 if _nchw_as_is(case) else 2)
    for value, ref, name in zip(grads, refs, ("dx", "dk", "db")):
        reference.assert_close(value.numpy(), ref, 1e-4, name)


@only_tf
@pytest.mark.parametrize("case", FFI_CASES[:3])
def test_tf_function_without_the_native_ops(case, monkeypatch):
    # a build without fastconv._tf_ops (no TensorFlow at build time, or another version now):
    # graphs run the kernels through tf.numpy_function, with the same results
    from fastconv.backends import tensorflow as bridge

    monkeypatch.setattr(bridge, "_OPS", None)
    x_shape, k_shape, strides, padding, dilation, with_bias, data_format = case
    x, k, b, spec, expected, dy = _bridge_problem(case, 16)

    @tf.function
    def step(x, k):
        with tf.GradientTape() as tape:
            tape.watch([x, k])
            y = fastconv.ops.conv_bias(x, k, b, spec)
            loss = tf.reduce_sum(y * dy)
        return (y, *tape.gradient(loss, [x, k]))

    y, dx, dk = step(tf.constant(x), tf.constant(k))
    ops = {op.type for op in step.get_concrete_function(x, k).graph.get_operations()}
    assert not any(t.startswith("Fastconv") for t in ops)
    ref_dx, ref_dk = reference.grads(x, k, dy, strides, padding, dilation, data_format)
    reference.assert_close(y.numpy(), expected, 1e-4)
    reference.assert_close(dx.numpy(), ref_dx, 1e-4, "dx")
    reference.assert_close(dk.numpy(), ref_dk, 1e-4, "dk")


def _bias_problem(shape, seed):
    """x, kernel, bias, spec and dy of a channels_last 3x3 "same" convolution with a bias."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    k = rng.standard_normal((3, 3, shape[3], 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    dy = rng.standard_normal((*shape[:3], 5)).astype(np.float32)
    return x, k, b, ConvSpec.make(1, "same", "channels_last", 1), dy


@only_tf
@pytest.mark.parametrize("shape", [(2, 9, 11, 8), (0, 5, 6, 4)])
def test_tf_bias_gradient_runs_the_native_op(shape):
    # in a graph, a channels_last bias gradient is fastconv's op (the kernels' channel sums,
    # taken by grad_kernel's op), not TensorFlow's reduce_sum: one call when only the bias
    # gradient is asked for
    if _tf_ops() is None:
        pytest.skip("fastconv._tf_ops was not built")
    x, k, b, spec, dy = _bias_problem(shape, 21)
    for batch in (shape[0], None):
        @tf.function(input_signature=[tf.TensorSpec((batch, *shape[1:])), tf.TensorSpec((5,))])
        def grad(x, b):
            with tf.GradientTape() as tape:
                tape.watch(b)
                loss = tf.reduce_sum(fastconv.ops.conv_bias(x, k, b, spec) * dy)
            return tape.gradient(loss, b)

        before = _tf_ops().calls()
        value = grad(x, b).numpy()
        # with an unknown batch size the forward runs too (the gradient of reduce_sum reads
        # its result's shape)
        assert _tf_ops().calls() == before + (1 if batch is not None else 2)
        reference.assert_close(value, dy.sum((0, 1, 2)), 1e-4, "db")


@only_tf
def test_tf_native_ops_follow_set_num_threads():
    if _tf_ops() is None:
        pytest.skip("fastconv._tf_ops was not built")
    rng = np.random.default_rng(15)
    x = rng.standard_normal((4, 24, 24, 32)).astype(np.float32)
    k = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    fn = tf.function(lambda x, k: fastconv.ops.conv(x, k, padding="same"))
    two = fn(x, k).numpy()
    fastconv.set_num_threads(1)
    try:
        before = _tf_ops().calls()
        one = fn(x, k).numpy()
        assert _tf_ops().calls() == before + 1
    finally:
        fastconv.set_num_threads()
    np.testing.assert_array_equal(one, two)  # bit-identical on any thread count


# ----------------------------------------------------------------------------------------------
# JAX mechanics

only_jax = pytest.mark.skipif(BACKEND != "jax", reason="JAX only")


def _jax_problem(seed=6, groups=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 7, 6, 4)).astype("float32")
    k = rng.standard_normal((3, 3, 4 // groups, 6)).astype("float32")
    dy = rng.standard_normal((2, 4, 3, 6)).astype("float32")
    args = dict(strides=2, padding="same", dilation_rate=1)
    return x, k, dy, args


@only_jax
def test_jax_value_and_grad_under_jit():
    x, k, dy, args = _jax_problem(groups=2)

    @jax.jit
    def step(x, k, dy):
        return jax.value_and_grad(
            lambda x, k: jnp.sum(fastconv.ops.conv(x, k, **args) * dy), argnums=(0, 1))(x, k)

    value, (dx, dk) = step(x, k, dy)
    ref_dx, ref_dk = reference.grads(x, k, dy, (2, 2), "same")
    ref_value = np.sum(reference.conv(x, k, (2, 2), "same") * dy)
    assert abs(float(value) - ref_value) <= 1e-4 * abs(ref_value) + 1e-3
    reference.assert_close(dx, ref_dx, 1e-4, "dx")
    reference.assert_close(dk, ref_dk, 1e-4, "dk")
    # jitted again with another shape: retraced, still right
    value2, (dx2, _) = step(x[:1], k, dy[:1])
    reference.assert_close(dx2, reference.grads(x[:1], k, dy[:1], (2, 2), "same")[0], 1e-4)


@only_jax
@pytest.mark.parametrize("in_axes", [(0, None), (None, 0), (0, 0)])
def test_jax_vmap_conv(in_axes):
    x, k, _, args = _jax_problem()
    xs, ks = np.stack([x, x[::-1] * 2]), np.stack([k, -k[::-1]])
    batched = [xs if in_axes[0] == 0 else x, ks if in_axes[1] == 0 else k]
    out = jax.jit(jax.vmap(lambda x, k: fastconv.ops.conv(x, k, **args), in_axes))(*batched)
    for i in range(2):
        xi = xs[i] if in_axes[0] == 0 else x
        ki = ks[i] if in_axes[1] == 0 else k
        reference.assert_close(out[i], reference.conv(xi, ki, (2, 2), "same"), 1e-4, f"[{i}]")


@only_jax
def test_jax_vmap_of_grad():
    """Per-example gradients: vmap of jax.grad over the batch, each equal to the reference."""
    x, k, dy, args = _jax_problem()

    def loss(xi, k, dyi):
        return jnp.sum(fastconv.ops.conv(xi[None], k, **args) * dyi[None])

    dxs, dks = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None, 0)))(x, k, dy)
    assert dxs.shape == x.shape and dks.shape == (2,) + k.shape
    for i in range(2):
        rdx, rdk = reference.grads(x[i:i + 1], k, dy[i:i + 1], (2, 2), "same")
        reference.assert_close(dxs[i], rdx[0], 1e-4, f"dx[{i}]")
        reference.assert_close(dks[i], rdk, 1e-4, f"dk[{i}]")
    reference.assert_close(dks.sum(0), reference.grads(x, k, dy, (2, 2), "same")[1], 1e-4)


@only_jax
def test_jax_hessian_raises():
    """Forward-over-reverse: JAX's own rule for custom_vjp functions refuses forward mode."""
    x, k, _, args = _jax_problem()
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.hessian(lambda k: jnp.sum(fastconv.ops.conv(x, k, **args) ** 2))(k[:, :, :, :1])


# ----------------------------------------------------------------------------------------------
# torch mechanics

only_torch = pytest.mark.skipif(BACKEND != "torch", reason="torch only")

TORCH_ARGS = ([2, 1], "same", "channels_last", [1, 2])


def _torch_problem(dtype=None, requires_grad=True):
    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(7)
    x = torch.randn((2, 7, 8, 4), generator=g, dtype=dtype).requires_grad_(requires_grad)
    k = torch.randn((3, 2, 2, 6), generator=g, dtype=dtype).requires_grad_(requires_grad)
    return x, k


@only_torch
def test_torch_backward_and_needs_input_grad():
    x, k = _torch_problem()
    y = fastconv.ops.conv(x, k, strides=(2, 1), padding="same", dilation_rate=(1, 2))
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(8))
    (y * dy).sum().backward()
    ref_dx, ref_dk = reference.grads(x.detach(), k.detach(), dy, (2, 1), "same", (1, 2))
    reference.assert_close(x.grad, ref_dx, 1e-4, "dx")
    reference.assert_close(k.grad, ref_dk, 1e-4, "dk")
    # only the kernel requires grad: its gradient is still right, and the input gets none
    x2 = x.detach()
    k2 = k.detach().requires_grad_(True)
    (fastconv.ops.conv(x2, k2, strides=(2, 1), padding="same", dilation_rate=(1, 2)) * dy
     ).sum().backward()
    assert x2.grad is None
    reference.assert_close(k2.grad, ref_dk, 1e-4, "dk (kernel only)")


@only_torch
def test_torch_opcheck():
    x, k = _torch_problem()
    torch.library.opcheck(torch.ops.fastconv.conv2d.default, (x, k, None, *TORCH_ARGS))
    b = torch.randn((6,), requires_grad=True)
    torch.library.opcheck(torch.ops.fastconv.conv2d.default, (x, k, b, *TORCH_ARGS))
    y = torch.ops.fastconv.conv2d(x.detach(), k.detach(), None, *TORCH_ARGS)
    dy = torch.randn(y.shape)
    xd, kd = x.detach(), k.detach()
    torch.library.opcheck(torch.ops.fastconv.conv2d_grad_input.default,
                          (dy, kd, list(xd.shape), *TORCH_ARGS))
    torch.library.opcheck(torch.ops.fastconv.conv2d_grad_kernel.default,
                          (xd, dy, list(kd.shape), *TORCH_ARGS))
    ref_dx, ref_dk = reference.grads(xd, kd, dy, (2, 1), "same", (1, 2))
    reference.assert_close(
        torch.ops.fastconv.conv2d_grad_input(dy, kd, list(xd.shape), *TORCH_ARGS), ref_dx)
    reference.assert_close(
        torch.ops.fastconv.conv2d_grad_kernel(xd, dy, list(kd.shape), *TORCH_ARGS), ref_dk)


@only_torch
def test_torch_gradcheck_op():
    g = torch.Generator().manual_seed(11)
    x = torch.randn((1, 5, 4, 4), generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn((3, 2, 2, 4), generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn((4,), generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, k: torch.ops.fastconv.conv2d(x, k, None, *TORCH_ARGS), (x, k))
    assert torch.autograd.gradcheck(
        lambda x, k, b: torch.ops.fastconv.conv2d(x, k, b, *TORCH_ARGS), (x, k, b))


@only_torch
def test_torch_compile_function():
    x, k = _torch_problem()
    dy = torch.randn((2, 4, 8, 6), generator=torch.Generator().manual_seed(9))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(x, k):
        y = torch.ops.fastconv.conv2d(x, k, None, *TORCH_ARGS)
        return (torch.tanh(y) * dy).sum()

    loss = loss_fn(x, k)
    loss.backward()
    xd, kd = x.detach(), k.detach()
    z = reference.conv(xd, kd, (2, 1), "same", (1, 2))
    dz = dy.numpy() * (1 - np.tanh(z) ** 2)
    assert abs(loss.item() - np.sum(np.tanh(z) * dy.numpy())) < 1e-3
    ref_dx, ref_dk = reference.grads(xd, kd, dz, (2, 1), "same", (1, 2))
    reference.assert_close(x.grad, ref_dx, 1e-4, "dx")
    reference.assert_close(k.grad, ref_dk, 1e-4, "dk")


@only_torch
def test_torch_compile_model():
    """torch.compile (inductor) of a Keras model holding fastconv layers: forward and backward
    equal the uncompiled model's."""
    inputs = keras.Input((8, 8, 4))
    h = fastconv.Conv2D(6, 3, padding="same", activation="relu", groups=2)(inputs)
    h = fastconv.Conv2D(5, 3, strides=2)(h)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(h))
    x = torch.randn((3, 8, 8, 4), generator=torch.Generator().manual_seed(10))

    def run(fn):
        model.zero_grad()
        out = fn(x)
        (out ** 2).sum().backward()
        return out.detach().clone(), [v.value.grad.clone() for v in model.trainable_variables]

    eager_out, eager_grads = run(model)
    compiled_out, compiled_grads = run(torch.compile(model))
    reference.assert_close(compiled_out, eager_out, 1e-5, "output")
    for got, want in zip(compiled_grads, eager_grads):
        assert np.abs(want.numpy()).max() > 0
        reference.assert_close(got, want, 1e-5, "grad")


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit's dead-code elimination")
def test_jit_skips_a_gradient_nobody_uses(monkeypatch):
    # Training never needs the first layer's input gradient, nor a frozen layer's kernel
    # gradient: each gradient is its own callback, which jit drops when its result is unused.
    import jax
    import jax.numpy as jnp

    from fastconv.backends import numpy as host

    calls = []

    def counted(name, original):
        def run(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        return run

    from fastconv.backends import jax as bridge

    for name in ("grad_input", "grad_kernel"):
        monkeypatch.setattr(host, name, counted(name, getattr(host, name)))
    # without the XLA custom calls (tested below), the gradients run on the host through
    # pure_callbacks; 3 input channels and stride 2: the space-to-depth path; shapes no other
    # test uses: nothing compiled before holds the unpatched functions
    monkeypatch.setattr(bridge, "_FFI", None)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 11, 13, 3), np.float32))
    k = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 3, 7), np.float32))
    loss = lambda x, k: jnp.sum(fastconv.ops.conv(x, k, strides=2) ** 2)  # noqa: E731
    jax.block_until_ready(jax.jit(jax.grad(loss, argnums=1))(x, k))
    assert calls and set(calls) == {"grad_kernel"}  # (the blocked form calls itself once)
    calls.clear()
    jax.block_until_ready(jax.jit(jax.grad(loss, argnums=0))(x, k))
    assert calls and set(calls) == {"grad_input"}


def _ffi():
    try:
        from fastconv import _xla_ffi
    except ImportError:
        return None
    return _xla_ffi


@only_jax
def test_jax_custom_calls_were_built():
    # setup.py builds the C++ bridges with optional=True: a compile error there only prints a
    # warning, JAX falls back to pure_callback (copies, far slower) and the custom-call tests
    # skip. Where this jaxlib has the FFI headers the extension must exist.
    if not os.path.exists(os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "ffi.h")):
        pytest.skip("this jaxlib ships no XLA FFI headers")
    assert _ffi() is not None, ("fastconv._xla_ffi was not built or does not import: reinstall "
                                "fastconv and read the compiler's output")




@only_jax
@pytest.mark.skipif(_ffi() is None, reason="fastconv._xla_ffi was not built")
@pytest.mark.parametrize("case", FFI_CASES)
def test_jax_jit_runs_the_xla_custom_call(case):
    # under jax.jit, float32 channels_last forward convolutions run as an XLA custom call on
    # XLA's buffers (no pure_callback): the same results, bias included
    x_shape, k_shape, strides, padding, dilation, with_bias, data_format = case
    x, k, b, spec, expected, dy = _bridge_problem(case, 13)
    if with_bias:
        fn = jax.jit(lambda x, k, b: fastconv.ops.conv_bias(x, k, b, spec))
    else:
        fn = jax.jit(lambda x, k, b: fastconv.ops.conv(x, k, strides, padding, data_format,
                                                       dilation))
    before = _ffi().calls()
    out = np.asarray(fn(x, k, b))
    assert _ffi().calls() == before + (x.size > 0)  # (XLA skips a call with an empty result)
    reference.assert_close(out, expected, 1e-4)
    # and the gradients: each its own custom call, dropped by jit when unused
    loss = lambda x, k: jnp.sum(fn(x, k, b) * dy)  # noqa: E731
    ref_dx, ref_dk = reference.grads(x, k, dy, strides, padding, dilation, data_format)
    for argnum, ref in ((0, ref_dx), (1, ref_dk)):
        before = _ffi().calls()
        grad = np.asarray(jax.jit(jax.grad(loss, argnums=argnum))(x, k))
        # only this gradient (the loss is linear: jit drops the forward too), if not empty
        assert _ffi().calls() == before + (ref.size > 0)
        reference.assert_close(grad, ref, 1e-4)


@only_jax
@pytest.mark.skipif(_ffi() is None, reason="fastconv._xla_ffi was not built")
@pytest.mark.parametrize("case", BIAS_CASES)
def test_jax_jit_bias_gradient_rides_on_grad_kernel(case):
    # a training step's three gradients under jit: grad_input's custom call and grad_kernel's
    # with the bias gradient (its second result), all three right
    x, k, b, spec, expected, dy = _bridge_problem(case, 17)
    refs = _all_gradients_reference(case, x, k, spec, dy)
    loss = lambda x, k, b: jnp.sum(fastconv.ops.conv_bias(x, k, b, spec) * dy)  # noqa: E731
    before = _ffi().calls()
    values = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, k, b)
    # (XLA skips a call with an empty result: dx of an empty batch)
    assert _ffi().calls() == before + 1 + (x.size > 0)
    for value, ref, name in zip(values, refs, ("dx", "dk", "db")):
        reference.assert_close(np.asarray(value), ref, 1e-4, name)
    # kernel and bias (a frozen first layer): the one fused call
    before = _ffi().calls()
    dk, db = jax.jit(jax.grad(loss, argnums=(1, 2)))(x, k, b)
    assert _ffi().calls() == before + 1
    reference.assert_close(np.asarray(db), refs[2], 1e-4, "db")


def _jax_transposes(fn, *args):
    """How many of fastconv's transpose custom calls XLA kept in fn's compiled program."""
    return fn.lower(*args).compile().as_text().count('custom_call_target="fastconv_transpose"')


@only_jax
@pytest.mark.skipif(_ffi() is None, reason="fastconv._xla_ffi was not built")
@pytest.mark.parametrize("case", CHANNELS_FIRST_CASES)
def test_jax_jit_channels_first_transposed_once_each(case):
    # channels_first under jit: the forward alone is one custom call (the kernels' channels_first
    # forward, no whole transposes); differentiated, fastconv's transpose custom calls (XLA's
    # own transpose took 3-9x as long) turn x into NHWC once (its copy serves the forward and
    # grad_kernel) and dy once for both gradients; the result and dx are written NCHW by the
    # kernels, a band at a time (dx on space-to-depth blocks transposed once); none where the
    # gradients read NCHW x and dy as they are (_nchw_as_is)
    from fastconv.backends import numpy as host

    x, k, b, conv, loss, expected, refs = _channels_first_step(case, 18)
    spec = ConvSpec.make(case[2], case[3], "channels_first", case[4])
    blocked = host._blocks_unless(spec.nhwc, spec.geometry(x.shape, k.shape), np.float32,
                                  fastconv._dispatch.kernels.grad_input_gemm) is not None
    forward = jax.jit(conv)
    assert _jax_transposes(forward, x, k, b) == 0
    before = _ffi().calls()
    reference.assert_close(np.asarray(forward(x, k, b)), expected, 1e-4)
    assert _ffi().calls() == before + 1
    grads = jax.jit(jax.grad(loss, argnums=(0, 1) if b is None else (0, 1, 2)))
    assert _jax_transposes(grads, x, k, b) == (0 if _nchw_as_is(case) else 2 + blocked)
    for value, ref, name in zip(grads(x, k, b), refs, ("dx", "dk", "db")):
        reference.assert_close(np.asarray(value), ref, 1e-4, name)


@only_jax
@pytest.mark.skipif(_ffi() is None, reason="fastconv._xla_ffi was not built")
@pytest.mark.parametrize("shape", [(2, 9, 11, 8), (0, 5, 6, 4)])
def test_jax_bias_gradient_runs_the_custom_call(shape):
    # under jit, a channels_last bias gradient alone (a bias trained under a frozen kernel) is
    # fastconv's channel-sums custom call, not XLA's reduction nor grad_kernel's call; the
    # forward is dropped
    x, k, b, spec, dy = _bias_problem(shape, 22)
    grad = jax.jit(jax.grad(lambda b: jnp.sum(fastconv.ops.conv_bias(x, k, b, spec) * dy)))
    before = _ffi().calls()
    value = np.asarray(grad(b))
    assert _ffi().calls() == before + 1
    reference.assert_close(value, dy.sum((0, 1, 2)), 1e-4, "db")


@only_jax
@pytest.mark.skipif(_ffi() is None, reason="fastconv._xla_ffi was not built")
def test_jax_custom_call_follows_set_num_threads_after_compiling():
    x, k, _, args = _jax_problem()
    fn = jax.jit(lambda x, k: fastconv.ops.conv(x, k, **args))
    two = np.asarray(fn(x, k))
    fastconv.set_num_threads(1)
    try:
        before = _ffi().calls()
        one = np.asarray(fn(x, k))
        assert _ffi().calls() == before + 1
    finally:
        fastconv.set_num_threads()
    np.testing.assert_array_equal(one, two)  # bit-identical on any thread count


@pytest.mark.skipif(BACKEND == "numpy", reason="numpy has no autodiff")
def test_stacked_channels_first_gradients():
    """Two channels_first convolutions with a relu between: on torch the first result (and the
    gradient reaching it) is NCHW with NHWC memory, which the host takes without a copy; every
    gradient must still match the float64 reference."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 9, 8)).astype(np.float32)
    w1 = rng.standard_normal((3, 3, 6, 10)).astype(np.float32)
    w2 = rng.standard_normal((3, 3, 10, 4)).astype(np.float32)
    dy = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)

    def conv(a, w):
        return fastconv.ops.conv(a, w, padding="same", data_format="channels_first")

    def loss(x, w1, w2):
        return keras.ops.sum(conv(keras.ops.relu(conv(x, w1)), w2) * keras.ops.convert_to_tensor(dy))

    if BACKEND == "torch":
        import torch

        y = conv(torch.tensor(x), torch.tensor(w1))
        assert y.permute(0, 2, 3, 1).is_contiguous()  # the layout this test is about
    gx, gw1, gw2 = autodiff(loss, x, w1, w2)
    y1 = reference.conv(x, w1, padding="same", data_format="channels_first")
    a = np.maximum(y1, 0)
    da, dw2 = reference.grads(a, w2, dy, padding="same", data_format="channels_first")
    dx, dw1 = reference.grads(x, w1, da * (y1 > 0), padding="same", data_format="channels_first")
    reference.assert_close(gx, dx, name="dx")
    reference.assert_close(gw1, dw1, name="dw1")
    reference.assert_close(gw2, dw2, name="dw2")


@pytest.mark.skipif(BACKEND == "numpy", reason="numpy has no autodiff")
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_stacked_bias_gradients(data_format):
    """Bias gradients through two convolutions with a relu between, whatever memory layout dy
    reaches each with (on torch: contiguous, or NCHW with NHWC memory, summed by the kernels;
    an empty batch too), against the float64 reference."""
    spec = ConvSpec.make(1, "same", data_format, 1)
    cf = data_format == "channels_first"
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((3, 3, 6, 10)).astype(np.float32)
    w2 = rng.standard_normal((3, 3, 10, 4)).astype(np.float32)
    b1 = rng.standard_normal(10).astype(np.float32)
    b2 = rng.standard_normal(4).astype(np.float32)
    for n in (2, 0):
        x = rng.standard_normal((n, 6, 9, 8) if cf else (n, 9, 8, 6)).astype(np.float32)
        dy = rng.standard_normal((n, 4, 9, 8) if cf else (n, 9, 8, 4)).astype(np.float32)

        def loss(x, b1, b2):
            a = keras.ops.relu(fastconv.ops.conv_bias(x, w1, b1, spec))
            y = fastconv.ops.conv_bias(a, w2, b2, spec)
            return keras.ops.sum(y * keras.ops.convert_to_tensor(dy))

        _, g1, g2 = autodiff(loss, x, b1, b2)
        axes = (0, 2, 3) if cf else (0, 1, 2)
        shape = (1, -1, 1, 1) if cf else (1, 1, 1, -1)
        y1 = reference.conv(x, w1, padding="same", data_format=data_format) + b1.reshape(shape)
        da, _ = reference.grads(np.maximum(y1, 0), w2, dy, padding="same",
                                data_format=data_format)
        reference.assert_close(g2, dy.astype(np.float64).sum(axis=axes), name="db2")
        reference.assert_close(g1, (da * (y1 > 0)).sum(axis=axes), name="db1")
