"""Whole models and depthwise layers: Keras vs fastconv, per backend (one subprocess each).

    python benchmarks/models.py                       # tensorflow, jax, torch; writes results/
    python benchmarks/models.py --backends jax --models MobileNetV2 --repeats 3

For each backend, in its own process:
- keras.applications MobileNetV2 / EfficientNetB0 / ResNet50 (weights=None, batch 8, 224x224,
  classes=10): `predict_on_batch` and `train_on_batch` (SGD) time of the Keras model and of
  `fastconv.convert(model)`, interleaved, median of --repeats after warm-up; and how closely the
  converted model's logits match the original's (max |diff| / max |original|; BatchNormalization
  statistics are randomised so that the logits are not ~0).
- `keras.layers.DepthwiseConv2D` vs `fastconv.DepthwiseConv2D` on BENCHMARKS.md's depthwise cases:
  forward `layer(x)`, median time and GFLOP/s.

Writes benchmarks/results/models.json and benchmarks/results/models.md. A child that crashes at
exit (TensorFlow/XLA can) after writing its results is not an error. Absolute times on shared
machines are noise; the ratios measured in one run are the result.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
MODELS = ["MobileNetV2", "EfficientNetB0", "ResNet50"]
# name: (n, h, w, c, k, stride)
DEPTHWISE = {
    "4x56x56x128": (4, 56, 56, 128, 3, 1),
    "8x112x112x32 (MobileNetV2 block 1)": (8, 112, 112, 32, 3, 1),
    "8x112x112x64, stride 2": (8, 112, 112, 64, 3, 2),
    "4x28x28x240, 5x5 (EfficientNet)": (4, 28, 28, 240, 5, 1),
}


ROUND_WARMUP_LIMIT, ROUND_WARMUP_TIME = 0.5, 0.02  # seconds (benchmarks/worker.py's)


def _median_times(fns, warmup, repeats):
    """Run each fn warmup times, then repeats rounds interleaved; median seconds per fn. In each
    round a fn faster than ROUND_WARMUP_LIMIT first runs untimed for ROUND_WARMUP_TIME (at least
    once), as in the layer suite (benchmarks/worker.py: calls right after the other fn run
    slower, on cold caches and idle cores, whatever the library)."""
    estimate = []
    for fn in fns:
        last = float("inf")  # (no warm-up: no estimate, no warm-up in the rounds either)
        for _ in range(warmup):
            t = time.perf_counter()
            fn()
            last = time.perf_counter() - t
        estimate.append(last)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            if estimate[i] < ROUND_WARMUP_LIMIT:
                start = time.perf_counter()
                fn()
                while time.perf_counter() - start < ROUND_WARMUP_TIME:
                    fn()
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def _sync(out):
    """Wait for the result: JAX dispatches asynchronously; TensorFlow and torch eager calls on
    the CPU return finished tensors (a copy to numpy would be timed as part of the layer)."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        jax.block_until_ready(out)
    return out


def _randomise_batchnorm(model, rng):
    import keras

    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, g.shape).astype("float32"),
                               rng.normal(0, 0.1, b.shape).astype("float32"),
                               rng.normal(0, 0.1, m.shape).astype("float32"),
                               rng.uniform(0.5, 1.5, v.shape).astype("float32")])


def bench_model(name, batch, size, warmup, repeats):
    import keras
    import numpy as np

    import fastconv

    keras.utils.set_random_seed(0)
    t = time.perf_counter()
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3),
                                              classes=10, classifier_activation=None)
    build_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    _randomise_batchnorm(model, rng)
    t = time.perf_counter()
    converted = fastconv.convert(model)
    convert_s = time.perf_counter() - t
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    y = np.arange(batch) % 10
    ref = np.asarray(_sync(model.predict_on_batch(x)), np.float64)
    out = np.asarray(_sync(converted.predict_on_batch(x)), np.float64)
    agreement = float(np.abs(out - ref).max() / np.abs(ref).max())
    predict = _median_times([lambda: _sync(model.predict_on_batch(x)),
                             lambda: _sync(converted.predict_on_batch(x))], warmup, repeats)
    for m in (model, converted):
        m.compile(optimizer=keras.optimizers.SGD(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    train = _median_times([lambda: model.train_on_batch(x, y),
                           lambda: converted.train_on_batch(x, y)], warmup, repeats)
    return {
        "model": name, "batch": batch, "size": size, "build_s": build_s, "convert_s": convert_s,
        "agreement": agreement,
        "keras_predict_ms": predict[0] * 1e3, "fastconv_predict_ms": predict[1] * 1e3,
        "keras_train_ms": train[0] * 1e3, "fastconv_train_ms": train[1] * 1e3,
        "predict_speedup": predict[0] / predict[1], "train_speedup": train[0] / train[1],
    }


def bench_depthwise(case, warmup, repeats):
    import keras
    import numpy as np

    import fastconv

    n, h, w, c, k, s = DEPTHWISE[case]
    x = keras.ops.convert_to_tensor(np.random.default_rng(1).normal(size=(n, h, w, c))
                                    .astype("float32"))
    if keras.backend.backend() == "torch":
        x = x.clone()  # in torch's own memory, not the numpy array's (see worker.to_backend)
    ours = fastconv.DepthwiseConv2D(k, strides=s, padding="same")
    theirs = keras.layers.DepthwiseConv2D(k, strides=s, padding="same")
    ours.build(x.shape)
    theirs.build(x.shape)
    theirs.set_weights(ours.get_weights())
    a, b = (keras.ops.convert_to_numpy(layer(x)) for layer in (theirs, ours))
    agreement = float(np.abs(a - b).max() / np.abs(a).max())
    times = _median_times([lambda: _sync(theirs(x)), lambda: _sync(ours(x))], warmup, repeats)
    ho, wo = -(-h // s), -(-w // s)
    flops = 2 * n * ho * wo * c * k * k
    return {"case": case, "agreement": agreement,
            "keras_ms": times[0] * 1e3, "fastconv_ms": times[1] * 1e3,
            "keras_gflops": flops / times[0] / 1e9, "fastconv_gflops": flops / times[1] / 1e9,
            "speedup": times[0] / times[1]}


def worker(args):
    backend = os.environ["KERAS_BACKEND"]
    if backend == "torch":
        import torch  # noqa: F401  (before tensorflow, which keras may import)
    import keras

    import fastconv

    result = {"backend": backend, "keras": keras.__version__,
              "threads": fastconv.get_num_threads(),
              "kernels": fastconv._dispatch.variant, "models": [], "depthwise": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for case in args.depthwise:
        result["depthwise"].append(bench_depthwise(case, args.warmup, args.repeats))
        print(backend, result["depthwise"][-1], flush=True)
        save()
    for name in args.models:
        result["models"].append(bench_model(name, args.batch, args.size, args.warmup,
                                            args.repeats))
        print(backend, result["models"][-1], flush=True)
        save()
    save()


def run_backend(backend, args):
    out = os.path.join(RESULTS, f".models_{backend}.json")
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--out", out,
           "--batch", str(args.batch), "--size", str(args.size), "--warmup", str(args.warmup),
           "--repeats", str(args.repeats), "--models", *args.models,
           "--depthwise", *args.depthwise]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=os.path.dirname(HERE))
    if not os.path.exists(out):
        raise SystemExit(f"{backend}: the worker wrote no results (exit code {done.returncode})")
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    result["exit_code"] = done.returncode  # a crash at exit after the results is ignored
    result["wall_s"] = time.perf_counter() - t
    return result


def markdown(results):
    lines = ["# Whole models and depthwise layers: Keras vs fastconv", ""]
    meta = results[0] if results else {}
    lines.append(f"{platform.node()}, {os.cpu_count()} CPUs, keras {meta.get('keras')}, "
                 f"fastconv kernels {meta.get('kernels')}, {meta.get('threads')} threads. "
                 "Median of the timed runs after warm-up; Keras and fastconv interleaved in one "
                 "process per backend, each timed call after 20 ms of untimed calls of the same "
                 "(at least one) where a call takes under 0.5 s. Speedup = Keras time / fastconv "
                 "time.")
    lines += ["", "## keras.applications (weights=None, classes=10), milliseconds", "",
              "| model | backend | Keras predict | fastconv predict | speedup | Keras train step "
              "| fastconv train step | speedup | agreement (max rel. diff) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        for r in results:
            for m in r["models"]:
                if m["model"] == name:
                    lines.append(
                        f"| {name} ({m['batch']}x{m['size']}²) | {r['backend']} "
                        f"| {m['keras_predict_ms']:.0f} | {m['fastconv_predict_ms']:.0f} "
                        f"| {m['predict_speedup']:.2f}x | {m['keras_train_ms']:.0f} "
                        f"| {m['fastconv_train_ms']:.0f} | {m['train_speedup']:.2f}x "
                        f"| {m['agreement']:.1e} |")
    lines += ["", "## DepthwiseConv2D forward (3x3 unless named, \"same\"), GFLOP/s", "",
              "| case | backend | keras.layers | fastconv | speedup | agreement |",
              "|---|---|---|---|---|---|"]
    for case in DEPTHWISE:
        for r in results:
            for d in r["depthwise"]:
                if d["case"] == case:
                    lines.append(f"| {case} | {r['backend']} | {d['keras_gflops']:.1f} "
                                 f"| {d['fastconv_gflops']:.1f} | {d['speedup']:.1f}x "
                                 f"| {d['agreement']:.1e} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax", "torch"])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--depthwise", nargs="*", default=list(DEPTHWISE))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--results", default=RESULTS, help="directory for models.json/.md")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    os.makedirs(RESULTS, exist_ok=True)
    results = [run_backend(b, args) for b in args.backends]
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "models.json"), "w") as f:
        json.dump({"argv": sys.argv[1:], "results": results}, f, indent=1)
    text = markdown(results)
    with open(os.path.join(args.results, "models.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
