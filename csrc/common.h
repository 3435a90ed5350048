// Host-side code shared by the CPU (csrc/cpu/) and CUDA (csrc/cuda/) kernels: the argument checks (so every backend
// accepts and refuses the same inputs), the layout normalisation, and the operator registration. The per-element
// math both sides compute lives in kernel_math.h.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

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

// The n×r basis is written row-major (a contiguous n×r tensor) or column-major (the transpose of a contiguous r×n
// tensor: its rows are the basis vectors): true for the latter.
inline bool basis_out_transposed(const at::Tensor& out) {
  return out.dim() == 2 && out.size(0) > 1 && out.size(1) > 1 && out.stride(0) == 1 && out.stride(1) == out.size(0);
}

inline void check_basis_out(const at::Tensor& out) {
  TORCH_CHECK(out.dim() == 2 && (out.is_contiguous() || basis_out_transposed(out)),
              "loram_fast.basis_fill_: out must be a contiguous 2-D tensor or the transpose of one");
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

// The bytes [start, end) a tensor (non-negative strides) reaches in memory; start == end when it is empty
// (layout.byte_span in loram_fast/ops/ is the Python twin).
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t last = -1;
  if (t.numel() > 0) {
    last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  }
  return {start, start + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

// Several weights of one shape for one residual op: the same shape, dtype, device and layout, one coefficient each,
// and no memory shared between two different weights (they may be written at the same time; the same weight twice
// is allowed: its rows are updated in turn).
inline void check_residual_batch(at::TensorList Ws, at::ArrayRef<double> coefs, int64_t r, int64_t kind) {
  TORCH_CHECK(Ws.size() == coefs.size(), "loram_fast.loram_residual_batch_: ", Ws.size(), " weights but ",
              coefs.size(), " coefficients");
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  for (const auto& W : Ws) {
    check_residual(W, r, kind);
    TORCH_CHECK(W.sizes() == Ws[0].sizes() && W.scalar_type() == Ws[0].scalar_type() &&
                    W.device() == Ws[0].device() && W.strides() == Ws[0].strides(),
                "loram_fast.loram_residual_batch_: every weight needs the first one's shape, dtype, device and "
                "strides; got ", W.sizes(), " ", W.scalar_type(), " vs ", Ws[0].sizes(), " ", Ws[0].scalar_type());
    TORCH_CHECK(W.stride(0) >= 0 && W.stride(1) >= 0, "loram_fast.loram_residual_batch_: negative strides");
    if (W.numel() > 0) spans.push_back(byte_span(W));
  }
  std::sort(spans.begin(), spans.end());
  for (size_t b = 1; b < spans.size(); ++b)
    TORCH_CHECK(spans[b].first == spans[b - 1].first || spans[b].first >= spans[b - 1].second,
                "loram_fast.loram_residual_batch_: two different weights share memory");
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

inline void check_scale_rounded(const at::Tensor& out, const at::Tensor& src, int64_t code) {
  TORCH_CHECK(code >= 0 && code <= 2, "loram_fast.scale_rounded_: code must be 0 (fp32), 1 (bf16) or 2 (fp16), got ",
              code);
  TORCH_CHECK(out.scalar_type() == at::kFloat && src.scalar_type() == at::kFloat,
              "loram_fast.scale_rounded_: out and src must be fp32, got ", out.scalar_type(), " and ",
              src.scalar_type());
  TORCH_CHECK(out.sizes() == src.sizes() && out.is_contiguous() && src.is_contiguous(),
              "loram_fast.scale_rounded_: out and src need one shape and contiguous memory");
  TORCH_CHECK(out.device() == src.device(), "loram_fast.scale_rounded_: out and src on different devices");
  const auto* o = static_cast<const char*>(out.data_ptr());
  const auto* q = static_cast<const char*>(src.data_ptr());
  const int64_t bytes = out.numel() * 4;
  TORCH_CHECK(o == q || o + bytes <= q || q + bytes <= o,
              "loram_fast.scale_rounded_: out and src overlap without being the same memory");
}

inline void check_moments(const at::Tensor& W) {
  TORCH_CHECK(W.dim() == 2, "loram_fast.row_moments: W must be 2-D");
}

inline void check_moments_batch(at::TensorList Ws) {
  for (const auto& W : Ws) {
    TORCH_CHECK(W.dim() == 2, "loram_fast.weights_moments: every weight must be 2-D, got ", W.sizes());
    TORCH_CHECK(W.scalar_type() == Ws[0].scalar_type() && W.device() == Ws[0].device(),
                "loram_fast.weights_moments: every weight needs the first one's dtype and device; got ",
                W.scalar_type(), " vs ", Ws[0].scalar_type());
  }
}

// scale_rounded_ of several (out, src) pairs at once: every pair passes check_scale_rounded, no two outs share memory,
// and no out overlaps another pair's src (its own src only when it is the same memory: in place). The stores of one
// pair then never change what another pair reads or writes, in any order.
inline void check_scale_rounded_batch(at::TensorList outs, at::TensorList srcs, at::ArrayRef<double> alphas,
                                      int64_t code) {
  TORCH_CHECK(outs.size() == srcs.size() && outs.size() == alphas.size(), "loram_fast.scale_rounded_batch_: ",
              outs.size(), " outputs, ", srcs.size(), " sources and ", alphas.size(), " factors");
  using Span = std::pair<uintptr_t, uintptr_t>;
  std::vector<Span> out_spans, src_spans;
  for (size_t i = 0; i < outs.size(); ++i) {
    check_scale_rounded(outs[i], srcs[i], code);
    if (outs[i].numel() == 0) continue;
    out_spans.push_back(byte_span(outs[i]));
    src_spans.push_back(byte_span(srcs[i]));
  }
  std::vector<Span> sorted = out_spans;
  std::sort(sorted.begin(), sorted.end());
  for (size_t b = 1; b < sorted.size(); ++b)
    TORCH_CHECK(sorted[b].first >= sorted[b - 1].second, "loram_fast.scale_rounded_batch_: two outputs share memory");
  std::vector<Span> sources = src_spans;  // distinct sources (layers of one shape share their basis)
  std::sort(sources.begin(), sources.end());
  sources.erase(std::unique(sources.begin(), sources.end()), sources.end());
  for (size_t i = 0; i < out_spans.size(); ++i) {
    const Span& o = out_spans[i];
    for (const Span& q : sources) {
      if (q.first >= o.second || o.first >= q.second || q == src_spans[i]) continue;
      TORCH_CHECK(false, "loram_fast.scale_rounded_batch_: an output overlaps the source of another pair");
    }
    // an output in place on its own source must not be another pair's source as well
    if (o == src_spans[i])
      TORCH_CHECK(std::count(src_spans.begin(), src_spans.end(), o) == 1,
                  "loram_fast.scale_rounded_batch_: an output in place on its source is another pair's source too");
  }
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
  m.impl("loram_residual_batch_", &loram_residual_batch_); \
  m.impl("lowrank_row_norms", &lowrank_row_norms); \
  m.impl("scale_rounded_", &scale_rounded_)
