// ATen side of the CUDA C++ fallback: argument checks, cuBLAS GEMMs through ATen, the launches
// of the kernels in xgblora_fast_cuda.cu, and the registration of the ops.
//
// Ops (TORCH_LIBRARY_FRAGMENT: the Python package defines other ops in the same namespace):
//   torch.ops.xgblora_fast.cuda_rank1_linear_fwd(x, weight, bias, a, b, scale, x_adapter)
//       -> (y, u)
//   torch.ops.xgblora_fast.cuda_rank1_linear_bwd(dy, x, weight, a, b, u, scale, x_adapter,
//       need_dx, need_dab, need_dbias) -> (dx, da, db, dbias, dx_adapter)   (None: not needed)
//   torch.ops.xgblora_fast.cuda_merge_(weight, a, b, scale, rounding, seed, compensation,
//                                      row_offset=0) -> ()
//       (rounding "nearest", "stochastic" or "kahan"; compensation: the Kahan buffer or None)
// Their CUDA kernels are registered for the CUDA dispatch key; the CPU key gets a kernel that
// raises a clear error (use backend="torch" for CPU tensors).
//
// Only the headers needed: per-op ATen headers and the raw CPython module API (the ops need no
// Python bindings: importing the library registers them), which keeps this file's compile time
// a fraction of what <torch/extension.h> costs.
#include <Python.h>  // first, as Python requires

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "launchers.h"

namespace xgblora_fast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Dtype kernel_dtype(const char* op, const char* name, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return Dtype::kFloat32;
    case at::kHalf:
      return Dtype::kFloat16;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " has dtype ", t.scalar_type(),
                       "; supported: float32, float16, bfloat16");
  }
}

// Every tensor on one CUDA device (the error names the first offender).
void check_cuda(const char* op, std::initializer_list<std::pair<const char*, const Tensor*>> ts) {
  const Tensor* first = nullptr;
  for (const auto& [name, t] : ts) {
    if (t == nullptr || !t->defined()) continue;
    TORCH_CHECK(t->is_cuda(), op, ": the CUDA C++ backend needs CUDA tensors, got ", name,
                " on ", t->device(), " (use backend=\"torch\" for CPU tensors)");
    if (first == nullptr) {
      first = t;
    } else {
      TORCH_CHECK(t->device() == first->device(), op, ": all tensors must be on one device, got ",
                  name, " on ", t->device(), " and others on ", first->device());
    }
  }
}

void check_vector(const char* op, const char* name, const Tensor& t, int64_t n) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must be a vector of length ", n,
              ", got shape ", t.sizes());
  kernel_dtype(op, name, t);
}

void check_matrix(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  kernel_dtype(op, name, t);
}

// Small fp32 contiguous copy of an adapter vector (no copy when it already is one).
Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

cudaStream_t stream_of() { return c10::cuda::getCurrentCUDAStream().stream(); }

Tensor rowdot(const Tensor& x, const Tensor& a32) {
  Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  launch_rowdot(kernel_dtype("rowdot", "x", x), x.data_ptr(), x.size(0), x.size(1), x.stride(0),
                x.stride(1), a32.data_ptr<float>(), out.data_ptr<float>(), stream_of());
  return out;
}

void rank1_epilogue_(Tensor& y, const Tensor& u, const Tensor& b32, const Tensor& bias32,
                     double scale, bool accumulate) {
  TORCH_INTERNAL_ASSERT(y.dim() == 2 && (y.size(1) <= 1 || y.stride(1) == 1));
  launch_rank1_epilogue(kernel_dtype("rank1_epilogue", "y", y), y.data_ptr(), y.size(0),
                        y.size(1), y.stride(0), u.data_ptr<float>(), b32.data_ptr<float>(),
                        bias32.defined() ? bias32.data_ptr<float>() : nullptr,
                        static_cast<float>(scale), accumulate, stream_of());
}

// (scale * x^T w, x^T 1 if with_csum): [C] fp32 each, deterministic two-stage reduction.
std::tuple<Tensor, Tensor> colsum(const Tensor& x, const Tensor& w, double scale, bool with_csum) {
  const int64_t N = x.size(0), C = x.size(1);
  const ColsumPlan plan = plan_colsum(N, C);
  const auto f32opts = x.options().dtype(at::kFloat);
  Tensor wpart = at::empty({plan.splits, C}, f32opts);
  Tensor cpart = with_csum ? at::empty({plan.splits, C}, f32opts) : Tensor();
  launch_colsum(kernel_dtype("colsum", "x", x), x.data_ptr(), N, C, x.stride(0), x.stride(1),
                w.data_ptr<float>(), wpart.data_ptr<float>(),
                with_csum ? cpart.data_ptr<float>() : nullptr, plan, stream_of());
  Tensor wsum = at::empty({C}, f32opts);
  launch_colsum_finalize(wpart.data_ptr<float>(), plan.splits, C, static_cast<float>(scale),
                         wsum.data_ptr<float>(), stream_of());
  Tensor csum;
  if (with_csum) {
    csum = at::empty({C}, f32opts);
    launch_colsum_finalize(cpart.data_ptr<float>(), plan.splits, C, 1.0f, csum.data_ptr<float>(),
                           stream_of());
  }
  return {wsum, csum};
}

void check_linear(const char* op, const Tensor& x, const Tensor& weight, const Tensor& a,
                  const Tensor& b) {
  check_matrix(op, "x", x);
  check_matrix(op, "weight", weight);
  TORCH_CHECK_TYPE(x.scalar_type() == weight.scalar_type(), op, ": x has dtype ",
                   x.scalar_type(), " but weight has ", weight.scalar_type(), "; they must match");
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": x has ", x.size(1),
              " features but weight expects in_features=", weight.size(1));
  check_vector(op, "a", a, weight.size(1));
  check_vector(op, "b", b, weight.size(0));
}

// ---- ops ----------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> rank1_linear_fwd_cuda(const Tensor& x, const Tensor& weight,
                                                 const OptTensor& bias, const Tensor& a,
                                                 const Tensor& b, double scale,
                                                 const OptTensor& x_adapter) {
  constexpr const char* op = "xgblora_fast::cuda_rank1_linear_fwd";
  const Tensor* bias_p = bias.has_value() ? &*bias : nullptr;
  const Tensor* xa_p = x_adapter.has_value() ? &*x_adapter : nullptr;
  check_cuda(op, {{"x", &x}, {"weight", &weight}, {"bias", bias_p}, {"a", &a}, {"b", &b},
                  {"x_adapter", xa_p}});
  check_linear(op, x, weight, a, b);
  if (bias_p) check_vector(op, "bias", *bias_p, weight.size(0));
  if (xa_p) {
    TORCH_CHECK(xa_p->sizes() == x.sizes() && xa_p->scalar_type() == x.scalar_type(), op,
                ": x_adapter must have x's shape and dtype");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor a32 = f32(a), b32 = f32(b);
  const Tensor bias32 = bias_p ? f32(*bias_p) : Tensor();
  // u = x_adapter . a (fp32 row dots), y = x W^T (cuBLAS), then y += s u b^T + bias in place:
  // one rounding to y's dtype after the GEMM's.
  Tensor u = rowdot(xa_p ? *xa_p : x, a32);
  Tensor y = at::mm(x, weight.t());
  rank1_epilogue_(y, u, b32, bias32, scale, /*accumulate=*/true);
  return {y, u};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rank1_linear_bwd_cuda(
    const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& a, const Tensor& b,
    const Tensor& u, double scale, const OptTensor& x_adapter, bool need_dx, bool need_dab,
    bool need_dbias) {
  constexpr const char* op = "xgblora_fast::cuda_rank1_linear_bwd";
  const Tensor* xa_p = x_adapter.has_value() ? &*x_adapter : nullptr;
  check_cuda(op, {{"dy", &dy}, {"x", &x}, {"weight", &weight}, {"a", &a}, {"b", &b}, {"u", &u},
                  {"x_adapter", xa_p}});
  check_linear(op, x, weight, a, b);
  check_matrix(op, "dy", dy);
  TORCH_CHECK(dy.size(0) == x.size(0) && dy.size(1) == weight.size(0), op, ": dy must be [",
              x.size(0), ", ", weight.size(0), "], got ", dy.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), op, ": dy has dtype ", dy.scalar_type(),
                   " but x has ", x.scalar_type());
  TORCH_CHECK(u.dim() == 1 && u.size(0) == x.size(0) && u.scalar_type() == at::kFloat, op,
              ": u must be an fp32 vector of length ", x.size(0));
  if (xa_p) {
    TORCH_CHECK(xa_p->sizes() == x.sizes() && xa_p->scalar_type() == x.scalar_type(), op,
                ": x_adapter must have x's shape and dtype");
  }
  const c10::cuda::CUDAGuard guard(dy.device());
  Tensor dx, da, db, dbias, dx_adapter;
  if (need_dx || need_dab) {
    const Tensor a32 = f32(a), b32 = f32(b);
    const Tensor v = rowdot(dy, b32);  // v = dy . b
    if (need_dx) {
      dx = at::mm(dy, weight);  // cuBLAS
      if (xa_p == nullptr) {
        rank1_epilogue_(dx, v, a32, Tensor(), scale, /*accumulate=*/true);
      } else {
        dx_adapter = at::empty_like(dx);
        rank1_epilogue_(dx_adapter, v, a32, Tensor(), scale, /*accumulate=*/false);
      }
    }
    if (need_dab) {
      const Tensor u32 = u.contiguous();
      std::tie(da, std::ignore) = colsum(xa_p ? *xa_p : x, v, scale, /*with_csum=*/false);
      std::tie(db, dbias) = colsum(dy, u32, scale, /*with_csum=*/need_dbias);
    }
  }
  if (need_dbias && !dbias.defined()) dbias = at::sum(dy, {0}, false, at::kFloat);
  return {dx, da, db, dbias, dx_adapter};
}

// The launch_merge code of a rounding name (launchers.h).
int merge_rounding(const char* op, c10::string_view rounding) {
  if (rounding == "nearest") return 0;
  if (rounding == "stochastic") return 1;
  if (rounding == "kahan") return 2;
  TORCH_CHECK(false, op, ": rounding must be \"nearest\", \"stochastic\" or \"kahan\", got \"",
              std::string(rounding), "\"");
}

void rank1_merge_cuda_(Tensor weight, const Tensor& a, const Tensor& b, double scale,
                       c10::string_view rounding, int64_t seed, const OptTensor& compensation,
                       int64_t row_offset) {
  constexpr const char* op = "xgblora_fast::cuda_merge_";
  const int mode = merge_rounding(op, rounding);
  const bool kahan = rounding == "kahan";
  const Tensor* comp = compensation.has_value() ? &*compensation : nullptr;
  check_cuda(op, {{"weight", &weight}, {"a", &a}, {"b", &b}, {"compensation", comp}});
  check_matrix(op, "weight", weight);
  check_vector(op, "a", a, weight.size(1));
  check_vector(op, "b", b, weight.size(0));
  TORCH_CHECK(seed >= 0 && seed <= int64_t{0xFFFFFFFF}, op, ": seed must be in [0, 2^32), got ",
              seed);
  TORCH_CHECK(row_offset >= 0, op, ": row_offset must be >= 0, got ", row_offset);
  TORCH_CHECK(at::has_internal_overlap(weight) != at::MemOverlap::Yes, op,
              ": weight has overlapping memory (an expanded view); merge into a real tensor");
  TORCH_CHECK(kahan == (comp != nullptr), op,
              ": a compensation buffer is needed by, and only by, rounding=\"kahan\"");
  if (comp != nullptr) {
    TORCH_CHECK(comp->sizes() == weight.sizes() && comp->scalar_type() == weight.scalar_type(),
                op, ": compensation must have weight's shape and dtype");
    TORCH_CHECK(at::has_internal_overlap(*comp) != at::MemOverlap::Yes, op,
                ": compensation has overlapping memory (an expanded view)");
  }
  if (weight.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(weight.device());
  const Tensor a32 = f32(a), b32 = f32(b);
  launch_merge(kernel_dtype(op, "weight", weight), weight.data_ptr(), weight.size(0),
               weight.size(1), weight.stride(0), weight.stride(1), a32.data_ptr<float>(),
               b32.data_ptr<float>(), static_cast<float>(scale), mode,
               static_cast<uint32_t>(seed), comp ? comp->data_ptr() : nullptr,
               comp ? comp->stride(0) : 0, comp ? comp->stride(1) : 0, row_offset, stream_of());
}

// ---- CPU: a clear error instead of "could not run ... with arguments from the CPU backend" --

[[noreturn]] void cpu_error(const char* op) {
  TORCH_CHECK(false, op, ": the CUDA C++ backend needs CUDA tensors, got CPU tensors (use ",
              "backend=\"torch\" for CPU tensors, or move the tensors to a GPU)");
}

std::tuple<Tensor, Tensor> rank1_linear_fwd_cpu(const Tensor&, const Tensor&, const OptTensor&,
                                                const Tensor&, const Tensor&, double,
                                                const OptTensor&) {
  cpu_error("xgblora_fast::cuda_rank1_linear_fwd");
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rank1_linear_bwd_cpu(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    double, const OptTensor&, bool, bool, bool) {
  cpu_error("xgblora_fast::cuda_rank1_linear_bwd");
}

void rank1_merge_cpu_(Tensor, const Tensor&, const Tensor&, double, c10::string_view, int64_t,
                      const OptTensor&, int64_t) {
  cpu_error("xgblora_fast::cuda_merge_");
}

}  // namespace
}  // namespace xgblora_fast

TORCH_LIBRARY_FRAGMENT(xgblora_fast, m) {
  m.def(
      "cuda_rank1_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor b, "
      "float scale, Tensor? x_adapter) -> (Tensor, Tensor)");
  m.def(
      "cuda_rank1_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor a, Tensor b, Tensor u, "
      "float scale, Tensor? x_adapter, bool need_dx, bool need_dab, bool need_dbias) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cuda_merge_(Tensor(a!) weight, Tensor a, Tensor b, float scale, str rounding, int seed, "
      "Tensor(b!)? compensation, int row_offset=0) -> ()");
}

TORCH_LIBRARY_IMPL(xgblora_fast, CUDA, m) {
  m.impl("cuda_rank1_linear_fwd", &xgblora_fast::rank1_linear_fwd_cuda);
  m.impl("cuda_rank1_linear_bwd", &xgblora_fast::rank1_linear_bwd_cuda);
  m.impl("cuda_merge_", &xgblora_fast::rank1_merge_cuda_);
}

TORCH_LIBRARY_IMPL(xgblora_fast, CPU, m) {
  m.impl("cuda_rank1_linear_fwd", &xgblora_fast::rank1_linear_fwd_cpu);
  m.impl("cuda_rank1_linear_bwd", &xgblora_fast::rank1_linear_bwd_cpu);
  m.impl("cuda_merge_", &xgblora_fast::rank1_merge_cpu_);
}

// The Python module: a name to import (which loads the library and so registers the ops) and
// the tuple OPS of the op names.
#define XGB_STR_(x) #x
#define XGB_STR(x) XGB_STR_(x)
#define XGB_CAT_(a, b) a##b
#define XGB_CAT(a, b) XGB_CAT_(a, b)

namespace {
PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    XGB_STR(TORCH_EXTENSION_NAME),
    "xgblora_fast CUDA C++ fallback: importing it registers torch.ops.xgblora_fast.cuda_* "
    "(CUDA kernels; CPU tensors raise a clear error).",
    -1,
    nullptr,
};
}  // namespace

PyMODINIT_FUNC XGB_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  PyObject* ops =
      Py_BuildValue("(sss)", "cuda_rank1_linear_fwd", "cuda_rank1_linear_bwd", "cuda_merge_");
  if (ops == nullptr || PyModule_AddObject(module, "OPS", ops) < 0) {
    Py_XDECREF(ops);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
