// loram_fast._C: operator schemas (TORCH_LIBRARY) and the Python module stub.
// Kernels: csrc/cpu/*.cpp (always built), csrc/cuda/*.cu (only where torch has CUDA and nvcc exists).
#include <torch/extension.h>

TORCH_LIBRARY(loram_fast, m) {
  // Fill `out` (n×r, contiguous, any float dtype) with basis `kind` (0: DST-I, 1: DCT-II); exact integer phases.
  m.def("basis_fill_(Tensor(a!) out, int kind) -> ()");
  // Same, row i multiplied by scale[i] (scale: n floats on out's device), rounded once: diag(scale) · basis.
  m.def("basis_fill_scaled_(Tensor(a!) out, Tensor scale, int kind) -> ()");
  // Many bases in one flat buffer: basis b is out[offsets[b] : offsets[b] + ns[b]*rs[b]] viewed ns[b]×rs[b].
  m.def("basis_fill_batched_(Tensor(a!) out, int[] ns, int[] rs, int[] offsets, int kind) -> ()");
  // Per-row sum and sum of squares of W (m×n, any strides), fp32 outputs accumulated in fp64.
  m.def("row_moments(Tensor W) -> (Tensor, Tensor)");
  // Per-column sum of squares of W, fp32 output accumulated in fp64.
  m.def("col_sq(Tensor W) -> Tensor");
  // W += alpha * B @ A in place (W m×n in its own dtype, B m×r and A r×n fp32), fp32 math, one rounding.
  m.def("lowrank_update_(Tensor(a!) W, Tensor B, Tensor A, float alpha) -> ()");
  // W -= coef * V_r @ U_r^T in place with V_r, U_r the first r basis vectors of lengths m and n (generated here).
  m.def("loram_residual_(Tensor(a!) W, float coef, int r, int kind) -> ()");
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
