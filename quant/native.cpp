// qt's native CPU decoder: the forward of a Llama-family checkpoint whose linear layers are int4 / int8
// blocks, in one call per engine step (quant/native.py builds it at first use with -march=native, so the
// #if branches below pick this machine's instructions: AVX-512 VNNI, AVX2, or plain C++).
//
// Weights, W[n, k] for output n and input k, in blocks of 32 along k (quant/native.py repacks them):
//   Q4   W = code·d + m, code in 0..15, (d, m) fp16 per block (llama.cpp's Q4_1; Q4_0 is m = -8·d).
//   Q8   W = code·d + m, code in 0..255, (d, m) fp16 per block (llama.cpp's Q8_0 is m = -128·d, with
//        its codes' sign bit flipped).
//   F32  a full-precision matrix (a layer kept out of quantization), run by ATen.
// Rows are stored in tiles of LANES rows (see tile_dot); K is padded to Kp, a multiple of 64, and N to a
// multiple of 32, with code 0 and d = m = 0 (padding adds nothing).
//
// Activations are rounded per block of 32 to int8 twice: x ≈ q·dx + r·dr, with q = round(x / dx) at
// dx = max|x| / 127 (llama.cpp's q8_1), and r the same rounding of what q leaves, x - q·dx, at its own
// dr = max|x - q·dx| / 127. So a block keeps ~14 bits (error ≤ max|x| / 32258, not llama.cpp's / 254): on
// SmolLM2, q alone moved 4-7 of 10 greedy replies off fp32's (near-ties of 0.007-0.28 nats), q + r none
// (LOG.md 2026-12-02, "two roundings"). With sx = q·dx + r·dr summed over the block, a block's product is integer:
//   Σ_k W·x = d·(dx·Σ code·q + dr·Σ code·r) + m·sx
// which VNNI's vpdpbusd (u8 × s8 -> s32) computes 64 products an instruction.
//
// One forward runs T tokens, each on its own KV-cache row at its own position (continuous batching:
// one request's prefill chunk beside the others' decode tokens). Keys and values are written for all
// T tokens first; a token at position p then attends to its row's positions ≤ p (and > p - window), so
// a chunk is causal within itself. Shapes in comments: T tokens, H hidden, D head_dim, NH / KV heads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t QK = 32;  // weights and activations per block

enum Kind : int64_t { F32 = 0, Q4 = 1, Q8 = 2 };

inline float half(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);  // one instruction; the portable conversion below is ~10
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// e^x over an array, 16 or 8 at a time: 2^n · e^r with n = round(x / ln 2), r = x - n·ln 2 (ln 2 in two
// parts), e^r by Cephes' expf polynomial (|r| ≤ ln2/2; within 2 ulp of expf). x is clamped to [-87, 88],
// where e^x is a normal float. Softmax and SiLU take ~100k of these a token on SmolLM2: as std::exp
// calls they cost more than all the attention arithmetic.
#if defined(__AVX512F__)
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#elif defined(__AVX2__)
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.f)), _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));  // · 2^n, n in [-126, 127] after the clamp
}
#endif

void exp_inplace(float* v, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(v + i, exp16(_mm512_loadu_ps(v + i)));
#elif defined(__AVX2__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, exp8(_mm256_loadu_ps(v + i)));
#endif
  for (; i < n; ++i) v[i] = std::exp(v[i]);
}

struct Linear {
  int64_t kind, N, K, Kp;  // Kp: K padded to 64
  bool twice;              // activations rounded twice (q + r), or once as llama.cpp's q8_1 (r = 0)
  at::Tensor codes, d, m, w, bias;  // by kind: Q4 / Q8 codes, d, m; F32 w; bias (N,) fp32 or empty
};

struct Layer {
  Linear qkv, o, gate_up, down;   // q|k|v and gate|up fused along N
  at::Tensor ln1, ln2, qn, kn;    // RMSNorm weights; qn / kn (D,) for Qwen3's per-head norms, else empty
  int64_t window;                 // sliding window, or 0 for none
};

struct Model {
  std::vector<Layer> layers;
  Linear head;
  at::Tensor norm, cos, sin;  // final RMSNorm; RoPE tables (positions, D)
  int64_t H, NH, KV, D, I;
  double eps;
};

// ---- activations ----------------------------------------------------------------------------

struct Rows {  // T rows of K activations, each block rounded to int8 twice (see the header)
  std::vector<int8_t> q, r;        // (T, Kp)
  std::vector<float> dx, dr, sx;   // (T, Kp/32)
  int64_t Kp;
};

// v[0..32) -> codes round(v / scale), scale = max|v| / 127 (0 for an all-zero block), and what they leave,
// v - code·scale, in one rounding (fma); returns Σ codes. Rounding is to nearest even in both branches.
inline int round_block(const float* v, int8_t* codes, float& scale, float* left) {
#if defined(__AVX512F__)
  const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  scale = amax / 127.f;
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f), sc = _mm512_set1_ps(scale);
  const __m512i c0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), c1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtepi32_epi8(c0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + 16), _mm512_cvtepi32_epi8(c1));
  _mm512_storeu_ps(left, _mm512_fnmadd_ps(_mm512_cvtepi32_ps(c0), sc, v0));
  _mm512_storeu_ps(left + 16, _mm512_fnmadd_ps(_mm512_cvtepi32_ps(c1), sc, v1));
  return _mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1));
#else
  float amax = 0.f;
#pragma omp simd reduction(max : amax)
  for (int64_t i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(v[i]));
  scale = amax / 127.f;
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < QK; ++i) {
    const float c = std::nearbyint(v[i] * inv);
    codes[i] = static_cast<int8_t>(c);
    left[i] = std::fma(-c, scale, v[i]);
    sum += static_cast<int>(c);
  }
  return sum;
#endif
}

Rows quantize(const float* x, int64_t T, int64_t K, int64_t Kp, bool twice) {
  const int64_t nb = Kp / QK;
  Rows rw{std::vector<int8_t>(T * Kp, 0), std::vector<int8_t>(T * Kp, 0), std::vector<float>(T * nb, 0.f),
          std::vector<float>(T * nb, 0.f), std::vector<float>(T * nb, 0.f), Kp};
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    float left[QK], unused[QK];
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t b = 0; b < K / QK; ++b) {
        const int64_t at = t * Kp + b * QK, j = t * nb + b;
        const int sq = round_block(x + t * K + b * QK, rw.q.data() + at, rw.dx[j], left);
        const int sr = twice ? round_block(left, rw.r.data() + at, rw.dr[j], unused) : 0;
        rw.sx[j] = rw.dx[j] * static_cast<float>(sq) + rw.dr[j] * static_cast<float>(sr);
      }
    }
  });
  return rw;
}

// ---- tiles of weight rows · a few activation rows -------------------------------------------------
//
// Rows are taken R at a time (R = LANES: 16 int32 lanes with AVX-512, 8 otherwise), lane r holding row r,
// so a tile's R outputs are finished in registers with no horizontal sum. Within block b of a tile, step
// j (0..7) covers inputs 4j..4j+3: its operand has row r's 4 codes at bytes 4r..4r+3, against the 4
// activations q[4j..4j+3] broadcast to every lane. Q4 packs steps 2i (low nibble) and 2i+1 (high) into
// one 4R-byte vector; Q8 stores each step's 4R bytes as they are. d and m of a block are R fp16 values.

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define QT_VNNI 1
constexpr int64_t LANES = 16, PAIRED = 2;  // two tiles a call: each activation broadcast feeds both
#else
constexpr int64_t LANES = 8, PAIRED = 1;
#endif
constexpr int64_t TILE = LANES * PAIRED;  // weight rows a call of tile_dot computes

#ifndef QT_PREFETCH
#define QT_PREFETCH 8192
#endif
// Bytes ahead of the codes being read that each step asks the cache to fetch: a thread's stream alone keeps
// too few DRAM reads in flight (SmolLM2 int4 decode step 5.4 -> 3.9 ms at 8 KB, measured when the module
// still ran on one thread, LOG.md 2026-12-02).
// Only for one token a call: over several, a tile is read again for each few tokens from L1, and 8 KB
// fetched past its end would push it out.
constexpr int64_t PREFETCH = QT_PREFETCH;

inline int32_t four(const int8_t* q) {  // 4 activations as one int32 (for broadcasting)
  int32_t v;
  std::memcpy(&v, q, 4);
  return v;
}

// out[u·TILE + r] = Σ_k W[row r, k]·x[t + u, k], u < U, for the P·LANES rows at `codes` (kind Q4 or Q8)
// and the U tokens from t of `rw`. A block's codes are loaded and unpacked once for all U tokens, and on
// AVX-512 each activation broadcast feeds P = 2 tiles: over a prefill chunk (U = 4) that is half the
// instructions per token. A decode step (U = 1) takes its tiles one at a time (P = 1): one stream of
// weights, which the prefetches run ahead of (two streams measured 30% slower).
template <int U, int P, bool Twice>
void tile_dot(int64_t kind, const uint8_t* codes, const uint16_t* d, const uint16_t* m, const Rows& rw, int64_t t,
              float* out) {
  constexpr int64_t R = LANES;
  const int64_t nb = rw.Kp / QK, block_bytes = kind == Q4 ? 16 * R : 32 * R;
  const int8_t *q[U], *r[U];
  const float *dx[U], *dr[U], *sx[U];
  for (int u = 0; u < U; ++u) {
    q[u] = rw.q.data() + (t + u) * rw.Kp, r[u] = rw.r.data() + (t + u) * rw.Kp;
    dx[u] = rw.dx.data() + (t + u) * nb, dr[u] = rw.dr.data() + (t + u) * nb, sx[u] = rw.sx.data() + (t + u) * nb;
  }
#if defined(QT_VNNI)
  __m512 acc[U][P];
  for (int u = 0; u < U; ++u)
    for (int p = 0; p < P; ++p) acc[u][p] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* c[P];
    for (int p = 0; p < P; ++p) {
      c[p] = codes + (p * nb + b) * block_bytes;
      for (int64_t i = 0; i < (U == 1 ? (kind == Q4 ? 4 : 8) : 0); ++i)  // see PREFETCH
        _mm_prefetch(reinterpret_cast<const char*>(c[p] + 64 * i + PREFETCH), _MM_HINT_T0);
    }
    __m512i sq[U][P], sr[U][P];  // Σ code·q, Σ code·r per row
    for (int u = 0; u < U; ++u)
      for (int p = 0; p < P; ++p) sq[u][p] = sr[u][p] = _mm512_setzero_si512();
    // step j: w[p] holds 4 codes of each row of tile p for inputs 4j..4j+3 of the block
    const auto step = [&](const __m512i* w, int64_t j) {
      for (int u = 0; u < U; ++u) {
        const __m512i bq = _mm512_set1_epi32(four(q[u] + b * QK + 4 * j));
        const __m512i br = Twice ? _mm512_set1_epi32(four(r[u] + b * QK + 4 * j)) : bq;
        for (int p = 0; p < P; ++p) {
          sq[u][p] = _mm512_dpbusd_epi32(sq[u][p], w[p], bq);
          if constexpr (Twice) sr[u][p] = _mm512_dpbusd_epi32(sr[u][p], w[p], br);
        }
      }
    };
    if (kind == Q4) {  // one 64-byte load: steps 2i (low nibbles) and 2i + 1 (high)
      for (int64_t i = 0; i < 4; ++i) {
        __m512i lo[P], hi[P];
        for (int p = 0; p < P; ++p) {
          const __m512i v = _mm512_loadu_si512(c[p] + 64 * i);
          lo[p] = _mm512_and_si512(v, low);
          hi[p] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        step(lo, 2 * i);
        step(hi, 2 * i + 1);
      }
    } else {
      for (int64_t j = 0; j < 8; ++j) {
        __m512i w[P];
        for (int p = 0; p < P; ++p) w[p] = _mm512_loadu_si512(c[p] + 64 * j);
        step(w, j);
      }
    }
    for (int p = 0; p < P; ++p) {
      const uint16_t* dp = d + (p * nb + b) * R;
      const uint16_t* mp = m + (p * nb + b) * R;
      const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dp)));
      const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mp)));
      for (int u = 0; u < U; ++u) {
        __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(sq[u][p]), _mm512_set1_ps(dx[u][b]));
        if constexpr (Twice) dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sr[u][p]), _mm512_set1_ps(dr[u][b]), dot);
        acc[u][p] = _mm512_fmadd_ps(dot, dv, _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[u][b]), acc[u][p]));
      }
    }
  }
  for (int u = 0; u < U; ++u)
    for (int p = 0; p < P; ++p) _mm512_storeu_ps(out + u * TILE + p * R, acc[u][p]);
#elif defined(__AVX2__)
  __m256 acc[U];
  for (int u = 0; u < U; ++u) acc[u] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* c = codes + b * block_bytes;
    // Q4: codes ≤ 15 against |q| ≤ 127, two steps' maddubs summed stay far inside int16. Q8: maddubs'
    // u8 × s8 pair sums would overflow int16 for codes up to 255, so each step runs as |code - 128| times
    // q with the sign of code - 128 (pair sums below 2^15), and m + 128·d takes the 128 back.
    __m256i w[8], aw[8];
    for (int64_t i = 0; i < (U == 1 ? (kind == Q4 ? 4 : 8) : 0); ++i)  // see PREFETCH
      _mm_prefetch(reinterpret_cast<const char*>(c + 32 * i + PREFETCH), _MM_HINT_T0);
    if (kind == Q4) {
      for (int64_t i = 0; i < 4; ++i) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * i));
        w[2 * i] = _mm256_and_si256(v, low);
        w[2 * i + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      }
    } else {
      const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
      for (int64_t j = 0; j < 8; ++j) {
        w[j] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * j)), flip);
        aw[j] = _mm256_sign_epi8(w[j], w[j]);
      }
    }
    const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + b * R)));
    __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + b * R)));
    if (kind == Q8) mv = _mm256_fmadd_ps(dv, _mm256_set1_ps(128.f), mv);
    const auto dot = [&](const int8_t* a) {  // Σ code·a over the block, per row
      __m256i s = _mm256_setzero_si256();
      for (int64_t i = 0; i < 4; ++i) {
        const __m256i a0 = _mm256_set1_epi32(four(a + 8 * i)), a1 = _mm256_set1_epi32(four(a + 8 * i + 4));
        const __m256i pairs = kind == Q4
            ? _mm256_add_epi16(_mm256_maddubs_epi16(w[2 * i], a0), _mm256_maddubs_epi16(w[2 * i + 1], a1))
            : _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(aw[2 * i], _mm256_sign_epi8(a0, w[2 * i])), ones),
                               _mm256_madd_epi16(_mm256_maddubs_epi16(aw[2 * i + 1], _mm256_sign_epi8(a1, w[2 * i + 1])),
                                                 ones));
        s = _mm256_add_epi32(s, kind == Q4 ? _mm256_madd_epi16(pairs, ones) : pairs);
      }
      return _mm256_cvtepi32_ps(s);
    };
    for (int u = 0; u < U; ++u) {
      __m256 sum = _mm256_mul_ps(dot(q[u] + b * QK), _mm256_set1_ps(dx[u][b]));
      if constexpr (Twice) sum = _mm256_fmadd_ps(dot(r[u] + b * QK), _mm256_set1_ps(dr[u][b]), sum);
      acc[u] = _mm256_fmadd_ps(sum, dv, _mm256_fmadd_ps(mv, _mm256_set1_ps(sx[u][b]), acc[u]));
    }
  }
  for (int u = 0; u < U; ++u) _mm256_storeu_ps(out + u * TILE, acc[u]);
#else
  for (int u = 0; u < U; ++u) {
    for (int64_t row = 0; row < R; ++row) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* c = codes + b * block_bytes;
        int sq = 0, sr = 0;
        for (int64_t j = 0; j < 8; ++j) {
          for (int64_t e = 0; e < 4; ++e) {
            const int w = kind == Q4 ? (c[(j / 2) * 4 * R + 4 * row + e] >> (4 * (j % 2))) & 15
                                     : c[j * 4 * R + 4 * row + e];
            sq += w * q[u][b * QK + 4 * j + e];
            if constexpr (Twice) sr += w * r[u][b * QK + 4 * j + e];
          }
        }
        acc += half(d[b * R + row]) * (dx[u][b] * static_cast<float>(sq) + dr[u][b] * static_cast<float>(sr)) +
               half(m[b * R + row]) * sx[u][b];
      }
      out[u * TILE + row] = acc;
    }
  }
#endif
}

// ---- y (T, N) = x (T, K) · Wᵀ (+ bias) ----------------------------------------------------------

void linear(const Linear& L, const float* x, int64_t T, float* y) {
  if (L.kind == F32) {
    auto xt = at::from_blob(const_cast<float*>(x), {T, L.K});
    auto yt = at::from_blob(y, {T, L.N});
    if (L.bias.defined() && L.bias.numel()) {
      at::addmm_out(yt, L.bias, xt, L.w.t());
    } else {
      at::mm_out(yt, xt, L.w.t());
    }
    return;
  }
  const Rows r = quantize(x, T, L.K, L.Kp, L.twice);
  const int64_t nb = L.Kp / QK, N = L.N, tiles = (N + TILE - 1) / TILE;
  const int64_t tile_bytes = nb * (L.kind == Q4 ? 16 : 32) * TILE;
  const auto* codes = L.codes.data_ptr<uint8_t>();
  const auto* d = reinterpret_cast<const uint16_t*>(L.d.data_ptr<at::Half>());
  const auto* m = reinterpret_cast<const uint16_t*>(L.m.data_ptr<at::Half>());
  const float* bias = L.bias.defined() && L.bias.numel() ? L.bias.data_ptr<float>() : nullptr;
  // Threads take ranges of TILE rows; their weights (a few KB) are read once and stay in L1 for all T
  // tokens, taken 4 at a time while there are 4.
  constexpr int U = 4;
  const int64_t lane_bytes = nb * (L.kind == Q4 ? 16 : 32) * LANES;
  // one tile call, with or without the activations' second rounding
  const auto dot = [&](auto tokens, auto tiles_a_call, const uint8_t* c, int64_t at, int64_t t, float* out) {
    constexpr int u = decltype(tokens)::value, p = decltype(tiles_a_call)::value;
    if (L.twice) {
      tile_dot<u, p, true>(L.kind, c, d + at, m + at, r, t, out);
    } else {
      tile_dot<u, p, false>(L.kind, c, d + at, m + at, r, t, out);
    }
  };
  using one = std::integral_constant<int, 1>;
  at::parallel_for(0, tiles, 1, [&](int64_t i0, int64_t i1) {
    float out[U * TILE];
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* c = codes + i * tile_bytes;
      for (int64_t t = 0; t < T;) {
        const int64_t n_tok = T - t >= U ? U : 1;
        if (n_tok == U) {  // (int8 at K = 1536 one tile at a time: 2.6x slower, LOG.md 2026-12-02)
          dot(std::integral_constant<int, U>{}, std::integral_constant<int, PAIRED>{}, c, i * nb * TILE, t, out);
        } else {
          for (int64_t p = 0; p < PAIRED; ++p)  // d and m of tile p at (i·PAIRED + p)·nb·LANES
            dot(one{}, one{}, c + p * lane_bytes, (i * PAIRED + p) * nb * LANES, t, out + p * LANES);
        }
        for (int64_t u = 0; u < n_tok; ++u) {
          for (int64_t k = 0; k < TILE && i * TILE + k < N; ++k) {
            const int64_t n = i * TILE + k;
            y[(t + u) * N + n] = bias ? out[u * TILE + k] + bias[n] : out[u * TILE + k];
          }
        }
        t += n_tok;
      }
    }
  });
}

// ---- the rest of a block ----------------------------------------------------------------------

void rms_norm(const float* x, const float* w, int64_t T, int64_t n, double eps, float* y) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * n;
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float s = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
    for (int64_t i = 0; i < n; ++i) y[t * n + i] = w[i] * (xr[i] * s);
  }
}

// HF's rotate_half layout: pairs (i, i + D/2); cos / sin rows hold each angle twice.
void rope(float* v, const float* c, const float* s, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = v[i], b = v[i + h];
    v[i] = a * c[i] - b * s[i];
    v[i + h] = b * c[i + h] + a * s[i + h];
  }
}

struct Step {  // where each token goes
  const int64_t* rows;
  const int64_t* pos;
  int64_t T;
};

// ---- attention ----------------------------------------------------------------------------------
//
// The cache holds keys in blocks of KB positions, (layers, rows, KV, S/KB, D, KB): a block is KB keys
// transposed, so a query's scores at KB positions are one vector, summed over dims in registers, and a
// head's keys are one sequential stream. (Keys transposed whole, (D, S), were D short runs a head, each
// from DRAM: SmolLM2 int4 decode attention 1.04 -> 0.49 ms a token, a 128-token prefill's 37 -> 9 ms, LOG.md
// 2026-12-02.)
// Values are (layers, rows, KV, S, D): a weighted sum of rows.
constexpr int64_t KB = 16;

// s[i·n + j - first] = q_i · key j for the NG query heads at q (each D, scaled), positions first..last
// (n = last - first + 1) of one KV head's key blocks `kb`. Each head's sum runs in the same order whatever
// NG is, so a head's scores do not depend on how heads are grouped into tasks.
template <int NG>
void scores(const float* q, int64_t D, const float* kb, int64_t first, int64_t last, float* s) {
  const int64_t n = last - first + 1;
  for (int64_t b = first / KB; b <= last / KB; ++b) {
    const float* k = kb + b * D * KB;
    float blk[NG][KB];
#if defined(__AVX512F__)
    __m512 a[NG][2];
    for (int i = 0; i < NG; ++i) a[i][0] = a[i][1] = _mm512_setzero_ps();
    int64_t e = 0;
    for (; e + 2 <= D; e += 2) {  // two chains a head: an FMA's latency is hidden behind the other's
      const __m512 k0 = _mm512_loadu_ps(k + e * KB), k1 = _mm512_loadu_ps(k + (e + 1) * KB);
      for (int i = 0; i < NG; ++i) {
        a[i][0] = _mm512_fmadd_ps(_mm512_set1_ps(q[i * D + e]), k0, a[i][0]);
        a[i][1] = _mm512_fmadd_ps(_mm512_set1_ps(q[i * D + e + 1]), k1, a[i][1]);
      }
    }
    for (; e < D; ++e)
      for (int i = 0; i < NG; ++i)
        a[i][0] = _mm512_fmadd_ps(_mm512_set1_ps(q[i * D + e]), _mm512_loadu_ps(k + e * KB), a[i][0]);
    for (int i = 0; i < NG; ++i) _mm512_storeu_ps(blk[i], _mm512_add_ps(a[i][0], a[i][1]));
#else
    for (int i = 0; i < NG; ++i) {
      std::fill(blk[i], blk[i] + KB, 0.f);
      for (int64_t e = 0; e < D; ++e) {
        const float qe = q[i * D + e];
#pragma omp simd
        for (int64_t l = 0; l < KB; ++l) blk[i][l] += qe * k[e * KB + l];
      }
    }
#endif
    const int64_t lo = std::max(first, b * KB), hi = std::min(last + 1, (b + 1) * KB);  // this block's positions
    for (int i = 0; i < NG; ++i) std::copy(blk[i] + lo - b * KB, blk[i] + hi - b * KB, s + i * n + lo - first);
  }
}

// o_i = Σ_j w[i·n + j] · v_j for the NG heads, over the n value rows at v (each D).
template <int NG>
void weighted_sum(const float* w, int64_t n, const float* v, int64_t D, float* o, int64_t o_stride) {
#if defined(__AVX512F__)
  if (D % 64 == 0) {
    for (int64_t d0 = 0; d0 < D; d0 += 64) {  // NG heads × 64 dims: up to 16 accumulators in registers
      __m512 a[NG][4];
      for (int i = 0; i < NG; ++i)
        for (int r = 0; r < 4; ++r) a[i][r] = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; ++j) {
        const float* vr = v + j * D + d0;
        const __m512 v0 = _mm512_loadu_ps(vr), v1 = _mm512_loadu_ps(vr + 16), v2 = _mm512_loadu_ps(vr + 32),
                     v3 = _mm512_loadu_ps(vr + 48);
        for (int i = 0; i < NG; ++i) {
          const __m512 c = _mm512_set1_ps(w[i * n + j]);
          a[i][0] = _mm512_fmadd_ps(c, v0, a[i][0]);
          a[i][1] = _mm512_fmadd_ps(c, v1, a[i][1]);
          a[i][2] = _mm512_fmadd_ps(c, v2, a[i][2]);
          a[i][3] = _mm512_fmadd_ps(c, v3, a[i][3]);
        }
      }
      for (int i = 0; i < NG; ++i)
        for (int r = 0; r < 4; ++r) _mm512_storeu_ps(o + i * o_stride + d0 + 16 * r, a[i][r]);
    }
    return;
  }
#endif
  for (int i = 0; i < NG; ++i) {
    float* oi = o + i * o_stride;
    std::fill(oi, oi + D, 0.f);
    for (int64_t j = 0; j < n; ++j) {
      const float c = w[i * n + j];
#pragma omp simd
      for (int64_t e = 0; e < D; ++e) oi[e] += c * v[j * D + e];
    }
  }
}

// q|k|v (T, (NH + 2KV)·D) -> attention output (T, NH·D); writes this step's keys and values into the cache.
// A task is one token's KV head with up to 4 of the query heads that share it (GQA: its keys and values are
// read once for them); with few tokens (decode) a task takes one query head, so 2 threads share 3 KV heads
// evenly. Tokens are dealt first, last, second, second-to-last, ...: a causal chunk's late tokens cost the most.
void attention(const Model& md, const Layer& L, int64_t layer, float* qkv, const Step& st, at::Tensor& kc,
               at::Tensor& vc, float* out) {
  const int64_t D = md.D, NH = md.NH, KV = md.KV, G = NH / KV, W = (NH + 2 * KV) * D;
  const int64_t B = kc.size(1), NB = kc.size(3), S = NB * KB;
  float* K = kc.data_ptr<float>() + layer * B * KV * S * D;
  float* V = vc.data_ptr<float>() + layer * B * KV * S * D;
  const float* cs = md.cos.data_ptr<float>();
  const float* sn = md.sin.data_ptr<float>();
  const bool qk_norm = L.qn.defined() && L.qn.numel();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  for (int64_t t = 0; t < st.T; ++t) {
    float* row = qkv + t * W;
    const int64_t p = st.pos[t];
    for (int64_t h = 0; h < NH + KV; ++h) {  // queries, then keys: [norm,] rotate; queries scaled by 1/√D
      float* v = row + h * D;
      if (qk_norm) rms_norm(v, (h < NH ? L.qn : L.kn).data_ptr<float>(), 1, D, md.eps, v);
      rope(v, cs + p * D, sn + p * D, D);
      if (h < NH)
        for (int64_t e = 0; e < D; ++e) v[e] *= scale;
    }
    for (int64_t h = 0; h < KV; ++h) {
      const int64_t head = st.rows[t] * KV + h;
      float* kb = K + (head * NB + p / KB) * D * KB + p % KB;
      for (int64_t e = 0; e < D; ++e) kb[e * KB] = row[(NH + h) * D + e];
      std::copy(row + (NH + KV + h) * D, row + (NH + KV + h + 1) * D, V + (head * S + p) * D);
    }
  }
  const int64_t per = st.T * KV >= 4 * at::get_num_threads() ? 4 : 1;  // query heads a task
  const int64_t chunks = (G + per - 1) / per;
  at::parallel_for(0, st.T * KV * chunks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> w;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k = i / (KV * chunks), t = k % 2 == 0 ? k / 2 : st.T - 1 - k / 2;
      const int64_t h = i / chunks % KV, g0 = i % chunks * per, ng = std::min(per, G - g0);
      const int64_t p = st.pos[t], head = st.rows[t] * KV + h;
      const int64_t first = L.window > 0 ? std::max<int64_t>(0, p - L.window + 1) : 0, n = p + 1 - first;
      const float* q = qkv + t * W + (h * G + g0) * D;
      const float* kb = K + head * NB * D * KB;
      w.resize(ng * n);
      switch (ng) {
        case 1: scores<1>(q, D, kb, first, p, w.data()); break;
        case 2: scores<2>(q, D, kb, first, p, w.data()); break;
        case 3: scores<3>(q, D, kb, first, p, w.data()); break;
        default: scores<4>(q, D, kb, first, p, w.data());
      }
      for (int64_t g = 0; g < ng; ++g) {  // softmax's numerators; the sum divides the output below
        float* s = w.data() + g * n;
        float top = -INFINITY;
#pragma omp simd reduction(max : top)
        for (int64_t j = 0; j < n; ++j) top = std::max(top, s[j]);
        for (int64_t j = 0; j < n; ++j) s[j] -= top;
        exp_inplace(s, n);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < n; ++j) total += s[j];
        for (int64_t j = 0; j < n; ++j) s[j] /= total;
      }
      const float* v = V + (head * S + first) * D;
      float* o = out + t * NH * D + (h * G + g0) * D;
      switch (ng) {
        case 1: weighted_sum<1>(w.data(), n, v, D, o, D); break;
        case 2: weighted_sum<2>(w.data(), n, v, D, o, D); break;
        case 3: weighted_sum<3>(w.data(), n, v, D, o, D); break;
        default: weighted_sum<4>(w.data(), n, v, D, o, D);
      }
    }
  });
}

// x (T, H) fp32 embeddings -> logits (P, vocab) for the tokens in logit_index.
at::Tensor forward(const Model& md, at::Tensor x, at::Tensor rows, at::Tensor pos, at::Tensor logit_index,
                   at::Tensor kc, at::Tensor vc) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == md.H && x.scalar_type() == at::kFloat, "x must be (T, hidden) fp32");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.scalar_type() == at::kFloat && kc.dim() == 6 &&
                  vc.dim() == 5 && kc.size(5) == KB && kc.size(4) == md.D && kc.size(3) * KB == vc.size(3),
              "caches: keys (layers, rows, KV, S/16, D, 16) and values (layers, rows, KV, S, D), fp32, contiguous");
  x = x.contiguous().clone();
  rows = rows.to(at::kLong).contiguous();
  pos = pos.to(at::kLong).contiguous();
  const int64_t T = x.size(0), H = md.H, D = md.D;
  const Step st{rows.data_ptr<int64_t>(), pos.data_ptr<int64_t>(), T};
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(st.rows[t] >= 0 && st.rows[t] < kc.size(1), "cache row out of range");
    TORCH_CHECK(st.pos[t] >= 0 && st.pos[t] < vc.size(3) && st.pos[t] < md.cos.size(0), "position out of range");
  }
  std::vector<float> h(T * H), tmp(T * H), qkv(T * (md.NH + 2 * md.KV) * D), att(T * md.NH * D),
      gu(T * 2 * md.I), act(T * md.I);
  float* xs = x.data_ptr<float>();
  for (size_t l = 0; l < md.layers.size(); ++l) {
    const Layer& L = md.layers[l];
    rms_norm(xs, L.ln1.data_ptr<float>(), T, H, md.eps, h.data());
    linear(L.qkv, h.data(), T, qkv.data());
    attention(md, L, static_cast<int64_t>(l), qkv.data(), st, kc, vc, att.data());
    linear(L.o, att.data(), T, tmp.data());
    for (int64_t i = 0; i < T * H; ++i) xs[i] += tmp[i];
    rms_norm(xs, L.ln2.data_ptr<float>(), T, H, md.eps, h.data());
    linear(L.gate_up, h.data(), T, gu.data());
    for (int64_t t = 0; t < T; ++t) {  // SiLU(gate) · up = gate / (1 + e^-gate) · up
      const float* g = gu.data() + t * 2 * md.I;
      float* a = act.data() + t * md.I;
      for (int64_t i = 0; i < md.I; ++i) a[i] = -g[i];
      exp_inplace(a, md.I);
      for (int64_t i = 0; i < md.I; ++i) a[i] = g[i] / (1.f + a[i]) * g[md.I + i];
    }
    linear(L.down, act.data(), T, tmp.data());
    for (int64_t i = 0; i < T * H; ++i) xs[i] += tmp[i];
  }
  auto picked = x.index_select(0, logit_index.to(at::kLong)).contiguous();  // (P, H)
  const int64_t P = picked.size(0);
  std::vector<float> normed(P * H);
  rms_norm(picked.data_ptr<float>(), md.norm.data_ptr<float>(), P, H, md.eps, normed.data());
  auto logits = at::empty({P, md.head.N}, x.options());
  linear(md.head, normed.data(), P, logits.data_ptr<float>());
  return logits;
}

// One product on its own (tests compare it with an fp64 reference of the same rounding).
at::Tensor matmul(const Linear& L, at::Tensor x) {
  x = x.to(at::kFloat).contiguous();
  TORCH_CHECK(x.dim() == 2 && x.size(1) == L.K, "x must be (T, K)");
  auto y = at::empty({x.size(0), L.N}, x.options());
  linear(L, x.data_ptr<float>(), x.size(0), y.data_ptr<float>());
  return y;
}

std::string isa() {
#if defined(QT_VNNI)
  return "avx512_vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  namespace py = pybind11;
  py::class_<Linear>(mod, "Linear")
      .def(py::init([](int64_t kind, int64_t N, int64_t K, at::Tensor codes, at::Tensor d, at::Tensor m,
                       at::Tensor w, at::Tensor bias, bool twice) {
             const int64_t Kp = (K + 63) / 64 * 64;
             return Linear{kind, N, K, Kp, twice, codes.contiguous(), d.contiguous(), m.contiguous(),
                           w.contiguous(), bias.contiguous()};
           }),
           py::arg("kind"), py::arg("N"), py::arg("K"), py::arg("codes"), py::arg("d"), py::arg("m"), py::arg("w"),
           py::arg("bias"), py::arg("twice"));
  py::class_<Layer>(mod, "Layer")
      .def(py::init([](Linear qkv, Linear o, Linear gate_up, Linear down, at::Tensor ln1, at::Tensor ln2,
                       at::Tensor qn, at::Tensor kn, int64_t window) {
        return Layer{qkv, o, gate_up, down, ln1.contiguous(), ln2.contiguous(), qn.contiguous(), kn.contiguous(),
                     window};
      }));
  py::class_<Model>(mod, "Model")
      .def(py::init([](std::vector<Layer> layers, Linear head, at::Tensor norm, at::Tensor cos, at::Tensor sin,
                       int64_t H, int64_t NH, int64_t KV, int64_t D, int64_t I, double eps) {
        return Model{std::move(layers), head, norm.contiguous(), cos.contiguous(), sin.contiguous(),
                     H, NH, KV, D, I, eps};
      }));
  // Both let go of the GIL: a server's event loop keeps streaming and answering while a step runs.
  mod.def("forward", &forward, py::call_guard<py::gil_scoped_release>(),
          "the decoder over T tokens on their cache rows; logits at logit_index");
  mod.def("matmul", &matmul, py::call_guard<py::gil_scoped_release>(), "one quantized product, y = x · Wᵀ (+ bias)");
  mod.def("isa", &isa, "the instructions this build's products use");
  mod.def("threads", [] {  // ATen's parallel_for gives each thread one range: count them
    std::atomic<int> ranges{0};
    at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) { ranges.fetch_add(1); });
    return ranges.load();
  }, "threads this module's parallel loops run on (1 if built without OpenMP)");
  mod.def("tile", [] { return LANES; }, "weight rows per tile in this build's layout");
}
