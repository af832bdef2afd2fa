"""`make test`: `pytest tests` once per Keras backend (Keras reads KERAS_BACKEND once per
process), in LANES concurrent lanes of backends run one after another.

The suites spend much of their time in one thread (imports, tracing, XLA compiles), so two lanes
on two cores finish sooner than one: the four suites took 19.4 min of CI's 20 on a Zen 3 machine
here, one after another. Each suite's output is printed whole when it ends.

usage: python tests/run_backends.py [--lanes N] BACKEND...
"""

import argparse
import os
import subprocess
import sys
import tempfile
import threading

# rough relative suite times (seconds on Zen 3), to balance the lanes
WEIGHT = {"jax": 300, "tensorflow": 190, "torch": 110, "numpy": 60}


def lanes_for(backends, n):
    lanes = [[] for _ in range(max(1, min(n, len(backends))))]
    load = [0] * len(lanes)
    for b in sorted(backends, key=lambda b: -WEIGHT.get(b, 100)):
        i = load.index(min(load))
        lanes[i].append(b)
        load[i] += WEIGHT.get(b, 100)
    return lanes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lanes", type=int, default=2)
    parser.add_argument("backends", nargs="+")
    args = parser.parse_args()
    pytest = os.path.join(os.path.dirname(sys.executable), "pytest")
    failed, lock = [], threading.Lock()

    def lane(backends):
        for b in backends:
            with tempfile.TemporaryFile("w+") as log:
                rc = subprocess.call([pytest, "tests"], stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "KERAS_BACKEND": b})
                log.seek(0)
                with lock:
                    print(f"=== KERAS_BACKEND={b}", flush=True)
                    sys.stdout.write(log.read())
                    print(f"=== KERAS_BACKEND={b}: {'passed' if rc == 0 else 'FAILED'}",
                          flush=True)
                    if rc != 0:
                        failed.append(b)

    threads = [threading.Thread(target=lane, args=(l,)) for l in lanes_for(args.backends,
                                                                           args.lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        print(f"FAILED backends: {' '.join(failed)}")
        return 1
    print(f"all backends passed: {' '.join(args.backends)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
