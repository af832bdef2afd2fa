"""One backend's benchmark process: `KERAS_BACKEND=<b> python -m benchmarks.worker ...`.

The runner (benchmarks/run.py) starts one of these per backend (KERAS_BACKEND is read once, at
import) with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset. It writes JSON lines to --out as it
goes, one record per line, flushed at once, so a process that crashes at exit (TensorFlow after
Keras' XLA grouped conv) loses nothing:

  {"type": "env", ...}      versions, BLAS (threadpoolctl), fastconv.show_config(), matmul rate
  {"type": "case", ...}     timings (+ correctness check) of one case
  {"type": "memory", ...}   peak extra memory of one case (measured after all timings)
  {"type": "end", ...}      matmul rate again, so drift during the run shows

Progress lines go to stderr as `@@progress <json>`.

What is timed, per case: `keras.layers.Conv2D` and `fastconv.Conv2D` holding identical weights,
plus fastconv on one thread (`fastconv.set_num_threads(1)`; the default is all cores), called in
interleaved rounds (in an order that rotates) after warm-up, median over at least --reps calls
each.
  fwd:   eager `layer(x)` (JAX: + block_until_ready)
  train: the forward and its gradients wrt input, kernel and bias for the output gradient dy
         (those of sum(layer(x) * dy)) with the backend's own autodiff: tf.GradientTape
         (eager, output_gradients=dy), jax.jit(jax.vjp(...)) over `layer.stateless_call`
         (returning the output keeps the forward in the jitted step), torch.autograd.grad
         (grad_outputs=dy). The numpy backend is forward only.
On torch, `torch.nn.functional.conv2d` on NCHW tensors ("torch_direct": what a torch user gets)
is timed too, forward. On small layers the host function alone (`fastconv.backends.numpy.forward`
on numpy arrays, "host") is timed as well, so the bridge's own overhead shows.

A call slower than --time-cap / --reps gets fewer rounds (never fewer than 3); the faster variants
then run several times per round so they still get --reps samples. In each round a variant that
takes under ROUND_WARMUP_LIMIT (0.5 s) first runs untimed for 20 ms (at least once; the first
call's time is "first" in the JSON), so that the timed calls run as in a training loop, not
right after another variant (see ROUND_WARMUP_LIMIT). A round during which one of the CPUs
went missing (a canary before and after it, see Canary) is timed again once the canary reads
normal again, at most twice as many times as there are rounds ("dropped" in the JSON).

Peak extra memory: after every case is timed, each call is run once more, with glibc's malloc set
to give large blocks back to the OS (mallopt M_MMAP_THRESHOLD = 64 KiB, malloc_trim before the
call): the peak resident set (VmHWM, reset by writing 5 to /proc/self/clear_refs) during the call
minus the resident set just before it. It counts every allocation of the call that was touched
(C mallocs included; tracemalloc sees Python's only), the output included, and nothing that was
allocated before the call. Memory that the backend's allocator keeps cached from earlier calls is
not seen; neither are pages allocated but never touched.
"""

import argparse
import concurrent.futures
import ctypes
import gc
import json
import math
import os
import platform
import re
import sys
import time
import zlib

from benchmarks.cases import CASES

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
if BACKEND == "torch":
    import torch  # noqa: F401  (before keras, as in the tests)

import numpy as np  # noqa: E402

import keras  # noqa: E402

import fastconv  # noqa: E402
from fastconv import _dispatch  # noqa: E402
from fastconv.backends import numpy as host  # noqa: E402
from fastconv.geometry import ConvSpec  # noqa: E402

if BACKEND == "tensorflow":
    import tensorflow as tf
elif BACKEND == "jax":
    import jax
    import jax.numpy as jnp
elif BACKEND == "torch":
    import torch.nn.functional as F


class Recorder:
    def __init__(self, path):
        self.f = open(path, "a")

    def write(self, record):
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())


def progress(**kw):
    sys.stderr.write("@@progress " + json.dumps(kw) + "\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------------
# Timing

def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class Canary:
    """Whether both CPUs are there: the machines here are shared, and for a second or so at a
    time one of the 2 vCPUs makes (almost) no progress, though the guest sees it busy (no steal
    time is reported). A 2-thread call then runs at its 1-thread speed, whatever the library:
    e.g. fastconv's resnet3x3 forward 8.3 ms for 5 rounds, then 4.4 (1 thread: 8.6 throughout),
    Keras' beside it 10.5, then 6. A call returns the time two threads take for the same fixed
    work each (np.sqrt over an array in L2, which lets go of the GIL), over the least such
    time seen: ~1 with both CPUs there, ~2 without; the least of 3 tries (~6 ms), as one try
    exceeds 1.5 2% of the time (thread handoffs), 3 in a row only in those spells (30 s here:
    ~0.6% of the time, spells of 10 ms to seconds)."""

    def __init__(self):
        self.a = np.random.default_rng(2).random(1 << 17, dtype=np.float32)
        self.out = [np.empty_like(self.a) for _ in range(2)]
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.best = math.inf
        for _ in range(5):
            self()

    def _work(self, i):
        for _ in range(CANARY_CALLS):
            np.sqrt(self.a, out=self.out[i])

    def _once(self):
        t = time.perf_counter()
        other = self.pool.submit(self._work, 1)
        self._work(0)
        other.result()
        return time.perf_counter() - t

    def __call__(self):
        t = min(self._once() for _ in range(3))
        self.best = min(self.best, t)
        return t / self.best

    def settle(self, limit):
        """Reads the canary until it is at most `limit` or SETTLE_TIME has passed, and returns
        the last reading: timing a round again at once mostly lands in the same spell (they
        last up to seconds)."""
        t0 = time.perf_counter()
        reading = self()
        while reading > limit and time.perf_counter() - t0 < SETTLE_TIME:
            reading = self()
        return reading


CANARY_CALLS = 40  # ~1 ms each thread
# A round of `measure` with the canary above this before or after it is timed again, after the
# canary reads at most this again (or SETTLE_TIME s have passed); at most MAX_DROPPED times the
# number of rounds: in the run at e4930fb, with one retry per round and none of this waiting,
# 38 of 168 timings used up their retries in spells and kept disturbed rounds.
DISTURBED = 1.5
SETTLE_TIME = 1.0
MAX_DROPPED = 2
_canary = None


def measure(variants, reps, warmup, time_cap):
    """Median time of each of `variants` ({name: fn}), interleaved rounds after warm-up. The
    order rotates from round to round, so that no variant always runs after the same one (and
    its caches): in a fixed order, two fastconv variants of a TensorFlow model's step that time
    the same when their order alternates (OpenMP wake-up on and off) differed by 4-7%, the one
    right after Keras' step being the slower. A round during which a CPU went missing (Canary)
    is timed again; each variant's record counts those ("dropped") and lists the canary's
    readings."""
    global _canary
    if _canary is None:
        _canary = Canary()
    est = {}
    for name, fn in variants.items():
        t = _timed(fn)  # the first call may compile (XLA, jit): never an estimate
        for _ in range(warmup - 1):
            t = _timed(fn)
            if t * reps > time_cap:
                break
        if warmup <= 1:
            t = _timed(fn)
        est[name] = t
    rounds = reps
    slowest = max(est.values())
    if slowest * reps > time_cap:
        rounds = max(3, min(reps, int(time_cap // slowest)))
    inner = {name: 1 if est[name] * reps > time_cap else math.ceil(reps / rounds)
             for name in variants}
    times = {name: [] for name in variants}
    firsts = {name: [] for name in variants}
    names = list(variants)
    canary = [_canary()]
    done = dropped = 0
    while done < rounds:
        start = (done + dropped) % len(names)
        got = {name: [] for name in names}
        first = {}
        for name in names[start:] + names[:start]:
            if est[name] < ROUND_WARMUP_LIMIT:
                first[name] = _warm_up(variants[name])
            for _ in range(inner[name]):
                got[name].append(_timed(variants[name]))
        canary.append(_canary())
        if max(canary[-2:]) > DISTURBED and dropped < MAX_DROPPED * rounds:
            dropped += 1
            canary.append(_canary.settle(DISTURBED))  # the next round's reading before it
            continue
        done += 1
        for name in names:
            times[name] += got[name]
            if name in first:
                firsts[name].append(first[name])
    return {name: {"median": float(np.median(ts)), "min": float(np.min(ts)), "n": len(ts),
                   "times": [float(t) for t in ts], "first": [float(t) for t in firsts[name]],
                   "rounds_timed": done + dropped, "dropped": dropped,
                   "canary": [round(c, 3) for c in canary], "disturbed": DISTURBED,
                   "max_dropped": MAX_DROPPED * rounds}
            for name, ts in times.items()}


# Each round, a variant faster than ROUND_WARMUP_LIMIT (seconds) runs untimed for
# ROUND_WARMUP_TIME (at least once; the first of those calls is its "first" time) before its
# timed calls: right after another variant, calls here run slower, whatever the library (numpy's
# own matmul too, after a sleep), for the first few ms of work, on cold caches and idle cores.
# After Keras' 1.75-s grouped32 training step on TensorFlow, fastconv's steps took 4.5-6.1,
# 3.2-3.5, 2.8-2.9, 2.9-3.1, then 2.6 ms, as in a training loop (2.4-2.65 back to back): one
# untimed call was not enough. A call as slow as the limit loses under 1% that way.
ROUND_WARMUP_LIMIT = 0.5
ROUND_WARMUP_TIME = 0.02


def _warm_up(fn):
    """Calls of fn for ROUND_WARMUP_TIME (at least one); the first one's time."""
    first = spent = _timed(fn)
    while spent < ROUND_WARMUP_TIME:
        spent += _timed(fn)
    return first


def matmul_rate(runs=5):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    b = rng.standard_normal((2048, 2048), dtype=np.float32)
    a @ b
    ts = [_timed(lambda: a @ b) for _ in range(runs)]
    # OpenBLAS' threads spin for ~0.1 s after a product and halve the speed of whatever runs
    # next on these 2 cores (measured: resnet3x3 host forward 7 ms instead of 3.2)
    time.sleep(0.3)
    return 2 * 2048**3 / float(np.median(ts)) / 1e9


def copy_rate(nbytes=4 * 56 * 56 * 128 * 4, runs=9, reps=10):
    """GB/s (bytes read + bytes written) of copying a float32 array of `nbytes` (the depthwise
    case's input) into another, on fastconv's thread count, each thread its share with numpy
    (which lets go of the GIL), `reps` times a round: the least memory traffic a memory-bound
    layer can have (a depthwise forward reads its input and writes an output as large)."""
    threads = fastconv.get_num_threads()
    src = np.random.default_rng(1).standard_normal(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    cuts = [src.size * i // threads for i in range(threads + 1)]

    def share(i):
        for _ in range(reps):
            np.copyto(dst[cuts[i]:cuts[i + 1]], src[cuts[i]:cuts[i + 1]])

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        def copy():
            list(pool.map(share, range(threads)))

        copy()
        ts = [_timed(copy) for _ in range(runs)]
    return 2 * nbytes * reps / float(np.median(ts)) / 1e9


# ---------------------------------------------------------------------------------------------
# Memory (Linux + glibc; None elsewhere)

def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


class PeakMemory:
    def __init__(self):
        self.ok = False
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            M_MMAP_THRESHOLD = -3
            self.libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.ok = _status_kib("VmHWM") is not None
        except OSError:
            pass

    def extra_bytes(self, fn):
        """Peak resident memory during fn() above the resident memory just before it."""
        if not self.ok:
            return None
        gc.collect()
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        out = fn()
        peak = _status_kib("VmHWM")
        del out
        return max(peak - before, 0) * 1024


# ---------------------------------------------------------------------------------------------
# Backend-specific pieces

def to_backend(a, requires_grad=False):
    if BACKEND == "tensorflow":
        return tf.constant(a)
    if BACKEND == "jax":
        return jnp.asarray(a)
    if BACKEND == "torch":
        # memory of torch's allocator (64-byte aligned), as a torch user's activations and
        # gradients are: torch.from_numpy would keep numpy's (16-byte aligned), on which
        # vectors of channels straddle cache lines (A/B, 2 threads: depthwise kernels 1.16-1.21x,
        # grad_kernel of grouped layers 1.09-1.15x slower)
        t = torch.from_numpy(a).clone()
        return t.requires_grad_(True) if requires_grad else t
    return a


def to_numpy(t):
    if BACKEND == "torch":
        return t.detach().numpy()
    return np.asarray(t)


def sync(out):
    if BACKEND == "jax":
        jax.block_until_ready(out)
    return out


def forward_fn(layer, x, threads=None):
    def fn():
        if threads is not None:
            fastconv.set_num_threads(threads)
        return sync(layer(x))
    return fn


def train_fn(layer, x, dy, threads=None):
    """fn() -> (dx, dkernel, dbias): the forward and its vector-Jacobian product with dy (the
    gradients of sum(layer(x) * dy)), with the backend's autodiff. The output gradient is handed
    to it, not built from a loss: eagerly on TensorFlow the loss's multiply and sum and their
    gradients cost 10-12 ms at 4x56x56x128 here, more than fastconv's whole step."""
    if BACKEND == "tensorflow":
        def grads():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
            return tape.gradient(y, [x, layer.kernel, layer.bias], output_gradients=dy)
    elif BACKEND == "jax":
        params = [v.value for v in layer.trainable_variables]
        assert [v.path for v in layer.trainable_variables] == [layer.kernel.path, layer.bias.path]

        def step(params, xx):
            y, vjp = jax.vjp(lambda p, a: layer.stateless_call(p, [], a)[0], params, xx)
            return y, vjp(dy)

        # y is returned: jit would otherwise drop the forward convolution (for Keras and
        # fastconv alike) and time 2 of the 3
        g = jax.jit(step)

        def grads():
            _, ((dk, db), dx) = jax.block_until_ready(g(params, x))
            return dx, dk, db
    elif BACKEND == "torch":
        def grads():
            y = layer(x)
            return torch.autograd.grad(y, [x, layer.kernel.value, layer.bias.value], dy)
    else:
        return None

    def fn():
        if threads is not None:
            fastconv.set_num_threads(threads)
        return grads()
    return fn


def torch_direct_fn(case, kernel, bias, spec, x_np):
    """torch.nn.functional.conv2d on NCHW tensors (explicit zero padding where Keras' "same"
    padding is asymmetric, which F.conv2d cannot express)."""
    x = x_np if case.data_format == "channels_first" else x_np.transpose(0, 3, 1, 2)
    geo = spec.geometry(x_np.shape, kernel.shape)
    xt = to_backend(np.ascontiguousarray(x))
    wt = to_backend(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    bt = to_backend(bias)
    pads = [(geo.pad_top, geo.oh, geo.h, geo.kh, case.stride),
            (geo.pad_left, geo.ow, geo.w, geo.kw, case.stride)]
    before, after = [], []
    for pad, out, size, k, s in pads:
        span = (k - 1) * case.dilation + 1
        total = max((out - 1) * s + span - size, 0)
        before.append(pad)
        after.append(total - pad)
    symmetric = before == after

    def fn():
        xx = xt if symmetric else F.pad(xt, (before[1], after[1], before[0], after[0]))
        return F.conv2d(xx, wt, bt, stride=case.stride, padding=tuple(before) if symmetric else 0,
                        dilation=case.dilation, groups=case.groups)
    return fn


def max_rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = float(np.max(np.abs(b))) or 1.0
    return float(np.max(np.abs(a - b))) / scale


# ---------------------------------------------------------------------------------------------

def setup(case):
    """Keras and fastconv layers with identical weights, inputs and output cotangent."""
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    kw = dict(filters=case.cout, kernel_size=case.k, strides=case.stride, padding=case.padding,
              data_format=case.data_format, dilation_rate=case.dilation, groups=case.groups,
              bias_initializer="random_normal")
    k_layer = keras.layers.Conv2D(**kw)
    f_layer = fastconv.Conv2D(**kw)
    k_layer.build(case.input_shape)
    f_layer.build(case.input_shape)
    f_layer.set_weights(k_layer.get_weights())
    kernel, bias = (np.asarray(w) for w in k_layer.get_weights())
    spec = ConvSpec.make(case.stride, case.padding, case.data_format, case.dilation)
    geo = spec.geometry(case.input_shape, kernel.shape)
    out_shape = spec.output_shape(case.input_shape, kernel.shape)
    x_np = rng.standard_normal(case.input_shape, dtype=np.float32)
    dy_np = rng.standard_normal(out_shape, dtype=np.float32)
    flops = 2.0 * geo.n * geo.oh * geo.ow * geo.f * geo.kh * geo.kw * geo.cin_g
    info = {
        "flops_fwd": flops, "flops_train": 3 * flops, "output_shape": list(out_shape),
        "input_bytes": x_np.nbytes, "output_bytes": dy_np.nbytes, "kernel_bytes": kernel.nbytes,
        "im2col_bytes": 4 * geo.n * geo.oh * geo.ow * geo.kh * geo.kw * geo.c,
    }
    return k_layer, f_layer, kernel, bias, spec, x_np, dy_np, info


def run_case(case, args, rec):
    k_layer, f_layer, kernel, bias, spec, x_np, dy_np, info = setup(case)
    threads = fastconv.get_num_threads()
    x = to_backend(x_np)
    dy = to_backend(dy_np)
    result = {"type": "case", "case": case.name, "backend": BACKEND, "threads": threads, **info}

    # Correctness: a benchmark of wrong results is worthless.
    y_f = to_numpy(sync(f_layer(x)))
    try:
        y_k = to_numpy(sync(k_layer(x)))
    except Exception as e:  # noqa: BLE001 - Keras' own layer cannot run this case here
        # (e.g. TF's CPU Conv2D is NHWC-only without oneDNN): fastconv is timed alone
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # Keras colours the message
        lines = [ln for ln in text.splitlines() if ln.strip()] or [""]
        why = next((ln for ln in lines if "[Op:" in ln), lines[0])  # TF's own reason, if any
        result["keras_error"] = f"{type(e).__name__}: {why.split('}}')[-1].strip()[:200]}"
        y_k = None
        if case.data_format == "channels_first":  # Keras on the channels_last twin instead
            twin = keras.layers.Conv2D.from_config(
                {**k_layer.get_config(), "data_format": "channels_last"})
            twin.build(spec.to_nhwc(case.input_shape))
            twin.set_weights([kernel, bias])
            y_t = to_numpy(sync(twin(to_backend(x_np.transpose(0, 2, 3, 1).copy()))))
            result["err_fwd"] = max_rel_err(y_f, y_t.transpose(0, 3, 1, 2))
    if y_k is not None:
        result["err_fwd"] = max_rel_err(y_f, y_k)

    fwd = {"fastconv": forward_fn(f_layer, x, threads)}
    if y_k is not None:
        fwd["keras"] = forward_fn(k_layer, x)
    twin = None
    if case.data_format == "channels_first":
        # fastconv on the channels_last twin (same weights, transposed data), interleaved with
        # the channels_first calls: their time ratio, measured side by side in this process
        twin = fastconv.Conv2D.from_config({**f_layer.get_config(),
                                            "data_format": "channels_last"})
        twin.build(spec.to_nhwc(case.input_shape))
        twin.set_weights([kernel, bias])
        x_cl = np.ascontiguousarray(x_np.transpose(0, 2, 3, 1))
        fwd["fastconv_cl"] = forward_fn(twin, to_backend(x_cl), threads)
    undilated = None
    if case.dilation != 1 and case.padding == "same":
        # the same layer without dilation (same weights, input and output shape), interleaved:
        # what dilation costs, measured side by side rather than against another case timed
        # minutes apart (on these shared machines a process's speed drifts by 10-30%)
        undilated = fastconv.Conv2D.from_config({**f_layer.get_config(), "dilation_rate": 1})
        undilated.build(case.input_shape)
        undilated.set_weights([kernel, bias])
        fwd["fastconv_undilated"] = forward_fn(undilated, x, threads)
    if threads > 1:
        fwd["fastconv_1t"] = forward_fn(f_layer, x, 1)
    if BACKEND == "torch":
        fwd["torch_direct"] = torch_direct_fn(case, kernel, bias, spec, x_np)
    if case.small:
        def host_fwd():
            fastconv.set_num_threads(threads)
            return host.forward(x_np, kernel, spec)
        fwd["host"] = host_fwd
    progress(case=case.name, phase="fwd")
    result["fwd"] = measure(fwd, args.reps, args.warmup, args.time_cap)
    fastconv.set_num_threads(threads)

    if BACKEND != "numpy":
        xg = to_backend(x_np, requires_grad=True)
        train = {"fastconv": train_fn(f_layer, xg, dy, threads)}
        if y_k is not None:
            train["keras"] = train_fn(k_layer, xg, dy)
        if threads > 1:
            train["fastconv_1t"] = train_fn(f_layer, xg, dy, 1)
        if undilated is not None:
            train["fastconv_undilated"] = train_fn(undilated, xg, dy, threads)
        if twin is not None:
            train["fastconv_cl"] = train_fn(
                twin, to_backend(x_cl, requires_grad=True),
                to_backend(dy_np.transpose(0, 2, 3, 1).copy()), threads)
        if y_k is not None:
            g_k = [to_numpy(g) for g in train["keras"]()]
            g_f = [to_numpy(g) for g in train["fastconv"]()]
            result["err_train"] = {n: max_rel_err(a, b)
                                   for n, a, b in zip(("dx", "dk", "db"), g_f, g_k)}
        progress(case=case.name, phase="train")
        result["train"] = measure(train, args.reps, args.warmup, args.time_cap)
        fastconv.set_num_threads(threads)
    # A process can run slow through its cases and not at its start and end, or the other way
    # round (TensorFlow's dense process at 36049c0 read 140 then 189 GFLOP/s and timed 15% slow):
    # the runner judges a process by the median of all its readings.
    result["matmul_after_gflops"] = matmul_rate()
    rec.write(result)


def run_memory(case, rec, mem):
    k_layer, f_layer, kernel, bias, spec, x_np, dy_np, info = setup(case)
    x = to_backend(x_np)
    dy = to_backend(dy_np)
    fns = {"fwd": {"keras": forward_fn(k_layer, x), "fastconv": forward_fn(f_layer, x)}}
    if BACKEND != "numpy":
        xg = to_backend(x_np, requires_grad=True)
        fns["train"] = {"keras": train_fn(k_layer, xg, dy), "fastconv": train_fn(f_layer, xg, dy)}
    try:
        k_layer(x)
    except Exception:  # noqa: BLE001 - Keras cannot run this case here (see run_case)
        for variants in fns.values():
            del variants["keras"]
    out = {"type": "memory", "case": case.name, "backend": BACKEND, **info}
    progress(case=case.name, phase="memory")
    for direction, variants in fns.items():
        out[direction] = {}
        for name, fn in variants.items():
            fn()  # warm: compile, caches
            fn()
            out[direction][name] = min(mem.extra_bytes(fn) for _ in range(2))
    rec.write(out)


def capture_show_config():
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fastconv.show_config()
    return buf.getvalue()


def env_record():
    from threadpoolctl import threadpool_info
    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "keras": keras.__version__, "fastconv": fastconv.__version__}
    if BACKEND == "tensorflow":
        versions["tensorflow"] = tf.__version__
    elif BACKEND == "jax":
        versions["jax"] = jax.__version__
    elif BACKEND == "torch":
        versions["torch"] = torch.__version__
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       None)
    except OSError:
        pass
    return {
        "type": "env", "backend": BACKEND, "pid": os.getpid(), "versions": versions,
        "cpu": cpu, "cpus": len(os.sched_getaffinity(0)),
        "fastconv_show_config": capture_show_config(), "fastconv_variant": _dispatch.variant,
        # Which kernel binary ran (the kernels are rebuilt in place while being developed).
        "fastconv_kernels_file": os.path.basename(_dispatch.kernels.__file__),
        "fastconv_kernels_mtime": os.path.getmtime(_dispatch.kernels.__file__),
        "fastconv_threads": fastconv.get_num_threads(),
        # Every BLAS loaded in the process; "numpy": the one numpy's matmul uses.
        "blas": [dict({k: v for k, v in d.items() if k != "filepath"},
                      filename=os.path.basename(d["filepath"]),
                      numpy=os.sep + "numpy" in d["filepath"])
                 for d in threadpool_info() if d.get("user_api") == "blas"],
        "loadavg": os.getloadavg(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                "OMP_NUM_THREADS", "FASTCONV_KERNELS")},
        "matmul_gflops": matmul_rate(),
        "copy_gbps": copy_rate(),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--time-cap", type=float, default=30.0,
                   help="seconds per variant and case beyond which fewer rounds (>= 3) run")
    p.add_argument("--no-memory", action="store_true")
    args = p.parse_args()
    if keras.backend.backend() != BACKEND:
        raise SystemExit(f"KERAS_BACKEND={BACKEND} but keras runs {keras.backend.backend()}")
    rec = Recorder(args.out)
    rec.write(env_record())
    cases = [CASES[n] for n in args.cases.split(",")]
    for case in cases:
        try:
            run_case(case, args, rec)
        except Exception as e:  # one broken case must not lose the others
            rec.write({"type": "error", "case": case.name, "backend": BACKEND,
                       "phase": "time", "error": f"{type(e).__name__}: {e}"})
        progress(case=case.name, phase="done")
    if not args.no_memory:
        mem = PeakMemory()
        for case in cases:
            try:
                run_memory(case, rec, mem)
            except Exception as e:
                rec.write({"type": "error", "case": case.name, "backend": BACKEND,
                           "phase": "memory", "error": f"{type(e).__name__}: {e}"})
            progress(case=case.name, phase="memory_done")
    rec.write({"type": "end", "backend": BACKEND, "matmul_gflops": matmul_rate(),
               "loadavg": os.getloadavg(),
               "canary_best_s": _canary.best if _canary is not None else None})


if __name__ == "__main__":
    main()
