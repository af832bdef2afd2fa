"""fastconv's layer-level benchmark suite: `python -m benchmarks.run` (see benchmarks/run.py).

benchmarks/kernels/ holds the separate kernel-level micro benchmark.
"""
