// CUDA kernels of loram_fast (registered for the CUDA dispatch key). Same operators, checks and per-element math
// as csrc/cpu/kernels.cpp: the math is csrc/kernel_math.h (__host__ __device__), the checks and the layout handling
// csrc/common.h. Grids loop over rows and columns (grid-stride), so no shape is refused for launch limits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"

#include <algorithm>
#include <cstdint>

namespace loram_fast {
namespace {

constexpr unsigned kMaxGridY = 65535;

inline unsigned blocks_for(int64_t count, int threads, int64_t cap = 1 << 30) {
  return static_cast<unsigned>(std::min<int64_t>((count + threads - 1) / threads, cap));
}

template <typename scalar_t>
__global__ void basis_kernel(scalar_t* __restrict__ out, int64_t n, int64_t r, int kind, bool transposed) {
  const int64_t total = n * r;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = transposed ? idx % n : idx / r, k = transposed ? idx / n : idx % r;  // stored order
    out[idx] = static_cast<scalar_t>(kmath::basis_value(i, k, n, kind));
  }
}

void basis_fill_(at::Tensor out, int64_t kind) {
  check_kind(kind);
  check_basis_out(out);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "basis_fill_", [&] {
    basis_kernel<scalar_t><<<blocks_for(out.numel(), 256, 65536), 256, 0, stream>>>(
        out.data_ptr<scalar_t>(), out.size(0), out.size(1), static_cast<int>(kind), basis_out_transposed(out));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Block-wide sum of a double per thread (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ double block_sum(double v, double* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  v = threadIdx.x < warps ? shared[threadIdx.x] : 0.0;
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  __syncthreads();
  return v;  // valid in thread 0
}

// One block per row (grid-stride over rows): fp32 lanes, combined in double.
template <typename scalar_t>
__global__ void row_moments_kernel(const scalar_t* __restrict__ w, int64_t m, int64_t n, int64_t sm, int64_t sn,
                                   float* __restrict__ sums, float* __restrict__ sqs) {
  __shared__ double shared[32];
  for (int64_t i = blockIdx.x; i < m; i += gridDim.x) {
    const scalar_t* row = w + i * sm;
    float s = 0.f, q = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float v = static_cast<float>(row[j * sn]);
      s += v;
      q += v * v;
    }
    const double ts = block_sum(static_cast<double>(s), shared);
    const double tq = block_sum(static_cast<double>(q), shared);
    if (threadIdx.x == 0) {
      sums[i] = static_cast<float>(ts);
      sqs[i] = static_cast<float>(tq);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> row_moments(const at::Tensor& W) {
  check_moments(W);
  const c10::cuda::CUDAGuard guard(W.device());
  const int64_t m = W.size(0), n = W.size(1);
  auto opts = W.options().dtype(at::kFloat);
  at::Tensor sums = at::empty({m}, opts), sqs = at::empty({m}, opts);
  if (m == 0) return {sums, sqs};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "row_moments", [&] {
    row_moments_kernel<scalar_t><<<static_cast<unsigned>(std::min<int64_t>(m, 1 << 20)), 256, 0, stream>>>(
        W.data_ptr<scalar_t>(), m, n, W.stride(0), W.stride(1), sums.data_ptr<float>(), sqs.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sums, sqs};
}

// W[i, j] += alpha * sum_k B[i, k] A[k, j] in place, fp32 math, one rounding (kmath::add_scaled). W row-major (any
// row stride), B m×r and A r×n contiguous fp32. A tile of kTileM × kTileN outputs per block (kTileN threads, each
// kTileM rows of one column); the rank is walked in kTileK slices staged in shared memory: B's slice rows are
// contiguous in k, A's slice rows contiguous in j (coalesced). Tiles are visited grid-stride in both directions.
constexpr int kTileM = 16, kTileN = 128, kTileK = 16;

template <typename scalar_t>
__global__ void lowrank_update_kernel(scalar_t* __restrict__ w, int64_t m, int64_t n, int64_t sm, int64_t sn,
                                      const float* __restrict__ B, const float* __restrict__ A, int64_t r,
                                      float alpha) {
  __shared__ float sB[kTileM][kTileK];
  __shared__ float sA[kTileK][kTileN];
  for (int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTileM; row0 < m; row0 += static_cast<int64_t>(gridDim.y) * kTileM) {
    for (int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTileN; col0 < n;
         col0 += static_cast<int64_t>(gridDim.x) * kTileN) {
      const int64_t j = col0 + threadIdx.x;
      float acc[kTileM];
#pragma unroll
      for (int t = 0; t < kTileM; ++t) acc[t] = 0.f;
      for (int64_t k0 = 0; k0 < r; k0 += kTileK) {
        for (int e = threadIdx.x; e < kTileM * kTileK; e += blockDim.x) {
          const int t = e / kTileK, kk = e % kTileK;
          const int64_t i = row0 + t, k = k0 + kk;
          sB[t][kk] = (i < m && k < r) ? B[i * r + k] : 0.f;
        }
        for (int kk = 0; kk < kTileK; ++kk) {
          const int64_t k = k0 + kk;
          sA[kk][threadIdx.x] = (k < r && j < n) ? A[k * n + j] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTileK; ++kk) {
          const float a = sA[kk][threadIdx.x];
#pragma unroll
          for (int t = 0; t < kTileM; ++t) acc[t] = fmaf(sB[t][kk], a, acc[t]);
        }
        __syncthreads();
      }
      if (j < n) {
#pragma unroll
        for (int t = 0; t < kTileM; ++t) {
          const int64_t i = row0 + t;
          if (i < m) {
            scalar_t* p = w + i * sm + j * sn;
            *p = kmath::add_scaled(*p, alpha, acc[t]);
          }
        }
      }
    }
  }
}

void lowrank_update_(at::Tensor W_in, const at::Tensor& B_in, const at::Tensor& A_in, double alpha) {
  check_update(W_in, B_in, A_in);
  const c10::cuda::CUDAGuard guard(W_in.device());
  const UpdateOperands ops = normalise_update(W_in, B_in, A_in);
  at::Tensor W = ops.W;
  const int64_t m = W.size(0), n = W.size(1), r = ops.B.size(1);
  if (m == 0 || n == 0) return;
  dim3 grid(blocks_for(n, kTileN, 65536), static_cast<unsigned>(std::min<int64_t>((m + kTileM - 1) / kTileM, kMaxGridY)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "lowrank_update_", [&] {
    lowrank_update_kernel<scalar_t><<<grid, kTileN, 0, stream>>>(W.data_ptr<scalar_t>(), m, n, W.stride(0),
                                                                W.stride(1), ops.B.data_ptr<float>(),
                                                                ops.A.data_ptr<float>(), r, static_cast<float>(alpha));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Row and column terms of the closed form (kmath::closed_form_terms), one thread per index, grid-stride.
__global__ void closed_form_terms_kernel(double* __restrict__ out, int64_t count, int64_t r, int kind) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const kmath::Terms t = kmath::closed_form_terms(i, count, r, kind);
    out[i] = t.p;
    out[count + i] = t.q;
    out[2 * count + i] = t.c;
  }
}

// W -= coef · V_r U_rᵀ: one thread per pair of entries (grid-stride over 2-D tiles of rows i < ⌈m/2⌉): K(i, j) =
// kmath::closed_form_entry from the row and column terms (coalesced loads along j), written to (i, j) and, K being
// centro-symmetric (K(m−1−i, n−1−j) = K(i, j)), to (m−1−i, n−1−j) unless that is the same entry; one rounding each.
// The same pairs as the CPU kernel, so both give the same bits.
template <typename scalar_t>
__global__ void loram_residual_kernel(scalar_t* __restrict__ w, int64_t m, int64_t n, int64_t sm, int64_t sn,
                                      const double* __restrict__ rows, const double* __restrict__ cols, int64_t r,
                                      int kind, float scale) {
  const int64_t half = (m + 1) / 2;
  for (int64_t i = blockIdx.y; i < half; i += gridDim.y) {
    const kmath::Terms a{rows[i], rows[m + i], rows[2 * m + i]};
    const bool mirrored = (m - 1 - i) != i;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const kmath::Terms b{cols[j], cols[n + j], cols[2 * n + j]};
      const float k = kmath::closed_form_entry(a, b, i, j, m, n, r, kind);
      scalar_t* p = w + i * sm + j * sn;
      *p = kmath::add_scaled(*p, scale, k);
      if (mirrored) {
        scalar_t* q = w + (m - 1 - i) * sm + (n - 1 - j) * sn;
        *q = kmath::add_scaled(*q, scale, k);
      }
    }
  }
}

// The row and column terms are computed once (the only allocation), before the first store; then one kernel per
// weight (the GPU is bound by memory traffic, not by the closed form's arithmetic).
void loram_residual_batch_(at::TensorList weights, at::ArrayRef<double> coefs, int64_t r, int64_t kind_) {
  check_residual_batch(weights, coefs, r, kind_);
  if (weights.empty()) return;
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const bool transposed = stored_transposed(weights[0]);  // V U^T transposed: the same formula with m and n swapped
  const at::Tensor first = transposed ? weights[0].t() : weights[0];
  const int kind = static_cast<int>(kind_);
  const int64_t m = first.size(0), n = first.size(1);
  if (m == 0 || n == 0) return;
  auto opts = first.options().dtype(at::kDouble);
  at::Tensor rows = at::empty({3 * m}, opts), cols = at::empty({3 * n}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  closed_form_terms_kernel<<<blocks_for(m, 256, 4096), 256, 0, stream>>>(rows.data_ptr<double>(), m, r, kind);
  closed_form_terms_kernel<<<blocks_for(n, 256, 4096), 256, 0, stream>>>(cols.data_ptr<double>(), n, r, kind);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dim3 grid(blocks_for(n, 256, 64), static_cast<unsigned>(std::min<int64_t>((m + 1) / 2, kMaxGridY)));
  for (size_t b = 0; b < weights.size(); ++b) {
    const at::Tensor W = transposed ? weights[b].t() : weights[b];
    const float scale = static_cast<float>(-coefs[b] * kmath::closed_form_amp(m, n, kind));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "loram_residual_", [&] {
      loram_residual_kernel<scalar_t><<<grid, 256, 0, stream>>>(W.data_ptr<scalar_t>(), m, n, W.stride(0),
                                                                W.stride(1), rows.data_ptr<double>(),
                                                                cols.data_ptr<double>(), r, kind, scale);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void loram_residual_(at::Tensor W, double coef, int64_t r, int64_t kind) {
  loram_residual_batch_({W}, {coef}, r, kind);
}

// ||W[i, :] + alpha * (B @ A)[i, :]|| per row: one block per row (grid-stride over rows), threads over the columns;
// each entry's product over the rank in fp32 (B's row broadcast, A's rows coalesced in j), formed as peft does
// (kmath::dora_entry), squares summed in fp32 lanes and combined in double.
template <typename scalar_t>
__global__ void lowrank_row_norms_kernel(const scalar_t* __restrict__ w, int64_t m, int64_t n, int64_t sm, int64_t sn,
                                         const float* __restrict__ B, const float* __restrict__ A, int64_t r,
                                         float alpha, int product, int promoted, float* __restrict__ out) {
  __shared__ double shared[32];
  for (int64_t i = blockIdx.x; i < m; i += gridDim.x) {
    const scalar_t* row = w + i * sm;
    const float* bi = B + i * r;
    float q = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      float p = 0.f;
      for (int64_t k = 0; k < r; ++k) p = fmaf(bi[k], A[k * n + j], p);
      const float v = kmath::dora_entry(static_cast<float>(row[j * sn]), p, alpha, product, promoted);
      q = fmaf(v, v, q);
    }
    const double total = block_sum(static_cast<double>(q), shared);
    if (threadIdx.x == 0) out[i] = static_cast<float>(sqrt(total));
  }
}

at::Tensor lowrank_row_norms(const at::Tensor& W, const at::Tensor& B_in, const at::Tensor& A_in, double alpha,
                             int64_t product, int64_t promoted) {
  check_row_norms(W, B_in, A_in, product, promoted);
  const c10::cuda::CUDAGuard guard(W.device());
  const int64_t m = W.size(0), n = W.size(1), r = B_in.size(1);
  const at::Tensor B = B_in.to(W.device(), at::kFloat).contiguous(), A = A_in.to(W.device(), at::kFloat).contiguous();
  at::Tensor out = at::empty({m}, W.options().dtype(at::kFloat));
  if (m == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "lowrank_row_norms", [&] {
    lowrank_row_norms_kernel<scalar_t><<<static_cast<unsigned>(std::min<int64_t>(m, 1 << 20)), 256, 0, stream>>>(
        W.data_ptr<scalar_t>(), m, n, W.stride(0), W.stride(1), B.data_ptr<float>(), A.data_ptr<float>(), r,
        static_cast<float>(alpha), static_cast<int>(product), static_cast<int>(promoted), out.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

__global__ void scale_rounded_kernel(float* __restrict__ out, const float* __restrict__ src, int64_t count, float a,
                                     int code) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = kmath::round_to_code(a * src[i], code);
}

void scale_rounded_(at::Tensor out, const at::Tensor& src, double alpha, int64_t code) {
  check_scale_rounded(out, src, code);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  scale_rounded_kernel<<<blocks_for(out.numel(), 256, 65536), 256, 0, stream>>>(
      out.data_ptr<float>(), src.data_ptr<float>(), out.numel(), static_cast<float>(alpha), static_cast<int>(code));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(loram_fast, CUDA, m) {
  LORAM_FAST_IMPL_ALL(m);
}

}  // namespace loram_fast
