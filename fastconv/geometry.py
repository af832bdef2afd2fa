"""The one place for convolution shape and padding arithmetic, and for argument checks.

Everything else (ops, bridges, layer, kernels' callers) asks this module. Errors name the argument
and the value, in Keras' words ("... Received: strides=(0, 1)").
"""

import dataclasses
import functools
import numbers

_PADDINGS = ("valid", "same")
_DATA_FORMATS = ("channels_last", "channels_first")


def _pair(value, name):
    """An int or a sequence of 2 ints (1 is repeated), all positive, as a tuple of 2 ints."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        values = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
    ):
        if len(value) == 1:
            values = (int(value[0]),) * 2
        elif len(value) == 2:
            values = (int(value[0]), int(value[1]))
        else:
            raise ValueError(
                f"`{name}` must be an int or a tuple of 2 ints for a 2-D convolution. "
                f"Received: {name}={value!r}"
            )
    else:
        raise TypeError(
            f"`{name}` must be an int or a tuple of 2 ints. Received: {name}={value!r} "
            f"of type {type(value).__name__}"
        )
    if min(values) <= 0:
        raise ValueError(
            f"`{name}` must be positive. Received: {name}={value!r}"
        )
    return values


def _choice(value, name, choices):
    if not isinstance(value, str):
        raise TypeError(
            f"`{name}` must be one of {choices}. Received: {name}={value!r} "
            f"of type {type(value).__name__}"
        )
    lowered = value.lower()
    if lowered not in choices:
        raise ValueError(f"`{name}` must be one of {choices}. Received: {name}={value!r}")
    return lowered


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Every size one convolution call needs, as plain ints (channels_last terms)."""

    n: int
    h: int
    w: int
    c: int
    kh: int
    kw: int
    cin_g: int  # input channels per group (kernel.shape[2])
    f: int  # output channels
    groups: int
    oh: int
    ow: int
    pad_top: int
    pad_left: int

    @property
    def output_shape_nhwc(self):
        return (self.n, self.oh, self.ow, self.f)

    @property
    def input_shape_nhwc(self):
        return (self.n, self.h, self.w, self.c)

    @property
    def kernel_shape(self):
        return (self.kh, self.kw, self.cin_g, self.f)

    @functools.lru_cache(maxsize=1024)
    def pixel_rows(self, strides, threads, max_width=256):
        """(rows, width) to cut the n*h*w pixels into, for a 1x1 convolution with stride 1 (one
        matrix product over all pixels), or None: rows wider than the image's (7 pixels in a
        7x7 map) let each pass over the kernel serve more pixels. Measured, 2 threads: 8x7x7,
        320 -> 1280 channels, 206 -> 289 GFLOP/s; 512 -> 2048, 91 -> 142. width is the largest
        divisor of n*h*w up to max_width that leaves two rows a thread (None if no wider row
        than the image's qualifies)."""
        if (self.kh, self.kw) != (1, 1) or tuple(strides) != (1, 1):
            return None
        pixels = self.n * self.h * self.w
        limit = min(max_width, pixels // (2 * threads))
        width = max((d for d in range(self.w + 1, limit + 1) if pixels % d == 0), default=None)
        return None if width is None else (pixels // width, width)

    @functools.lru_cache(maxsize=1024)
    def blocks(self, strides, dilation_rate):
        """(s, blocked, covers) for the gradients of a convolution with few input channels and
        stride s >= 2, or None. `blocked` is the same convolution on s x s blocks of the padded
        input (space-to-depth: channels s*s*C, kernel ceil(KH/s) x ceil(KW/s), stride 1,
        "valid", zero weights where the kernel does not reach); `covers` tells whether the
        blocks cover the whole input (input pixels outside them get no gradient). With 3 input
        channels the kernels reduce over 3 values a tap; blocked, over 12 or 48. Measured (2
        threads, AVX-512, min of 15), GFLOP/s grad_kernel / grad_input: 7x7/2 -> 64 channels
        110 -> 197 / 101 -> 124; 5x5/2 105 -> 152 / 90 -> 113; 4x4/4 -> 96 84 -> 97 / 54 -> 134;
        3x3/2 -> 32 73 -> 73 / 44 -> 63. The forward direction loses (7x7/2: 327 -> 218)."""
        s = strides[0]
        if (self.groups != 1 or self.c > 4 or s < 2 or tuple(strides) != (s, s)
                or tuple(dilation_rate) != (1, 1) or min(self.kh, self.kw) < s):
            return None
        kbh, kbw = -(-self.kh // s), -(-self.kw // s)
        hb, wb = self.oh + kbh - 1, self.ow + kbw - 1
        blocked = Geometry(self.n, hb, wb, s * s * self.c, kbh, kbw, s * s * self.c, self.f, 1,
                           self.oh, self.ow, 0, 0)
        covers = self.block_extent(s, blocked) == (self.h, self.w)
        return s, blocked, covers

    def block_extent(self, s, blocked):
        """(rows, columns) of the input inside the s x s blocks of `blocked` (from `blocks`):
        the rest is never read (a stride beyond the kernel's reach) and gets no gradient."""
        return (min(self.h, s * blocked.h - self.pad_top),
                min(self.w, s * blocked.w - self.pad_left))

    @property
    def macs(self):
        """Multiply-adds of one direction (forward, grad wrt input or wrt kernel)."""
        return self.n * self.oh * self.ow * self.f * self.kh * self.kw * self.cin_g


def _output_size(size, k, stride, dilation, padding):
    """Output length and leading pad of one spatial axis, exactly as Keras/TF compute them."""
    span = (k - 1) * dilation + 1
    if padding == "valid":
        return (size - span) // stride + 1, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + span - size, 0)
    return out, total // 2


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """The immutable, validated arguments of one 2-D convolution."""

    strides: tuple = (1, 1)
    padding: str = "valid"
    data_format: str = "channels_last"
    dilation_rate: tuple = (1, 1)

    @classmethod
    def make(cls, strides=1, padding="valid", data_format=None, dilation_rate=1):
        if data_format is None:
            import keras

            data_format = keras.config.image_data_format()
        return cls(
            strides=_pair(strides, "strides"),
            padding=_choice(padding, "padding", _PADDINGS),
            data_format=_choice(data_format, "data_format", _DATA_FORMATS),
            dilation_rate=_pair(dilation_rate, "dilation_rate"),
        )

    @property
    def channels_last(self):
        return self.data_format == "channels_last"

    @property
    def nhwc(self):
        """This spec with channels_last: what a bridge runs between its own layout changes."""
        return dataclasses.replace(self, data_format="channels_last")

    @property
    def reduce_axes(self):
        """The axes of an output summed for the bias gradient: all but the channels."""
        return (0, 1, 2) if self.channels_last else (0, 2, 3)

    @property
    def bias_shape(self):
        """The shape that broadcasts a (filters,) bias against an output."""
        return (1, 1, 1, -1) if self.channels_last else (1, -1, 1, 1)

    def to_nhwc(self, shape):
        """An input/output shape in this spec's data_format, reordered to (N, H, W, C)."""
        if self.channels_last:
            return tuple(shape)
        n, c, h, w = shape
        return (n, h, w, c)

    def from_nhwc(self, shape):
        if self.channels_last:
            return tuple(shape)
        n, h, w, c = shape
        return (n, c, h, w)

    def output_shape(self, input_shape, kernel_shape):
        """The output shape (in this spec's data_format); None stays None for unknown sizes."""
        input_shape, kernel_shape = tuple(input_shape), tuple(kernel_shape)
        try:
            return _output_shape(self, input_shape, kernel_shape)
        except TypeError:  # torch.compile's symbolic sizes cannot be hashed
            return self._output_shape(input_shape, kernel_shape)

    def check_call(self, input_shape, kernel_shape, bias_shape=None):
        """Every check of a convolution's arguments (ranks, sizes, groups, bias), made before any
        kernel runs; the output shape."""
        input_shape, kernel_shape = tuple(input_shape), tuple(kernel_shape)
        shape = self.output_shape(input_shape, kernel_shape)
        if bias_shape is not None:
            check_bias(tuple(bias_shape), kernel_shape)
        return shape

    def _output_shape(self, input_shape, kernel_shape):
        check_ranks(input_shape, kernel_shape)
        n, h, w, c = self.to_nhwc(input_shape)
        kh, kw, cin_g, f = kernel_shape
        _check_kernel_dims(kernel_shape)
        _check_channels(c, cin_g, f)
        sizes = []
        for size, k, s, d, axis in zip(
            (h, w), (kh, kw), self.strides, self.dilation_rate, ("height", "width")
        ):
            if size is None or k is None:
                sizes.append(None)
                continue
            _check_fits(size, k, d, axis, self.padding)
            sizes.append(_output_size(size, k, s, d, self.padding)[0])
        return self.from_nhwc((n, sizes[0], sizes[1], f))

    def geometry(self, input_shape, kernel_shape):
        """Validate fully known shapes and return every size the kernels need."""
        return _geometry(self, tuple(input_shape), tuple(kernel_shape))

    def _geometry(self, input_shape, kernel_shape):
        check_ranks(input_shape, kernel_shape)
        n, h, w, c = (int(v) for v in self.to_nhwc(input_shape))
        kh, kw, cin_g, f = (int(v) for v in kernel_shape)
        _check_kernel_dims(kernel_shape)
        groups = _check_channels(c, cin_g, f)
        _check_fits(h, kh, self.dilation_rate[0], "height", self.padding)
        _check_fits(w, kw, self.dilation_rate[1], "width", self.padding)
        oh, pad_top = _output_size(h, kh, self.strides[0], self.dilation_rate[0], self.padding)
        ow, pad_left = _output_size(w, kw, self.strides[1], self.dilation_rate[1], self.padding)
        return Geometry(n, h, w, c, kh, kw, cin_g, f, groups, oh, ow, pad_top, pad_left)


# Layers call with the same shapes step after step: validate and compute once per shape.
@functools.lru_cache(maxsize=4096)
def _geometry(spec, input_shape, kernel_shape):
    return spec._geometry(input_shape, kernel_shape)


@functools.lru_cache(maxsize=4096)
def _output_shape(spec, input_shape, kernel_shape):
    return spec._output_shape(input_shape, kernel_shape)


def check_bias(bias_shape, kernel_shape):
    if tuple(bias_shape) != (kernel_shape[3],):
        raise ValueError(
            "`bias` must have shape (filters,) = (kernel.shape[3],). "
            f"Received: bias.shape={tuple(bias_shape)}, kernel.shape={tuple(kernel_shape)}"
        )


def check_ranks(input_shape, kernel_shape):
    if len(input_shape) != 4:
        raise ValueError(
            "fastconv convolves rank-4 inputs (2-D convolution: batch, 2 spatial dimensions, "
            f"channels); use keras.ops.conv for other ranks. Received: inputs of rank "
            f"{len(input_shape)}, inputs.shape={tuple(input_shape)}"
        )
    if len(kernel_shape) != 4:
        raise ValueError(
            "`kernel` must have rank 4 (kernel_height, kernel_width, input_channels // groups, "
            f"filters). Received: kernel.shape={tuple(kernel_shape)}"
        )


def _check_kernel_dims(kernel_shape):
    if any(v is not None and v <= 0 for v in kernel_shape):
        raise ValueError(
            "Every dimension of `kernel` must be positive. "
            f"Received: kernel.shape={tuple(kernel_shape)}"
        )


def _check_channels(c, cin_g, f):
    """The number of groups implied by input channels c and kernel (.., cin_g, f)."""
    if c is None or cin_g is None:
        return None
    if cin_g <= 0 or c % cin_g != 0:
        raise ValueError(
            "The number of input channels must be a multiple of the kernel's input channels "
            f"(kernel.shape[2]). Received: input channels={c}, kernel.shape[2]={cin_g}"
        )
    groups = c // cin_g
    if groups == 0:
        raise ValueError(f"The input has no channels. Received: input channels={c}")
    if (f is not None and f % groups != 0):
        raise ValueError(
            "The number of filters must be a multiple of the number of groups "
            f"(input channels // kernel.shape[2]). Received: filters={f}, groups={groups}"
        )
    return groups


def _check_fits(size, k, dilation, axis, padding):
    if padding == "valid" and size < (k - 1) * dilation + 1:
        raise ValueError(
            f"The kernel (size {k}, dilation {dilation}) is larger than the input {axis} "
            f"({size}) under padding='valid': the output would be empty. "
            f"Received: input {axis}={size}, kernel_size={k}, dilation_rate={dilation}"
        )
