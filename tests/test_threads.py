"""Threads: fastconv.get/set_num_threads, results bit-identical whatever the thread count, and
one built layer called from many Python threads at once."""

import concurrent.futures
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import fastconv
import reference
from conftest import only_numpy, to_numpy
from fastconv import _dispatch

BACKEND = keras.backend.backend()
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    # Small calls run on one thread by design; here every call must use all it is given.
    monkeypatch.setattr(fastconv.backends.numpy, "_MACS_PER_THREAD", 1)
    yield
    fastconv.set_num_threads(None)


def _threads_in_child(omp_num_threads):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["KERAS_BACKEND"] = "numpy"
    if omp_num_threads is not None:
        env["OMP_NUM_THREADS"] = omp_num_threads
    run = subprocess.run(
        [sys.executable, "-c",
         "import fastconv; print(fastconv.get_num_threads(), fastconv._dispatch.kernels.OPENMP)"],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    threads, openmp = run.stdout.split()[-2:]
    return int(threads), openmp == "True"


@only_numpy
@pytest.mark.parametrize("omp,expected", [(None, CPUS), ("1", 1)])
def test_default_thread_count_at_import_honours_omp_num_threads(omp, expected):
    threads, openmp = _threads_in_child(omp)
    assert threads == (expected if openmp else 1)


def _fastconv_threads_in_child(value, backend="numpy"):
    env = {k: v for k, v in os.environ.items() if k != "FASTCONV_THREADS"}
    env["KERAS_BACKEND"] = backend
    if value is not None:
        env["FASTCONV_THREADS"] = value
    return subprocess.run(
        [sys.executable, "-c",
         "import numpy as np, keras, fastconv; fastconv.show_config(); "
         "fastconv.Conv2D(4, 3)(keras.ops.convert_to_tensor(np.ones((2, 9, 9, 3), 'float32'))); "
         "print(fastconv._dispatch.kernels.pool_settings()[0])"],
        env=env, capture_output=True, text=True, timeout=300)


@only_numpy
@pytest.mark.parametrize("value", [None, "auto", "own", "openmp"])
def test_fastconv_threads_chooses_whose_threads_run_the_loops(value):
    run = _fastconv_threads_in_child(value)
    assert run.returncode == 0, run.stderr[-3000:]
    own = value != "openmp" and _dispatch.kernels.POOL
    assert run.stdout.split()[-1] == str(own)
    if own:
        assert "fastconv's own workers" in run.stdout
    elif _dispatch.kernels.OPENMP:
        assert "(OpenMP)" in run.stdout


@only_numpy
def test_bad_fastconv_threads_raises_value_error():
    run = _fastconv_threads_in_child("pthreads")
    assert run.returncode != 0
    assert "ValueError" in run.stderr and "FASTCONV_THREADS='pthreads'" in run.stderr


@only_numpy
@pytest.mark.parametrize("value", [None, "own"])
def test_torch_backend_runs_the_loops_on_openmp_by_default(value):
    """On torch, the kernels share torch's libgomp: OpenMP's team, hot after torch's ops,
    unless FASTCONV_THREADS asks for fastconv's own threads."""
    pytest.importorskip("torch")
    run = _fastconv_threads_in_child(value, "torch")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == str(value == "own" and _dispatch.kernels.POOL)


@pytest.mark.parametrize("omp,expected", [
    ("1", 1), ("2", min(2, CPUS)), ("1000", CPUS), ("1,2", 1), (" 1 ", 1), ("", CPUS),
    ("junk", CPUS), ("0", CPUS), ("-3", CPUS),
])
def test_default_restored_by_set_num_threads_none(monkeypatch, omp, expected):
    if not _dispatch.kernels.OPENMP:
        pytest.skip("serial build: always 1 thread")
    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    fastconv.set_num_threads(None)
    assert fastconv.get_num_threads() == expected


def test_set_and_get():
    if not _dispatch.kernels.OPENMP:
        pytest.skip("serial build: always 1 thread")
    default = fastconv.get_num_threads()
    assert 1 <= default <= CPUS
    for n in (1, 2, 3, 7):
        fastconv.set_num_threads(n)
        assert fastconv.get_num_threads() == n
    fastconv.set_num_threads(np.int64(2).item())
    assert fastconv.get_num_threads() == 2
    fastconv.set_num_threads(None)
    assert fastconv.get_num_threads() == default


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, False, [2], np.float32(2)])
def test_bad_thread_counts_raise_value_error(bad):
    fastconv.set_num_threads(1)
    with pytest.raises(ValueError, match=r"n=") as info:
        fastconv.set_num_threads(bad)
    assert repr(bad) in str(info.value)
    assert fastconv.get_num_threads() == 1  # unchanged


# (layer kwargs, input shape): big enough that every thread gets rows, odd enough to split
# unevenly; dense, grouped, depthwise, channels_first, batch 1 (channel-block split).
THREAD_CASES = [
    (dict(filters=16, kernel_size=3, padding="same"), (4, 17, 19, 8)),
    (dict(filters=12, kernel_size=3, padding="same", groups=4, strides=2), (3, 21, 18, 8)),
    (dict(filters=24, kernel_size=5, padding="same", groups=24), (2, 15, 16, 24)),
    (dict(filters=10, kernel_size=(3, 2), dilation_rate=(2, 1), data_format="channels_first"),
     (3, 6, 14, 13)),
    (dict(filters=64, kernel_size=3, padding="same"), (1, 5, 6, 32)),
]


def _layer(kwargs, shape, seed=0):
    layer = fastconv.Conv2D(**kwargs)
    layer.build(shape)
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.standard_normal(w.shape).astype(np.float32)
                       for w in layer.get_weights()])
    return layer


def _expected(layer, x):
    out = reference.conv(x, to_numpy(layer.kernel), layer.strides, layer.padding,
                         layer.dilation_rate, layer.data_format)
    shape = (1, 1, 1, -1) if layer.data_format == "channels_last" else (1, -1, 1, 1)
    return out + to_numpy(layer.bias).reshape(shape)


@pytest.mark.parametrize("kwargs,shape", THREAD_CASES, ids=str)
def test_layer_output_is_bit_identical_with_1_and_2_threads(kwargs, shape):
    layer = _layer(kwargs, shape)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    outputs = []
    for threads in (1, 2, 1, 3):
        fastconv.set_num_threads(threads)
        outputs.append(to_numpy(layer(x)))
    for other in outputs[1:]:
        np.testing.assert_array_equal(outputs[0], other)
    reference.assert_close(outputs[0], _expected(layer, x))


@pytest.mark.parametrize("threads", [1, 2])
def test_eight_python_threads_call_one_layer_at_once(threads):
    fastconv.set_num_threads(threads)
    kwargs, shape = THREAD_CASES[1]
    layer = _layer(kwargs, shape, seed=2)
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((i % 3 + 1,) + shape[1:]).astype(np.float32)
              for i in range(16)]
    alone = [to_numpy(layer(x)) for x in inputs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(2):
            together = list(pool.map(lambda x: to_numpy(layer(x)), inputs))
            for x, a, b in zip(inputs, alone, together):
                np.testing.assert_array_equal(a, b)
                reference.assert_close(b, _expected(layer, x))


def test_python_threads_with_different_thread_counts_and_layers():
    """Threads that change fastconv's thread count while others compute: every result stays
    exact (the count only changes how rows are split)."""
    layers = [_layer(kwargs, shape, seed=i) for i, (kwargs, shape) in enumerate(THREAD_CASES)]
    rng = np.random.default_rng(4)
    inputs = [rng.standard_normal(shape).astype(np.float32) for _, shape in THREAD_CASES]
    alone = [to_numpy(layer(x)) for layer, x in zip(layers, inputs)]

    def work(i):
        fastconv.set_num_threads(1 + i % 2)
        j = i % len(layers)
        return j, to_numpy(layers[j](inputs[j]))

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        for j, out in pool.map(work, range(24)):
            np.testing.assert_array_equal(out, alone[j])


@only_numpy
def test_python_threads_share_the_kernels_scratch_blocks():
    """Eight Python threads run channels_first and channels_last gradients and forwards of
    different sizes at once: their band scratch, row-block sums, copies with zero-padded
    columns (x's for the forward, dy's for grad_input) and grad_kernel's framed x of a 7x7/2
    stem come from the kernels' few cached blocks (fc_scratch), each call's its own; every
    result equals the one computed alone."""
    kernels = _dispatch.kernels
    rng = np.random.default_rng(5)
    nchw = kernels.NCHW_X | kernels.NCHW_OUT
    problems = []
    for n, h, w in [(4, 28, 28), (2, 16, 20), (3, 30, 12), (1, 40, 40), (2, 9, 9)]:
        x, dy = rng.standard_normal((2, n, 64, h, w)).astype(np.float32)
        k = rng.standard_normal((3, 3, 8, 64)).astype(np.float32)
        wt = np.ascontiguousarray(
            k.reshape(3, 3, 8, 8, 8).transpose(0, 1, 4, 3, 2).reshape(3, 3, 8, 64))
        problems.append((x, dy, k, wt))

    def run(i):
        x, dy, k, wt = problems[i % len(problems)]
        dk, db = np.empty(k.shape, np.float32), np.empty(64, np.float32)
        dx, y = np.empty_like(x), np.empty_like(x)
        kernels.grad_kernel(x, dy, dk, 1, 1, 1, 1, 1, 1, 8, 2, db, nchw=nchw)
        kernels.grad_input(dy, wt, dx, 1, 1, 1, 1, 1, 1, 8, 2, nchw=nchw)
        kernels.forward(x, k, y, 1, 1, 1, 1, 1, 1, 8, 2, nchw=nchw)
        # channels_last, dense: short rows with border pixels, on copies with zero-padded
        # columns
        xl, dyl = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in (x, dy))
        kd = np.ascontiguousarray(np.tile(k[..., :16], (1, 1, 8, 1)))   # (3, 3, 64, 16)
        dyd = np.ascontiguousarray(dyl[..., :16])
        dkl, dxl, yl = np.empty(kd.shape, np.float32), np.empty_like(xl), np.empty_like(dyd)
        kernels.grad_kernel(xl, dyd, dkl, 1, 1, 1, 1, 1, 1, 1, 2, None)
        kernels.grad_input(dyd, np.ascontiguousarray(kd.transpose(0, 1, 3, 2)), dxl,
                           1, 1, 1, 1, 1, 1, 1, 2)
        kernels.forward(xl, kd, yl, 1, 1, 1, 1, 1, 1, 1, 2)
        # a 7x7/2 stem's kernel gradient (x framed in zeros)
        xs = np.ascontiguousarray(xl[..., :3])
        oh, ow = (xs.shape[1] + 1) // 2, (xs.shape[2] + 1) // 2
        dys = np.ascontiguousarray(dyl[:, :oh, :ow, :16])
        dks = np.empty((7, 7, 3, 16), np.float32)
        kernels.grad_kernel(xs, dys, dks, 2, 2, 1, 1, 3, 3, 1, 2, None)
        return dk, db, dx, y, dkl, dxl, yl, dks

    alone = [run(i) for i in range(len(problems))]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        for i, results in enumerate(pool.map(run, range(40))):
            for a, b in zip(alone[i % len(problems)], results):
                np.testing.assert_array_equal(a, b)


@pytest.fixture
def openmp_loops():
    """The kernels' loops on OpenMP (as when fastconv's own threads are busy with another
    thread's loop, or on builds without them)."""
    old = _dispatch.kernels.set_pool(False)
    yield
    _dispatch.kernels.set_pool(*old)


@only_numpy
@pytest.mark.skipif(not _dispatch.kernels.OPENMP or not sys.platform.startswith("linux"),
                    reason="the count of OpenMP masters is kept with OpenMP on Linux")
def test_openmp_masters_counted_while_their_threads_live(openmp_loops):
    """A thread that led a team of the kernels' threads counts as a master while it lives
    (with two, every region keeps the workers off the master's CPU: libgomp then lets them
    sleep after each region) and stops counting when it exits; results stay exact meanwhile."""
    import threading
    import time

    fastconv.set_num_threads(2)
    kwargs, shape = THREAD_CASES[1]
    layer = _layer(kwargs, shape, seed=5)
    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    alone = to_numpy(layer(x))
    masters = _dispatch.kernels.openmp_masters
    before = masters()
    led, release, outputs = threading.Event(), threading.Event(), []

    def lead():
        outputs.append(to_numpy(layer(x)))
        led.set()
        release.wait(timeout=60)

    thread = threading.Thread(target=lead)
    thread.start()
    try:
        assert led.wait(timeout=60)
        assert masters() == before + 1
        outputs.append(to_numpy(layer(x)))  # this thread's team, with two masters counted
    finally:
        release.set()
        thread.join()
    # a thread's key destructors run after Python's join returns: give them a moment
    deadline = time.monotonic() + 30
    while masters() != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert masters() == before
    for out in outputs:
        np.testing.assert_array_equal(out, alone)
    reference.assert_close(alone, _expected(layer, x))


def _task_state(tid):
    with open(f"/proc/self/task/{tid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]  # after the command name, which may hold ")"


@only_numpy
@pytest.mark.skipif(not _dispatch.kernels.OPENMP or not sys.platform.startswith("linux"),
                    reason="fastconv's own worker threads are built for OpenMP builds on Linux")
def test_wake_keeps_sleeping_workers_spinning_for_a_while():
    """kernels.wake(seconds) (what a layer call on TensorFlow does before its Python): the
    workers, asleep after an idle spell, run from then until `seconds` have passed, then sleep
    again; a layer call after a wake gives the same result."""
    import time

    kernels = _dispatch.kernels
    old = kernels.set_pool(True, 2e-4, 0)
    try:
        fastconv.set_num_threads(2)
        kwargs, shape = THREAD_CASES[1]
        layer = _layer(kwargs, shape, seed=5)
        x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
        alone = to_numpy(layer(x))  # (starts the workers)
        workers = kernels.pool_threads()
        assert workers

        def states():
            return [_task_state(tid) for tid in workers]

        def settle(state, within):
            deadline = time.monotonic() + within
            while states() != [state] * len(workers) and time.monotonic() < deadline:
                time.sleep(0.005)
            return states()

        assert settle("S", 5) == ["S"] * len(workers)  # asleep once idle
        kernels.wake(1.0)
        assert settle("R", 0.5) == ["R"] * len(workers)
        time.sleep(0.3)
        assert states() == ["R"] * len(workers)  # still spinning, 0.3 s into the second
        assert settle("S", 5) == ["S"] * len(workers)  # asleep again after it
        kernels.wake(0.01)
        np.testing.assert_array_equal(to_numpy(layer(x)), alone)
        assert settle("S", 5) == ["S"] * len(workers)
        kernels.set_pool(False)
        kernels.wake(1.0)  # no workers woken while OpenMP runs the loops
        time.sleep(0.05)
        assert states() == ["S"] * len(workers)
    finally:
        kernels.set_pool(*old)


@only_numpy
@pytest.mark.skipif(not _dispatch.kernels.OPENMP or not hasattr(os, "fork"),
                    reason="the fork safeguard is for OpenMP builds where fork exists")
@pytest.mark.parametrize("pool", [True, False], ids=["own threads", "openmp"])
@pytest.mark.parametrize("forking_thread_led", [True, False])
def test_forked_child_runs_the_kernels(forking_thread_led, pool):
    """A child forked from a thread that led a team of the kernels' OpenMP threads gets
    libgomp's pool without its workers: a region of 2 threads there waited for them forever.
    fastconv then uses 1 thread in the child (set_num_threads cannot raise it) and gives the
    same results. Forked from a thread that led no team (while another thread's team lives),
    the child keeps all its threads, and counts only its own team. fastconv's own threads (which
    run the loops unless another thread's loop holds them) are started anew in a child: it
    keeps 2 threads there."""
    import threading
    import time

    if not pool:
        old = _dispatch.kernels.set_pool(False)

    kwargs, shape = THREAD_CASES[1]
    layer = _layer(kwargs, shape, seed=7)
    x = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    fastconv.set_num_threads(1)
    alone = to_numpy(layer(x))
    fastconv.set_num_threads(2)
    led, release = threading.Event(), threading.Event()

    def lead():
        layer(x)  # another thread's team
        led.set()
        release.wait(timeout=60)

    def fork():  # -> (pid, read end of the child's report)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, never return into pytest
            status = 1
            try:
                fastconv.set_num_threads(2)
                same = np.array_equal(to_numpy(layer(x)), alone)
                os.write(write, f"{fastconv.get_num_threads()} "
                                f"{_dispatch.kernels.openmp_masters()} {same}".encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write)
        return pid, read

    leader = threading.Thread(target=lead)
    leader.start()
    pid = None
    try:
        assert led.wait(timeout=60)
        if forking_thread_led and not pool:
            layer(x)  # this thread leads a team too
            pid, read = fork()
        else:  # from a fresh thread, which never led one (this one may have, in other tests)
            forked = []

            def forker_run():
                if forking_thread_led:
                    layer(x)  # on fastconv's own threads: no team
                forked.append(fork())

            forker = threading.Thread(target=forker_run)
            forker.start()
            forker.join()
            pid, read = forked[0]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pid = None
                break
            time.sleep(0.05)
        else:
            pytest.fail("the forked child did not finish its convolution (hung)")
        report = os.read(read, 100).decode()
        os.close(read)
    finally:
        if pid is not None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        release.set()
        leader.join()
        fastconv.set_num_threads(None)
        if not pool:
            _dispatch.kernels.set_pool(*old)
    assert os.waitstatus_to_exitcode(status) == 0
    if pool and _dispatch.kernels.POOL:
        assert report == "2 0 True"
    else:
        assert report == ("1 0 True" if forking_thread_led else "2 1 True")
