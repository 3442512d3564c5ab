// CPU kernels for the fast net: its elementwise layers and an im2col copy (native.py says
// why).
//
// pool_bn_gelu: an optional 2x2 max-pool, then BatchNorm with batch statistics, then
// the GELU (the erf form, by rational functions within 2e-6, below), on bf16 tensors in
// channels_last layout, forward and backward; the GELU alone (gelu_forward,
// gelu_backward) for the layer with no BatchNorm before it; and im2col_filter_grad, the
// small maps' filter gradients as matrix products (at the end of this file).
// Unfused, PyTorch runs these as five to seven passes over memory per direction, and its
// max-pool writes an int64 index per output; here the forward is two passes (pool and
// statistics, then normalise and GELU) and the backward two (the two per-channel sums,
// then the input gradient, scattered back through the pool), with a one-byte pool code.
// Arithmetic is fp32; statistics are accumulated in double per chunk; the gradient at the
// GELU's input passes between the backward's two passes in bf16, as in PyTorch's layers.
// Compiled for AVX-512 (F, BW, VL; BF16 where present); native.py only loads it on CPUs
// that have the first three.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

using u16 = uint16_t;

inline __mmask16 lanes_left(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

inline __m512 load_bf16(__mmask16 k, const u16* p) {
  __m256i a = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(a), 16));
}

inline __m512 widen(__m256i a) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(a), 16));
}

// fp32 -> bf16, rounding to nearest even (as PyTorch does); NaN stays a quiet NaN. With
// AVX512-BF16 (native.py compiles for it where the CPU has it) one instruction does it,
// flushing subnormals (below 1.2e-38) to zero on the way.
inline __m256i narrow(__m512 v) {
#ifdef __AVX512BF16__
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_srli_epi32(r, 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
#endif
}

inline void store_bf16(u16* p, __mmask16 k, __m512 v) {
  _mm256_mask_storeu_epi16(p, k, narrow(v));
}

// (p - mean) * invstd for 16 channels
inline __m512 normalized(__mmask16 k, const u16* p, const float* mean, const float* invstd) {
  return _mm512_mul_ps(_mm512_sub_ps(load_bf16(k, p), _mm512_maskz_loadu_ps(k, mean)),
                       _mm512_maskz_loadu_ps(k, invstd));
}

// The GELU and its derivative as rational functions of z (no exp): both are 1/2 plus an
// odd function, z P(z^2) / Q(z^2), fitted over |z| <= 5.5 (scripts/fit_gelu.py; beyond it
// the CDF is within 2e-8 of 0 or 1 and z is clamped there). Largest errors: 1.8e-6 for
// Phi(z), the normal CDF, and 1.9e-6 for GELU'(z) = Phi(z) + z phi(z), far below bf16's
// resolution (2^-8), and each about half the arithmetic of an exp-based erf, which took
// a fifth to a half of these kernels' time on the AMX Xeon (docs/fast-recipe.md, "A
// ninth round"). The backward needs only GELU', so it never evaluates Phi or phi.
constexpr float CDF_P[] = {0.398951617f, 0.030122883f, 0.00434366143f, 6.38706071e-05f};
constexpr float CDF_Q[] = {1.0f, 0.242279595f, 0.0261316094f, 0.00151458156f, 4.07922829e-06f};
constexpr float DGELU_P[] = {0.797872507f, -0.0170460811f, 0.0127480048f, 0.000312135033f,
                             2.29213224e-05f};
constexpr float DGELU_Q[] = {1.0f, 0.311866756f, 0.0451305433f, 0.00377602129f,
                             0.000254113018f, 2.70646927e-06f};
constexpr float GELU_CLAMP = 5.5f;

template <int NP, int NQ>
inline __m512 half_plus_odd(__m512 z, const float (&p)[NP], const float (&q)[NQ]) {
  // max/min return their second operand where either is NaN: a NaN z stays NaN
  z = _mm512_min_ps(_mm512_set1_ps(GELU_CLAMP), _mm512_max_ps(_mm512_set1_ps(-GELU_CLAMP), z));
  const __m512 t = _mm512_mul_ps(z, z);
  __m512 num = _mm512_set1_ps(p[NP - 1]);
  for (int i = NP - 2; i >= 0; i--) num = _mm512_fmadd_ps(num, t, _mm512_set1_ps(p[i]));
  __m512 den = _mm512_set1_ps(q[NQ - 1]);
  for (int i = NQ - 2; i >= 0; i--) den = _mm512_fmadd_ps(den, t, _mm512_set1_ps(q[i]));
  // 1 / den: the approximate reciprocal (2^-14) and one Newton step (a divide costs more
  // than the rest of this function); den >= 1 on the whole range
  __m512 r = _mm512_rcp14_ps(den);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(den, r, _mm512_set1_ps(2.0f)));
  return _mm512_fmadd_ps(_mm512_mul_ps(z, num), r, _mm512_set1_ps(0.5f));
}

// the CDF kept >= 0, so GELU(z) never takes the wrong sign in the far tail (and
// GELU(-inf) is NaN, as PyTorch's)
inline __m512 gelu(__m512 z) {
  return _mm512_mul_ps(z, _mm512_max_ps(half_plus_odd(z, CDF_P, CDF_Q), _mm512_setzero_ps()));
}
inline __m512 gelu_grad(__m512 z) { return half_plus_odd(z, DGELU_P, DGELU_Q); }

// the chunks a pass is split into: a few per thread, each with its own partial sums
int64_t chunk_count(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(rows, 4 * at::get_num_threads()));
}

struct Sums {  // per-channel partial sums of one chunk: float per row, double per chunk
  std::vector<float> f1, f2;
  std::vector<double> d1, d2;
  explicit Sums(int64_t c) : f1(c), f2(c), d1(c), d2(c) {}
  void flush() {
    for (size_t c = 0; c < f1.size(); c++) {
      d1[c] += f1[c]; d2[c] += f2[c]; f1[c] = 0; f2[c] = 0;
    }
  }
};

inline void accumulate(Sums& s, int64_t c, __mmask16 k, __m512 a, __m512 b) {
  _mm512_mask_storeu_ps(s.f1.data() + c, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, s.f1.data() + c), a));
  _mm512_mask_storeu_ps(s.f2.data() + c, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, s.f2.data() + c), b));
}

// Pass 1: max-pool x (N, H, W, C) into p (N, H/2, W/2, C) with codes 0-3 (which of the
// window's four won: PyTorch's order and tie rule, NaN wins), and sum p - shift and its
// square per channel. Without pooling p is x and only the sums are made.
void pool_and_sums(const u16* X, u16* P, uint8_t* K, int64_t N, int64_t H, int64_t W,
                   int64_t C, bool pool, const float* shift, double* s1, double* s2) {
  const int64_t h = pool ? H / 2 : H, w = pool ? W / 2 : W, rows = N * h;
  const int64_t chunks = chunk_count(rows);
  std::vector<Sums> sums(chunks, Sums(C));
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ch++) {
      Sums& s = sums[ch];
      for (int64_t r = rows * ch / chunks; r < rows * (ch + 1) / chunks; r++) {
        const int64_t n = r / h, i = r % h;
        for (int64_t j = 0; j < w; j++) {
          const int64_t o = (r * w + j) * C;
          const u16* p0 = pool ? X + ((n * H + 2 * i) * W + 2 * j) * C : X + o;
          for (int64_t c = 0; c < C; c += 16) {
            const __mmask16 k = lanes_left(C - c);
            __m256i best = _mm256_maskz_loadu_epi16(k, p0 + c);
            __m512 v = widen(best);
            if (pool) {
              const u16* q[3] = {p0 + C, p0 + W * C, p0 + W * C + C};
              __m128i code = _mm_setzero_si128();
              for (int t = 0; t < 3; t++) {
                __m256i a = _mm256_maskz_loadu_epi16(k, q[t] + c);
                __m512 u = widen(a);
                __mmask16 win = _mm512_cmp_ps_mask(u, v, _CMP_GT_OQ) |
                                _mm512_cmp_ps_mask(u, u, _CMP_UNORD_Q);
                v = _mm512_mask_blend_ps(win, v, u);
                best = _mm256_mask_blend_epi16(win, best, a);
                code = _mm_mask_blend_epi8(win, code, _mm_set1_epi8(char(t + 1)));
              }
              _mm256_mask_storeu_epi16(P + o + c, k, best);
              _mm_mask_storeu_epi8(K + o + c, k, code);
            }
            __m512 d = _mm512_sub_ps(v, _mm512_maskz_loadu_ps(k, shift + c));
            accumulate(s, c, k, d, _mm512_mul_ps(d, d));
          }
        }
        s.flush();
      }
    }
  });
  for (int64_t ch = 0; ch < chunks; ch++)
    for (int64_t c = 0; c < C; c++) { s1[c] += sums[ch].d1[c]; s2[c] += sums[ch].d2[c]; }
}

}  // namespace

// Returns (y, p, code, mean, invstd, var): p is the pooled input (x itself without pooling),
// var the biased batch variance, all per-channel values fp32.
std::vector<torch::Tensor> pool_bn_gelu_forward(torch::Tensor x, torch::Tensor weight,
                                                torch::Tensor bias, double eps, bool pool) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kBFloat16 &&
              x.is_contiguous(at::MemoryFormat::ChannelsLast), "x: 4-d bf16, channels_last");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t h = pool ? H / 2 : H, w = pool ? W / 2 : W, M = N * h * w;
  TORCH_CHECK(M > 1, "BatchNorm needs more than one value per channel");
  auto cl = at::MemoryFormat::ChannelsLast;
  auto f32 = x.options().dtype(torch::kFloat32);
  torch::Tensor p = pool ? torch::empty({N, C, h, w}, x.options().memory_format(cl)) : x;
  torch::Tensor code = pool ? torch::empty({N, C, h, w}, x.options().dtype(torch::kUInt8).memory_format(cl))
                            : torch::empty({0}, x.options().dtype(torch::kUInt8));
  const u16* X = reinterpret_cast<const u16*>(x.data_ptr());
  // the first image's top-left values as the shift: sums of p - shift lose less to rounding
  std::vector<float> shift(C);
  for (int64_t c = 0; c < C; c++) {
    uint32_t u = uint32_t(X[c]) << 16;
    std::memcpy(&shift[c], &u, 4);
    if (!std::isfinite(shift[c])) shift[c] = 0;
  }
  std::vector<double> s1(C), s2(C);
  pool_and_sums(X, reinterpret_cast<u16*>(p.data_ptr()), pool ? code.data_ptr<uint8_t>() : nullptr,
                N, H, W, C, pool, shift.data(), s1.data(), s2.data());
  auto mean = torch::empty({C}, f32), invstd = torch::empty({C}, f32), var = torch::empty({C}, f32);
  for (int64_t c = 0; c < C; c++) {
    const double m1 = s1[c] / M, v = std::max(0.0, s2[c] / M - m1 * m1);
    mean.data_ptr<float>()[c] = float(shift[c] + m1);
    var.data_ptr<float>()[c] = float(v);
    invstd.data_ptr<float>()[c] = float(1.0 / std::sqrt(v + eps));
  }
  // y = gelu((p - mean) * invstd * weight + bias): the mean taken off first, as PyTorch
  // does, so a channel with a large mean and a tiny spread keeps its digits
  auto wt = weight.to(torch::kFloat32).contiguous(), bs = bias.to(torch::kFloat32).contiguous();
  const float *mu = mean.data_ptr<float>(), *is = invstd.data_ptr<float>();
  const float *wv = wt.data_ptr<float>(), *bv = bs.data_ptr<float>();
  auto y = torch::empty({N, C, h, w}, x.options().memory_format(cl));
  const u16* Pp = reinterpret_cast<const u16*>(p.data_ptr());
  u16* Y = reinterpret_cast<u16*>(y.data_ptr());
  at::parallel_for(0, M, 256, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; m++)
      for (int64_t c = 0; c < C; c += 16) {
        const __mmask16 k = lanes_left(C - c);
        __m512 z = _mm512_fmadd_ps(normalized(k, Pp + m * C + c, mu + c, is + c),
                                   _mm512_maskz_loadu_ps(k, wv + c), _mm512_maskz_loadu_ps(k, bv + c));
        store_bf16(Y + m * C + c, k, gelu(z));
      }
  });
  return {y, p, code, mean, invstd, var};
}

// Returns (gx, gweight, gbias): gx in x's shape (N, C, H, W), zero where the pool dropped.
std::vector<torch::Tensor> pool_bn_gelu_backward(torch::Tensor gy, torch::Tensor p, torch::Tensor code,
                                                 torch::Tensor weight, torch::Tensor bias,
                                                 torch::Tensor mean, torch::Tensor invstd,
                                                 bool pool, int64_t H, int64_t W) {
  auto cl = at::MemoryFormat::ChannelsLast;
  gy = gy.to(torch::kBFloat16).contiguous(cl);
  const int64_t N = p.size(0), C = p.size(1), h = p.size(2), w = p.size(3), M = N * h * w;
  auto wt = weight.to(torch::kFloat32).contiguous(), bs = bias.to(torch::kFloat32).contiguous();
  const float *mu = mean.data_ptr<float>(), *is = invstd.data_ptr<float>();
  const float *wv = wt.data_ptr<float>(), *bv = bs.data_ptr<float>();
  const u16* Pp = reinterpret_cast<const u16*>(p.data_ptr());
  const u16* G = reinterpret_cast<const u16*>(gy.data_ptr());
  // pass A: gz, the gradient at the GELU's input, kept in bf16 (as PyTorch's GELU
  // backward hands it on; pass B reads it rather than evaluating the GELU again, the
  // costliest arithmetic here), and per channel sum(gz) (the bias gradient) and
  // sum(gz * xhat) (the weight's), both from the rounded gz so they agree with pass B
  auto gzs = torch::empty_like(p);
  u16* GZ = reinterpret_cast<u16*>(gzs.data_ptr());
  const int64_t chunks = chunk_count(M);
  std::vector<Sums> sums(chunks, Sums(C));
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ch++) {
      Sums& s = sums[ch];
      const int64_t b = M * ch / chunks, e = M * (ch + 1) / chunks;
      for (int64_t m = b; m < e; m++) {
        for (int64_t c = 0; c < C; c += 16) {
          const __mmask16 k = lanes_left(C - c);
          __m512 xhat = normalized(k, Pp + m * C + c, mu + c, is + c);
          __m512 z = _mm512_fmadd_ps(xhat, _mm512_maskz_loadu_ps(k, wv + c), _mm512_maskz_loadu_ps(k, bv + c));
          __m256i gz16 = narrow(_mm512_mul_ps(load_bf16(k, G + m * C + c), gelu_grad(z)));
          _mm256_mask_storeu_epi16(GZ + m * C + c, k, gz16);
          __m512 gz = widen(gz16);
          accumulate(s, c, k, gz, _mm512_mul_ps(gz, xhat));
        }
        if ((m - b) % 64 == 63) s.flush();
      }
      s.flush();
    }
  });
  std::vector<double> s1(C), s2(C);
  for (int64_t ch = 0; ch < chunks; ch++)
    for (int64_t c = 0; c < C; c++) { s1[c] += sums[ch].d1[c]; s2[c] += sums[ch].d2[c]; }
  auto gbias = torch::empty({C}, mean.options()), gweight = torch::empty({C}, mean.options());
  std::vector<float> a(C), b1(C), b2(C);  // gp = a * (gz - b1 - xhat * b2)
  for (int64_t c = 0; c < C; c++) {
    gbias.data_ptr<float>()[c] = float(s1[c]);
    gweight.data_ptr<float>()[c] = float(s2[c]);
    a[c] = is[c] * wv[c];
    b1[c] = float(s1[c] / M);
    b2[c] = float(s2[c] / M);
  }
  // pass B: the gradient at p, written straight into x's shape through the pool's codes
  auto gx = torch::empty({N, C, pool ? H : h, pool ? W : w}, p.options().memory_format(cl));
  u16* GX = reinterpret_cast<u16*>(gx.data_ptr());
  const uint8_t* K = pool ? code.data_ptr<uint8_t>() : nullptr;
  at::parallel_for(0, N * h, 1, [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; r++) {
      const int64_t n = r / h, i = r % h;
      for (int64_t j = 0; j < w; j++) {
        const int64_t m = r * w + j;
        for (int64_t c = 0; c < C; c += 16) {
          const __mmask16 k = lanes_left(C - c);
          __m512 xhat = normalized(k, Pp + m * C + c, mu + c, is + c);
          __m512 t = _mm512_sub_ps(load_bf16(k, GZ + m * C + c), _mm512_maskz_loadu_ps(k, b1.data() + c));
          t = _mm512_fnmadd_ps(xhat, _mm512_maskz_loadu_ps(k, b2.data() + c), t);
          __m256i g = narrow(_mm512_mul_ps(t, _mm512_maskz_loadu_ps(k, a.data() + c)));
          if (!pool) {
            _mm256_mask_storeu_epi16(GX + m * C + c, k, g);
            continue;
          }
          __m128i cd = _mm_maskz_loadu_epi8(k, K + m * C + c);
          u16* o = GX + ((n * H + 2 * i) * W + 2 * j) * C + c;
          u16* dst[4] = {o, o + C, o + W * C, o + W * C + C};
          for (int q = 0; q < 4; q++) {
            __mmask16 hit = _mm_cmpeq_epi8_mask(cd, _mm_set1_epi8(char(q)));
            _mm256_mask_storeu_epi16(dst[q], k, _mm256_maskz_mov_epi16(hit, g));
          }
        }
      }
      if (pool && W % 2) {  // the last column, which the pool dropped
        for (int64_t y = 2 * i; y < 2 * i + 2; y++)
          std::memset(GX + ((n * H + y) * W + W - 1) * C, 0, C * sizeof(u16));
      }
      if (pool && H % 2 && i == h - 1)  // and the last row
        std::memset(GX + (n * H + H - 1) * W * C, 0, W * C * sizeof(u16));
    }
  });
  return {gx, gweight, gbias};
}

// GELU alone, elementwise (the whitening layer's): bf16 in, bf16 out, fp32 arithmetic.
torch::Tensor gelu_forward(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && x.is_non_overlapping_and_dense(),
              "x: a dense bf16 tensor");
  auto y = torch::empty_like(x);  // the same strides, so one flat loop serves both
  const u16* X = reinterpret_cast<const u16*>(x.data_ptr());
  u16* Y = reinterpret_cast<u16*>(y.data_ptr());
  at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i += 16) {
      const __mmask16 k = lanes_left(e - i);
      store_bf16(Y + i, k, gelu(load_bf16(k, X + i)));
    }
  });
  return y;
}

torch::Tensor gelu_backward(torch::Tensor gy, torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && x.is_non_overlapping_and_dense(),
              "x: a dense bf16 tensor");
  gy = gy.to(torch::kBFloat16);
  if (gy.strides() != x.strides()) gy = torch::empty_like(x).copy_(gy);
  auto gx = torch::empty_like(x);
  const u16* X = reinterpret_cast<const u16*>(x.data_ptr());
  const u16* G = reinterpret_cast<const u16*>(gy.data_ptr());
  u16* GX = reinterpret_cast<u16*>(gx.data_ptr());
  at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i += 16) {
      const __mmask16 k = lanes_left(e - i);
      store_bf16(GX + i, k, _mm512_mul_ps(load_bf16(k, G + i), gelu_grad(load_bf16(k, X + i))));
    }
  });
  return gx;
}

// The filter gradient of a 3x3, padding-1 conv as chunked matrix products: models/fast.py's
// im2col_filter_grad (which says why) with its im2col copy written here. PyTorch's copy
// of that 6-d strided view ran at ~4 GB/s in a training step, 5% of a 32x32 step on the
// AMX Xeon; here each row of the matrix is nine memcpys of one pixel's channels (zeros
// past the border), with no padded copy of the input first, into one buffer that every
// chunk reuses. The product's left operand, the chunk's output gradient, is copied
// transposed first: oneDNN's bf16 product ran 1.2-1.8x faster on a contiguous (out,
// positions) matrix than on the transposed view of the channels_last one (a whole 32x32
// step: 2% faster). The chunks' bf16 products add up in fp32, as the Python version's do,
// so the two give the same numbers.
torch::Tensor im2col_filter_grad(torch::Tensor grad, torch::Tensor x, int64_t chunk_bytes) {
  auto cl = at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(cl),
              "x: 4-d bf16, channels_last");
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == x.size(0) && grad.size(2) == x.size(2) &&
              grad.size(3) == x.size(3), "grad: x's batch and map size");
  grad = grad.to(torch::kBFloat16).contiguous(cl);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = grad.size(1);
  const int64_t HW = H * W, K = 9 * C;
  const int64_t step = std::max<int64_t>(1, chunk_bytes / (HW * K * 2));
  const auto dense = x.options().memory_format(at::MemoryFormat::Contiguous);
  auto cols = torch::empty({std::min(step, N) * HW, K}, dense);
  auto g2 = grad.permute({0, 2, 3, 1}).reshape({N * HW, O});  // a view: channels_last
  auto total = torch::zeros({O, K}, x.options().dtype(torch::kFloat32));
  auto prod = torch::empty({O, K}, dense);
  auto gbuf = torch::empty({O * std::min(step, N) * HW}, dense);  // a chunk's grad, transposed
  const u16* X = reinterpret_cast<const u16*>(x.data_ptr());
  u16* D = reinterpret_cast<u16*>(cols.data_ptr());
  const u16* Pr = reinterpret_cast<const u16*>(prod.data_ptr());
  float* T = total.data_ptr<float>();
  for (int64_t i = 0; i < N; i += step) {
    const int64_t rows = std::min(step, N - i) * HW;
    at::parallel_for(0, rows, 16, [&](int64_t rb, int64_t re) {
      for (int64_t r = rb; r < re; r++) {
        const int64_t n = i + r / HW, y = (r / W) % H, xx = r % W;
        u16* dst = D + r * K;
        for (int64_t ky = 0; ky < 3; ky++)
          for (int64_t kx = 0; kx < 3; kx++, dst += C) {
            const int64_t sy = y + ky - 1, sx = xx + kx - 1;
            if (sy < 0 || sy >= H || sx < 0 || sx >= W)
              std::memset(dst, 0, C * sizeof(u16));
            else
              std::memcpy(dst, X + ((n * H + sy) * W + sx) * C, C * sizeof(u16));
          }
      }
    });
    auto gt = gbuf.narrow(0, 0, O * rows).view({O, rows});
    gt.copy_(g2.narrow(0, i * HW, rows).t());
    at::mm_out(prod, gt, cols.narrow(0, 0, rows));
    at::parallel_for(0, O * K, 4096, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; j += 16) {
        const __mmask16 k = lanes_left(e - j);
        const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(k, T + j), load_bf16(k, Pr + j));
        _mm512_mask_storeu_ps(T + j, k, sum);
      }
    });
  }
  return total;
}

// Calls body(i, mask, values) for x's elements i .. i + 15 in memory order (fp32 or bf16,
// dense; the mask covers the last, short block), the blocks spread over the threads: the
// loop both rounding kernels below share.
template <class Body>
void each_16_floats(const torch::Tensor& x, Body&& body) {
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const float* XF = bf16 ? nullptr : x.data_ptr<float>();
  const u16* XB = bf16 ? reinterpret_cast<const u16*>(x.data_ptr()) : nullptr;
  at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i += 16) {
      const __mmask16 k = lanes_left(e - i);
      body(i, k, bf16 ? load_bf16(k, XB + i) : _mm512_maskz_loadu_ps(k, XF + i));
    }
  });
}

// x * (1 / scale), rounded to nearest (even on ties), plus zero, clamped to [0, 255], as
// uint8 with x's strides: cifarcnn/int8.py's activations and gradients. PyTorch's
// quantize_per_tensor gives the same levels but for one step where the two roundings of
// x / scale fall either side of a tie (tested). One pass, against PyTorch's two
// (quantize_per_tensor writes a quantized tensor, int_repr copies it out: 25 + 30 ms for a
// 185 MB gradient here).
torch::Tensor quantize_u8(torch::Tensor x, double scale, int64_t zero) {
  const auto type = x.scalar_type();
  TORCH_CHECK((type == torch::kFloat32 || type == torch::kBFloat16) &&
              x.is_non_overlapping_and_dense(), "x: a dense fp32 or bf16 tensor");
  TORCH_CHECK(scale > 0 && zero >= 0 && zero <= 255, "scale > 0, zero in [0, 255]");
  auto q = torch::empty_like(x, x.options().dtype(torch::kUInt8));  // x's strides
  const __m512 inv = _mm512_set1_ps(static_cast<float>(1.0 / scale));
  const __m512i z = _mm512_set1_epi32(static_cast<int>(zero));
  const __m512i lo = _mm512_setzero_si512(), hi = _mm512_set1_epi32(255);
  uint8_t* Q = q.data_ptr<uint8_t>();
  each_16_floats(x, [&](int64_t i, __mmask16 k, __m512 v) {
    __m512i r = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), z);
    r = _mm512_min_epi32(_mm512_max_epi32(r, lo), hi);
    _mm512_mask_cvtepi32_storeu_epi8(Q + i, k, r);
  });
  return q;
}

// x * (1 / scale) rounded stochastically (down, or up with probability its fraction) and
// clamped to [-127, 127], as int8 with x's strides: the output gradient's levels for
// int8.filter_grad, symmetric, written signed for torch._int_mm. Rounding to nearest
// zeroes every gradient under half a step, and a filter gradient sums millions of them:
// the recipe trained to a higher loss and 2 points less accuracy so (docs/fast-recipe.md,
// "A twenty-third round"); this rounding is unbiased. The uniform draw is a hash of
// (seed, element index), so the levels depend on the seed alone, not on how the loop was
// split among threads.
torch::Tensor quantize_s8_stochastic(torch::Tensor x, double scale, int64_t seed) {
  const auto type = x.scalar_type();
  TORCH_CHECK((type == torch::kFloat32 || type == torch::kBFloat16) &&
              x.is_non_overlapping_and_dense(), "x: a dense fp32 or bf16 tensor");
  TORCH_CHECK(scale > 0, "scale > 0");
  auto q = torch::empty_like(x, x.options().dtype(torch::kInt8));  // x's strides
  const __m512 inv = _mm512_set1_ps(static_cast<float>(1.0 / scale));
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  const __m512i key = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed)));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0x85EBCA6Bu));
  const __m512i m2 = _mm512_set1_epi32(static_cast<int>(0xC2B2AE35u));
  const __m512i golden = _mm512_set1_epi32(static_cast<int>(0x9E3779B9u));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 unit = _mm512_set1_ps(1.0f / 16777216.0f);  // 2^-24: 24 random bits in [0, 1)
  int8_t* Q = q.data_ptr<int8_t>();
  each_16_floats(x, [&](int64_t i, __mmask16 k, __m512 v) {
    // murmur3's finalizer of (index x golden ratio) ^ seed: one 32-bit hash a lane
    __m512i h = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(i)), lane);
    h = _mm512_xor_si512(_mm512_mullo_epi32(h, golden), key);
    h = _mm512_mullo_epi32(_mm512_xor_si512(h, _mm512_srli_epi32(h, 16)), m1);
    h = _mm512_mullo_epi32(_mm512_xor_si512(h, _mm512_srli_epi32(h, 13)), m2);
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(h, 8)), unit);
    const __m512 f = _mm512_roundscale_ps(_mm512_fmadd_ps(v, inv, u),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512i r = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(f), lo), hi);
    _mm512_mask_cvtepi32_storeu_epi8(Q + i, k, r);
  });
  return q;
}

// How many threads one at::parallel_for here runs on: 1 where this file was compiled
// without OpenMP, since ATen's header then runs the loop in the calling thread (tested).
int64_t parallel_threads() {
  std::atomic<int64_t> calls{0};
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) { calls++; });
  return calls;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("parallel_threads", &parallel_threads);
  m.def("quantize_u8", &quantize_u8);
  m.def("quantize_s8_stochastic", &quantize_s8_stochastic);
  m.def("im2col_filter_grad", &im2col_filter_grad);
  m.def("gelu_forward", &gelu_forward);
  m.def("gelu_backward", &gelu_backward);
  m.def("pool_bn_gelu_forward", &pool_bn_gelu_forward);
  m.def("pool_bn_gelu_backward", &pool_bn_gelu_backward);
}
