// CPU kernels of loram_fast (registered for the CPU dispatch key). The per-element math is csrc/kernel_math.h,
// shared with the CUDA kernels; the argument checks and layout handling are csrc/common.h.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "../common.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__unix__)
#include <unistd.h>
#endif

namespace loram_fast {
namespace {

// Basis entries (i, k) of the n×r basis, at out[i*r + k] (row-major) or, ``transposed``, out[k*n + i] (its rows are
// the basis vectors). Each is phase_value(P) of an integer phase P reduced into [0, 2H): the 2H distinct values are
// tabulated once and looked up, so only 2H sines are evaluated, not n·r (the CUDA kernel evaluates basis_value(i, k)
// per entry: the same double arithmetic). P is linear in i and in k, so along the stored (contiguous) index it
// steps by a constant modulo 2H: no division per entry.
template <typename scalar_t>
void fill_basis(scalar_t* out, int64_t n, int64_t r, int kind, bool transposed) {
  const int64_t period = 2 * kmath::basis_half(n, kind);
  std::vector<double> table(period);
  at::parallel_for(0, period, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) table[p] = kmath::phase_value(p, n, kind);
  });
  const double* tab = table.data();
  // one stored row: ``count`` entries whose phases start at ``p`` and step by ``step`` (both reduced), walked as 8
  // interleaved sequences (independent adds: the lookups overlap); DCT-II's first vector (column 0) carries 1/√2
  // (basis_value): entry 0 of a row-major row (``scaled == 1``), every entry of the first transposed row
  // (``scaled == count``), rewritten after the walk from their phases
  auto row = [&](scalar_t* dst, int64_t count, int64_t p, int64_t step, int64_t scaled) {
    constexpr int kWays = 8;
    int64_t ps[kWays];
    for (int l = 0; l < kWays; ++l) ps[l] = (p + l * step) % period;
    const int64_t stride = (kWays * step) % period;
    int64_t j = 0;
    for (; j + kWays <= count; j += kWays) {
      for (int l = 0; l < kWays; ++l) {
        dst[j + l] = static_cast<scalar_t>(tab[ps[l]]);
        ps[l] += stride;
        if (ps[l] >= period) ps[l] -= period;
      }
    }
    for (int l = 0; j < count; ++j, ++l) dst[j] = static_cast<scalar_t>(tab[ps[l]]);
    for (int64_t s = 0; s < scaled; ++s)
      dst[s] = static_cast<scalar_t>(tab[(p + (s % period) * step) % period] * kmath::kInvSqrt2);
  };
  const bool dct = kind == 1;
  if (!transposed) {
    at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(r, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t p0 = kmath::basis_phase(i, 0, kind);
        row(out + i * r, r, p0 % period, (kmath::basis_phase(i, 1, kind) - p0) % period, dct ? 1 : 0);
      }
    });
    return;
  }
  at::parallel_for(0, r, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t p0 = kmath::basis_phase(0, k, kind);
      row(out + k * n, n, p0 % period, (kmath::basis_phase(1, k, kind) - p0) % period, dct && k == 0 ? n : 0);
    }
  });
}

void basis_fill_(at::Tensor out, int64_t kind) {
  check_kind(kind);
  check_basis_out(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "basis_fill_", [&] {
    fill_basis<scalar_t>(out.data_ptr<scalar_t>(), out.size(0), out.size(1), static_cast<int>(kind),
                         basis_out_transposed(out));
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

// Bytes ahead of a read stream asked for in advance (prefetcht1): the hardware prefetchers alone leave the memory
// system idle part of the time; 8 KiB ahead made a bf16 moments pass ~15 % faster (a microbenchmark over 460 MB).
// Rows are usually contiguous, so this reaches into the next row; a prefetch past the end of the tensor is harmless.
constexpr int64_t kReadAhead = 8192;

// Ask for the bytes [at + kReadAhead, at + kReadAhead + bytes) (bytes: 64 or 128, one or two cache lines).
inline void read_ahead(const void* at, int64_t bytes) {
  const char* p = static_cast<const char*>(at) + kReadAhead;
  __builtin_prefetch(p, 0, 2);
  if (bytes > 64) __builtin_prefetch(p + 64, 0, 2);
}

// Sum and sum of squares of one contiguous row: two pairs of 8-lane float accumulators, flushed into double.
#define LORAM_FAST_ROW_SUMS_BODY(LOAD8, to_float)                        \
  double sum = 0.0, sq = 0.0;                                            \
  for (int64_t start = 0; start < n; start += kFlush) {                  \
    const int64_t stop = std::min(n, start + kFlush);                    \
    f32x8 a0 = {}, a1 = {}, a2 = {}, a3 = {}, q0 = {}, q1 = {}, q2 = {}, q3 = {}; \
    int64_t j = start;                                                   \
    for (; j + 32 <= stop; j += 32) {                                    \
      read_ahead(x + j, 32 * sizeof(*x));                                \
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

// row[j] <- round(row[j] + a * p[j]) for j < n, contiguous; bf16 rounding as c10 does it.
// Round to bf16 exactly as c10::BFloat16 does (nearest even, NaN -> 0x7FC0), on the bits.
inline uint16_t round_bf16_bits(float y) {
  uint32_t u;
  std::memcpy(&u, &y, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(y != y ? 0x7FC0u : rounded);
}

// One entry of a bf16 row: w + a · k in fp32, rounded once.
inline uint16_t bf16_axpy(uint16_t w, float a, float k) { return round_bf16_bits(bf16_bits_to_float(w) + a * k); }

// (element by element: the compiler vectorises this form better than explicit 8-lane vectors, 2.2× here)
LORAM_FAST_CLONES void axpy_row_bf16(uint16_t* __restrict row, const float* __restrict p, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) row[j] = bf16_axpy(row[j], a, p[j]);
}

LORAM_FAST_CLONES void axpy_row_f32(float* row, const float* p, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) row[j] = kmath::add_scaled(row[j], a, p[j]);
}

// The same with p reversed, row[j] <- row[j] + a · p[n−1−j] (row m−1−i of the LoRAM residual takes row i's K
// reversed: K(m−1−i, n−1−j) = K(i, j)). The row is walked forward, p (in L1) backward: a forward stream is what
// the hardware prefetchers follow best.
LORAM_FAST_CLONES void axpy_reversed_bf16(uint16_t* __restrict row, const float* __restrict p, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) row[j] = bf16_axpy(row[j], a, p[n - 1 - j]);
}

LORAM_FAST_CLONES void axpy_reversed_f32(float* __restrict row, const float* __restrict p, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) row[j] = kmath::add_scaled(row[j], a, p[n - 1 - j]);
}

// Rows of four different weights updated in one sweep against the same row p of K: row_g[j] <- row_g[j] + a_g · p[j]
// (``reversed``: p[n−1−j]), each entry exactly as the one-row loops above update it. p, in L2, is read once for four
// rows instead of once per row (a microbenchmark of 20 bf16 2048×5632 weights: one row at a time ~1.4× the time of
// an in-place pass with p in L2, at its speed with p in L1; four rows per read of p from L2: at its speed again).
constexpr int kGroup = 4;

#define LORAM_FAST_AXPY4(name, T, UPDATE, INDEX)                                                            \
  LORAM_FAST_CLONES void name(T* __restrict r0, T* __restrict r1, T* __restrict r2, T* __restrict r3,          \
                              const float* __restrict p, int64_t n, float a0, float a1, float a2, float a3) { \
    for (int64_t j = 0; j < n; ++j) {                                                                      \
      const float k = p[INDEX];                                                                            \
      r0[j] = UPDATE(r0[j], a0, k);                                                                        \
      r1[j] = UPDATE(r1[j], a1, k);                                                                        \
      r2[j] = UPDATE(r2[j], a2, k);                                                                        \
      r3[j] = UPDATE(r3[j], a3, k);                                                                        \
    }                                                                                                      \
  }
LORAM_FAST_AXPY4(axpy4_bf16, uint16_t, bf16_axpy, j)
LORAM_FAST_AXPY4(axpy4_reversed_bf16, uint16_t, bf16_axpy, n - 1 - j)
LORAM_FAST_AXPY4(axpy4_f32, float, kmath::add_scaled<float>, j)
LORAM_FAST_AXPY4(axpy4_reversed_f32, float, kmath::add_scaled<float>, n - 1 - j)
#undef LORAM_FAST_AXPY4

template <typename scalar_t>
void axpy_row_generic(scalar_t* row, int64_t stride, const float* p, int64_t n, float a, bool reversed) {
  for (int64_t j = 0; j < n; ++j) {
    scalar_t& w = row[j * stride];
    w = kmath::add_scaled(w, a, p[reversed ? n - 1 - j : j]);
  }
}

// row[j] <- itself + a * p[j] (``reversed``: p[n−1−j]), rounded once to the row's dtype.
// On CPUs with AVX512-BF16 the bf16 rows are rounded by vcvtneps2bf16 (nearest even, as c10::BFloat16 rounds), 16
// entries per instruction; a vector holding a NaN or a subnormal (where the instruction gives another NaN, or flushes
// to zero) is rounded on the bits instead, so the result is bit for bit that of the loops above (tested).
// LORAM_FAST_NO_BF16_HW=1 (read once) keeps the portable loops.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 12
#define LORAM_FAST_BF16_HW 1
#define LORAM_FAST_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

LORAM_FAST_BF16_TARGET inline __m256i round_bf16_hw(__m512 y) {
  if (__builtin_expect(_mm512_fpclass_ps_mask(y, 0xA1) != 0, 0)) {  // QNaN (0x01), subnormal (0x20), SNaN (0x80)
    alignas(64) float t[16];
    alignas(32) uint16_t o[16];
    _mm512_store_ps(t, y);
    for (int l = 0; l < 16; ++l) o[l] = round_bf16_bits(t[l]);
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(o));
  }
  return (__m256i)_mm512_cvtneps_pbh(y);
}

LORAM_FAST_BF16_TARGET inline __m512 load_bf16_hw(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 entries of a bf16 row: row[j .. j+15] += a · k, rounded.
LORAM_FAST_BF16_TARGET inline void axpy16_bf16_hw(uint16_t* row, __m512 av, __m512 k) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(row), round_bf16_hw(_mm512_fmadd_ps(av, k, load_bf16_hw(row))));
}

// p[j .. j+15], or reversed: reversed(p[n−16−j .. n−1−j])
LORAM_FAST_BF16_TARGET inline __m512 k16_hw(const float* p, int64_t n, int64_t j, bool reversed) {
  if (!reversed) return _mm512_loadu_ps(p + j);
  const __m512i rev = _mm512_set_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_permutexvar_ps(rev, _mm512_loadu_ps(p + n - 16 - j));
}

// 32 entries of a bf16 row: row[0 .. 31] += a · (k0 | k1), rounded; one mask test for both halves (the hardware
// rounding holds unless a result is NaN or subnormal: then both go through round_bf16_hw's exact path).
LORAM_FAST_BF16_TARGET inline void axpy32_bf16_hw(uint16_t* row, __m512 av, __m512 k0, __m512 k1) {
  const __m512 y0 = _mm512_fmadd_ps(av, k0, load_bf16_hw(row)), y1 = _mm512_fmadd_ps(av, k1, load_bf16_hw(row + 16));
  __m256i h0, h1;
  if (__builtin_expect(_kortestz_mask16_u8(_mm512_fpclass_ps_mask(y0, 0xA1), _mm512_fpclass_ps_mask(y1, 0xA1)), 1)) {
    h0 = (__m256i)_mm512_cvtneps_pbh(y0);
    h1 = (__m256i)_mm512_cvtneps_pbh(y1);
  } else {
    h0 = round_bf16_hw(y0);
    h1 = round_bf16_hw(y1);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(row), h0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + 16), h1);
}

// G bf16 rows (of different weights when G > 1) against one row p of K: rows[g][j] += a[g] · p[j] (``Reversed``:
// p[n−1−j]), each 16 entries of p loaded once for all G rows. ``next`` (G pointers, or null): rows to be updated after
// these, whose cache lines are asked for (for writing) as the same lines of these are updated: one prefetch per 64
// bytes, spread over the row. The row pointers are copied to locals first: the vector stores may alias any memory,
// so pointers read through ``rows`` would be loaded again for every store.
template <int G, bool Reversed>
LORAM_FAST_BF16_TARGET void axpy_rows_bf16_hw_dir(uint16_t* const* rows_in, const float* __restrict p, int64_t n,
                                                  const float* a, const char* const* next_in) {
  uint16_t* rows[G];
  const char* next[G];
  __m512 av[G];
  for (int g = 0; g < G; ++g) {
    rows[g] = rows_in[g];
    next[g] = next_in != nullptr ? next_in[g] : nullptr;
    av[g] = _mm512_set1_ps(a[g]);
  }
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    if (next_in != nullptr)
      for (int g = 0; g < G; ++g) __builtin_prefetch(next[g] + 2 * j, 1, 3);
    const __m512 k0 = k16_hw(p, n, j, Reversed), k1 = k16_hw(p, n, j + 16, Reversed);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) axpy32_bf16_hw(rows[g] + j, av[g], k0, k1);
  }
  for (; j + 16 <= n; j += 16) {
    const __m512 k0 = k16_hw(p, n, j, Reversed);
    for (int g = 0; g < G; ++g) axpy16_bf16_hw(rows[g] + j, av[g], k0);
  }
  for (; j < n; ++j)
    for (int g = 0; g < G; ++g) rows[g][j] = bf16_axpy(rows[g][j], a[g], p[Reversed ? n - 1 - j : j]);
}

template <int G>
inline void axpy_rows_bf16_hw(uint16_t* const* rows, const float* p, int64_t n, const float* a,
                              const char* const* next, bool reversed) {
  (reversed ? axpy_rows_bf16_hw_dir<G, true> : axpy_rows_bf16_hw_dir<G, false>)(rows, p, n, a, next);
}

// Sum and sum of squares of a contiguous bf16 row with 16-lane vectors: the order of LORAM_FAST_ROW_SUMS_BODY
// exactly (its accumulators a0|a1 and a2|a3 side by side in one register each; the squares multiplied, then added),
// so the same bits as row_sums_bf16, with half the instructions (the 8-lane loop is bound by its conversions).
LORAM_FAST_BF16_TARGET void row_sums_bf16_hw(const uint16_t* x, int64_t n, double* out_sum, double* out_sq) {
  double sum = 0.0, sq = 0.0;
  for (int64_t start = 0; start < n; start += kFlush) {
    const int64_t stop = std::min(n, start + kFlush);
    __m512 a01 = _mm512_setzero_ps(), a23 = _mm512_setzero_ps(), q01 = _mm512_setzero_ps(),
           q23 = _mm512_setzero_ps();
    int64_t j = start;
    for (; j + 32 <= stop; j += 32) {
      read_ahead(x + j, 64);
      const __m512 u = load_bf16_hw(x + j), v = load_bf16_hw(x + j + 16);
      a01 = _mm512_add_ps(a01, u);
      a23 = _mm512_add_ps(a23, v);
      q01 = _mm512_add_ps(q01, _mm512_mul_ps(u, u));
      q23 = _mm512_add_ps(q23, _mm512_mul_ps(v, v));
    }
    double ts = 0.0, tq = 0.0;
    for (; j < stop; ++j) {
      const float t = bf16_bits_to_float(x[j]);
      ts += t;
      tq += static_cast<double>(t * t);
    }
    const __m256 a = _mm256_add_ps(_mm256_add_ps(_mm512_castps512_ps256(a01), _mm512_extractf32x8_ps(a01, 1)),
                                   _mm256_add_ps(_mm512_castps512_ps256(a23), _mm512_extractf32x8_ps(a23, 1)));
    const __m256 q = _mm256_add_ps(_mm256_add_ps(_mm512_castps512_ps256(q01), _mm512_extractf32x8_ps(q01, 1)),
                                   _mm256_add_ps(_mm512_castps512_ps256(q23), _mm512_extractf32x8_ps(q23, 1)));
    alignas(32) float al[8], ql[8];
    _mm256_store_ps(al, a);
    _mm256_store_ps(ql, q);
    for (int l = 0; l < 8; ++l) {
      ts += al[l];
      tq += ql[l];
    }
    sum += ts;
    sq += tq;
  }
  *out_sum = sum;
  *out_sq = sq;
}

bool bf16_hw() {
  static const bool ok = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         std::getenv("LORAM_FAST_NO_BF16_HW") == nullptr;
  return ok;
}
#endif

template <typename scalar_t>
inline void row_sums(const scalar_t* x, int64_t n, int64_t stride, double* s, double* q) {
  if (stride == 1 && std::is_same<scalar_t, float>::value) {
    row_sums_f32(reinterpret_cast<const float*>(x), n, s, q);
  } else if (stride == 1 && std::is_same<scalar_t, at::BFloat16>::value) {
#ifdef LORAM_FAST_BF16_HW
    if (bf16_hw()) return row_sums_bf16_hw(reinterpret_cast<const uint16_t*>(x), n, s, q);
#endif
    row_sums_bf16(reinterpret_cast<const uint16_t*>(x), n, s, q);
  } else {
    row_sums_generic(x, n, stride, s, q);
  }
}

// Bytes of a row updated per step when the next row is prefetched alongside (compiler-vectorised loops), each step
// after a prefetch of the same bytes of the next row: spread out, the prefetches keep memory busy without flooding
// the miss queues (whole-row prefetches: 1.25–1.4× the floor on bf16 weights, 256-byte steps: 1.1×).
constexpr int64_t kPrefetchChunk = 256;

// Ask for the cache lines of one row ahead of their use (for writing: they are read, then written).
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 1, 3);
}

template <typename scalar_t>
inline void axpy_row_plain(scalar_t* row, int64_t stride, const float* p, int64_t n, float a, bool reversed) {
  if (stride == 1 && std::is_same<scalar_t, at::BFloat16>::value)
    return (reversed ? axpy_reversed_bf16 : axpy_row_bf16)(reinterpret_cast<uint16_t*>(row), p, n, a);
  if (stride == 1 && std::is_same<scalar_t, float>::value)
    return (reversed ? axpy_reversed_f32 : axpy_row_f32)(reinterpret_cast<float*>(row), p, n, a);
  axpy_row_generic(row, stride, p, n, a, reversed);
}

// ``next`` (contiguous rows only, or null): the row to be updated after this one, prefetched alongside this one.
template <typename scalar_t>
inline void axpy_row(scalar_t* row, int64_t stride, const float* p, int64_t n, float a, bool reversed = false,
                     const char* next = nullptr) {
#ifdef LORAM_FAST_BF16_HW
  if (stride == 1 && std::is_same<scalar_t, at::BFloat16>::value && bf16_hw()) {
    uint16_t* r = reinterpret_cast<uint16_t*>(row);
    return axpy_rows_bf16_hw<1>(&r, p, n, &a, next != nullptr ? &next : nullptr, reversed);
  }
#endif
  if (next == nullptr || stride != 1) return axpy_row_plain(row, stride, p, n, a, reversed);
  // the compiler-vectorised loops in chunks, each after a prefetch of the same chunk of the next row
  const int64_t chunk = kPrefetchChunk / static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t j0 = 0; j0 < n; j0 += chunk) {
    const int64_t j1 = std::min(n, j0 + chunk);
    prefetch_row(next + j0 * sizeof(scalar_t), (j1 - j0) * sizeof(scalar_t));
    axpy_row_plain(row + j0, 1, reversed ? p + (n - j1) : p + j0, j1 - j0, a, reversed);
  }
}

// axpy_row of kGroup rows of different weights (pairwise distinct, so not overlapping) against the same p, each with
// its own coefficient: one sweep where a grouped kernel exists (contiguous bf16 and fp32 rows), else row by row.
template <typename scalar_t>
inline void axpy_rows(scalar_t* const* rows, int64_t stride, const float* p, int64_t n, const float* a, bool reversed,
                      const char* const* next) {
  constexpr bool bf16 = std::is_same<scalar_t, at::BFloat16>::value, f32 = std::is_same<scalar_t, float>::value;
  if (stride != 1 || !(bf16 || f32)) {
    for (int g = 0; g < kGroup; ++g) axpy_row(rows[g], stride, p, n, a[g], reversed, next ? next[g] : nullptr);
    return;
  }
#ifdef LORAM_FAST_BF16_HW
  if (bf16 && bf16_hw())
    return axpy_rows_bf16_hw<kGroup>(reinterpret_cast<uint16_t* const*>(rows), p, n, a, next, reversed);
#endif
  // the compiler-vectorised loops in chunks, each after a prefetch of the same chunk of the next rows
  const int64_t chunk = next == nullptr ? n : kPrefetchChunk / static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t j0 = 0; j0 < n; j0 += chunk) {
    const int64_t j1 = std::min(n, j0 + chunk);
    if (next != nullptr)
      for (int g = 0; g < kGroup; ++g)
        prefetch_row(next[g] + j0 * sizeof(scalar_t), (j1 - j0) * static_cast<int64_t>(sizeof(scalar_t)));
    const float* q = reversed ? p + (n - j1) : p + j0;
    if constexpr (bf16) {
      uint16_t* r[kGroup];
      for (int g = 0; g < kGroup; ++g) r[g] = reinterpret_cast<uint16_t*>(rows[g]) + j0;
      (reversed ? axpy4_reversed_bf16 : axpy4_bf16)(r[0], r[1], r[2], r[3], q, j1 - j0, a[0], a[1], a[2], a[3]);
    } else {
      float* r[kGroup];
      for (int g = 0; g < kGroup; ++g) r[g] = reinterpret_cast<float*>(rows[g]) + j0;
      (reversed ? axpy4_reversed_f32 : axpy4_f32)(r[0], r[1], r[2], r[3], q, j1 - j0, a[0], a[1], a[2], a[3]);
    }
  }
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

// The piece holding entry x of a flattened range: first[p] is piece p's first entry, first.back() the total.
inline int64_t piece_of(const std::vector<int64_t>& first, int64_t x) {
  return std::upper_bound(first.begin(), first.end(), x) - first.begin() - 1;
}

// Totals of several weights (count×2 fp64: sum, sum of squares): row_moments's fp32 partials of every row of every
// weight in one parallel region, then each weight's partials added in fp64 in row order. Each weight is read as it is
// (a column-major view by columns: the caller passes row-major views, see layout.row_major).
at::Tensor weights_moments(at::TensorList Ws) {
  check_moments_batch(Ws);
  const int64_t count = static_cast<int64_t>(Ws.size());
  at::Tensor out = at::zeros({count, 2}, at::TensorOptions().dtype(at::kDouble));
  if (count == 0) return out;
  std::vector<int64_t> first(count + 1, 0);  // first[b]: index of weight b's row 0 among all rows
  int64_t widest = 1;
  for (int64_t b = 0; b < count; ++b) {
    first[b + 1] = first[b] + Ws[b].size(0);
    widest = std::max<int64_t>(widest, Ws[b].size(1));
  }
  std::vector<float> parts(static_cast<size_t>(first[count]) * 2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Ws[0].scalar_type(), "weights_moments", [&] {
    std::vector<const scalar_t*> w(count);
    for (int64_t b = 0; b < count; ++b) w[b] = Ws[b].data_ptr<scalar_t>();
    at::parallel_for(0, first[count], std::max<int64_t>(1, 16384 / widest), [&](int64_t begin, int64_t end) {
      int64_t b = piece_of(first, begin);
      for (int64_t x = begin; x < end; ++x) {
        while (x >= first[b + 1]) ++b;
        const at::Tensor& W = Ws[b];
        double s, q;
        row_sums(w[b] + (x - first[b]) * W.stride(0), W.size(1), W.stride(1), &s, &q);
        parts[2 * x] = static_cast<float>(s);
        parts[2 * x + 1] = static_cast<float>(q);
      }
    });
  });
  double* po = out.data_ptr<double>();
  for (int64_t b = 0; b < count; ++b) {
    double s = 0.0, q = 0.0;
    for (int64_t x = first[b]; x < first[b + 1]; ++x) {
      s += static_cast<double>(parts[2 * x]);
      q += static_cast<double>(parts[2 * x + 1]);
    }
    po[2 * b] = s;
    po[2 * b + 1] = q;
  }
  return out;
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

// W_b -= coef_b · V_r U_rᵀ in place for every weight W_b of one shape (m×n after the layout is normalised), one pass
// over each, O(1) work per entry for any r. K (kernel_math.h) depends on the shape, r and kind only, so each row of
// K is formed once, into a row buffer, and applied to the same row of every weight; and K is centro-symmetric,
// K(m−1−i, n−1−j) = K(i, j), so row i's buffer also serves row m−1−i, reversed: one K per two entries of every
// weight. A row of K: the displacement form, vectorised, except the short run of irregular entries (where
// kmath::closed_form_regular fails: cos β_j decreases with j, so they form one run, found by binary search), from
// exact phases. Every check and allocation happens before the first store: once writing starts nothing can fail.
// Floats of K per thread in the residual kernel: a block of rows that stays in L2 (half of it, from 32 KiB to 1 MiB;
// 512 KiB where the size is unknown) while the weights' rows stream past. Longer runs of each weight's rows than an
// L1-sized block: 1.3× faster on 22 bf16 2048×5632 weights (16.7 vs 22.9 ms, one microbenchmark run).
inline int64_t residual_block_floats() {
  static const int64_t floats = [] {
#if defined(__unix__) && defined(_SC_LEVEL2_CACHE_SIZE)
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#else
    const long l2 = 0;
#endif
    const int64_t bytes = l2 > 0 ? std::min<int64_t>(std::max<int64_t>(l2 / 2, 32 << 10), 1 << 20) : 512 << 10;
    return bytes / static_cast<int64_t>(sizeof(float));
  }();
  return floats;
}

void loram_residual_batch_(at::TensorList weights, at::ArrayRef<double> coefs, int64_t r, int64_t kind_) {
  check_residual_batch(weights, coefs, r, kind_);
  if (weights.empty()) return;
  std::vector<at::Tensor> Ws;
  for (const auto& W : weights) Ws.push_back(stored_transposed(weights[0]) ? W.t() : W);  // same formula, m ⇄ n
  const int kind = static_cast<int>(kind_);
  const int64_t m = Ws[0].size(0), n = Ws[0].size(1), count = static_cast<int64_t>(Ws.size());
  if (m == 0 || n == 0) return;
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
  std::vector<float> scales(count);
  for (int64_t b = 0; b < count; ++b) scales[b] = static_cast<float>(-coefs[b] * kmath::closed_form_amp(m, n, kind));
  // pairs go in blocks whose rows of K stay in L2 while they are applied weight by weight; the weights' rows are
  // visited in a fixed order (per weight: the block's rows i, then rows m−1−i, all in ascending addresses), and the
  // row after the current one is prefetched as the current one is updated, so memory traffic overlaps the arithmetic
  const int64_t pairs = (m + 1) / 2;  // rows i and m−1−i together (the middle row of an odd m alone)
  const int64_t block = std::min<int64_t>(pairs, std::max<int64_t>(1, residual_block_floats() / n));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<float> buffers(static_cast<size_t>(threads) * block * n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Ws[0].scalar_type(), "loram_residual_", [&] {
    std::vector<scalar_t*> w(count);
    for (int64_t b = 0; b < count; ++b) w[b] = Ws[b].data_ptr<scalar_t>();
    const int64_t sm = Ws[0].stride(0), sn = Ws[0].stride(1);  // the same for all (check_residual_batch)
    const int64_t blocks = (pairs + block - 1) / block;
    const int64_t row_bytes = sn == 1 ? n * static_cast<int64_t>(sizeof(scalar_t)) : 0;  // prefetch dense rows only
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      const int64_t slot = std::min<int64_t>(at::get_thread_num(), threads - 1);
      float* k = buffers.data() + static_cast<size_t>(slot) * block * n;
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t i0 = blk * block, len = std::min(pairs, i0 + block) - i0;
        for (int64_t i = i0; i < i0 + len; ++i) {
          float* ki = k + (i - i0) * n;
          const kmath::Terms row = rows[i];
          closed_form_row(ki, row, cp.data(), cq.data(), cc.data(), n);
          for (int64_t j = los[i]; j < his[i]; ++j)  // the irregular run (regular entries inside it: same result)
            ki[j] = kmath::closed_form_entry(row, kmath::Terms{cp[j], cq[j], cc[j]}, i, j, m, n, r, kind);
        }
        // visit v < 2 len: row i0 + v (v < len) with K forward, else row m−1−(i0 + u), u = 2 len − 1 − v, with K
        // reversed: every row walked in ascending addresses, the rows too. The weights go kGroup at a time (each row of
        // K read once per kGroup rows), the rest one by one; the rows of the next visit are asked for as the current
        // ones are updated, so memory traffic overlaps the arithmetic
        auto pair_of = [&](int64_t v) { return v < len ? v : 2 * len - 1 - v; };  // the block row of K visit v uses
        auto row_at = [&](int64_t b, int64_t v) {
          const int64_t u = pair_of(v);
          return w[b] + (v < len ? i0 + u : m - 1 - (i0 + u)) * sm;
        };
        for (int64_t b0 = 0; b0 < count;) {
          bool grouped = b0 + kGroup <= count;  // kGroup distinct weights (a weight given twice goes twice, in turn)
          for (int64_t x = b0; grouped && x < b0 + kGroup; ++x)
            for (int64_t y = b0; y < x; ++y) grouped = grouped && w[x] != w[y];
          const int64_t size = grouped ? kGroup : 1, after = b0 + size;
          for (int64_t v = 0; v < 2 * len; ++v) {
            const int64_t u = pair_of(v);
            const bool forward = v < len;
            if (!forward && m - 1 - (i0 + u) == i0 + u) continue;  // the middle row of an odd m: done forward
            scalar_t* rows[kGroup];
            const char* next[kGroup] = {};
            for (int64_t g = 0; g < size; ++g) {
              rows[g] = row_at(b0 + g, v);
              // the same weight's row of the next visit; after the last visit, the next weights' first rows
              const int64_t nb = v + 1 < 2 * len ? b0 + g : after + g;
              if (row_bytes > 0 && nb < count)
                next[g] = reinterpret_cast<const char*>(row_at(nb, v + 1 < 2 * len ? v + 1 : 0));
            }
            if (grouped) {
              for (int64_t g = 1; g < size; ++g)
                if (next[g] == nullptr) next[g] = next[0];  // fewer weights after these than kGroup
              axpy_rows(rows, sn, k + u * n, n, &scales[b0], /*reversed=*/!forward,
                        next[0] != nullptr ? next : nullptr);
            } else {
              axpy_row(rows[0], sn, k + u * n, n, scales[b0], /*reversed=*/!forward, next[0]);
            }
          }
          b0 = after;
        }
      }
    });
  });
}

void loram_residual_(at::Tensor W, double coef, int64_t r, int64_t kind) {
  loram_residual_batch_({W}, {coef}, r, kind);
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

// out[j] = alpha · src[j] rounded to bf16 and held in fp32 (the high half of the float: the rounded bits << 16).
LORAM_FAST_CLONES void scale_rounded_bf16(float* __restrict out, const float* __restrict src, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = static_cast<uint32_t>(round_bf16_bits(a * src[j])) << 16;
    std::memcpy(out + j, &bits, 4);
  }
}

void scale_rounded_span(float* out, const float* src, int64_t n, float a, int c) {
  if (c == kmath::kBF16) return scale_rounded_bf16(out, src, n, a);
  for (int64_t j = 0; j < n; ++j) out[j] = kmath::round_to_code(a * src[j], c);
}

// Outputs of at least this many bytes, not written in place, are formed in an L1 block and written with
// non-temporal stores: no read of the destination's old lines before they are overwritten (fp32 adapters of a whole
// model at r = 256 are ~0.8 GB that nothing reads back soon). LORAM_FAST_NO_STREAM=1 (read once) keeps plain stores.
constexpr int64_t kStreamMinBytes = int64_t(1) << 20;

#if defined(__x86_64__)
// n floats (a multiple of 16) from a 64-byte aligned block in L1 to 64-byte aligned out, non-temporal: whole 64-byte
// lines per store with AVX-512 (measured ~10 % faster than 16-byte stores here, ~1.1× plain stores), else SSE.
__attribute__((target("avx512f"))) void stream_block_512(float* out, const float* block, int64_t n) {
  for (int64_t k = 0; k < n; k += 16) _mm512_stream_ps(out + k, _mm512_load_ps(block + k));
}

void stream_block(float* out, const float* block, int64_t n) {
  static const bool wide = __builtin_cpu_supports("avx512f");
  if (wide) return stream_block_512(out, block, n);
  for (int64_t k = 0; k < n; k += 4) _mm_stream_ps(out + k, _mm_load_ps(block + k));
}
#endif

// out[b, e) = scale_rounded(src[b, e)): ``stream``: formed in an L1 block and written with non-temporal stores (the
// caller fences), else plain stores.
void scale_rounded_range(float* po, const float* ps, int64_t b, int64_t e, float a, int c, bool stream) {
#if defined(__x86_64__)
  if (stream) {
    constexpr int64_t kBlock = 1024;  // 4 KiB
    alignas(64) float block[kBlock];
    int64_t j = b;
    const int64_t head = std::min<int64_t>(e - b, ((64 - reinterpret_cast<uintptr_t>(po + b) % 64) % 64) / 4);
    scale_rounded_span(po + j, ps + j, head, a, c);  // up to the first 64-byte boundary (floats are 4-aligned)
    j += head;
    for (; j + kBlock <= e; j += kBlock) {
      scale_rounded_span(block, ps + j, kBlock, a, c);
      stream_block(po + j, block, kBlock);
    }
    scale_rounded_span(po + j, ps + j, e - j, a, c);
    return;
  }
#endif
  scale_rounded_span(po + b, ps + b, e - b, a, c);
}

// Every (out, src, alpha) of the batch in one parallel region over all their entries (each entry as scale_rounded_
// forms it, so the same bits as one call per pair). Everything is checked before the first store, and nothing after
// it can fail: the writer forms adapters in their parameters' own memory with it, with no copy to restore.
void scale_rounded_batch_(at::TensorList outs, at::TensorList srcs, at::ArrayRef<double> alphas, int64_t code) {
  check_scale_rounded_batch(outs, srcs, alphas, code);
  for (size_t i = 0; i < outs.size(); ++i)
    TORCH_CHECK(outs[i].device().is_cpu(), "loram_fast.scale_rounded_batch_: expected CPU tensors");
  const int64_t count = static_cast<int64_t>(outs.size());
  const int c = static_cast<int>(code);
#if defined(__x86_64__)
  static const bool stream_ok = std::getenv("LORAM_FAST_NO_STREAM") == nullptr;
#else
  const bool stream_ok = false;
#endif
  std::vector<int64_t> first(count + 1, 0);  // first[i]: index of pair i's entry 0 among all entries
  std::vector<float*> po(count);
  std::vector<const float*> ps(count);
  std::vector<float> a(count);
  std::vector<char> stream(count);
  for (int64_t i = 0; i < count; ++i) {
    first[i + 1] = first[i] + outs[i].numel();
    po[i] = outs[i].data_ptr<float>();
    ps[i] = srcs[i].data_ptr<float>();
    a[i] = static_cast<float>(alphas[i]);
    // not in place, and large: nothing reads the fresh entries back soon (fp32 adapters of a whole model)
    stream[i] = stream_ok && po[i] != ps[i] && outs[i].numel() * 4 >= kStreamMinBytes;
  }
  at::parallel_for(0, first[count], 1 << 16, [&](int64_t b, int64_t e) {
    int64_t i = piece_of(first, b);
    bool streamed = false;
    for (; i < count && first[i] < e; ++i) {
      const int64_t lo = std::max(b, first[i]) - first[i], hi = std::min(e, first[i + 1]) - first[i];
      if (hi <= lo) continue;
      scale_rounded_range(po[i], ps[i], lo, hi, a[i], c, stream[i] != 0);
      streamed = streamed || stream[i] != 0;
    }
#if defined(__x86_64__)
    if (streamed) _mm_sfence();
#endif
  });
}

void scale_rounded_(at::Tensor out, const at::Tensor& src, double alpha, int64_t code) {
  scale_rounded_batch_({out}, {src}, {alpha}, code);
}

}  // namespace

TORCH_LIBRARY_IMPL(loram_fast, CPU, m) {
  LORAM_FAST_IMPL_ALL(m);
  // batched forms, CPU only: on GPUs, loram_fast/ops/ runs the single-tensor kernels in a loop
  m.impl("weights_moments", &weights_moments);
  m.impl("scale_rounded_batch_", &scale_rounded_batch_);
}

}  // namespace loram_fast
