// fastconv's convolution and its gradients as TensorFlow ops, for the TensorFlow bridge in
// graphs (tf.function, Keras' trainer and predict functions).
//
// A tf.py_function around the host kernels cost ~1 ms a call here beyond the kernel (the
// EagerPyFunc op, the GIL, tensor conversions): MobileNetV2's 52 convolutions at batch 8 took
// 227 ms in it against 127 ms of Keras' own convolutions. These ops call the kernels on
// TensorFlow's tensors with no Python. This file is both a TensorFlow op library
// (tf.load_op_library, which must load it first: it registers the ops and makes their Python
// wrappers) and a Python module (set_kernels, set_threads, calls). Shapes, padding and the
// thread count are checked and computed in Python when the graph is built; this only reads
// them.

#include "_kernel_api.h"

#include <stdint.h>
#include <stdlib.h>

#include <algorithm>
#include <list>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <utility>

#include "tensorflow/core/framework/allocator.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::InferenceContext;

// The attributes every direction takes: what fastconv.backends.numpy._args computes.
#define FASTCONV_GEOMETRY_ATTRS                                                          \
  Attr("sh: int").Attr("sw: int").Attr("dh: int").Attr("dw: int").Attr("pad_top: int") \
      .Attr("pad_left: int").Attr("groups: int").Attr("max_threads: int")

// The forward ops' result size and epilogue (see FastconvForward)
#define FASTCONV_FORWARD_ATTRS                                                           \
  FASTCONV_GEOMETRY_ATTRS.Attr("oh: int").Attr("ow: int").Attr("f: int")               \
      .Attr("act: int = 0").Attr("lo: float = 0").Attr("hi: float = 0")

struct Geometry {
  int sh, sw, dh, dw, pad_top, pad_left, groups;
  int64_t max_threads;

  Geometry() = default;

  // from the first 8 of an eager op's `sizes` (see FastconvForwardVariables)
  explicit Geometry(const std::vector<int64_t>& sizes)
      : sh(sizes[0]), sw(sizes[1]), dh(sizes[2]), dw(sizes[3]), pad_top(sizes[4]),
        pad_left(sizes[5]), groups(sizes[6]), max_threads(sizes[7]) {}

  explicit Geometry(OpKernelConstruction* ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("sh", &sh));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("sw", &sw));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dh", &dh));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dw", &dw));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("pad_top", &pad_top));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("pad_left", &pad_left));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("groups", &groups));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("max_threads", &max_threads));
  }
};

bool Ready(OpKernelContext* ctx, const void* fn) {
  if (fn == nullptr) {
    ctx->SetStatus(absl::FailedPreconditionError(
        "fastconv: the kernels were not handed to the TensorFlow op"));
    return false;
  }
  return true;
}

// Large outputs come from buffers the ops' earlier outputs left behind. TensorFlow's default CPU
// allocator takes each large tensor from the C heap afresh, which maps it anew (glibc maps
// anything over its mmap threshold, up to 32 MB) and faults it in one 4 KB page at a time, 1-6 us
// a page on these VMs: 28 thousand faults in a converted MobileNetV2's predict step at batch 8,
// 9.6 thousand with this. A model asks for the same few sizes every step, so a freed output is
// kept (up to limit bytes, the oldest freed first) for the next output of exactly its size: the
// policy of fastconv._memory's pool, which serves the host kernels' results on the other paths.
class ReuseAllocator : public tensorflow::Allocator {
 public:
  static constexpr size_t kMinBytes = 1 << 20;  // smaller ones stay in the heap anyway

  explicit ReuseAllocator(size_t limit) : limit_(limit) {}

  std::string Name() override { return "fastconv_reuse"; }

  void* AllocateRaw(size_t alignment, size_t num_bytes) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = unused_.begin(); it != unused_.end(); ++it)
        if (it->first == num_bytes && reinterpret_cast<uintptr_t>(it->second) % alignment == 0) {
          void* p = it->second;
          kept_ -= num_bytes;
          unused_.erase(it);
          reuses_++;
          return p;
        }
    }
    void* p = nullptr;
    if (posix_memalign(&p, alignment < 64 ? 64 : alignment, num_bytes) != 0) return nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    sizes_[p] = num_bytes;
    return p;
  }

  void DeallocateRaw(void* ptr) override {
    if (ptr == nullptr) return;
    std::lock_guard<std::mutex> lock(mu_);
    const size_t n = sizes_[ptr];
    unused_.emplace_front(n, ptr);
    kept_ += n;
    Trim();
  }

  void SetLimit(size_t limit) {
    std::lock_guard<std::mutex> lock(mu_);
    limit_ = limit;
    Trim();
  }

  // (bytes kept unused, limit, outputs served from kept buffers so far)
  void Stats(size_t* kept, size_t* limit, size_t* reuses) {
    std::lock_guard<std::mutex> lock(mu_);
    *kept = kept_;
    *limit = limit_;
    *reuses = reuses_;
  }

 private:
  void Trim() {
    while (kept_ > limit_) {
      kept_ -= unused_.back().first;
      sizes_.erase(unused_.back().second);
      free(unused_.back().second);
      unused_.pop_back();
    }
  }

  std::mutex mu_;
  std::list<std::pair<size_t, void*>> unused_;  // most recently freed first
  std::unordered_map<void*, size_t> sizes_;     // every buffer it owns
  size_t kept_ = 0, limit_, reuses_ = 0;
};

// never destroyed: tensors that outlive the ops (and the interpreter's exit) free into it
ReuseAllocator* const reuse = new ReuseAllocator(0);  // the bridge sets the limit

bool Small(const TensorShape& shape) {
  return shape.num_elements() * sizeof(float) < ReuseAllocator::kMinBytes;
}

// a float tensor of `shape` from the ReuseAllocator
absl::Status Reused(const TensorShape& shape, Tensor* t) {
  *t = Tensor(reuse, tensorflow::DT_FLOAT, shape);
  if (!t->IsInitialized()) return absl::ResourceExhaustedError("fastconv: out of memory");
  return absl::OkStatus();
}

// output `index` of `shape`: a large one from the ReuseAllocator
absl::Status Output(OpKernelContext* ctx, int index, const TensorShape& shape, Tensor** out) {
  if (Small(shape)) return ctx->allocate_output(index, shape, out);
  Tensor t;
  TF_RETURN_IF_ERROR(Reused(shape, &t));
  ctx->set_output(index, t);
  *out = ctx->mutable_output(index);
  return absl::OkStatus();
}

PyObject* SetOutputCache(PyObject*, PyObject* arg) {
  const size_t limit = PyLong_AsSize_t(arg);
  if (limit == static_cast<size_t>(-1) && PyErr_Occurred()) return nullptr;
  reuse->SetLimit(limit);
  Py_RETURN_NONE;
}

PyObject* OutputCache(PyObject*, PyObject*) {
  size_t kept, limit, reuses;
  reuse->Stats(&kept, &limit, &reuses);
  return Py_BuildValue("(nnn)", static_cast<Py_ssize_t>(kept), static_cast<Py_ssize_t>(limit),
                       static_cast<Py_ssize_t>(reuses));
}

// One kernel call at a time: TensorFlow runs independent ops at once (a ResNet block's shortcut
// beside its first convolution; a layer's two gradients), each of whose kernel calls would
// start its own team of all the threads.
std::mutex turns;

// kernel() (a kernel call, 0 or -1 when out of memory) in its turn
template <typename Kernel>
void Call(OpKernelContext* ctx, Kernel kernel) {
  const std::lock_guard<std::mutex> turn(turns);
  if (kernel() != 0) ctx->SetStatus(absl::ResourceExhaustedError("fastconv: out of memory"));
}

// A (N, d1, d2, d3) output whose N is input `like`'s first dimension and d1..d3 are attributes.
absl::Status ShapeFromAttrs(InferenceContext* c, int like, const char* a, const char* b,
                            const char* d) {
  int64_t v[3];
  TF_RETURN_IF_ERROR(c->GetAttr(a, &v[0]));
  TF_RETURN_IF_ERROR(c->GetAttr(b, &v[1]));
  TF_RETURN_IF_ERROR(c->GetAttr(d, &v[2]));
  c->set_output(0, c->MakeShape({c->Dim(c->input(like), 0), v[0], v[1], v[2]}));
  return absl::OkStatus();
}

// Whether an eager op's packed `sizes` has its length: n, or n + 5 (a view)
absl::Status SizesFit(size_t got, size_t n) {
  if (got == n || got == n + 5) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("fastconv: sizes takes ", n, " or ", n + 5, " integers"));
}

// dk of the kernel_shape attribute and, for an op with two outputs, db (F,)
absl::Status KernelShapes(InferenceContext* c) {
  std::vector<int64_t> shape;
  TF_RETURN_IF_ERROR(c->GetAttr("kernel_shape", &shape));
  c->set_output(0, c->MakeShape({shape[0], shape[1], shape[2], shape[3]}));
  if (c->num_outputs() > 1) c->set_output(1, c->Vector(shape[3]));
  return absl::OkStatus();
}

}  // namespace

// x (N, H, W, C), kernel (KH, KW, C // groups, F), bias (F,) or (0,), scale (F,) or (0,)
// -> (N, OH, OW, F): act(conv * scale + bias), act one of the kernels' FC_ACT_* (none, a clip to
// [lo, hi], swish): an inference BatchNormalization and an activation fused into the convolution
// by the TensorFlow bridge. nchw, the kernels' layout bits (ForwardF32): 1, x is (N, C, H, W);
// 2, y is (N, F, OH, OW) (channels_first in graphs: its rows transposed in cache, a band at a
// time, not the whole tensors around the op)
REGISTER_OP("FastconvForward")
    .Input("x: float")
    .Input("kernel: float")
    .Input("bias: float")
    .Input("scale: float")
    .Output("y: float")
    .FASTCONV_FORWARD_ATTRS
    .Attr("nchw: int = 0")
    .SetShapeFn([](InferenceContext* c) {
      int64_t nchw;
      TF_RETURN_IF_ERROR(c->GetAttr("nchw", &nchw));
      return (nchw & 2) ? ShapeFromAttrs(c, 0, "f", "oh", "ow")
                        : ShapeFromAttrs(c, 0, "oh", "ow", "f");
    });

// FastconvForward on the layer's variables themselves, for eager inference calls: each eager op
// here cost 30-60 us, and 100-150 us after a large layer's kernel had pushed TensorFlow's code
// and data out of the caches, and reading a variable is one (ReadVariableOp; a depthwise
// kernel's reshape another). kernel: a variable (KH, KW, ., .) holding KH * KW * (C // groups)
// * F floats in the (KH, KW, C // groups, F) order (a DepthwiseConv2D kernel (KH, KW, C, M) is
// that order); bias: none or one variable of F floats. view: empty, or the (N, H, W, OH, OW)
// the kernels see x and the result as (a 1x1 convolution's pixels re-cut for the threads).
// nchw: x (N, C, H, W) and y (N, F, OH, OW), by the kernels' channels_first forward inside the
// op (on the general path, the variables read as two ops and the host's convolution, channels_first
// inference took up to 1.3x channels_last's time).
// nkernel = 1: the kernel variable's value as read (what ReadVariableOp gives: its buffer,
// which an assignment then copies instead of overwriting), for a call under a GradientTape,
// whose gradient needs the kernel the forward used: one op instead of a read of each variable
// and the forward. nx = 1 (with nchw): x's NHWC copy too, which the gradient wrt the kernel
// then reads instead of transposing x again.
// Its sizes, packed (an eager call converts each attribute from Python: ~2 us apiece with cold
// caches, 20 attributes 40 us of the op's ~80): the 8 FASTCONV_GEOMETRY_ATTRS, then oh, ow, f,
// act, nchw (0 or 1), then view (nothing or 5 sizes); clip: act's lo and hi, or nothing
REGISTER_OP("FastconvForwardVariables")
    .Input("x: float")
    .Input("kernel: resource")
    .Input("bias: nbias * resource")
    .Output("y: float")
    .Output("kernel_value: nkernel * float")
    .Output("x_nhwc: nx * float")
    .Attr("nbias: int >= 0")
    .Attr("nkernel: int >= 0 = 0")
    .Attr("nx: int >= 0 = 0")
    .Attr("sizes: list(int)")
    .Attr("clip: list(float) = []")
    .SetShapeFn([](InferenceContext* c) {
      std::vector<int64_t> sizes;
      TF_RETURN_IF_ERROR(c->GetAttr("sizes", &sizes));
      TF_RETURN_IF_ERROR(SizesFit(sizes.size(), 13));
      const int64_t oh = sizes[8], ow = sizes[9], f = sizes[10];
      c->set_output(0, sizes[12] ? c->MakeShape({c->Dim(c->input(0), 0), f, oh, ow})
                                 : c->MakeShape({c->Dim(c->input(0), 0), oh, ow, f}));
      for (int i = 1; i < c->num_outputs(); i++) c->set_output(i, c->UnknownShape());
      return absl::OkStatus();
    });

// dy (N, OH, OW, F), the kernel regrouped to (KH, KW, F // groups, C) -> dx (N, H, W, C);
// nchw, the kernels' layout bits: 1 dx is (N, C, H, W), 2 dy is (N, F, OH, OW) (their rows
// transposed in cache by the kernels)
REGISTER_OP("FastconvGradInput")
    .Input("dy: float")
    .Input("wt: float")
    .Output("dx: float")
    .FASTCONV_GEOMETRY_ATTRS
    .Attr("h: int")
    .Attr("w: int")
    .Attr("c: int")
    .Attr("nchw: int = 0")
    .SetShapeFn([](InferenceContext* c) {
      int64_t nchw;
      TF_RETURN_IF_ERROR(c->GetAttr("nchw", &nchw));
      return (nchw & 1) ? ShapeFromAttrs(c, 0, "c", "h", "w")
                        : ShapeFromAttrs(c, 0, "h", "w", "c");
    });

// x (N, H, W, C), dy (N, OH, OW, F) -> dk (KH, KW, C // groups, F); nchw: 1 x is (N, C, H, W),
// 2 dy is (N, F, OH, OW)
REGISTER_OP("FastconvGradKernel")
    .Input("x: float")
    .Input("dy: float")
    .Output("dk: float")
    .FASTCONV_GEOMETRY_ATTRS
    .Attr("kernel_shape: list(int)")
    .Attr("nchw: int = 0")
    .SetShapeFn(KernelShapes);

// x (N, H, W, C), dy (N, OH, OW, F) -> dk (KH, KW, C // groups, F), db (F,): with the bias
// gradient summed from the dy that grad_kernel reads anyway (nchw as FastconvGradKernel's)
REGISTER_OP("FastconvGradKernelBias")
    .Input("x: float")
    .Input("dy: float")
    .Output("dk: float")
    .Output("db: float")
    .FASTCONV_GEOMETRY_ATTRS
    .Attr("kernel_shape: list(int)")
    .Attr("nchw: int = 0")
    .SetShapeFn(KernelShapes);

// Both gradients of an eager channels_last call that one GradientTape watches, as one op: dy
// (N, OH, OW, F), kernel: the kernel as the forward read it (KH * KW * (C // groups) * F floats in
// that order, in any shape), x (N, H, W, C) -> dx (N, H, W, C) (with need_dx, else (0,)), dk
// (dk_shape: the kernel variable's), db (F,) (with bias, else (0,)). Eagerly every op and every
// Python step costs 10-60 us here, right after a kernel has pushed TensorFlow's and Python's code
// out of the caches: the host's two gradients (regrouping the kernel, allocating dx, dk and db,
// converting each result to a tensor) cost ~0.2 ms a training step beyond their kernels, this
// op ~0.05. Only where the kernels compute both gradients on the arrays as they are (not on
// space-to-depth blocks). sizes, packed as FastconvForwardVariables' are: the 8
// FASTCONV_GEOMETRY_ATTRS, the kernel's (KH, KW, C // groups, F), dk's shape (4 sizes), need_dx
// and bias (0 or 1), then grad_input's view as FastconvForwardVariables' (nothing, or 5 sizes:
// a 1x1 convolution's pixels re-cut for the threads).
REGISTER_OP("FastconvGradients")
    .Input("dy: float")
    .Input("kernel: float")
    .Input("x: float")
    .Output("dx: float")
    .Output("dk: float")
    .Output("db: float")
    .Attr("sizes: list(int)")
    .SetShapeFn([](InferenceContext* c) {
      std::vector<int64_t> sizes;
      TF_RETURN_IF_ERROR(c->GetAttr("sizes", &sizes));
      TF_RETURN_IF_ERROR(SizesFit(sizes.size(), 18));
      c->set_output(0, sizes[16] ? c->input(2) : c->Vector(0));
      c->set_output(1, c->MakeShape({sizes[12], sizes[13], sizes[14], sizes[15]}));
      c->set_output(2, c->Vector(sizes[17] ? c->Dim(c->input(0), 3) : c->MakeDim(int64_t{0})));
      return absl::OkStatus();
    });

REGISTER_OP("FastconvBiasGrad")
    .Input("dy: float")
    .Output("db: float")
    .Attr("max_threads: int")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Vector(c->Dim(c->input(0), 3)));
      return absl::OkStatus();
    });

// src (N, A, B) -> dst (N, B, A): NCHW <-> NHWC around the ops for channels_first
REGISTER_OP("FastconvTranspose")
    .Input("src: float")
    .Output("dst: float")
    .Attr("max_threads: int")
    .SetShapeFn([](InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle src;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &src));
      c->set_output(0, c->MakeShape({c->Dim(src, 0), c->Dim(src, 2), c->Dim(src, 1)}));
      return absl::OkStatus();
    });

namespace {

// FastconvForward and FastconvForwardVariables: the attributes both take, and the kernel call.
class ForwardBase : public OpKernel {
 public:
  explicit ForwardBase(OpKernelConstruction* ctx) : OpKernel(ctx), g_(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("oh", &oh_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("ow", &ow_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("f", &f_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("act", &act_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("lo", &lo_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("hi", &hi_));
  }

  // from packed sizes (FastconvForwardVariables', see Sizes) and clip
  ForwardBase(OpKernelConstruction* ctx, const std::vector<int64_t>& sizes,
              const std::vector<float>& clip)
      : OpKernel(ctx), g_(sizes), oh_(sizes[8]), ow_(sizes[9]), f_(sizes[10]), act_(sizes[11]),
        lo_(clip.size() == 2 ? clip[0] : 0), hi_(clip.size() == 2 ? clip[1] : 0) {}

 protected:
  // out (N, oh, ow, f) from x seen as (n, h, w, C) (its own shape, or a re-cut view) and the
  // kernel's floats in (kh, kw, C // groups, f) order; bias and scale (f,) or nullptr
  void Run(OpKernelContext* ctx, const Tensor& x, const int64_t* view, const float* k,
           int64_t kh, int64_t kw, const float* bias, const float* scale) {
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, Output(ctx, 0, TensorShape({x.dim_size(0), oh_, ow_, f_}), &out));
    const int64_t c = x.dim_size(3);
    Call(ctx, [&] { return Kernel(x.flat<float>().data(), view ? view[0] : x.dim_size(0),
                                  view ? view[1] : x.dim_size(1), view ? view[2] : x.dim_size(2),
                                  c, k, kh, kw, out->flat<float>().data(), view ? view[3] : oh_,
                                  view ? view[4] : ow_, bias, scale); });
  }

  // Run on an (N, C, H, W) x, into an (N, F, OH, OW) result: the kernels' channels_first
  // forward; where x's NHWC copy is wanted too (output `x_output` if >= 0), x transposed by the
  // kernels' transpose into it and the forward on that copy, into the NCHW result
  void RunNCHW(OpKernelContext* ctx, const Tensor& x, const float* k, int64_t kh, int64_t kw,
               const float* bias, int x_output = -1) {
    if (x_output < 0) {
      RunLayouts(ctx, x, k, kh, kw, bias, nullptr, 3);
      return;
    }
    const int64_t n = x.dim_size(0), c = x.dim_size(1), h = x.dim_size(2), w = x.dim_size(3);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, Output(ctx, 0, TensorShape({n, f_, oh_, ow_}), &out));
    float* op = out->flat<float>().data();
    Tensor* kept = nullptr;
    OP_REQUIRES_OK(ctx, Output(ctx, x_output, TensorShape({n, h, w, c}), &kept));
    float* xp = kept->flat<float>().data();
    const int threads = fastconv::threads(g_.max_threads);
    Call(ctx, [&] {
      const int r = fastconv::transpose_f32(x.flat<float>().data(), n, c, h * w, xp, threads);
      return r != 0 ? r : Kernel(xp, n, h, w, c, k, kh, kw, op, oh_, ow_, bias, nullptr, 2);
    });
  }

  // out from x, each in the layout ForwardF32's bits `nchw` give it (1: x (N, C, H, W), 2: out
  // (N, F, OH, OW), else NHWC); the kernel's floats in (kh, kw, C // groups, f) order
  void RunLayouts(OpKernelContext* ctx, const Tensor& x, const float* k, int64_t kh, int64_t kw,
                  const float* bias, const float* scale, int nchw) {
    const bool xc = nchw & 1;
    const int64_t n = x.dim_size(0), c = x.dim_size(xc ? 1 : 3), h = x.dim_size(xc ? 2 : 1),
                  w = x.dim_size(xc ? 3 : 2);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, Output(ctx, 0, (nchw & 2) ? TensorShape({n, f_, oh_, ow_})
                                                  : TensorShape({n, oh_, ow_, f_}), &out));
    Call(ctx, [&] { return Kernel(x.flat<float>().data(), n, h, w, c, k, kh, kw,
                                  out->flat<float>().data(), oh_, ow_, bias, scale, nchw); });
  }

  // nchw: ForwardF32's layout bits (1: x (n, c, h, w), 2: out (n, f, oh, ow))
  int Kernel(const float* x, int64_t n, int64_t h, int64_t w, int64_t c, const float* k,
             int64_t kh, int64_t kw, float* out, int64_t oh, int64_t ow, const float* bias,
             const float* scale, int nchw = 0) {
    return fastconv::forward_f32(x, n, h, w, c, k, kh, kw, c / g_.groups, out, oh, ow, f_, g_.sh,
                                 g_.sw, g_.dh, g_.dw, g_.pad_top, g_.pad_left, g_.groups,
                                 fastconv::threads(g_.max_threads), bias, scale,
                                 static_cast<int>(act_), lo_, hi_, nchw);
  }

  Geometry g_;
  int64_t oh_, ow_, f_;
  int64_t act_;
  float lo_, hi_;
};

class Forward : public ForwardBase {
 public:
  explicit Forward(OpKernelConstruction* ctx) : ForwardBase(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("nchw", &nchw_));
    OP_REQUIRES(ctx, nchw_ >= 0 && nchw_ <= 3,
                absl::InvalidArgumentError("fastconv: nchw takes 0 to 3"));
  }

  void Compute(OpKernelContext* ctx) override {
    if (!Ready(ctx, reinterpret_cast<const void*>(fastconv::forward_f32))) return;
    fastconv::calls++;
    const Tensor& x = ctx->input(0);
    const Tensor& k = ctx->input(1);
    const Tensor& bias = ctx->input(2);
    const Tensor& scale = ctx->input(3);
    const float* bp = bias.NumElements() ? bias.flat<float>().data() : nullptr;
    const float* sp = scale.NumElements() ? scale.flat<float>().data() : nullptr;
    if (nchw_ == 0)
      Run(ctx, x, nullptr, k.flat<float>().data(), k.dim_size(0), k.dim_size(1), bp, sp);
    else
      RunLayouts(ctx, x, k.flat<float>().data(), k.dim_size(0), k.dim_size(1), bp, sp,
                 static_cast<int>(nchw_));
  }

 private:
  int64_t nchw_;
};

// Variable `input` of the op, read-locked for as long as this lives.
class LockedVariable {
 public:
  LockedVariable(OpKernelContext* ctx, int input)
      : status_(tensorflow::LookupResource(ctx, tensorflow::HandleFromInput(ctx, input), &var_)) {
    if (status_.ok()) lock_.emplace(*var_->mu());
  }
  const absl::Status& status() const { return status_; }
  const Tensor& tensor() const { return *var_->tensor(); }
  // its value as output `index`, as ReadVariableOp gives it (a variable in copy-on-read mode,
  // after a sparse update, hands out copies)
  void Read(OpKernelContext* ctx, int index) const {
    if (!var_->copy_on_read_mode.load()) {
      ctx->set_output(index, tensor());
      return;
    }
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(index, tensor().shape(), &out));
    std::copy_n(tensor().flat<float>().data(), tensor().NumElements(), out->flat<float>().data());
  }
  // its floats, if it holds `elements` of them (else an error in ctx, and nullptr)
  const float* Floats(OpKernelContext* ctx, int64_t elements) const {
    const Tensor& t = tensor();
    if (t.IsInitialized() && t.dtype() == tensorflow::DT_FLOAT && t.NumElements() == elements)
      return t.flat<float>().data();
    ctx->SetStatus(absl::InvalidArgumentError(absl::StrCat(
        "fastconv: variable ", var_->DebugString(), " does not hold ", elements, " floats")));
    return nullptr;
  }

 private:
  tensorflow::core::RefCountPtr<tensorflow::Var> var_;
  absl::Status status_;
  std::optional<tensorflow::tf_shared_lock> lock_;
};

// the attribute `name` (a list) of an op under construction
template <typename T>
std::vector<T> ListAttr(OpKernelConstruction* ctx, const char* name) {
  std::vector<T> v;
  const absl::Status status = ctx->GetAttr(name, &v);
  if (!status.ok()) ctx->CtxFailure(status);
  return v;
}

// an eager op's packed `sizes`, of length `n` or `n` + 5 (a view); else (eagerly no shape
// function checks them) an error in ctx, and n zeros to construct from
std::vector<int64_t> Sizes(OpKernelConstruction* ctx, size_t n) {
  std::vector<int64_t> v = ListAttr<int64_t>(ctx, "sizes");
  const absl::Status fit = SizesFit(v.size(), n);
  if (fit.ok()) return v;
  ctx->CtxFailure(fit);
  return std::vector<int64_t>(n, 0);
}

class ForwardVariables : public ForwardBase {
 public:
  explicit ForwardVariables(OpKernelConstruction* ctx)
      : ForwardVariables(ctx, Sizes(ctx, 13)) {}

  ForwardVariables(OpKernelConstruction* ctx, const std::vector<int64_t>& sizes)
      : ForwardBase(ctx, sizes, ListAttr<float>(ctx, "clip")),
        view_(sizes.begin() + 13, sizes.end()), nchw_(sizes[12]) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("nx", &nx_));
    OP_REQUIRES(ctx, nx_ == 0 || (nx_ == 1 && nchw_),
                absl::InvalidArgumentError("fastconv: nx = 1 takes nchw"));
    OP_REQUIRES(ctx, view_.empty() || view_.size() == 5,
                absl::InvalidArgumentError("fastconv: view takes 5 sizes"));
  }

  void Compute(OpKernelContext* ctx) override {
    if (!Ready(ctx, reinterpret_cast<const void*>(fastconv::forward_f32))) return;
    fastconv::calls++;
    const Tensor& x = ctx->input(0);
    LockedVariable kernel(ctx, 1);
    OP_REQUIRES_OK(ctx, kernel.status());
    const Tensor& k = kernel.tensor();
    const int64_t kh = k.dims() == 4 ? k.dim_size(0) : 0, kw = k.dims() == 4 ? k.dim_size(1) : 0;
    const float* kp = kernel.Floats(ctx, kh * kw * (x.dim_size(nchw_ ? 1 : 3) / g_.groups) * f_);
    if (kp == nullptr) return;
    std::optional<LockedVariable> bias;
    const float* bp = nullptr;
    if (ctx->num_inputs() > 2) {
      bias.emplace(ctx, 2);
      OP_REQUIRES_OK(ctx, bias->status());
      if ((bp = bias->Floats(ctx, f_)) == nullptr) return;
    }
    // outputs: y, then the kernel's value (nkernel), then x's NHWC copy (nx)
    const int nkernel = ctx->num_outputs() - 1 - static_cast<int>(nx_);
    if (nchw_ && Ready(ctx, reinterpret_cast<const void*>(fastconv::transpose_f32)))
      RunNCHW(ctx, x, kp, kh, kw, bp, nx_ ? 1 + nkernel : -1);
    else if (!nchw_)
      Run(ctx, x, view_.empty() ? nullptr : view_.data(), kp, kh, kw, bp, nullptr);
    if (nkernel && ctx->status().ok()) kernel.Read(ctx, 1);
  }

 private:
  std::vector<int64_t> view_;
  bool nchw_;
  int64_t nx_;
};

class GradInput : public OpKernel {
 public:
  explicit GradInput(OpKernelConstruction* ctx) : OpKernel(ctx), g_(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("h", &h_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("w", &w_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("c", &c_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("nchw", &nchw_));
    OP_REQUIRES(ctx, nchw_ >= 0 && nchw_ <= 3,
                absl::InvalidArgumentError("fastconv: nchw takes 0 to 3"));
  }

  void Compute(OpKernelContext* ctx) override {
    if (!Ready(ctx, reinterpret_cast<const void*>(fastconv::grad_input_f32))) return;
    fastconv::calls++;
    const Tensor& dy = ctx->input(0);
    const Tensor& wt = ctx->input(1);
    const int64_t n = dy.dim_size(0);
    const int oh = nchw_ & 2 ? 2 : 1, of = nchw_ & 2 ? 1 : 3;
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, Output(ctx, 0, (nchw_ & 1) ? TensorShape({n, c_, h_, w_})
                                                   : TensorShape({n, h_, w_, c_}), &dx));
    Call(ctx, [&] { return fastconv::grad_input_f32(
                  dy.flat<float>().data(), dy.dim_size(oh), dy.dim_size(oh + 1),
                  dy.dim_size(of), wt.flat<float>().data(), wt.dim_size(0), wt.dim_size(1),
                  wt.dim_size(2), dx->flat<float>().data(), n, h_, w_, c_, g_.sh, g_.sw,
                  g_.dh, g_.dw, g_.pad_top, g_.pad_left, g_.groups,
                  fastconv::threads(g_.max_threads), static_cast<int>(nchw_)); });
  }

 private:
  Geometry g_;
  int64_t h_, w_, c_;
  int64_t nchw_;
};

// FastconvGradKernel, or with kBias FastconvGradKernelBias
template <bool kBias>
class GradKernel : public OpKernel {
 public:
  explicit GradKernel(OpKernelConstruction* ctx) : OpKernel(ctx), g_(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("kernel_shape", &shape_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("nchw", &nchw_));
    OP_REQUIRES(ctx, nchw_ >= 0 && nchw_ <= 3,
                absl::InvalidArgumentError("fastconv: nchw takes 0 to 3"));
  }

  void Compute(OpKernelContext* ctx) override {
    if (!Ready(ctx, reinterpret_cast<const void*>(fastconv::grad_kernel_f32))) return;
    fastconv::calls++;
    const Tensor& x = ctx->input(0);
    const Tensor& dy = ctx->input(1);
    const int h = nchw_ & 1 ? 2 : 1, c = nchw_ & 1 ? 1 : 3;
    const int oh = nchw_ & 2 ? 2 : 1, of = nchw_ & 2 ? 1 : 3;
    Tensor* dk = nullptr;
    Tensor* db = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape(shape_), &dk));
    if (kBias) OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({shape_[3]}), &db));
    Call(ctx, [&] { return fastconv::grad_kernel_f32(
                  x.flat<float>().data(), x.dim_size(0), x.dim_size(h), x.dim_size(h + 1),
                  x.dim_size(c), dy.flat<float>().data(), dy.dim_size(oh), dy.dim_size(oh + 1),
                  dy.dim_size(of), dk->flat<float>().data(), shape_[0], shape_[1], shape_[2],
                  g_.sh, g_.sw, g_.dh, g_.dw, g_.pad_top, g_.pad_left, g_.groups,
                  fastconv::threads(g_.max_threads), kBias ? db->flat<float>().data() : nullptr,
                  static_cast<int>(nchw_)); });
  }

 private:
  Geometry g_;
  std::vector<int64_t> shape_;
  int64_t nchw_;
};

class Gradients : public OpKernel {
 public:
  explicit Gradients(OpKernelConstruction* ctx)
      : Gradients(ctx, Sizes(ctx, 18)) {}

  Gradients(OpKernelConstruction* ctx, const std::vector<int64_t>& sizes)
      : OpKernel(ctx), g_(sizes), shape_(sizes.begin() + 8, sizes.begin() + 12),
        dk_shape_(sizes.begin() + 12, sizes.begin() + 16), view_(sizes.begin() + 18, sizes.end()),
        need_dx_(sizes[16]), bias_(sizes[17]) {}

  void Compute(OpKernelContext* ctx) override {
    if (!Ready(ctx, reinterpret_cast<const void*>(fastconv::grad_input_f32)) ||
        !Ready(ctx, reinterpret_cast<const void*>(fastconv::grad_kernel_f32)) ||
        !Ready(ctx, reinterpret_cast<const void*>(fastconv::transpose_f32)))
      return;
    fastconv::calls++;
    const Tensor& dy = ctx->input(0);
    const Tensor& k = ctx->input(1);
    const Tensor& x = ctx->input(2);
    // (the bridge passes consistent shapes; these checks keep a wrong call from writing out of
    // bounds)
    OP_REQUIRES(ctx, x.dims() == 4 && dy.dims() == 4,
                absl::InvalidArgumentError("fastconv: x and dy take 4 dimensions"));
    const int64_t kh = shape_[0], kw = shape_[1], cin_g = shape_[2], f = shape_[3];
    const int64_t n = x.dim_size(0), h = x.dim_size(1), w = x.dim_size(2), c = x.dim_size(3);
    const int64_t oh = dy.dim_size(1), ow = dy.dim_size(2), groups = g_.groups;
    OP_REQUIRES(ctx, groups > 0 && f % groups == 0 && k.NumElements() == kh * kw * cin_g * f &&
                         TensorShape(dk_shape_).num_elements() == kh * kw * cin_g * f &&
                         c == groups * cin_g && dy.dim_size(0) == n && dy.dim_size(3) == f,
                absl::InvalidArgumentError("fastconv: x, dy or the kernel do not fit sizes"));
    Tensor* dx = nullptr;
    Tensor* dk = nullptr;
    Tensor* db = nullptr;
    OP_REQUIRES_OK(ctx, need_dx_ ? Output(ctx, 0, x.shape(), &dx)
                                 : ctx->allocate_output(0, TensorShape({0}), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape(dk_shape_), &dk));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({bias_ ? f : 0}), &db));
    // grad_input's kernel: regrouped to (KH, KW, F // groups, C), the transposed convolution's
    // kernel in the same layout (fastconv.backends.numpy.regrouped_kernel); one input and one
    // output a group (depthwise): the same order
    const float* kp = k.flat<float>().data();
    const float* wt = kp;
    Tensor regrouped;
    const int64_t cout_g = f / groups;
    if (need_dx_ && !(cin_g == 1 && cout_g == 1)) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT,
                                             TensorShape({kh, kw, cout_g, c}), &regrouped));
      wt = regrouped.flat<float>().data();
    }
    const int threads = fastconv::threads(g_.max_threads);
    Call(ctx, [&] {
      int r = 0;
      if (need_dx_) {
        float* out = const_cast<float*>(wt);
        if (wt == kp) {
        } else if (groups == 1) {  // each tap's (C, F) transposed, by the kernels
          r = fastconv::transpose_f32(kp, kh * kw, c, f, out, threads);
        } else {
          r = fastconv::regroup_f32(kp, kh * kw, cin_g, f, static_cast<int>(groups), out);
        }
        const bool cut = !view_.empty();
        if (r == 0)
          r = fastconv::grad_input_f32(
              dy.flat<float>().data(), cut ? view_[3] : oh, cut ? view_[4] : ow, f, wt, kh, kw,
              cout_g, dx->flat<float>().data(), cut ? view_[0] : n, cut ? view_[1] : h,
              cut ? view_[2] : w, c, g_.sh, g_.sw, g_.dh, g_.dw, g_.pad_top, g_.pad_left,
              static_cast<int>(groups), threads, 0);
      }
      return r != 0 ? r : fastconv::grad_kernel_f32(
          x.flat<float>().data(), n, h, w, c, dy.flat<float>().data(), oh, ow, f,
          dk->flat<float>().data(), kh, kw, cin_g, g_.sh, g_.sw, g_.dh, g_.dw, g_.pad_top,
          g_.pad_left, static_cast<int>(groups), threads,
          bias_ ? db->flat<float>().data() : nullptr, 0);
    });
  }

 private:
  Geometry g_;
  std::vector<int64_t> shape_, dk_shape_, view_;
  bool need_dx_, bias_;
};

// dy (N, OH, OW, F) -> db (F,): dy summed over all but its channels
class BiasGrad : public OpKernel {
 public:
  explicit BiasGrad(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("max_threads", &max_threads_));
  }

  void Compute(OpKernelContext* ctx) override {
    if (!Ready(ctx, reinterpret_cast<const void*>(fastconv::channel_sums_f32))) return;
    fastconv::calls++;
    const Tensor& dy = ctx->input(0);
    const int64_t f = dy.dim_size(3);
    Tensor* db = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({f}), &db));
    Call(ctx, [&] { return fastconv::channel_sums_f32(dy.flat<float>().data(),
                                         f ? dy.NumElements() / f : 0, f,
                                         db->flat<float>().data(),
                                         fastconv::threads(max_threads_)); });
  }

 private:
  int64_t max_threads_;
};

class Transpose : public OpKernel {
 public:
  explicit Transpose(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("max_threads", &max_threads_));
  }

  void Compute(OpKernelContext* ctx) override {
    if (!Ready(ctx, reinterpret_cast<const void*>(fastconv::transpose_f32))) return;
    const Tensor& src = ctx->input(0);
    Tensor* dst = nullptr;
    OP_REQUIRES_OK(
        ctx, Output(ctx, 0, TensorShape({src.dim_size(0), src.dim_size(2), src.dim_size(1)}), &dst));
    Call(ctx, [&] { return fastconv::transpose_f32(src.flat<float>().data(), src.dim_size(0),
                                      src.dim_size(1), src.dim_size(2), dst->flat<float>().data(),
                                      fastconv::threads(max_threads_)); });
  }

 private:
  int64_t max_threads_;
};

}  // namespace

REGISTER_KERNEL_BUILDER(Name("FastconvForward").Device(tensorflow::DEVICE_CPU), Forward);
REGISTER_KERNEL_BUILDER(Name("FastconvForwardVariables").Device(tensorflow::DEVICE_CPU),
                        ForwardVariables);
REGISTER_KERNEL_BUILDER(Name("FastconvGradInput").Device(tensorflow::DEVICE_CPU), GradInput);
REGISTER_KERNEL_BUILDER(Name("FastconvGradKernel").Device(tensorflow::DEVICE_CPU),
                        GradKernel<false>);
REGISTER_KERNEL_BUILDER(Name("FastconvGradKernelBias").Device(tensorflow::DEVICE_CPU),
                        GradKernel<true>);
REGISTER_KERNEL_BUILDER(Name("FastconvGradients").Device(tensorflow::DEVICE_CPU), Gradients);
REGISTER_KERNEL_BUILDER(Name("FastconvBiasGrad").Device(tensorflow::DEVICE_CPU), BiasGrad);
REGISTER_KERNEL_BUILDER(Name("FastconvTranspose").Device(tensorflow::DEVICE_CPU), Transpose);

static PyMethodDef methods[] = {
    FASTCONV_KERNEL_API_METHODS,
    {"set_output_cache", SetOutputCache, METH_O,
     "set_output_cache(limit): the most bytes of freed large outputs kept for reuse"},
    {"output_cache", OutputCache, METH_NOARGS,
     "output_cache() -> (bytes kept unused, limit, outputs served from kept buffers)"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tf_ops", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__tf_ops(void) { return PyModule_Create(&module); }
