"""Kernel-level micro benchmark: fastconv's host functions (numpy backend) per direction.

Times forward, grad_input and grad_kernel (median of --runs after warm-up) on BENCHMARKS.md's public
cases (+ an odd-channel case), for 1 and 2 threads, and prints GFLOP/s and the fraction of this
machine's float32 numpy matmul rate (2048^3) measured in the same process.

    python benchmarks/kernels/bench_kernels.py [--runs 7] [--threads 1,2] [--cases a,b]
        [--dirs fwd,gin,gk] [--stat median|min] [--json f]

FASTCONV_KERNELS=baseline|avx2|avx512 picks the kernel build. Run it with OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE unset (`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`) for a fair matmul rate.
"""

import argparse
import json
import os
import time

import numpy as np

import fastconv
from fastconv import _dispatch, _memory
from fastconv.backends import numpy as host
from fastconv.geometry import ConvSpec

# name: (N, H, W, Cin, Cout, K, stride, dilation, groups, padding)
CASES = {
    "resnet3x3": (4, 56, 56, 64, 64, 3, 1, 1, 1, "same"),
    "resnet3x3s2": (4, 56, 56, 128, 128, 3, 2, 1, 1, "same"),
    "pointwise": (4, 28, 28, 256, 512, 1, 1, 1, 1, "valid"),
    "grouped32": (4, 28, 28, 256, 256, 3, 1, 1, 32, "same"),
    "grouped8": (4, 28, 28, 256, 256, 3, 1, 1, 8, "same"),
    "depthwise": (4, 56, 56, 128, 128, 3, 1, 1, 128, "same"),
    "dilated2": (4, 64, 64, 64, 64, 3, 1, 2, 1, "same"),
    "dilated4": (4, 64, 64, 64, 64, 3, 1, 4, 1, "same"),
    "stem7x7s2": (4, 224, 224, 3, 64, 7, 2, 1, 1, "same"),
    "batch1": (1, 56, 56, 64, 64, 3, 1, 1, 1, "same"),
    "odd": (3, 30, 30, 61, 47, 3, 1, 1, 1, "same"),
    "grouped16": (4, 14, 14, 512, 512, 3, 1, 1, 32, "same"),
    "grouped4": (4, 56, 56, 128, 128, 3, 1, 1, 32, "same"),
}


STAT = np.median  # --stat min: the best run, a steadier estimate on a shared, loaded machine


CLOCK = time.perf_counter  # --clock cpu: process CPU time (for 1 thread on a loaded machine)


def median_time(fn, runs, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
    return float(STAT(times))


def _aligned(a):
    # as TensorFlow's, JAX's and torch's tensors are, and the kernels' own results: numpy's
    # arrays start 16 bytes off a cache line about half the time, which costs the kernels that
    # load x or dy in vectors (depthwise, grad_kernel) 15-20% (each vector across two lines)
    out = _memory.aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def matmul_rate(runs=5):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    b = rng.standard_normal((2048, 2048), dtype=np.float32)
    t = median_time(lambda: a @ b, runs, warmup=1)
    time.sleep(0.3)  # OpenBLAS' threads spin for ~0.1 s after a product, slowing what follows
    return 2 * 2048**3 / t / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--dirs", default="fwd,gin,gk")
    p.add_argument("--stat", choices=("median", "min"), default="median")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--json")
    args = p.parse_args()
    global STAT, CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    STAT = np.min if args.stat == "min" else np.median
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if os.environ.get(var):
            print(f"warning: {var} is set; the matmul rate may be off")
    mm = matmul_rate()
    print(f"kernels: {_dispatch.variant}; float32 matmul 2048^3: {mm:.1f} GFLOP/s "
          f"({args.stat} of {args.runs} runs, {args.clock} clock)")
    threads = [int(t) for t in args.threads.split(",")]
    dirs = args.dirs.split(",")
    rng = np.random.default_rng(0)
    results = []
    header = f"{'case':12s} {'dir':4s} " + " ".join(f"{f'{t}T GF/s':>9s} {'frac':>5s}" for t in threads)
    if len(threads) > 1:
        header += f" {'speedup':>7s}"
    print(header)
    for name in args.cases.split(","):
        n, h, w, cin, cout, k, s, d, g, pad = CASES[name]
        spec = ConvSpec.make(s, pad, "channels_last", d)
        x = _aligned(rng.standard_normal((n, h, w, cin), dtype=np.float32))
        kern = rng.standard_normal((k, k, cin // g, cout), dtype=np.float32)
        geo = spec.geometry(x.shape, kern.shape)
        dy = _aligned(rng.standard_normal(geo.output_shape_nhwc, dtype=np.float32))
        flops = 2.0 * n * geo.oh * geo.ow * cout * k * k * cin // g
        fns = {
            "fwd": lambda: host.forward(x, kern, spec),
            "gin": lambda: host.grad_input(dy, kern, spec, x.shape),
            "gk": lambda: host.grad_kernel(x, dy, spec, kern.shape),
        }
        for dname in dirs:
            row = {"case": name, "dir": dname}
            line = f"{name:12s} {dname:4s} "
            for t in threads:
                fastconv.set_num_threads(t)
                sec = median_time(fns[dname], args.runs)
                gf = flops / sec / 1e9
                row[f"gflops_{t}"] = gf
                row[f"frac_{t}"] = gf / mm
                line += f"{gf:9.1f} {gf / mm:5.2f} "
            fastconv.set_num_threads(None)
            if len(threads) > 1:
                sp = row[f"gflops_{threads[-1]}"] / row[f"gflops_{threads[0]}"]
                row["speedup"] = sp
                line += f"{sp:7.2f}"
            print(line, flush=True)
            results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"variant": _dispatch.variant, "matmul_gflops": mm, "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
