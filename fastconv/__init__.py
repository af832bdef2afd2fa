"""fastconv: a Cython-accelerated, drop-in replacement for keras.layers.Conv2D on CPUs."""

from fastconv import ops
from fastconv._dispatch import get_num_threads, set_num_threads, show_config
from fastconv.layers import Conv2D, DepthwiseConv2D
from fastconv.convert import convert, export, keras_convolution, revert

__version__ = "0.1.0"

__all__ = [
    "Conv2D", "DepthwiseConv2D", "convert", "revert", "export", "keras_convolution", "ops",
    "get_num_threads", "set_num_threads", "show_config", "__version__",
]
