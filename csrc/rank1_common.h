// Arithmetic shared by the CUDA kernels and their host build: one definition, two compilers.
//
// Everything whose bits must agree between the GPU, the host test build, the Triton kernels and
// the PyTorch reference lives here as __host__ __device__ code: the counter-based random bits,
// the rounding rules of the merge, the index math of the grid-stride loops, and the per-thread
// bodies of the kernels (the merge, the rank-1 epilogue, the column reductions, the row dot).
// The .cu file wraps those bodies in kernels; csrc/host_test.cpp runs the very same bodies over
// CPU tensors, thread by simulated thread, so the tests on a GPU-less machine check this code.
//
// Floating-point rules (see xgblora_fast/kernels/rng.py and ops/reference.py):
//  * the merge computes v = w + (s * b_i) * a_j with the multiply and the add rounded
//    separately: mul_rn/add_rn are __fmul_rn/__fadd_rn on the device (never contracted into an
//    FMA) and plain operators on the host, which must be compiled with -ffp-contract=off; the
//    Kahan merge's compensation arithmetic follows the same rule;
//  * accumulations (row dots, column sums, the epilogue) use an explicit fmaf, which is
//    correctly rounded on both sides;
//  * no flush-to-zero: subnormals are kept (do not build with --use_fast_math).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define XGB_HD __host__ __device__ __forceinline__
#else
#define XGB_HD inline
#endif

namespace xgblora_fast {

// ------------------------------------------------------------------------------------------
// Exact fp32 arithmetic and bit casts
// ------------------------------------------------------------------------------------------

XGB_HD float mul_rn(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(x, y);
#else
  return x * y;
#endif
}

XGB_HD float add_rn(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(x, y);
#else
  return x + y;
#endif
}

XGB_HD float sub_rn(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(x, y);
#else
  return x - y;
#endif
}

XGB_HD float fma_rn(float x, float y, float z) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(x, y, z);
#else
  return std::fma(x, y, z);
#endif
}

XGB_HD float abs_f(float x) {
#if defined(__CUDA_ARCH__)
  return fabsf(x);
#else
  return std::fabs(x);
#endif
}

XGB_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

XGB_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// ------------------------------------------------------------------------------------------
// Counter-based random bits (twin of kernels/rng.py and reference.counter_hash)
// ------------------------------------------------------------------------------------------

// Chris Wellons' lowbias32: a bijection on 32-bit words (uint32 arithmetic wraps).
XGB_HD uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

// The per-seed key, hoisted out of the element loop: counter_hash = counter_hash_keyed(key, idx).
XGB_HD uint32_t seed_key(uint32_t seed) { return lowbias32(seed); }

// Bits for the int64 logical element index idx = i * K + j: lowbias32(lo ^ lowbias32(key + hi)).
XGB_HD uint32_t counter_hash_keyed(uint32_t key, int64_t idx) {
  const uint64_t u = static_cast<uint64_t>(idx);
  const uint32_t lo = static_cast<uint32_t>(u);
  const uint32_t hi = static_cast<uint32_t>(u >> 32);
  return lowbias32(lo ^ lowbias32(key + hi));
}

XGB_HD uint32_t counter_hash(uint32_t seed, int64_t idx) {
  return counter_hash_keyed(seed_key(seed), idx);
}

// counter_hash_keyed for the N consecutive indices idx0 .. idx0 + N - 1: while the high word
// stays the same, lowbias32(key + hi) is computed once for the run instead of once per element.
template <int N>
XGB_HD void counter_hash_run(uint32_t key, int64_t idx0, uint32_t (&bits)[N]) {
  const uint64_t u = static_cast<uint64_t>(idx0);
  const uint32_t lo = static_cast<uint32_t>(u);
  if (lo <= 0xFFFFFFFFu - static_cast<uint32_t>(N - 1)) {
    const uint32_t mixed = lowbias32(key + static_cast<uint32_t>(u >> 32));
#pragma unroll
    for (int v = 0; v < N; ++v) bits[v] = lowbias32((lo + static_cast<uint32_t>(v)) ^ mixed);
  } else {  // the run crosses a multiple of 2^32
#pragma unroll
    for (int v = 0; v < N; ++v) bits[v] = counter_hash_keyed(key, idx0 + v);
  }
}

// ------------------------------------------------------------------------------------------
// Rounding fp32 -> weight dtype (twin of kernels/rng.py round_*)
// ------------------------------------------------------------------------------------------

template <typename T>
struct Rounding;

template <>
struct Rounding<float> {
  XGB_HD static float nearest(float v) { return v; }
  // An fp32 result needs no stochastic rounding: the merge is a plain fp32 add then.
  XGB_HD static float stochastic(float v, uint32_t /*bits*/) { return v; }
};

// The 16-bit formats share the stochastic rule; they differ in the two primitives below.
template <typename T, typename Derived>
struct Rounding16 {
  XGB_HD static T from_bits(uint16_t bits) { return T(bits, T::from_bits()); }

  XGB_HD static T nearest(float v) { return from_bits(Derived::nearest_bits(v)); }

  // t = v rounded toward zero, n = the next representable number away from zero; n is chosen
  // iff |v - t| > u |n - t| with u = bits[31:8] / 2^24. Both differences are exact in fp32, so
  // the decision is exact. Past the largest finite number t is that number and n = inf is never
  // chosen (u * inf is inf, or NaN for u = 0, and no comparison with either holds).
  XGB_HD static T stochastic(float v, uint32_t bits) {
    const uint16_t t = Derived::toward_zero_bits(v);
    const uint16_t n = static_cast<uint16_t>(t + 1u);
    const float t32 = Derived::to_float(t);
    const float gap = abs_f(sub_rn(Derived::to_float(n), t32));
    const float u = mul_rn(static_cast<float>(bits >> 8), 1.0f / 16777216.0f);
    return from_bits(abs_f(sub_rn(v, t32)) > mul_rn(u, gap) ? n : t);
  }
};

template <>
struct Rounding<c10::BFloat16> : Rounding16<c10::BFloat16, Rounding<c10::BFloat16>> {
  XGB_HD static float to_float(uint16_t bits) {
    return bits_float(static_cast<uint32_t>(bits) << 16);
  }
  // Nearest-even on the fp32 bits (finite inputs): the same integer trick as the Triton kernel.
  XGB_HD static uint16_t nearest_bits(float v) {
    uint32_t b = float_bits(v);
    b += 0x7FFFu + ((b >> 16) & 1u);
    return static_cast<uint16_t>(b >> 16);
  }
  // bf16 is the top half of fp32: truncation is rounding toward zero.
  XGB_HD static uint16_t toward_zero_bits(float v) {
    return static_cast<uint16_t>(float_bits(v) >> 16);
  }
};

template <>
struct Rounding<c10::Half> : Rounding16<c10::Half, Rounding<c10::Half>> {
  XGB_HD static float to_float(uint16_t bits) { return static_cast<float>(from_bits(bits)); }
  // IEEE round-to-nearest-even: cvt.rn.f16.f32 on the device, c10's exact software conversion
  // on the host (one function: the correctly rounded result is unique).
  XGB_HD static uint16_t nearest_bits(float v) { return c10::Half(v).x; }
  // Nearest, then one ulp toward zero where nearest overshot |v| (inf steps back to the max).
  XGB_HD static uint16_t toward_zero_bits(float v) {
    const uint16_t nb = nearest_bits(v);
    return abs_f(to_float(nb)) > abs_f(v) ? static_cast<uint16_t>(nb - 1u) : nb;
  }
};

template <typename T>
XGB_HD T round_nearest(float v) {
  return Rounding<T>::nearest(v);
}

template <typename T>
XGB_HD T round_stochastic(float v, uint32_t bits) {
  return Rounding<T>::stochastic(v, bits);
}

// How a merge rounds (the values match the `rounding` of launch_merge).
enum class MergeMode : int { kNearest = 0, kStochastic = 1, kKahan = 2 };

// One merged element: round(w + (s * b_i) * a_j), product and sum rounded separately; `bits`
// (counter_hash of the element's logical index) is used by stochastic rounding only. kKahan
// (twin of reference.kahan_step): y = (s * b_i) * a_j + c, w' = round(w + y) and the
// compensation c becomes round(y - (w' - w)), what rounding dropped; other modes leave c alone.
template <typename T, MergeMode MODE>
XGB_HD T merge_element(T w, float sb_i, float a_j, uint32_t bits, T& c) {
  const float w32 = static_cast<float>(w);
  const float update = mul_rn(sb_i, a_j);
  if constexpr (MODE == MergeMode::kKahan) {
    const float y = add_rn(update, static_cast<float>(c));
    const T out = round_nearest<T>(add_rn(w32, y));
    c = round_nearest<T>(sub_rn(y, sub_rn(static_cast<float>(out), w32)));
    return out;
  } else if constexpr (MODE == MergeMode::kStochastic) {
    return round_stochastic<T>(add_rn(w32, update), bits);
  } else {
    return round_nearest<T>(add_rn(w32, update));
  }
}

// ------------------------------------------------------------------------------------------
// Vectors: 16-byte packs where aligned, scalars otherwise
// ------------------------------------------------------------------------------------------

// Elements per 16-byte access: 4 fp32, 8 fp16/bf16.
template <typename T>
constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

struct alignas(16) Float4 {
  float v[4];
};

template <typename T, int N>
XGB_HD Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
XGB_HD void store_pack(T* p, const Pack<T, N>& x) {
  *reinterpret_cast<Pack<T, N>*>(p) = x;
}

// N consecutive floats: N == 1, or N a multiple of 4 from a 16-byte aligned address.
template <int N>
XGB_HD void load_floats(const float* p, float (&out)[N]) {
  static_assert(N == 1 || N % 4 == 0, "load_floats: N must be 1 or a multiple of 4");
  if constexpr (N == 1) {
    out[0] = p[0];
  } else {
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
      const Float4 f = reinterpret_cast<const Float4*>(p)[q];
#pragma unroll
      for (int r = 0; r < 4; ++r) out[4 * q + r] = f.v[r];
    }
  }
}

XGB_HD bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ------------------------------------------------------------------------------------------
// Index math
// ------------------------------------------------------------------------------------------

XGB_HD int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// (row, col) of a flat index that a grid-stride loop advances by a fixed step: two int64
// divisions at the start, then an add and a carry per step (no division in the loop).
struct FlatIndex {
  int64_t row, col, drow, dcol, cols;
  XGB_HD FlatIndex(int64_t start, int64_t step, int64_t ncols)
      : row(start / ncols), col(start % ncols), drow(step / ncols), dcol(step % ncols),
        cols(ncols) {}
  XGB_HD void next() {
    row += drow;
    col += dcol;
    if (col >= cols) {
      col -= cols;
      ++row;
    }
  }
};

// Fixed-order sum of count values spaced by stride (the deterministic combine of partials).
XGB_HD float sum_in_order(const float* x, int64_t count, int64_t stride) {
  float s = 0.0f;
  for (int64_t i = 0; i < count; ++i) s = add_rn(s, x[i * stride]);
  return s;
}

// ------------------------------------------------------------------------------------------
// Merge: W[M, K] += s * b a^T in place
// ------------------------------------------------------------------------------------------

// How a merge walks W: `outer x inner` in storage order, inner fastest. trans = false: outer
// runs over rows i and inner over columns j; trans = true (column-major W, e.g. a transposed
// view): outer runs over columns j and inner over rows i. The counter index stays the global
// (row0 + i) * K + j, row0 being W's first row in the whole matrix (a row shard's offset).
// The Kahan compensation C (W's shape, its own strides) is walked in W's order.
template <typename T>
struct MergeParams {
  T* w;
  T* c;            // [M, K] compensation (kKahan), else nullptr
  const float* a;  // [K] fp32, contiguous
  const float* b;  // [M] fp32, contiguous
  float scale;
  uint32_t key;  // seed_key(seed)
  int64_t outer, inner, stride_outer, stride_inner, c_stride_outer, c_stride_inner;
  int64_t K;
  int64_t row0;  // global index of W's first row (stochastic bits only)
  bool trans;
};

template <typename T>
XGB_HD MergeParams<T> plan_merge(T* w, int64_t M, int64_t K, int64_t stride_m, int64_t stride_k,
                                 T* c, int64_t c_stride_m, int64_t c_stride_k, const float* a,
                                 const float* b, float scale, uint32_t seed, int64_t row0) {
  const bool trans = stride_k != 1 && stride_m < stride_k && K > 1;
  MergeParams<T> p{w, c, a, b, scale, seed_key(seed), 0, 0, 0, 0, 0, 0, K, row0, trans};
  p.outer = trans ? K : M;
  p.inner = trans ? M : K;
  p.stride_outer = trans ? stride_k : stride_m;
  p.stride_inner = trans ? stride_m : stride_k;
  p.c_stride_outer = trans ? c_stride_k : c_stride_m;
  p.c_stride_inner = trans ? c_stride_m : c_stride_k;
  return p;
}

// True when the 16-byte path applies: unit inner stride, whole packs per row, aligned rows (of
// C too when there is one).
template <typename T>
XGB_HD bool merge_vectorizable(const MergeParams<T>& p) {
  constexpr int V = kVec16<T>;
  const bool c_ok = p.c == nullptr || (p.c_stride_inner == 1 && aligned16(p.c) &&
                                       (p.outer == 1 || p.c_stride_outer % V == 0));
  return p.stride_inner == 1 && p.inner % V == 0 && (p.outer == 1 || p.stride_outer % V == 0) &&
         aligned16(p.w) && aligned16(p.a) && aligned16(p.b) && c_ok;
}

// One thread of the grid-stride merge: packs f = tid, tid + nthreads, ... of outer x inner/VEC.
template <typename T, int VEC, MergeMode MODE>
XGB_HD void merge_thread(const MergeParams<T>& p, int64_t tid, int64_t nthreads) {
  constexpr bool STOCHASTIC = MODE == MergeMode::kStochastic;
  constexpr bool KAHAN = MODE == MergeMode::kKahan;
  const int64_t vinner = p.inner / VEC;
  const int64_t total = p.outer * vinner;
  if (tid >= total) return;
  FlatIndex it(tid, nthreads, vinner);
  for (int64_t f = tid; f < total; f += nthreads, it.next()) {
    const int64_t o = it.row;
    const int64_t i0 = it.col * VEC;
    T* ptr = p.w + o * p.stride_outer + i0 * p.stride_inner;
    Pack<T, VEC> w = load_pack<T, VEC>(ptr);
    T* cptr = KAHAN ? p.c + o * p.c_stride_outer + i0 * p.c_stride_inner : nullptr;
    Pack<T, VEC> c{};
    if constexpr (KAHAN) c = load_pack<T, VEC>(cptr);
    uint32_t bits[VEC] = {};
    if (!p.trans) {  // row i = o, columns j = i0 .. i0 + VEC - 1: consecutive indices
      const float sb = mul_rn(p.scale, p.b[o]);
      float a[VEC];
      load_floats<VEC>(p.a + i0, a);
      if constexpr (STOCHASTIC) counter_hash_run<VEC>(p.key, (p.row0 + o) * p.K + i0, bits);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        w.v[v] = merge_element<T, MODE>(w.v[v], sb, a[v], bits[v], c.v[v]);
      }
    } else {  // column j = o, rows i = i0 .. i0 + VEC - 1: indices K apart
      const float aj = p.a[o];
      float b[VEC];
      load_floats<VEC>(p.b + i0, b);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        if constexpr (STOCHASTIC) {
          bits[v] = counter_hash_keyed(p.key, (p.row0 + i0 + v) * p.K + o);
        }
        w.v[v] = merge_element<T, MODE>(w.v[v], mul_rn(p.scale, b[v]), aj, bits[v], c.v[v]);
      }
    }
    store_pack<T, VEC>(ptr, w);
    if constexpr (KAHAN) store_pack<T, VEC>(cptr, c);
  }
}

// ------------------------------------------------------------------------------------------
// Rank-1 epilogue: Y[R, C] = round(accumulate ? Y + (s u_r) b_c + bias_c : (s u_r) b_c)
// ------------------------------------------------------------------------------------------

template <typename T>
struct EpilogueParams {
  T* y;  // [rows, cols], unit column stride
  int64_t rows, cols, stride_row;
  const float* u;     // [rows] fp32
  const float* b;     // [cols] fp32, contiguous
  const float* bias;  // [cols] fp32 or nullptr
  float scale;
  bool accumulate;
};

template <typename T>
XGB_HD bool epilogue_vectorizable(const EpilogueParams<T>& p) {
  constexpr int V = kVec16<T>;
  return p.cols % V == 0 && (p.rows == 1 || p.stride_row % V == 0) && aligned16(p.y) &&
         aligned16(p.b) && (p.bias == nullptr || aligned16(p.bias));
}

// The rank-1 update of one element, in fp32: fma(s u_r, b_c, y), plus bias_c when present.
XGB_HD float rank1_update(float y, float su, float b, bool has_bias, float bias) {
  const float acc = fma_rn(su, b, y);
  return has_bias ? add_rn(acc, bias) : acc;
}

template <typename T, int VEC>
XGB_HD void epilogue_thread(const EpilogueParams<T>& p, int64_t tid, int64_t nthreads) {
  const int64_t vcols = p.cols / VEC;
  const int64_t total = p.rows * vcols;
  if (tid >= total) return;
  const bool has_bias = p.bias != nullptr;
  FlatIndex it(tid, nthreads, vcols);
  for (int64_t f = tid; f < total; f += nthreads, it.next()) {
    const int64_t r = it.row;
    const int64_t c0 = it.col * VEC;
    T* ptr = p.y + r * p.stride_row + c0;
    const float su = mul_rn(p.scale, p.u[r]);
    float b[VEC];
    float bias[VEC] = {};
    load_floats<VEC>(p.b + c0, b);
    if (has_bias) load_floats<VEC>(p.bias + c0, bias);
    Pack<T, VEC> y = p.accumulate ? load_pack<T, VEC>(ptr) : Pack<T, VEC>{};
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float acc = p.accumulate ? static_cast<float>(y.v[v]) : 0.0f;
      y.v[v] = static_cast<T>(rank1_update(acc, su, b[v], has_bias, bias[v]));
    }
    store_pack<T, VEC>(ptr, y);
  }
}

// ------------------------------------------------------------------------------------------
// Column reductions: wsum[c] = sum_n X[n, c] w[n], csum[c] = sum_n X[n, c]
// ------------------------------------------------------------------------------------------
// Two stages, deterministic (no atomics): the rows are split into `splits` ranges; within a
// range, COLSUM_ROW_LANES row lanes accumulate rows n = begin + lane, + COLSUM_ROW_LANES, ...,
// their partials are summed in lane order into row `split` of an fp32 [splits, C] buffer, and a
// second pass sums the buffer's rows in order (and applies the scale).

constexpr int COLSUM_COL_THREADS = 32;  // threads (packs of columns) across a block
constexpr int COLSUM_ROW_LANES = 8;     // threads (interleaved rows) down a block

template <typename T>
struct ColsumParams {
  const T* x;
  int64_t rows, cols, stride_row, stride_col;
  const float* w;  // [rows] fp32
  float* wpart;    // [splits, cols]
  float* cpart;    // [splits, cols] or nullptr
  int64_t rows_per_split;
};

template <typename T>
XGB_HD bool colsum_vectorizable(const ColsumParams<T>& p) {
  constexpr int V = kVec16<T>;
  return p.stride_col == 1 && p.cols % V == 0 && (p.rows == 1 || p.stride_row % V == 0) &&
         aligned16(p.x);
}

// Accumulates rows n = begin, begin + step, ... < end of the VEC columns from c0 into acc.
template <typename T, int VEC, bool WITH_CSUM>
XGB_HD void colsum_accumulate(const ColsumParams<T>& p, int64_t c0, int64_t begin, int64_t end,
                              int64_t step, float (&accw)[VEC], float (&accc)[VEC]) {
  for (int64_t n = begin; n < end; n += step) {
    const Pack<T, VEC> xv = load_pack<T, VEC>(p.x + n * p.stride_row + c0 * p.stride_col);
    const float wn = p.w[n];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float xf = static_cast<float>(xv.v[v]);
      accw[v] = fma_rn(xf, wn, accw[v]);
      if constexpr (WITH_CSUM) accc[v] = add_rn(accc[v], xf);
    }
  }
}

// Second stage for column c: scale * (sum of the splits' partials, in split order).
XGB_HD float colsum_finalize(const float* part, int64_t splits, int64_t cols, int64_t c,
                             float scale) {
  return mul_rn(scale, sum_in_order(part + c, splits, cols));
}

// ------------------------------------------------------------------------------------------
// Row dot: out[n] = sum_k X[n, k] a[k], one warp (32 lanes) per row
// ------------------------------------------------------------------------------------------

constexpr int ROWDOT_LANES = 32;

template <typename T>
struct RowdotParams {
  const T* x;
  int64_t rows, K, stride_row, stride_k;
  const float* a;  // [K] fp32, contiguous
  float* out;      // [rows] fp32
};

template <typename T>
XGB_HD bool rowdot_vectorizable(const RowdotParams<T>& p) {
  constexpr int V = kVec16<T>;
  return p.stride_k == 1 && p.K % V == 0 && (p.rows == 1 || p.stride_row % V == 0) &&
         aligned16(p.x) && aligned16(p.a);
}

// The partial dot of one lane of the warp that owns row n (the warp then sums the lanes).
template <typename T, int VEC>
XGB_HD float rowdot_lane(const RowdotParams<T>& p, int64_t n, int lane) {
  const T* row = p.x + n * p.stride_row;
  float acc = 0.0f;
  for (int64_t k = static_cast<int64_t>(lane) * VEC; k < p.K; k += ROWDOT_LANES * VEC) {
    const Pack<T, VEC> xv = load_pack<T, VEC>(row + k * p.stride_k);
    float a[VEC];
    load_floats<VEC>(p.a + k, a);
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc = fma_rn(static_cast<float>(xv.v[v]), a[v], acc);
  }
  return acc;
}

}  // namespace xgblora_fast
