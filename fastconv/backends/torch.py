"""torch bridge. Eagerly, a torch.autograd.Function calls the host (a custom op's dispatch costs
about 20 us a call, more than a small layer's kernel). Under torch.compile the same computation
runs as custom ops (fastconv::conv2d and its two gradients) with register_fake, so that the
compiler can trace them, and register_autograd. CPU tensors reach the kernels without a copy.
"""

from typing import NamedTuple, Optional

import numpy as np
import torch

from fastconv import _dispatch
from fastconv.backends import numpy as host
from fastconv.geometry import ConvSpec

_dispatch.openmp_shared_with_torch()

_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_NHWC = ConvSpec()


def _spec(strides, padding, data_format, dilation):
    return ConvSpec(tuple(strides), padding, data_format, tuple(dilation))


def _args(spec):
    return list(spec.strides), spec.padding, spec.data_format, list(spec.dilation_rate)


def _numpy(t):
    return None if t is None else t.detach().numpy()


def _forward(x, k, b, spec, activation=None):
    return torch.from_numpy(host.forward(_numpy(x), _numpy(k), spec, _DTYPES[x.dtype], _numpy(b),
                                         nhwc_memory=True, activation=activation))


def _grad_input(dy, k, input_shape, spec):
    return torch.from_numpy(
        host.grad_input(_numpy(dy), _numpy(k), spec, tuple(input_shape), _DTYPES[dy.dtype]))


def _grad_kernel(x, dy, kernel_shape, spec, bias=False):
    """dk, or with `bias` (dk, db) from one call."""
    out = host.grad_kernel(_numpy(x), _numpy(dy), spec, tuple(kernel_shape), _DTYPES[x.dtype],
                           bias=bias)
    return tuple(map(torch.from_numpy, out)) if bias else torch.from_numpy(out)


def _nhwc_memory(t, spec):
    """An NCHW tensor (channels_first) as NCHW with NHWC memory, which the host takes as it is:
    transposed once by the kernels where its memory is NCHW, else t itself."""
    if (spec.channels_last or t.dtype not in _DTYPES or t.dim() != 4
            or t.permute(0, 2, 3, 1).is_contiguous()):
        return t
    return torch.from_numpy(host._nhwc(_numpy(t), spec, _DTYPES[t.dtype])).permute(0, 3, 1, 2)


def _reads_nchw(x, dy, k, spec):
    """Whether both gradients take channels_first float32 x and dy with NCHW memory as they
    are (host.nchw_gradients): then dy is not transposed to NHWC memory first."""
    return (not spec.channels_last and x.is_contiguous() and dy.is_contiguous()
            and x.dtype == dy.dtype == torch.float32
            and host.nchw_gradients(spec, spec.geometry(tuple(x.shape), tuple(k.shape))))


def _gradients(ctx, x, k, has_bias, dy, spec, direct):
    """(dx, dk, db) as needed. `direct` calls the host; otherwise the gradient custom ops run,
    which a compiler can trace and whose own gradient raises (second order)."""
    if direct and not _reads_nchw(x, dy, k, spec):
        # channels_first: dy transposed to NHWC memory once, for both gradients (each
        # transposed it), unless both read NCHW x and dy as they are
        dy = _nhwc_memory(dy, spec)
    if spec.channels_last or not dy.permute(0, 2, 3, 1).is_contiguous():
        # else NCHW with NHWC memory (as channels_first results are): the host takes it as is
        dy = dy.contiguous()
    needs = ctx.needs_input_grad
    bias = has_bias and needs[2]
    if (direct and needs[1] and spec.channels_last and x.dtype in _DTYPES
            and dy.dtype == k.dtype == x.dtype and x.is_contiguous()):
        done = host.gradients(_numpy(x), _numpy(dy), _numpy(k), spec, needs[0], bias,
                              _DTYPES[x.dtype])
        if done is not None:
            return tuple(None if a is None else torch.from_numpy(a) for a in done)
    dx = dk = db = None
    if needs[0]:
        dx = (_grad_input(dy, k, x.shape, spec) if direct
              else _grad_input_op(dy, k, list(x.shape), *_args(spec)))
    if needs[1] and bias and direct:
        # one pass over dy for both (the kernels sum dy's channels from the chunks they read)
        dk, db = _grad_kernel(x, dy, k.shape, spec, bias=True)
        return dx, dk, db
    if needs[1]:
        dk = (_grad_kernel(x, dy, k.shape, spec) if direct
              else _grad_kernel_op(x, dy, list(k.shape), *_args(spec)))
    if bias:
        db = _bias_grad(dy, spec) if direct else dy.sum(dim=spec.reduce_axes)
    return dx, dk, db


def _bias_grad(dy, spec):
    # By the kernels where dy's memory is NHWC: torch's sum wakes torch's own OpenMP team, whose
    # workers then spin beside the kernels' next call (A/B, 2 cores: training steps 2-13% faster,
    # grouped32 7.1-7.4 -> 6.2-6.7 ms)
    nhwc = dy if spec.channels_last else dy.permute(0, 2, 3, 1)
    if not nhwc.is_contiguous():
        return dy.sum(dim=spec.reduce_axes)
    return torch.from_numpy(host.bias_grad(_numpy(nhwc), _NHWC, _DTYPES[dy.dtype]))


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k, b, spec):
        # x itself, not an NHWC copy of a channels_first x (grad_kernel transposes it again): a
        # copy would be held until the backward beside x, and, not connected to x, would let a
        # second-order gradient through grad_kernel's op wrt x go missing instead of raising
        ctx.save_for_backward(x, k)
        ctx.spec, ctx.has_bias = spec, b is not None
        return _forward(x, k, b, spec)

    @staticmethod
    def backward(ctx, dy):
        x, k = ctx.saved_tensors
        # Grad mode is on during backward only with create_graph=True: then the custom ops run,
        # so that differentiating the gradient raises instead of silently giving zero.
        direct = not torch.is_grad_enabled()
        return (*_gradients(ctx, x, k, ctx.has_bias, dy, ctx.spec, direct), None)


@torch.library.custom_op("fastconv::conv2d", mutates_args=())
def _conv2d_op(x: torch.Tensor, k: torch.Tensor, b: Optional[torch.Tensor], strides: list[int],
               padding: str, data_format: str, dilation: list[int]) -> torch.Tensor:
    return _forward(x, k, b, _spec(strides, padding, data_format, dilation))


@_conv2d_op.register_fake
def _(x, k, b, strides, padding, data_format, dilation):
    spec = _spec(strides, padding, data_format, dilation)
    return x.new_empty(spec.output_shape(tuple(x.shape), tuple(k.shape)))


@torch.library.custom_op("fastconv::conv2d_grad_input", mutates_args=())
def _grad_input_op(dy: torch.Tensor, k: torch.Tensor, input_shape: list[int],
                   strides: list[int], padding: str, data_format: str,
                   dilation: list[int]) -> torch.Tensor:
    return _grad_input(dy, k, input_shape, _spec(strides, padding, data_format, dilation))


@_grad_input_op.register_fake
def _(dy, k, input_shape, strides, padding, data_format, dilation):
    return dy.new_empty(input_shape)


@torch.library.custom_op("fastconv::conv2d_grad_kernel", mutates_args=())
def _grad_kernel_op(x: torch.Tensor, dy: torch.Tensor, kernel_shape: list[int],
                    strides: list[int], padding: str, data_format: str,
                    dilation: list[int]) -> torch.Tensor:
    return _grad_kernel(x, dy, kernel_shape, _spec(strides, padding, data_format, dilation))


@_grad_kernel_op.register_fake
def _(x, dy, kernel_shape, strides, padding, data_format, dilation):
    return x.new_empty(kernel_shape)


def _setup_context(ctx, inputs, output):
    x, k, b, *args = inputs
    ctx.save_for_backward(x, k)
    ctx.has_bias, ctx.args = b is not None, args


def _backward(ctx, dy):
    x, k = ctx.saved_tensors
    grads = _gradients(ctx, x, k, ctx.has_bias, dy, _spec(*ctx.args), direct=False)
    return (*grads, None, None, None, None)


_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def _second_order(ctx, *grads):
    raise NotImplementedError(
        "fastconv computes first-order gradients only: a gradient of fastconv's gradient (e.g. "
        "a Hessian or a gradient penalty) is not supported. Use keras.layers.Conv2D."
    )


for _op in (_grad_input_op, _grad_kernel_op):
    _op.register_autograd(_second_order, setup_context=lambda ctx, inputs, output: None)


def batch_norm(layer, x, training):
    """ops.batch_norm on torch: (outputs, batch mean, batch variance) in training, (outputs,
    None, None) in inference, by torch's batch_norm (on the channels-last view of x: no copy),
    one pass forward and one backward; Keras' own on torch is six passes each way (mean,
    square, mean, subtract, scale, shift)."""
    import torch.nn.functional as F

    channels = x.shape[-1]
    weight = layer.gamma.value if layer.scale else None
    bias = layer.beta.value if layer.center else None
    if training:
        # momentum 1: torch overwrites these with the batch's mean and unbiased variance
        mean = torch.zeros(channels, dtype=x.dtype, device=x.device)
        variance = torch.ones(channels, dtype=x.dtype, device=x.device)
    else:
        mean, variance = layer.moving_mean.value, layer.moving_variance.value
    y = F.batch_norm(x.permute(0, 3, 1, 2), mean, variance, weight, bias, training=training,
                     momentum=1.0, eps=layer.epsilon)
    y = y.permute(0, 2, 3, 1)
    if not training:
        return y, None, None
    n = x.numel() // channels
    return y, mean, variance * (max(n - 1, 1) / n)  # torch's variance is unbiased, Keras' not


def on_accelerator(x, k):
    return x.device.type != "cpu" or k.device.type != "cpu"


def forward_variables(x, kernel, kernel_shape, bias, spec, activation=None, plans=None):
    """A layer's eager convolution on its kernel (seen as `kernel_shape`) and bias variables:
    (outputs, whether `activation` (as host.act_attrs takes it, or None) was computed by the
    kernels: channels_last float32, nothing to differentiate), or None where this does not serve
    (compiling, x not a CPU float tensor of the kernel's dtype, not rank 4). What ops.conv_bias
    does, without its conversions and checks of values that a layer's call has already made
    tensors of its compute dtype: ~8 us of Python a call (33 -> 25 us with the kernel stubbed),
    which runs at a third of its speed right after a kernel has filled the caches (grouped
    4x28x28x256 in 32 groups, layer.call 0.64-0.66 -> 0.62-0.63 ms, the kernel 0.50).
    The call is kept in `plans` (a dict, or None), for `run_plan`."""
    if type(x) is not torch.Tensor or torch.compiler.is_compiling() or x.dim() != 4:
        return None
    # (a LoRA layer's kernel is a tensor, its sum)
    k, b = (getattr(v, "value", v) for v in (kernel, bias))
    if type(k) is not torch.Tensor and not isinstance(k, torch.nn.Parameter):
        return None
    if (x.dtype not in _DTYPES or k.dtype != x.dtype or (b is not None and b.dtype != x.dtype)
            or on_accelerator(x, k) or (b is not None and b.device.type != "cpu")):
        return None
    spec.check_call(x.shape, kernel_shape, None if b is None else b.shape)
    result = "float64" if x.dtype == torch.float64 else "float32"
    plan = _Plan(x.device, k, b, tuple(kernel_shape), tuple(k.shape) != tuple(kernel_shape),
                 spec, result, host.fused_activation(activation, spec, result))
    if plans is not None:
        plans[tuple(x.shape), x.dtype] = plan
    return _run(plan, x)


class _Plan(NamedTuple):
    """What forward_variables made of a call, for `_run` (and `run_plan`)."""
    device: torch.device  # x's
    kernel: torch.Tensor  # the variables' values (Parameters)
    bias: Optional[torch.Tensor]
    kernel_shape: tuple
    reshape: bool  # whether the kernel is seen in kernel_shape (a depthwise layer's)
    spec: ConvSpec
    result: str
    activation: Optional[tuple]  # computed by the kernels where nothing is differentiated


def _run(plan, x):
    k = plan.kernel.reshape(plan.kernel_shape) if plan.reshape else plan.kernel
    b = plan.bias
    if plan.activation is not None and not _differentiated(x, k, b):
        # (x, k and b of the plan's dtype: forward_variables checked them, run_plan x)
        return _forward(x, k, b, plan.spec, plan.activation), True
    return conv(x, k, b, plan.spec, plan.result), False


def _differentiated(x, k, b):
    """Whether autograd records a convolution of x, k and b (b may be None)."""
    return torch.is_grad_enabled() and (x.requires_grad or k.requires_grad
                                        or (b is not None and b.requires_grad))


def run_plan(plans, x, kernel, bias):
    """forward_variables for a call like one it kept in `plans`: x of the same shape, dtype and
    device, the same variables' values (not a stateless scope's), not compiling; without
    remaking its checks. (outputs, activated), or None. The caller (the layer) answers for
    everything about the layer and the call (see layers._Fastconv._planned). An eager
    DepthwiseConv2D call on 1x8x8x16: 63 -> 52 us warm; benchmarks/models.py's DepthwiseConv2D
    cases on torch 1.08-1.19x faster (one run each way)."""
    if type(x) is not torch.Tensor or torch.compiler.is_compiling():
        return None
    plan = plans.get((tuple(x.shape), x.dtype))
    if (plan is None or x.device != plan.device
            or getattr(kernel, "value", None) is not plan.kernel
            or (None if bias is None else getattr(bias, "value", None)) is not plan.bias):
        return None
    return _run(plan, x)


def conv(x, k, b, spec, result):
    # (each `.to` is a dispatch even when the dtype is right: this function's own time on a
    # 2x8x8x16 eager call, beyond _forward, 10.3 -> 6.8 us warm; the layer call takes ~60 us)
    dtype = torch.float64 if result == "float64" else torch.float32
    if x.dtype is not dtype:
        x = x.to(dtype)
    if k.dtype is not dtype:
        k = k.to(dtype)
    if b is not None and b.dtype is not dtype:
        b = b.to(dtype)
    if torch.compiler.is_compiling():
        y = _conv2d_op(x, k, b, *_args(spec))
    elif _differentiated(x, k, b):
        y = _Conv2d.apply(x, k, b, spec)
    else:
        y = _forward(x, k, b, spec)  # (an autograd.Function costs ~40 us even when not needed)
    out = getattr(torch, result)
    return y if y.dtype is out else y.to(out)
