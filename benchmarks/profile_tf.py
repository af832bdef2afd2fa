"""Where a TensorFlow model's step goes: Keras' model against fastconv.convert(model), per op type.

    python benchmarks/profile_tf.py                          # MobileNetV2, training step
    python benchmarks/profile_tf.py --model ResNet50 --mode predict --steps 3

In one process (KERAS_BACKEND=tensorflow): builds the keras.applications model (weights=None,
batch 8, 224x224, BatchNormalization statistics randomised as in benchmarks/models.py) and its
converted twin, times their `train_on_batch` (or `predict_on_batch`) interleaved, then records
--steps steps of each with TensorFlow's profiler and prints the time TensorFlow's executor spent
in each op type, per step (the "tf_Compute" events; ops that run at the same time on the 2
cores both count, so the sums exceed the step's wall time). The convolution rows are
TensorFlow's (_MklNative* with oneDNN) for Keras and Fastconv* for the converted model; the rest
(BatchNormalization's Mul/Sum/Mean, activations) is the same graph in both. The profiles stay in --logdir for
TensorBoard (each run replaces the last).
"""

import argparse
import collections
import glob
import os
import shutil
import statistics
import sys
import time

os.environ["KERAS_BACKEND"] = "tensorflow"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def op_times(logdir, steps):
    """{op type: ms per step} from the profile under logdir."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    times = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if "tf_Compute" not in line.name:
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                # "layer/op_name:OpType"; ExecutorState::Process (which encloses the ops it
                # runs) and events without a type are the executor's own
                if ":" in name and not name.startswith("ExecutorState::"):
                    times[name.rsplit(":", 1)[1]] += event.duration_ps / 1e9 / steps
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="MobileNetV2")
    parser.add_argument("--mode", choices=["train", "predict"], default="train")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps of each, interleaved")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps of each")
    parser.add_argument("--top", type=int, default=25, help="op types shown")
    parser.add_argument("--logdir", default="/tmp/fastconv_profile_tf")
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    import fastconv
    from benchmarks.models import _randomise_batchnorm

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, args.model)(
        weights=None, input_shape=(args.size, args.size, 3), classes=10,
        classifier_activation=None)
    rng = np.random.default_rng(0)
    _randomise_batchnorm(model, rng)
    models = {"keras": model, "fastconv": fastconv.convert(model)}
    x = rng.uniform(0, 255, (args.batch, args.size, args.size, 3)).astype("float32")
    y = np.arange(args.batch) % 10
    for m in models.values():
        m.compile(optimizer=keras.optimizers.SGD(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def step(m):
        return m.train_on_batch(x, y) if args.mode == "train" else m.predict_on_batch(x)

    for m in models.values():
        for _ in range(3):
            step(m)
    walls = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, m in models.items():
            t = time.perf_counter()
            step(m)
            walls[name].append(time.perf_counter() - t)
    medians = {name: statistics.median(t) * 1e3 for name, t in walls.items()}
    print(f"{args.model} {args.mode}, batch {args.batch}: median step Keras "
          f"{medians['keras']:.1f} ms, fastconv {medians['fastconv']:.1f} ms "
          f"(speedup {medians['keras'] / medians['fastconv']:.2f}x)")

    ops = {}
    for name, m in models.items():
        logdir = os.path.join(args.logdir, name)
        shutil.rmtree(logdir, ignore_errors=True)  # op_times reads the one profile there
        tf.profiler.experimental.start(logdir)
        for _ in range(args.steps):
            step(m)
        tf.profiler.experimental.stop()
        ops[name] = op_times(logdir, args.steps)
    rows = sorted(set(ops["keras"]) | set(ops["fastconv"]),
                  key=lambda op: -(ops["keras"][op] + ops["fastconv"][op]))
    print(f"\nms per step in each op type (profiler, {args.steps} steps)")
    print(f"{'op type':<44} {'Keras':>9} {'fastconv':>9}")
    for op in rows[:args.top]:
        print(f"{op[:44]:<44} {ops['keras'][op]:9.1f} {ops['fastconv'][op]:9.1f}")
    conv = {name: sum(v for op, v in t.items() if "Conv" in op or op.startswith("Fastconv"))
            for name, t in ops.items()}
    print(f"{'all ops':<44} {sum(ops['keras'].values()):9.1f} {sum(ops['fastconv'].values()):9.1f}")
    print(f"{'convolution ops (oneDNN / Fastconv*)':<44} {conv['keras']:9.1f} "
          f"{conv['fastconv']:9.1f}")


if __name__ == "__main__":
    main()
