// CUDA kernels of the xgblora_fast C++ fallback: row dots, the rank-1 epilogue, the column
// reductions of the adapter gradients, and the in-place merge.
//
// The per-thread bodies live in rank1_common.h (shared with the host test build); this file
// holds the kernels around them (grid-stride launch geometry, warp shuffles, shared memory) and
// their launchers. No ATen here: ops.cpp does the tensor checks, the cuBLAS GEMMs (through ATen)
// and the op registration.
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <atomic>

#include "launchers.h"
#include "rank1_common.h"

namespace xgblora_fast {
namespace {

constexpr int kThreads = 256;      // elementwise and row-dot blocks
constexpr int kBlocksPerSm = 8;    // 8 x 256 threads: one full wave on sm_80 / sm_90
constexpr int kMaxDevices = 64;

int64_t grid_for(int64_t work_items, int threads) {
  const int64_t wave = static_cast<int64_t>(multiprocessor_count()) * kBlocksPerSm;
  return std::max<int64_t>(1, std::min(ceil_div(work_items, threads), wave));
}

template <typename F>
void dispatch_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kFloat32:
      f(float{});
      break;
    case Dtype::kFloat16:
      f(c10::Half{});
      break;
    case Dtype::kBFloat16:
      f(c10::BFloat16{});
      break;
  }
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_threads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// ---- kernels ------------------------------------------------------------------------------

template <typename T, int VEC, MergeMode MODE>
__global__ void __launch_bounds__(kThreads) merge_kernel(const MergeParams<T> p) {
  merge_thread<T, VEC, MODE>(p, global_thread(), grid_threads());
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) rank1_epilogue_kernel(const EpilogueParams<T> p) {
  epilogue_thread<T, VEC>(p, global_thread(), grid_threads());
}

// One warp per row (grid-stride over rows); lanes stride over K, then a butterfly sum.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) rowdot_kernel(const RowdotParams<T> p) {
  const int lane = threadIdx.x % ROWDOT_LANES;
  const int64_t warps = grid_threads() / ROWDOT_LANES;
  for (int64_t n = global_thread() / ROWDOT_LANES; n < p.rows; n += warps) {
    float acc = rowdot_lane<T, VEC>(p, n, lane);
#pragma unroll
    for (int offset = ROWDOT_LANES / 2; offset > 0; offset >>= 1) {
      acc = add_rn(acc, __shfl_xor_sync(0xffffffffu, acc, offset));
    }
    if (lane == 0) p.out[n] = acc;
  }
}

// Block (COLSUM_COL_THREADS x COLSUM_ROW_LANES): column packs across, interleaved rows down;
// blockIdx.y is the split. Row lanes meet in shared memory ([lane][v][tx]: conflict-free) and
// lane 0 sums them in lane order.
template <typename T, int VEC, bool WITH_CSUM>
__global__ void __launch_bounds__(COLSUM_COL_THREADS* COLSUM_ROW_LANES)
    colsum_kernel(const ColsumParams<T> p) {
  constexpr int kWidth = COLSUM_COL_THREADS * VEC;
  __shared__ float sw[COLSUM_ROW_LANES * kWidth];
  __shared__ float sc[WITH_CSUM ? COLSUM_ROW_LANES * kWidth : 1];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * COLSUM_COL_THREADS + tx) * VEC;
  const int64_t split = blockIdx.y;
  const int64_t begin = split * p.rows_per_split;
  const int64_t end = std::min(begin + p.rows_per_split, p.rows);
  float accw[VEC] = {};
  float accc[VEC] = {};
  if (c0 < p.cols) {
    colsum_accumulate<T, VEC, WITH_CSUM>(p, c0, begin + ty, end, COLSUM_ROW_LANES, accw, accc);
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    sw[ty * kWidth + v * COLSUM_COL_THREADS + tx] = accw[v];
    if constexpr (WITH_CSUM) sc[ty * kWidth + v * COLSUM_COL_THREADS + tx] = accc[v];
  }
  __syncthreads();
  if (ty == 0 && c0 < p.cols) {
    float* wrow = p.wpart + split * p.cols + c0;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      wrow[v] = sum_in_order(sw + v * COLSUM_COL_THREADS + tx, COLSUM_ROW_LANES, kWidth);
      if constexpr (WITH_CSUM) {
        p.cpart[split * p.cols + c0 + v] =
            sum_in_order(sc + v * COLSUM_COL_THREADS + tx, COLSUM_ROW_LANES, kWidth);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    colsum_finalize_kernel(const float* __restrict__ part, int64_t splits, int64_t cols,
                           float scale, float* __restrict__ out) {
  for (int64_t c = global_thread(); c < cols; c += grid_threads()) {
    out[c] = colsum_finalize(part, splits, cols, c, scale);
  }
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------

int multiprocessor_count() {
  static std::atomic<int> cache[kMaxDevices] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= kMaxDevices) device = 0;
  int count = cache[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

void launch_rowdot(Dtype dtype, const void* x, int64_t rows, int64_t K, int64_t stride_row,
                   int64_t stride_k, const float* a, float* out, cudaStream_t stream) {
  if (rows == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const RowdotParams<T> p{static_cast<const T*>(x), rows, K, stride_row, stride_k, a, out};
    const auto blocks = grid_for(rows * ROWDOT_LANES, kThreads);
    if (rowdot_vectorizable(p)) {
      rowdot_kernel<T, kVec16<T>><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      rowdot_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_rank1_epilogue(Dtype dtype, void* y, int64_t rows, int64_t cols, int64_t stride_row,
                           const float* u, const float* b, const float* bias, float scale,
                           bool accumulate, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const EpilogueParams<T> p{static_cast<T*>(y), rows, cols, stride_row, u, b, bias, scale,
                              accumulate};
    if (epilogue_vectorizable(p)) {
      constexpr int V = kVec16<T>;
      const auto blocks = grid_for(rows * (cols / V), kThreads);
      rank1_epilogue_kernel<T, V><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      const auto blocks = grid_for(rows * cols, kThreads);
      rank1_epilogue_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

ColsumPlan plan_colsum(int64_t rows, int64_t cols) {
  // Enough blocks for one wave; each split keeps at least one row per row lane.
  const int64_t col_blocks = std::max<int64_t>(1, ceil_div(cols, COLSUM_COL_THREADS * 8));
  const int64_t wave = static_cast<int64_t>(multiprocessor_count()) * kBlocksPerSm;
  const int64_t max_splits = std::max<int64_t>(1, ceil_div(rows, COLSUM_ROW_LANES));
  int64_t splits = std::clamp<int64_t>(wave / col_blocks, 1, std::min<int64_t>(max_splits, 65535));
  const int64_t rows_per_split = std::max<int64_t>(1, ceil_div(rows, splits));
  splits = std::max<int64_t>(1, ceil_div(rows, rows_per_split));
  return {splits, rows_per_split};
}

void launch_colsum(Dtype dtype, const void* x, int64_t rows, int64_t cols, int64_t stride_row,
                   int64_t stride_col, const float* w, float* wpart, float* cpart,
                   const ColsumPlan& plan, cudaStream_t stream) {
  if (cols == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const ColsumParams<T> p{static_cast<const T*>(x), rows,  cols, stride_row,
                            stride_col,               w,     wpart, cpart,
                            plan.rows_per_split};
    const dim3 block(COLSUM_COL_THREADS, COLSUM_ROW_LANES);
    auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const dim3 grid(static_cast<unsigned>(ceil_div(cols, COLSUM_COL_THREADS * V)),
                      static_cast<unsigned>(plan.splits));
      if (cpart != nullptr) {
        colsum_kernel<T, V, true><<<grid, block, 0, stream>>>(p);
      } else {
        colsum_kernel<T, V, false><<<grid, block, 0, stream>>>(p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (colsum_vectorizable(p)) {
      launch(std::integral_constant<int, kVec16<T>>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
}

void launch_colsum_finalize(const float* part, int64_t splits, int64_t cols, float scale,
                            float* out, cudaStream_t stream) {
  if (cols == 0) return;
  colsum_finalize_kernel<<<grid_for(cols, kThreads), kThreads, 0, stream>>>(part, splits, cols,
                                                                           scale, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_merge(Dtype dtype, void* w, int64_t M, int64_t K, int64_t stride_m, int64_t stride_k,
                  const float* a, const float* b, float scale, int rounding, uint32_t seed,
                  void* c, int64_t c_stride_m, int64_t c_stride_k, int64_t row_offset,
                  cudaStream_t stream) {
  if (M == 0 || K == 0) return;
  const auto mode = static_cast<MergeMode>(rounding);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* comp = mode == MergeMode::kKahan ? static_cast<T*>(c) : nullptr;
    const auto p = plan_merge(static_cast<T*>(w), M, K, stride_m, stride_k, comp, c_stride_m,
                              c_stride_k, a, b, scale, seed, row_offset);
    auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const auto blocks = grid_for(p.outer * (p.inner / V), kThreads);
      if (mode == MergeMode::kKahan) {
        merge_kernel<T, V, MergeMode::kKahan><<<blocks, kThreads, 0, stream>>>(p);
      } else if constexpr (std::is_same_v<T, float>) {
        // fp32 weights: the fp32 sum is the result, stochastic rounding does not apply.
        merge_kernel<T, V, MergeMode::kNearest><<<blocks, kThreads, 0, stream>>>(p);
      } else if (mode == MergeMode::kStochastic) {
        merge_kernel<T, V, MergeMode::kStochastic><<<blocks, kThreads, 0, stream>>>(p);
      } else {
        merge_kernel<T, V, MergeMode::kNearest><<<blocks, kThreads, 0, stream>>>(p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (merge_vectorizable(p)) {
      launch(std::integral_constant<int, kVec16<T>>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
}

}  // namespace xgblora_fast
