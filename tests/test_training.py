"""Training with fastconv.Conv2D follows keras.layers.Conv2D step for step.

Each test builds the same small CNN twice, once with Keras' Conv2D and once with fastconv's, gives
both the same initial weights, trains both the same way and compares losses and weights: fit,
evaluate, train_on_batch, each backend's custom loop, regularizers, constraints, frozen layers,
LoRA and mixed precision. On TensorFlow Keras' own grouped conv must not run in this process (it
goes through XLA and corrupts the heap here): grouped twins run on jax and torch only, and a
grouped SGD step is checked against the float64 reference on every backend. The numpy backend
cannot train: there, Keras' own error is expected.
"""

import numpy as np
import pytest

import fastconv
import reference
from conftest import BACKEND, to_numpy

import keras  # noqa: E402  (conftest imported torch first where needed)

TRAINS = BACKEND in ("tensorflow", "jax", "torch")
trains = pytest.mark.skipif(not TRAINS, reason="the numpy backend cannot train (see below)")
LOSS_RTOL = 2e-3  # per-epoch loss, fastconv vs Keras
N, H, W, C, CLASSES = 32, 8, 8, 4, 3


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, H, W, C)).astype("float32")
    y = rng.integers(0, CLASSES, N)
    return x, y


def cnn(conv, grouped=False, dtype=None, **first):
    """Two convolutions (grouped + depthwise x2 when `grouped`), pooling, a dense head."""
    inputs = keras.Input((H, W, C))
    h = conv(8, 3, padding="same", activation="relu", groups=2 if grouped else 1, dtype=dtype,
             name="conv1", **first)(inputs)
    h = conv(16, 3, strides=2, groups=8 if grouped else 1, activation="relu", dtype=dtype,
             name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(dtype=dtype)(h)
    outputs = keras.layers.Dense(CLASSES, dtype=dtype)(h)
    return keras.Model(inputs, outputs)


def twins(grouped=False, dtype=None, **first):
    """(Keras' model, fastconv's model) holding the same initial weights."""
    if grouped and BACKEND == "tensorflow":
        pytest.skip("no Keras grouped conv in the TF process: see test_grouped_sgd_step")
    keras.utils.set_random_seed(1)
    ref = cnn(keras.layers.Conv2D, grouped, dtype, **first)
    fast = cnn(fastconv.Conv2D, grouped, dtype, **first)
    assert isinstance(fast.get_layer("conv1"), fastconv.Conv2D)
    fast.set_weights(ref.get_weights())
    return ref, fast


def compile_both(*models, **kwargs):
    for m in models:
        m.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), **kwargs)


def fit_both(ref, fast, epochs=3, **kwargs):
    x, y = data()
    return [m.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, **kwargs)
            .history["loss"] for m in (ref, fast)]


def rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def assert_losses(fast, ref, rtol=LOSS_RTOL):
    assert len(fast) == len(ref)
    assert all(np.isfinite(fast)), fast
    diff = rel_diff(fast, ref)
    print(f"[{BACKEND}] per-epoch loss fastconv {np.round(fast, 6).tolist()} vs Keras "
          f"{np.round(ref, 6).tolist()}: max relative difference {diff:.2e}")
    assert diff <= rtol, f"losses {fast} vs Keras {ref}: relative {diff:.2e} > {rtol:g}"


def assert_weights(fast, ref, rtol=1e-3):
    for a, b, v in zip(fast.get_weights(), ref.get_weights(), ref.weights):
        reference.assert_close(a, b, rtol, v.path)


@trains
@pytest.mark.parametrize("grouped", [False, True], ids=["dense", "grouped+depthwise"])
def test_fit_follows_keras(grouped):
    ref, fast = twins(grouped)
    initial = fast.get_weights()
    compile_both(ref, fast)
    if BACKEND == "jax":
        assert fast.jit_compile is True  # the layer must not switch off the JAX trainer's jit
    ref_loss, fast_loss = fit_both(ref, fast)
    assert fast_loss[-1] < fast_loss[0], "fastconv's model did not learn"
    assert_losses(fast_loss, ref_loss)
    assert_weights(fast, ref)
    # every convolution weight moved (a None gradient would leave a kernel where it was)
    for layer in ("conv1", "conv2"):
        before = initial[[v.path for v in fast.weights].index(f"{layer}/kernel")]
        assert not np.allclose(to_numpy(fast.get_layer(layer).kernel), before)
    x, y = data(1)
    ev = [m.evaluate(x, y, batch_size=16, verbose=0) for m in (ref, fast)]
    assert rel_diff(ev[1], ev[0]) <= LOSS_RTOL
    reference.assert_close(fast.predict(x, verbose=0), ref.predict(x, verbose=0), 1e-3)


def cnn_channels_first(conv, grouped=False):
    """cnn's model, its convolutions channels_first on NHWC images permuted to NCHW: the same
    weights compute the same function as cnn's."""
    inputs = keras.Input((H, W, C))
    h = keras.layers.Permute((3, 1, 2))(inputs)
    h = conv(8, 3, padding="same", activation="relu", groups=2 if grouped else 1,
             data_format="channels_first", name="conv1")(h)
    h = conv(16, 3, strides=2, groups=8 if grouped else 1, activation="relu",
             data_format="channels_first", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(data_format="channels_first")(h)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(h))


@trains
@pytest.mark.parametrize("grouped", [False, True], ids=["dense", "grouped+depthwise"])
def test_fit_channels_first_follows_keras_channels_last(grouped):
    # channels_first layers in a trainer's graphs (TF: the ops read and write NCHW, a band at a
    # time; JAX: the channels_first custom calls; torch: NHWC memory between layers) train as
    # Keras' channels_last twin does (Keras' own channels_first needs oneDNN on TF's CPU)
    if grouped and BACKEND == "tensorflow":
        pytest.skip("no Keras grouped conv in the TF process: see test_grouped_sgd_step")
    keras.utils.set_random_seed(1)
    ref = cnn(keras.layers.Conv2D, grouped)
    fast = cnn_channels_first(fastconv.Conv2D, grouped)
    fast.set_weights(ref.get_weights())
    compile_both(ref, fast)
    ref_loss, fast_loss = fit_both(ref, fast)
    assert fast_loss[-1] < fast_loss[0], "fastconv's model did not learn"
    assert_losses(fast_loss, ref_loss)
    assert_weights(fast, ref)
    x, _ = data(1)
    reference.assert_close(fast.predict(x, verbose=0), ref.predict(x, verbose=0), 1e-3)


@pytest.mark.skipif(BACKEND != "tensorflow", reason=(
    "TF only: JAX jits by default (checked in test_fit_follows_keras); torch.compile of the "
    "whole train step takes a minute here, torch.compile of a model is in test_gradients.py"))
def test_fit_with_jit_compile_true():
    """TF cannot put tf.numpy_function under XLA: with jit_compile=True Keras' trainer warns and
    trains without XLA (the layer says supports_jit=False), like Keras' own layer otherwise."""
    ref, fast = twins()
    compile_both(ref)
    with pytest.warns(UserWarning, match="jit_compile"):
        compile_both(fast, jit_compile=True)
    assert fast.jit_compile is False
    ref_loss, fast_loss = fit_both(ref, fast, epochs=2)
    assert_losses(fast_loss, ref_loss)
    assert_weights(fast, ref)


@trains
def test_train_on_batch():
    ref, fast = twins()
    compile_both(ref, fast, metrics=["accuracy"])
    x, y = data()
    losses = {m: [] for m in ("ref", "fast")}
    for i in range(4):
        for name, m in (("ref", ref), ("fast", fast)):
            losses[name].append(m.train_on_batch(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8])[0])
    assert_losses(losses["fast"], losses["ref"])
    assert_weights(fast, ref)


@pytest.mark.parametrize("grouping", [1, 3, 6], ids=["dense", "grouped", "depthwise"])
def test_grouped_sgd_step(grouping):
    """One SGD step of a single fastconv layer moves kernel and bias by -lr * the float64
    reference's gradient: grouped training checked without Keras' grouped conv (so on TF too)."""
    if not TRAINS:
        pytest.skip("the numpy backend cannot train")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 7, 6, 6)).astype("float32")
    layer = fastconv.Conv2D(6, 3, strides=(2, 1), padding="same", groups=grouping)
    model = keras.Sequential([keras.Input((7, 6, 6)), layer, keras.layers.Flatten()])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    k0, b0 = (np.array(w) for w in layer.get_weights())
    t = rng.standard_normal((4, 4 * 6 * 6)).astype("float32")
    model.train_on_batch(x, t)
    y = reference.conv(x, k0, (2, 1), "same") + b0
    dy = 2 * (y.reshape(t.shape) - t).reshape(y.shape) / t.size  # mean squared error
    _, dk = reference.grads(x, k0, dy, (2, 1), "same")
    k1, b1 = layer.get_weights()
    reference.assert_close(k1 - k0, -0.5 * dk, 1e-3, "kernel step")
    reference.assert_close(b1 - b0, -0.5 * dy.sum((0, 1, 2)), 1e-3, "bias step")


@trains
def test_custom_training_loop():
    """Each backend's own loop: tf.GradientTape, jax.value_and_grad + stateless_call,
    torch loss.backward() + a torch optimizer."""
    ref, fast = twins()
    initial = [to_numpy(fast.get_layer(n).kernel).copy() for n in ("conv1", "conv2")]
    x, y = data()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    losses = [run_loop(m, x, y, loss_fn) for m in (ref, fast)]
    assert_losses(losses[1], losses[0])
    assert_weights(fast, ref)
    for name, before in zip(("conv1", "conv2"), initial):
        assert not np.allclose(to_numpy(fast.get_layer(name).kernel), before), name


def run_loop(model, x, y, loss_fn, steps=6, lr=0.1):
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 8 * steps, 8) if i < len(x)]
    batches = (batches * 2)[:steps]
    losses = []
    if BACKEND == "tensorflow":
        import tensorflow as tf

        optimizer = keras.optimizers.SGD(lr)

        @tf.function
        def step(xb, yb):
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        for xb, yb in batches:
            losses.append(float(step(xb, yb)))
    elif BACKEND == "jax":
        import jax

        optimizer = keras.optimizers.SGD(lr)
        optimizer.build(model.trainable_variables)

        def compute_loss(trainable, non_trainable, xb, yb):
            logits, non_trainable = model.stateless_call(trainable, non_trainable, xb,
                                                         training=True)
            return loss_fn(yb, logits), non_trainable

        @jax.jit
        def step(state, xb, yb):
            trainable, non_trainable, opt_vars = state
            (loss, non_trainable), grads = jax.value_and_grad(compute_loss, has_aux=True)(
                trainable, non_trainable, xb, yb)
            trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
            return loss, (trainable, non_trainable, opt_vars)

        state = ([v.value for v in model.trainable_variables],
                 [v.value for v in model.non_trainable_variables],
                 [v.value for v in optimizer.variables])
        for xb, yb in batches:
            loss, state = step(state, xb, yb)
            losses.append(float(loss))
        for v, value in zip(model.trainable_variables, state[0]):
            v.assign(value)
    else:
        import torch

        params = list(model.parameters())
        assert len(params) == len(model.trainable_variables)
        optimizer = torch.optim.SGD(params, lr=lr)
        for xb, yb in batches:
            optimizer.zero_grad()
            loss = loss_fn(torch.as_tensor(yb), model(torch.as_tensor(xb)))
            loss.backward()
            assert all(p.grad is not None for p in params)
            optimizer.step()
            losses.append(loss.item())
    return losses


@trains
def test_regularizers():
    reg = dict(kernel_regularizer=keras.regularizers.L2(0.05),
               bias_regularizer=keras.regularizers.L1(0.05))
    ref, fast = twins(**reg)
    x, _ = data()
    ref(x[:2]), fast(x[:2])
    assert len(fast.losses) == len(ref.losses) == 2
    reg_fast = sum(float(to_numpy(v)) for v in fast.losses)
    assert reg_fast > 0.01
    assert rel_diff(reg_fast, sum(float(to_numpy(v)) for v in ref.losses)) < 1e-6
    compile_both(ref, fast)
    ref_loss, fast_loss = fit_both(ref, fast)
    assert_losses(fast_loss, ref_loss)
    assert_weights(fast, ref)


@trains
def test_constraints_applied():
    ref, fast = twins(kernel_constraint=keras.constraints.NonNeg())
    assert to_numpy(fast.get_layer("conv1").kernel).min() < 0  # initially some are negative
    compile_both(ref, fast)
    ref_loss, fast_loss = fit_both(ref, fast, epochs=2)
    kernel = to_numpy(fast.get_layer("conv1").kernel)
    assert kernel.min() == 0.0 and (kernel == 0).any() and kernel.max() > 0
    assert_losses(fast_loss, ref_loss)
    assert_weights(fast, ref)


@trains
def test_frozen_layer_unchanged():
    ref, fast = twins()
    for m in (ref, fast):
        m.get_layer("conv1").trainable = False
    frozen = [to_numpy(w).copy() for w in fast.get_layer("conv1").weights]
    other = to_numpy(fast.get_layer("conv2").kernel).copy()
    compile_both(ref, fast)
    ref_loss, fast_loss = fit_both(ref, fast, epochs=2)
    for before, after in zip(frozen, fast.get_layer("conv1").weights):
        np.testing.assert_array_equal(to_numpy(after), before)
    assert not np.allclose(to_numpy(fast.get_layer("conv2").kernel), other)
    assert_losses(fast_loss, ref_loss)
    assert_weights(fast, ref)


@trains
@pytest.mark.parametrize("grouped", [False, True], ids=["dense", "grouped+depthwise"])
def test_lora_fine_tuning(grouped):
    ref, fast = twins(grouped)
    for m in (ref, fast):
        for name in ("conv1", "conv2"):
            m.get_layer(name).enable_lora(2)
    # LoRA's own weights are random: give fastconv's the same as Keras'
    fast.set_weights(ref.get_weights())
    layer = fast.get_layer("conv1")
    base = [to_numpy(layer._kernel).copy(), to_numpy(fast.get_layer("conv2")._kernel).copy()]
    assert layer._kernel.path in [v.path for v in layer.non_trainable_variables]
    lora = [to_numpy(w).copy() for w in (layer.lora_kernel_a, layer.lora_kernel_b)]
    compile_both(ref, fast)
    ref_loss, fast_loss = fit_both(ref, fast, epochs=2)
    np.testing.assert_array_equal(to_numpy(layer._kernel), base[0])
    np.testing.assert_array_equal(to_numpy(fast.get_layer("conv2")._kernel), base[1])
    for before, after in zip(lora, (layer.lora_kernel_a, layer.lora_kernel_b)):
        assert not np.allclose(to_numpy(after), before), "a LoRA weight did not train"
    assert_losses(fast_loss, ref_loss)
    assert_weights(fast, ref)


@trains
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    ref, fast = twins(dtype=policy)
    layer = fast.get_layer("conv1")
    assert layer.compute_dtype == policy.split("_")[1] and layer.variable_dtype == "float32"
    x, _ = data()
    assert keras.backend.standardize_dtype(layer(x[:2]).dtype) == layer.compute_dtype
    compile_both(ref, fast)
    ref_loss, fast_loss = fit_both(ref, fast, epochs=2)
    assert_losses(fast_loss, ref_loss, rtol=1e-2)


# ----------------------------------------------------------------------------------------------
# numpy: Keras' numpy trainer has no fit. fastconv changes nothing about that.

only_numpy = pytest.mark.skipif(BACKEND != "numpy", reason="numpy backend only")


@only_numpy
def test_numpy_cannot_train_like_keras():
    ref, fast = twins()
    compile_both(ref, fast)
    x, y = data()
    for call in (lambda m: m.fit(x, y, epochs=1, verbose=0),
                 lambda m: m.train_on_batch(x[:8], y[:8])):
        errors = []
        for m in (ref, fast):
            with pytest.raises(NotImplementedError) as info:
                call(m)
            errors.append(str(info.value))
        assert errors[1] == errors[0]  # Keras' own error, word for word
        assert "NumPy backend" in errors[1]


@only_numpy
def test_numpy_evaluate_like_keras():
    """What the numpy trainer does have, evaluate and predict, agrees with Keras."""
    ref, fast = twins()
    compile_both(ref, fast)
    x, y = data()
    ev = [m.evaluate(x, y, batch_size=16, verbose=0) for m in (ref, fast)]
    assert rel_diff(ev[1], ev[0]) <= 1e-5
    reference.assert_close(fast.predict(x, verbose=0), ref.predict(x, verbose=0), 1e-4)
