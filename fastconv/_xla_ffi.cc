// fastconv's convolution and its gradients as XLA FFI custom calls, for the JAX bridge under
// jax.jit.
//
// jax.pure_callback hands a callback copies of its inputs and copies its result into XLA's
// buffer: for ResNet50 at batch 8 that moved ~0.3 GB a prediction (a 25.7 MB result took 4.8 ms
// to copy, the convolution itself 6.8). Here XLA calls the kernels on its own buffers, with no
// Python and no copies. The kernels live in the Cython build that fastconv._dispatch picked;
// the bridge passes their float32 entry points in (set_kernels) before the first call. Shapes and
// padding are checked and computed in Python when the call is traced; this only reads them.

#include "_kernel_api.h"

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using fastconv::forward_f32;
using fastconv::grad_input_f32;
using fastconv::grad_kernel_f32;
using fastconv::threads;

ffi::Error Done(int status) {
  if (status != 0) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "fastconv: out of memory");
  }
  return ffi::Error::Success();
}

ffi::Error Unset() {
  return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                    "fastconv: the kernels were not handed to the XLA custom call");
}

// x (N, H, W, C), kernel (KH, KW, C // groups, F), bias (F,) or (0,), scale (F,) or (0,)
// -> out (N, OH, OW, F) = act(conv * scale + bias), act an FC_ACT_* code (clip: to [lo, hi]);
// nchw: 1 x is (N, C, H, W), 2 out is (N, F, OH, OW), 3 both (see ForwardF32)
ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> bias,
                   ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> out, int64_t sh,
                   int64_t sw, int64_t dh, int64_t dw, int64_t pad_top, int64_t pad_left,
                   int64_t groups, int64_t max_threads, int64_t has_bias, int64_t act, float lo,
                   float hi, int64_t nchw) {
  if (forward_f32 == nullptr) return Unset();
  fastconv::calls++;
  auto xd = x.dimensions();
  auto kd = k.dimensions();
  auto od = out->dimensions();
  const int h = nchw & 1 ? 2 : 1, c = nchw & 1 ? 1 : 3;
  const int oh = nchw & 2 ? 2 : 1, oc = nchw & 2 ? 1 : 3;
  return Done(forward_f32(
      x.typed_data(), xd[0], xd[h], xd[h + 1], xd[c], k.typed_data(), kd[0], kd[1], kd[2],
      out->typed_data(), od[oh], od[oh + 1], od[oc], static_cast<int>(sh), static_cast<int>(sw),
      static_cast<int>(dh), static_cast<int>(dw), static_cast<int>(pad_top),
      static_cast<int>(pad_left), static_cast<int>(groups), threads(max_threads),
      has_bias ? bias.typed_data() : nullptr,
      scale.element_count() ? scale.typed_data() : nullptr, static_cast<int>(act), lo, hi,
      static_cast<int>(nchw)));
}

// dy (N, OH, OW, F), the kernel regrouped to (KH, KW, F // groups, C) -> dx (N, H, W, C);
// nchw: 1 dx is (N, C, H, W), 2 dy is (N, F, OH, OW), 3 both
ffi::Error GradInput(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> wt,
                     ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t dh,
                     int64_t dw, int64_t pad_top, int64_t pad_left, int64_t groups,
                     int64_t max_threads, int64_t nchw) {
  if (grad_input_f32 == nullptr) return Unset();
  fastconv::calls++;
  auto gd = dy.dimensions();
  auto wd = wt.dimensions();
  auto xd = dx->dimensions();
  const int h = nchw & 1 ? 2 : 1, c = nchw & 1 ? 1 : 3;
  const int oh = nchw & 2 ? 2 : 1, oc = nchw & 2 ? 1 : 3;
  return Done(grad_input_f32(
      dy.typed_data(), gd[oh], gd[oh + 1], gd[oc], wt.typed_data(), wd[0], wd[1], wd[2],
      dx->typed_data(), xd[0], xd[h], xd[h + 1], xd[c],
      static_cast<int>(sh), static_cast<int>(sw), static_cast<int>(dh), static_cast<int>(dw),
      static_cast<int>(pad_top), static_cast<int>(pad_left), static_cast<int>(groups),
      threads(max_threads), static_cast<int>(nchw)));
}

// x (N, H, W, C), dy (N, OH, OW, F) -> dk (KH, KW, C // groups, F), and db (F,) dy's channel
// sums (the bias gradient) unless db is null; nchw: 1 x is (N, C, H, W), 2 dy is
// (N, F, OH, OW), 3 both
ffi::Error GradKernelInto(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dk, float* db, int64_t sh, int64_t sw,
                          int64_t dh, int64_t dw, int64_t pad_top, int64_t pad_left,
                          int64_t groups, int64_t max_threads, int64_t nchw) {
  if (grad_kernel_f32 == nullptr) return Unset();
  fastconv::calls++;
  auto xd = x.dimensions();
  auto gd = dy.dimensions();
  auto kd = dk->dimensions();
  const int h = nchw & 1 ? 2 : 1, c = nchw & 1 ? 1 : 3;
  const int oh = nchw & 2 ? 2 : 1, oc = nchw & 2 ? 1 : 3;
  return Done(grad_kernel_f32(
      x.typed_data(), xd[0], xd[h], xd[h + 1], xd[c], dy.typed_data(), gd[oh], gd[oh + 1],
      gd[oc], dk->typed_data(), kd[0], kd[1], kd[2], static_cast<int>(sh),
      static_cast<int>(sw), static_cast<int>(dh), static_cast<int>(dw),
      static_cast<int>(pad_top), static_cast<int>(pad_left), static_cast<int>(groups),
      threads(max_threads), db, static_cast<int>(nchw)));
}

ffi::Error GradKernel(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dk, int64_t sh, int64_t sw, int64_t dh,
                      int64_t dw, int64_t pad_top, int64_t pad_left, int64_t groups,
                      int64_t max_threads, int64_t nchw) {
  return GradKernelInto(x, dy, dk, nullptr, sh, sw, dh, dw, pad_top, pad_left, groups,
                        max_threads, nchw);
}

ffi::Error GradKernelBias(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> db,
                          int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pad_top,
                          int64_t pad_left, int64_t groups, int64_t max_threads,
                          int64_t nchw) {
  return GradKernelInto(x, dy, dk, db->typed_data(), sh, sw, dh, dw, pad_top, pad_left,
                        groups, max_threads, nchw);
}

// dy (N, OH, OW, F) -> db (F,): dy summed over all but its channels (a bias trained under a
// frozen kernel; else the bias gradient comes with GradKernelBias)
ffi::Error BiasGrad(ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> db,
                    int64_t max_threads) {
  if (fastconv::channel_sums_f32 == nullptr) return Unset();
  fastconv::calls++;
  const int64_t f = db->dimensions()[0];
  return Done(fastconv::channel_sums_f32(dy.typed_data(),
                                         f ? static_cast<int64_t>(dy.element_count()) / f : 0,
                                         f, db->typed_data(), threads(max_threads)));
}

// src (N, A, B) -> dst (N, B, A): NCHW <-> NHWC around the custom calls for channels_first
ffi::Error Transpose(ffi::BufferR3<ffi::F32> src, ffi::ResultBufferR3<ffi::F32> dst,
                     int64_t max_threads) {
  if (fastconv::transpose_f32 == nullptr) return Unset();
  auto d = src.dimensions();
  return Done(fastconv::transpose_f32(src.typed_data(), d[0], d[1], d[2], dst->typed_data(),
                                      threads(max_threads)));
}

}  // namespace

// The attributes every direction takes: what fastconv.backends.numpy._args computes
// (max_threads: the most threads the work is worth).
#define FASTCONV_FFI_GEOMETRY_ATTRS                                                        \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("dh").Attr<int64_t>("dw")       \
      .Attr<int64_t>("pad_top").Attr<int64_t>("pad_left").Attr<int64_t>("groups")        \
      .Attr<int64_t>("max_threads")

XLA_FFI_DEFINE_HANDLER(fastconv_forward, Forward,
                       ffi::Ffi::Bind()
                           .Arg<ffi::Buffer<ffi::F32>>()
                           .Arg<ffi::Buffer<ffi::F32>>()
                           .Arg<ffi::Buffer<ffi::F32>>()
                           .Arg<ffi::Buffer<ffi::F32>>()
                           .Ret<ffi::Buffer<ffi::F32>>()
                           FASTCONV_FFI_GEOMETRY_ATTRS
                           .Attr<int64_t>("has_bias")
                           .Attr<int64_t>("act")
                           .Attr<float>("lo")
                           .Attr<float>("hi")
                           .Attr<int64_t>("nchw"));

#define FASTCONV_GRAD_HANDLER(name, fn)                     \
  XLA_FFI_DEFINE_HANDLER(name, fn,                          \
                         ffi::Ffi::Bind()                   \
                             .Arg<ffi::Buffer<ffi::F32>>()  \
                             .Arg<ffi::Buffer<ffi::F32>>()  \
                             .Ret<ffi::Buffer<ffi::F32>>()  \
                             FASTCONV_FFI_GEOMETRY_ATTRS    \
                             .Attr<int64_t>("nchw"));

FASTCONV_GRAD_HANDLER(fastconv_grad_input, GradInput)
FASTCONV_GRAD_HANDLER(fastconv_grad_kernel, GradKernel)

XLA_FFI_DEFINE_HANDLER(fastconv_grad_kernel_bias, GradKernelBias,
                       ffi::Ffi::Bind()
                           .Arg<ffi::Buffer<ffi::F32>>()
                           .Arg<ffi::Buffer<ffi::F32>>()
                           .Ret<ffi::Buffer<ffi::F32>>()
                           .Ret<ffi::Buffer<ffi::F32>>()
                           FASTCONV_FFI_GEOMETRY_ATTRS
                           .Attr<int64_t>("nchw"));

XLA_FFI_DEFINE_HANDLER(fastconv_bias_grad, BiasGrad,
                       ffi::Ffi::Bind()
                           .Arg<ffi::Buffer<ffi::F32>>()
                           .Ret<ffi::Buffer<ffi::F32>>()
                           .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER(fastconv_transpose, Transpose,
                       ffi::Ffi::Bind()
                           .Arg<ffi::BufferR3<ffi::F32>>()
                           .Ret<ffi::BufferR3<ffi::F32>>()
                           .Attr<int64_t>("max_threads"));

static PyObject* handlers(PyObject*, PyObject*) {
  return Py_BuildValue(
      "{s:N,s:N,s:N,s:N,s:N,s:N}",
      "fastconv_forward", PyCapsule_New(reinterpret_cast<void*>(fastconv_forward), nullptr, nullptr),
      "fastconv_grad_input",
      PyCapsule_New(reinterpret_cast<void*>(fastconv_grad_input), nullptr, nullptr),
      "fastconv_grad_kernel",
      PyCapsule_New(reinterpret_cast<void*>(fastconv_grad_kernel), nullptr, nullptr),
      "fastconv_grad_kernel_bias",
      PyCapsule_New(reinterpret_cast<void*>(fastconv_grad_kernel_bias), nullptr, nullptr),
      "fastconv_bias_grad",
      PyCapsule_New(reinterpret_cast<void*>(fastconv_bias_grad), nullptr, nullptr),
      "fastconv_transpose",
      PyCapsule_New(reinterpret_cast<void*>(fastconv_transpose), nullptr, nullptr));
}

static PyMethodDef methods[] = {
    FASTCONV_KERNEL_API_METHODS,
    {"handlers", handlers, METH_NOARGS,
     "{target name: XLA FFI handler capsule}, for jax.ffi.register_ffi_target"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_xla_ffi", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__xla_ffi(void) { return PyModule_Create(&module); }
