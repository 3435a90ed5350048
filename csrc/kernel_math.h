// Per-element math shared by the CPU kernels (csrc/cpu/) and the CUDA kernels (csrc/cuda/): every function here
// is `__host__ __device__` under nvcc and plain inline C++ otherwise, so the CPU tests run the very arithmetic the
// GPU kernels run. No ATen, no allocation: integers and doubles in, doubles or floats out.
//
// Bases (length N, column k < r):
//   DST-I  (kind 0): sqrt(2/(N+1)) · sin(π (i+1)(k+1) / (N+1))
//   DCT-II (kind 1): sqrt(2/N) · c_k · cos(π (2i+1) k / (2N)),  c_0 = 1/√2, c_k = 1 otherwise
// Angles come from integer phases reduced modulo their period in int64 before the double-precision sine, so no
// accuracy is lost for large N.
//
// LoRAM residual in closed form. Entry (i, j) of V_r U_rᵀ (V_r: m×r, U_r: n×r, the same kind) is
// amp · K(i, j) with amp = 2/√((m+1)(n+1)) (DST-I) or 2/√(mn) (DCT-II) and
//   K(i, j) = (p(α_i) q(β_j) − q(α_i) p(β_j)) / (cos β_j − cos α_i)                       (displacement form)
// where α_i, β_j are the row and column angles (DST-I: π(i+1)/(m+1); DCT-II: π(2i+1)/(2m)) and, with
// R = r (DST-I) or r − 1 (DCT-II):
//   DST-I:  p(θ) = sin((R+½)θ) cos(θ/2),  q(θ) = cos((R+½)θ) sin(θ/2)
//   DCT-II: p(θ) = sin((R+½)θ) sin(θ/2),  q(θ) = cos((R+½)θ) cos(θ/2)
// (from Σ sin kα sin kβ = ½[D_R(α−β) − D_R(α+β)] and Σ' cos kα cos kβ = ½[D_R(α−β) + D_R(α+β)] + ½, with the
// Dirichlet kernel D_R(θ) = Σ_{k=1..R} cos kθ = ½[sin((R+½)θ)/sin(θ/2) − 1], over the common denominator
// sin((α−β)/2) sin((α+β)/2) = ½(cos β − cos α)). So each entry costs O(1) for any r, from O(m + n) row and column
// terms. Where |cos β_j − cos α_i| < kNearTol the cancellation would cost digits, and there (a few entries per row
// at most) K comes from the Dirichlet kernels evaluated at exact integer phases instead.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LORAM_FAST_HD __host__ __device__ __forceinline__
#else
#define LORAM_FAST_HD inline
#endif

namespace loram_fast {
namespace kmath {

constexpr double kPi = 3.14159265358979323846;
constexpr double kInvSqrt2 = 0.70710678118654752440;
// |cos β − cos α| below which K is evaluated from exact phases (the displacement form's numerator and denominator
// are accurate to ~4e-16 absolute, so above this bound K is accurate to ~1e-11 before the final fp32 rounding)
constexpr double kNearTol = 1e-4;

// a reduced modulo 2b into (−b, b] (b > 0): the phase of sin(π a / b) with the smallest angle
LORAM_FAST_HD int64_t reduce_phase(int64_t a, int64_t b) {
  int64_t t = a % (2 * b);
  if (t < 0) t += 2 * b;
  if (t > b) t -= 2 * b;
  return t;
}

LORAM_FAST_HD double sinpi_frac(int64_t a, int64_t b) {  // sin(π a / b), exact phase
  return sin(static_cast<double>(reduce_phase(a, b)) * (kPi / static_cast<double>(b)));
}

LORAM_FAST_HD double cospi_frac(int64_t a, int64_t b) {  // cos(π a / b), exact phase
  return cos(static_cast<double>(reduce_phase(a, b)) * (kPi / static_cast<double>(b)));
}

// ---- bases ---------------------------------------------------------------------------------------------------

// Half-period H of the integer phase of a length-n basis: entry = amp · sin/cos(π P / H).
LORAM_FAST_HD int64_t basis_half(int64_t n, int kind) { return kind == 0 ? n + 1 : 2 * n; }

LORAM_FAST_HD int64_t basis_phase(int64_t i, int64_t k, int kind) {
  return kind == 0 ? (i + 1) * (k + 1) : (2 * i + 1) * k;
}

// amp · sin(π P / H) (DST-I) or amp · cos(π P / H) (DCT-II, column scale c_k not included) for an integer phase P.
LORAM_FAST_HD double phase_value(int64_t phase, int64_t n, int kind) {
  const int64_t half = basis_half(n, kind);
  if (kind == 0) return sqrt(2.0 / static_cast<double>(half)) * sinpi_frac(phase, half);
  return sqrt(2.0 / static_cast<double>(n)) * cospi_frac(phase, half);
}

// Entry (i, k) of the length-n basis.
LORAM_FAST_HD double basis_value(int64_t i, int64_t k, int64_t n, int kind) {
  const double v = phase_value(basis_phase(i, k, kind), n, kind);
  return (kind == 1 && k == 0) ? v * kInvSqrt2 : v;
}

// ---- LoRAM residual in closed form ---------------------------------------------------------------------------

struct Terms {  // p(θ), q(θ), cos θ of one row (or column) angle
  double p, q, c;
};

// Terms of index i of a length-n basis at rank r (see the header comment).
LORAM_FAST_HD Terms closed_form_terms(int64_t i, int64_t n, int64_t r, int kind) {
  Terms t;
  if (kind == 0) {  // θ = π(i+1)/(n+1): (R+½)θ = π(2R+1)(i+1)/(2(n+1)), θ/2 = π(i+1)/(2(n+1)), R = r
    const int64_t a = i + 1, h = 2 * (n + 1), w = (2 * r + 1) * a;
    t.p = sinpi_frac(w, h) * cospi_frac(a, h);
    t.q = cospi_frac(w, h) * sinpi_frac(a, h);
    t.c = cospi_frac(a, n + 1);
  } else {  // θ = π(2i+1)/(2n): (R+½)θ = π(2R+1)(2i+1)/(4n), θ/2 = π(2i+1)/(4n), R = r − 1
    const int64_t a = 2 * i + 1, h = 4 * n, w = (2 * r - 1) * a;
    t.p = sinpi_frac(w, h) * sinpi_frac(a, h);
    t.q = cospi_frac(w, h) * cospi_frac(a, h);
    t.c = cospi_frac(a, 2 * n);
  }
  return t;
}

// amp of entry (i, j) = amp · K(i, j) for an m×n weight.
LORAM_FAST_HD double closed_form_amp(int64_t m, int64_t n, int kind) {
  return kind == 0 ? 2.0 / sqrt(static_cast<double>(m + 1) * static_cast<double>(n + 1))
                   : 2.0 / sqrt(static_cast<double>(m) * static_cast<double>(n));
}

// D_R(π P / H) = Σ_{k=1..R} cos(k π P / H) = sin(π R P / 2H) · cos(π (R+1) P / 2H) / sin(π P / 2H), exact phases.
LORAM_FAST_HD double dirichlet(int64_t phase, int64_t half, int64_t R) {
  if (R <= 0) return 0.0;
  int64_t p = phase % (2 * half);
  if (p < 0) p += 2 * half;
  if (p == 0) return static_cast<double>(R);
  return sinpi_frac(R * p, 2 * half) * cospi_frac((R + 1) * p, 2 * half) / sinpi_frac(p, 2 * half);
}

// K(i, j) from the Dirichlet kernels at exact integer phases (any i, j; used near cos β = cos α).
LORAM_FAST_HD double closed_form_exact(int64_t i, int64_t j, int64_t m, int64_t n, int64_t r, int kind) {
  if (kind == 0) {  // α ∓ β = π((i+1)(n+1) ∓ (j+1)(m+1)) / ((m+1)(n+1))
    const int64_t half = (m + 1) * (n + 1), a = (i + 1) * (n + 1), b = (j + 1) * (m + 1);
    return 0.5 * (dirichlet(a - b, half, r) - dirichlet(a + b, half, r));
  }
  // α ∓ β = π((2i+1)n ∓ (2j+1)m) / (2mn)
  const int64_t half = 2 * m * n, a = (2 * i + 1) * n, b = (2 * j + 1) * m;
  return 0.5 + 0.5 * (dirichlet(a - b, half, r - 1) + dirichlet(a + b, half, r - 1));
}

// True where the displacement form is accurate (|cos β − cos α| >= kNearTol).
LORAM_FAST_HD bool closed_form_regular(double row_c, double col_c) { return fabs(col_c - row_c) >= kNearTol; }

// K(i, j) by the displacement form, as fp32: numerator and denominator in double, one fp32 division.
LORAM_FAST_HD float closed_form_fast(double row_p, double row_q, double row_c, double col_p, double col_q,
                                     double col_c) {
  return static_cast<float>(row_p * col_q - row_q * col_p) / static_cast<float>(col_c - row_c);
}

// K(i, j) as fp32, either form.
LORAM_FAST_HD float closed_form_entry(const Terms& row, const Terms& col, int64_t i, int64_t j, int64_t m, int64_t n,
                                      int64_t r, int kind) {
  if (closed_form_regular(row.c, col.c)) return closed_form_fast(row.p, row.q, row.c, col.p, col.q, col.c);
  return static_cast<float>(closed_form_exact(i, j, m, n, r, kind));
}

// ---- the write: one rounding --------------------------------------------------------------------------------

// w + alpha · x in fp32, rounded once to w's type (T: float, c10::Half, c10::BFloat16, or any type with float
// conversions both ways).
template <typename T>
LORAM_FAST_HD T add_scaled(T w, float alpha, float x) {
  return static_cast<T>(static_cast<float>(w) + alpha * x);
}

// ---- DoRA's row norms -----------------------------------------------------------------------------------------

// Dtype codes of the two steps of peft's DoRA norm: the product B A and its scaling in the adapters' dtype, the sum
// W + s·(B A) in the promotion of that and W's dtype.
constexpr int kF32 = 0, kBF16 = 1, kF16 = 2;

LORAM_FAST_HD float round_to_code(float x, int code) {  // x rounded (nearest even) to the code's dtype and back
  if (code == kBF16) return static_cast<float>(static_cast<c10::BFloat16>(x));
  if (code == kF16) return static_cast<float>(static_cast<c10::Half>(x));
  return x;
}

// One entry of W + alpha·P (P = (B A)_ij accumulated in fp32) as peft forms it: the product rounded to the adapters'
// dtype (`product`), the scaled product too, the sum to the promoted dtype (`promoted`); fp32 steps round nothing.
LORAM_FAST_HD float dora_entry(float w, float p, float alpha, int product, int promoted) {
  const float scaled = round_to_code(alpha * round_to_code(p, product), product);
  return round_to_code(w + scaled, promoted);
}

}  // namespace kmath
}  // namespace loram_fast
