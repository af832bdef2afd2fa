"""The benchmark harness's own logic (benchmarks/worker.py's measure, benchmarks/run.py's choice
of processes to run again): what decides which timings the checked-in results keep."""

import statistics

import pytest

from conftest import only_numpy

pytestmark = only_numpy


class _ScriptedCanary:
    """A canary that reads from a script (then 1.0): a CPU missing where it says > 1.5."""

    def __init__(self, readings):
        self.readings = list(readings)
        self.best = 1e-3
        self.settled = 0

    def __call__(self):
        return self.readings.pop(0) if self.readings else 1.0

    def settle(self, limit):  # (a spell that outlasts the wait: the next reading as scripted)
        self.settled += 1
        return self()


def _measure(monkeypatch, readings, reps=3):
    from benchmarks import worker

    canary = _ScriptedCanary(readings)
    monkeypatch.setattr(worker, "_canary", canary)
    calls = []
    # (no untimed warm-up calls in rounds: each timed call is one entry of `calls`)
    monkeypatch.setattr(worker, "ROUND_WARMUP_LIMIT", 0.0)
    out = worker.measure({"a": lambda: calls.append(1)}, reps=reps, warmup=1, time_cap=100.0)
    return out["a"], canary, calls


def test_measure_times_a_disturbed_round_again(monkeypatch):
    # before round 1: 1.0; after it 2.0 (dropped; settle); then clean
    rec, canary, calls = _measure(monkeypatch, [1.0, 2.0, 1.0])
    assert rec["n"] == 3 and rec["dropped"] == 1 and rec["rounds_timed"] == 4
    assert canary.settled == 1
    assert len(calls) == 2 + 4  # two estimate calls (warmup 1: one more), 4 rounds of one call


def test_measure_retries_are_bounded(monkeypatch):
    from benchmarks import worker

    rec, canary, calls = _measure(monkeypatch, [2.0] * 100, reps=3)
    assert rec["dropped"] == worker.MAX_DROPPED * 3
    assert rec["n"] == 3  # kept despite the canary, once the retries are used up
    assert rec["max_dropped"] == worker.MAX_DROPPED * 3 and rec["disturbed"] == worker.DISTURBED


def _results(processes):
    return {"runs": {b: {"processes": [p for bb, p in processes if bb == b]}
                     for b, _ in processes}}


def _proc(cases, canary_ms, readings):
    # (as run_job records a process: matmul rates at its start, after each case and at its end)
    return {"cases": cases, "canary_best_s": canary_ms / 1e3,
            "env": {"matmul_gflops": readings[0]}, "matmul_gflops_end": readings[-1],
            "matmul_gflops": max(readings[0], readings[-1]), "matmul_readings": readings,
            "matmul_median_gflops": statistics.median(readings)}


@pytest.mark.parametrize("slow, why", [
    (_proc(["b"], 2.6, [200, 201, 200]), "canary best 1.38x"),
    (_proc(["b"], 1.9, [181, 184, 187]), "matmul 0.90x"),
    # slow through its cases, fine at its end (TensorFlow's dense process at 36049c0)
    (_proc(["b"], 1.9, [140, 170, 176, 180, 189]), "matmul 0.86x"),
])
def test_slow_process_is_run_again(slow, why):
    from benchmarks import run

    jobs = [("tensorflow", ["a"], False), ("tensorflow", ["b"], True), ("jax", ["a", "b"], False)]
    results = _results([("tensorflow", _proc(["a"], 1.9, [150, 200, 203])),  # a slow start only
                        ("tensorflow", slow),
                        ("jax", _proc(["a", "b"], 1.88, [205, 204, 207, 206]))])
    assert run.slow_jobs(results, jobs) == [("tensorflow", ["b"], True)]
    assert results["runs"]["tensorflow"]["processes"][1]["slow"].startswith(why)
    assert "slow" not in results["runs"]["tensorflow"]["processes"][0]


def test_no_process_is_slow_against_itself():
    from benchmarks import run

    jobs = [("numpy", ["a"], False)]
    assert run.slow_jobs(_results([("numpy", _proc(["a"], 5.0, [50, 50]))]), jobs) == []
