"""The compiled kernels, every build this CPU runs, against the float64 reference."""

import importlib
import itertools
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from conftest import only_numpy
import fastconv
from fastconv import _dispatch, _memory
from fastconv.backends import numpy as host
from fastconv.geometry import ConvSpec

pytestmark = only_numpy

VARIANTS = _dispatch.available_variants()

# (N, H, W, C, KH, KW, F, groups, strides, dilation, padding)
CASES = [
    (2, 7, 9, 4, 3, 3, 6, 1, (1, 1), (1, 1), "valid"),
    (2, 7, 9, 4, 3, 3, 6, 1, (1, 1), (1, 1), "same"),
    (1, 8, 8, 6, 3, 2, 9, 3, (2, 1), (1, 1), "same"),
    (3, 10, 11, 8, 3, 3, 8, 8, (1, 1), (1, 1), "same"),  # depthwise
    (2, 10, 11, 5, 3, 3, 15, 5, (1, 1), (1, 1), "same"),  # depthwise, multiplier 3
    (2, 12, 12, 4, 3, 3, 4, 2, (1, 1), (2, 3), "same"),  # dilation per axis
    (2, 12, 13, 3, 5, 4, 5, 1, (3, 2), (1, 1), "valid"),  # strides per axis
    (2, 9, 9, 4, 3, 3, 4, 1, (2, 2), (2, 2), "same"),  # ops may combine both
    (1, 1, 1, 3, 3, 3, 2, 1, (1, 1), (1, 1), "same"),  # 1x1 image, kernel larger than input
    (2, 4, 5, 3, 7, 6, 4, 1, (1, 2), (1, 1), "same"),
    (0, 5, 5, 4, 3, 3, 4, 2, (1, 1), (1, 1), "same"),  # empty batch
    (2, 6, 6, 64, 3, 3, 48, 8, (1, 1), (1, 1), "same"),
    (1, 5, 7, 40, 1, 1, 33, 1, (1, 1), (1, 1), "valid"),
    (2, 6, 6, 20, 2, 2, 20, 20, (2, 2), (1, 1), "same"),  # even kernel, stride 2, depthwise
    # Wide enough for the vector tiles (6 pixels x 64 channels), their tails and special paths:
    (2, 9, 11, 32, 3, 3, 32, 4, (1, 1), (1, 1), "same"),  # 8 channels per group (pair tiles)
    (2, 9, 11, 32, 3, 3, 32, 4, (2, 2), (1, 1), "same"),
    (2, 10, 11, 48, 3, 3, 24, 4, (1, 1), (2, 2), "same"),  # 12 in / 6 out per group
    (2, 9, 14, 64, 3, 3, 72, 1, (1, 1), (1, 1), "same"),  # dense, merged kw taps
    (2, 7, 7, 24, 3, 3, 80, 1, (1, 1), (1, 1), "same"),  # dense, short rows: narrower tiles
    (1, 11, 13, 61, 3, 3, 47, 1, (1, 1), (1, 1), "valid"),  # odd channel counts
    (2, 15, 17, 3, 7, 7, 64, 1, (2, 2), (1, 1), "same"),  # stem: 3 input channels
    (2, 13, 21, 128, 3, 3, 128, 128, (1, 1), (1, 1), "same"),  # depthwise, sliding tile
    (2, 13, 21, 37, 5, 5, 37, 37, (2, 1), (1, 2), "same"),  # depthwise, odd, 5x5
    (2, 9, 10, 13, 4, 3, 13, 13, (1, 1), (2, 1), "same"),  # depthwise 4x3: 3-column tiles, tails
    (1, 7, 8, 19, 2, 3, 19, 19, (2, 1), (1, 1), "valid"),  # depthwise 2x3, stride h 2
    (2, 9, 2, 21, 3, 3, 21, 21, (2, 1), (2, 1), "same"),  # depthwise 3x3 rows: W < 3, tails
    (1, 6, 9, 35, 3, 3, 35, 35, (1, 1), (1, 1), "valid"),  # depthwise 3x3 rows, no padding
    # depthwise rows of 5 taps (fc_dwt, NT = 5): interior tiles, border runs, channel tails
    (2, 9, 27, 37, 5, 5, 37, 37, (1, 1), (1, 1), "same"),
    (1, 7, 30, 72, 3, 5, 72, 72, (2, 1), (2, 1), "valid"),  # 2 vectors, stride and dilation h
    (2, 6, 4, 16, 5, 5, 16, 16, (1, 1), (1, 1), "same"),  # W < 5: no interior run
    # depthwise 5x5 kernel gradient (fc_dwkpix): stride 2, dilation h 2, channels in several
    # blocks of sums, a channel tail
    (1, 9, 17, 300, 5, 5, 300, 300, (2, 2), (1, 1), "same"),
    (2, 8, 12, 168, 5, 5, 168, 168, (1, 1), (2, 1), "same"),
    (1, 4, 150, 24, 3, 3, 24, 24, (1, 1), (1, 1), "same"),  # 3x3 rows longer than a block
    # depthwise 3x3 rows with stride 2 along w: odd and even widths (left padding 1 and 0),
    # channel tails, rows longer than a pixel block, W = 3 and W < 3 (no interior)
    (2, 9, 17, 37, 3, 3, 37, 37, (2, 2), (1, 1), "same"),
    (1, 6, 16, 21, 3, 3, 21, 21, (1, 2), (2, 1), "same"),
    (1, 5, 141, 8, 3, 3, 8, 8, (2, 2), (1, 1), "valid"),
    (2, 4, 3, 16, 3, 3, 16, 16, (2, 2), (1, 1), "same"),
    (1, 4, 2, 16, 3, 3, 16, 16, (1, 2), (1, 1), "same"),
    (1, 9, 19, 24, 3, 3, 24, 24, (2, 2), (2, 1), "same"),  # dilation h 2: rows with no taps
    # depthwise, pixel tiles outer (strided, dilated): several tiles a row, channel tails
    (2, 7, 40, 40, 3, 3, 40, 40, (2, 2), (1, 2), "same"),
    (1, 9, 30, 27, 3, 3, 27, 27, (1, 1), (1, 2), "same"),
    (1, 8, 8, 96, 1, 1, 200, 1, (2, 2), (1, 1), "valid"),  # pointwise, stride 2
    (3, 12, 12, 16, 3, 3, 16, 1, (1, 1), (4, 4), "same"),  # dilation 4 on a small image
    # depthwise dilated along w (the kernel gradient by fc_dwkpix on dilation phases): no
    # padding, channel tails, 7x7, a long row, rows shorter than the dilation's reach and than
    # the dilation
    (2, 8, 23, 40, 3, 3, 40, 40, (1, 1), (1, 3), "valid"),
    (1, 6, 150, 20, 3, 3, 20, 20, (1, 1), (2, 2), "same"),
    (1, 15, 30, 72, 7, 7, 72, 72, (1, 1), (2, 2), "same"),
    (2, 6, 7, 24, 5, 5, 24, 24, (1, 1), (1, 4), "same"),
    (1, 5, 3, 16, 3, 3, 16, 16, (1, 1), (1, 4), "same"),
    # Dense kernels in column blocks (_column_blocks): more channels than a tile, tails
    (2, 7, 8, 80, 3, 3, 136, 1, (1, 1), (1, 1), "same"),
    (2, 9, 9, 144, 3, 3, 80, 1, (2, 2), (1, 1), "same"),
    (1, 3, 3, 80, 3, 3, 136, 1, (1, 1), (1, 1), "same"),  # too few pixels to pack
    # Gradients on s x s blocks (Geometry.blocks): few input channels, stride >= 2
    (2, 9, 10, 3, 4, 4, 8, 1, (4, 4), (1, 1), "valid"),  # blocks miss the last rows/columns
    (1, 9, 9, 1, 3, 3, 5, 1, (3, 3), (1, 1), "same"),
    (2, 11, 10, 4, 5, 3, 16, 1, (2, 2), (1, 1), "same"),  # kernel 5x3
    (1, 8, 9, 3, 1, 1, 8, 1, (2, 2), (1, 1), "valid"),  # kernel smaller than the stride: not
    # grad_input as a GEMM and col2im (few input channels, F >= 64): on every variant and dtype
    # (1 channel), a dilated kernel with padded columns, and several chunks of rows
    (2, 9, 11, 1, 3, 3, 64, 1, (1, 1), (1, 1), "same"),
    (2, 10, 9, 3, 3, 3, 72, 1, (1, 1), (2, 1), "same"),
    (1, 40, 400, 3, 5, 5, 64, 1, (1, 2), (1, 1), "same"),
    # zero-padded columns with one tile of channels (7x7, 32 -> 32), with padded channels
    # (21 -> 24) and a dilated kernel (rows of segments, not merged kw taps)
    (2, 12, 14, 32, 7, 7, 32, 1, (1, 1), (1, 1), "same"),
    (1, 10, 12, 20, 5, 5, 21, 1, (1, 1), (1, 2), "same"),
    # 8 channels a group on 4 groups a call (fc_pair8x4) and one more group alone; strided
    (2, 9, 11, 40, 3, 3, 40, 5, (1, 1), (1, 1), "same"),
    (1, 10, 13, 64, 3, 3, 64, 8, (2, 2), (1, 1), "same"),
    # grad_kernel in blocks of rows, each with its own sums (kernels of at most 1/8 of x and dy):
    # dense 1x1, 8 channels a group, a 7x7/2 stem (merged kw taps), depthwise 5x5, padded
    # output channels (7 -> 8), dilated
    (2, 12, 40, 16, 1, 1, 16, 1, (1, 1), (1, 1), "valid"),
    (2, 20, 40, 32, 3, 3, 32, 4, (1, 1), (1, 1), "same"),
    (2, 64, 64, 3, 7, 7, 8, 1, (2, 2), (1, 1), "same"),
    (2, 10, 40, 8, 5, 5, 8, 8, (1, 1), (1, 1), "same"),
    (2, 20, 30, 5, 3, 3, 7, 1, (1, 1), (1, 1), "same"),
    (3, 24, 40, 16, 3, 3, 16, 1, (1, 1), (2, 2), "same"),
    # 8 channels a group over several chunks of rows in each row block (fc_pairk adds to the
    # sums of the chunk before)
    (2, 28, 28, 256, 3, 3, 256, 32, (1, 1), (1, 1), "same"),
    # 8 channels a group, a kernel row's 3 taps a task (fc_pairk3): a group pair and a lone
    # group, no padding, stride and dilation along h only, rows narrower than the kernel, and
    # rows wider than the row buffer it had until git 47cbd6e (256 pixels)
    (1, 6, 9, 24, 3, 3, 24, 3, (1, 1), (1, 1), "valid"),
    (2, 9, 10, 16, 3, 3, 16, 2, (2, 1), (2, 1), "same"),
    (2, 4, 2, 16, 3, 3, 16, 2, (1, 1), (1, 1), "same"),
    (1, 3, 261, 16, 3, 3, 16, 2, (1, 1), (1, 1), "same"),
    # 4 channels a group (fc_quad4, fc_quadk3): 4 groups a call and a lone group, strided (the
    # kernel gradient by the general tiles), several chunks of rows, lone groups only with no
    # padding, stride and dilation along h
    (2, 9, 11, 20, 3, 3, 20, 5, (1, 1), (1, 1), "same"),
    (1, 10, 13, 32, 3, 3, 32, 8, (2, 2), (1, 1), "same"),
    (2, 28, 28, 128, 3, 3, 128, 32, (1, 1), (1, 1), "same"),
    (1, 6, 9, 12, 3, 3, 12, 3, (1, 1), (1, 1), "valid"),
    (2, 9, 10, 16, 3, 3, 16, 4, (2, 1), (2, 1), "same"),
    # depthwise 3x3 rows with more channels than one packed kernel chunk (fc_dwpix: 256
    # elements a chunk), a vector tail, stride 1 and 2
    (1, 6, 11, 300, 3, 3, 300, 300, (1, 1), (1, 1), "same"),
    (1, 7, 20, 520, 3, 3, 520, 520, (2, 2), (1, 1), "same"),
    # depthwise 5x5 and 7x7 on short rows: zero-padded columns (_forward), a channel tail
    (2, 7, 7, 40, 5, 5, 40, 40, (1, 1), (1, 1), "same"),
    (1, 9, 9, 24, 7, 7, 24, 24, (1, 1), (1, 1), "same"),
    # depthwise 7x7 (fc_dwt, NT = 7; fc_dwkpix 7x7): rows longer than a tile with border runs,
    # a channel tail; stride 2 and dilation h 2
    (2, 9, 30, 40, 7, 7, 40, 40, (1, 1), (1, 1), "same"),
    (1, 12, 23, 72, 7, 7, 72, 72, (2, 2), (2, 1), "same"),
    # grouped, rows of 12 pixels or more: channels_first through _forward_nchwg (1 to 3 vectors
    # a row chunk, two chunks, kernels 5 and 7 to 8 wide, asymmetric padding; on AVX2 the
    # flat planes' tiles across rows, the last one past the plane's end)
    (2, 7, 13, 32, 3, 3, 32, 4, (1, 1), (1, 1), "same"),
    (1, 5, 50, 32, 3, 3, 64, 2, (1, 1), (1, 1), "valid"),
    (2, 6, 60, 16, 5, 5, 16, 2, (1, 1), (1, 1), "same"),
    (1, 4, 20, 48, 7, 7, 24, 3, (1, 1), (1, 1), "same"),
    (1, 5, 17, 24, 2, 8, 16, 2, (1, 1), (1, 1), "same"),
    (2, 9, 20, 16, 3, 3, 16, 4, (1, 1), (1, 1), "same"),  # 4 outputs a group: 4-channel tiles
    (1, 6, 70, 16, 3, 3, 24, 2, (1, 1), (1, 1), "valid"),  # 12 outputs a group, two chunks
    (2, 8, 14, 4, 3, 3, 16, 4, (1, 1), (1, 1), "same"),  # depth multiplier 4: 1 input a group
    (2, 6, 20, 64, 3, 3, 32, 4, (1, 1), (1, 1), "same"),  # 16 inputs a group
    (1, 5, 14, 64, 3, 3, 64, 2, (1, 1), (1, 1), "same"),  # 32 and 32 (AVX2 flat planes)
    # ... with stride 2 along w (two loads a vector, the even lanes kept): 8- and 4-channel
    # tiles, 1 to 4 vectors, two chunks, odd widths (the last input a row's lanes reach),
    # kernels 5 and 7 wide, "valid", stride 2 along h only with stride 1 along w
    (2, 9, 29, 32, 3, 3, 32, 4, (2, 2), (1, 1), "same"),
    (1, 5, 99, 16, 3, 3, 32, 2, (2, 2), (1, 1), "same"),
    (1, 6, 131, 16, 3, 3, 16, 4, (2, 2), (1, 1), "valid"),
    (2, 8, 40, 16, 5, 5, 16, 2, (2, 2), (1, 1), "same"),
    (1, 9, 33, 24, 7, 7, 24, 3, (1, 2), (1, 1), "same"),
    (1, 7, 24, 32, 3, 3, 32, 4, (2, 1), (1, 1), "same"),
]


def _seed(case):
    # (hash() of a tuple with strings changes from process to process: not reproducible)
    return zlib.crc32(repr(case).encode())


def _check(kernels, case, dtype, data_format="channels_last", rtol=None):
    n, h, w, c, kh, kw, f, groups, strides, dilation, padding = case
    rng = np.random.default_rng(_seed(case))
    x_shape = (n, h, w, c) if data_format == "channels_last" else (n, c, h, w)
    x = rng.standard_normal(x_shape).astype(dtype)
    k = rng.standard_normal((kh, kw, c // groups, f)).astype(dtype)
    spec = ConvSpec.make(strides, padding, data_format, dilation)
    rtol = rtol or (1e-4 if dtype == np.float32 else 1e-10)
    saved = _dispatch.kernels
    _dispatch.kernels = kernels
    try:
        out = host.forward(x, k, spec, dtype)
        bias = rng.standard_normal(f).astype(dtype)
        out_bias = host.forward(x, k, spec, dtype, bias)
        dy = rng.standard_normal(out.shape).astype(dtype)
        dx = host.grad_input(dy, k, spec, x.shape, dtype)
        dk = host.grad_kernel(x, dy, spec, k.shape, dtype)
        dk_fused, db_fused = host.grad_kernel(x, dy, spec, k.shape, dtype, bias=True)
        # both gradients from one call (the torch bridge's), where it serves: the same bits
        both = host.gradients(x, dy, k, spec, True, True, dtype)
        dk_only = host.gradients(x, dy, k, spec, False, False, dtype)
        direct = host.direct_gradients(spec, spec.geometry(x.shape, k.shape), dtype)
    finally:
        _dispatch.kernels = saved
    expected = reference.conv(x, k, strides, padding, dilation, data_format)
    ref_dx, ref_dk = reference.grads(x, k, dy, strides, padding, dilation, data_format)
    assert out.dtype == dtype and dx.dtype == dtype and dk.dtype == dtype
    reference.assert_close(out, expected, rtol, "forward")
    reference.assert_close(out_bias, expected + bias.reshape(spec.bias_shape), rtol, "+ bias")
    reference.assert_close(dx, ref_dx, rtol, "grad_input")
    reference.assert_close(dk, ref_dk, rtol, "grad_kernel")
    # with the bias gradient taken on the way: the same dk, and dy's channel sums
    np.testing.assert_array_equal(dk_fused, dk)
    assert db_fused.dtype == dtype and db_fused.shape == (f,)
    _assert_bias_close(db_fused, dy, spec.reduce_axes, rtol, "grad_kernel's bias gradient")
    assert (both is None) == (dk_only is None)
    if data_format == "channels_last":  # (the blocks decision is the build's: asked above)
        assert (both is None) == (not direct)
    if both is not None:
        for got, want in zip(both, (dx, dk_fused, db_fused)):
            assert got.dtype == dtype
            np.testing.assert_array_equal(got, want)
        assert dk_only[0] is None and dk_only[2] is None
        np.testing.assert_array_equal(dk_only[1], dk)


def _assert_bias_close(db, dy, axes, rtol, name):
    """dy's channel sums, within rtol of the largest channel's sum of |dy|: a channel's sum may
    cancel to far less than its terms, and float32 rounding goes with the terms (found: a sum
    of 0.009 with |terms| ~ 80; one channel whose sum was 5e-5 of its terms)."""
    dy = dy.astype(np.float64)
    terms = np.abs(dy).sum(axis=axes).max(initial=1e-30)
    err = np.abs(db.astype(np.float64) - dy.sum(axis=axes)).max(initial=0) / terms
    assert err <= rtol, f"{name}: max error {err:.3g} of the terms > {rtol:g}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernels_match_reference(variant, dtype, case):
    _check(importlib.import_module(f"fastconv._kernels_{variant}"), case, dtype)


ROW_CASES = [c for c in CASES if c[4:6] == (3, 3) and c[6] == c[7] == c[3]
             and c[9][1] == 1 and c[8][1] <= 2]


def _restore_tunings(kernels):
    """The kernels' tunings that tests force, back to their defaults."""
    kernels.set_band_bytes(kernels.BAND_BYTES)
    kernels.set_block_major_bytes(kernels.BLOCK_MAJOR_BYTES)
    kernels.set_pad_columns_ow(kernels.PAD_COLUMNS_OW)
    kernels.set_quads_outer_ow(kernels.QUADS_OUTER_OW)
    kernels.set_slide_rows(kernels.SLIDE_ROWS)
    kernels.set_chunk_bytes(kernels.CHUNK_BYTES)
    kernels.set_nchwg(kernels.NCHWG)
    kernels.set_nchwk_bytes(kernels.NCHWK_BYTES)
    kernels.set_flat(kernels.FLAT)
    kernels.set_stream_bytes(kernels.STREAM_BYTES)


def _forward_problem(case, dtype, data_format="channels_last"):
    """x, kernel, scale and bias for a forward of `case`, its ConvSpec and geometry."""
    n, h, w, c, kh, kw, f, groups, strides, dilation, padding = case
    rng = np.random.default_rng(_seed(case))
    x_shape = (n, h, w, c) if data_format == "channels_last" else (n, c, h, w)
    x = rng.standard_normal(x_shape).astype(dtype)
    k = rng.standard_normal((kh, kw, c // groups, f)).astype(dtype)
    scale, bias = rng.standard_normal((2, f)).astype(dtype)
    spec = ConvSpec.make(strides, padding, data_format, dilation)
    return x, k, scale, bias, spec, spec.geometry(x.shape, k.shape)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", [("ACT_CLIP", -0.5, 1.5), ("ACT_SWISH", 0, 0)],
                         ids=["clip", "swish"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] > 0][::3], ids=str)
def test_forward_epilogue(variant, dtype, act, case):
    """forward's epilogue, act(conv * scale + bias) (an inference BatchNormalization and an
    activation fused by the TensorFlow bridge), on every kernel path and build."""
    *_, strides, dilation, padding = case
    x, k, scale, bias, spec, g = _forward_problem(case, dtype)
    kernels = importlib.import_module(f"fastconv._kernels_{variant}")
    out = np.full(g.output_shape_nhwc, np.nan, dtype)
    kernels.forward(x, k, out, *host._args(spec, g), bias, scale, getattr(kernels, act[0]),
                    *act[1:])
    u = reference.conv(x, k, strides, padding, dilation) * scale + bias
    expected = np.clip(u, act[1], act[2]) if act[0] == "ACT_CLIP" else u / (1 + np.exp(-u))
    reference.assert_close(out, expected, 1e-4 if dtype == np.float32 else 1e-10, "epilogue")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_channels_first_forward(variant, dtype, case):
    """The forward with an NCHW x, an NCHW result or both: in bands of one output row (each
    band's first input rows kept from the band before), of the default size, of a whole image,
    on zero-padded columns or not, and with column blocks outer (x and the result transposed
    whole); with the bias and an epilogue. The reference's result, on 1 and 2 threads."""
    *_, strides, dilation, padding = case
    x, k, scale, bias, spec, g = _forward_problem(case, dtype, "channels_first")
    kernels = importlib.import_module(f"fastconv._kernels_{variant}")
    u = reference.conv(x, k, strides, padding, dilation, "channels_first").transpose(0, 2, 3, 1)
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    *geometry, _ = host._args(spec, g)
    try:
        for band, pad_ow, major, threads, nchwg in itertools.product(
                (1, kernels.BAND_BYTES, 1 << 30), (0, 1 << 30), (1 << 62, 0), (1, 2),
                (True, False)):
            kernels.set_band_bytes(band)
            kernels.set_pad_columns_ow(pad_ow)
            kernels.set_block_major_bytes(major)
            kernels.set_nchwg(nchwg)
            name = f"bands of {band} bytes, padded columns up to {pad_ow}, block-major from " \
                   f"{major}, {threads} threads, nchwg {nchwg}"
            for nchw in (kernels.NCHW_X, kernels.NCHW_OUT, kernels.NCHW_X | kernels.NCHW_OUT):
                nhwc = not nchw & kernels.NCHW_OUT
                xx = x if nchw & kernels.NCHW_X else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
                for extra, expected in (((bias,), u + bias),
                                        ((bias, scale, kernels.ACT_CLIP, -0.5, 1.5),
                                         np.clip(u * scale + bias, -0.5, 1.5))):
                    shape = g.output_shape_nhwc
                    out = np.full(shape if nhwc else spec.from_nhwc(shape), np.nan, dtype)
                    kernels.forward(xx, k, out, *geometry, threads, *extra, nchw=nchw)
                    reference.assert_close(out if nhwc else out.transpose(0, 2, 3, 1), expected,
                                           rtol, f"{name}, nchw {nchw}, {len(extra)} extras")
    finally:
        _restore_tunings(kernels)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_channels_first_grad_input(variant, dtype, case):
    """grad_input into an NCHW dx, from an NHWC or NCHW dy, or from an NCHW dy into an NHWC
    dx: in bands of one row (a band's dy rows with it), of the default size and of a whole
    image, with column blocks outer (dx transposed whole), on dy's zero-padded columns or not
    (an NCHW dy transposed whole first), as a GEMM where the kernels pick it; the reference's
    dx, on 1 and 2 threads."""
    *_, strides, dilation, padding = case
    x, k, _, _, spec, g = _forward_problem(case, dtype, "channels_first")
    dy = np.random.default_rng(_seed(case) + 1).standard_normal(
        g.output_shape_nhwc).astype(dtype)
    dy_nchw = np.ascontiguousarray(dy.transpose(0, 3, 1, 2))
    expected, _ = reference.grads(x, k, dy_nchw, strides, padding, dilation, "channels_first")
    kernels = importlib.import_module(f"fastconv._kernels_{variant}")
    wt = host.regrouped_kernel(k, g, np.reshape, np.transpose)
    *geometry, _ = host._args(spec, g)
    try:
        for band, major, pad_ow, threads, nchwg in itertools.product(
                (1, kernels.BAND_BYTES, 1 << 30), (1 << 62, 0), (0, 1 << 30), (1, 2),
                (True, False)):
            kernels.set_band_bytes(band)
            kernels.set_block_major_bytes(major)
            kernels.set_pad_columns_ow(pad_ow)
            kernels.set_nchwg(nchwg)
            for nchw in (True, kernels.NCHW_OUT, kernels.NCHW_X | kernels.NCHW_OUT):
                nchw_dx = nchw is True or nchw & kernels.NCHW_X
                dx = np.full(x.shape if nchw_dx else g.input_shape_nhwc, np.nan, dtype)
                kernels.grad_input(dy if nchw is True else dy_nchw, np.ascontiguousarray(wt),
                                   dx, *geometry, threads, nchw=nchw)
                reference.assert_close(dx if nchw_dx else dx.transpose(0, 3, 1, 2), expected,
                                       1e-4 if dtype == np.float32 else 1e-10,
                                       f"nchw {nchw}, bands of {band} bytes, block-major from "
                                       f"{major}, padded columns up to {pad_ow}, "
                                       f"{threads} threads, nchwg {nchwg}")
    finally:
        _restore_tunings(kernels)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES + [
    (4, 28, 28, 64, 3, 3, 64, 8, (1, 1), (1, 1), "same"),     # row blocks, bands of 4 rows
    (3, 30, 31, 32, 3, 3, 64, 4, (2, 2), (1, 2), "same"),     # across images, stride 2
    (2, 20, 24, 64, 1, 1, 128, 1, (1, 1), (1, 1), "valid"),   # dense 1x1 in bands
    (1, 41, 12, 32, 3, 3, 32, 4, (1, 1), (3, 1), "valid"),    # dilated rows, one image
    (3, 17, 19, 64, 3, 3, 64, 64, (2, 2), (1, 1), "same"),    # depthwise parts across images
    (2, 15, 23, 32, 5, 5, 32, 32, (1, 1), (1, 2), "same"),    # depthwise 5x5, dilated along w
    (2, 12, 18, 48, 7, 7, 48, 48, (1, 1), (1, 1), "valid"),   # depthwise 7x7
    # grouped, NCHW read as it is (fc_nchwk): rows of 5 vectors in passes of a few rows,
    # dilated along w, 8 inputs and 4 outputs a group, 4 and 8, a 7-wide kernel (3 + 3 + 1)
    (1, 30, 70, 32, 3, 3, 32, 4, (1, 1), (1, 1), "same"),
    (2, 9, 30, 32, 3, 3, 32, 4, (1, 1), (1, 2), "same"),
    (2, 11, 19, 32, 3, 3, 16, 4, (2, 1), (1, 1), "valid"),
    (1, 10, 25, 16, 3, 7, 32, 4, (1, 1), (1, 1), "same"),
], ids=str)
def test_channels_first_grad_kernel(variant, dtype, case):
    """grad_kernel (and the bias gradient) from an NCHW x, an NCHW dy or both: both in bands of
    rows transposed in each thread's scratch where blocks of rows with their own sums serve
    (kernels.grad_kernel_nchw), else transposed whole first; grouped, both read as they are
    (fc_nchwk: AVX-512; AVX2 on flat planes, fc_flatk_task, with unit strides or strides of 2)
    in passes of the default size or of one row (one vector flat), or not; the reference's, on
    1 to 3 threads."""
    *_, strides, dilation, padding = case
    x, k, _, _, spec, g = _forward_problem(case, dtype, "channels_first")
    dy = np.random.default_rng(_seed(case) + 1).standard_normal(
        spec.from_nhwc(g.output_shape_nhwc)).astype(dtype)
    _, expected = reference.grads(x, k, dy, strides, padding, dilation, "channels_first")
    kernels = importlib.import_module(f"fastconv._kernels_{variant}")
    *geometry, _ = host._args(spec, g)
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    dy_nhwc = np.ascontiguousarray(dy.transpose(0, 2, 3, 1))
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    try:
        for threads, (nchwg, rows, flat) in itertools.product(
                (1, 2, 3), ((True, kernels.NCHWK_BYTES, True), (True, 1, True),
                            (True, kernels.NCHWK_BYTES, False),
                            (False, kernels.NCHWK_BYTES, True))):
            kernels.set_nchwg(nchwg)
            kernels.set_nchwk_bytes(rows)
            kernels.set_flat(flat)
            for nchw in (kernels.NCHW_X, kernels.NCHW_OUT, kernels.NCHW_X | kernels.NCHW_OUT):
                dk, db = np.full(k.shape, np.nan, dtype), np.full(g.f, np.nan, dtype)
                kernels.grad_kernel(x if nchw & kernels.NCHW_X else x_nhwc,
                                    dy if nchw & kernels.NCHW_OUT else dy_nhwc, dk, *geometry,
                                    threads, db, nchw=nchw)
                name = f"nchw {nchw}, {threads} threads, nchwg {nchwg} ({rows} bytes, flat " \
                       f"{flat})"
                reference.assert_close(dk, expected, rtol, name)
                _assert_bias_close(db, dy, (0, 2, 3), rtol, name)
    finally:
        _restore_tunings(kernels)


def test_channels_first_grad_kernel_in_bands_where_row_blocks_serve():
    # (geometries of the test above: row blocks; depthwise on whole channel vectors; depthwise
    # with a channel tail, transposed whole)
    kernels = _dispatch.kernels
    assert kernels.grad_kernel_nchw(4, 28, 28, 64, 28, 28, 64, 3, 3, 8, 1, 1, 1, 8, 4)
    assert kernels.grad_kernel_nchw(4, 28, 28, 256, 28, 28, 256, 3, 3, 8, 1, 1, 1, 32, 4)
    assert kernels.grad_kernel_nchw(2, 13, 21, 128, 13, 21, 128, 3, 3, 1, 1, 1, 1, 128, 4)
    assert not kernels.grad_kernel_nchw(3, 10, 11, 8, 10, 11, 8, 3, 3, 1, 1, 1, 1, 8, 4)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", [c for c in CASES if c[7] == 1 and c[9][1] == 1 and c[0] > 0],
                         ids=str)
def test_forward_column_blocks_outer(variant, dtype, case):
    """Dense forward with column blocks outer (what large weights get, here forced on every
    size), row by row or an image at a time in reduction chunks (whole windows; chunks of the
    default size and of 16 rows), and on zero-padded input columns (what short rows get, here
    forced on and off): the reference's result; row by row, the same as rows outer on the input
    as it is. With the bias and an epilogue, which column blocks outer add in a pass of their
    own."""
    *_, strides, dilation, padding = case
    x, k, scale, bias, spec, g = _forward_problem(case, dtype)
    kernels = importlib.import_module(f"fastconv._kernels_{variant}")
    u = reference.conv(x, k, strides, padding, dilation)
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    first = None
    try:
        for pad_ow, major, chunk in itertools.product(
                (0, 1 << 30), (1 << 62, 0), (0, kernels.CHUNK_BYTES, 1)):
            kernels.set_pad_columns_ow(pad_ow)
            kernels.set_block_major_bytes(major)
            kernels.set_chunk_bytes(chunk)
            outs = []
            for extra in ((bias,), (bias, scale, kernels.ACT_CLIP, -0.5, 1.5)):
                out = np.full(g.output_shape_nhwc, np.nan, dtype)
                kernels.forward(x, k, out, *host._args(spec, g), *extra)
                outs.append(out)
            name = f"padded columns up to {pad_ow}, block-major from {major}, chunk {chunk}"
            reference.assert_close(outs[0], u + bias, rtol, f"{name}, bias")
            reference.assert_close(outs[1], np.clip(u * scale + bias, -0.5, 1.5), rtol,
                                   f"{name}, epilogue")
            first = first or outs
            if chunk == 0:
                np.testing.assert_array_equal(outs[0], first[0])
                np.testing.assert_array_equal(outs[1], first[1])
    finally:
        _restore_tunings(kernels)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", [c for c in CASES if c[7] == 1 and c[0] > 0], ids=str)
def test_grad_input_column_blocks_outer(variant, dtype, case):
    """Dense grad_input with column blocks outer (large weights; here forced on every size),
    row by row or an image at a time in reduction chunks (unit strides, whole windows; chunks
    of the default size and of 16 channels), and on zero-padded dy columns (short rows; forced
    on and off): the reference's result; row by row, the same as rows outer on dy as it is."""
    n, h, w, c, kh, kw, f, groups, strides, dilation, padding = case
    rng = np.random.default_rng(_seed(case))
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    k = rng.standard_normal((kh, kw, c, f)).astype(dtype)
    spec = ConvSpec.make(strides, padding, "channels_last", dilation)
    dy = rng.standard_normal(spec.geometry(x.shape, k.shape).output_shape_nhwc).astype(dtype)
    ref_dx, _ = reference.grads(x, k, dy, strides, padding, dilation)
    kernels = importlib.import_module(f"fastconv._kernels_{variant}")
    saved = _dispatch.kernels
    _dispatch.kernels = kernels
    first = None
    try:
        for pad_ow, major, chunk in itertools.product(
                (0, 1 << 30), (1 << 62, 0), (0, kernels.CHUNK_BYTES, 1)):
            kernels.set_pad_columns_ow(pad_ow)
            kernels.set_block_major_bytes(major)
            kernels.set_chunk_bytes(chunk)
            dx = host.grad_input(dy, k, spec, x.shape, dtype)
            reference.assert_close(dx, ref_dx, 1e-4 if dtype == np.float32 else 1e-10,
                                   f"padded up to {pad_ow}, block-major from {major}, "
                                   f"chunk {chunk}")
            first = dx if first is None else first
            if chunk == 0:
                np.testing.assert_array_equal(dx, first)
    finally:
        _restore_tunings(kernels)
        _dispatch.kernels = saved


def test_swish_epilogue_extremes():
    """The float32 swish's exp over its whole range: tiny, huge, infinite and NaN inputs."""
    u = np.array([-1e30, -200, -88.8, -88.6, -88, -87.5, -20, -1e-30, 0, 1e-30, 3, 20, 88, 89,
                  1e30, np.inf, np.nan], np.float32)
    x = u.reshape(1, 1, -1, 1)
    out = np.empty_like(x)
    _dispatch.kernels.forward(x, np.ones((1, 1, 1, 1), np.float32), out, 1, 1, 1, 1, 0, 0, 1, 1,
                              None, None, _dispatch.kernels.ACT_SWISH)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = u.astype(np.float64) / (1 + np.exp(-u.astype(np.float64)))
    got = out.ravel()
    finite = np.isfinite(expected)
    # (below u = -88.72 the kernel gives -0 where the exact value is below 1e-36)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=2e-6, atol=1e-36)
    assert np.isnan(got[-1]) and got[-2] == np.inf


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ROW_CASES + [
    (2, 9, 23, 64, 3, 3, 64, 64, (1, 1), (1, 1), "same"),
    (2, 9, 23, 64, 3, 3, 64, 64, (2, 2), (1, 1), "same"),
    (1, 6, 40, 272, 3, 3, 272, 272, (1, 1), (1, 1), "valid"),  # two packed kernel chunks
], ids=str)
def test_depthwise_rows_streaming_stores(variant, dtype, case):
    # outputs of fc_stream_bytes and more are stored past the caches (set_stream_bytes(0):
    # every output): the reference's values, the same bits as plain stores
    kernels = importlib.import_module(f"fastconv._kernels_{variant}")
    x, k, _, bias, spec, g = _forward_problem(case, dtype)
    dy = np.random.default_rng(1).standard_normal(g.output_shape_nhwc).astype(dtype)
    saved = _dispatch.kernels
    _dispatch.kernels = kernels
    try:
        results = []
        for threshold in (1 << 62, 0):
            kernels.set_stream_bytes(threshold)
            got = []
            for threads in (1, 2):
                fastconv.set_num_threads(threads)
                got += [host.forward(x, k, spec, dtype, bias),
                        host.grad_input(dy, k, spec, x.shape, dtype)]
            results.append(got)
            _check(kernels, case, dtype)
    finally:
        _dispatch.kernels = saved
        fastconv.set_num_threads(None)
        kernels.set_stream_bytes(kernels.STREAM_BYTES)
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    *_, strides, dilation, padding = case
    reference.assert_close(results[1][0], reference.conv(x, k, strides, padding, dilation) + bias,
                           rtol, "forward")
    for plain, streamed in zip(*results):
        np.testing.assert_array_equal(plain, streamed)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pixels", [1, 5, 8, 64])
@pytest.mark.parametrize("case", ROW_CASES, ids=str)
def test_depthwise_row_blocks(variant, pixels, case):
    # the depthwise 3x3 row kernel cuts rows into blocks of `pixels` (tuned per CPU vendor)
    kernels = importlib.import_module(f"fastconv._kernels_{variant}")
    kernels.set_dwrow_pixels(pixels)
    try:
        _check(kernels, case, np.float32)
    finally:
        _dispatch._tune(kernels)


def test_depthwise_row_blocks_rejects_zero():
    with pytest.raises(ValueError, match="n=0"):
        _dispatch.kernels.set_dwrow_pixels(0)


def _at_offset(a, offset):
    """A copy of a whose data starts `offset` bytes past a 64-byte boundary (numpy's arrays
    start 16, 32 or 48 bytes past one)."""
    buf = np.empty(a.nbytes + 128, np.uint8)
    start = -buf.__array_interface__["data"][0] % 64 + offset
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [8, 16, 32, 48, 56])
@pytest.mark.parametrize("case", [
    (2, 6, 17, 64, 3, 3, 64, 64, (1, 1), (1, 1), "same"),
    (1, 5, 16, 32, 3, 3, 32, 32, (1, 1), (1, 1), "valid"),
    (1, 4, 25, 272, 3, 3, 272, 272, (1, 1), (1, 1), "same"),  # two packed kernel chunks
    (1, 4, 9, 16, 3, 3, 16, 16, (1, 1), (1, 1), "same"),  # too short a row to shift
], ids=str)
def test_depthwise_rows_on_unaligned_inputs(variant, dtype, offset, case):
    # stride 1 on rows off a vector boundary: tiles over rows shifted onto x's (dy's) lines,
    # the kernel rotated, the first and last pixels by the plain path; the same sums. The
    # forward's result starts as far off its lines as x (its shifted stores aligned) where the
    # build shifts rows (vectors of 32 or 64 bytes, x off them), with plain stores and
    # streamed ones (set_stream_bytes(0): every result)
    n, h, w, c, kh, kw, f, groups, strides, dilation, padding = case
    vector = {"baseline": 0, "avx2": 32, "avx512": 64}[variant]
    result_offset = offset if vector and offset % vector else 0
    rng = np.random.default_rng(_seed(case))
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    k = rng.standard_normal((3, 3, 1, c)).astype(dtype)
    bias = rng.standard_normal(c).astype(dtype)
    spec = ConvSpec.make(strides, padding, "channels_last", dilation)
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    saved = _dispatch.kernels
    kernels = _dispatch.kernels = importlib.import_module(f"fastconv._kernels_{variant}")
    try:
        for threshold in (1 << 62, 0):
            kernels.set_stream_bytes(threshold)
            for threads in (1, 2):
                fastconv.set_num_threads(threads)
                out = host.forward(_at_offset(x, offset), k, spec, dtype, bias)
                assert _memory.address(out) % 64 == result_offset
                reference.assert_close(out, reference.conv(x, k, padding=padding) + bias, rtol,
                                       "forward")
                aligned = host.forward(_at_offset(x, 0), k, spec, dtype, bias)
                assert _memory.address(aligned) % 64 == 0
                np.testing.assert_array_equal(out, aligned)
                dy = rng.standard_normal(out.shape).astype(dtype)
                dx = host.grad_input(_at_offset(dy, offset), k, spec, x.shape, dtype)
                reference.assert_close(dx, reference.grads(x, k, dy, padding=padding)[0], rtol,
                                       "grad_input")
    finally:
        _dispatch.kernels = saved
        fastconv.set_num_threads(None)
        kernels.set_stream_bytes(kernels.STREAM_BYTES)


@pytest.mark.parametrize("case", CASES[:8], ids=str)
def test_channels_first(case):
    _check(_dispatch.kernels, case, np.float32, "channels_first")


@st.composite
def configs(draw):
    groups = draw(st.integers(1, 4))
    cin_g = draw(st.integers(1, 4))
    fg = draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    strides = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = draw(st.sampled_from(["valid", "same"]))
    min_h = (kh - 1) * dilation[0] + 1 if padding == "valid" else 1
    min_w = (kw - 1) * dilation[1] + 1 if padding == "valid" else 1
    h = draw(st.integers(min_h, min_h + 8))
    w = draw(st.integers(min_w, min_w + 8))
    n = draw(st.integers(0, 3))
    return (n, h, w, groups * cin_g, kh, kw, groups * fg, groups, strides, dilation, padding)


@settings(max_examples=150, deadline=None)
@given(case=configs(), variant=st.sampled_from(VARIANTS),
       data_format=st.sampled_from(["channels_last", "channels_first"]))
def test_random_configurations(case, variant, data_format):
    _check(importlib.import_module(f"fastconv._kernels_{variant}"), case, np.float64, data_format)


@st.composite
def wide_configs(draw):
    """Channel counts around the vector widths (8, 16, 64) so tiles and their tails all run."""
    groups = draw(st.sampled_from([1, 1, 2, 4, 8]))
    cin_g = draw(st.sampled_from([1, 3, 7, 8, 9, 16, 17, 24]))
    fg = draw(st.sampled_from([1, 2, 5, 8, 15, 16, 33, 64, 70]))
    k = draw(st.integers(1, 4))
    strides = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    h = draw(st.integers((k - 1) * dilation[0] + 1, 14))
    w = draw(st.integers((k - 1) * dilation[1] + 1, 20))
    padding = draw(st.sampled_from(["valid", "same"]))
    return (draw(st.integers(1, 2)), h, w, groups * cin_g, k, k, groups * fg, groups, strides,
            dilation, padding)


@settings(max_examples=60, deadline=None)
@given(case=wide_configs(), variant=st.sampled_from(VARIANTS),
       dtype=st.sampled_from([np.float32, np.float64]),
       data_format=st.sampled_from(["channels_last", "channels_first"]))
def test_random_wide_configurations(case, variant, dtype, data_format):
    _check(importlib.import_module(f"fastconv._kernels_{variant}"), case, dtype, data_format)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", [c for c in CASES if c[3] <= 4 and c[8][0] >= 2], ids=str)
def test_gradients_on_blocks(case, data_format, monkeypatch):
    # few input channels and stride >= 2: both gradients go through space_to_depth blocks,
    # unless grouped, dilated, strided unequally, or the kernel is smaller than the stride;
    # grad_input not where the kernels run it as a GEMM and col2im on the input as it is, nor
    # grad_kernel where they tile a kernel row's (kw, c) pairs
    calls = []
    for name in ("space_to_depth", "depth_to_space"):
        original = getattr(_dispatch.kernels, name)
        monkeypatch.setattr(_dispatch.kernels, name,
                            lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    _check(_dispatch.kernels, case, np.float32, data_format)
    n, h, w, c, kh, kw, f, groups, strides, dilation, padding = case
    blocked = (groups == 1 and dilation == (1, 1) and strides[0] == strides[1]
               and min(kh, kw) >= strides[0])
    gemm = _dispatch.kernels.grad_input_gemm(c, kh, kw, f, dilation[1], groups, 4)
    merged = _dispatch.kernels.grad_kernel_merged(c, kh, kw, f, dilation[1], groups, 4)
    # (_check takes grad_kernel twice: without and with the bias gradient)
    expected = (["depth_to_space"] * (not gemm) + ["space_to_depth"] * 2 * (not merged)
                if blocked else [])
    assert sorted(calls) == expected


# (CASES[3] and [30]: depthwise 3x3, whose kernel gradient sums blocks of rows separately (the
# pixel-major channels) and in tasks over channels (a tail of 5 channels in [30]))
# (CASES[20] and [49]: grad_input as a GEMM and col2im, each thread adding into its own rows)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[11], CASES[18], CASES[19], CASES[20],
                                  CASES[30], CASES[49]], ids=str)
def test_bit_identical_for_any_thread_count(case, monkeypatch):
    monkeypatch.setattr(host, "_MACS_PER_THREAD", 1)  # small cases must still use every thread
    n, h, w, c, kh, kw, f, groups, strides, dilation, padding = case
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n + 3, h + 9, w + 7, c)).astype(np.float32)
    k = rng.standard_normal((kh, kw, c // groups, f)).astype(np.float32)
    spec = ConvSpec.make(strides, padding, "channels_last", dilation)
    results = []
    for threads in (1, 2, 3):
        _dispatch.set_num_threads(threads)
        try:
            out = host.forward(x, k, spec)
            dy = np.cos(out)
            results.append((out, host.grad_input(dy, k, spec, x.shape),
                            host.grad_kernel(x, dy, spec, k.shape)))
        finally:
            _dispatch.set_num_threads(None)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)


def test_kernels_get_cache_line_aligned_weights():
    """The host hands the kernels weights that start on a 64-byte boundary (numpy promises 16:
    a vector across two cache lines costs two loads): a copy, cast to the compute dtype, where
    the array is not; an aligned C-contiguous array of that dtype as it is."""
    base = np.empty(3 * 3 * 4 * 8 + 32, np.float32)
    start = (-base.ctypes.data % 64) // 4 + 4  # 16 bytes past a cache line
    k = base[start:start + 288].reshape(3, 3, 4, 8)
    k[...] = np.arange(288, dtype=np.float32).reshape(k.shape)
    assert k.ctypes.data % 64 == 16
    a = host._aligned_kernel(k, np.float32)
    assert a.ctypes.data % 64 == 0 and a is not k and np.array_equal(a, k)
    assert host._aligned_kernel(a, np.float32) is a
    for odd in (k.astype(np.float16), k[:, :, ::-1], k.astype(np.float64)):
        b = host._aligned_kernel(odd, np.float32)
        assert b.dtype == np.float32 and b.flags.c_contiguous and b.ctypes.data % 64 == 0
        np.testing.assert_array_equal(b, odd.astype(np.float32))
    spec = ConvSpec.make((1, 1), "same", "channels_last", (1, 1))
    x = np.random.default_rng(3).standard_normal((2, 6, 5, 8)).astype(np.float32)
    reference.assert_close(host.forward(x, np.repeat(k, 2, axis=2)[:, :, :8, :], spec),
                           reference.conv(x, np.repeat(k, 2, axis=2)[:, :, :8, :], (1, 1),
                                          "same", (1, 1), "channels_last"), 1e-4, "forward")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape, groups, strides", [
    ((2, 9, 11, 32), 4, (1, 1)), ((1, 7, 40, 64), 8, (1, 1)), ((2, 6, 37, 48), 6, (1, 2)),
    ((1, 5, 9, 40), 5, (2, 1))])
def test_forward_group_quads_outer(variant, shape, groups, strides):
    """8 channels a group (fc_pair8x4): group quads outer along a row or tiles outer, the same
    sums bit for bit, and the reference's."""
    kernels = importlib.import_module(f"fastconv._kernels_{variant}")
    rng = np.random.default_rng(shape[2] * groups)
    x = rng.standard_normal(shape).astype(np.float32)
    k = rng.standard_normal((3, 3, 8, 8 * groups)).astype(np.float32)
    spec = ConvSpec.make(strides, "same", "channels_last", (1, 1))
    saved = _dispatch.kernels
    _dispatch.kernels = kernels
    try:
        outs = []
        for ow in (0, 1 << 20):
            kernels.set_quads_outer_ow(ow)
            outs.append(host.forward(x, k, spec))
    finally:
        _restore_tunings(kernels)
        _dispatch.kernels = saved
    np.testing.assert_array_equal(outs[0], outs[1])
    reference.assert_close(outs[0], reference.conv(x, k, strides, "same", (1, 1),
                                                   "channels_last"), 1e-4, "forward")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cin_g, cout_g, groups, padding, dilation, width", [
    (16, 16, 3, "same", (1, 1), 23), (5, 16, 2, "valid", (2, 1), 23),
    (16, 8, 4, "same", (1, 1), 23), (3, 8, 2, "valid", (1, 1), 23),
    (16, 4, 3, "same", (3, 1), 23), (7, 4, 5, "same", (1, 1), 23),
    (9, 2, 3, "same", (1, 1), 23), (8, 5, 3, "same", (1, 1), 23),
    (4, 3, 4, "same", (2, 1), 23), (2, 6, 3, "valid", (1, 1), 23),
    (8, 8, 4, "same", (1, 1), 23), (8, 8, 6, "same", (2, 1), 23),
    (8, 8, 5, "valid", (1, 1), 23), (8, 8, 7, "same", (1, 1), 40),
    (8, 8, 4, "same", (3, 1), 40), (4, 4, 4, "same", (1, 1), 23),
    (4, 4, 6, "same", (2, 1), 23), (4, 4, 9, "valid", (1, 1), 40),
    (32, 32, 2, "same", (1, 1), 23), (12, 32, 3, "valid", (2, 1), 23)])
def test_sliding_rows(variant, dtype, cin_g, cout_g, groups, padding, dilation, width):
    """Grouped rows with one vector of outputs a group (16, 8, 4 or 2 of them, as the build's and
    dtype's vectors hold: the forward's output channels, grad_input's input channels), and
    those of 8 inputs and 8 outputs a group on the packed kernel (fc_pslide8, 2 groups a call:
    group quads outer on rows of at most 32 pixels, tiles outer on wider ones; odd groups left
    over) and of 4 and 4 (fc_qslide4, 4 groups a call, the rest one at a time), slide along the
    row where they have 3 taps at unit stride, and so do grad_kernel's tasks of one or two
    vectors of outputs a group (fc_slidek3, a kernel row's 3 taps a task): the reference's sums,
    and those of the general tiles."""
    kernels = importlib.import_module(f"fastconv._kernels_{variant}")
    rng = np.random.default_rng(cin_g * 100 + cout_g * 10 + groups)
    x = rng.standard_normal((2, 7, width, cin_g * groups)).astype(dtype)
    k = rng.standard_normal((3, 3, cin_g, cout_g * groups)).astype(dtype)
    spec = ConvSpec.make((1, 1), padding, "channels_last", dilation)
    expected = reference.conv(x, k, (1, 1), padding, dilation, "channels_last")
    dy = rng.standard_normal(expected.shape).astype(dtype)
    dx_expected, dk_expected = reference.grads(x, k, dy, (1, 1), padding, dilation,
                                               "channels_last")
    saved = _dispatch.kernels
    _dispatch.kernels = kernels
    try:
        outs, dxs, dks = [], [], []
        for on in (True, False):
            kernels.set_slide_rows(on)
            outs.append(host.forward(x, k, spec, dtype))
            dxs.append(host.grad_input(dy, k, spec, x.shape, dtype))
            dks.append(host.grad_kernel(x, dy, spec, k.shape, dtype, bias=True))
    finally:
        _restore_tunings(kernels)
        _dispatch.kernels = saved
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    for out, dx, (dk, db) in zip(outs, dxs, dks):
        reference.assert_close(out, expected, rtol, "forward")
        reference.assert_close(dx, dx_expected, rtol, "grad_input")
        reference.assert_close(dk, dk_expected, rtol, "grad_kernel")
        reference.assert_close(db, dy.astype(np.float64).sum((0, 1, 2)), rtol, "grad_bias")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kh, kw, cin_g, f, groups", [
    (3, 3, 32, 256, 8), (3, 3, 8, 256, 32), (3, 3, 4, 128, 32), (1, 1, 3, 35, 7),
    (5, 4, 17, 54, 3), (3, 3, 1, 12, 4), (2, 2, 40, 40, 1), (3, 3, 33, 66, 2)])
def test_grad_input_kernel_regrouped_by_the_kernels(variant, dtype, kh, kw, cin_g, f, groups):
    """grad_input's kernel, regrouped by the kernels' tiled transposes (regroup; the TensorFlow
    op calls the same), is regrouped_kernel's numpy transposition, aligned, in dtype."""
    spec = ConvSpec.make((1, 1), "same", "channels_last", (1, 1))
    g = spec.geometry((1, 6, 6, cin_g * groups), (kh, kw, cin_g, f))
    k = np.random.default_rng(kh * f + groups).standard_normal((kh, kw, cin_g, f))
    saved = _dispatch.kernels
    _dispatch.kernels = importlib.import_module(f"fastconv._kernels_{variant}")
    try:
        wt = host._input_kernel(k.astype(np.float32), g, dtype)
    finally:
        _dispatch.kernels = saved
    expected = host.regrouped_kernel(k.astype(np.float32), g, np.reshape, np.transpose)
    assert wt.dtype == dtype and wt.flags.c_contiguous and wt.ctypes.data % 64 == 0
    np.testing.assert_array_equal(wt, expected.astype(dtype))


@pytest.mark.skipif(not _dispatch.kernels.POOL, reason="fastconv's own threads: Linux, GNU C")
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[11], CASES[18], CASES[20],
                                  CASES[30]], ids=str)
def test_loops_finish_when_workers_come_late(case, data_format, monkeypatch):
    """A worker of fastconv's own that comes late to a loop (its CPU busy with another
    library's thread) finds its share done by the caller: the same results, bit for bit, and
    every loop of each call (packing, padding, rows, blocks of sums, transposes) goes through
    that path."""
    monkeypatch.setattr(host, "_MACS_PER_THREAD", 1)
    monkeypatch.setattr(host, "_ELEMENTS_PER_THREAD", 1)
    n, h, w, c, kh, kw, f, groups, strides, dilation, padding = case
    rng = np.random.default_rng(2)
    x_shape = (n + 3, h + 9, w + 7, c)
    x = rng.standard_normal(x_shape).astype(np.float32)
    if data_format == "channels_first":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    k = rng.standard_normal((kh, kw, c // groups, f)).astype(np.float32)
    spec = ConvSpec.make(strides, padding, data_format, dilation)
    results = []
    _dispatch.set_num_threads(2)
    try:
        for late in (0, 0.003):
            old = _dispatch.kernels.set_pool(True, 2e-4, late)
            try:
                out = host.forward(x, k, spec)
                dy = np.cos(out)
                results.append((out, host.grad_input(dy, k, spec, x.shape),
                                *host.grad_kernel(x, dy, spec, k.shape, bias=True)))
            finally:
                _dispatch.kernels.set_pool(*old)
    finally:
        _dispatch.set_num_threads(None)
    for a, b in zip(*results):
        assert np.array_equal(a, b)
    reference.assert_close(results[1][0], reference.conv(x, k, strides, padding, dilation,
                                                         data_format), 1e-4, "forward")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kernel", [(1, 1), (1, 3)])
def test_grad_kernel_row_blocks_split_over_more_threads(variant, kernel, monkeypatch):
    # two output rows: two blocks of rows with their own sums, and with 3 or 4 threads each
    # block's tasks split over two threads; bit-identical whatever the thread count
    monkeypatch.setattr(host, "_MACS_PER_THREAD", 1)
    monkeypatch.setattr(_dispatch, "kernels",
                        importlib.import_module(f"fastconv._kernels_{variant}"))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 2, 300, 16)).astype(np.float32)
    k_shape = (*kernel, 16, 24)
    spec = ConvSpec.make(1, "same", "channels_last", 1)
    dy = rng.standard_normal((1, 2, 300, 24)).astype(np.float32)
    results = []
    for threads in (1, 2, 3, 4):
        _dispatch.set_num_threads(threads)
        try:
            results.append(host.grad_kernel(x, dy, spec, k_shape, np.float32, bias=True))
        finally:
            _dispatch.set_num_threads(None)
    _, ref_dk = reference.grads(x, np.zeros(k_shape, np.float32), dy, (1, 1), "same", (1, 1),
                                "channels_last")
    reference.assert_close(results[0][0], ref_dk, 1e-4, "grad_kernel")
    for dk, db in results[1:]:
        assert np.array_equal(dk, results[0][0]) and np.array_equal(db, results[0][1])


def test_nan_and_inf_reach_exactly_the_outputs_whose_window_covers_them():
    x = np.ones((1, 9, 9, 2), np.float32)
    x[0, 4, 4, 0] = np.nan
    x[0, 0, 8, 1] = np.inf
    k = np.ones((3, 3, 2, 3), np.float32)
    spec = ConvSpec.make(1, "same", "channels_last", 1)
    out = host.forward(x, k, spec)
    expected = reference.conv(x, k, padding="same")
    assert np.array_equal(np.isnan(out), np.isnan(expected))
    assert np.array_equal(np.isinf(out), np.isinf(expected))
    assert np.isnan(out[0, 3:6, 3:6]).all() and np.isnan(out).sum() == 27
    assert np.isinf(out[0, 0:2, 7:9]).all() and np.isinf(out).sum() == 12


def test_gradients_reject_an_output_gradient_of_another_shape():
    """host.gradients (the torch bridge's one call for both gradients) checks dy as
    grad_input and grad_kernel do, from its kept recipe too."""
    spec = ConvSpec.make((1, 1), "same", "channels_last", (1, 1))
    x = np.ones((2, 6, 6, 8), np.float32)
    k = np.ones((3, 3, 8, 4), np.float32)
    dx, dk, db = host.gradients(x, np.ones((2, 6, 6, 4), np.float32), k, spec, True, True)
    assert dx.shape == x.shape and dk.shape == k.shape and db.shape == (4,)
    for shape in [(2, 6, 6, 5), (2, 5, 6, 4), (1, 6, 6, 4)]:
        with pytest.raises(ValueError, match=r"output's shape \(2, 6, 6, 4\)"):
            host.gradients(x, np.ones(shape, np.float32), k, spec, True, True)


def test_odd_arrays_give_the_right_answer():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((2, 12, 10, 8))
    k = rng.standard_normal((3, 3, 4, 6))
    spec = ConvSpec.make(1, "same", "channels_last", 1)
    expected = reference.conv(base, k, padding="same")
    readonly = base.astype(np.float32)
    readonly.flags.writeable = False
    strided = np.asarray(np.repeat(base, 2, axis=2)[:, :, ::2, :], np.float32)
    fortran = np.asfortranarray(base.astype(np.float32))
    for x in (readonly, strided, fortran, base, base.astype(np.float16)):
        reference.assert_close(host.forward(x, k, spec), expected, 1e-3 if x.dtype == np.float16
                               else 1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 33, 4, 17), (3, 64, 8, 8), (2, 40, 6, 4),
                                   (1, 19, 7, 9), (2, 45, 5, 9), (0, 4, 2, 2),
                                   (1, 20, 5, 6)])  # partial 16 x 16 blocks 4 x 16, 16 x 14, 4 x 14
@pytest.mark.parametrize("threads", [1, 2])
def test_layout_transposes(variant, dtype, shape, threads, monkeypatch):
    # channels_first inputs go NCHW -> NHWC, and results NHWC -> NCHW for TF and JAX
    monkeypatch.setattr(_dispatch, "kernels", _dispatch.load(variant))
    fastconv.set_num_threads(threads)
    monkeypatch.setattr(host, "_ELEMENTS_PER_THREAD", 1)
    try:
        a = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        spec = ConvSpec.make(1, "valid", "channels_first", 1)
        nhwc = host._nhwc(a, spec, dtype)
        np.testing.assert_array_equal(nhwc, a.transpose(0, 2, 3, 1))
        back = host.contiguous(host._from_nhwc(nhwc, spec))
        assert back.flags.c_contiguous
        np.testing.assert_array_equal(back, a)
    finally:
        fastconv.set_num_threads(None)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (63, 5), (64, 16), (65, 3), (3137, 47), (0, 4), (4, 0)])
def test_channel_sums(variant, dtype, shape):
    # the bias gradient of channels_last dy: column sums, the same for any thread count
    kernels = _dispatch.load(variant)
    a = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    outs = []
    for threads in (1, 2, 3):
        out = np.full(shape[1], np.nan, dtype)
        kernels.channel_sums(a, out, threads)
        outs.append(out)
    np.testing.assert_allclose(outs[0], a.astype(np.float64).sum(axis=0),
                               rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-4 if dtype == np.float32 else 1e-10)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
