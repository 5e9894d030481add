// Kernel launchers of xgblora_fast_cuda.cu, called by ops.cpp.
//
// The split keeps the .cu file free of ATen and Python headers, so nvcc compiles only kernels
// (twice: sm_80 and sm_90) and the host compiler handles the heavy PyTorch headers once. All
// pointers are device pointers; sizes and strides are in elements; every launch goes to
// `stream` and is checked with C10_CUDA_KERNEL_LAUNCH_CHECK.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace xgblora_fast {

enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Number of streaming multiprocessors of the current device (cached per device).
int multiprocessor_count();

// out[n] = sum_k x[n, k] a[k] (fp32); a fp32 contiguous [K].
void launch_rowdot(Dtype dtype, const void* x, int64_t rows, int64_t K, int64_t stride_row,
                   int64_t stride_k, const float* a, float* out, cudaStream_t stream);

// y[r, c] = round(accumulate ? y + (s u_r) b_c + bias_c : (s u_r) b_c), y with unit column
// stride; u [rows], b [cols], bias [cols] (or nullptr) fp32 contiguous.
void launch_rank1_epilogue(Dtype dtype, void* y, int64_t rows, int64_t cols, int64_t stride_row,
                           const float* u, const float* b, const float* bias, float scale,
                           bool accumulate, cudaStream_t stream);

// Split of the rows for launch_colsum: `splits` ranges of `rows_per_split` rows.
struct ColsumPlan {
  int64_t splits;
  int64_t rows_per_split;
};
ColsumPlan plan_colsum(int64_t rows, int64_t cols);

// First stage: wpart[s, c] = sum_{n in split s} x[n, c] w[n], cpart[s, c] = sum x[n, c]
// (cpart may be nullptr). Both [plan.splits, cols] fp32.
void launch_colsum(Dtype dtype, const void* x, int64_t rows, int64_t cols, int64_t stride_row,
                   int64_t stride_col, const float* w, float* wpart, float* cpart,
                   const ColsumPlan& plan, cudaStream_t stream);

// Second stage: out[c] = scale * sum_s part[s, c] (in split order).
void launch_colsum_finalize(const float* part, int64_t splits, int64_t cols, float scale,
                            float* out, cudaStream_t stream);

// In place: w[i, j] = round(w[i, j] + (s b_i) a_j); rounding 0: nearest-even, 1: stochastic
// (counter-based bits of (seed, (row_offset + i) * K + j): row_offset is w's first row in the
// whole matrix when w is a row shard), 2: Kahan, which also updates the compensation c [M, K]
// (w's dtype, strides c_stride_m/k; unused otherwise); any strides; a [K], b [M] fp32
// contiguous.
void launch_merge(Dtype dtype, void* w, int64_t M, int64_t K, int64_t stride_m, int64_t stride_k,
                  const float* a, const float* b, float scale, int rounding, uint32_t seed,
                  void* c, int64_t c_stride_m, int64_t c_stride_k, int64_t row_offset,
                  cudaStream_t stream);

}  // namespace xgblora_fast
