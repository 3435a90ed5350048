// CPU kernels of loram_fast (registered for the CPU dispatch key).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "../common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace loram_fast {
namespace {

constexpr double kPi = 3.14159265358979323846;

// Basis values out[i*r + k] (row i of a length-n basis, column k < r). Each entry is amp·sin(π P/H) (DST-I) or
// amp·cos(π P/H) (DCT-II) of an integer phase P reduced into [0, 2H): the 2H distinct values are tabulated once
// (double precision, the angle reduced to (-π, π]) and looked up, so only 2H sines are evaluated, not n·r.
template <typename scalar_t>
void fill_basis(scalar_t* out, int64_t n, int64_t r, int64_t kind, const double* scale = nullptr) {
  const int64_t half = kind == 0 ? n + 1 : 2 * n;
  std::vector<double> table(2 * half);
  at::parallel_for(0, 2 * half, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t q = p > half ? p - 2 * half : p;
      const double angle = static_cast<double>(q) * (kPi / static_cast<double>(half));
      table[p] = kind == 0 ? std::sqrt(2.0 / static_cast<double>(half)) * std::sin(angle)
                           : std::sqrt(2.0 / static_cast<double>(n)) * std::cos(angle);
    }
  });
  const double* tab = table.data();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t k = 0; k < r; ++k) {
        double v;
        if (kind == 0) {
          v = tab[((i + 1) * (k + 1)) % (2 * half)];
        } else {
          v = tab[((2 * i + 1) * k) % (2 * half)];
          if (k == 0) v *= 0.70710678118654752440;
        }
        if (scale != nullptr) v *= scale[i];
        out[i * r + k] = static_cast<scalar_t>(v);
      }
    }
  });
}

void basis_fill_(at::Tensor out, int64_t kind) {
  check_kind(kind);
  check_basis_out(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "basis_fill_", [&] {
    fill_basis<scalar_t>(out.data_ptr<scalar_t>(), out.size(0), out.size(1), kind);
  });
}

void basis_fill_scaled_(at::Tensor out, const at::Tensor& scale, int64_t kind) {
  check_kind(kind);
  check_scaled(out, scale);
  const at::Tensor s = scale.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "basis_fill_scaled_", [&] {
    fill_basis<scalar_t>(out.data_ptr<scalar_t>(), out.size(0), out.size(1), kind, s.data_ptr<double>());
  });
}

void basis_fill_batched_(at::Tensor out, at::IntArrayRef ns, at::IntArrayRef rs, at::IntArrayRef offsets,
                         int64_t kind) {
  check_kind(kind);
  check_batched(out, ns, rs, offsets);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "basis_fill_batched_", [&] {
    for (size_t b = 0; b < ns.size(); ++b) {
      fill_basis<scalar_t>(out.data_ptr<scalar_t>() + offsets[b], ns[b], rs[b], kind);
    }
  });
}

at::Tensor col_sq(const at::Tensor& W) {
  TORCH_CHECK(W.dim() == 2, "loram_fast.col_sq: W must be 2-D");
  const int64_t m = W.size(0), n = W.size(1), sm = W.stride(0), sn = W.stride(1);
  at::Tensor out = at::empty({n}, W.options().dtype(at::kFloat));
  float* po = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "col_sq", [&] {
    const scalar_t* w = W.data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(end - begin, 0.0);
      for (int64_t i = 0; i < m; ++i) {
        const scalar_t* row = w + i * sm;
        for (int64_t j = begin; j < end; ++j) {
          const double x = static_cast<double>(static_cast<float>(row[j * sn]));
          acc[j - begin] += x * x;
        }
      }
      for (int64_t j = begin; j < end; ++j) po[j] = static_cast<float>(acc[j - begin]);
    });
  });
  return out;
}

// ---- vectorised row kernels --------------------------------------------------------------------------------
// Eight float lanes through GCC/Clang vector extensions. On x86-64 Linux with GCC the hot loops are compiled twice
// (target_clones): an AVX2 version picked at load time where the CPU has it, and a baseline (SSE2) version.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LORAM_FAST_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LORAM_FAST_CLONES
#endif

typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

constexpr int64_t kFlush = 4096;  // float lanes are flushed into double every kFlush elements (~1e-9 relative)

// Eight consecutive values as floats: fp32 and bf16 by vector loads (bf16 is the high half of an fp32), fp16 and
// fp64 element by element.
#define LORAM_FAST_LOAD8_F32(dst, ptr) std::memcpy(&(dst), (ptr), 32)
#define LORAM_FAST_LOAD8_BF16(dst, ptr)                                  \
  do {                                                                   \
    u16x8 h_;                                                            \
    std::memcpy(&h_, (ptr), 16);                                         \
    u32x8 w_ = __builtin_convertvector(h_, u32x8) << 16;                 \
    std::memcpy(&(dst), &w_, 32);                                        \
  } while (0)

// Round eight floats to bf16 exactly as c10::BFloat16 does (round to nearest even, NaN -> 0x7FC0).
#define LORAM_FAST_STORE8_BF16(ptr, src)                                 \
  do {                                                                   \
    u32x8 b_;                                                            \
    std::memcpy(&b_, &(src), 32);                                        \
    u32x8 r_ = (b_ + 0x7FFFu + ((b_ >> 16) & 1u)) >> 16;                 \
    u32x8 nan_ = (u32x8)((src) != (src));                                \
    r_ = (r_ & ~nan_) | (nan_ & 0x7FC0u);                                \
    u16x8 h_ = __builtin_convertvector(r_, u16x8);                       \
    std::memcpy((ptr), &h_, 16);                                         \
  } while (0)

// Sum and sum of squares of one contiguous row: two pairs of 8-lane float accumulators, flushed into double.
#define LORAM_FAST_ROW_SUMS_BODY(LOAD8, to_float)                        \
  double sum = 0.0, sq = 0.0;                                            \
  for (int64_t start = 0; start < n; start += kFlush) {                  \
    const int64_t stop = std::min(n, start + kFlush);                    \
    f32x8 a0 = {}, a1 = {}, a2 = {}, a3 = {}, q0 = {}, q1 = {}, q2 = {}, q3 = {}; \
    int64_t j = start;                                                   \
    for (; j + 32 <= stop; j += 32) {                                    \
      f32x8 u, v, y, z;                                                  \
      LOAD8(u, x + j);                                                   \
      LOAD8(v, x + j + 8);                                               \
      LOAD8(y, x + j + 16);                                              \
      LOAD8(z, x + j + 24);                                              \
      a0 += u;                                                           \
      a1 += v;                                                           \
      a2 += y;                                                           \
      a3 += z;                                                           \
      q0 += u * u;                                                       \
      q1 += v * v;                                                       \
      q2 += y * y;                                                       \
      q3 += z * z;                                                       \
    }                                                                    \
    double ts = 0.0, tq = 0.0;                                           \
    for (; j < stop; ++j) {                                              \
      const float t = to_float(x[j]);                                    \
      ts += t;                                                           \
      tq += static_cast<double>(t * t);                                  \
    }                                                                    \
    const f32x8 a = (a0 + a1) + (a2 + a3), q = (q0 + q1) + (q2 + q3);    \
    for (int l = 0; l < 8; ++l) {                                        \
      ts += a[l];                                                        \
      tq += q[l];                                                        \
    }                                                                    \
    sum += ts;                                                           \
    sq += tq;                                                            \
  }                                                                      \
  *out_sum = sum;                                                        \
  *out_sq = sq;

inline float f32_of(float x) { return x; }
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t w = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}

LORAM_FAST_CLONES void row_sums_f32(const float* x, int64_t n, double* out_sum, double* out_sq) {
  LORAM_FAST_ROW_SUMS_BODY(LORAM_FAST_LOAD8_F32, f32_of)
}

LORAM_FAST_CLONES void row_sums_bf16(const uint16_t* x, int64_t n, double* out_sum, double* out_sq) {
  LORAM_FAST_ROW_SUMS_BODY(LORAM_FAST_LOAD8_BF16, bf16_bits_to_float)
}

// Any dtype, any stride: float lanes by element conversion.
template <typename scalar_t>
void row_sums_generic(const scalar_t* x, int64_t n, int64_t stride, double* out_sum, double* out_sq) {
  double sum = 0.0, sq = 0.0;
  for (int64_t start = 0; start < n; start += kFlush) {
    const int64_t stop = std::min(n, start + kFlush);
    float a[8] = {0}, q[8] = {0};
    int64_t j = start;
    for (; j + 8 <= stop; j += 8) {
      for (int l = 0; l < 8; ++l) {
        const float v = static_cast<float>(x[(j + l) * stride]);
        a[l] += v;
        q[l] += v * v;
      }
    }
    for (; j < stop; ++j) {
      const float v = static_cast<float>(x[j * stride]);
      a[0] += v;
      q[0] += v * v;
    }
    for (int l = 0; l < 8; ++l) {
      sum += a[l];
      sq += q[l];
    }
  }
  *out_sum = sum;
  *out_sq = sq;
}

template <typename scalar_t>
inline void row_sums(const scalar_t* x, int64_t n, int64_t stride, double* s, double* q) {
  if (stride == 1 && std::is_same<scalar_t, float>::value) {
    row_sums_f32(reinterpret_cast<const float*>(x), n, s, q);
  } else if (stride == 1 && std::is_same<scalar_t, at::BFloat16>::value) {
    row_sums_bf16(reinterpret_cast<const uint16_t*>(x), n, s, q);
  } else {
    row_sums_generic(x, n, stride, s, q);
  }
}

// row[j] <- round(row[j] + a * p[j]) for j < n, contiguous; bf16 rounding as c10 does it.
LORAM_FAST_CLONES void axpy_row_bf16(uint16_t* row, const float* p, int64_t n, float a) {
  int64_t j = 0;
  const f32x8 av = {a, a, a, a, a, a, a, a};
  for (; j + 8 <= n; j += 8) {
    f32x8 w, u;
    LORAM_FAST_LOAD8_BF16(w, row + j);
    std::memcpy(&u, p + j, 32);
    const f32x8 r = w + av * u;
    LORAM_FAST_STORE8_BF16(row + j, r);
  }
  for (; j < n; ++j) {
    const at::BFloat16 v(bf16_bits_to_float(row[j]) + a * p[j]);
    row[j] = v.x;
  }
}

template <typename scalar_t>
void axpy_row_generic(scalar_t* row, int64_t stride, const float* p, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j)
    row[j * stride] = static_cast<scalar_t>(static_cast<float>(row[j * stride]) + a * p[j]);
}

std::tuple<at::Tensor, at::Tensor> row_moments(const at::Tensor& W) {
  TORCH_CHECK(W.dim() == 2, "loram_fast.row_moments: W must be 2-D");
  const int64_t m = W.size(0), n = W.size(1), sm = W.stride(0), sn = W.stride(1);
  auto opts = W.options().dtype(at::kFloat);
  at::Tensor sums = at::empty({m}, opts), sqs = at::empty({m}, opts);
  float* ps = sums.data_ptr<float>();
  float* pq = sqs.data_ptr<float>();
  if (sn != 1 && sm == 1 && m > 1) {  // column-major view (e.g. a Conv1D transpose): reduce the stored rows
    at::Tensor t = col_sq(W.t());   // sums of squares of W's rows
    at::Tensor s = W.sum(1, false, at::kFloat);
    return {s, t};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "row_moments", [&] {
    const scalar_t* w = W.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
    at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double s, q;
        row_sums(w + i * sm, n, sn, &s, &q);
        ps[i] = static_cast<float>(s);
        pq[i] = static_cast<float>(q);
      }
    });
  });
  return {sums, sqs};
}

// W[rows] += alpha * P with P = left[rows] @ right (BLAS, fp32), one row chunk at a time (at most ~1M products:
// a 4 MiB fp32 temporary). fp32 W: BLAS updates it in place. bf16/fp16 W: one fused pass reads W and P and writes
// W rounded once. A column-major view (Conv1D's transpose) is updated as its stored transpose.
void chunked_update(at::Tensor W, at::Tensor left, at::Tensor right, double alpha) {
  if (W.stride(1) != 1 && W.stride(0) == 1 && W.size(0) > 1) {
    W = W.t();
    std::swap(left, right);
    left = left.t();
    right = right.t();
  }
  const int64_t m = W.size(0), n = W.size(1), sm = W.stride(0), sn = W.stride(1);
  const int64_t step = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(n, 1));
  if (W.scalar_type() == at::kFloat) {
    for (int64_t start = 0; start < m; start += step) {
      const int64_t rows = std::min(step, m - start);
      W.narrow(0, start, rows).addmm_(left.narrow(0, start, rows), right, 1.0, alpha);
    }
    return;
  }
  const float a = static_cast<float>(alpha);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "lowrank_update_", [&] {
    scalar_t* w = W.data_ptr<scalar_t>();
    for (int64_t start = 0; start < m; start += step) {
      const int64_t rows = std::min(step, m - start);
      at::Tensor prod = at::mm(left.narrow(0, start, rows), right).contiguous();  // rows×n fp32
      const float* p = prod.data_ptr<float>();
      const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
      at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          scalar_t* row = w + (start + i) * sm;
          if (sn == 1 && std::is_same<scalar_t, at::BFloat16>::value)
            axpy_row_bf16(reinterpret_cast<uint16_t*>(row), p + i * n, n, a);
          else
            axpy_row_generic(row, sn, p + i * n, n, a);
        }
      });
    }
  });
}

void lowrank_update_(at::Tensor W, const at::Tensor& B, const at::Tensor& A, double alpha) {
  check_update(W, B, A);
  chunked_update(W, B.to(at::kFloat), A.to(at::kFloat), alpha);
}

void loram_residual_(at::Tensor W, double coef, int64_t r, int64_t kind) {
  check_residual(W, r, kind);
  const int64_t m = W.size(0), n = W.size(1);
  auto opts = W.options().dtype(at::kFloat);
  at::Tensor V = at::empty({m, r}, opts), U = at::empty({n, r}, opts);
  fill_basis<float>(V.data_ptr<float>(), m, r, kind);
  fill_basis<float>(U.data_ptr<float>(), n, r, kind);
  chunked_update(W, V, U.t(), -coef);
}

}  // namespace

TORCH_LIBRARY_IMPL(loram_fast, CPU, m) {
  LORAM_FAST_IMPL_ALL(m);
}

}  // namespace loram_fast
