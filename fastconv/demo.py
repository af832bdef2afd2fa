"""`python -m fastconv.demo`: train a small CNN on real data with fastconv, next to Keras.

The model uses fastconv's dense, grouped, depthwise, strided and dilated convolutions on
scikit-learn's bundled 8x8 digits (no download). The same model built with keras.layers.Conv2D,
from the same initial weights, trains in a child process (TensorFlow's own grouped convolution
can crash its process at exit here: a child keeps that away from the demo). Then the fastconv
model is saved to `.keras`, reloaded in a fresh process, and its predictions compared.

Options: --backend tensorflow|jax|torch|numpy|all (default: KERAS_BACKEND, else tensorflow),
--epochs N (default 10). On numpy (inference only in Keras) the model is trained on jax and
served by numpy.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

BACKENDS = ("tensorflow", "jax", "torch", "numpy")
SEED = 1234


def _data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    return train_test_split(x, digits.target.astype("int32"), test_size=0.25,
                            random_state=0, stratify=digits.target)


def build_model(conv):
    """The demo CNN; `conv` is fastconv.Conv2D or keras.layers.Conv2D."""
    import keras

    inputs = keras.Input((8, 8, 1))
    y = conv(32, 3, padding="same", activation="relu", name="dense3x3")(inputs)
    y = conv(64, 3, padding="same", groups=4, activation="relu", name="grouped")(y)
    y = conv(64, 3, padding="same", groups=64, activation="relu", name="depthwise")(y)
    y = conv(64, 3, padding="same", dilation_rate=2, activation="relu", name="dilated")(y)
    y = conv(64, 3, strides=2, padding="same", activation="relu", name="strided")(y)
    y = keras.layers.Flatten()(y)
    y = keras.layers.Dropout(0.2, seed=SEED)(y)
    outputs = keras.layers.Dense(10, activation="softmax", name="classifier")(y)
    return keras.Model(inputs, outputs, name="digits_cnn")


class _EpochTimer:
    def __new__(cls):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.times = []

            def on_epoch_begin(self, epoch, logs=None):
                self._start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.times.append(time.perf_counter() - self._start)

        return Timer()


def train(impl, epochs, verbose):
    """Train the demo model built with `impl` ("fastconv" or "keras") on this process' backend."""
    import keras
    import numpy as np

    import fastconv

    x_train, x_test, y_train, y_test = _data()
    keras.utils.set_random_seed(SEED)
    model = build_model(fastconv.Conv2D if impl == "fastconv" else keras.layers.Conv2D)
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    timer = _EpochTimer()
    history = model.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=verbose,
                        callbacks=[timer], validation_split=0.0)
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    steady = timer.times[1:] or timer.times  # the first epoch includes tracing/compilation
    return model, x_test, {
        "impl": impl,
        "backend": keras.backend.backend(),
        "losses": [float(v) for v in history.history["loss"]],
        "test_accuracy": float(accuracy),
        "epoch_seconds": float(np.median(steady)),
        "first_epoch_seconds": float(timer.times[0]),
    }


def _child(env_backend, *extra):
    env = dict(os.environ, KERAS_BACKEND=env_backend)
    cmd = [sys.executable, "-m", "fastconv.demo", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)


def _child_json(result, what):
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{what} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")


def run_backend(epochs):
    """The demo on this process' backend: train, compare with Keras, save, reload, compare."""
    import keras
    import numpy as np

    import fastconv

    backend = keras.backend.backend()
    print(f"\n=== fastconv demo on the {backend} backend "
          f"(kernels: {fastconv._dispatch.variant}, threads: {fastconv.get_num_threads()})")
    workdir = tempfile.mkdtemp(prefix="fastconv-demo-")
    path = os.path.join(workdir, "digits_cnn.keras")
    if backend == "numpy":
        print("Keras' numpy backend serves models but cannot train: training on jax first.")
        trained = _child("jax", "--internal-train-save", path, "--epochs", str(epochs))
        ours = _child_json(trained, "training on jax")
        model = keras.models.load_model(path)
        _, x_test, _, y_test = _data()
        accuracy = float((np.argmax(model.predict(x_test, verbose=0), -1) == y_test).mean())
        print(f"fastconv on numpy: test accuracy {accuracy:.4f} "
              f"(trained on jax: {ours['test_accuracy']:.4f})")
    else:
        print(f"Training the demo CNN with fastconv.Conv2D ({epochs} epochs):")
        model, x_test, ours = train("fastconv", epochs, verbose=1)
        model.save(path)
    print("Training the same model with keras.layers.Conv2D in a child process "
          "(same initial weights)...")
    twin_backend = "jax" if backend == "numpy" else backend
    theirs = _child_json(_child(twin_backend, "--internal-train", "keras",
                                "--epochs", str(epochs)), "the Keras twin")
    reloaded = _child(backend, "--internal-predict", path)
    reloaded_pred = np.load(_child_json(reloaded, "reloading")["predictions"])
    pred = keras.ops.convert_to_numpy(model.predict(x_test, verbose=0))
    identical = bool(np.array_equal(pred, reloaded_pred))
    max_diff = float(np.abs(pred - reloaded_pred).max())
    as_keras = _child(backend, "--internal-predict", path, "--internal-as-keras")
    keras_pred = np.load(_child_json(as_keras, "predicting with keras.layers.Conv2D")["predictions"])
    keras_diff = float(np.abs(pred - keras_pred).max() / np.abs(keras_pred).max())

    rows = [("", "fastconv.Conv2D", "keras.layers.Conv2D")]
    rows.append(("test accuracy", f"{ours['test_accuracy']:.4f}", f"{theirs['test_accuracy']:.4f}"))
    rows.append(("time per epoch", f"{ours['epoch_seconds']:.3f} s",
                 f"{theirs['epoch_seconds']:.3f} s"))
    rows.append(("first epoch (incl. tracing)", f"{ours['first_epoch_seconds']:.3f} s",
                 f"{theirs['first_epoch_seconds']:.3f} s"))
    rows.append(("final training loss", f"{ours['losses'][-1]:.5f}", f"{theirs['losses'][-1]:.5f}"))
    width = max(len(r[0]) for r in rows)
    print()
    for r in rows:
        print(f"  {r[0]:<{width}}  {r[1]:>18}  {r[2]:>20}")
    speedup = theirs["epoch_seconds"] / ours["epoch_seconds"]
    print(f"  fastconv is {speedup:.2f}x Keras per epoch on {twin_backend}")
    print(f"  saved to {path}; reloaded in a fresh process: predictions "
          f"{'identical' if identical else f'differ by up to {max_diff:.3g}'}")
    print(f"  the trained weights in keras.layers.Conv2D layers predict the same: max relative "
          f"difference {keras_diff:.2g} ({'OK' if keras_diff <= 1e-4 else 'MISMATCH'})")
    return {"backend": backend, "fastconv": ours, "keras": theirs, "speedup_per_epoch": speedup,
            "reload_identical": identical, "keras_prediction_difference": keras_diff}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastconv.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=BACKENDS + ("all",),
                        default=os.environ.get("KERAS_BACKEND", "tensorflow"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--internal-train", choices=("fastconv", "keras"), help=argparse.SUPPRESS)
    parser.add_argument("--internal-train-save", help=argparse.SUPPRESS)
    parser.add_argument("--internal-predict", help=argparse.SUPPRESS)
    parser.add_argument("--internal-as-keras", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be positive. Received: --epochs={args.epochs}")

    if args.internal_train:
        _, _, result = train(args.internal_train, args.epochs, verbose=0)
        print(json.dumps(result), flush=True)
        os._exit(0)  # TF's grouped XLA convolution may corrupt the heap at interpreter exit
    if args.internal_train_save:
        model, _, result = train("fastconv", args.epochs, verbose=1)
        model.save(args.internal_train_save)
        print(json.dumps(result), flush=True)
        return
    if args.internal_predict:
        import keras
        import numpy as np

        import fastconv  # noqa: F401  (registers fastconv>Conv2D for loading)

        model = keras.models.load_model(args.internal_predict)
        suffix = "keras" if args.internal_as_keras else "fastconv"
        if args.internal_as_keras:  # the same weights in a model built with keras.layers.Conv2D
            twin = build_model(keras.layers.Conv2D)
            twin.set_weights(model.get_weights())
            model = twin
        out = args.internal_predict + f".{keras.backend.backend()}.{suffix}.npy"
        np.save(out, keras.ops.convert_to_numpy(model.predict(_data()[1], verbose=0)))
        print(json.dumps({"predictions": out}), flush=True)
        os._exit(0)  # TF's grouped XLA convolution may corrupt the heap at interpreter exit

    backends = BACKENDS if args.backend == "all" else (args.backend,)
    for backend in backends:
        if os.environ.get("KERAS_BACKEND", "tensorflow") != backend or len(backends) > 1:
            # KERAS_BACKEND is read once, when keras is first imported: one process each.
            env = dict(os.environ, KERAS_BACKEND=backend)
            code = subprocess.call([sys.executable, "-m", "fastconv.demo", "--backend", backend,
                                    "--epochs", str(args.epochs)], env=env)
            if code:
                sys.exit(code)
            continue
        if backend == "torch":
            import torch  # noqa: F401  (before tensorflow, which keras may import)
        run_backend(args.epochs)


if __name__ == "__main__":
    main()
