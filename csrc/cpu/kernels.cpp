// CPU kernels of loram_fast (registered for the CPU dispatch key). The per-element math is csrc/kernel_math.h,
// shared with the CUDA kernels; the argument checks and layout handling are csrc/common.h.
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

// Basis entries out[i*r + k]. Each is phase_value(P) of an integer phase P reduced into [0, 2H): the 2H distinct
// values are tabulated once and looked up, so only 2H sines are evaluated, not n·r (the CUDA kernel evaluates
// basis_value(i, k) per entry: the same double arithmetic).
template <typename scalar_t>
void fill_basis(scalar_t* out, int64_t n, int64_t r, int kind) {
  const int64_t period = 2 * kmath::basis_half(n, kind);
  std::vector<double> table(period);
  at::parallel_for(0, period, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) table[p] = kmath::phase_value(p, n, kind);
  });
  const double* tab = table.data();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t k = 0; k < r; ++k) {
        double v = tab[kmath::basis_phase(i, k, kind) % period];
        if (kind == 1 && k == 0) v *= kmath::kInvSqrt2;
        out[i * r + k] = static_cast<scalar_t>(v);
      }
    }
  });
}

void basis_fill_(at::Tensor out, int64_t kind) {
  check_kind(kind);
  check_basis_out(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "basis_fill_", [&] {
    fill_basis<scalar_t>(out.data_ptr<scalar_t>(), out.size(0), out.size(1), static_cast<int>(kind));
  });
}

// ---- vectorised row kernels --------------------------------------------------------------------------------
// Eight float lanes through GCC/Clang vector extensions. On x86-64 Linux with GCC (12 or newer for the AVX-512
// level) the hot loops are compiled three times (target_clones): x86-64-v4 (AVX-512 F/BW/DQ/VL), AVX2 and
// baseline (SSE2), the best one the CPU has picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 12
#define LORAM_FAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
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

LORAM_FAST_CLONES void axpy_row_f32(float* row, const float* p, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) row[j] = kmath::add_scaled(row[j], a, p[j]);
}

template <typename scalar_t>
void axpy_row_generic(scalar_t* row, int64_t stride, const float* p, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) row[j * stride] = kmath::add_scaled(row[j * stride], a, p[j]);
}

// row[j] <- row[j] + a * p[j], rounded once to the row's dtype.
template <typename scalar_t>
inline void axpy_row(scalar_t* row, int64_t stride, const float* p, int64_t n, float a) {
  if (stride == 1 && std::is_same<scalar_t, at::BFloat16>::value)
    axpy_row_bf16(reinterpret_cast<uint16_t*>(row), p, n, a);
  else if (stride == 1 && std::is_same<scalar_t, float>::value)
    axpy_row_f32(reinterpret_cast<float*>(row), p, n, a);
  else
    axpy_row_generic(row, stride, p, n, a);
}

std::tuple<at::Tensor, at::Tensor> row_moments(const at::Tensor& W) {
  check_moments(W);
  const int64_t m = W.size(0), n = W.size(1), sm = W.stride(0), sn = W.stride(1);
  auto opts = W.options().dtype(at::kFloat);
  at::Tensor sums = at::empty({m}, opts), sqs = at::empty({m}, opts);
  float* ps = sums.data_ptr<float>();
  float* pq = sqs.data_ptr<float>();
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

// W[rows] += alpha * P with P = B[rows] @ A (BLAS, fp32), one row chunk at a time (at most ~1M products: a 4 MiB
// fp32 temporary). fp32 W: BLAS updates it in place. bf16/fp16 W: one fused pass reads W and P and writes W
// rounded once (kmath::add_scaled, as the CUDA kernel writes).
void lowrank_update_(at::Tensor W_in, const at::Tensor& B_in, const at::Tensor& A_in, double alpha) {
  check_update(W_in, B_in, A_in);
  const UpdateOperands ops = normalise_update(W_in, B_in, A_in);
  at::Tensor W = ops.W;
  const int64_t m = W.size(0), n = W.size(1), sm = W.stride(0), sn = W.stride(1);
  if (m == 0 || n == 0) return;
  const int64_t step = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(n, 1));
  if (W.scalar_type() == at::kFloat) {
    for (int64_t start = 0; start < m; start += step) {
      const int64_t rows = std::min(step, m - start);
      W.narrow(0, start, rows).addmm_(ops.B.narrow(0, start, rows), ops.A, 1.0, alpha);
    }
    return;
  }
  const float a = static_cast<float>(alpha);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "lowrank_update_", [&] {
    scalar_t* w = W.data_ptr<scalar_t>();
    for (int64_t start = 0; start < m; start += step) {
      const int64_t rows = std::min(step, m - start);
      at::Tensor prod = at::mm(ops.B.narrow(0, start, rows), ops.A).contiguous();  // rows×n fp32
      const float* p = prod.data_ptr<float>();
      const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
      at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) axpy_row(w + (start + i) * sm, sn, p + i * n, n, a);
      });
    }
  });
}

// One row of K (see kernel_math.h) by the displacement form: vectorised (double numerator and denominator, one
// fp32 division per entry), the same arithmetic as kmath::closed_form_fast.
LORAM_FAST_CLONES void closed_form_row(float* out, kmath::Terms row, const double* cp, const double* cq,
                                       const double* cc, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = kmath::closed_form_fast(row.p, row.q, row.c, cp[j], cq[j], cc[j]);
}

// Fused forms for contiguous fp32 and bf16 rows, entries [j0, j1): K by the displacement form and the write, one
// rounding, in one vectorised loop (no row buffer). `a` is row i; `b_end` points one past the end of row m−1−i,
// which takes the same K reversed (K is centro-symmetric: K(m−1−i, n−1−j) = K(i, j)), so each K serves two entries;
// `b_end == nullptr`: row i alone (the middle row of an odd m). bf16 rounding as c10::BFloat16 does it (nearest
// even, NaN -> 0x7FC0), on the bits.
inline uint16_t round_bf16_bits(float y) {
  uint32_t u;
  std::memcpy(&u, &y, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(y != y ? 0x7FC0u : rounded);
}

LORAM_FAST_CLONES void closed_form_pair_f32(float* __restrict a, float* __restrict b_end, kmath::Terms row,
                                            const double* cp, const double* cq, const double* cc, int64_t j0,
                                            int64_t j1, float scale) {
  for (int64_t j = j0; j < j1; ++j) {
    const float k = kmath::closed_form_fast(row.p, row.q, row.c, cp[j], cq[j], cc[j]);
    a[j] = kmath::add_scaled(a[j], scale, k);
    b_end[-1 - j] = kmath::add_scaled(b_end[-1 - j], scale, k);
  }
}

LORAM_FAST_CLONES void closed_form_pair_bf16(uint16_t* __restrict a, uint16_t* __restrict b_end, kmath::Terms row,
                                             const double* cp, const double* cq, const double* cc, int64_t j0,
                                             int64_t j1, float scale) {
  for (int64_t j = j0; j < j1; ++j) {
    const float k = kmath::closed_form_fast(row.p, row.q, row.c, cp[j], cq[j], cc[j]);
    a[j] = round_bf16_bits(bf16_bits_to_float(a[j]) + scale * k);
    b_end[-1 - j] = round_bf16_bits(bf16_bits_to_float(b_end[-1 - j]) + scale * k);
  }
}

LORAM_FAST_CLONES void closed_form_update_f32(float* __restrict w, kmath::Terms row, const double* cp,
                                              const double* cq, const double* cc, int64_t j0, int64_t j1,
                                              float scale) {
  for (int64_t j = j0; j < j1; ++j)
    w[j] = kmath::add_scaled(w[j], scale, kmath::closed_form_fast(row.p, row.q, row.c, cp[j], cq[j], cc[j]));
}

LORAM_FAST_CLONES void closed_form_update_bf16(uint16_t* __restrict w, kmath::Terms row, const double* cp,
                                               const double* cq, const double* cc, int64_t j0, int64_t j1,
                                               float scale) {
  for (int64_t j = j0; j < j1; ++j)
    w[j] = round_bf16_bits(bf16_bits_to_float(w[j]) +
                           scale * kmath::closed_form_fast(row.p, row.q, row.c, cp[j], cq[j], cc[j]));
}

// Ask for the cache lines of one row ahead of their use (for writing: they are read, then written).
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 1, 3);
}

// Row i (and row m−1−i reversed, when `b_end`) of a contiguous fp32 / bf16 weight, entries [0, n): the regular
// segments by the fused loops, the irregular run [lo, hi) by the exact-phase form (kmath::closed_form_entry).
template <typename scalar_t>
void closed_form_rows(scalar_t* a, scalar_t* b_end, const kmath::Terms& row, const double* cp, const double* cq,
                      const double* cc, int64_t lo, int64_t hi, int64_t i, int64_t m, int64_t n, int64_t r, int kind,
                      float scale) {
  constexpr bool f32 = std::is_same<scalar_t, float>::value;
  for (const auto& seg : {std::make_pair(int64_t{0}, lo), std::make_pair(hi, n)}) {
    if (seg.first >= seg.second) continue;
    if (b_end != nullptr && f32)
      closed_form_pair_f32(reinterpret_cast<float*>(a), reinterpret_cast<float*>(b_end), row, cp, cq, cc, seg.first,
                           seg.second, scale);
    else if (b_end != nullptr)
      closed_form_pair_bf16(reinterpret_cast<uint16_t*>(a), reinterpret_cast<uint16_t*>(b_end), row, cp, cq, cc,
                            seg.first, seg.second, scale);
    else if (f32)
      closed_form_update_f32(reinterpret_cast<float*>(a), row, cp, cq, cc, seg.first, seg.second, scale);
    else
      closed_form_update_bf16(reinterpret_cast<uint16_t*>(a), row, cp, cq, cc, seg.first, seg.second, scale);
  }
  for (int64_t j = lo; j < hi; ++j) {  // the irregular run (entries inside it that are regular: same result)
    const float k = kmath::closed_form_entry(row, kmath::Terms{cp[j], cq[j], cc[j]}, i, j, m, n, r, kind);
    a[j] = kmath::add_scaled(a[j], scale, k);
    if (b_end != nullptr) b_end[-1 - j] = kmath::add_scaled(b_end[-1 - j], scale, k);
  }
}

// W -= coef · V_r U_rᵀ in one pass, O(1) work per entry for any r. Per row: the irregular entries (where
// kmath::closed_form_regular fails: cos β_j decreases with j, so they form one short run, found by binary search)
// split the row into at most three segments; contiguous fp32 / bf16 rows are updated in pairs (i, m−1−i), one K
// per two entries, by the fused loops and the run by the exact-phase form; other dtypes and strides go through an
// fp32 row buffer. Every allocation happens before the first store, so once writing starts nothing can fail.
void loram_residual_(at::Tensor W, double coef, int64_t r, int64_t kind_) {
  check_residual(W, r, kind_);
  if (stored_transposed(W)) W = W.t();  // V U^T transposed is the same formula with m and n swapped
  const int kind = static_cast<int>(kind_);
  const int64_t m = W.size(0), n = W.size(1), sm = W.stride(0), sn = W.stride(1);
  std::vector<kmath::Terms> rows(m);
  std::vector<double> cp(n), cq(n), cc(n);
  std::vector<int64_t> los(m), his(m);
  at::parallel_for(0, m, 1024, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) rows[i] = kmath::closed_form_terms(i, m, r, kind);
  });
  at::parallel_for(0, n, 1024, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const kmath::Terms t = kmath::closed_form_terms(j, n, r, kind);
      cp[j] = t.p;
      cq[j] = t.q;
      cc[j] = t.c;
    }
  });
  const float scale = static_cast<float>(-coef * kmath::closed_form_amp(m, n, kind));
  // the run of irregular entries of each row: [lo, hi) holds every j with !closed_form_regular(row.c, cc[j])
  at::parallel_for(0, m, 1024, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const double c = rows[i].c;
      const double* first = std::lower_bound(cc.data(), cc.data() + n, c + 2 * kmath::kNearTol,
                                             [](double x, double v) { return x > v; });
      int64_t lo = first - cc.data(), hi = lo;
      while (hi < n && cc[hi] > c - 2 * kmath::kNearTol) ++hi;
      while (lo < hi && kmath::closed_form_regular(c, cc[lo])) ++lo;
      while (hi > lo && kmath::closed_form_regular(c, cc[hi - 1])) --hi;
      los[i] = lo;
      his[i] = hi;
    }
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "loram_residual_", [&] {
    scalar_t* w = W.data_ptr<scalar_t>();
    constexpr bool fused = std::is_same<scalar_t, float>::value || std::is_same<scalar_t, at::BFloat16>::value;
    if (fused && sn == 1) {
      // rows i and m−1−i together (the middle row of an odd m alone)
      const int64_t pairs = (m + 1) / 2, grain = std::max<int64_t>(8, 32768 / std::max<int64_t>(n, 1));
      at::parallel_for(0, pairs, grain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          if (i + 1 < e) {  // the next pair's rows, so that memory traffic overlaps this pair's arithmetic
            prefetch_row(w + (i + 1) * sm, n * sizeof(scalar_t));
            prefetch_row(w + (m - 2 - i) * sm, n * sizeof(scalar_t));
          }
          scalar_t* mirror = (m - 1 - i == i) ? nullptr : w + (m - 1 - i) * sm + n;
          closed_form_rows(w + i * sm, mirror, rows[i], cp.data(), cq.data(), cc.data(), los[i], his[i], i, m, n, r,
                           kind, scale);
        }
      });
      return;
    }
    std::vector<float> all(static_cast<size_t>(at::get_num_threads()) * n);
    at::parallel_for(0, m, std::max<int64_t>(16, 65536 / std::max<int64_t>(n, 1)), [&](int64_t b, int64_t e) {
      const int64_t slot = std::min<int64_t>(at::get_thread_num(), at::get_num_threads() - 1);
      float* buf = all.data() + static_cast<size_t>(slot) * n;
      for (int64_t i = b; i < e; ++i) {
        const kmath::Terms row = rows[i];
        closed_form_row(buf, row, cp.data(), cq.data(), cc.data(), n);
        for (int64_t j = los[i]; j < his[i]; ++j)
          buf[j] = kmath::closed_form_entry(row, kmath::Terms{cp[j], cq[j], cc[j]}, i, j, m, n, r, kind);
        axpy_row(w + i * sm, sn, buf, n, scale);
      }
    });
  });
}

// Σ_j (x_j + a·p_j)² over a contiguous fp32 / bf16 row, the sum formed in fp32 (DoRA's norm when the adapters are
// fp32): sixteen float lanes flushed into double every kFlush entries.
#define LORAM_FAST_DORA_SQ_BODY(LOAD8, SCALAR)                                       \
  double total = 0.0;                                                                \
  const f32x8 av = {a, a, a, a, a, a, a, a};                                         \
  for (int64_t start = 0; start < n; start += kFlush) {                              \
    const int64_t stop = std::min(n, start + kFlush);                                \
    f32x8 q0 = {}, q1 = {};                                                          \
    int64_t j = start;                                                               \
    for (; j + 16 <= stop; j += 16) {                                                \
      f32x8 w0, w1, p0, p1;                                                          \
      LOAD8(w0, x + j);                                                              \
      LOAD8(w1, x + j + 8);                                                          \
      std::memcpy(&p0, p + j, 32);                                                   \
      std::memcpy(&p1, p + j + 8, 32);                                               \
      const f32x8 v0 = w0 + av * p0, v1 = w1 + av * p1;                              \
      q0 += v0 * v0;                                                                 \
      q1 += v1 * v1;                                                                 \
    }                                                                                \
    double part = 0.0;                                                               \
    for (; j < stop; ++j) {                                                          \
      const float v = SCALAR(x[j]) + a * p[j];                                       \
      part += static_cast<double>(v) * v;                                            \
    }                                                                                \
    const f32x8 q = q0 + q1;                                                         \
    for (int l = 0; l < 8; ++l) part += q[l];                                        \
    total += part;                                                                   \
  }                                                                                  \
  return total;

LORAM_FAST_CLONES double dora_sq_f32(const float* x, const float* p, int64_t n, float a) {
  LORAM_FAST_DORA_SQ_BODY(LORAM_FAST_LOAD8_F32, f32_of)
}

LORAM_FAST_CLONES double dora_sq_bf16(const uint16_t* x, const float* p, int64_t n, float a) {
  LORAM_FAST_DORA_SQ_BODY(LORAM_FAST_LOAD8_BF16, bf16_bits_to_float)
}

// Any dtype, stride and promotion: kmath::dora_entry per entry, squares summed in double.
template <typename scalar_t>
double dora_sq_generic(const scalar_t* x, int64_t stride, const float* p, int64_t n, float a, int product,
                       int promoted) {
  double acc = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double v = kmath::dora_entry(static_cast<float>(x[j * stride]), p[j], a, product, promoted);
    acc += v * v;
  }
  return acc;
}

template <typename scalar_t>
inline double dora_sq(const scalar_t* x, int64_t stride, const float* p, int64_t n, float a, int product,
                      int promoted) {
  if (stride == 1 && product == kmath::kF32 && promoted == kmath::kF32) {
    if (std::is_same<scalar_t, float>::value) return dora_sq_f32(reinterpret_cast<const float*>(x), p, n, a);
    if (std::is_same<scalar_t, at::BFloat16>::value) return dora_sq_bf16(reinterpret_cast<const uint16_t*>(x), p, n, a);
  }
  return dora_sq_generic(x, stride, p, n, a, product, promoted);
}

// ||W[i, :] + alpha * (B @ A)[i, :]|| per row: the product of a row chunk with BLAS (fp32, at most ~1M entries: a
// 4 MiB temporary), then one fused pass per row that forms each entry as peft does (kmath::dora_entry; vectorised for
// contiguous fp32 / bf16 rows with fp32 adapters) and sums its square. W any strides (Conv1D views included).
at::Tensor lowrank_row_norms(const at::Tensor& W, const at::Tensor& B_in, const at::Tensor& A_in, double alpha_,
                             int64_t product_, int64_t promoted_) {
  check_row_norms(W, B_in, A_in, product_, promoted_);
  const int64_t m = W.size(0), n = W.size(1), sm = W.stride(0), sn = W.stride(1);
  const at::Tensor B = B_in.to(at::kFloat).contiguous(), A = A_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({m}, W.options().dtype(at::kFloat));
  if (m == 0) return out;
  float* po = out.data_ptr<float>();
  const float alpha = static_cast<float>(alpha_);
  const int product = static_cast<int>(product_), promoted = static_cast<int>(promoted_);
  const int64_t step = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(n, 1));
  for (int64_t start = 0; start < m; start += step) {
    const int64_t rows = std::min(step, m - start);
    const at::Tensor P = at::mm(B.narrow(0, start, rows), A);  // rows×n, contiguous fp32
    const float* pp = P.data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "lowrank_row_norms", [&] {
      const scalar_t* w = W.data_ptr<scalar_t>();
      const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
      at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          po[start + i] = static_cast<float>(std::sqrt(dora_sq(w + (start + i) * sm, sn, pp + i * n, n, alpha,
                                                               product, promoted)));
        }
      });
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(loram_fast, CPU, m) {
  LORAM_FAST_IMPL_ALL(m);
}

}  // namespace loram_fast
