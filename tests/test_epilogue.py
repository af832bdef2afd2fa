"""Epilogues: BatchNormalization (inference) and ReLU / ReLU6 computed by the convolution before
them. fastconv.layers.BatchNormalization, ReLU and Activation are Keras' layers on every backend;
on TensorFlow, in a graph without a gradient tape, they fold into the FastconvForward op that made
their input, and on JAX, under jax.jit not differentiated inside, into its custom call. One
pytest process per backend (see conftest.py)."""

import numpy as np
import pytest

from conftest import BACKEND, to_numpy

import keras  # noqa: E402  (after conftest: torch before keras)

import fastconv  # noqa: E402
from fastconv import layers  # noqa: E402
from reference import assert_close, conv as ref_conv, depthwise_kernel  # noqa: E402

if BACKEND == "tensorflow":
    import tensorflow as tf

only_tf = pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's folds")
only_jax = pytest.mark.skipif(BACKEND != "jax", reason="JAX's folds")
TRAINS = BACKEND != "numpy"


def _bn_weights(layer, rng):
    # gamma and moving variance positive, the rest signed: every term of the fold matters
    for v in layer.weights:
        positive = v.name in ("gamma", "moving_variance")
        v.assign(rng.uniform(0.5, 1.5, v.shape) if positive else rng.normal(size=v.shape))


def _bn_reference(z, weights, epsilon):
    gamma, beta, mean, var = (np.asarray(w, np.float64) for w in weights)
    return (z - mean) / np.sqrt(var + epsilon) * gamma + beta


@pytest.mark.parametrize("keras_cls, fast_cls, kwargs", [
    (keras.layers.BatchNormalization, layers.BatchNormalization, {"momentum": 0.9}),
    (keras.layers.BatchNormalization, layers.BatchNormalization, {"center": False, "scale": False}),
    (keras.layers.ReLU, layers.ReLU, {"max_value": 6.0}),
    (keras.layers.ReLU, layers.ReLU, {"negative_slope": 0.1, "threshold": 0.5}),
    (keras.layers.Activation, layers.Activation, {"activation": "relu6"}),
    (keras.layers.Activation, layers.Activation, {"activation": "tanh"}),
])
def test_twins_are_keras_layers(keras_cls, fast_cls, kwargs):
    """Alone (no convolution before them) the twins compute Keras' function, with its config,
    weights and registered names."""
    rng = np.random.default_rng(0)
    ours, theirs = fast_cls(name="twin", **kwargs), keras_cls(name="twin", **kwargs)
    assert isinstance(ours, keras_cls) and ours.get_config() == theirs.get_config()
    assert keras.saving.get_registered_name(fast_cls) == f"fastconv>{keras_cls.__name__}"
    x = rng.normal(size=(2, 5, 5, 4)).astype("float32")
    ours.build(x.shape), theirs.build(x.shape)
    if theirs.weights:
        _bn_weights(theirs, rng)
        ours.set_weights(theirs.get_weights())
    for training in (False, True):
        # a numpy array (converted by Keras' __call__ except on numpy) and a tensor of this
        # backend (on the plain-call path), each twice: training updates the moving statistics
        for xx in (x, keras.ops.convert_to_tensor(x)):
            np.testing.assert_allclose(to_numpy(ours(xx, training=training)),
                                       to_numpy(theirs(xx, training=training)),
                                       rtol=1e-6, atol=1e-6)
        for a, b in zip(ours.weights, theirs.weights):
            np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-6, atol=1e-6)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(ours))
    assert type(clone) is fast_cls and clone.get_config() == ours.get_config()


def test_twins_take_training_from_the_outer_call():
    """A BatchNormalization twin called without `training` inside a model's call gets the
    model's `training` from Keras' call context, as Keras' own does."""

    class Block(keras.Model):
        def __init__(self):
            super().__init__()
            self.bn = layers.BatchNormalization(momentum=0.5)

        def call(self, x, training=None):
            return self.bn(x)

    model = Block()
    x = keras.ops.convert_to_tensor(np.random.default_rng(1).normal(
        3.0, 1.0, size=(4, 3, 3, 2)).astype("float32"))
    model(x, training=False)
    assert np.all(to_numpy(model.bn.moving_mean) == 0)
    model(x, training=True)
    assert np.all(to_numpy(model.bn.moving_mean) > 1)


def _block_model(seed=0, data_format="channels_last"):
    """Convolutions, each followed by what may fold into it, and a few patterns that must not
    fold (BatchNormalization after an activation, a convolution's result used twice)."""
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    shape = (12, 12, 6) if data_format == "channels_last" else (6, 12, 12)
    axis = -1 if data_format == "channels_last" else 1
    kw = {"data_format": data_format}
    bn = keras.layers.BatchNormalization
    inp = keras.Input(shape)
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="c1", **kw)(inp)
    h = bn(axis=axis, name="bn1")(h)
    h = keras.layers.ReLU(6.0, name="relu6")(h)
    h = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw", **kw)(h)
    h = bn(axis=axis, name="bn2")(h)
    h = keras.layers.Activation("relu", name="relu")(h)
    h = keras.layers.Conv2D(24, 1, name="c2", **kw)(h)  # 1x1: the re-cut path
    h = bn(axis=axis, center=False, name="bn3")(h)
    h = keras.layers.Activation("swish", name="swish")(h)
    a = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c3", **kw)(h)
    a = bn(axis=axis, name="bn4")(a)  # after the activation: no fold
    b = keras.layers.Conv2D(8, 1, name="c4", **kw)(h)
    # c4's result used twice: bn5 does not fold (c4 would run twice: once for the leaky ReLU)
    b2 = keras.layers.ReLU(negative_slope=0.2, name="leaky")(b)
    b1 = bn(axis=axis, scale=False, name="bn5")(b)
    out = keras.layers.Concatenate(axis=axis)([a, b1, b2])
    model = keras.Model(inp, out)
    for layer in model.layers:
        if isinstance(layer, bn):
            _bn_weights(layer, rng)
    x = rng.normal(size=(3, *shape)).astype("float32")
    return model, x


def _numpy_forward(model, x):
    """_block_model's function in float64 numpy from its weights (the independent reference)."""
    L = model.get_layer
    cf = L("c1").data_format == "channels_first"
    x = np.asarray(x, np.float64)
    x = x.transpose(0, 2, 3, 1) if cf else x

    def conv(name, z):
        layer = L(name)
        k = to_numpy(layer.kernel)
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            k = depthwise_kernel(k)
        z = ref_conv(z, k, layer.strides, layer.padding)
        return z + to_numpy(layer.bias) if layer.use_bias else z

    def norm(name, z):
        layer = L(name)
        gamma = to_numpy(layer.gamma) if layer.scale else 1.0
        beta = to_numpy(layer.beta) if layer.center else 0.0
        return _bn_reference(z, [gamma, beta, to_numpy(layer.moving_mean),
                                 to_numpy(layer.moving_variance)], layer.epsilon)

    h = np.clip(norm("bn1", conv("c1", x)), 0, 6)
    h = np.maximum(norm("bn2", conv("dw", h)), 0)
    h = norm("bn3", conv("c2", h))
    h = h / (1 + np.exp(-h))
    a = norm("bn4", np.maximum(conv("c3", h), 0))
    b = conv("c4", h)
    out = np.concatenate([a, norm("bn5", b), np.where(b >= 0, b, 0.2 * b)], axis=-1)
    return out.transpose(0, 3, 1, 2) if cf else out


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_converted_blocks_match_reference(data_format):
    model, x = _block_model(data_format=data_format)
    expected = _numpy_forward(model, x)
    assert_close(to_numpy(model.predict_on_batch(x)), expected, name="keras")
    converted = fastconv.convert(model)
    assert sum(type(layer).__module__.startswith("fastconv") for layer in converted.layers) \
        == len(converted.layers) - 2  # all but the input and the concatenation
    assert_close(to_numpy(converted.predict_on_batch(x)), expected, name="predict")
    assert_close(to_numpy(converted(x, training=False)), expected, name="eager call")
    if TRAINS:
        # training: BatchNormalization's batch statistics, nothing folds
        assert_close(to_numpy(converted(x, training=True)), to_numpy(model(x, training=True)),
                     name="training call")
    reverted = fastconv.revert(converted)
    assert all(not type(layer).__module__.startswith("fastconv") for layer in reverted.layers)


def _fastconv_ops(graph):
    return [op for op in graph.get_operations() if op.type == "FastconvForward"]


@only_tf
def test_tf_inference_graph_folds_and_prunes():
    """In a tf.function, each foldable layer becomes part of its convolution's op, and the ops
    whose results nobody uses any more do not run: one kernel call per convolution (bn5 does
    not fold: c4's result is also the leaky ReLU's input, which Keras may call after bn5)."""
    from fastconv.backends import tensorflow as bridge

    model, x = _block_model()
    converted = fastconv.convert(model)
    fn = tf.function(lambda t: converted(t, training=False))
    graph = fn.get_concrete_function(tf.TensorSpec(x.shape)).graph
    activated = [op for op in _fastconv_ops(graph) if op.get_attr("act")]
    folded = [op for op in _fastconv_ops(graph) if op.inputs[3].shape[0] != 0]
    assert len(activated) == 4  # ReLU6, Activation("relu" / "swish"), Conv2D(activation="relu")
    assert len(folded) >= 4  # the BatchNormalizations after convolutions, not after a ReLU
    assert not [op for op in graph.get_operations()
                if op.type in ("Relu", "Relu6", "Sigmoid", "Swish", "_MklSwish")]
    expected = _numpy_forward(model, x)
    fn(x)
    calls = bridge._OPS.calls()
    assert_close(to_numpy(fn(x)), expected)
    assert not any(op.name.split("/")[-2].startswith("bn5") for op in _fastconv_ops(graph))
    assert bridge._OPS.calls() - calls == 5, "one kernel call per convolution"


def _jax_calls(hlo):
    """The fastconv_forward custom calls of compiled HLO text: (operand shapes, backend_config)."""
    import re

    return re.findall(r'custom_call_target="fastconv_forward", operand_layout_constraints='
                      r'\{([^}]*\}[^}]*\}[^}]*\}[^}]*\})\}.*?backend_config=\{([^}]*)\}', hlo)


@only_jax
def test_jax_jit_folds_and_drops():
    """Under jax.jit in inference each foldable layer becomes part of its convolution's custom
    call, and XLA drops the calls whose results nobody uses any more: one kernel call per
    convolution, the activations computed by the kernels (bn5 does not fold, as on TF)."""
    import jax

    from fastconv import _xla_ffi

    model, x = _block_model()
    converted = fastconv.convert(model)
    fn = jax.jit(lambda tv, ntv, t: converted.stateless_call(tv, ntv, t, training=False)[0])
    args = ([v.value for v in converted.trainable_variables],
            [v.value for v in converted.non_trainable_variables])
    hlo = fn.lower(*args, x).compile().as_text()
    calls = _jax_calls(hlo)
    assert len(calls) == 5, "one custom call per convolution"
    assert sum("act = 0 " not in config for _, config in calls) == 4  # c1, dw, c2, c3
    assert sum(not operands.endswith("f32[0]{0}") for operands, _ in calls) == 3  # bn1-bn3
    assert "logistic" not in hlo  # the swish
    expected = _numpy_forward(model, x)
    jax.block_until_ready(fn(*args, x))  # (dispatch is asynchronous)
    before = _xla_ffi.calls()
    assert_close(to_numpy(fn(*args, x)), expected)
    assert _xla_ffi.calls() - before == 5
    assert_close(to_numpy(converted.predict_on_batch(x)), expected, name="predict")


@only_jax
def test_jax_fold_record_holds_no_tracers():
    """The record of traced results that folding layers look up lets go of them when their
    trace ends: jax.checking_leaks finds no tracer left behind, and the record is empty."""
    import gc

    import jax

    from fastconv.backends import jax as bridge

    model, x = _block_model(seed=2)
    converted = fastconv.convert(model)
    fn = jax.jit(lambda tv, ntv, t: converted.stateless_call(tv, ntv, t, training=False)[0])
    args = ([v.value for v in converted.trainable_variables],
            [v.value for v in converted.non_trainable_variables])
    with jax.checking_leaks():
        y = fn(*args, x)
    gc.collect()
    assert not bridge._SOURCES
    assert_close(to_numpy(y), _numpy_forward(model, x))


@only_jax
def test_jax_gradients_through_folded_calls():
    """jax.grad of a jitted inference-mode function (where the folds happen: its trace is not
    differentiated inside) equals Keras': the folded calls' own gradient, through the
    activation, BatchNormalization's weights and the convolution."""
    import jax

    model, x = _block_model(seed=1)
    converted = fastconv.convert(model)

    def grads(m):
        def loss(tv, ntv, t):
            y = m.stateless_call(tv, ntv, t, training=False)[0]
            return (y * y).sum()
        return jax.grad(jax.jit(loss), argnums=(0, 2))(
            [v.value for v in m.trainable_variables],
            [v.value for v in m.non_trainable_variables], x)

    ours, theirs = grads(converted), grads(model)
    names = [v.path for v in model.trainable_variables] + ["x"]
    for a, b, name in zip(ours[0] + [ours[1]], theirs[0] + [theirs[1]], names):
        assert_close(to_numpy(a), to_numpy(b), name=name)


@only_tf
def test_tf_loaded_model_folds_the_same(tmp_path):
    """A converted model saved and loaded (.keras) folds as before: which results have other
    users is read from the loaded functional graph."""
    from fastconv.backends import tensorflow as bridge

    model, x = _block_model(seed=2)
    path = str(tmp_path / "blocks.keras")
    fastconv.convert(model).save(path)
    loaded = keras.saving.load_model(path)
    fn = tf.function(lambda t: loaded(t, training=False))
    fn(x)
    calls = bridge._OPS.calls()
    assert_close(to_numpy(fn(x)), _numpy_forward(model, x))
    assert bridge._OPS.calls() - calls == 5, "one kernel call per convolution"


@only_tf
def test_tf_gradients_through_folded_ops():
    """tf.gradients of a graph holding folded ops (their registered gradient) equals Keras'."""
    model, x = _block_model(seed=1)
    converted = fastconv.convert(model)

    def grads(m):
        @tf.function
        def fn(t):
            y = m(t, training=False)
            loss = tf.reduce_sum(y * y)
            return tf.gradients(loss, [t] + [v.value for v in m.trainable_variables])
        return [g.numpy() for g in fn(tf.constant(x))]

    assert any(op.get_attr("act") for op in _fastconv_ops(
        tf.function(lambda t: converted(t, training=False)).get_concrete_function(
            tf.TensorSpec(x.shape)).graph))
    for ours, theirs, name in zip(grads(converted), grads(model),
                                  ["x"] + [v.path for v in model.trainable_variables]):
        assert_close(ours, theirs, name=name)


@only_tf
def test_tf_tape_keeps_layers_apart():
    """Under a gradient tape (a training step, or fine-tuning with BatchNormalization in
    inference mode) nothing folds, and the gradients are Keras'."""
    model, x = _block_model(seed=2)
    converted = fastconv.convert(model)

    def step(m):
        @tf.function
        def fn(t):
            with tf.GradientTape() as tape:
                y = m(t, training=False)
                loss = tf.reduce_sum(y * y)
            return tape.gradient(loss, m.trainable_variables)
        graph = fn.get_concrete_function(tf.TensorSpec(x.shape)).graph
        return [g.numpy() for g in fn(tf.constant(x))], graph

    ours, graph = step(converted)
    theirs, _ = step(model)
    assert not [op for op in _fastconv_ops(graph) if op.get_attr("act")]
    for a, b, v in zip(ours, theirs, model.trainable_variables):
        assert_close(a, b, name=v.path)


def _bn_step(layer, x, dy, training, compiled):
    """(loss, gradients wrt x and the trainable weights, moving statistics, graph or None) of
    sum(layer(x) * dy), on TensorFlow (compiled: in a tf.function) or torch."""
    if BACKEND == "tensorflow":
        x, dy = tf.constant(x), tf.constant(dy)

        def step(t):
            with tf.GradientTape() as tape:
                tape.watch(t)
                loss = tf.reduce_sum(layer(t, training=training) * dy)
            return loss, tape.gradient(loss, [t, *layer.trainable_weights])
        graph = None
        if compiled:
            step = tf.function(step)
            graph = step.get_concrete_function(x).graph
        loss, grads = step(x)
    else:
        import torch

        x, dy = torch.tensor(x, requires_grad=True), torch.tensor(dy)
        loss = (layer(x, training=training) * dy).sum()
        grads = torch.autograd.grad(loss, [x, *[v.value for v in layer.trainable_weights]])
        graph = None
    return (to_numpy(loss), [to_numpy(g) for g in grads],
            [to_numpy(v) for v in layer.non_trainable_weights], graph)


@pytest.mark.skipif(BACKEND not in ("tensorflow", "torch"),
                    reason="the twin is Keras' own on JAX and numpy")
@pytest.mark.parametrize("kwargs", [{}, {"center": False, "scale": False, "epsilon": 1e-6},
                                    {"momentum": 0.5}])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("compiled", [False, True])
def test_batchnorm_fused_matches_keras(kwargs, training, compiled):
    """The BatchNormalization twin on its own (TensorFlow in training: one FusedBatchNormV3
    op; torch: torch's batch_norm): Keras' outputs, gradients and moving statistics."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(3, 5, 4, 6)) * 2 + 1).astype("float32")
    dy = rng.normal(size=x.shape).astype("float32")
    ours, theirs = layers.BatchNormalization(**kwargs), keras.layers.BatchNormalization(**kwargs)
    ours.build(x.shape), theirs.build(x.shape)
    _bn_weights(theirs, rng)
    ours.set_weights(theirs.get_weights())
    loss, grads, stats, graph = _bn_step(ours, x, dy, training, compiled)
    ref_loss, ref_grads, ref_stats, _ = _bn_step(theirs, x, dy, training, compiled)
    if graph is not None and training:
        assert [op for op in graph.get_operations() if "FusedBatchNorm" in op.type]
    assert_close(loss, ref_loss, name="loss")
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, name="gradient")
    for a, b in zip(stats, ref_stats):
        assert_close(a, b, rtol=1e-5, name="moving statistics")
