// loram_fast._C: operator schemas (TORCH_LIBRARY) and the Python module stub.
// Kernels: csrc/cpu/*.cpp (always built), csrc/cuda/*.cu (only where torch has CUDA and nvcc exists); both call the
// per-element math of csrc/kernel_math.h and the checks of csrc/common.h. The Python side of each operator (its
// torch reference, fake kernel and backend registration) is in loram_fast/ops/<op>.py.
#include <torch/extension.h>

TORCH_LIBRARY(loram_fast, m) {
  // Fill `out` (n×r, contiguous, any float dtype) with basis `kind` (0: DST-I, 1: DCT-II); exact integer phases.
  m.def("basis_fill_(Tensor(a!) out, int kind) -> ()");
  // Per-row sum and sum of squares of W (m×n, any strides; fastest with contiguous rows), fp32 outputs, accumulated
  // in fp32 lanes flushed to fp64 every 4096 entries.
  m.def("row_moments(Tensor W) -> (Tensor, Tensor)");
  // Totals of several 2-D weights of one dtype and device (count×2 fp64: sum, sum of squares): row_moments's fp32
  // partials, added in fp64 in row order. CPU only.
  m.def("weights_moments(Tensor[] weights) -> Tensor");
  // W += alpha * B @ A in place (W m×n in its own dtype, B m×r and A r×n any float dtype), fp32 math, one rounding.
  m.def("lowrank_update_(Tensor(a!) W, Tensor B, Tensor A, float alpha) -> ()");
  // W -= coef * V_r @ U_r^T in place (V_r, U_r the first r basis vectors of lengths m and n): the closed form of
  // kernel_math.h, O(1) work per entry for any r, one pass over W, one rounding.
  m.def("loram_residual_(Tensor(a!) W, float coef, int r, int kind) -> ()");
  // loram_residual_ of several weights of one shape, dtype and layout (W_b -= coefs[b] * V_r @ U_r^T): each row of
  // the closed form is computed once for all of them. The same bits as one loram_residual_ call per weight.
  m.def("loram_residual_batch_(Tensor(a!)[] weights, float[] coefs, int r, int kind) -> ()");
  // ||W[i, :] + alpha * (B @ A)[i, :]|| for every row (W m×n any float dtype and strides, B m×r, A r×n), each entry
  // formed as peft's DoRA layer forms it: product and scaling rounded to dtype `product`, the sum to `promoted`
  // (0: fp32, 1: bf16, 2: fp16; kernel_math.h dora_entry); fp32 out.
  m.def("lowrank_row_norms(Tensor W, Tensor B, Tensor A, float alpha, int product, int promoted) -> Tensor");
  // out = alpha * src in fp32, rounded (nearest even) to dtype `code` (0: fp32, 1: bf16, 2: fp16) and held in fp32:
  // `(src * alpha).to(dtype).to(fp32)` in one pass (out, src: fp32, contiguous, one shape, not overlapping).
  m.def("scale_rounded_(Tensor(a!) out, Tensor src, float alpha, int code) -> ()");
  // scale_rounded_ of several pairs (outs pairwise disjoint, none overlapping another pair's src), every check made
  // before the first store. CPU only.
  m.def("scale_rounded_batch_(Tensor(a!)[] outs, Tensor[] srcs, float[] alphas, int code) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "loram_fast compiled kernels; the operators live in torch.ops.loram_fast";
  module.attr("with_cuda") =
#ifdef LORAM_FAST_WITH_CUDA
      true;
#else
      false;
#endif
}
