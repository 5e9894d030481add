// Host build of rank1_common.h, for the tests on machines without a GPU.
//
// Runs the very per-thread bodies the CUDA kernels run (merge_thread, epilogue_thread,
// colsum_accumulate + the fixed-order combines, rowdot_lane + the warp's butterfly sum) over CPU
// tensors, thread by simulated thread, with the launchers' planning and vectorisation rules.
// Build with -ffp-contract=off (see rank1_common.h). Not part of the installed package.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 with at::Tensor casters (lighter than extension.h)

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "rank1_common.h"

namespace xgblora_fast {
namespace {

using at::Tensor;

template <typename F>
void dispatch(const Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK_TYPE(false, "host_test: unsupported dtype ", t.scalar_type());
  }
}

at::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "float16") return at::kHalf;
  if (name == "bfloat16") return at::kBFloat16;
  TORCH_CHECK(false, "host_test: unknown dtype ", name);
}

void check_cpu(const Tensor& t) { TORCH_CHECK(t.device().is_cpu(), "host_test: CPU tensors only"); }

Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

// ---- elementwise primitives -------------------------------------------------------------

Tensor counter_hash_t(int64_t seed, const Tensor& idx) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, "idx must be int64");
  const Tensor in = idx.contiguous();
  Tensor out = at::empty_like(in);
  const int64_t* src = in.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  for (int64_t k = 0; k < in.numel(); ++k) {
    dst[k] = counter_hash(static_cast<uint32_t>(seed), src[k]);
  }
  return out;
}

// counter_hash_run<8> from each idx0: [len(idx0), 8] bits.
Tensor counter_hash_run8(int64_t seed, const Tensor& idx0) {
  TORCH_CHECK(idx0.scalar_type() == at::kLong && idx0.dim() == 1, "idx0 must be int64 [n]");
  const Tensor in = idx0.contiguous();
  Tensor out = at::empty({in.numel(), 8}, in.options());
  for (int64_t k = 0; k < in.numel(); ++k) {
    uint32_t bits[8];
    counter_hash_run<8>(seed_key(static_cast<uint32_t>(seed)), in.data_ptr<int64_t>()[k], bits);
    for (int v = 0; v < 8; ++v) out.data_ptr<int64_t>()[8 * k + v] = bits[v];
  }
  return out;
}

Tensor round_t(const Tensor& value, const std::optional<Tensor>& bits, const std::string& dtype) {
  TORCH_CHECK(value.scalar_type() == at::kFloat, "value must be fp32");
  const Tensor v = value.contiguous();
  const Tensor r = bits.has_value() ? bits->contiguous() : Tensor();
  Tensor out = at::empty(v.sizes(), v.options().dtype(parse_dtype(dtype)));
  dispatch(out, [&](auto tag) {
    using T = decltype(tag);
    const float* src = v.data_ptr<float>();
    T* dst = out.data_ptr<T>();
    for (int64_t k = 0; k < v.numel(); ++k) {
      dst[k] = r.defined()
                   ? round_stochastic<T>(src[k], static_cast<uint32_t>(r.data_ptr<int64_t>()[k]))
                   : round_nearest<T>(src[k]);
    }
  });
  return out;
}

// ---- kernel bodies ------------------------------------------------------------------------

// In-place merge through merge_thread, with launch_merge's choice of mode (fp32 weights never
// round stochastically); compensation is the Kahan buffer. Returns whether the 16-byte path ran.
bool merge_(Tensor weight, const Tensor& a, const Tensor& b, double scale,
            const std::string& rounding, int64_t seed, const std::optional<Tensor>& compensation,
            int64_t nthreads, bool allow_vec, int64_t row_offset) {
  check_cpu(weight);
  TORCH_CHECK(weight.dim() == 2 && a.numel() == weight.size(1) && b.numel() == weight.size(0));
  const bool kahan = rounding == "kahan";
  TORCH_CHECK(kahan == compensation.has_value(), "host_test: compensation iff rounding=kahan");
  TORCH_CHECK(kahan || rounding == "nearest" || rounding == "stochastic", "bad rounding");
  if (weight.numel() == 0) return false;
  const Tensor a32 = f32(a), b32 = f32(b);
  bool vectorized = false;
  dispatch(weight, [&](auto tag) {
    using T = decltype(tag);
    T* c = kahan ? compensation->data_ptr<T>() : nullptr;
    const auto p = plan_merge(weight.data_ptr<T>(), weight.size(0), weight.size(1),
                              weight.stride(0), weight.stride(1), c,
                              kahan ? compensation->stride(0) : 0,
                              kahan ? compensation->stride(1) : 0, a32.data_ptr<float>(),
                              b32.data_ptr<float>(), static_cast<float>(scale),
                              static_cast<uint32_t>(seed), row_offset);
    vectorized = allow_vec && merge_vectorizable(p);
    auto run = [&](auto vec_tag, auto mode_tag) {
      for (int64_t tid = 0; tid < nthreads; ++tid) {
        merge_thread<T, decltype(vec_tag)::value, decltype(mode_tag)::value>(p, tid, nthreads);
      }
    };
    auto with_mode = [&](auto vec_tag) {
      using M = MergeMode;
      if (kahan) {
        run(vec_tag, std::integral_constant<M, M::kKahan>{});
      } else if (rounding == "stochastic" && !std::is_same_v<T, float>) {
        run(vec_tag, std::integral_constant<M, M::kStochastic>{});
      } else {
        run(vec_tag, std::integral_constant<M, M::kNearest>{});
      }
    };
    if (vectorized) {
      with_mode(std::integral_constant<int, kVec16<T>>{});
    } else {
      with_mode(std::integral_constant<int, 1>{});
    }
  });
  return vectorized;
}

// y = round(accumulate ? y + (s u) b^T + bias : (s u) b^T) through epilogue_thread.
bool rank1_epilogue_(Tensor y, const Tensor& u, const Tensor& b, const std::optional<Tensor>& bias,
                     double scale, bool accumulate, int64_t nthreads, bool allow_vec) {
  check_cpu(y);
  TORCH_CHECK(y.dim() == 2 && (y.size(1) <= 1 || y.stride(1) == 1), "y: [R, C], unit col stride");
  const Tensor u32 = f32(u), b32 = f32(b);
  const Tensor bias32 = bias.has_value() ? f32(*bias) : Tensor();
  bool vectorized = false;
  dispatch(y, [&](auto tag) {
    using T = decltype(tag);
    const EpilogueParams<T> p{y.data_ptr<T>(),
                              y.size(0),
                              y.size(1),
                              y.stride(0),
                              u32.data_ptr<float>(),
                              b32.data_ptr<float>(),
                              bias32.defined() ? bias32.data_ptr<float>() : nullptr,
                              static_cast<float>(scale),
                              accumulate};
    vectorized = allow_vec && epilogue_vectorizable(p);
    for (int64_t tid = 0; tid < nthreads; ++tid) {
      if (vectorized) {
        epilogue_thread<T, kVec16<T>>(p, tid, nthreads);
      } else {
        epilogue_thread<T, 1>(p, tid, nthreads);
      }
    }
  });
  return vectorized;
}

// The two-stage column reduction exactly as colsum_kernel + colsum_finalize_kernel compute it.
template <typename T, int VEC, bool WITH_CSUM>
void colsum_blocks(const ColsumParams<T>& p, int64_t splits) {
  float lanes_w[COLSUM_ROW_LANES][VEC];
  float lanes_c[COLSUM_ROW_LANES][VEC];
  for (int64_t split = 0; split < splits; ++split) {
    const int64_t begin = split * p.rows_per_split;
    const int64_t end = std::min(begin + p.rows_per_split, p.rows);
    for (int64_t c0 = 0; c0 < p.cols; c0 += VEC) {
      for (int ty = 0; ty < COLSUM_ROW_LANES; ++ty) {
        float accw[VEC] = {};
        float accc[VEC] = {};
        colsum_accumulate<T, VEC, WITH_CSUM>(p, c0, begin + ty, end, COLSUM_ROW_LANES, accw,
                                             accc);
        for (int v = 0; v < VEC; ++v) {
          lanes_w[ty][v] = accw[v];
          lanes_c[ty][v] = accc[v];
        }
      }
      for (int v = 0; v < VEC; ++v) {
        p.wpart[split * p.cols + c0 + v] = sum_in_order(&lanes_w[0][v], COLSUM_ROW_LANES, VEC);
        if (WITH_CSUM) {
          p.cpart[split * p.cols + c0 + v] = sum_in_order(&lanes_c[0][v], COLSUM_ROW_LANES, VEC);
        }
      }
    }
  }
}

std::tuple<Tensor, std::optional<Tensor>, bool> colsum(const Tensor& x, const Tensor& w,
                                                       double scale, bool with_csum,
                                                       int64_t splits, bool allow_vec) {
  check_cpu(x);
  TORCH_CHECK(x.dim() == 2 && w.numel() == x.size(0) && splits >= 1);
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t rows_per_split = std::max<int64_t>(1, ceil_div(N, splits));
  splits = std::max<int64_t>(1, ceil_div(N, rows_per_split));
  const Tensor w32 = f32(w);
  Tensor wpart = at::zeros({splits, C}, x.options().dtype(at::kFloat));
  Tensor cpart = at::zeros({splits, C}, x.options().dtype(at::kFloat));
  bool vectorized = false;
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    const ColsumParams<T> p{x.data_ptr<T>(),      N,
                            C,                    x.stride(0),
                            x.stride(1),          w32.data_ptr<float>(),
                            wpart.data_ptr<float>(), with_csum ? cpart.data_ptr<float>() : nullptr,
                            rows_per_split};
    vectorized = allow_vec && colsum_vectorizable(p);
    auto run = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      if (with_csum) {
        colsum_blocks<T, V, true>(p, splits);
      } else {
        colsum_blocks<T, V, false>(p, splits);
      }
    };
    if (vectorized) {
      run(std::integral_constant<int, kVec16<T>>{});
    } else {
      run(std::integral_constant<int, 1>{});
    }
  });
  auto finalize = [&](const Tensor& part, float s) {
    Tensor out = at::empty({C}, part.options());
    for (int64_t c = 0; c < C; ++c) {
      out.data_ptr<float>()[c] = colsum_finalize(part.data_ptr<float>(), splits, C, c, s);
    }
    return out;
  };
  Tensor wsum = finalize(wpart, static_cast<float>(scale));
  std::optional<Tensor> csum;
  if (with_csum) csum = finalize(cpart, 1.0f);
  return {wsum, csum, vectorized};
}

// Row dots as rowdot_kernel: 32 lane partials, then the xor-butterfly of __shfl_xor_sync.
std::tuple<Tensor, bool> rowdot(const Tensor& x, const Tensor& a, bool allow_vec) {
  check_cpu(x);
  TORCH_CHECK(x.dim() == 2 && a.numel() == x.size(1));
  const Tensor a32 = f32(a);
  Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  bool vectorized = false;
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    const RowdotParams<T> p{x.data_ptr<T>(), x.size(0),          x.size(1),
                            x.stride(0),     x.stride(1),        a32.data_ptr<float>(),
                            out.data_ptr<float>()};
    vectorized = allow_vec && rowdot_vectorizable(p);
    for (int64_t n = 0; n < p.rows; ++n) {
      float lane[ROWDOT_LANES];
      for (int l = 0; l < ROWDOT_LANES; ++l) {
        lane[l] = vectorized ? rowdot_lane<T, kVec16<T>>(p, n, l) : rowdot_lane<T, 1>(p, n, l);
      }
      for (int offset = ROWDOT_LANES / 2; offset > 0; offset >>= 1) {
        float next[ROWDOT_LANES];
        for (int l = 0; l < ROWDOT_LANES; ++l) next[l] = add_rn(lane[l], lane[l ^ offset]);
        std::copy(next, next + ROWDOT_LANES, lane);
      }
      p.out[n] = lane[0];
    }
  });
  return {out, vectorized};
}

// (row, col) after each step of FlatIndex: the grid-stride index math, for int64 sizes that
// cannot be allocated here.
Tensor flat_index_walk(int64_t start, int64_t step, int64_t ncols, int64_t count) {
  Tensor out = at::empty({count, 2}, at::kLong);
  FlatIndex it(start, step, ncols);
  for (int64_t k = 0; k < count; ++k, it.next()) {
    out.data_ptr<int64_t>()[2 * k] = it.row;
    out.data_ptr<int64_t>()[2 * k + 1] = it.col;
  }
  return out;
}

}  // namespace
}  // namespace xgblora_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace x = xgblora_fast;
  namespace py = pybind11;
  m.doc() = "Host build of csrc/rank1_common.h (tests only)";
  m.def("counter_hash", &x::counter_hash_t, "uint32 bits (as int64) of (seed, int64 idx)");
  m.def("counter_hash_run8", &x::counter_hash_run8, "[n, 8] bits of the runs idx0 .. idx0 + 7");
  m.def("round", &x::round_t, "fp32 -> dtype: stochastic with bits, else nearest-even",
        py::arg("value"), py::arg("bits"), py::arg("dtype"));
  m.def("merge_", &x::merge_, "in-place W += s b a^T through merge_thread; returns vectorized",
        py::arg("weight"), py::arg("a"), py::arg("b"), py::arg("scale"), py::arg("rounding"),
        py::arg("seed"), py::arg("compensation") = py::none(), py::arg("nthreads") = 97,
        py::arg("allow_vec") = true, py::arg("row_offset") = 0);
  m.def("rank1_epilogue_", &x::rank1_epilogue_,
        "y (+)= s u b^T (+ bias) through epilogue_thread; returns vectorized", py::arg("y"),
        py::arg("u"), py::arg("b"), py::arg("bias"), py::arg("scale"), py::arg("accumulate"),
        py::arg("nthreads") = 97, py::arg("allow_vec") = true);
  m.def("colsum", &x::colsum, "(s x^T w, x^T 1 or None, vectorized), two-stage reduction",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("with_csum"), py::arg("splits"),
        py::arg("allow_vec") = true);
  m.def("rowdot", &x::rowdot, "(x a, vectorized) through rowdot_lane + butterfly", py::arg("x"),
        py::arg("a"), py::arg("allow_vec") = true);
  m.def("flat_index_walk", &x::flat_index_walk, "[count, 2] (row, col) of a FlatIndex walk");
}
