"""fastconv._memory: large result buffers are reused only after every array over them is gone."""

import gc

import numpy as np
import pytest

from fastconv import _memory
from conftest import only_numpy

pytestmark = only_numpy

SHAPE = (3, 64, 64, 33)  # 1.6 MB of float32: pooled


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch):
    monkeypatch.setattr(_memory, "_free", type(_memory._free)())
    monkeypatch.setattr(_memory, "_free_bytes", 0)


def address(a):
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("shape, dtype", [(SHAPE, np.float32), (SHAPE, np.float64),
                                          ((5, 7), np.float32), ((0, 4, 4, 8), np.float32)])
def test_results_are_aligned_writable_and_contiguous(shape, dtype):
    a = _memory.empty(shape, dtype)
    assert a.shape == shape and a.dtype == dtype
    assert a.flags.c_contiguous and a.flags.writeable
    assert a.size == 0 or address(a) % _memory.ALIGN == 0  # (an empty array has no data)
    a[...] = 1  # the whole buffer is ours
    assert a.sum() == a.size


def test_a_buffer_is_reused_once_its_last_view_is_gone():
    a = _memory.empty(SHAPE, np.float32)
    where = address(a)
    view = a.transpose(0, 3, 1, 2)[:, 1:]
    del a
    gc.collect()
    assert _memory.pooled_bytes() == 0  # a view still uses it
    b = _memory.empty(SHAPE, np.float32)
    assert address(b) != where
    b[...] = 2
    view[...] = 7
    assert (b == 2).all()
    del view
    assert _memory.pooled_bytes() >= 4 * np.prod(SHAPE)
    c = _memory.empty(SHAPE, np.float32)
    assert address(c) == where and _memory.pooled_bytes() == 0


def test_small_results_are_not_pooled():
    a = _memory.empty((4, 4), np.float32)
    assert a.base is not None and not isinstance(a.base, _memory._Owner)
    del a
    assert _memory.pooled_bytes() == 0


def test_the_pool_keeps_at_most_its_limit_dropping_the_oldest(monkeypatch):
    nbytes = 4 * int(np.prod(SHAPE))
    monkeypatch.setattr(_memory, "_KEEP", 2 * nbytes + 2 * _memory.ALIGN)
    arrays = [_memory.empty(SHAPE, np.float32) for _ in range(3)]
    other = _memory.empty((2,) + SHAPE, np.float32)
    del arrays
    assert _memory.pooled_bytes() <= _memory._KEEP
    assert list(_memory._free) == [nbytes]
    del other  # newest: the older buffers make way for it
    assert list(_memory._free) == [2 * nbytes]
    assert _memory.pooled_bytes() <= _memory._KEEP


def test_into_hands_out_its_array_once_for_its_shape_and_dtype():
    target = np.zeros((2, 3, 4, 5), np.float32)
    with _memory.into(target):
        other_dtype = _memory.empty((2, 3, 4, 5), np.float64)
        other_shape = _memory.empty((2, 4, 3, 5), np.float32)
        first = _memory.empty([2, 3, 4, 5], np.float32)
        second = _memory.empty((2, 3, 4, 5), np.float32)
    after = _memory.empty((2, 3, 4, 5), np.float32)
    assert first is target
    assert all(a is not target for a in (other_dtype, other_shape, second, after))


def test_writable_views_the_same_memory_and_keeps_its_owner():
    class Owner:
        pass

    data = np.arange(12.0).reshape(3, 4)
    data.flags.writeable = False
    keep = Owner()
    view = _memory.writable(data, keep)
    assert view.flags.writeable and address(view) == address(data)
    assert view.base.keep is keep
    view[1] = -1
    assert (data[1] == -1).all()
