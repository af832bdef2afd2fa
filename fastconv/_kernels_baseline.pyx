# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# The "baseline" build of the kernels: setup.py gives it its target flags; the source is shared.
include "_kernels.pxi"
