"""torch bridge: custom ops (fastconv::conv2d and its two gradients) with register_fake, so that
torch.compile traces them, and register_autograd. CPU tensors reach the kernels without a copy.
"""

import numpy as np
import torch

from fastconv.backends import numpy as host
from fastconv.geometry import ConvSpec

_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _spec(strides, padding, data_format, dilation):
    return ConvSpec(tuple(strides), padding, data_format, tuple(dilation))


def _numpy(t):
    return t.detach().numpy()


@torch.library.custom_op("fastconv::conv2d", mutates_args=())
def _conv2d(x: torch.Tensor, k: torch.Tensor, strides: list[int], padding: str,
            data_format: str, dilation: list[int]) -> torch.Tensor:
    spec = _spec(strides, padding, data_format, dilation)
    return torch.from_numpy(host.forward(_numpy(x), _numpy(k), spec, _DTYPES[x.dtype]))


@_conv2d.register_fake
def _(x, k, strides, padding, data_format, dilation):
    spec = _spec(strides, padding, data_format, dilation)
    return x.new_empty(spec.output_shape(tuple(x.shape), tuple(k.shape)))


@torch.library.custom_op("fastconv::conv2d_grad_input", mutates_args=())
def _grad_input(dy: torch.Tensor, k: torch.Tensor, input_shape: list[int], strides: list[int],
                padding: str, data_format: str, dilation: list[int]) -> torch.Tensor:
    spec = _spec(strides, padding, data_format, dilation)
    return torch.from_numpy(
        host.grad_input(_numpy(dy), _numpy(k), spec, tuple(input_shape), _DTYPES[dy.dtype]))


@_grad_input.register_fake
def _(dy, k, input_shape, strides, padding, data_format, dilation):
    return dy.new_empty(input_shape)


@torch.library.custom_op("fastconv::conv2d_grad_kernel", mutates_args=())
def _grad_kernel(x: torch.Tensor, dy: torch.Tensor, kernel_shape: list[int], strides: list[int],
                 padding: str, data_format: str, dilation: list[int]) -> torch.Tensor:
    spec = _spec(strides, padding, data_format, dilation)
    return torch.from_numpy(
        host.grad_kernel(_numpy(x), _numpy(dy), spec, tuple(kernel_shape), _DTYPES[x.dtype]))


@_grad_kernel.register_fake
def _(x, dy, kernel_shape, strides, padding, data_format, dilation):
    return x.new_empty(kernel_shape)


def _setup_context(ctx, inputs, output):
    x, k, *args = inputs
    ctx.save_for_backward(x, k)
    ctx.args = args


def _backward(ctx, dy):
    x, k = ctx.saved_tensors
    dy = dy.contiguous()
    dx = dk = None
    if ctx.needs_input_grad[0]:
        dx = _grad_input(dy, k, list(x.shape), *ctx.args)
    if ctx.needs_input_grad[1]:
        dk = _grad_kernel(x, dy, list(k.shape), *ctx.args)
    return dx, dk, None, None, None, None


_conv2d.register_autograd(_backward, setup_context=_setup_context)


def _second_order(ctx, *grads):
    raise NotImplementedError(
        "fastconv computes first-order gradients only: a gradient of fastconv's gradient (e.g. "
        "a Hessian or a gradient penalty) is not supported. Use keras.layers.Conv2D."
    )


for _op in (_grad_input, _grad_kernel):
    _op.register_autograd(_second_order, setup_context=lambda ctx, inputs, output: None)


def on_accelerator(x, k):
    return x.device.type != "cpu" or k.device.type != "cpu"


def conv(x, k, spec, result):
    dtype = torch.float64 if result == "float64" else torch.float32
    y = _conv2d(x.to(dtype), k.to(dtype), list(spec.strides), spec.padding, spec.data_format,
                list(spec.dilation_rate))
    return y.to(getattr(torch, result))
