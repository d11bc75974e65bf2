// Matrix-vector products for decoding, one token's x against every weight (native.py says
// why and how they are built). Each function takes 8 output rows at once, their weights
// interleaved 4 bytes a row, so that one 8-lane instruction advances all 8 rows:
//
//   int4  y_r = sum_b d_rb dx_b (Q_rb . qx_b) + m_rb dx_b sum(qx_b)   (W ~ d Q + m, Q4_1)
//   int8  y_r = s_r sum_b dx_b (Q_rb . qx_b)                          (W ~ s Q per row)
//   float y_r = sum_k W_rk x_k                                         (fp32 or bf16 W)
//
// with x rounded to 8 bits in blocks b of 32 (qx = round(x / dx), dx = max|x_b| / 127, as
// llama.cpp's Q8_1) for the integer ones, and their byte products summed four at a time:
// AVX512-VNNI or AVX-VNNI's dpbusd where the CPU has it, AVX2's maddubs + madd otherwise, plain
// C++ elsewhere. The rows are shared among PyTorch's threads (at::parallel_for).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t G = 32;          // inputs in a block
constexpr int64_t R = 8;           // rows interleaved
constexpr int64_t Q4_BYTES = 160;  // a block of 8 rows: d[8], m[8] fp16, 128 bytes of nibbles
#ifndef PREFETCH
#define PREFETCH 4096                // bytes ahead a float kernel asks the memory for
#endif

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// x (K floats) -> q (int8), |q|, d, s = d * sum(q) and sum(q), by blocks of 32:
// d = max|x| / 127, q = round(x / d) (to nearest even: the vector path's conversion and
// nearbyint under the default rounding mode agree)
void quantize_blocks(const float* x, int64_t K, int8_t* q, uint8_t* a, float* d, float* s,
                     int32_t* qs) {
  for (int64_t b = 0; b < K / G; ++b, x += G, q += G, a += G) {
#if defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 v[4];
    for (int c = 0; c < 4; ++c) v[c] = _mm256_loadu_ps(x + 8 * c);
    __m256 top = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                               _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    const float amax = _mm_cvtss_f32(h);
#else
    float amax = 0.f;
    for (int j = 0; j < G; ++j) amax = std::max(amax, std::fabs(x[j]));
#endif
    const float db = amax / 127.f, inv = db > 0.f ? 1.f / db : 0.f;
    int sum = 0;
#if defined(__AVX2__)
    __m256i i32[4];
    for (int c = 0; c < 4; ++c) i32[c] = _mm256_cvtps_epi32(_mm256_mul_ps(v[c], _mm256_set1_ps(inv)));
    // packing works within 128-bit halves: the 32-bit pieces put back in order after
    __m256i i8 = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
    i8 = _mm256_permutevar8x32_epi32(i8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i*)q, i8);
    _mm256_storeu_si256((__m256i*)a, _mm256_abs_epi8(i8));
    __m256i t = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
    __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
    sum = _mm_cvtsi128_si32(t4);
#else
    for (int j = 0; j < G; ++j) {
      int v = (int)std::nearbyint(x[j] * inv);
      q[j] = (int8_t)v;
      a[j] = (uint8_t)std::abs(v);
      sum += v;
    }
#endif
    d[b] = db;
    s[b] = db * (float)sum;
    qs[b] = sum;
  }
}

#if defined(__AVX2__)
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {  // acc + sums of 4 u8*s8 products
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
inline __m256i bcast(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
inline __m256i bcast(const uint8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
#endif

// 8 rows of 4-bit weights against one quantized x: out[r] = sum_b d_rb dx_b (q_rb . qx_b) + m_rb sx_b
void group_q4(const uint8_t* p, int64_t nb, const int8_t* qx, const float* dx, const float* sx,
              float* out) {
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b, p += Q4_BYTES) {
    const int8_t* x = qx + b * G;
    _mm_prefetch((const char*)(p + PREFETCH), _MM_HINT_T0);
    _mm_prefetch((const char*)(p + PREFETCH + 64), _MM_HINT_T0);
    _mm_prefetch((const char*)(p + PREFETCH + 128), _MM_HINT_T0);
    __m256i isum = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      __m256i v = _mm256_loadu_si256((const __m256i*)(p + 32 + 32 * c));
      isum = dpbusd(isum, _mm256_and_si256(v, low), bcast(x + 4 * c));
      isum = dpbusd(isum, _mm256_and_si256(_mm256_srli_epi16(v, 4), low), bcast(x + 16 + 4 * c));
    }
    __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
    __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 16)));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, _mm256_set1_ps(dx[b])), acc);
    accm = _mm256_fmadd_ps(m, _mm256_set1_ps(sx[b]), accm);
  }
  _mm256_storeu_ps(out, _mm256_add_ps(acc, accm));
#else
  for (int r = 0; r < R; ++r) out[r] = 0.f;
  for (int64_t b = 0; b < nb; ++b, p += Q4_BYTES) {
    const uint16_t* dm = (const uint16_t*)p;
    for (int r = 0; r < R; ++r) {
      int dot = 0;
      for (int c = 0; c < 4; ++c)
        for (int j = 0; j < 4; ++j) {
          uint8_t v = p[32 + 32 * c + 4 * r + j];
          dot += (v & 15) * qx[b * G + 4 * c + j] + (v >> 4) * qx[b * G + 16 + 4 * c + j];
        }
      out[r] += half_to_float(dm[r]) * dx[b] * dot + half_to_float(dm[8 + r]) * sx[b];
    }
  }
#endif
}

// 8 rows of int8 weights: out[r] = s_r sum_b dx_b (w_rb . qx_b)
void group_q8(const int8_t* p, int64_t nb, const int8_t* qx, const uint8_t* ax, const float* dx,
              const float* scale, float* out) {
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, p += R * G) {
    for (int c = 0; c < 4; ++c) _mm_prefetch((const char*)(p + PREFETCH + 64 * c), _MM_HINT_T0);
    __m256i isum = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      __m256i w = _mm256_loadu_si256((const __m256i*)(p + 32 * c));
      isum = dpbusd(isum, bcast(ax + b * G + 4 * c), _mm256_sign_epi8(w, bcast(qx + b * G + 4 * c)));
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(dx[b]), acc);
  }
  _mm256_storeu_ps(out, _mm256_mul_ps(acc, _mm256_loadu_ps(scale)));
#else
  for (int r = 0; r < R; ++r) out[r] = 0.f;
  for (int64_t b = 0; b < nb; ++b, p += R * G)
    for (int r = 0; r < R; ++r) {
      int dot = 0;
      for (int c = 0; c < 8; ++c)
        for (int j = 0; j < 4; ++j) dot += p[32 * c + 4 * r + j] * qx[b * G + 4 * c + j];
      out[r] += dx[b] * dot;
    }
  for (int r = 0; r < R; ++r) out[r] *= scale[r];
#endif
}

// 8 rows of float weights, (K, 8) fp32: out[r] = sum_k W_rk x_k
void group_f32(const float* p, int64_t K, const float* x, float* out) {
#if defined(__AVX2__)
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    _mm_prefetch((const char*)(p + 8 * k + PREFETCH / 4), _MM_HINT_T0);
    _mm_prefetch((const char*)(p + 8 * k + PREFETCH / 4 + 16), _MM_HINT_T0);
    for (int u = 0; u < 4; ++u)
      acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(p + 8 * (k + u)), _mm256_set1_ps(x[k + u]), acc[u]);
  }
  for (; k < K; ++k) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(p + 8 * k), _mm256_set1_ps(x[k]), acc[0]);
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#else
  for (int r = 0; r < R; ++r) out[r] = 0.f;
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < R; ++r) out[r] += p[8 * k + r] * x[k];
#endif
}

inline float bf16_to_float(uint16_t h) { uint32_t v = (uint32_t)h << 16; float f; std::memcpy(&f, &v, 4); return f; }

// 8 rows of bf16 weights, (K/2, 8, 2): lane r of a 32-bit word holds W_r,2j (low half) and
// W_r,2j+1 (high half); a bf16 is the top half of an fp32, so a shift or a mask makes each
void group_bf16(const uint16_t* p, int64_t K, const float* x, float* out) {
#if defined(__AVX2__)
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
  int64_t j = 0;
  for (; j + 2 <= K / 2; j += 2) {
    _mm_prefetch((const char*)(p + 16 * j + PREFETCH / 2), _MM_HINT_T0);
    for (int u = 0; u < 2; ++u) {
      __m256i v = _mm256_loadu_si256((const __m256i*)(p + 16 * (j + u)));
      acc[2 * u] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
                                   _mm256_set1_ps(x[2 * (j + u)]), acc[2 * u]);
      acc[2 * u + 1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high)),
                                       _mm256_set1_ps(x[2 * (j + u) + 1]), acc[2 * u + 1]);
    }
  }
  for (; j < K / 2; ++j) {
    __m256i v = _mm256_loadu_si256((const __m256i*)(p + 16 * j));
    acc[0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_set1_ps(x[2 * j]), acc[0]);
    acc[1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high)), _mm256_set1_ps(x[2 * j + 1]), acc[1]);
  }
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#else
  for (int r = 0; r < R; ++r) out[r] = 0.f;
  for (int64_t j = 0; j < K / 2; ++j)
    for (int r = 0; r < R; ++r)
      out[r] += bf16_to_float(p[16 * j + 2 * r]) * x[2 * j] + bf16_to_float(p[16 * j + 2 * r + 1]) * x[2 * j + 1];
#endif
}


// The same products for MR rows of x at once (a batch of decoding rows): each block of the 8
// weight rows is loaded and unpacked once and used for all MR, so the work a row adds is its
// byte products alone. qx, dx, sx: row i at i K, i nb; out: row i at i ldo. MR <= 4.
#if defined(__AVX512VL__)
constexpr int MR = 4;  // 32 vector registers: 8 unpacked weights, 4 rows' sums and totals
#else
constexpr int MR = 2;  // 16
#endif

template <int M>
void group_q4_rows(const uint8_t* p, int64_t nb, const int8_t* qx, const float* dx,
                   const float* sx, int64_t K, float* out, int64_t ldo) {
#if defined(__AVX2__)
  __m256 acc[M], accm[M];
  for (int i = 0; i < M; ++i) acc[i] = accm[i] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b, p += Q4_BYTES) {
    _mm_prefetch((const char*)(p + PREFETCH), _MM_HINT_T0);
    _mm_prefetch((const char*)(p + PREFETCH + 64), _MM_HINT_T0);
    _mm_prefetch((const char*)(p + PREFETCH + 128), _MM_HINT_T0);
    __m256i w[8];
    for (int c = 0; c < 4; ++c) {
      __m256i v = _mm256_loadu_si256((const __m256i*)(p + 32 + 32 * c));
      w[c] = _mm256_and_si256(v, low);
      w[4 + c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
    const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 16)));
    for (int i = 0; i < M; ++i) {
      const int8_t* x = qx + i * K + b * G;
      __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();  // two chains
      for (int c = 0; c < 4; ++c) {
        lo = dpbusd(lo, w[c], bcast(x + 4 * c));
        hi = dpbusd(hi, w[4 + c], bcast(x + 16 + 4 * c));
      }
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)),
                               _mm256_mul_ps(d, _mm256_set1_ps(dx[i * nb + b])), acc[i]);
      accm[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(sx[i * nb + b]), accm[i]);
    }
  }
  for (int i = 0; i < M; ++i) _mm256_storeu_ps(out + i * ldo, _mm256_add_ps(acc[i], accm[i]));
#else
  for (int i = 0; i < M; ++i) group_q4(p, nb, qx + i * K, dx + i * nb, sx + i * nb, out + i * ldo);
#endif
}

// int8: with VNNI, the weights made unsigned once a block (w + 128, a flipped top bit) so that
// each row's bytes go into dpbusd as they are: sum (w + 128) x = sum w x + 128 sum x, the
// second term taken back from the block's integer sum. (AVX2's maddubs would saturate on
// (w + 128) x: there each row keeps group_q8's |x| and sign(w, x).)
template <int M>
void group_q8_rows(const int8_t* p, int64_t nb, const int8_t* qx, const uint8_t* ax,
                   const float* dx, const int32_t* qs, const float* scale, int64_t K, float* out,
                   int64_t ldo) {
#if defined(__AVX2__) && ((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
  __m256 acc[M];
  for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
  const __m256i flip = _mm256_set1_epi8((char)0x80);
  for (int64_t b = 0; b < nb; ++b, p += R * G) {
    for (int c = 0; c < 4; ++c) _mm_prefetch((const char*)(p + PREFETCH + 64 * c), _MM_HINT_T0);
    __m256i w[8];
    for (int c = 0; c < 8; ++c)
      w[c] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(p + 32 * c)), flip);
    for (int i = 0; i < M; ++i) {
      const int8_t* x = qx + i * K + b * G;
      __m256i e = _mm256_setzero_si256(), o = _mm256_setzero_si256();  // two chains
      for (int c = 0; c < 8; c += 2) {
        e = dpbusd(e, w[c], bcast(x + 4 * c));
        o = dpbusd(o, w[c + 1], bcast(x + 4 * c + 4));
      }
      __m256i dot = _mm256_sub_epi32(_mm256_add_epi32(e, o), _mm256_set1_epi32(128 * qs[i * nb + b]));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dx[i * nb + b]), acc[i]);
    }
  }
  const __m256 sc = _mm256_loadu_ps(scale);
  for (int i = 0; i < M; ++i) _mm256_storeu_ps(out + i * ldo, _mm256_mul_ps(acc[i], sc));
#else
  for (int i = 0; i < M; ++i)
    group_q8(p, nb, qx + i * K, ax + i * K, dx + i * nb, scale, out + i * ldo);
#endif
}

// fp32 and bf16: each weight vector loaded (and widened) once for MR rows, two sums a row
template <int M>
void group_f32_rows(const float* p, int64_t K, const float* x, float* out, int64_t ldo) {
#if defined(__AVX2__)
  __m256 acc[M][2];
  for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    _mm_prefetch((const char*)(p + 8 * k + PREFETCH / 4), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(p + 8 * k), w1 = _mm256_loadu_ps(p + 8 * k + 8);
    for (int i = 0; i < M; ++i) {
      acc[i][0] = _mm256_fmadd_ps(w0, _mm256_set1_ps(x[i * K + k]), acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(w1, _mm256_set1_ps(x[i * K + k + 1]), acc[i][1]);
    }
  }
  for (; k < K; ++k)
    for (int i = 0; i < M; ++i)
      acc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(p + 8 * k), _mm256_set1_ps(x[i * K + k]), acc[i][0]);
  for (int i = 0; i < M; ++i) _mm256_storeu_ps(out + i * ldo, _mm256_add_ps(acc[i][0], acc[i][1]));
#else
  for (int i = 0; i < M; ++i) group_f32(p, K, x + i * K, out + i * ldo);
#endif
}

template <int M>
void group_bf16_rows(const uint16_t* p, int64_t K, const float* x, float* out, int64_t ldo) {
#if defined(__AVX2__)
  __m256 acc[M][2];
  for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
  for (int64_t j = 0; j < K / 2; ++j) {
    if (j % 2 == 0) _mm_prefetch((const char*)(p + 16 * j + PREFETCH / 2), _MM_HINT_T0);
    const __m256i v = _mm256_loadu_si256((const __m256i*)(p + 16 * j));
    const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
    for (int i = 0; i < M; ++i) {
      acc[i][0] = _mm256_fmadd_ps(even, _mm256_set1_ps(x[i * K + 2 * j]), acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(odd, _mm256_set1_ps(x[i * K + 2 * j + 1]), acc[i][1]);
    }
  }
  for (int i = 0; i < M; ++i) _mm256_storeu_ps(out + i * ldo, _mm256_add_ps(acc[i][0], acc[i][1]));
#else
  for (int i = 0; i < M; ++i) group_bf16(p, K, x + i * K, out + i * ldo);
#endif
}

// rows [0, M) of x through one group of 8 weight rows, MR at a time, one at a time by the
// one-row kernel (a decoding step's single row stays on it)
template <typename Many, typename One>
inline void by_rows(int64_t M, Many many, One one) {
  int64_t i = 0;
  if (M > 1)
    for (; i + MR <= M; i += MR) many(i, std::integral_constant<int, MR>{});
  if (M - i >= 2) { many(i, std::integral_constant<int, 2>{}); i += 2; }
  for (; i < M; ++i) one(i);
}

struct Quantized {
  std::vector<int8_t> q; std::vector<uint8_t> a; std::vector<float> d, s; std::vector<int32_t> qs;
};

Quantized quantize_rows_of(const at::Tensor& x, int64_t M, int64_t K) {
  TORCH_CHECK(x.device().is_cpu(), "monotile's native kernels are for CPU tensors");
  at::Tensor xf = x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous();
  Quantized out;
  out.q.resize(M * K); out.a.resize(M * K); out.d.resize(M * K / G); out.s.resize(M * K / G);
  out.qs.resize(M * K / G);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      quantize_blocks(xf.data_ptr<float>() + i * K, K, out.q.data() + i * K, out.a.data() + i * K,
                      out.d.data() + i * K / G, out.s.data() + i * K / G, out.qs.data() + i * K / G);
  });
  return out;
}

// x (M, K) float, w (N/8, K/32, 160) uint8 -> (M, N) float
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& w, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && w.size(2) == Q4_BYTES && w.scalar_type() == at::kByte,
              "q4_linear: x (M, K) and w (N/8, K/32, 160) uint8");
  const int64_t M = x.size(0), K = x.size(1), groups = w.size(0), nb = w.size(1);
  TORCH_CHECK(nb * G == K && groups * R >= N && w.is_contiguous() && w.device().is_cpu(),
              "q4_linear: shapes do not match");
  Quantized xq = quantize_rows_of(x, M, K);
  at::Tensor out = at::empty({M, groups * R}, x.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t ldo = groups * R;
  at::parallel_for(0, groups, 8, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const uint8_t* wg = wp + g * nb * Q4_BYTES;
      by_rows(M, [&](int64_t i, auto rows) {
        group_q4_rows<decltype(rows)::value>(wg, nb, xq.q.data() + i * K, xq.d.data() + i * nb,
                                             xq.s.data() + i * nb, K, op + i * ldo + g * R, ldo);
      }, [&](int64_t i) {
        group_q4(wg, nb, xq.q.data() + i * K, xq.d.data() + i * nb, xq.s.data() + i * nb,
                 op + i * ldo + g * R);
      });
    }
  });
  return groups * R == N ? out : out.narrow(1, 0, N).contiguous();
}

// x (M, K) float, w (N/8, K/32, 256) int8, scale (N/8*8) float -> (M, N) float
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && w.size(2) == R * G && w.scalar_type() == at::kChar,
              "q8_linear: x (M, K) and w (N/8, K/32, 256) int8");
  const int64_t M = x.size(0), K = x.size(1), groups = w.size(0), nb = w.size(1);
  TORCH_CHECK(nb * G == K && groups * R >= N && w.is_contiguous() && w.device().is_cpu() &&
              scale.device().is_cpu() && scale.numel() == groups * R &&
              scale.scalar_type() == at::kFloat, "q8_linear: shapes do not match");
  Quantized xq = quantize_rows_of(x, M, K);
  at::Tensor out = at::empty({M, groups * R}, x.options().dtype(at::kFloat));
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldo = groups * R;
  at::parallel_for(0, groups, 8, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int8_t* wg = wp + g * nb * R * G;
      by_rows(M, [&](int64_t i, auto rows) {
        group_q8_rows<decltype(rows)::value>(wg, nb, xq.q.data() + i * K, xq.a.data() + i * K,
                                             xq.d.data() + i * nb, xq.qs.data() + i * nb,
                                             sp + g * R, K, op + i * ldo + g * R, ldo);
      }, [&](int64_t i) {
        group_q8(wg, nb, xq.q.data() + i * K, xq.a.data() + i * K, xq.d.data() + i * nb,
                 sp + g * R, op + i * ldo + g * R);
      });
    }
  });
  return groups * R == N ? out : out.narrow(1, 0, N).contiguous();
}

// x (M, K) float, w (N/8, K, 8) fp32 or (N/8, K/2, 8, 2) bf16 -> (M, N) float
at::Tensor float_linear(const at::Tensor& x, const at::Tensor& w, int64_t N) {
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.dim() == 2 && w.is_contiguous() && ((!bf16 && w.scalar_type() == at::kFloat && w.dim() == 3 && w.size(2) == R) ||
              (bf16 && w.dim() == 4 && w.size(2) == R && w.size(3) == 2)),
              "float_linear: x (M, K) and w (N/8, K, 8) fp32 or (N/8, K/2, 8, 2) bf16");
  const int64_t M = x.size(0), K = x.size(1), groups = w.size(0);
  TORCH_CHECK(w.size(1) * (bf16 ? 2 : 1) == K && groups * R >= N, "float_linear: shapes do not match");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "float_linear: CPU tensors only");
  at::Tensor xf = x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, groups * R}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const void* wp = w.data_ptr();
  const int64_t ldo = groups * R;
  at::parallel_for(0, groups, 8, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const uint16_t* wh = (const uint16_t*)wp + g * K * R;
      const float* wf = (const float*)wp + g * K * R;
      by_rows(M, [&](int64_t i, auto rows) {
        constexpr int n = decltype(rows)::value;
        if (bf16) group_bf16_rows<n>(wh, K, xp + i * K, op + i * ldo + g * R, ldo);
        else group_f32_rows<n>(wf, K, xp + i * K, op + i * ldo + g * R, ldo);
      }, [&](int64_t i) {
        if (bf16) group_bf16(wh, K, xp + i * K, op + i * ldo + g * R);
        else group_f32(wf, K, xp + i * K, op + i * ldo + g * R);
      });
    }
  });
  return groups * R == N ? out : out.narrow(1, 0, N).contiguous();
}

// One query a head against its cached keys and values (a decoding step's attention), grouped
// heads reading their K/V head in place:
//   s_j = q . k_j / sqrt(D),  p = softmax(s),  o = sum_j p_j v_j
// q (B, H, 1, D) float; k, v (B, Hkv, T, D) fp32 or bf16, rows of D contiguous (a cache's
// first T positions) -> (B, H, 1, D) float. PyTorch's fused kernel is made for blocks of many
// queries: for one, it took 26 us (fp32) and 120 us (bf16, on a CPU without AMX) over 220
// positions of SmolLM2's 9 heads of 64 on 2 threads, where this takes 12-13 in either.
template <typename T> inline float as_float(T x) { return (float)x; }
template <> inline float as_float(uint16_t h) { return bf16_to_float(h); }

#if defined(__AVX2__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // 8 bf16 -> fp32: each the top half of its float
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
// lane i: the sum of v[i]'s eight lanes
inline __m256 sum_lanes(const __m256* v) {
  __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}
// e^x for x <= 0, as 2^n 2^f: n = round(x log2 e), 2^f by its degree-6 Taylor polynomial in
// f ln 2 (|f| <= 1/2: relative error ~1e-7), 2^n put into the exponent bits
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);  // x - n ln 2, in two parts
  __m256 p = _mm256_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

template <typename T>
void attend_head(const float* q, const T* k, const T* v, int64_t Tk, int64_t D, int64_t row,
                 float* s, float* out) {
  const float scale = 1.f / std::sqrt((float)D);
  int64_t j = 0;
#if defined(__AVX2__)
  const bool vec = D % 32 == 0;
  if (vec)  // eight positions at a time, their eight sums in one vector
    for (; j + 8 <= Tk; j += 8) {
      __m256 acc[8];
      for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qd = _mm256_loadu_ps(q + d);
        for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(load8(k + (j + u) * row + d), qd, acc[u]);
      }
      _mm256_storeu_ps(s + j, _mm256_mul_ps(sum_lanes(acc), _mm256_set1_ps(scale)));
    }
#endif
  for (; j < Tk; ++j) {
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += q[d] * as_float(k[j * row + d]);
    s[j] = dot * scale;
  }
  float top = -INFINITY, sum = 0.f;
  for (j = 0; j < Tk; ++j) top = std::max(top, s[j]);
  j = 0;
#if defined(__AVX2__)
  __m256 total = _mm256_setzero_ps();
  for (; j + 8 <= Tk; j += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(top)));
    _mm256_storeu_ps(s + j, e);
    total = _mm256_add_ps(total, e);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, total);
  for (float x : lanes) sum += x;
#endif
  for (; j < Tk; ++j) sum += (s[j] = std::exp(s[j] - top));
  const float inv = 1.f / sum;
#if defined(__AVX2__)
  if (vec) {  // 32 outputs at a time, in four independent sums
    for (int64_t d = 0; d < D; d += 32) {
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (j = 0; j < Tk; ++j) {
        const __m256 p = _mm256_set1_ps(s[j]);
        for (int u = 0; u < 4; ++u) acc[u] = _mm256_fmadd_ps(load8(v + j * row + d + 8 * u), p, acc[u]);
      }
      for (int u = 0; u < 4; ++u) _mm256_storeu_ps(out + d + 8 * u, _mm256_mul_ps(acc[u], _mm256_set1_ps(inv)));
    }
    return;
  }
#endif
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  for (j = 0; j < Tk; ++j)
    for (int64_t d = 0; d < D; ++d) out[d] += s[j] * as_float(v[j * row + d]);
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
}

// q (B, H, D) fp32 contiguous, k and v as attend_one's; row b attends over its first len[b]
// positions (len: one for all rows, or B) -> out (B, H, D)
void attend_rows(const float* qp, const at::Tensor& k, const at::Tensor& v, int64_t B, int64_t H,
                 const int64_t* len, bool per_row, float* op) {
  const bool bf16 = k.scalar_type() == at::kBFloat16;
  const int64_t Hkv = k.size(1), D = k.size(3), group = H / Hkv;
  const int64_t sb = k.stride(0), sh = k.stride(1), row = k.stride(2);
  int64_t longest = 0;
  for (int64_t b = 0; b < (per_row ? B : 1); ++b) longest = std::max(longest, len[b]);
  // a head's work is ~4 T D flops: heads shared among threads only where that outweighs a
  // thread's start (~2 us)
  const int64_t grain = std::max<int64_t>(1, 16384 / (longest * D));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> s(longest);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, kv = (i % H) / group, at_kv = b * sb + kv * sh;
      const int64_t Tk = len[per_row ? b : 0];
      if (bf16)
        attend_head(qp + i * D,
                    (const uint16_t*)k.data_ptr() + at_kv, (const uint16_t*)v.data_ptr() + at_kv,
                    Tk, D, row, s.data(), op + i * D);
      else
        attend_head(qp + i * D, k.data_ptr<float>() + at_kv, v.data_ptr<float>() + at_kv,
                    Tk, D, row, s.data(), op + i * D);
    }
  });
}

at::Tensor attend_one(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const bool bf16 = k.scalar_type() == at::kBFloat16;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(2) == 1 &&
              q.size(0) == k.size(0) && q.size(3) == k.size(3) && k.size(1) > 0 &&
              q.size(1) % k.size(1) == 0 && k.size(2) > 0,
              "attend_one: q (B, H, 1, D), k and v (B, Hkv, T, D), H a multiple of Hkv, T > 0");
  TORCH_CHECK(v.scalar_type() == k.scalar_type() && (bf16 || k.scalar_type() == at::kFloat) &&
              k.stride(3) == 1 && v.stride(3) == 1 && k.stride(2) == v.stride(2) &&
              k.stride(1) == v.stride(1) && k.stride(0) == v.stride(0) &&
              q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "attend_one: CPU k and v in fp32 or bf16, alike, rows of D contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Tk = k.size(2);
  at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, H, 1, D}, q.options().dtype(at::kFloat));
  attend_rows(qf.data_ptr<float>(), k, v, B, H, &Tk, false, out.data_ptr<float>());
  return out;
}

// y = x W^T + b, W in one of the layouts above (its packed tensor's type tells which), b
// optional (an empty tensor: none)
at::Tensor product(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                   const at::Tensor& bias, int64_t N) {
  at::Tensor y = w.scalar_type() == at::kByte ? q4_linear(x, w, N)
               : w.scalar_type() == at::kChar ? q8_linear(x, w, scale, N)
               : float_linear(x, w, N);
  if (bias.numel()) y.add_(bias);
  return y;
}

// M rows of d: RMSNorm y = x / sqrt(mean(x^2) + eps) g, or LayerNorm
// y = (x - mean(x)) / sqrt(var(x) + eps) g + b (b optional), as Block's norms
void norm_rows(const float* x, float* y, int64_t M, int64_t d, const at::Tensor& g,
               const at::Tensor& b, bool layer, float eps) {
  const float* gp = g.data_ptr<float>();
  const float* bp = b.numel() ? b.data_ptr<float>() : nullptr;
  at::parallel_for(0, M, std::max<int64_t>(1, 8192 / d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xi = x + i * d;
      float* yi = y + i * d;
      double mean = 0., sq = 0.;
      if (layer) {
        for (int64_t j = 0; j < d; ++j) mean += xi[j];
        mean /= d;
      }
      int64_t j = 0;
#if defined(__AVX2__)
      __m256d acc[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};  // in float64, as below
      const __m256d mu = _mm256_set1_pd(mean);
      for (; j + 8 <= d; j += 8)
        for (int u = 0; u < 2; ++u) {
          __m256d c = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(xi + j + 4 * u)), mu);
          acc[u] = _mm256_fmadd_pd(c, c, acc[u]);
        }
      double lanes[4];
      _mm256_storeu_pd(lanes, _mm256_add_pd(acc[0], acc[1]));
      sq = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
      for (; j < d; ++j) sq += (xi[j] - mean) * (xi[j] - mean);
      const float inv = 1.f / std::sqrt((float)(sq / d) + eps), m = (float)mean;
      if (bp)
        for (j = 0; j < d; ++j) yi[j] = (xi[j] - m) * inv * gp[j] + bp[j];
      else
        for (j = 0; j < d; ++j) yi[j] = (xi[j] - m) * inv * gp[j];
    }
  });
}

inline uint16_t to_bf16(float f) { return c10::BFloat16(f).x; }  // rounded to nearest even

// y = the MLP's activation of one row's up-projection u: 0 SwiGLU silu(g) u2 with [g; u2] = u,
// silu(g) = g / (1 + e^-g); 1 GELU by erf, 0.5 g (1 + erf(g / sqrt 2)); 2 GPT-2's
// 0.5 g (1 + tanh(z)), z = sqrt(2 / pi) (g + 0.044715 g^3). e^-|g| keeps exp's argument <= 0:
// sigmoid(g) = 1 / (1 + e) for g >= 0, e / (1 + e) below; tanh(z) = sign(z) (1 - e) / (1 + e)
// with e = e^-2|z|
void activate(const float* u, float* y, int64_t hidden, int64_t mlp) {
  int64_t j = 0;
#if defined(__AVX2__)
  const __m256 sign = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f), half = _mm256_set1_ps(0.5f);
  if (mlp != 1)
    for (; j + 8 <= hidden; j += 8) {
      const __m256 g = _mm256_loadu_ps(u + j);
      if (mlp == 0) {
        const __m256 e = exp8(_mm256_or_ps(g, sign));  // e^-|g|
        const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, e));
        const __m256 sig = _mm256_blendv_ps(r, _mm256_mul_ps(e, r), g);  // g's sign bit picks
        _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(u + hidden + j)));
      } else {
        const __m256 z = _mm256_mul_ps(_mm256_set1_ps(0.79788456f),
            _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), g), _mm256_mul_ps(g, g), g));
        const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.f), _mm256_andnot_ps(sign, z)));
        __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
        t = _mm256_or_ps(t, _mm256_and_ps(z, sign));  // sign(z) |tanh|
        _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_mul_ps(half, g), _mm256_add_ps(one, t)));
      }
    }
#endif
  for (; j < hidden; ++j) {
    const float g = u[j];
    y[j] = mlp == 0 ? g / (1.f + std::exp(-g)) * u[hidden + j]
         : mlp == 1 ? 0.5f * g * (1.f + std::erf(g * 0.70710678f))
         : 0.5f * g * (1.f + std::tanh(0.79788456f * (g + 0.044715f * g * g * g)));
  }
}

// One token a row through a pre-norm decoder block with a KV cache (Block.forward's decoding
// step), row b at position p_b:
//   a = norm1(x);  q, k, v = rope_p(a Wqkv^T + b);  cache[p] = k, v
//   h = x + attend(q, cache[:p + 1]) Wo^T + b;  out = h + mlp(norm2(h))
// mlp: 0 SwiGLU down(silu(g) * u) with [g; u] = gate_up(a), 1 GELU fc2(gelu(fc1(a))) by erf,
// 2 the same by GPT-2's tanh. x (B, 1, d) in any float type, computed in fp32, given back in
// x's type. w: norm1 g, b; qkv W, scale, bias; wo W, scale, bias; norm2 g, b; the MLP's two
// layers' likewise (fp32 norms and biases, empty where none); n: the four layers' outputs.
// pos: one position for every row, or one a row (a server's rows, each at its own length);
// rope: the rotations (heads of q|k|v, d_head/2, 2) cos, sin at that position, or (B, ...) one
// a row (empty: no rotation); k_cache, v_cache (B, Hkv, L, d_head) fp32 or bf16. One call
// instead of ~50 operators, each ~5-10 us of dispatch on a CPU, where a 135M model's layer
// multiplies in ~0.5 ms.
at::Tensor decode_block(const at::Tensor& x, at::TensorList w, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& rope, at::IntArrayRef pos,
                        at::IntArrayRef n, int64_t H, int64_t Hkv, bool layer_norm,
                        int64_t mlp, double eps) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && w.size() == 16 && n.size() == 4 && H % Hkv == 0,
              "decode_block: x (B, 1, d), 16 tensors of weights, 4 output sizes");
  const int64_t B = x.size(0), d = x.size(2), D = k_cache.size(3), heads = H + 2 * Hkv;
  const bool bf16 = k_cache.scalar_type() == at::kBFloat16, per_row = pos.size() != 1;
  TORCH_CHECK(pos.size() == 1 || (int64_t)pos.size() == B,
              "decode_block: one position, or one a row");
  bool in_cache = true;
  for (int64_t p : pos) in_cache = in_cache && p >= 0 && p < k_cache.size(2);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.size(1) == Hkv &&
              in_cache && v_cache.sizes() == k_cache.sizes() &&
              v_cache.strides() == k_cache.strides() && k_cache.stride(3) == 1 &&
              v_cache.scalar_type() == k_cache.scalar_type() &&
              (bf16 || k_cache.scalar_type() == at::kFloat) && n[0] == heads * D,
              "decode_block: k and v caches (B, Hkv, L, d_head) alike in fp32 or bf16, pos < L");
  TORCH_CHECK(!rope.numel() || (rope.scalar_type() == at::kFloat && rope.is_contiguous() &&
                                rope.numel() == (per_row ? B : 1) * heads * D),
              "decode_block: rope (heads, d/2, 2), or (B, heads, d/2, 2) with a position a row");
  const float e = (float)eps;
  at::Tensor xf = x.to(at::kFloat).contiguous().view({B, d});
at::Tensor a = at::empty({B, d}, xf.options());
  norm_rows(xf.data_ptr<float>(), a.data_ptr<float>(), B, d, w[0], w[1], layer_norm, e);
  at::Tensor qkv = product(a, w[2], w[3], w[4], n[0]);  // (B, heads D)
  float* qp = qkv.data_ptr<float>();
  if (rope.numel()) {  // (a, b) -> (a cos - b sin, a sin + b cos), pair by pair
    for (int64_t i = 0; i < B; ++i) {
      const float* r = rope.data_ptr<float>() + (per_row ? i * heads * D : 0);
      for (int64_t j = 0; j < heads * D / 2; ++j) {
        float* p = qp + i * heads * D + 2 * j;
        const float c = r[2 * j], s = r[2 * j + 1], u = p[0], t = p[1];
        p[0] = u * c - t * s;
        p[1] = u * s + t * c;
      }
    }
  }
  std::vector<int64_t> len(pos.size());
  for (size_t i = 0; i < pos.size(); ++i) len[i] = pos[i] + 1;
  for (int64_t i = 0; i < B; ++i)  // k and v heads into the cache at the row's position
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t at_cache = i * k_cache.stride(0) + h * k_cache.stride(1) +
                               pos[per_row ? i : 0] * k_cache.stride(2);
      const float* kx = qp + (i * heads + H + h) * D;
      const float* vx = qp + (i * heads + H + Hkv + h) * D;
      if (bf16) {
        uint16_t* kc = (uint16_t*)k_cache.data_ptr() + at_cache;
        uint16_t* vc = (uint16_t*)v_cache.data_ptr() + at_cache;
        for (int64_t j = 0; j < D; ++j) { kc[j] = to_bf16(kx[j]); vc[j] = to_bf16(vx[j]); }
      } else {
        std::memcpy(k_cache.data_ptr<float>() + at_cache, kx, D * sizeof(float));
        std::memcpy(v_cache.data_ptr<float>() + at_cache, vx, D * sizeof(float));
      }
    }
  at::Tensor q = qkv.view({B, heads, D}).narrow(1, 0, H).contiguous();
  at::Tensor o = at::empty({B, H * D}, xf.options());
  attend_rows(q.data_ptr<float>(), k_cache, v_cache, B, H, len.data(), per_row, o.data_ptr<float>());
  at::Tensor h = product(o, w[5], w[6], w[7], n[1]).add_(xf);
  norm_rows(h.data_ptr<float>(), a.data_ptr<float>(), B, d, w[8], w[9], layer_norm, e);
  at::Tensor up = product(a, w[10], w[11], w[12], n[2]);
  const int64_t hidden = mlp == 0 ? n[2] / 2 : n[2];
  at::Tensor act = at::empty({B, hidden}, xf.options());
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / hidden), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      activate(up.data_ptr<float>() + i * n[2], act.data_ptr<float>() + i * hidden, hidden, mlp);
  });
  return product(act, w[13], w[14], w[15], n[3]).add_(h).view({B, 1, d}).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(monotile, m) {
  m.def("q4_linear(Tensor x, Tensor w, int n) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor w, Tensor scale, int n) -> Tensor");
  m.def("float_linear(Tensor x, Tensor w, int n) -> Tensor");
  m.def("attend_one(Tensor q, Tensor k, Tensor v) -> Tensor");
  m.def("decode_block(Tensor x, Tensor[] w, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rope, "
        "int[] pos, int[] n, int n_head, int n_kv_head, bool layer_norm, int mlp, float eps) -> Tensor");
}
TORCH_LIBRARY_IMPL(monotile, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("q8_linear", &q8_linear);
  m.impl("float_linear", &float_linear);
  m.impl("attend_one", &attend_one);
  m.impl("decode_block", &decode_block);
}
