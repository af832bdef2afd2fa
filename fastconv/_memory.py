"""Result buffers for the host kernels: 64-byte aligned, and large ones reused.

Alignment: TensorFlow's CPU tensors need 64 bytes; a result that has it becomes a tf.Tensor without
a copy (tf.numpy_function in a graph, dlpack eagerly). numpy only promises 16.

Reuse: glibc serves allocations above 32 MB with a fresh mmap and unmaps them on free, so every
such result is new memory, and touching it costs a page fault per 4 KB page. Measured here for an
8x112x112x96 float32 result (MobileNetV2's first expansion, 38.5 MB): the 1x1 convolution runs in
3.2 ms into warm memory and in 40 ms into fresh memory. So a large result's memory goes back to a
small pool when the last array using it dies (a weakref finalizer on the object that owns it) and
the next result of the same size takes it. Only freed buffers are kept, at most _KEEP bytes, the
least recently freed dropped first; the rest of the process's allocations are left alone.
"""

import collections
import math
import threading
import weakref

import numpy as np

ALIGN = 64
_POOLED = 1 << 20  # smaller results come from np.empty: glibc reuses those by itself
_KEEP = 512 << 20

# nbytes -> [(uint8 buffer, its first 64-byte aligned address), ...], least recently freed first
_free = collections.OrderedDict()
_free_bytes = 0
# Finalizers run whenever a last reference drops, possibly in the middle of `empty` on the same
# thread: they only take the lock if it is free, and otherwise let the buffer go.
_lock = threading.Lock()


class _Owner:
    """The `base` of a pooled result (or of a `writable` view, which `keep`s the tensor it views)
    and of every view of it: numpy stops its base chain at a non-array object, so this dies
    exactly when the last array over the buffer does."""

    __slots__ = ("__array_interface__", "__weakref__", "keep")


def address(array):
    """Where array's data starts (numpy's .ctypes.data makes a ctypes object: 8 us here with
    cold caches, against 6 for this)."""
    return array.__array_interface__["data"][0]


def _aligned(buffer, nbytes):
    start = -address(buffer) % ALIGN
    return buffer[start:start + nbytes]


def _release(nbytes, entry):
    global _free_bytes
    if not _lock.acquire(blocking=False):
        return
    try:
        _free.setdefault(nbytes, []).append(entry)
        _free.move_to_end(nbytes)
        _free_bytes += entry[0].nbytes
        while _free_bytes > _KEEP:
            size, buffers = next(iter(_free.items()))
            _free_bytes -= buffers.pop(0)[0].nbytes
            if not buffers:
                del _free[size]
    finally:
        _lock.release()


# the weak references whose callbacks give pooled buffers back: {ref: (nbytes, entry)}. A
# weakref callback, not weakref.finalize (which its registry makes 3x as costly to set up, ~8 us
# of the ~30 that a result's buffer took right after a large kernel had evicted the caches)
_watched = {}


def _released(ref, watched=_watched, release=_release):
    # (the module's globals may be gone at interpreter exit: the defaults keep them)
    found = watched.pop(ref, None)
    if found is not None:
        release(*found)


# per thread: TensorFlow runs the bridges' functions on several threads at once
_local = threading.local()


class into:
    """Within `with into(array):` on this thread, the first `empty` of array's shape and dtype
    returns array itself: a bridge lets the kernels write a result straight into memory that its
    framework allocated."""

    def __init__(self, array):
        self.array = array

    def __enter__(self):
        self.outer = getattr(_local, "into", None)
        _local.into = self.array

    def __exit__(self, *exc):
        _local.into = self.outer


def writable(array, keep):
    """A writable view of a read-only C-contiguous array (e.g. np.from_dlpack of a framework
    tensor), which keeps `keep` alive."""
    owner = _Owner()
    owner.__array_interface__ = dict(array.__array_interface__, data=(address(array), False),
                                     strides=None)
    owner.keep = keep
    return np.asarray(owner)


def aligned_empty(shape, dtype, offset=0):
    """An uninitialised C-contiguous array, 64-byte aligned (or `offset` bytes past a 64-byte
    boundary), of numpy's own memory (not pooled, never an enclosing `into`'s array)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = _aligned(np.empty(nbytes + ALIGN + offset, np.uint8), nbytes + offset)
    return buffer[offset:].view(dtype).reshape(shape)


def empty(shape, dtype, offset=0):
    """An uninitialised C-contiguous array, 64-byte aligned (or `offset` bytes past a 64-byte
    boundary, offset < 64), that may reuse a freed result's memory (or be the array of an
    enclosing `into`)."""
    global _free_bytes
    dtype = np.dtype(dtype)
    target = getattr(_local, "into", None)
    if target is not None and target.shape == tuple(shape) and target.dtype == dtype:
        _local.into = None
        return target
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _POOLED:
        return aligned_empty(shape, dtype, offset)
    entry = None
    with _lock:
        buffers = _free.get(nbytes)
        if buffers:
            entry = buffers.pop()
            _free_bytes -= entry[0].nbytes
            if not buffers:
                del _free[nbytes]
    if entry is None:
        buffer = np.empty(nbytes + 2 * ALIGN, np.uint8)  # (room for any offset)
        start = address(buffer)
        entry = (buffer, start - start % -ALIGN)
    owner = _Owner()
    owner.__array_interface__ = {
        "shape": tuple(shape), "typestr": dtype.str, "version": 3,
        "data": (entry[1] + offset, False),
    }
    _watched[weakref.ref(owner, _released)] = (nbytes, entry)
    return np.asarray(owner)


def pooled_bytes():
    """Bytes held for reuse (for tests and benchmarks)."""
    return _free_bytes
