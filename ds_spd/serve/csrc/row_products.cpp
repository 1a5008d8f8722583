// Products of a few activation rows by a weight matrix, reading each weight row once for every activation row:
// out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]). A decode step of several sequences multiplies 2-16 rows by
// every weight matrix; the BLAS small-matrix paths read the weights at about half the rate they read them for one
// row (docs/latency.md). Here a tile of weight rows stays in registers/L1 while every activation row (L1) passes
// over it, so each weight byte comes from memory once. fp32; vectorized by the compiler (-march=native): 16
// floats a vector (one AVX-512 register, two AVX2 ones). GCC 12+ or clang (__builtin_shufflevector).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace {

typedef float v16 __attribute__((vector_size(64)));

inline v16 load(const float* p) {
  v16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// 16 vectors to one: lane i is the sum of vector i's lanes. A tree of half-swaps (15 shuffle pairs and adds)
// instead of 16 serial horizontal sums, which on a 576-wide row cost as much as the products themselves.
inline v16 reduce16(const v16* v) {
  v16 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1],
                                   8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// M activation rows by NB weight rows (NB x M <= 16 vector accumulators, reduced together at the end): per 16
// floats of K, NB weight loads and M activation loads (L1) for NB x M fused multiply-adds.
template <int M, int NB>
inline void tile(const float* __restrict x, int64_t ldx, const float* __restrict w, int64_t ldw, int64_t K,
                 const float* bias, float* __restrict out, int64_t ldo) {
  static_assert(M * NB <= 16, "at most 16 accumulators");
  v16 acc[16] = {};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    v16 wv[NB];
    for (int j = 0; j < NB; ++j) {
      wv[j] = load(w + j * ldw + k);
      // the rows two tiles on (the hardware's prefetcher lags a loop this slow; past the end it reads nothing)
      if (NB <= 8) __builtin_prefetch(w + (j + 2 * NB) * ldw + k, 0, 2);
    }
    for (int m = 0; m < M; ++m) {
      const v16 xv = load(x + m * ldx + k);
      for (int j = 0; j < NB; ++j) acc[j * M + m] += wv[j] * xv;
    }
  }
  const v16 s = reduce16(acc);
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < M; ++m) {
      float r = s[j * M + m];
      for (int64_t kk = k; kk < K; ++kk) r += w[j * ldw + kk] * x[m * ldx + kk];
      out[m * ldo + j] = bias ? r + bias[j] : r;
    }
}

// Weight rows [n0, n1) by M (<= 8) activation rows, 16 / M weight rows a tile.
template <int M>
inline void chunk(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t K, const float* bias,
                  float* out, int64_t ldo, int64_t n0, int64_t n1) {
  constexpr int NB = 16 / M;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) tile<M, NB>(x, ldx, w + n * ldw, ldw, K, bias ? bias + n : nullptr, out + n, ldo);
  for (; n < n1; ++n) tile<M, 1>(x, ldx, w + n * ldw, ldw, K, bias ? bias + n : nullptr, out + n, ldo);
}

// Blocks of 64 weight rows (L2) by every chunk of up to 8 activation rows: each weight byte comes from memory once.
void rows_by_weights(const float* x, int64_t ldx, int64_t M, const float* w, int64_t ldw, int64_t K,
                     const float* bias, float* out, int64_t ldo, int64_t n0, int64_t n1) {
  for (int64_t nb = n0; nb < n1; nb += 64) {
    const int64_t ne = std::min<int64_t>(nb + 64, n1);
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const float* xm = x + m0 * ldx;
      float* om = out + m0 * ldo;
      switch (std::min<int64_t>(8, M - m0)) {
        case 1: chunk<1>(xm, ldx, w, ldw, K, bias, om, ldo, nb, ne); break;
        case 2: chunk<2>(xm, ldx, w, ldw, K, bias, om, ldo, nb, ne); break;
        case 3: chunk<3>(xm, ldx, w, ldw, K, bias, om, ldo, nb, ne); break;
        case 4: chunk<4>(xm, ldx, w, ldw, K, bias, om, ldo, nb, ne); break;
        case 5: chunk<5>(xm, ldx, w, ldw, K, bias, om, ldo, nb, ne); break;
        case 6: chunk<6>(xm, ldx, w, ldw, K, bias, om, ldo, nb, ne); break;
        case 7: chunk<7>(xm, ldx, w, ldw, K, bias, om, ldo, nb, ne); break;
        default: chunk<8>(xm, ldx, w, ldw, K, bias, om, ldo, nb, ne); break;
      }
    }
  }
}

at::Tensor row_products(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "row_products: x [M, K] and w [N, K] expected, got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "row_products: float32 only");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "row_products: CPU tensors only");
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();   // rows read along K (the graph passes them so)
  const at::Tensor wc = w.stride(1) == 1 ? w : w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* b = nullptr;
  at::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->scalar_type() == at::kFloat, "row_products: bias [N] float32 expected");
    bc = bias->contiguous();
    b = bc.data_ptr<float>();
  }
  at::Tensor out = at::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = xc.stride(0), ldw = wc.stride(0);
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {   // weight rows across threads (one, in a TP rank)
    rows_by_weights(xp, ldx, M, wp, ldw, K, b, op, N, n0, n1);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(ds_spd, m) {
  m.def("row_products(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(ds_spd, CPU, m) {
  m.impl("row_products", row_products);
}
