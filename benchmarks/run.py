"""The layer-level benchmark suite: `python -m benchmarks.run` (or `make bench BENCH_ARGS=...`).

Runs every backend back to back, each in its own subprocess (KERAS_BACKEND is read once, at
import), and writes benchmarks/results/results.json, results.md and speedup.png. See
benchmarks/worker.py for what is timed and how memory is measured, benchmarks/cases.py for the
cases, benchmarks/report.py for the table and the BENCHMARKS.md target checks.

    python -m benchmarks.run                      # everything (20-40 min on 2 cores)
    python -m benchmarks.run --quick              # smoke test, about a minute; writes to a temp dir
    python -m benchmarks.run --backends jax,torch --cases resnet3x3,depthwise --reps 9

On TensorFlow, Keras' own grouped conv (groups > 1) goes through XLA and may corrupt the heap at
exit: those cases run in a separate child process whose crash after its last result does not fail
the run. Results are streamed by the workers line by line, so a crash loses at most the case in
progress (the missing cases get one more process).
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks import report
from benchmarks.cases import CASES, select

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results")


class Progress:
    """A plain-text progress bar on stderr (one line per update when stderr is not a tty)."""

    def __init__(self, total):
        self.total = max(total, 1)
        self.done = 0
        self.t0 = time.time()
        self.tty = sys.stderr.isatty()
        self.last = ""

    def show(self, label):
        frac = min(self.done / self.total, 1.0)
        elapsed = time.time() - self.t0
        eta = elapsed / frac - elapsed if frac > 0 else None
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        line = (f"[{bar}] {100 * frac:3.0f}% {elapsed / 60:4.1f} min"
                + (f" (~{eta / 60:.1f} min left)" if eta is not None else "") + f"  {label}")
        if self.tty:
            sys.stderr.write("\r" + line[:150].ljust(len(self.last)))
        elif line != self.last:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self.last = line[:150]

    def close(self):
        if self.tty:
            sys.stderr.write("\n")


def worker_env(backend):
    env = dict(os.environ)
    # A fair matmul rate: OpenBLAS must pick its own kernel and cache sizes.
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    env["KERAS_BACKEND"] = backend
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_worker(backend, names, args, log_dir, progress, units_per_case, timeout):
    """Run one worker; returns (records, returncode, duration, log path)."""
    fd, out = tempfile.mkstemp(prefix=f"{backend}-", suffix=".jsonl", dir=log_dir)
    os.close(fd)
    log = out[:-len(".jsonl")] + ".log"
    cmd = [sys.executable, "-m", "benchmarks.worker", "--cases", ",".join(names), "--out", out,
           "--reps", str(args.reps), "--warmup", str(args.warmup), "--time-cap",
           str(args.time_cap)] + (["--no-memory"] if args.no_memory else [])
    t0 = time.time()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=worker_env(backend), stdout=logf,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

        def pump():
            for line in proc.stderr:
                if line.startswith("@@progress "):
                    p = json.loads(line[len("@@progress "):])
                    if p["phase"] in ("done", "memory_done"):
                        progress.done += 1
                    progress.show(f"{backend}: {p['case']} {p['phase']}")
                else:
                    logf.write(line)
                    logf.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the worker's own process group (start_new_session)
            rc = proc.wait()
            logf.write(f"\n[runner] killed after {timeout:.0f} s\n")
        reader.join(timeout=10)
    records = []
    with open(out) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                pass
    os.unlink(out)
    return records, rc, time.time() - t0, log


def run_job(results, backend, names, tolerant, args, log_dir, progress, units, rerun=False):
    """Runs the cases `names` in a worker (one more for the cases a crash lost) and puts their
    records in `results`; returns whether the worker's exit was fine (a crash after its last
    result is, for a `tolerant` job)."""
    run = results["runs"].setdefault(backend, {"processes": [], "cases": {}, "memory": {},
                                               "errors": {}})
    todo = list(names)
    if rerun:
        for n in names:
            run["errors"].pop(n, None)
    for attempt in range(2):
        records, rc, dur, log = run_worker(backend, todo, args, log_dir, progress, units,
                                           args.job_timeout)
        env = next((r for r in records if r["type"] == "env"), None)
        end = next((r for r in records if r["type"] == "end"), None)
        first, last = env and env["matmul_gflops"], end and end["matmul_gflops"]
        mm = max(first or 0, last or 0) or None
        readings = [x for x in [first]
                    + [r.get("matmul_after_gflops") for r in records if r["type"] == "case"]
                    + [last] if x]
        for r in records:
            if r["type"] == "case":
                r["matmul_gflops"] = mm
                r["copy_gbps"] = env and env.get("copy_gbps")
                run["cases"][r["case"]] = r
                run["errors"].pop(r["case"], None)
            elif r["type"] == "memory":
                run["memory"][r["case"]] = r
            elif r["type"] == "error":
                run["errors"][r["case"]] = f"{r['phase']}: {r['error']}"
        run["processes"].append({"cases": todo, "returncode": rc, "tolerant": tolerant,
                                 "duration_s": dur, "env": env, "log": log,
                                 "matmul_gflops_end": last,
                                 "matmul_gflops": mm,  # (its cases' rate: the better of both)
                                 "matmul_readings": readings,
                                 "matmul_median_gflops": (statistics.median(readings)
                                                          if readings else None),
                                 "canary_best_s": end and end.get("canary_best_s")})
        finished = end is not None
        if rc != 0 and not (tolerant and finished):
            tail = open(log).read().strip().splitlines()[-15:]
            sys.stderr.write(f"\n[{backend}] worker exited with {rc}; log {log}:\n  "
                             + "\n  ".join(tail) + "\n")
        if rerun:
            run["processes"][-1]["rerun"] = True
        missing = [n for n in todo if n not in run["cases"] and n not in run["errors"]]
        if not missing:
            break
        if attempt == 0:
            sys.stderr.write(f"\n[{backend}] no result for {missing}: one more process\n")
            todo = missing
        else:
            for n in missing:
                run["errors"][n] = f"no result (worker exit code {rc}, log {log})"
    return rc == 0 or tolerant


# A process slower as a whole than the others in a run is run once more (the canary in each
# round compares with its own best only): in the run at bc9f335, TensorFlow's grouped cases'
# process timed fastconv's steps at 2.12 / 3.53 / 10.99 ms, a rerun right after at 1.12 / 2.72
# / 7.90. Slow: its canary's best time over SLOW_CANARY times the least of the run's processes
# (they agree within 1-2% otherwise), or the median of numpy's matmul rates read at the
# process's start, after each of its cases and at its end under SLOW_MATMUL times the best
# process's. Not the rate at a process's start alone: after the imports it reads 0.7x its end
# often enough (148 then 203 GFLOP/s in one process); nor the better of start and end: at
# 36049c0 TensorFlow's dense process read 140 and 189 (0.94x the best) and timed 15% slow.
# In the run at 4fc69a1 TensorFlow's dense cases' process read 181 / 187 GFLOP/s, the others
# 194-206, with the same canary best: fastconv's training steps there took 14.8 ms on
# resnet3x3 (JAX's process 12.5; 13.0 standalone right after, 12.3 its host kernels alone).
SLOW_CANARY = 1.25
SLOW_MATMUL = 0.92


def slow_jobs(results, jobs):
    """The jobs whose (last) process ran slow against the others of the run."""
    last = {}
    for backend, names, tolerant in jobs:
        for proc in results["runs"].get(backend, {}).get("processes", []):
            if proc["cases"][0] in names:
                last[(backend, names[0])] = proc
    canary = {k: p["canary_best_s"] for k, p in last.items() if p.get("canary_best_s")}
    matmul = {k: p["matmul_median_gflops"] for k, p in last.items()
              if p.get("matmul_median_gflops")}
    slow = []
    for backend, names, tolerant in jobs:
        k = (backend, names[0])
        why = []
        if k in canary and canary[k] > SLOW_CANARY * min(canary.values()):
            why.append(f"canary best {canary[k] / min(canary.values()):.2f}x the least")
        if k in matmul and matmul[k] < SLOW_MATMUL * max(matmul.values()):
            why.append(f"matmul {matmul[k] / max(matmul.values()):.2f}x the best")
        if why:
            last[k]["slow"] = "; ".join(why)
            slow.append((backend, names, tolerant))
    return slow


def plan(backends, cases):
    """[(backend, case names, tolerant)] in run order."""
    jobs = []
    for b in backends:
        if b == "tensorflow":
            plain = [c.name for c in cases if c.groups == 1]
            grouped = [c.name for c in cases if c.groups > 1]
            if plain:
                jobs.append((b, plain, False))
            if grouped:
                jobs.append((b, grouped, True))
        else:
            jobs.append((b, [c.name for c in cases], False))
    return jobs


def git_info():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastconv", "setup.py"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return commit or None, bool(dirty)
    except OSError:
        return None, None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test (~1 min): 3 cases, 3 reps, no memory phase, results in a "
                        "temporary directory unless --out-dir is given")
    p.add_argument("--backends", default="tensorflow,jax,torch,numpy")
    p.add_argument("--cases", default=None, help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--reps", type=int, default=None, help="timed calls per variant (default 7; "
                   "quick 3)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--time-cap", type=float, default=None,
                   help="seconds per variant and case before fewer rounds (>= 3) run "
                        "(default 25; quick 4)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory phase")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--job-timeout", type=float, default=3600.0,
                   help="seconds after which a worker process is killed")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if args.quick else 7
    if args.time_cap is None:
        args.time_cap = 4.0 if args.quick else 25.0
    if args.quick:
        args.no_memory = True
    if args.reps < 3:
        p.error("--reps must be >= 3")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in report.BACKENDS]
    if bad:
        p.error(f"unknown backend(s) {bad}; choose from {', '.join(report.BACKENDS)}")
    try:
        cases = select(args.cases.split(",") if args.cases else None, quick=args.quick)
    except ValueError as e:
        p.error(str(e))
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix="fastconv-bench-quick-") if args.quick
                               else DEFAULT_OUT)
    log_dir = tempfile.mkdtemp(prefix="fastconv-bench-logs-")

    jobs = plan(backends, cases)
    units = 1 if args.no_memory else 2
    progress = Progress(sum(len(names) for _, names, _ in jobs) * units)
    commit, dirty = git_info()
    load0 = os.getloadavg()
    t0 = time.time()
    results = {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in
                                                              (argv or sys.argv[1:])),
            "git_commit": commit, "git_dirty": dirty, "cpu": cpu_model(),
            "cpus": len(os.sched_getaffinity(0)), "loadavg_start": [round(x, 2) for x in load0],
            "reps": args.reps, "warmup": args.warmup, "time_cap": args.time_cap,
            "quick": args.quick, "memory": not args.no_memory,
            "slow_canary": SLOW_CANARY, "slow_matmul": SLOW_MATMUL,
        },
        "cases": {c.name: c.to_dict() for c in cases},
        "runs": {},
    }
    crashed = {}
    for backend, names, tolerant in jobs:
        crashed[backend, names[0]] = not run_job(results, backend, names, tolerant, args,
                                                 log_dir, progress, units)
    for backend, names, tolerant in slow_jobs(results, jobs):
        sys.stderr.write(f"\n[{backend}] {names[0]}..: the process ran slow, once more\n")
        progress.total += len(names) * units
        crashed[backend, names[0]] = not run_job(results, backend, names, tolerant, args,
                                                 log_dir, progress, units, rerun=True)
    failed = [b for (b, _), c in crashed.items() if c]
    failed += [f"{b}:{n}" for b, run in results["runs"].items() for n in run["errors"]]
    progress.close()
    load1 = os.getloadavg()
    results["meta"]["loadavg_end"] = [round(x, 2) for x in load1]
    results["meta"]["busy"] = max(load0[0], load1[0]) > 1.5 * results["meta"]["cpus"]
    results["meta"]["duration_s"] = time.time() - t0
    md = report.write_all(results, out_dir)
    summary = md.split("## Per case")[0]
    print(summary.split("## Summary", 1)[1].strip() if "## Summary" in summary else summary)
    print(f"\nwrote {out_dir}/results.json, results.md, speedup.png "
          f"({results['meta']['duration_s'] / 60:.1f} min); worker logs in {log_dir}")
    if failed:
        print(f"FAILED: {', '.join(sorted(set(failed)))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
