// Host-side code shared by the CPU (csrc/cpu/) and CUDA (csrc/cuda/) kernels: the argument checks (so every backend
// accepts and refuses the same inputs), the layout normalisation, and the operator registration. The per-element
// math both sides compute lives in kernel_math.h.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <utility>

#include "kernel_math.h"

namespace loram_fast {

inline void check_kind(int64_t kind) {
  TORCH_CHECK(kind == 0 || kind == 1, "loram_fast: basis kind must be 0 (DST-I) or 1 (DCT-II)");
}

inline void check_float_weight(const at::Tensor& W, const char* op) {
  TORCH_CHECK(W.dim() == 2, "loram_fast.", op, ": W must be 2-D, got ", W.dim(), " dimensions");
  const auto t = W.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, "loram_fast.", op,
              ": W must be float32, float16 or bfloat16, got ", t);
}

inline void check_basis_out(const at::Tensor& out) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "loram_fast.basis_fill_: out must be a contiguous 2-D tensor");
  TORCH_CHECK(out.size(1) <= out.size(0) || out.size(0) == 0,
              "loram_fast.basis_fill_: r=", out.size(1), " > n=", out.size(0), " (only n orthonormal vectors exist)");
}

inline void check_update(const at::Tensor& W, const at::Tensor& B, const at::Tensor& A) {
  check_float_weight(W, "lowrank_update_");
  TORCH_CHECK(B.dim() == 2 && A.dim() == 2, "loram_fast.lowrank_update_: B and A must be 2-D");
  TORCH_CHECK(B.size(0) == W.size(0) && A.size(1) == W.size(1) && B.size(1) == A.size(0),
              "loram_fast.lowrank_update_: shapes do not chain: W ", W.sizes(), ", B ", B.sizes(), ", A ", A.sizes());
  TORCH_CHECK(B.device() == W.device() && A.device() == W.device(),
              "loram_fast.lowrank_update_: B and A must be on W's device");
}

inline void check_residual(const at::Tensor& W, int64_t r, int64_t kind) {
  check_kind(kind);
  check_float_weight(W, "loram_residual_");
  TORCH_CHECK(r >= 1 && r <= std::min(W.size(0), W.size(1)),
              "loram_fast.loram_residual_: need 1 <= r <= min(m, n), got r=", r, " for W ", W.sizes());
}

inline void check_row_norms(const at::Tensor& W, const at::Tensor& B, const at::Tensor& A, int64_t product,
                            int64_t promoted) {
  check_float_weight(W, "lowrank_row_norms");
  TORCH_CHECK(B.dim() == 2 && A.dim() == 2 && B.size(0) == W.size(0) && A.size(1) == W.size(1) &&
                  B.size(1) == A.size(0),
              "loram_fast.lowrank_row_norms: shapes do not chain: W ", W.sizes(), ", B ", B.sizes(), ", A ", A.sizes());
  TORCH_CHECK(product >= 0 && product <= 2 && promoted >= 0 && promoted <= 2,
              "loram_fast.lowrank_row_norms: dtype codes must be 0 (fp32), 1 (bf16) or 2 (fp16), got ", product, ", ",
              promoted);
}

inline void check_moments(const at::Tensor& W) {
  TORCH_CHECK(W.dim() == 2, "loram_fast.row_moments: W must be 2-D");
}

// A column-major view (a GPT-2 Conv1D weight seen as out×in) is processed as its stored, row-major transpose:
// true when W should be transposed first. For a low-rank update W += a·B·A the transpose is Wᵀ += a·Aᵀ·Bᵀ; the
// LoRAM product V_r U_rᵀ transposes to U_r V_rᵀ, the same formula with the roles of m and n swapped.
inline bool stored_transposed(const at::Tensor& W) {
  return W.stride(1) != 1 && W.stride(0) == 1 && W.size(0) > 1;
}

// W, B, A in the row-major orientation, with B (m×r) and A (r×n) fp32 and contiguous (coalesced loads).
struct UpdateOperands {
  at::Tensor W, B, A;
};

inline UpdateOperands normalise_update(at::Tensor W, const at::Tensor& B, const at::Tensor& A) {
  if (stored_transposed(W)) return {W.t(), A.t().to(at::kFloat).contiguous(), B.t().to(at::kFloat).contiguous()};
  return {W, B.to(at::kFloat).contiguous(), A.to(at::kFloat).contiguous()};
}

}  // namespace loram_fast

// Inside TORCH_LIBRARY_IMPL(loram_fast, <key>, m): every operator of csrc/ops.cpp, implemented by the functions of
// the same names in scope.
#define LORAM_FAST_IMPL_ALL(m)                 \
  m.impl("basis_fill_", &basis_fill_);         \
  m.impl("row_moments", &row_moments);         \
  m.impl("lowrank_update_", &lowrank_update_); \
  m.impl("loram_residual_", &loram_residual_); \
  m.impl("lowrank_row_norms", &lowrank_row_norms)
