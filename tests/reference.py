"""An independent float64 numpy 2-D convolution and its gradients: what everything is checked
against. It shares no code with fastconv (its padding arithmetic is written out again on purpose).
"""

import math

import numpy as np


def _pads(size, k, stride, dilation, padding):
    span = (k - 1) * dilation + 1
    if padding == "valid":
        return (size - span) // stride + 1, 0, 0
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + span - size, 0)
    return out, total // 2, total - total // 2


def _setup(x_shape, w_shape, strides, padding, dilation, data_format):
    if data_format == "channels_first":
        n, c, h, w = x_shape
    else:
        n, h, w, c = x_shape
    kh, kw, cg, f = w_shape
    oh, top, bottom = _pads(h, kh, strides[0], dilation[0], padding)
    ow, left, right = _pads(w, kw, strides[1], dilation[1], padding)
    return (n, h, w, c, kh, kw, cg, f, c // cg, oh, ow), ((top, bottom), (left, right))


def _taps(g, strides, dilation):
    n, h, w, c, kh, kw, cg, f, groups, oh, ow = g
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dilation[0], i * dilation[0] + (oh - 1) * strides[0] + 1, strides[0])
            cols = slice(j * dilation[1], j * dilation[1] + (ow - 1) * strides[1] + 1, strides[1])
            yield i, j, rows, cols


def depthwise_kernel(w):
    """A depthwise (KH, KW, C, M) kernel as the grouped convolution's (KH, KW, 1, C * M) one (C
    groups of one input channel)."""
    kh, kw, c, m = np.shape(w)
    return np.reshape(w, (kh, kw, 1, c * m))


def conv(x, w, strides=(1, 1), padding="valid", dilation=(1, 1), data_format="channels_last"):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    if data_format == "channels_first":
        x = x.transpose(0, 2, 3, 1)
    g, pads = _setup(x.shape, w.shape, strides, padding, dilation, "channels_last")
    n, h, wd, c, kh, kw, cg, f, groups, oh, ow = g
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out = np.zeros((n, oh, ow, groups, f // groups))
    for i, j, rows, cols in _taps(g, strides, dilation):
        patch = xp[:, rows, cols, :].reshape(n, oh, ow, groups, cg)
        out += np.einsum("nhwgc,cgf->nhwgf", patch, w[i, j].reshape(cg, groups, f // groups))
    out = out.reshape(n, oh, ow, f)
    return out.transpose(0, 3, 1, 2) if data_format == "channels_first" else out


def grads(x, w, dy, strides=(1, 1), padding="valid", dilation=(1, 1),
          data_format="channels_last"):
    """(d loss / d x, d loss / d w) for d loss / d out = dy, by the adjoint of `conv`."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    if data_format == "channels_first":
        x, dy = x.transpose(0, 2, 3, 1), dy.transpose(0, 2, 3, 1)
    g, pads = _setup(x.shape, w.shape, strides, padding, dilation, "channels_last")
    n, h, wd, c, kh, kw, cg, f, groups, oh, ow = g
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    dyg = dy.reshape(n, oh, ow, groups, f // groups)
    for i, j, rows, cols in _taps(g, strides, dilation):
        patch = xp[:, rows, cols, :].reshape(n, oh, ow, groups, cg)
        wg = w[i, j].reshape(cg, groups, f // groups)
        dxp[:, rows, cols, :] += np.einsum("nhwgf,cgf->nhwgc", dyg, wg).reshape(n, oh, ow, c)
        dw[i, j] = np.einsum("nhwgc,nhwgf->cgf", patch, dyg).reshape(cg, f)
    dx = dxp[:, pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + wd, :]
    if data_format == "channels_first":
        dx = dx.transpose(0, 3, 1, 2)
    return dx, dw


def assert_close(actual, expected, rtol=1e-4, name="result"):
    """|actual - expected| <= rtol * max|expected| (relative to the output's max magnitude)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    if expected.size == 0:
        return
    scale = max(np.abs(expected).max(), 1e-30)
    err = np.abs(actual - expected).max()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol:g} * {scale:.3g}"
