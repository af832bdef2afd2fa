"""Which kernel build runs, and on how many threads.

setup.py compiles the same kernels for several CPU targets; here the best one the running CPU
supports is imported. FASTCONV_KERNELS=baseline|avx2|avx512 forces one (an unsupported one is an
error, never an "illegal instruction" crash). The kernels' parallel loops run on fastconv's own
worker threads where the build has them (Linux, GNU C, OpenMP), else on OpenMP's; on the torch
backend on OpenMP's too (openmp_shared_with_torch). FASTCONV_THREADS=own|openmp forces one;
auto (the default) is that choice.
"""

import importlib
import os

VARIANTS = ("baseline", "avx2", "avx512")

# CPU features each build's -march target requires (numpy's names for them).
_REQUIRES = {
    "baseline": (),
    "avx2": ("AVX", "AVX2", "FMA3", "F16C"),
    "avx512": ("AVX", "AVX2", "FMA3", "F16C", "AVX512F", "AVX512CD", "AVX512_SKX"),
}


def _cpu_features():
    try:  # numpy detects features and checks that the OS saves the wide registers
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    return {name for name, on in __cpu_features__.items() if on}


def available_variants():
    """The kernel builds that are installed and that this CPU can run, slowest first."""
    features = _cpu_features()
    found = []
    for name in VARIANTS:
        if not all(f in features for f in _REQUIRES[name]):
            continue
        try:
            importlib.import_module(f"fastconv._kernels_{name}")
        except ImportError:
            continue
        found.append(name)
    return found


def load(name=None):
    """The kernel module `name` (default: FASTCONV_KERNELS, else the best available)."""
    name = name or os.environ.get("FASTCONV_KERNELS") or None
    available = available_variants()
    if not available:
        raise ImportError(
            "fastconv's compiled kernels are missing: install fastconv with `pip install .` "
            "(it builds them), not by putting the source folder on sys.path"
        )
    if name is None:
        name = available[-1]
    if name not in available:
        raise ValueError(
            f"The kernel build {name!r} is not available on this machine (built and supported "
            f"by this CPU: {available}). Received: FASTCONV_KERNELS={name!r}"
        )
    return importlib.import_module(f"fastconv._kernels_{name}")


def _cpu_vendor():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return ""


def _tune(module):
    # AMD's prefetchers favour whole rows in the depthwise 3x3 kernel (fc_dwrow_pix)
    module.set_dwrow_pixels(64 if _cpu_vendor() == "AuthenticAMD" else module.DWROW_PIXELS)
    if _THREADS not in ("auto", "own", "openmp"):
        raise ValueError(
            f"FASTCONV_THREADS must be 'own' (fastconv's worker threads), 'openmp' or 'auto' "
            f"(own, but OpenMP's on the torch backend). Received: FASTCONV_THREADS={_THREADS!r}"
        )
    module.set_pool(_THREADS != "openmp")
    return module


_THREADS = os.environ.get("FASTCONV_THREADS", "auto")
_WAKE = False  # (see wake; the TensorFlow bridge turns it on)


def openmp_shared_with_torch():
    """Called by the torch bridge. torch's wheel brings its own libgomp.so.1, and the loader
    gives the kernels that same library (same soname): torch's ops and OpenMP loops of the
    kernels then run on one team of threads, hot after each other's work. fastconv's own
    workers instead found torch's spinning in their way right after a torch op (Keras Conv2D
    then fastconv, 2 threads: 1x1 256 -> 512 on 4x28x28 2.7-3.1 ms on OpenMP, 4.0-4.5 on own
    threads, 4.3-5.1 on 1). So with the default FASTCONV_THREADS, OpenMP runs the loops."""
    if _THREADS == "auto":
        kernels.set_pool(False)


kernels = _tune(load())
variant = kernels.__name__.rsplit("_", 1)[-1]


def wake():
    """An eager call is about to run the kernels: fastconv's sleeping workers wake now and spin
    (yielding to any other thread ready on their CPU) for 0.5 ms. Woken by the kernel's first
    loop instead, a worker joins it ~0.1 ms late here (an idle vCPU). Only on TensorFlow, whose
    eager dispatch in front of a kernel (Keras, the op or the tape) is longer than the workers'
    idle spin: a TensorFlow eager layer call, depthwise 4x56x56x128, 0.55 -> 0.45 ms (the op
    alone, back to back, 0.34); grouped32 training step 2.65 -> 2.46 ms. On numpy (the same in
    a JAX eager call) the dispatch is short and the wake lost more than it won in the layer
    benchmark, where Keras' call before each of fastconv's leaves XLA's threads spinning:
    depthwise 36-41 -> 26-35 GFLOP/s, batch1 285 -> 180-266. On torch OpenMP runs the loops."""
    if _WAKE:
        kernels.wake(5e-4)


def wake_on_calls():
    """Called by the TensorFlow bridge: from now on `wake` wakes the workers."""
    global _WAKE
    _WAKE = True


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _default_threads():
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return min(int(env), _cpu_count())
    return _cpu_count()


_num_threads = _default_threads()
# called with the new count by set_num_threads (for compiled code that reads it at run time)
thread_listeners = []


def get_num_threads():
    """The number of threads fastconv's kernels use (1 when built without OpenMP, and in a
    process forked from a thread that had run them on several: libgomp's workers are not
    forked, and a region of 2 threads would wait for them forever)."""
    return _num_threads if kernels.OPENMP and not kernels.forked_with_team() else 1


def set_num_threads(n=None):
    """Use `n` threads in fastconv's kernels; None restores the default (all usable cores,
    or OMP_NUM_THREADS)."""
    global _num_threads
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise ValueError(f"`n` must be a positive int. Received: n={n!r}")
    _num_threads = _default_threads() if n is None else n
    for listener in thread_listeners:
        listener(get_num_threads())


def _after_fork_in_child():
    if kernels.forked_with_team():
        for listener in thread_listeners:
            listener(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def show_config():
    """Print the kernel build in use, whether OpenMP is on, the thread count, and whether the
    XLA custom call for JAX was built."""
    print(f"fastconv kernels: {variant} (available here: {', '.join(available_variants())})")
    print(f"OpenMP: {'on' if kernels.OPENMP else 'off (serial build)'}")
    if kernels.pool_settings()[0]:
        who = " (fastconv's own workers; OpenMP for another thread's calls meanwhile)"
    else:
        who = " (OpenMP)" if kernels.OPENMP else ""
    print(f"threads: {get_num_threads()}{who}")
    try:
        importlib.import_module("fastconv._xla_ffi")
        ffi = "built (JAX runs the kernels as XLA custom calls under jax.jit)"
    except ImportError:
        ffi = "not built (JAX uses jax.pure_callback)"
    print(f"XLA custom call: {ffi}")
