"""Eager calls on TensorFlow: fastconv's layers run one FastconvForwardVariables op that reads
their kernel and bias variables itself in inference, record the host's convolution on the
variables' handles under a single tape (fastconv.backends.tensorflow.forward_variables), and take
the general path wherever those cannot serve. One pytest process per backend (conftest.py):
these run in the tensorflow one."""

import numpy as np
import pytest

from conftest import BACKEND

import keras  # noqa: E402  (after conftest)

import fastconv  # noqa: E402
from fastconv import _dispatch  # noqa: E402
from reference import assert_close, conv as ref_conv, depthwise_kernel, grads as ref_grads  # noqa: E402

pytestmark = pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's eager path")

if BACKEND == "tensorflow":
    import tensorflow as tf

    from fastconv.backends import tensorflow as bridge

ACTIVATIONS = {
    None: lambda z: z,
    "relu": lambda z: np.maximum(z, 0),
    "relu6": lambda z: np.clip(z, 0, 6),
    "silu": lambda z: z / (1 + np.exp(-z)),  # keras.activations.swish
    "tanh": np.tanh,  # not computed by the kernels: applied after the op
}


class Calls:
    """Kernel calls by the variables op and by the host (the general eager path)."""

    def __init__(self, monkeypatch):
        self.host = 0
        self.start = bridge._OPS.calls()
        real = _dispatch.kernels.forward

        def forward(*args, **kwargs):
            self.host += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(_dispatch.kernels, "forward", forward)

    @property
    def op(self):
        return bridge._OPS.calls() - self.start


@pytest.fixture
def calls(monkeypatch):
    if bridge._OPS is None:
        pytest.skip("fastconv._tf_ops not built")
    return Calls(monkeypatch)


def _conv_kernel(layer):
    """The layer's kernel as a convolution's (KH, KW, C // groups, F): a depthwise layer's
    (KH, KW, C, M) regrouped."""
    kernel = layer.get_weights()[0]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kernel = depthwise_kernel(kernel)
    return kernel


def _reference(layer, x):
    """The layer's function in float64 from its weights: the kernel regrouped for a depthwise
    layer, the bias and activation added."""
    weights = layer.get_weights()
    z = ref_conv(x, _conv_kernel(layer), layer.strides, layer.padding, layer.dilation_rate)
    if layer.use_bias:
        z = z + np.asarray(weights[1], np.float64)
    name = None if layer.activation is keras.activations.linear else layer.activation.__name__
    return ACTIVATIONS[name](z)


def _layer(cls, x_shape, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    layer = cls(**kwargs, bias_initializer="random_normal") if kwargs.get(
        "use_bias", True) else cls(**kwargs)
    layer.build(x_shape)
    return layer


CASES = [
    (fastconv.Conv2D, (2, 9, 11, 6), dict(filters=5, kernel_size=3)),
    (fastconv.Conv2D, (2, 9, 11, 6), dict(filters=6, kernel_size=3, groups=3, strides=2,
                                          padding="same", activation="relu")),
    (fastconv.Conv2D, (2, 13, 10, 6), dict(filters=4, kernel_size=3, dilation_rate=2,
                                           activation="relu6")),
    (fastconv.Conv2D, (2, 9, 11, 6), dict(filters=4, kernel_size=2, strides=2, use_bias=False,
                                          activation="tanh")),
    # 1x1 over 8x20x20 pixels: the kernels see them re-cut into wider rows (the op's view)
    (fastconv.Conv2D, (8, 20, 20, 6), dict(filters=7, kernel_size=1, activation="swish")),
    (fastconv.DepthwiseConv2D, (2, 9, 11, 6), dict(kernel_size=3, padding="same")),
    (fastconv.DepthwiseConv2D, (2, 9, 11, 6), dict(kernel_size=3, depth_multiplier=2,
                                                   activation="relu")),
    (fastconv.DepthwiseConv2D, (2, 12, 12, 5), dict(kernel_size=5, strides=2, padding="same",
                                                    use_bias=False)),
]


@pytest.mark.parametrize("cls, x_shape, kwargs", CASES)
def test_eager_inference_is_one_op_on_the_variables(calls, cls, x_shape, kwargs):
    x = np.random.default_rng(1).normal(size=x_shape).astype("float32")
    layer = _layer(cls, x_shape, **kwargs)
    out = layer(tf.constant(x))
    assert (calls.op, calls.host) == (1, 0)
    assert_close(out.numpy(), _reference(layer, x), rtol=1e-4)


@pytest.mark.parametrize("cls, x_shape, kwargs", [CASES[1], CASES[3], CASES[4], CASES[6]])
def test_channels_first_eager_inference_is_one_op(calls, cls, x_shape, kwargs):
    """channels_first: x and the result transposed inside the variables op (one op, no host
    call); an empty batch gives an empty result."""
    x = np.random.default_rng(5).normal(size=x_shape).astype("float32")
    layer = _layer(cls, x_shape, **kwargs)
    nchw = _layer(cls, (x_shape[0], x_shape[3], *x_shape[1:3]), data_format="channels_first",
                  **kwargs)
    nchw.set_weights(layer.get_weights())
    out = nchw(tf.constant(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    assert (calls.op, calls.host) == (1, 0)
    assert_close(out.numpy(), _reference(layer, x).transpose(0, 3, 1, 2), rtol=1e-4)
    empty = nchw(tf.zeros((0, x_shape[3], *x_shape[1:3])))
    assert tuple(empty.shape) == (0, *out.shape[1:])


def test_eager_inference_sees_new_weights(calls):
    """The op reads the variables at each call: assignments (set_weights, assign) show."""
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 4)).astype("float32")
    layer = _layer(fastconv.Conv2D, x.shape, filters=3, kernel_size=3)
    layer(x)
    rng = np.random.default_rng(3)
    layer.set_weights([rng.normal(size=w.shape) for w in layer.get_weights()])
    assert_close(layer(x).numpy(), _reference(layer, x), rtol=1e-4)
    layer.kernel.assign(layer.kernel * 2.0)
    layer.bias.assign_add(np.ones(3, np.float32))
    assert_close(layer(x).numpy(), _reference(layer, x), rtol=1e-4)
    assert (calls.op, calls.host) == (3, 0)


def test_eager_inference_odd_inputs(calls):
    """An empty batch gives an empty result; ints and float64 are cast first (to float32)."""
    layer = _layer(fastconv.DepthwiseConv2D, (None, 7, 7, 3), kernel_size=3)
    assert tuple(layer(tf.zeros((0, 7, 7, 3))).shape) == (0, 5, 5, 3)
    x = np.arange(2 * 7 * 7 * 3).reshape(2, 7, 7, 3) % 5
    for value in (x, x.astype("float64")):
        out = layer(tf.constant(value))
        assert out.dtype == tf.float32
        assert_close(out.numpy(), _reference(layer, x), rtol=1e-4)
    assert calls.host == 0


def _general(calls, layer, x):
    start = calls.op
    out = layer(x)
    assert calls.op == start  # not the variables op
    return out


def _keras_twin(layer, x_shape, *args, **kwargs):
    """keras.layers.Conv2D(*args, **kwargs), built for x_shape, with `layer`'s weights."""
    theirs = keras.layers.Conv2D(*args, **kwargs)
    theirs.build(x_shape)
    theirs.set_weights(layer.get_weights())
    return theirs


@pytest.mark.parametrize("persistent", [False, True])
def test_recorded_calls_give_keras_gradients(calls, persistent):
    """Under one tape (the variables op's convolution recorded on the variables' handles, both
    gradients one more op) and under a persistent one (the general path: the variables read as
    recorded ops, the host's convolution), the gradients are Keras' own."""
    x = tf.constant(np.random.default_rng(4).normal(size=(2, 8, 8, 4)).astype("float32"))
    layer = _layer(fastconv.Conv2D, x.shape, filters=3, kernel_size=3, activation="relu")
    theirs = _keras_twin(layer, x.shape, 3, 3, activation="relu")
    grads = []
    for lay in (layer, theirs):
        with tf.GradientTape(persistent=persistent) as tape:
            tape.watch(x)
            y = tf.reduce_sum(lay(x) ** 2)
        grads.append(tape.gradient(y, [x, *lay.trainable_variables]))
    assert (calls.op, calls.host) == ((0, 1) if persistent else (2, 0))
    for ours, ref in zip(*grads):
        assert ours is not None
        assert_close(ours.numpy(), ref.numpy(), rtol=1e-4)


# a 7x7/2 stem's gradients run on space-to-depth blocks (the host's), a 3x3's as one op
@pytest.mark.parametrize("kernel_size, strides", [(7, 2), (3, 1)])
def test_unwatched_input_gets_no_grad_input(monkeypatch, kernel_size, strides):
    """Eagerly, the gradient wrt an input no tape watches (a model's images) is never asked
    for: grad_input is skipped; the weights' gradients still equal Keras'. A watched input
    gets its gradient."""
    ran = []
    real = bridge.host.grad_input
    monkeypatch.setattr(bridge.host, "grad_input", lambda *a, **k: ran.append(1) or real(*a, **k))
    if bridge._OPS is not None:
        op = bridge._OPS.ops.fastconv_gradients
        # (sizes[16]: need_dx)
        monkeypatch.setattr(bridge._OPS.ops, "fastconv_gradients",
                            lambda *a, sizes: ran.extend([1] * sizes[16]) or op(*a, sizes=sizes))
    x = tf.constant(np.random.default_rng(5).normal(size=(2, 9, 9, 3)).astype("float32"))
    layer = _layer(fastconv.Conv2D, x.shape, filters=4, kernel_size=kernel_size,
                   strides=strides, padding="same")
    theirs = _keras_twin(layer, x.shape, 4, kernel_size, strides=strides, padding="same")
    for watch in (False, True):
        ran.clear()
        grads = []
        for lay in (layer, theirs):
            with tf.GradientTape() as tape:
                if watch:
                    tape.watch(x)
                y = tf.reduce_sum(lay(x) ** 2)
            grads.append(tape.gradient(y, [x, *lay.trainable_variables]))
        assert bool(ran) == watch
        assert (grads[0][0] is None) == (not watch) and (grads[1][0] is None) == (not watch)
        for ours, ref in zip(grads[0][1 - watch:], grads[1][1 - watch:]):
            assert_close(ours.numpy(), ref.numpy(), rtol=1e-4)


def test_general_path_where_the_op_does_not_serve(calls):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 8, 8, 4)).astype("float32")
    # a LoRA kernel is a sum of variables, not a variable
    layer = _layer(fastconv.Conv2D, x.shape, filters=3, kernel_size=3)
    layer.enable_lora(2)
    layer.lora_kernel_b.assign(rng.normal(size=layer.lora_kernel_b.shape))
    kernel = layer.get_weights()[0] + np.asarray(layer.lora_kernel_a) @ np.asarray(
        layer.lora_kernel_b) * (layer.lora_alpha / layer.lora_rank)
    ref = ref_conv(x, kernel) + layer.get_weights()[1]
    assert_close(_general(calls, layer, tf.constant(x)).numpy(), ref, rtol=1e-4)
    # tracing for export: Keras' own convolution
    layer = _layer(fastconv.DepthwiseConv2D, x.shape, kernel_size=3)
    host = calls.host
    with fastconv.keras_convolution():
        out = _general(calls, layer, tf.constant(x))
    assert calls.host == host
    assert_close(out.numpy(), _reference(layer, x), rtol=1e-4)
    # stateless_call: the values it is given, not the variables
    layer = _layer(fastconv.Conv2D, x.shape, filters=3, kernel_size=3)
    values = [rng.normal(size=v.shape).astype("float32") for v in layer.trainable_variables]
    out, _ = layer.stateless_call(values, [], tf.constant(x))
    assert calls.op == 0
    assert_close(out.numpy(), ref_conv(x, values[0]) + values[1], rtol=1e-4)
    # float16 compute dtype
    layer = _layer(fastconv.Conv2D, x.shape, filters=3, kernel_size=3, dtype="mixed_float16")
    out = _general(calls, layer, tf.constant(x))
    assert out.dtype == tf.float16
    assert_close(out.numpy().astype(np.float64), _reference(layer, x), rtol=5e-3)


def test_bad_input_fails_before_the_kernel(calls):
    layer = _layer(fastconv.Conv2D, (None, 8, 8, 4), filters=3, kernel_size=5)
    with pytest.raises(ValueError, match="(?i)input"):
        layer(tf.zeros((1, 3, 3, 4)))  # smaller than the kernel
    assert (calls.op, calls.host) == (0, 0)


def _ref_grads(layer, x, dy):
    """(dx, dkernel in the layer's kernel shape, dbias or None) in float64, activation-free."""
    dx, dk = ref_grads(x, _conv_kernel(layer), dy, layer.strides, layer.padding,
                       layer.dilation_rate)
    return (dx, dk.reshape(layer.kernel.shape), dy.sum((0, 1, 2)) if layer.use_bias else None)


TAPED = [case for case in CASES if case[2].get("activation") in (None, "tanh")] + [
    (fastconv.Conv2D, (2, 9, 11, 6), dict(filters=6, kernel_size=3, groups=3, strides=2,
                                          padding="same")),
    (fastconv.Conv2D, (2, 15, 13, 3), dict(filters=4, kernel_size=7, strides=2,
                                           padding="same")),  # gradients on blocks
    # channels_first: gradients that read NCHW x and dy as they are (host.nchw_gradients)
    (fastconv.Conv2D, (2, 14, 14, 32), dict(filters=32, kernel_size=3, groups=8,
                                            padding="same")),
    # the gradients op: a 1x1's pixels re-cut (its view), no bias, a depth multiplier
    (fastconv.Conv2D, (8, 20, 20, 6), dict(filters=7, kernel_size=1)),
    (fastconv.Conv2D, (2, 9, 11, 6), dict(filters=4, kernel_size=3, groups=2, use_bias=False)),
    (fastconv.DepthwiseConv2D, (2, 9, 11, 6), dict(kernel_size=3, depth_multiplier=2)),
]


def _taped(layer, x):
    """(layer(x), the tape that watched x, the names the bridge recorded on it)."""
    reads = []
    real = bridge.record_operation
    bridge.record_operation = lambda name, *a: reads.append(name) or real(name, *a)
    try:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
    finally:
        bridge.record_operation = real
    return y, tape, reads


@pytest.mark.parametrize("cls, x_shape, kwargs", TAPED)
def test_one_tape_records_the_variables_op_on_the_handles(calls, cls, x_shape, kwargs):
    """Under one non-persistent tape: the variables op's convolution (which also gives the
    kernel's value; no recorded variable read), its gradients wrt the input and the variables
    equal the reference's: one op (FastconvGradients) where the kernels take the arrays as they
    are (host.direct_gradients), else the host's."""
    from fastconv.geometry import ConvSpec

    rng = np.random.default_rng(7)
    x = tf.constant(rng.normal(size=x_shape).astype("float32"))
    layer = _layer(cls, x_shape, **kwargs)
    y, tape, reads = _taped(layer, x)
    assert reads == ["FastconvConv2D"] and (calls.op, calls.host) == (1, 0)
    name = kwargs.get("activation")
    assert_close(y.numpy(), _reference(layer, x.numpy()), rtol=1e-4)
    dz = rng.normal(size=y.shape).astype("float32")
    got = tape.gradient(y, [x, *layer.trainable_variables], output_gradients=dz)
    if name == "tanh":  # applied by TensorFlow after the convolution
        dz = dz * (1 - y.numpy().astype(np.float64) ** 2)
    for ours, ref, what in zip(got, _ref_grads(layer, x.numpy(), dz), "x kernel bias".split()):
        assert_close(ours.numpy(), ref, rtol=1e-4, name=what)
    spec = ConvSpec.make(layer.strides, layer.padding, "channels_last", layer.dilation_rate)
    kernel = _conv_kernel(layer)
    direct = bridge.host.direct_gradients(spec, spec.geometry(x_shape, kernel.shape))
    assert (calls.op, calls.host) == (1 + direct, 0)


@pytest.mark.parametrize("cls, x_shape, kwargs", TAPED)
def test_channels_first_one_tape_is_the_variables_op(calls, cls, x_shape, kwargs, monkeypatch):
    """channels_first under one tape: the same one op (x and the result transposed inside it),
    recorded on the handles; the gradients wrt the NCHW input and the variables are the
    reference's. Where the gradients read NCHW x and dy as they are (host.nchw_gradients),
    neither the op nor the host transposes anything whole."""
    from fastconv.backends import numpy as host
    from fastconv.geometry import ConvSpec

    transposed = []
    real = host._transposed
    monkeypatch.setattr(host, "_transposed",
                        lambda a, *rest: transposed.append(a.ndim) or real(a, *rest))
    rng = np.random.default_rng(17)
    x = rng.normal(size=x_shape).astype("float32")
    layer = _layer(cls, x_shape, **kwargs)
    nchw = _layer(cls, (x_shape[0], x_shape[3], *x_shape[1:3]), data_format="channels_first",
                  **kwargs)
    nchw.set_weights(layer.get_weights())
    t = tf.constant(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    y, tape, reads = _taped(nchw, t)
    assert reads == ["FastconvConv2D"] and (calls.op, calls.host) == (1, 0)
    expected = _reference(layer, x)
    assert_close(y.numpy(), expected.transpose(0, 3, 1, 2), rtol=1e-4)
    dz = rng.normal(size=expected.shape).astype("float32")  # (NHWC)
    got = tape.gradient(y, [t, *nchw.trainable_variables],
                        output_gradients=np.ascontiguousarray(dz.transpose(0, 3, 1, 2)))
    if kwargs.get("activation") == "tanh":
        dz = dz * (1 - expected ** 2)
    ref = _ref_grads(layer, x, dz)
    assert_close(got[0].numpy(), ref[0].transpose(0, 3, 1, 2), rtol=1e-4, name="x")
    for ours, want, what in zip(got[1:], ref[1:], ("kernel", "bias")):
        assert_close(ours.numpy(), want, rtol=1e-4, name=what)
    spec = ConvSpec.make(nchw.strides, nchw.padding, "channels_first", nchw.dilation_rate)
    if cls is fastconv.Conv2D and host.nchw_gradients(
            spec, spec.geometry(t.shape, nchw.kernel.shape)):
        assert 4 not in transposed


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_one_tape_empty_batch(data_format):
    """An empty batch under one tape: an empty result, an empty dx, zero kernel and bias
    gradients."""
    shape = (0, 7, 7, 4) if data_format == "channels_last" else (0, 4, 7, 7)
    layer = _layer(fastconv.Conv2D, shape, filters=3, kernel_size=3, padding="same",
                   data_format=data_format)
    x = tf.zeros(shape)
    for _ in range(2):  # (the second call from the plan)
        y, tape, _ = _taped(layer, x)
        dx, dk, db = tape.gradient(y, [x, layer.kernel, layer.bias],
                                   output_gradients=tf.zeros(y.shape))
        out_shape = (0, 7, 7, 3) if data_format == "channels_last" else (0, 3, 7, 7)
        assert tuple(y.shape) == out_shape and tuple(dx.shape) == shape
        assert not np.any(dk.numpy()) and not np.any(db.numpy())


@pytest.mark.parametrize("sparse", [False, True])
def test_one_tape_gradients_use_the_forward_values(sparse):
    """A variable assigned between the forward and the gradient: the gradients are those of the
    values the forward read, as with Keras' own layer; also for a variable that a sparse update
    has put in copy-on-read mode (whose reads are copies)."""
    rng = np.random.default_rng(8)
    x = tf.constant(rng.normal(size=(2, 8, 8, 4)).astype("float32"))
    dz = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    layer = _layer(fastconv.Conv2D, x.shape, filters=3, kernel_size=3, padding="same")
    theirs = _keras_twin(layer, x.shape, 3, 3, padding="same")
    grads = []
    for lay in (layer, theirs):
        if sparse:  # (TensorFlow then updates the buffer in place: a read must be a copy)
            lay.kernel.value.scatter_add(tf.IndexedSlices(tf.zeros((1, 3, 4, 3)), [0]))
        lay(x)  # (the second call, under the tape, runs from the plan)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = lay(x)
        if sparse:
            lay.kernel.value.scatter_add(tf.IndexedSlices(2.0 * lay.kernel.value, tf.range(3)))
        else:
            lay.kernel.assign(lay.kernel * 3.0)
        grads.append(tape.gradient(y, [x, lay.kernel], output_gradients=dz))
    for ours, ref in zip(*grads):
        assert_close(ours.numpy(), ref.numpy(), rtol=1e-4)
    ref_dx, _ = ref_grads(x.numpy(), layer.kernel.numpy() / 3.0, dz, padding="same")
    assert_close(grads[0][0].numpy(), ref_dx, rtol=1e-4)


def test_one_tape_gradient_recorded_by_an_outer_tape_raises():
    """An outer tape that watches only dy sees the inner tape's call as unwatched but records
    the gradient's computation: differentiating that raises, as on the general path."""
    x = tf.constant(np.random.default_rng(9).normal(size=(1, 6, 6, 2)).astype("float32"))
    z = tf.constant(np.ones((1, 6, 6, 3), np.float32))
    layer = _layer(fastconv.Conv2D, x.shape, filters=3, kernel_size=3, padding="same")
    with tf.GradientTape(watch_accessed_variables=False) as outer:
        outer.watch(z)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = layer(x)
        dx = inner.gradient(y, x, output_gradients=z * 2.0)
        penalty = tf.reduce_sum(dx ** 2)
    with pytest.raises(NotImplementedError, match="first-order gradients only"):
        outer.gradient(penalty, z)


def test_tape_watching_nothing_read_runs_the_variables_op(calls):
    """A tape that watches nothing the call reads: the inference op, no recording."""
    x = tf.constant(np.random.default_rng(10).normal(size=(2, 8, 8, 4)).astype("float32"))
    layer = _layer(fastconv.Conv2D, x.shape, filters=3, kernel_size=3)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        y = layer(x)
    assert (calls.op, calls.host) == (1, 0)
    assert tape.gradient(y, layer.kernel) is None
    assert_close(y.numpy(), _reference(layer, x.numpy()), rtol=1e-4)


def test_frozen_layer_gradients_as_keras():
    """A frozen layer's variables stay trainable tf.Variables, which a tape watches when they
    are read: Keras' layer gives them gradients there, and so does fastconv's."""
    x = tf.constant(np.random.default_rng(11).normal(size=(2, 8, 8, 4)).astype("float32"))
    layer = _layer(fastconv.Conv2D, x.shape, filters=3, kernel_size=3)
    theirs = _keras_twin(layer, x.shape, 3, 3)
    grads = []
    for lay in (layer, theirs):
        lay.trainable = False
        with tf.GradientTape() as tape:
            y = tf.reduce_sum(lay(x) ** 2)
        grads.append(tape.gradient(y, [lay.kernel, lay.bias]))
    for ours, ref in zip(*grads):
        assert (ours is None) == (ref is None)
        if ref is not None:
            assert_close(ours.numpy(), ref.numpy(), rtol=1e-4)


class Planned:
    """forward_variables calls (the general way's checks) beside calls.op (variables ops)."""

    def __init__(self, monkeypatch):
        self.made = 0
        real = bridge.forward_variables

        def forward_variables(*args, **kwargs):
            self.made += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(bridge, "forward_variables", forward_variables)


@pytest.mark.parametrize("cls, x_shape, kwargs", [CASES[1], CASES[3], CASES[5], CASES[6]])
def test_repeated_calls_run_the_kept_plan(calls, monkeypatch, cls, x_shape, kwargs):
    """The second call of a shape runs the op from the first call's plan (no forward_variables),
    with the same result, and so does a call one tape records (with the reference's
    gradients); another shape, a persistent tape and a new thread count take the general way
    (the persistent tape makes no plan; each thread count keeps its own)."""
    planned = Planned(monkeypatch)
    rng = np.random.default_rng(12)
    x = rng.normal(size=x_shape).astype("float32")
    layer = _layer(cls, x_shape, **kwargs)
    first = layer(tf.constant(x)).numpy()
    second = layer(tf.constant(x)).numpy()
    assert (planned.made, calls.op, calls.host) == (1, 2, 0)
    np.testing.assert_array_equal(first, second)
    assert_close(second, _reference(layer, x), rtol=1e-4)
    other = rng.normal(size=(1, *x_shape[1:])).astype("float32")
    assert_close(layer(tf.constant(other)).numpy(), _reference(layer, other), rtol=1e-4)
    assert planned.made == 2
    ops = calls.op
    if kwargs.get("activation") in (None, "tanh"):
        dz = rng.normal(size=first.shape).astype("float32")
        t = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = layer(t)
        got = tape.gradient(y, [t, layer.kernel], output_gradients=dz)
        # (the forward, and both gradients as one op where the plan has them)
        plan = layer.__dict__["_fastconv_plans"][x_shape, _dispatch.get_num_threads()]
        assert (planned.made, calls.op) == (2, ops + 1 + (plan.gradients_sizes is not None))
        ops = calls.op
        if kwargs.get("activation") == "tanh":
            dz = dz * (1 - y.numpy().astype(np.float64) ** 2)
        for ours, ref in zip(got, _ref_grads(layer, x, dz)):
            assert_close(ours.numpy(), ref, rtol=1e-4)
    with tf.GradientTape(persistent=True) as tape:
        y = layer(tf.constant(x))
    assert planned.made == 3 and calls.op == ops and tape.gradient(y, layer.kernel) is not None
    threads = _dispatch.get_num_threads()
    _dispatch.set_num_threads(threads)  # (as the benchmark does before every call)
    layer(tf.constant(x))
    assert planned.made == 3
    try:
        _dispatch.set_num_threads(1 if threads != 1 else 2)
        assert_close(layer(tf.constant(x)).numpy(), _reference(layer, x), rtol=1e-4)
        assert planned.made == 4
        layer(tf.constant(x))
        assert planned.made == 4
    finally:
        _dispatch.set_num_threads(threads)
    layer(tf.constant(x))  # (each thread count keeps its plan)
    assert planned.made == 4 and calls.op == ops + 4


def test_a_changed_layer_or_call_does_not_run_an_old_plan(calls, monkeypatch):
    """After a planned call: an activity regularizer, LoRA, a new kernel variable, a mask, a
    stateless call, a trace for export and a subclass's own call each get what they would
    without plans."""
    rng = np.random.default_rng(13)
    x = tf.constant(rng.normal(size=(2, 6, 6, 3)).astype("float32"))

    def planned_layer():
        layer = _layer(fastconv.Conv2D, x.shape, filters=2, kernel_size=3)
        layer(x)
        assert layer.__dict__.get("_fastconv_plans")
        return layer

    layer = planned_layer()
    layer.activity_regularizer = keras.regularizers.L2(0.5)
    layer(x)
    assert len(layer.losses) == 1

    layer = planned_layer()
    layer.enable_lora(1)
    layer.lora_kernel_b.assign(np.ones(layer.lora_kernel_b.shape, np.float32))
    kernel = layer.kernel.numpy()  # the LoRA sum
    assert_close(layer(x).numpy(), ref_conv(x.numpy(), kernel) + layer.bias.numpy(), rtol=1e-4)

    layer = planned_layer()
    new = rng.normal(size=layer.kernel.shape).astype("float32")
    layer._tracker.unlock()  # (as Keras' quantize() does)
    layer._kernel = layer.add_weight(shape=new.shape, initializer=keras.initializers.Constant(new))
    assert_close(layer(x).numpy(), ref_conv(x.numpy(), new) + layer.bias.numpy(), rtol=1e-4)

    layer = planned_layer()
    masked = tf.identity(x)
    keras.src.backend.set_keras_mask(masked, keras.ops.ones((2, 6, 6), "bool"))
    with pytest.warns(UserWarning, match="does not support masking"):
        layer(masked)

    values = [rng.normal(size=v.shape).astype("float32") for v in layer.trainable_variables]
    out, _ = layer.stateless_call(values, [], x)
    assert_close(out.numpy(), ref_conv(x.numpy(), values[0]) + values[1], rtol=1e-4)

    host = calls.host
    with fastconv.keras_convolution():
        out = layer(x)
    assert calls.host == host
    assert_close(out.numpy(), _reference(layer, x.numpy()), rtol=1e-4)

    class Doubled(fastconv.Conv2D):
        def call(self, inputs):
            return 2.0 * super().call(inputs)

    layer = Doubled(2, 3)
    layer.build(x.shape)
    layer(x)
    assert not layer.__dict__.get("_fastconv_plans")
    assert_close(layer(x).numpy(), 2.0 * _reference(layer, x.numpy()), rtol=1e-4)


def test_a_layer_keeps_few_plans():
    layer = _layer(fastconv.DepthwiseConv2D, (1, 4, 4, 2), kernel_size=3)
    for size in range(3, 40):
        layer(tf.zeros((1, size, size, 2)))
        assert 1 <= len(layer.__dict__["_fastconv_plans"]) <= 16


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("dy_shape", [(2, 7, 8, 3), (1, 8, 8, 3), (3,)])
def test_output_gradients_of_another_shape_raise(persistent, dy_shape):
    """TensorFlow's tape hands output_gradients over as given: one of another shape than the
    result raises a ValueError naming both shapes (one tape: before the gradients op, which
    would read it as the result's shape; a persistent one: the general path), not a gradient
    computed from the wrong sizes."""
    x = tf.constant(np.random.default_rng(13).normal(size=(2, 8, 8, 4)).astype("float32"))
    layer = _layer(fastconv.Conv2D, x.shape, filters=3, kernel_size=3, padding="same")
    for _ in range(2):
        layer(x)  # (the second call keeps a plan)
    with tf.GradientTape(persistent=persistent) as tape:
        tape.watch(x)
        y = layer(x)
    with pytest.raises(ValueError, match=r"output's shape \(2, 8, 8, 3\)"):
        tape.gradient(y, [x, layer.kernel], output_gradients=tf.ones(dy_shape))
