// CPU kernels of loram_fast (registered for the CPU dispatch key).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>

namespace loram_fast {
namespace {

constexpr double kPi = 3.14159265358979323846;

// Basis entry for row i, column k of a length-n basis: exact integer phase, reduced to (-H, H].
inline double basis_value(int64_t i, int64_t k, int64_t n, int64_t kind) {
  int64_t half, phase;
  double amp;
  if (kind == 0) {  // DST-I: sqrt(2/(n+1)) sin(pi (i+1)(k+1) / (n+1))
    half = n + 1;
    phase = ((i + 1) * (k + 1)) % (2 * half);
    amp = std::sqrt(2.0 / static_cast<double>(half));
  } else {  // DCT-II: sqrt(2/n) c_k cos(pi (2i+1) k / (2n))
    half = 2 * n;
    phase = ((2 * i + 1) * k) % (2 * half);
    amp = std::sqrt(2.0 / static_cast<double>(n));
  }
  if (phase > half) phase -= 2 * half;
  const double angle = static_cast<double>(phase) * (kPi / static_cast<double>(half));
  if (kind == 0) return amp * std::sin(angle);
  const double v = amp * std::cos(angle);
  return k == 0 ? v * 0.70710678118654752440 : v;
}

// Column block of basis values: out[j*r + k] for j in [0, len) (row j of a length-n basis), k in [0, r).
template <typename scalar_t>
void fill_basis(scalar_t* out, int64_t n, int64_t r, int64_t kind) {
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t k = 0; k < r; ++k) out[i * r + k] = static_cast<scalar_t>(basis_value(i, k, n, kind));
  });
}

void check_kind(int64_t kind) { TORCH_CHECK(kind == 0 || kind == 1, "loram_fast: basis kind must be 0 or 1"); }

void basis_fill_(at::Tensor out, int64_t kind) {
  check_kind(kind);
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "loram_fast.basis_fill_: out must be a contiguous 2-D tensor");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "basis_fill_", [&] {
    fill_basis<scalar_t>(out.data_ptr<scalar_t>(), out.size(0), out.size(1), kind);
  });
}

void basis_fill_batched_(at::Tensor out, at::IntArrayRef ns, at::IntArrayRef rs, at::IntArrayRef offsets,
                         int64_t kind) {
  check_kind(kind);
  TORCH_CHECK(out.dim() == 1 && out.is_contiguous(), "loram_fast.basis_fill_batched_: out must be a flat buffer");
  TORCH_CHECK(ns.size() == rs.size() && ns.size() == offsets.size(), "loram_fast.basis_fill_batched_: lengths differ");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "basis_fill_batched_", [&] {
    for (size_t b = 0; b < ns.size(); ++b) {
      TORCH_CHECK(offsets[b] + ns[b] * rs[b] <= out.numel(), "loram_fast.basis_fill_batched_: buffer too small");
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

// Sum and sum of squares of x[0], x[stride], ..., x[(n-1)*stride]: 16 float lanes (vectorisable, independent
// accumulators), flushed into double every 4096 elements, so the result is accurate to ~1e-9 relative.
template <typename scalar_t>
inline void row_sums(const scalar_t* x, int64_t n, int64_t stride, double& sum, double& sq) {
  constexpr int L = 16;
  constexpr int64_t kFlush = 4096;
  sum = 0.0;
  sq = 0.0;
  for (int64_t start = 0; start < n; start += kFlush) {
    const int64_t stop = std::min(n, start + kFlush);
    float a[L] = {0}, q[L] = {0};
    int64_t j = start;
    if (stride == 1) {
      for (; j + L <= stop; j += L) {
        for (int l = 0; l < L; ++l) {
          const float v = static_cast<float>(x[j + l]);
          a[l] += v;
          q[l] += v * v;
        }
      }
    }
    for (; j < stop; ++j) {
      const float v = static_cast<float>(x[j * stride]);
      a[0] += v;
      q[0] += v * v;
    }
    for (int l = 0; l < L; ++l) {
      sum += a[l];
      sq += q[l];
    }
  }
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
    at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double s, q;
        row_sums(w + i * sm, n, sn, s, q);
        ps[i] = static_cast<float>(s);
        pq[i] = static_cast<float>(q);
      }
    });
  });
  return {sums, sqs};
}

// W[rows] += alpha * P where P = left[rows] @ right is computed by BLAS in fp32, one row chunk at a time
// (a chunk of at most ~1M products, a 4 MiB fp32 temporary), then added to W in its own dtype with a single rounding.
void chunked_update(at::Tensor& W, const at::Tensor& left, const at::Tensor& right, double alpha) {
  const int64_t m = W.size(0), n = W.size(1), sm = W.stride(0), sn = W.stride(1);
  const int64_t step = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(n, 1));
  if (W.scalar_type() == at::kFloat) {  // fp32: BLAS updates W in place, chunk by chunk (no temporary)
    for (int64_t start = 0; start < m; start += step) {
      const int64_t rows = std::min(step, m - start);
      W.narrow(0, start, rows).addmm_(left.narrow(0, start, rows), right, 1.0, alpha);
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "lowrank_update_", [&] {
    scalar_t* w = W.data_ptr<scalar_t>();
    for (int64_t start = 0; start < m; start += step) {
      const int64_t rows = std::min(step, m - start);
      at::Tensor prod = at::mm(left.narrow(0, start, rows), right).contiguous();  // rows×n fp32
      const float* p = prod.data_ptr<float>();
      const float a = static_cast<float>(alpha);
      at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          scalar_t* row = w + (start + i) * sm;
          const float* prow = p + i * n;
          for (int64_t j = 0; j < n; ++j)
            row[j * sn] = static_cast<scalar_t>(static_cast<float>(row[j * sn]) + a * prow[j]);
        }
      });
    }
  });
}

void lowrank_update_(at::Tensor W, const at::Tensor& B, const at::Tensor& A, double alpha) {
  TORCH_CHECK(W.dim() == 2 && B.dim() == 2 && A.dim() == 2, "loram_fast.lowrank_update_: 2-D tensors expected");
  TORCH_CHECK(B.size(0) == W.size(0) && A.size(1) == W.size(1) && B.size(1) == A.size(0),
              "loram_fast.lowrank_update_: shapes do not chain");
  chunked_update(W, B.to(at::kFloat), A.to(at::kFloat), alpha);
}

void loram_residual_(at::Tensor W, double coef, int64_t r, int64_t kind) {
  check_kind(kind);
  TORCH_CHECK(W.dim() == 2, "loram_fast.loram_residual_: W must be 2-D");
  const int64_t m = W.size(0), n = W.size(1);
  TORCH_CHECK(r >= 1 && r <= std::min(m, n), "loram_fast.loram_residual_: need 1 <= r <= min(m, n)");
  auto opts = W.options().dtype(at::kFloat);
  at::Tensor V = at::empty({m, r}, opts), U = at::empty({n, r}, opts);
  fill_basis<float>(V.data_ptr<float>(), m, r, kind);
  fill_basis<float>(U.data_ptr<float>(), n, r, kind);
  chunked_update(W, V, U.t(), -coef);
}

}  // namespace

TORCH_LIBRARY_IMPL(loram_fast, CPU, m) {
  m.impl("basis_fill_", &basis_fill_);
  m.impl("basis_fill_batched_", &basis_fill_batched_);
  m.impl("row_moments", &row_moments);
  m.impl("col_sq", &col_sq);
  m.impl("lowrank_update_", &lowrank_update_);
  m.impl("loram_residual_", &loram_residual_);
}

}  // namespace loram_fast
