// The float32 entry points of fastconv's Cython kernels as C function pointers, for the C++
// bridges (fastconv._xla_ffi for JAX, fastconv._tf_ops for TensorFlow) that call the kernels on
// their framework's own buffers. The kernels live in the Cython build that fastconv._dispatch
// picked at import; the bridge passes their capsules in (set_kernels) before the first call.
// Each bridge includes this once: the state below is its own.

#include <Python.h>

#include <atomic>
#include <cstdint>

namespace fastconv {
namespace {  // each bridge's own copy

// fastconv._kernels_*._forward_f32 (see ffi_forward there): out = act(conv * scale + bias),
// act: the kernels' FC_ACT_* (_kernels.pxi): 0 none, 1 a clip to [lo, hi], 2 swish (scale and
// bias may be null); nchw: 1 x is (n, c, h, w), 2 out is (n, f, oh, ow), 3 both, 0 NHWC
using ForwardF32 = int (*)(const float* x, Py_ssize_t n, Py_ssize_t h, Py_ssize_t w,
                           Py_ssize_t c, const float* k, Py_ssize_t kh, Py_ssize_t kw,
                           Py_ssize_t cin_g, float* out, Py_ssize_t oh, Py_ssize_t ow,
                           Py_ssize_t f, int sh, int sw, int dh, int dw, int pad_top,
                           int pad_left, int groups, int n_threads, const float* bias,
                           const float* scale, int act, float lo, float hi, int nchw);

// fastconv._kernels_*._grad_input_f32 and _grad_kernel_f32 (ffi_grad_input, ffi_grad_kernel);
// their nchw bits, as ForwardF32's: grad_input's 1, dx is (n, c, h, w), 2, dy is (n, f, oh, ow);
// grad_kernel's 1, x is (n, c, h, w), 2, dy is (n, f, oh, ow) (else NHWC). grad_kernel also sums
// dy's channels into db (F,) unless db is null: the bias gradient
using GradInputF32 = int (*)(const float* dy, Py_ssize_t oh, Py_ssize_t ow, Py_ssize_t f,
                             const float* wt, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t cout_g,
                             float* dx, Py_ssize_t n, Py_ssize_t h, Py_ssize_t w, Py_ssize_t c,
                             int sh, int sw, int dh, int dw, int pad_top, int pad_left,
                             int groups, int n_threads, int nchw);
using GradKernelF32 = int (*)(const float* x, Py_ssize_t n, Py_ssize_t h, Py_ssize_t w,
                              Py_ssize_t c, const float* dy, Py_ssize_t oh, Py_ssize_t ow,
                              Py_ssize_t f, float* dk, Py_ssize_t kh, Py_ssize_t kw,
                              Py_ssize_t cin_g, int sh, int sw, int dh, int dw, int pad_top,
                              int pad_left, int groups, int n_threads, float* db, int nchw);

// fastconv._kernels_*._channel_sums_f32 (ffi_channel_sums): the bias gradient of an NHWC dy
using ChannelSumsF32 = int (*)(const float* a, Py_ssize_t r, Py_ssize_t f, float* out,
                               int n_threads);

// fastconv._kernels_*._transpose_f32 (ffi_transpose): src (N, A, B) -> dst (N, B, A), the
// channels_first layout changes
using TransposeF32 = int (*)(const float* src, Py_ssize_t n, Py_ssize_t a, Py_ssize_t b,
                             float* dst, int n_threads);

// fastconv._kernels_*._regroup_f32 (ffi_regroup): a (t, cin_g, f) kernel to grad_input's
// (t, f / groups, groups * cin_g)
using RegroupF32 = int (*)(const float* src, Py_ssize_t t, Py_ssize_t cin_g, Py_ssize_t f,
                           int groups, float* dst);

ForwardF32 forward_f32 = nullptr;
GradInputF32 grad_input_f32 = nullptr;
GradKernelF32 grad_kernel_f32 = nullptr;
ChannelSumsF32 channel_sums_f32 = nullptr;
TransposeF32 transpose_f32 = nullptr;
RegroupF32 regroup_f32 = nullptr;
int num_threads = 1;  // fastconv.set_num_threads, passed on at run time (set_threads)
std::atomic<long long> calls{0};  // for tests: proof that the bridge ran the kernels

// The thread count for a call the work is worth max_threads for.
int threads(int64_t max_threads) {
  return static_cast<int>(max_threads < num_threads ? max_threads : num_threads);
}

PyObject* set_kernels(PyObject*, PyObject* args) {
  PyObject *fwd, *gin, *gk, *sums, *tr, *rg;
  if (!PyArg_ParseTuple(args, "OOOOOO", &fwd, &gin, &gk, &sums, &tr, &rg)) return nullptr;
  void* f = PyCapsule_GetPointer(fwd, "fastconv.forward_f32");
  void* g = f ? PyCapsule_GetPointer(gin, "fastconv.grad_input_f32") : nullptr;
  void* k = g ? PyCapsule_GetPointer(gk, "fastconv.grad_kernel_nchw_f32") : nullptr;
  void* b = k ? PyCapsule_GetPointer(sums, "fastconv.channel_sums_f32") : nullptr;
  void* t = b ? PyCapsule_GetPointer(tr, "fastconv.transpose_f32") : nullptr;
  void* r = t ? PyCapsule_GetPointer(rg, "fastconv.regroup_f32") : nullptr;
  if (r == nullptr) return nullptr;
  forward_f32 = reinterpret_cast<ForwardF32>(f);
  grad_input_f32 = reinterpret_cast<GradInputF32>(g);
  grad_kernel_f32 = reinterpret_cast<GradKernelF32>(k);
  channel_sums_f32 = reinterpret_cast<ChannelSumsF32>(b);
  transpose_f32 = reinterpret_cast<TransposeF32>(t);
  regroup_f32 = reinterpret_cast<RegroupF32>(r);
  Py_RETURN_NONE;
}

PyObject* set_threads(PyObject*, PyObject* n) {
  long value = PyLong_AsLong(n);
  if (value == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  num_threads = value < 1 ? 1 : static_cast<int>(value);
  Py_RETURN_NONE;
}

PyObject* get_calls(PyObject*, PyObject*) { return PyLong_FromLongLong(calls.load()); }

}  // namespace
}  // namespace fastconv

// The module methods every bridge has; a bridge lists them first in its method table.
#define FASTCONV_KERNEL_API_METHODS                                                           \
  {"set_kernels", fastconv::set_kernels, METH_VARARGS,                                        \
   "set_kernels(forward, grad_input, grad_kernel, channel_sums, transpose, regroup): the "   \
   "float32 kernels to call (capsules from a kernels module's ffi_forward(), "                \
   "ffi_grad_input(), ffi_grad_kernel(), ffi_channel_sums(), ffi_transpose(), "               \
   "ffi_regroup())"},                                                                         \
      {"set_threads", fastconv::set_threads, METH_O, "set_threads(n): the kernels' thread count"}, \
      {"calls", fastconv::get_calls, METH_NOARGS, "How many kernel calls this bridge made in this process"}
