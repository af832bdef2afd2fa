// fastconv's forward convolution as an XLA FFI custom call, for the JAX bridge under jax.jit.
//
// jax.pure_callback hands a callback copies of its inputs and copies its result into XLA's
// buffer: for ResNet50 at batch 8 that moved ~0.3 GB a prediction (a 25.7 MB result took 4.8 ms
// to copy, the convolution itself 6.8). Here XLA calls the kernels on its own buffers, with no
// Python and no copies. The kernels live in the Cython build that fastconv._dispatch picked;
// the bridge passes their float32 forward in (set_forward) before the first call. Shapes and
// padding are checked and computed in Python when the call is traced; this only reads them.

#include <Python.h>

#include <atomic>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// fastconv._kernels_*._forward_f32 (see ffi_forward there)
using ForwardF32 = int (*)(const float* x, Py_ssize_t n, Py_ssize_t h, Py_ssize_t w,
                           Py_ssize_t c, const float* k, Py_ssize_t kh, Py_ssize_t kw,
                           Py_ssize_t cin_g, float* out, Py_ssize_t oh, Py_ssize_t ow,
                           Py_ssize_t f, int sh, int sw, int dh, int dw, int pad_top,
                           int pad_left, int groups, int n_threads, const float* bias);

ForwardF32 forward_f32 = nullptr;
int num_threads = 1;  // fastconv.set_num_threads, passed on at run time (set_threads)
std::atomic<long long> calls{0};  // for tests: proof that the custom call ran

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> bias,
                   ffi::ResultBuffer<ffi::F32> out, int64_t sh, int64_t sw, int64_t dh,
                   int64_t dw, int64_t pad_top, int64_t pad_left, int64_t groups,
                   int64_t max_threads, int64_t has_bias) {
  if (forward_f32 == nullptr) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "fastconv: the kernels were not handed to the XLA custom call");
  }
  calls++;
  auto xd = x.dimensions();
  auto kd = k.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || od.size() != 4) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fastconv: rank-4 arrays expected");
  }
  int status = forward_f32(
      x.typed_data(), xd[0], xd[1], xd[2], xd[3], k.typed_data(), kd[0], kd[1], kd[2],
      out->typed_data(), od[1], od[2], od[3], static_cast<int>(sh), static_cast<int>(sw),
      static_cast<int>(dh), static_cast<int>(dw), static_cast<int>(pad_top),
      static_cast<int>(pad_left), static_cast<int>(groups),
      static_cast<int>(max_threads < num_threads ? max_threads : num_threads),
      has_bias ? bias.typed_data() : nullptr);
  if (status != 0) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "fastconv: out of memory");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(fastconv_forward, Forward,
                       ffi::Ffi::Bind()
                           .Arg<ffi::Buffer<ffi::F32>>()
                           .Arg<ffi::Buffer<ffi::F32>>()
                           .Arg<ffi::Buffer<ffi::F32>>()
                           .Ret<ffi::Buffer<ffi::F32>>()
                           .Attr<int64_t>("sh")
                           .Attr<int64_t>("sw")
                           .Attr<int64_t>("dh")
                           .Attr<int64_t>("dw")
                           .Attr<int64_t>("pad_top")
                           .Attr<int64_t>("pad_left")
                           .Attr<int64_t>("groups")
                           .Attr<int64_t>("max_threads")  // the most the work is worth
                           .Attr<int64_t>("has_bias"));

static PyObject* set_forward(PyObject*, PyObject* capsule) {
  void* fn = PyCapsule_GetPointer(capsule, "fastconv.forward_f32");
  if (fn == nullptr) {
    return nullptr;
  }
  forward_f32 = reinterpret_cast<ForwardF32>(fn);
  Py_RETURN_NONE;
}

static PyObject* set_threads(PyObject*, PyObject* n) {
  long value = PyLong_AsLong(n);
  if (value == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  num_threads = value < 1 ? 1 : static_cast<int>(value);
  Py_RETURN_NONE;
}

static PyObject* get_calls(PyObject*, PyObject*) { return PyLong_FromLongLong(calls.load()); }

static PyObject* forward_handler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(fastconv_forward), nullptr, nullptr);
}

static PyMethodDef methods[] = {
    {"set_forward", set_forward, METH_O,
     "set_forward(capsule): the float32 forward (a kernels module's ffi_forward()) to call"},
    {"set_threads", set_threads, METH_O, "set_threads(n): the kernels' thread count"},
    {"calls", get_calls, METH_NOARGS, "How many forward custom calls ran in this process"},
    {"forward_handler", forward_handler, METH_NOARGS,
     "The XLA FFI handler of the forward convolution, for jax.ffi.register_ffi_target"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_xla_ffi", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__xla_ffi(void) { return PyModule_Create(&module); }
