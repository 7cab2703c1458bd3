// Attention read straight out of the paged KV cache, for the CPU: a step's whole flat batch,
// decodes and prompt chunks, in one call.
//
// A work item is up to 8 consecutive query tokens of one sequence (a decode is one): their
// query heads are scored against every key of the context as the block table finds them,
// causally, then the values are summed with the softmax weights. Keys and values are read
// in place, once per item; a chunk over a cached prefix reads the prefix where it lies.
// A long prompt chunk's keys are first laid out once, for all its items (pack_keys).
//
// The same source builds four ways (engine/cpu_kernels.py picks the best the CPU runs):
// with -mavx512f/bw/vl/dq the inner loops use 16-float vectors, adding -mavx512bf16 the
// bfloat16 model's products use the hardware's bfloat16 dot product, with -mavx2 -mfma
// -mf16c 8-float vectors, and with no ISA flags plain loops that the compiler vectorises as
// it can (the build for CPUs without AVX2, and for Arm). Each build registers its operator
// under its own namespace, ITERSERVE_OPS, so several can live in one process (the tests load
// every build the host can run).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define ITERSERVE_VECTOR_BITS 512
#if defined(__AVX512BF16__)
#define ITERSERVE_ISA "avx512bf16"
#else
#define ITERSERVE_ISA "avx512"
#endif
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ITERSERVE_VECTOR_BITS 256
#define ITERSERVE_ISA "avx2"
#else
#define ITERSERVE_VECTOR_BITS 0
#define ITERSERVE_ISA "portable"
#endif

#if ITERSERVE_VECTOR_BITS > 0
#include <immintrin.h>
#endif

#ifndef ITERSERVE_OPS
#define ITERSERVE_OPS iterserve_cpu
#endif

namespace {

// The two inner loops, a block's key or value rows against the group's query heads. gcc
// does not vectorise them well from plain loops (bf16 widening, a horizontal sum per dot,
// sums held in registers across rows), so where the build has vectors they are written out
// over `Vec`; elsewhere plain loops take a row at a time.
#if ITERSERVE_VECTOR_BITS == 512
struct Vec {
  static constexpr int kWidth = 16;
  __m512 v;
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load(const c10::BFloat16* p) {  // bf16 is the top half of a float
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))};
  }
  static Vec load(const c10::Half* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
  static Vec load(const c10::Float8_e5m2* p) {  // e5m2 is the top byte of a half
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(raw), 8))};
  }
  static Vec splat(float x) { return {_mm512_set1_ps(x)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(float* p, int n) const { _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v); }
  // Lane k of the result is the sum of x[k]'s lanes: 16 sums for 46 instructions, where
  // one at a time costs about 8 each. Pairs of vectors first fold to their 256-bit halves
  // side by side, then two rounds of pairwise adds within 128-bit lanes, then across them.
  static Vec sums(const Vec* x) {
    auto fold = [](__m512 a, __m512 b) {  // [a.lo + a.hi | b.lo + b.hi], in 256-bit halves
      return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    };
    auto pairwise = [](__m512 a, __m512 b) {  // per 128-bit lane: a0+a1, a2+a3, b0+b1, b2+b3
      return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
    };
    __m512 f[8];
    for (int k = 0; k < 8; ++k) f[k] = fold(x[k].v, x[k + 8].v);
    const __m512 low = pairwise(pairwise(f[0], f[1]), pairwise(f[2], f[3]));   // x0-3 | x8-11, per 128-bit lane
    const __m512 high = pairwise(pairwise(f[4], f[5]), pairwise(f[6], f[7]));  // x4-7 | x12-15
    // Quarter j of low holds partial sums of x0-3 (j = 0, 1) or x8-11 (j = 2, 3).
    const __m512 summed = _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88), _mm512_shuffle_f32x4(low, high, 0xDD));
    return {_mm512_shuffle_f32x4(summed, summed, 0xD8)};  // [x0-3, x8-11, x4-7, x12-15] into order
  }
  friend Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
};
#elif ITERSERVE_VECTOR_BITS == 256
struct Vec {
  static constexpr int kWidth = 8;
  __m256 v;
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const c10::BFloat16* p) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))};
  }
  static Vec load(const c10::Half* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
  static Vec load(const c10::Float8_e5m2* p) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return {_mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(raw), 8))};
  }
  static Vec splat(float x) { return {_mm256_set1_ps(x)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(float* p, int n) const {
    alignas(32) float all[kWidth];
    _mm256_store_ps(all, v);
    std::copy(all, all + n, p);
  }
  // Lane k of the result is the sum of x[k]'s lanes (8 sums for 9 instructions).
  static Vec sums(const Vec* x) {
    const __m256 x0123 = _mm256_hadd_ps(_mm256_hadd_ps(x[0].v, x[1].v), _mm256_hadd_ps(x[2].v, x[3].v));
    const __m256 x4567 = _mm256_hadd_ps(_mm256_hadd_ps(x[4].v, x[5].v), _mm256_hadd_ps(x[6].v, x[7].v));
    // Each holds its four vectors' partial sums once per 128-bit half.
    return {_mm256_add_ps(_mm256_permute2f128_ps(x0123, x4567, 0x20), _mm256_permute2f128_ps(x0123, x4567, 0x31))};
  }
  friend Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
};
#endif

#if ITERSERVE_VECTOR_BITS > 0
template <typename T>
constexpr bool kHasVectorLoad = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> ||
                                std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::Float8_e5m2>;

// Rows of HD elements of T load as whole vectors.
template <typename T, int HD>
constexpr bool kVectorRows = HD > 0 && HD % Vec::kWidth == 0 && kHasVectorLoad<T>;

template <typename T, int HD>
inline void load_row(const T* p, Vec* row) {
  for (int j = 0; j < HD / Vec::kWidth; ++j) row[j] = Vec::load(p + Vec::kWidth * j);
}
#endif

// scores[g * stride] = q_g . k for each query head g of the group (rows that are not whole vectors).
template <typename T>
inline void score_row(const float* q, const T* k, int64_t group, int64_t hd, float* scores, int64_t stride) {
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * hd;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < hd; ++d) dot += qg[d] * static_cast<float>(k[d]);
    scores[g * stride] = dot;
  }
}

#if ITERSERVE_VECTOR_BITS > 0
// Query heads scored together: their partial dot products for Vec::kWidth keys wait in a
// stack array (8 KB at most) for one batched reduction per head.
constexpr int64_t kHeadsPerPass = 8;

// scores[g * stride + i] = scale * (the sum of partial[g][i]'s lanes), for the first `heads`
// heads and the n <= Vec::kWidth keys i: each head's n dot products end in one reduction.
inline void store_sums(Vec (*partial)[Vec::kWidth], int64_t heads, int64_t n, Vec scale, float* scores,
                       int64_t stride) {
  for (int64_t g = 0; g < heads; ++g) {
    for (int64_t i = n; i < Vec::kWidth; ++i) partial[g][i] = Vec::splat(0.0f);
    const Vec sums = Vec::sums(partial[g]) * scale;
    if (n == Vec::kWidth)
      sums.store(scores + g * stride);
    else
      sums.store(scores + g * stride, static_cast<int>(n));
  }
}

// scores[g * stride + i] = q_g . k_i for the n <= Vec::kWidth keys k_i, `key_stride` apart,
// and each query head g of the group. Each key row is loaded and widened once per pass
// over up to kHeadsPerPass heads, and each head's n dot products end in one reduction
// (Vec::sums) rather than n.
template <typename T, int HD>
inline void score_keys(const float* q, const T* keys, int64_t key_stride, int64_t n, int64_t group, float* scores,
                       int64_t stride) {
  constexpr int kVectors = HD / Vec::kWidth;
  Vec partial[kHeadsPerPass][Vec::kWidth];
  for (int64_t g0 = 0; g0 < group; g0 += kHeadsPerPass) {
    const int64_t heads = std::min(kHeadsPerPass, group - g0);
    for (int64_t i = 0; i < n; ++i) {
      Vec key[kVectors];
      load_row<T, HD>(keys + i * key_stride, key);
      for (int64_t g = 0; g < heads; ++g) {
        const float* qg = q + (g0 + g) * HD;
        Vec sum = Vec::load(qg) * key[0];
        for (int j = 1; j < kVectors; ++j) sum = fmadd(Vec::load(qg + Vec::kWidth * j), key[j], sum);
        partial[g][i] = sum;
      }
    }
    store_sums(partial, heads, n, Vec::splat(1.0f), scores + g0 * stride, stride);
  }
}
#endif

// acc_g += weights[g * stride] * v for each query head g of the group (rows that are not whole vectors).
template <typename T>
inline void accumulate_row(float* acc, const T* v, const float* weights, int64_t stride, int64_t group, int64_t hd) {
  for (int64_t g = 0; g < group; ++g) {
    const float weight = weights[g * stride];
    float* a = acc + g * hd;
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) a[d] += weight * static_cast<float>(v[d]);
  }
}

#if ITERSERVE_VECTOR_BITS > 0
// How many Vec accumulators one pass over a block's value rows holds in registers: half the
// register file, the rest for the value row being added and its weights.
constexpr int kAccumulators = ITERSERVE_VECTOR_BITS == 512 ? 16 : 8;

// acc_g += sum over i < n of weights[g * stride + i] * v_i, for the n value rows v_i,
// `value_stride` apart, and each query head g of the group. The sums stay in registers over
// the rows, so acc is read and written once per block instead of once per row: each row's
// update would otherwise wait on the store of the row before it. A pass takes as many heads
// and as many of a row's vectors as kAccumulators holds (with AVX2 at head size 128, half a
// row: its 16 vectors would leave no registers for the row being added).
template <typename T, int HD>
inline void accumulate_rows(float* acc, const T* values, int64_t value_stride, int64_t n, const float* weights,
                            int64_t stride, int64_t group) {
  constexpr int kVectors = HD / Vec::kWidth;
  constexpr int kColumns = std::min(kVectors, kAccumulators);  // vectors of a row per pass
  constexpr int kHeads = kAccumulators / kColumns;
  static_assert(kVectors % kColumns == 0);
  for (int64_t g0 = 0; g0 < group; g0 += kHeads) {
    const int64_t heads = std::min<int64_t>(kHeads, group - g0);
    for (int c = 0; c < kVectors; c += kColumns) {
      Vec sum[kHeads][kColumns];
#pragma GCC unroll 16
      for (int g = 0; g < kHeads; ++g)
        if (g < heads)
#pragma GCC unroll 16
          for (int j = 0; j < kColumns; ++j) sum[g][j] = Vec::load(acc + (g0 + g) * HD + Vec::kWidth * (c + j));
      for (int64_t i = 0; i < n; ++i) {
        Vec value[kColumns];
        load_row<T, kColumns * Vec::kWidth>(values + i * value_stride + Vec::kWidth * c, value);
#pragma GCC unroll 16
        for (int g = 0; g < kHeads; ++g) {
          if (g < heads) {
            const Vec weight = Vec::splat(weights[(g0 + g) * stride + i]);
#pragma GCC unroll 16
            for (int j = 0; j < kColumns; ++j) sum[g][j] = fmadd(weight, value[j], sum[g][j]);
          }
        }
      }
#pragma GCC unroll 16
      for (int g = 0; g < kHeads; ++g)
        if (g < heads)
#pragma GCC unroll 16
          for (int j = 0; j < kColumns; ++j) sum[g][j].store(acc + (g0 + g) * HD + Vec::kWidth * (c + j));
    }
  }
}
#endif

#if defined(__AVX512BF16__)
// bfloat16 queries over a bfloat16 cache (the avx512bf16 build): the hardware's bfloat16 dot
// product (vdpbf16ps) multiplies 32 pairs a vector and sums each two into a float lane, so
// the keys and values need no widening and each vector instruction does twice the work.
template <typename T, typename C, int HD>
constexpr bool kBf16Dot = std::is_same_v<T, c10::BFloat16> && std::is_same_v<C, c10::BFloat16> && HD > 0 &&
                          HD % 32 == 0 && HD <= 128;

inline __m512bh load_bf16(const c10::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }

// As score_keys, with the queries in bfloat16 as they came (the scale is applied to the sums).
template <int HD>
inline void score_keys_bf16(const c10::BFloat16* q, const c10::BFloat16* keys, int64_t key_stride, int64_t n,
                            int64_t group, float scale, float* scores, int64_t stride) {
  constexpr int kVectors = HD / 32;
  Vec partial[kHeadsPerPass][Vec::kWidth];
  for (int64_t g0 = 0; g0 < group; g0 += kHeadsPerPass) {
    const int64_t heads = std::min(kHeadsPerPass, group - g0);
    for (int64_t i = 0; i < n; ++i) {
      __m512bh key[kVectors];
      for (int j = 0; j < kVectors; ++j) key[j] = load_bf16(keys + i * key_stride + 32 * j);
      for (int64_t g = 0; g < heads; ++g) {
        const c10::BFloat16* qg = q + (g0 + g) * HD;
        __m512 sum = _mm512_dpbf16_ps(_mm512_setzero_ps(), load_bf16(qg), key[0]);
        for (int j = 1; j < kVectors; ++j) sum = _mm512_dpbf16_ps(sum, load_bf16(qg + 32 * j), key[j]);
        partial[g][i] = {sum};
      }
    }
    store_sums(partial, heads, n, Vec::splat(scale), scores + g0 * stride, stride);
  }
}

// Where element d of a head's output sits in its accumulators under accumulate_rows_bf16:
// two value rows are interleaved 16 bits at a time within each 128-bit lane, so a 512-bit
// vector of 32 elements feeds two accumulators, the low and high four of each lane's eight.
inline int64_t pair_order(int64_t d) {
  const int64_t within = d % 32, lane = within / 8, high = within % 8 / 4;
  return (2 * (d / 32) + high) * 16 + lane * 4 + within % 4;
}

// As accumulate_rows, two value rows per instruction: acc_g (in pair_order) += w_i v_i +
// w_i+1 v_i+1, the weights rounded to bfloat16 (as GPU flash attention rounds them). An odd
// last row is paired with zeros; `weights` must then hold a finite value one past it.
template <int HD>
inline void accumulate_rows_bf16(float* acc, const c10::BFloat16* values, int64_t value_stride, int64_t n,
                                 const c10::BFloat16* weights, int64_t stride, int64_t group) {
  constexpr int kVectors = HD / 16;  // accumulators a head
  constexpr int kHeads = kAccumulators / kVectors;
  for (int64_t g0 = 0; g0 < group; g0 += kHeads) {
    const int64_t heads = std::min<int64_t>(kHeads, group - g0);
    Vec sum[kHeads][kVectors];
#pragma GCC unroll 16
    for (int g = 0; g < kHeads; ++g)
      if (g < heads)
#pragma GCC unroll 16
        for (int j = 0; j < kVectors; ++j) sum[g][j] = Vec::load(acc + (g0 + g) * HD + 16 * j);
    for (int64_t i = 0; i < n; i += 2) {
      __m512bh pairs[kVectors];
      for (int j = 0; j < kVectors / 2; ++j) {
        const __m512i a = _mm512_loadu_si512(values + i * value_stride + 32 * j);
        const __m512i b = i + 1 < n ? _mm512_loadu_si512(values + (i + 1) * value_stride + 32 * j)
                                    : _mm512_setzero_si512();
        pairs[2 * j] = (__m512bh)_mm512_unpacklo_epi16(a, b);
        pairs[2 * j + 1] = (__m512bh)_mm512_unpackhi_epi16(a, b);
      }
#pragma GCC unroll 16
      for (int g = 0; g < kHeads; ++g) {
        if (g < heads) {
          int32_t two;
          std::memcpy(&two, weights + (g0 + g) * stride + i, sizeof(two));
          const __m512bh weight = (__m512bh)_mm512_set1_epi32(two);
#pragma GCC unroll 16
          for (int j = 0; j < kVectors; ++j) sum[g][j] = {_mm512_dpbf16_ps(sum[g][j].v, pairs[j], weight)};
        }
      }
    }
#pragma GCC unroll 16
    for (int g = 0; g < kHeads; ++g)
      if (g < heads)
#pragma GCC unroll 16
        for (int j = 0; j < kVectors; ++j) sum[g][j].store(acc + (g0 + g) * HD + 16 * j);
  }
}

// e^x to within about 2 ulp: x log2(e) = n + f with |f| <= 1/2, 2^f by its Taylor series to
// the 6th power (the next term is about 2^-23), and n added to the exponent by vscalefps,
// which takes a result below the float range to 0.
inline __m512 exp_ps(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);  // ln(2)^6 / 6!
  for (const float c : {1.3333558146428443e-3f, 9.6181291076284772e-3f, 5.5504108664821580e-2f,
                        2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.0f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

#else
template <typename T, typename C, int HD>
constexpr bool kBf16Dot = false;
#endif

#if ITERSERVE_VECTOR_BITS > 0
// A prompt chunk's items all score the same keys, and score_keys spends as much on the
// horizontal sums that end each dot product as on the products, more with bfloat16 dot
// products. So a chunk has its keys laid out once per call for dot products that sum
// nothing across lanes: in tiles of Vec::kWidth context positions, one vector per word of
// a key (a Lanes' worth of its dimensions), lane k for the tile's k-th key. A query's word,
// broadcast, then meets the same word of a tile's keys in one instruction. Tiles come in
// pairs; the positions past the context are zero (and never stored).
//
// Every chunk of two rows or more packs, short ones too: the sums run in another order than
// score_keys', so a row's bits would otherwise depend on the chunk around it, and a prompt
// sent again, its tail computed alone after a prefix-cache hit, could draw other tokens
// under the same seed. One row (a decode, or a one-token tail) keeps the in-place path.
constexpr int64_t kPackedRows = 2;

// Keys widened to float, a dimension a word: any vector build, any cache dtype.
struct FloatLanes {
  using Word = float;
  static constexpr int kDims = 1;
  template <typename C>
  static Word word(const C* key, int w) { return static_cast<float>(key[w]); }
  static Vec dot(Vec acc, Word q, const Word* keys) { return fmadd(Vec::splat(q), Vec::load(keys), acc); }
};

#if defined(__AVX512BF16__)
// bfloat16 keys, two dimensions a word, for vdpbf16ps (the avx512bf16 build's bfloat16 path).
struct Bf16PairLanes {
  using Word = uint32_t;
  static constexpr int kDims = 2;
  template <typename C>
  static Word word(const C* key, int w) {
    Word pair;
    std::memcpy(&pair, key + 2 * w, sizeof(pair));
    return pair;
  }
  static Vec dot(Vec acc, Word q, const Word* keys) {
    return {_mm512_dpbf16_ps(acc.v, (__m512bh)_mm512_set1_epi32(static_cast<int>(q)),
                             (__m512bh)_mm512_loadu_si512(keys))};
  }
};
#endif

// How a path's packed keys are multiplied: kBf16Dot's in bfloat16 pairs, the rest in floats.
#if defined(__AVX512BF16__)
template <typename T, typename C, int HD>
using PackedLanes = std::conditional_t<kBf16Dot<T, C, HD>, Bf16PairLanes, FloatLanes>;
#else
template <typename T, typename C, int HD>
using PackedLanes = FloatLanes;
#endif

// Head sizes whose key rows are whole vectors (the unrolled paths) pack.
template <typename C, int HD>
constexpr bool kPacks = kVectorRows<C, HD>;

inline int64_t packed_tiles(int64_t context) { return (context + 2 * Vec::kWidth - 1) / (2 * Vec::kWidth) * 2; }

// The first n lanes of x to p.
inline void store_first(Vec x, float* p, int64_t n) {
  if (n == Vec::kWidth)
    x.store(p);
  else
    x.store(p, static_cast<int>(n));
}

// Words of one KV head's packed keys: every word of a key, for each of its tiles.
template <typename Lanes, int HD>
inline int64_t packed_head_words(int64_t context) { return packed_tiles(context) * HD / Lanes::kDims * Vec::kWidth; }

// KV head `kv_head`'s keys of a sequence's first `context` positions, as the block table
// finds them, into its part of `packed`.
template <typename Lanes, typename C, int HD>
void pack_keys(const C* key_cache, const int32_t* block_table, int64_t context, int64_t block_size,
               int64_t kv_heads, int64_t kv_head, typename Lanes::Word* packed) {
  constexpr int kWords = HD / Lanes::kDims, kWidth = Vec::kWidth;
  typename Lanes::Word* tile = packed + kv_head * packed_head_words<Lanes, HD>(context);
  for (int64_t t = 0; t < packed_tiles(context); ++t, tile += kWords * kWidth)
    for (int64_t k = 0; k < kWidth; ++k) {
      const int64_t position = t * kWidth + k;
      if (position >= context) {
        for (int w = 0; w < kWords; ++w) tile[w * kWidth + k] = 0;
        continue;
      }
      const int64_t slot = static_cast<int64_t>(block_table[position / block_size]) * block_size +
                           position % block_size;
      const C* key = key_cache + (slot * kv_heads + kv_head) * HD;
      for (int w = 0; w < kWords; ++w) tile[w * kWidth + k] = Lanes::template word<C>(key, w);
    }
}

// scores[v * stride + i] = scale * q_v . key_i for the query vectors v < width (HD apart, as
// Lanes' words) and the first `context` keys of one KV head packed by pack_keys. A pass takes
// two tiles and as many query vectors as leave registers for the tiles' words.
template <typename Lanes, int HD>
void score_packed(const typename Lanes::Word* q, int64_t width, const typename Lanes::Word* packed,
                  int64_t context, float scale, float* scores, int64_t stride) {
  constexpr int kWords = HD / Lanes::kDims, kWidth = Vec::kWidth;
  constexpr int kVectorsPerPass = ITERSERVE_VECTOR_BITS == 512 ? 12 : 6;
  const Vec scale_v = Vec::splat(scale);
  for (int64_t t = 0; t * kWidth < context; t += 2) {
    const typename Lanes::Word* tile = packed + t * kWords * kWidth;
    const int64_t first = std::min<int64_t>(kWidth, context - t * kWidth);
    const int64_t second = std::clamp<int64_t>(context - (t + 1) * kWidth, 0, kWidth);
    for (int64_t v0 = 0; v0 < width; v0 += kVectorsPerPass) {
      const int64_t vectors = std::min<int64_t>(kVectorsPerPass, width - v0);
      Vec acc[kVectorsPerPass][2];
#pragma GCC unroll 16
      for (int v = 0; v < kVectorsPerPass; ++v) acc[v][0] = acc[v][1] = Vec::splat(0.0f);
      for (int w = 0; w < kWords; ++w) {
#pragma GCC unroll 16
        for (int v = 0; v < kVectorsPerPass; ++v) {
          if (v < vectors) {
            const typename Lanes::Word word = q[(v0 + v) * kWords + w];
            acc[v][0] = Lanes::dot(acc[v][0], word, tile + w * kWidth);
            acc[v][1] = Lanes::dot(acc[v][1], word, tile + (kWords + w) * kWidth);
          }
        }
      }
#pragma GCC unroll 16
      for (int v = 0; v < kVectorsPerPass; ++v) {
        if (v < vectors) {
          float* s = scores + (v0 + v) * stride + t * kWidth;
          store_first(acc[v][0] * scale_v, s, first);
          if (second > 0) store_first(acc[v][1] * scale_v, s + kWidth, second);
        }
      }
    }
  }
}
#endif

// A sequence's keys as pack_keys lays them out (its Lanes' words, 4 bytes each), `head_words`
// per KV head; none: null.
struct PackedKeys {
  const void* words = nullptr;
  int64_t head_words = 0;
};

// Asks for a block's cache lines while the block before it is being read: a request's
// blocks are scattered over the pool, so the hardware prefetcher cannot guess the next.
// Into L2 (the T1 hint), not L1: a block is ~100 lines, and asking L1 for them all stalls
// on its few miss buffers (on a 2-core EPYC the kernel alone ran 1.3-1.6x slower so).
inline void prefetch(const void* start, int64_t bytes) {
  const char* p = static_cast<const char*>(start);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset, 0, 2);
}

// Attention of `rows` consecutive query tokens of one sequence (all heads each) over its
// context, causally: the last of them sees `context` keys, each one before it one key fewer.
// A decode is one row. Rows share a pass over the keys and values: for each KV head, every
// row's group of query heads is scored against a key row loaded once, as if the group were
// `rows` times as wide. HD is the head size when known at compile time (0: runtime
// `head_dim`), so the per-row loops unroll. T is the query's and output's type, C the
// cache's (T, or narrower: see `paged_attention`).
template <typename T, typename C, int HD>
void attend_rows(const T* query, int64_t query_stride, T* out, int64_t out_stride, int64_t rows,
                 const C* key_cache, const C* value_cache, const int32_t* block_table, int64_t context,
                 int64_t block_size, int64_t kv_heads, int64_t group, int64_t head_dim, float scale,
                 PackedKeys packed_keys, std::vector<float>& scratch) {
  const int64_t hd = HD > 0 ? HD : head_dim;
  const int64_t width = rows * group;  // query vectors per KV head: [row][head of the group]
  const int64_t vectors = kv_heads * width;
  const int64_t slot_stride = kv_heads * hd;
  const int64_t block_bytes = block_size * slot_stride * static_cast<int64_t>(sizeof(C));
  constexpr bool dot = kBf16Dot<T, C, HD>;
  // scratch: the queries (scaled, float; with `dot`, bfloat16 as they came) as [kv head][row]
  // [head of the group], their accumulators alike, each query vector's scores over the whole
  // context, and with `dot` its weights in bfloat16, two or three spare (zero) past the
  // context (an even count, so the bfloat16 rows fill whole floats), and their sums' inverses.
  const int64_t weight_stride = (context + 3) / 2 * 2;
  scratch.resize(vectors * hd * 2 + vectors * context + (dot ? vectors * weight_stride / 2 + vectors : 0));
  float* q = scratch.data();
  float* acc = q + vectors * hd;
  float* scores = acc + vectors * hd;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t i = 0; i < group * hd; ++i) {
        const T x = query[r * query_stride + h * group * hd + i];
        const int64_t at = (h * rows + r) * group * hd + i;
        if constexpr (dot)
          reinterpret_cast<T*>(q)[at] = x;
        else
          q[at] = static_cast<float>(x) * scale;
      }
  std::fill(acc, acc + vectors * hd, 0.0f);
  const int64_t num_blocks = (context + block_size - 1) / block_size;
  auto block_start = [&](const C* cache, int64_t b) {
    return cache + static_cast<int64_t>(block_table[b]) * block_size * slot_stride;
  };

#if ITERSERVE_VECTOR_BITS > 0
  if constexpr (kPacks<C, HD>) {
    if (packed_keys.words != nullptr) {
      // The queries as the Lanes' words: with `dot` bfloat16 pairs as they came, else scaled floats.
      using Lanes = PackedLanes<T, C, HD>;
      const auto* queries = reinterpret_cast<const typename Lanes::Word*>(q);
      const auto* words = static_cast<const typename Lanes::Word*>(packed_keys.words);
      for (int64_t h = 0; h < kv_heads; ++h)
        score_packed<Lanes, HD>(queries + h * width * hd / Lanes::kDims, width, words + h * packed_keys.head_words,
                                context, dot ? scale : 1.0f, scores + h * width * context, context);
    }
  }
#endif
  for (int64_t b = 0; packed_keys.words == nullptr && b < num_blocks; ++b) {
    if (b + 1 < num_blocks) prefetch(block_start(key_cache, b + 1), block_bytes);
    const int64_t t0 = b * block_size, n = std::min(block_size, context - t0);
    const C* keys = block_start(key_cache, b);
#if defined(__AVX512BF16__)
    if constexpr (dot) {
      for (int64_t i = 0; i < n; i += Vec::kWidth)
        for (int64_t h = 0; h < kv_heads; ++h)
          score_keys_bf16<HD>(reinterpret_cast<const T*>(q) + h * width * hd, keys + i * slot_stride + h * hd,
                              slot_stride, std::min<int64_t>(Vec::kWidth, n - i), width, scale,
                              scores + h * width * context + t0 + i, context);
      continue;
    }
#endif
#if ITERSERVE_VECTOR_BITS > 0
    if constexpr (kVectorRows<C, HD>) {
      for (int64_t i = 0; i < n; i += Vec::kWidth)
        for (int64_t h = 0; h < kv_heads; ++h)
          score_keys<C, HD>(q + h * width * hd, keys + i * slot_stride + h * hd, slot_stride,
                            std::min<int64_t>(Vec::kWidth, n - i), width, scores + h * width * context + t0 + i,
                            context);
      continue;
    }
#endif
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < kv_heads; ++h)
        score_row<C>(q + h * width * hd, keys + i * slot_stride + h * hd, width, hd,
                     scores + h * width * context + t0 + i, context);
  }

  // Row r sees the first `seen` keys; the weights of the rest (the later rows' own keys,
  // scored above with the rest of the block) are zero. Built with -ffast-math (vector
  // reductions and exp), so no infinities: the maximum starts from the first score.
  auto visible = [&](int64_t v) { return context - (rows - 1 - v / group % rows); };
  auto maximum = [&](const float* s, int64_t seen) {
    float m = s[0];
    for (int64_t t = 1; t < seen; ++t) m = std::max(m, s[t]);
    return m;
  };
#if defined(__AVX512BF16__)
  // With `dot`, one pass turns the scores into bfloat16 weights e^(s - m), as GPU flash
  // attention rounds them, unnormalised: the output is divided by their sum instead.
  c10::BFloat16* weights = reinterpret_cast<c10::BFloat16*>(scores + vectors * context);
  float* inverse_sums = reinterpret_cast<float*>(weights + vectors * weight_stride);
  if constexpr (dot) {
    for (int64_t v = 0; v < vectors; ++v) {
      const int64_t seen = visible(v);
      const float* s = scores + v * context;
      c10::BFloat16* w = weights + v * weight_stride;
      const __m512 m = _mm512_set1_ps(maximum(s, seen));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t t = 0; t < seen; t += 16) {
        const __mmask16 mask = seen - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (seen - t)) - 1);
        const __m512 e = _mm512_maskz_mov_ps(mask, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + t), m)));
        sum = _mm512_add_ps(sum, e);
        _mm256_mask_storeu_epi16(w + t, mask, (__m256i)_mm512_cvtneps_pbh(e));
      }
      std::fill(w + seen, w + weight_stride, c10::BFloat16(0.0f));
      inverse_sums[v] = 1.0f / _mm512_reduce_add_ps(sum);
    }
  }
#endif
  for (int64_t v = 0; !dot && v < vectors; ++v) {
    const int64_t seen = visible(v);
    float* s = scores + v * context;
    const float m = maximum(s, seen);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < seen; ++t) {
      s[t] = std::exp(s[t] - m);
      sum += s[t];
    }
    const float inverse = 1.0f / sum;
#pragma omp simd
    for (int64_t t = 0; t < seen; ++t) s[t] *= inverse;
    std::fill(s + seen, s + context, 0.0f);
  }

  for (int64_t b = 0; b < num_blocks; ++b) {
    if (b + 1 < num_blocks) prefetch(block_start(value_cache, b + 1), block_bytes);
    const int64_t t0 = b * block_size, n = std::min(block_size, context - t0);
    const C* values = block_start(value_cache, b);
#if defined(__AVX512BF16__)
    if constexpr (dot) {
      for (int64_t h = 0; h < kv_heads; ++h)
        accumulate_rows_bf16<HD>(acc + h * width * hd, values + h * hd, slot_stride, n,
                                 weights + h * width * weight_stride + t0, weight_stride, width);
      continue;
    }
#endif
#if ITERSERVE_VECTOR_BITS > 0
    if constexpr (kVectorRows<C, HD>) {
      for (int64_t h = 0; h < kv_heads; ++h)
        accumulate_rows<C, HD>(acc + h * width * hd, values + h * hd, slot_stride, n,
                               scores + h * width * context + t0, context, width);
      continue;
    }
#endif
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < kv_heads; ++h)
        accumulate_row<C>(acc + h * width * hd, values + i * slot_stride + h * hd,
                          scores + h * width * context + t0 + i, context, width, hd);
  }

  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t i = 0; i < group * hd; ++i) {
        const float* a = acc + (h * rows + r) * group * hd + i / hd * hd;
#if defined(__AVX512BF16__)
        if constexpr (dot) {
          const float inverse_sum = inverse_sums[(h * rows + r) * group + i / hd];
          out[r * out_stride + h * group * hd + i] = static_cast<T>(a[pair_order(i % hd)] * inverse_sum);
          continue;
        }
#endif
        out[r * out_stride + h * group * hd + i] = static_cast<T>(a[i % hd]);
      }
}

// Query rows of one sequence attended together, at most: enough that a key row loaded once
// serves a few passes of query heads, few enough that the rows' scores stay in L2.
constexpr int64_t kMaxRowsPerItem = 8;
constexpr int64_t kScoreBytesPerItem = 512 * 1024;

struct WorkItem {
  int64_t seq, first_row, rows, context;  // context: the keys the item's last row sees
};

// The keys of each sequence of at least kPackedRows query rows, packed into `storage` for
// score_packed (in parallel, a KV head of a sequence a job); the other sequences get none,
// and so does every sequence where attend_rows scores no packed keys (the portable build,
// head sizes other than 64 and 128).
template <typename T, typename C, int HD>
std::vector<PackedKeys> pack_chunks(const C* key_cache, const int32_t* tables, int64_t table_stride,
                                    const int32_t* loc, const int32_t* lens, int64_t num_seqs, int64_t block_size,
                                    int64_t kv_heads, std::vector<uint32_t>& storage) {
  std::vector<PackedKeys> packed(num_seqs);
#if ITERSERVE_VECTOR_BITS > 0
  if constexpr (kPacks<C, HD>) {
    using Lanes = PackedLanes<T, C, HD>;
    using Word = typename Lanes::Word;
    static_assert(sizeof(Word) == sizeof(uint32_t));
    std::vector<int64_t> at(num_seqs, -1), jobs;
    int64_t words = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
      if (loc[s + 1] - loc[s] < kPackedRows) continue;
      at[s] = words;
      words += kv_heads * packed_head_words<Lanes, HD>(lens[s]);
      for (int64_t h = 0; h < kv_heads; ++h) jobs.push_back(s * kv_heads + h);
    }
    if (jobs.empty()) return packed;
    storage.resize(words);
    Word* base = reinterpret_cast<Word*>(storage.data());
    at::parallel_for(0, static_cast<int64_t>(jobs.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t s = jobs[j] / kv_heads, h = jobs[j] % kv_heads;
        pack_keys<Lanes, C, HD>(key_cache, tables + s * table_stride, lens[s], block_size, kv_heads, h, base + at[s]);
      }
    });
    for (int64_t s = 0; s < num_seqs; ++s)
      if (at[s] >= 0) packed[s] = {base + at[s], packed_head_words<Lanes, HD>(lens[s])};
  }
#endif
  return packed;
}

template <typename T, typename C>
void attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
               const at::Tensor& block_tables, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
               int64_t block_size, double scale, at::Tensor& out) {
  const int64_t heads = query.size(1), head_dim = query.size(2);
  const int64_t kv_heads = key_cache.size(1);
  const int64_t group = heads / kv_heads;
  const int32_t* loc = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  std::vector<WorkItem> items;
  for (int64_t s = 0; s < seq_lens.size(0); ++s) {
    const int64_t start = loc[s], end = loc[s + 1], context = lens[s];
    TORCH_CHECK(0 <= start && start <= end && end <= query.size(0) && end - start <= context,
                "sequence ", s, " has query rows [", start, ", ", end, ") and ", context, " tokens of context");
    const int64_t budget = kScoreBytesPerItem / static_cast<int64_t>(heads * context * sizeof(float));
    const int64_t tile = std::clamp<int64_t>(budget, 1, kMaxRowsPerItem);
    for (int64_t r = start; r < end; r += tile) {
      const int64_t rows = std::min(tile, end - r);
      items.push_back({s, r, rows, context - (end - r - rows)});
    }
  }
  const T* q = query.data_ptr<T>();
  const C* k = key_cache.data_ptr<C>();
  const C* v = value_cache.data_ptr<C>();
  T* o = out.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const auto attend = head_dim == 64    ? attend_rows<T, C, 64>
                      : head_dim == 128 ? attend_rows<T, C, 128>
                                        : attend_rows<T, C, 0>;
  // Reused across calls by the thread that calls (the engine's): a chunk's keys, as many bytes
  // again (twice as many where a bfloat16 cache's keys are widened to float).
  static thread_local std::vector<uint32_t> packed_storage;
  const auto pack = head_dim == 64    ? pack_chunks<T, C, 64>
                    : head_dim == 128 ? pack_chunks<T, C, 128>
                                      : pack_chunks<T, C, 0>;
  const std::vector<PackedKeys> packed =
      pack(k, tables, block_tables.stride(0), loc, lens, seq_lens.size(0), block_size, kv_heads, packed_storage);
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items));
  // Items are taken one at a time from a shared counter, the last first: decodes arrive
  // sorted by context and a prompt's rows see more keys the later they come, so the longest
  // go first and the short ones even the threads out at the end.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> scratch;
    for (int64_t i; (i = next.fetch_add(1)) < num_items;) {
      const WorkItem& item = items[num_items - 1 - i];
      attend(q + item.first_row * query.stride(0), query.stride(0), o + item.first_row * out.stride(0),
             out.stride(0), item.rows, k, v, tables + item.seq * block_tables.stride(0), item.context, block_size,
             kv_heads, group, head_dim, static_cast<float>(scale), packed[item.seq], scratch);
    }
  });
}

}  // namespace

// Attention over the paged cache for a flat batch of sequences, decodes and prompt chunks
// alike: sequence s owns query rows [query_start_loc[s], query_start_loc[s + 1]), the last
// positions of its seq_lens[s] tokens of context, whose keys and values (these rows' own
// included) are in the cache already. query [rows, heads, head_dim]; caches [slots, kv_heads,
// head_dim] (slot = block * block_size + offset); block_tables int32 [seqs, max_blocks];
// query_start_loc int32 [seqs + 1]; seq_lens int32 [seqs]. The caches hold the query's dtype,
// or a narrower one (--kv-cache-dtype): bfloat16 or float16 under a float32 query, float8 e5m2
// under any. Widening to float is exact, so only the bytes read change.
at::Tensor paged_attention(at::Tensor query, at::Tensor key_cache, at::Tensor value_cache, at::Tensor block_tables,
                           at::Tensor query_start_loc, at::Tensor seq_lens, int64_t block_size, double scale) {
  TORCH_CHECK(query.device().is_cpu(), "paged_attention runs on the CPU");
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 3 && value_cache.dim() == 3, "expected 3-d query and caches");
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2), "query rows must be contiguous");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  const auto cache_type = key_cache.scalar_type();
  TORCH_CHECK(value_cache.scalar_type() == cache_type, "key and value caches must share a dtype");
  TORCH_CHECK(cache_type == query.scalar_type() || cache_type == at::kFloat8_e5m2 ||
                  (query.scalar_type() == at::kFloat && (cache_type == at::kBFloat16 || cache_type == at::kHalf)),
              "the caches must hold the query's dtype, float8_e5m2, or bfloat16 or float16 for a float32 query");
  TORCH_CHECK(query.size(1) % key_cache.size(1) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && query_start_loc.scalar_type() == at::kInt &&
                  seq_lens.scalar_type() == at::kInt,
              "block tables, query start locations and sequence lengths must be int32");
  TORCH_CHECK(block_tables.stride(1) == 1 && query_start_loc.is_contiguous() && seq_lens.is_contiguous(),
              "block tables must be row-contiguous");
  TORCH_CHECK(query_start_loc.size(0) == seq_lens.size(0) + 1 && block_tables.size(0) >= seq_lens.size(0),
              "expected one block table and one sequence length per sequence, one more start location");
  auto out = at::empty_like(query, at::MemoryFormat::Contiguous);
  if (cache_type == at::kFloat8_e5m2) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_attention", [&] {
      attention<scalar_t, c10::Float8_e5m2>(query, key_cache, value_cache, block_tables, query_start_loc, seq_lens,
                                            block_size, scale, out);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cache_type, "paged_attention", [&] {
    if (query.scalar_type() == cache_type)
      attention<scalar_t, scalar_t>(query, key_cache, value_cache, block_tables, query_start_loc, seq_lens,
                                    block_size, scale, out);
    else
      attention<float, scalar_t>(query, key_cache, value_cache, block_tables, query_start_loc, seq_lens,
                                 block_size, scale, out);
  });
  return out;
}

// Which build this is: "avx512bf16", "avx512", "avx2" or "portable".
std::string isa() { return ITERSERVE_ISA; }

// One level of indirection, so that ITERSERVE_OPS is expanded before TORCH_LIBRARY pastes it.
#define ITERSERVE_REGISTER(ns, m) TORCH_LIBRARY(ns, m)
ITERSERVE_REGISTER(ITERSERVE_OPS, m) {
  m.def("paged_attention", &paged_attention);
  m.def("isa", &isa);
}
