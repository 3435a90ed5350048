// Shared by the CPU (csrc/cpu/) and CUDA (csrc/cuda/) kernels: argument checks and the operator registration,
// so the two dispatch keys accept the same inputs and register the same operators.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

namespace loram_fast {

inline void check_kind(int64_t kind) {
  TORCH_CHECK(kind == 0 || kind == 1, "loram_fast: basis kind must be 0 (DST-I) or 1 (DCT-II)");
}

inline void check_basis_out(const at::Tensor& out) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "loram_fast.basis_fill_: out must be a contiguous 2-D tensor");
}

// Basis b of a batched fill occupies out[offsets[b] : offsets[b] + ns[b]*rs[b]].
inline void check_batched(const at::Tensor& out, at::IntArrayRef ns, at::IntArrayRef rs, at::IntArrayRef offsets) {
  TORCH_CHECK(out.dim() == 1 && out.is_contiguous(), "loram_fast.basis_fill_batched_: out must be a flat buffer");
  TORCH_CHECK(ns.size() == rs.size() && ns.size() == offsets.size(), "loram_fast.basis_fill_batched_: lengths differ");
  for (size_t b = 0; b < ns.size(); ++b)
    TORCH_CHECK(offsets[b] + ns[b] * rs[b] <= out.numel(), "loram_fast.basis_fill_batched_: buffer too small");
}

inline void check_scaled(const at::Tensor& out, const at::Tensor& scale) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "loram_fast.basis_fill_scaled_: out must be a contiguous 2-D tensor");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == out.size(0) && scale.device() == out.device(),
              "loram_fast.basis_fill_scaled_: scale must hold one value per row of out, on out's device");
}

inline void check_update(const at::Tensor& W, const at::Tensor& B, const at::Tensor& A) {
  TORCH_CHECK(W.dim() == 2 && B.dim() == 2 && A.dim() == 2, "loram_fast.lowrank_update_: 2-D tensors expected");
  TORCH_CHECK(B.size(0) == W.size(0) && A.size(1) == W.size(1) && B.size(1) == A.size(0),
              "loram_fast.lowrank_update_: shapes do not chain");
}

inline void check_residual(const at::Tensor& W, int64_t r, int64_t kind) {
  check_kind(kind);
  TORCH_CHECK(W.dim() == 2, "loram_fast.loram_residual_: W must be 2-D");
  TORCH_CHECK(r >= 1 && r <= std::min(W.size(0), W.size(1)), "loram_fast.loram_residual_: need 1 <= r <= min(m, n)");
}

}  // namespace loram_fast

// Inside TORCH_LIBRARY_IMPL(loram_fast, <key>, m): every operator of csrc/ops.cpp, implemented by the functions of
// the same names in scope.
#define LORAM_FAST_IMPL_ALL(m)                         \
  m.impl("basis_fill_", &basis_fill_);                 \
  m.impl("basis_fill_scaled_", &basis_fill_scaled_);   \
  m.impl("basis_fill_batched_", &basis_fill_batched_); \
  m.impl("row_moments", &row_moments);                 \
  m.impl("col_sq", &col_sq);                           \
  m.impl("lowrank_update_", &lowrank_update_);         \
  m.impl("loram_residual_", &loram_residual_)
