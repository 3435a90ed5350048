// CUDA kernels of loram_fast (registered for the CUDA dispatch key). Same operators and semantics as
// csrc/cpu/kernels.cpp; the schemas live in csrc/ops.cpp. Built only with LORAM_FAST_CUDA=1 where torch has CUDA.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"

#include <algorithm>
#include <utility>
#include <cstdint>
#include <vector>

namespace loram_fast {
namespace {

constexpr double kPi = 3.14159265358979323846;

// Entry (i, k) of a length-n basis: DST-I sqrt(2/(n+1)) sin(pi (i+1)(k+1)/(n+1)) (kind 0) or DCT-II
// sqrt(2/n) c_k cos(pi (2i+1) k / (2n)) (kind 1). The integer phase is reduced modulo its period before the
// double-precision sine, as on the CPU.
__device__ __forceinline__ double basis_value(int64_t i, int64_t k, int64_t n, int kind) {
  int64_t half, phase;
  double amp;
  if (kind == 0) {
    half = n + 1;
    phase = ((i + 1) * (k + 1)) % (2 * half);
    amp = sqrt(2.0 / static_cast<double>(half));
  } else {
    half = 2 * n;
    phase = ((2 * i + 1) * k) % (2 * half);
    amp = sqrt(2.0 / static_cast<double>(n));
  }
  if (phase > half) phase -= 2 * half;
  const double angle = static_cast<double>(phase) * (kPi / static_cast<double>(half));
  if (kind == 0) return amp * sin(angle);
  const double v = amp * cos(angle);
  return k == 0 ? v * 0.70710678118654752440 : v;
}

// scale: null, or one double per row (row i of the basis times scale[i]).
template <typename scalar_t>
__global__ void basis_kernel(scalar_t* __restrict__ out, int64_t n, int64_t r, int kind,
                             const double* __restrict__ scale) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * r) return;
  const int64_t i = idx / r;
  const double v = basis_value(i, idx % r, n, kind);
  out[idx] = static_cast<scalar_t>(scale == nullptr ? v : v * scale[i]);
}

// Many bases in one flat buffer, one launch: basis b covers [offsets[b], offsets[b] + ns[b]*rs[b]).
template <typename scalar_t>
__global__ void basis_batched_kernel(scalar_t* __restrict__ out, const int64_t* __restrict__ meta, int64_t count,
                                     int64_t total, int kind) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t* ns = meta;
  const int64_t* rs = meta + count;
  const int64_t* offsets = meta + 2 * count;
  int64_t lo = 0, hi = count - 1;  // last b with offsets[b] <= idx
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= idx) lo = mid; else hi = mid - 1;
  }
  const int64_t local = idx - offsets[lo];
  if (local >= ns[lo] * rs[lo]) return;  // a gap between bases (never written by the caller's layout)
  out[idx] = static_cast<scalar_t>(basis_value(local / rs[lo], local % rs[lo], ns[lo], kind));
}

inline unsigned blocks_for(int64_t count, int threads) {
  return static_cast<unsigned>((count + threads - 1) / threads);
}

void basis_fill_(at::Tensor out, int64_t kind) {
  check_kind(kind);
  check_basis_out(out);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "basis_fill_", [&] {
    basis_kernel<scalar_t><<<blocks_for(out.numel(), 256), 256, 0, stream>>>(
        out.data_ptr<scalar_t>(), out.size(0), out.size(1), static_cast<int>(kind), nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void basis_fill_scaled_(at::Tensor out, const at::Tensor& scale, int64_t kind) {
  check_kind(kind);
  check_scaled(out, scale);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor s = scale.to(at::kDouble).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "basis_fill_scaled_", [&] {
    basis_kernel<scalar_t><<<blocks_for(out.numel(), 256), 256, 0, stream>>>(
        out.data_ptr<scalar_t>(), out.size(0), out.size(1), static_cast<int>(kind), s.data_ptr<double>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void basis_fill_batched_(at::Tensor out, at::IntArrayRef ns, at::IntArrayRef rs, at::IntArrayRef offsets,
                         int64_t kind) {
  check_kind(kind);
  check_batched(out, ns, rs, offsets);
  const int64_t count = static_cast<int64_t>(ns.size());
  if (count == 0 || out.numel() == 0) return;
  std::vector<int64_t> meta;
  meta.reserve(3 * count);
  for (int64_t b = 0; b < count; ++b) {
    // the kernel finds each entry's basis by binary search over the offsets
    TORCH_CHECK(b == 0 || offsets[b] >= offsets[b - 1], "loram_fast.basis_fill_batched_: offsets must increase");
    meta.push_back(ns[b]);
  }
  meta.insert(meta.end(), rs.begin(), rs.end());
  meta.insert(meta.end(), offsets.begin(), offsets.end());
  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor dmeta = at::tensor(meta, at::TensorOptions().dtype(at::kLong)).to(out.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "basis_fill_batched_", [&] {
    basis_batched_kernel<scalar_t><<<blocks_for(out.numel(), 256), 256, 0, stream>>>(
        out.data_ptr<scalar_t>(), dmeta.data_ptr<int64_t>(), count, out.numel(), static_cast<int>(kind));
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

// One block per row: fp32 lanes, combined in double. Per-row sum and sum of squares in fp32.
template <typename scalar_t>
__global__ void row_moments_kernel(const scalar_t* __restrict__ w, int64_t n, int64_t sm, int64_t sn,
                                   float* __restrict__ sums, float* __restrict__ sqs) {
  __shared__ double shared[32];
  const int64_t i = blockIdx.x;
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

// Per-column sums of squares: one thread per column (coalesced for row-major W), rows split across gridDim.y
// slices that add into `acc` (double) atomically.
template <typename scalar_t>
__global__ void col_sq_kernel(const scalar_t* __restrict__ w, int64_t m, int64_t n, int64_t sm, int64_t sn,
                              int64_t rows_per_slice, double* __restrict__ acc) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_slice;
  const int64_t end = begin + rows_per_slice < m ? begin + rows_per_slice : m;
  double a = 0.0;
  for (int64_t i = begin; i < end; ++i) {
    const double v = static_cast<double>(static_cast<float>(w[i * sm + j * sn]));
    a += v * v;
  }
  atomicAdd(acc + j, a);
}

at::Tensor col_sq(const at::Tensor& W) {
  TORCH_CHECK(W.dim() == 2, "loram_fast.col_sq: W must be 2-D");
  const c10::cuda::CUDAGuard guard(W.device());
  const int64_t m = W.size(0), n = W.size(1);
  at::Tensor acc = at::zeros({n}, W.options().dtype(at::kDouble));
  if (m > 0 && n > 0) {
    const int64_t rows_per_slice = 256;
    const int64_t slices = (m + rows_per_slice - 1) / rows_per_slice;
    TORCH_CHECK(slices < 65536, "loram_fast.col_sq: too many rows");
    dim3 grid(blocks_for(n, 256), static_cast<unsigned>(slices));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "col_sq", [&] {
      col_sq_kernel<scalar_t><<<grid, 256, 0, stream>>>(W.data_ptr<scalar_t>(), m, n, W.stride(0), W.stride(1),
                                                       rows_per_slice, acc.data_ptr<double>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return acc.to(at::kFloat);
}

std::tuple<at::Tensor, at::Tensor> row_moments(const at::Tensor& W) {
  TORCH_CHECK(W.dim() == 2, "loram_fast.row_moments: W must be 2-D");
  const c10::cuda::CUDAGuard guard(W.device());
  const int64_t m = W.size(0), n = W.size(1);
  auto opts = W.options().dtype(at::kFloat);
  if (W.stride(1) != 1 && W.stride(0) == 1 && m > 1) {  // column-major view: reduce the stored rows
    return {W.sum(1, false, at::kFloat), col_sq(W.t())};
  }
  at::Tensor sums = at::empty({m}, opts), sqs = at::empty({m}, opts);
  if (m == 0) return {sums, sqs};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "row_moments", [&] {
    row_moments_kernel<scalar_t><<<static_cast<unsigned>(m), 256, 0, stream>>>(
        W.data_ptr<scalar_t>(), n, W.stride(0), W.stride(1), sums.data_ptr<float>(), sqs.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sums, sqs};
}

// W[i, j] += alpha * sum_k B[i, k] A[k, j] in place, fp32 math, one rounding to W's dtype; any strides.
// A tile of kTileM × kTileN outputs per block (kTileN threads, each kTileM rows of one column); the rank
// dimension is walked in kTileK slices staged in shared memory.
constexpr int kTileM = 16, kTileN = 128, kTileK = 16;

template <typename scalar_t>
__global__ void lowrank_update_kernel(scalar_t* __restrict__ w, int64_t m, int64_t n, int64_t sm, int64_t sn,
                                      const float* __restrict__ B, int64_t sbm, int64_t sbk,
                                      const float* __restrict__ A, int64_t sak, int64_t san, int64_t r,
                                      float alpha) {
  __shared__ float sB[kTileM][kTileK];
  __shared__ float sA[kTileK][kTileN];
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTileN + threadIdx.x;
  float acc[kTileM];
#pragma unroll
  for (int t = 0; t < kTileM; ++t) acc[t] = 0.f;
  for (int64_t k0 = 0; k0 < r; k0 += kTileK) {
    for (int e = threadIdx.x; e < kTileM * kTileK; e += blockDim.x) {
      const int t = e / kTileK, kk = e % kTileK;
      const int64_t i = row0 + t, k = k0 + kk;
      sB[t][kk] = (i < m && k < r) ? B[i * sbm + k * sbk] : 0.f;
    }
    for (int kk = 0; kk < kTileK; ++kk) {
      const int64_t k = k0 + kk;
      sA[kk][threadIdx.x] = (k < r && j < n) ? A[k * sak + j * san] : 0.f;
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
  if (j >= n) return;
#pragma unroll
  for (int t = 0; t < kTileM; ++t) {
    const int64_t i = row0 + t;
    if (i < m) {
      scalar_t* p = w + i * sm + j * sn;
      *p = static_cast<scalar_t>(static_cast<float>(*p) + alpha * acc[t]);
    }
  }
}

void launch_update(at::Tensor W, at::Tensor B, at::Tensor A, double alpha) {
  if (W.stride(1) != 1 && W.stride(0) == 1 && W.size(0) > 1) {  // column-major view (Conv1D): update the stored
    W = W.t();                                                   // transpose, W^T += alpha A^T B^T, coalesced
    std::swap(A, B);
    A = A.t();
    B = B.t();
  }
  const int64_t m = W.size(0), n = W.size(1), r = B.size(1);
  if (m == 0 || n == 0) return;
  const int64_t row_tiles = (m + kTileM - 1) / kTileM;
  TORCH_CHECK(row_tiles < 65536, "loram_fast.lowrank_update_: too many rows for one launch");
  dim3 grid(blocks_for(n, kTileN), static_cast<unsigned>(row_tiles));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "lowrank_update_", [&] {
    lowrank_update_kernel<scalar_t><<<grid, kTileN, 0, stream>>>(
        W.data_ptr<scalar_t>(), m, n, W.stride(0), W.stride(1), B.data_ptr<float>(), B.stride(0), B.stride(1),
        A.data_ptr<float>(), A.stride(0), A.stride(1), r, static_cast<float>(alpha));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void lowrank_update_(at::Tensor W, const at::Tensor& B, const at::Tensor& A, double alpha) {
  check_update(W, B, A);
  const c10::cuda::CUDAGuard guard(W.device());
  launch_update(W, B.to(W.device(), at::kFloat), A.to(W.device(), at::kFloat), alpha);
}

// W -= coef * V_r U_r^T: the two bases ((m + n) × r fp32, tiny) are generated on the device, then one fused pass.
void loram_residual_(at::Tensor W, double coef, int64_t r, int64_t kind) {
  check_residual(W, r, kind);
  const int64_t m = W.size(0), n = W.size(1);
  const c10::cuda::CUDAGuard guard(W.device());
  auto opts = W.options().dtype(at::kFloat);
  at::Tensor V = at::empty({m, r}, opts), U = at::empty({n, r}, opts);
  basis_fill_(V, kind);
  basis_fill_(U, kind);
  launch_update(W, V, U.t(), -coef);
}

}  // namespace

TORCH_LIBRARY_IMPL(loram_fast, CUDA, m) {
  LORAM_FAST_IMPL_ALL(m);
}

}  // namespace loram_fast
