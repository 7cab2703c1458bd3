// Decode attention read straight out of the paged KV cache, for the CPU.
//
// One query token per request, one request per work item: its query heads are scored
// against every key of the context as the block table finds them, then the values are
// summed with the softmax weights. Keys and values are read once, in place;
// the pure-torch path gathers them into a padded copy first and reads that again.
//
// The same source builds three ways (engine/cpu_kernels.py picks the best the CPU runs):
// with -mavx512f/bw/vl/dq the inner loops use 16-float vectors, with -mavx2 -mfma -mf16c
// 8-float ones, and with no ISA flags plain loops that the compiler vectorises as it can
// (the build for CPUs without AVX2, and for Arm). Each build registers its operator under
// its own namespace, ITERSERVE_OPS, so several can live in one process (the tests load
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
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define ITERSERVE_VECTOR_BITS 512
#define ITERSERVE_ISA "avx512"
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
    for (int64_t g = 0; g < heads; ++g) {
      for (int64_t i = n; i < Vec::kWidth; ++i) partial[g][i] = Vec::splat(0.0f);
      const Vec sums = Vec::sums(partial[g]);
      if (n == Vec::kWidth)
        sums.store(scores + (g0 + g) * stride);
      else
        sums.store(scores + (g0 + g) * stride, static_cast<int>(n));
    }
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

// Asks for a block's cache lines while the block before it is being read: a request's
// blocks are scattered over the pool, so the hardware prefetcher cannot guess the next.
// Into L2 (the T1 hint), not L1: a block is ~100 lines, and asking L1 for them all stalls
// on its few miss buffers (on a 2-core EPYC the kernel alone ran 1.3-1.6x slower so).
inline void prefetch(const void* start, int64_t bytes) {
  const char* p = static_cast<const char*>(start);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset, 0, 2);
}

// Attention of one request's query token (all heads) over its context. HD is the head
// size when known at compile time (0: runtime `head_dim`), so the per-row loops unroll.
// T is the query's and output's type, C the cache's (T, or narrower: see `paged_decode_attention`).
template <typename T, typename C, int HD>
void decode_request(const T* query, const C* key_cache, const C* value_cache, T* out,
                    const int32_t* block_table, int64_t context, int64_t block_size,
                    int64_t kv_heads, int64_t group, int64_t head_dim, float scale, std::vector<float>& scratch) {
  const int64_t hd = HD > 0 ? HD : head_dim;
  const int64_t heads = kv_heads * group;
  const int64_t slot_stride = kv_heads * hd;
  const int64_t block_bytes = block_size * slot_stride * static_cast<int64_t>(sizeof(C));
  // scratch: the queries (scaled, float), their accumulators, heads x context scores.
  scratch.resize(heads * hd * 2 + heads * context);
  float* q = scratch.data();
  float* acc = q + heads * hd;
  float* scores = acc + heads * hd;
  for (int64_t i = 0; i < heads * hd; ++i) q[i] = static_cast<float>(query[i]) * scale;
  std::fill(acc, acc + heads * hd, 0.0f);
  const int64_t num_blocks = (context + block_size - 1) / block_size;
  auto block_start = [&](const C* cache, int64_t b) {
    return cache + static_cast<int64_t>(block_table[b]) * block_size * slot_stride;
  };

  for (int64_t b = 0; b < num_blocks; ++b) {
    if (b + 1 < num_blocks) prefetch(block_start(key_cache, b + 1), block_bytes);
    const int64_t t0 = b * block_size, n = std::min(block_size, context - t0);
    const C* keys = block_start(key_cache, b);
#if ITERSERVE_VECTOR_BITS > 0
    if constexpr (kVectorRows<C, HD>) {
      for (int64_t i = 0; i < n; i += Vec::kWidth)
        for (int64_t h = 0; h < kv_heads; ++h)
          score_keys<C, HD>(q + h * group * hd, keys + i * slot_stride + h * hd, slot_stride,
                            std::min<int64_t>(Vec::kWidth, n - i), group, scores + h * group * context + t0 + i,
                            context);
      continue;
    }
#endif
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < kv_heads; ++h)
        score_row<C>(q + h * group * hd, keys + i * slot_stride + h * hd, group, hd,
                     scores + h * group * context + t0 + i, context);
  }

  // Built with -ffast-math (vector reductions and exp), so no infinities: the maximum
  // starts from the first score.
  for (int64_t g = 0; g < heads; ++g) {
    float* s = scores + g * context;
    float m = s[0];
    for (int64_t t = 1; t < context; ++t) m = std::max(m, s[t]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < context; ++t) {
      s[t] = std::exp(s[t] - m);
      sum += s[t];
    }
    const float inverse = 1.0f / sum;
#pragma omp simd
    for (int64_t t = 0; t < context; ++t) s[t] *= inverse;
  }

  for (int64_t b = 0; b < num_blocks; ++b) {
    if (b + 1 < num_blocks) prefetch(block_start(value_cache, b + 1), block_bytes);
    const int64_t t0 = b * block_size, n = std::min(block_size, context - t0);
    const C* values = block_start(value_cache, b);
#if ITERSERVE_VECTOR_BITS > 0
    if constexpr (kVectorRows<C, HD>) {
      for (int64_t h = 0; h < kv_heads; ++h)
        accumulate_rows<C, HD>(acc + h * group * hd, values + h * hd, slot_stride, n,
                               scores + h * group * context + t0, context, group);
      continue;
    }
#endif
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < kv_heads; ++h)
        accumulate_row<C>(acc + h * group * hd, values + i * slot_stride + h * hd,
                          scores + h * group * context + t0 + i, context, group, hd);
  }

  for (int64_t i = 0; i < heads * hd; ++i) out[i] = static_cast<T>(acc[i]);
}

template <typename T, typename C>
void decode_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                      const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                      double scale, at::Tensor& out) {
  const int64_t rows = query.size(0), heads = query.size(1), head_dim = query.size(2);
  const int64_t kv_heads = key_cache.size(1);
  const int64_t group = heads / kv_heads;
  const int64_t table_stride = block_tables.stride(0);
  const T* q = query.data_ptr<T>();
  const C* k = key_cache.data_ptr<C>();
  const C* v = value_cache.data_ptr<C>();
  T* o = out.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const auto attend = head_dim == 64    ? decode_request<T, C, 64>
                      : head_dim == 128 ? decode_request<T, C, 128>
                                        : decode_request<T, C, 0>;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  // Rows arrive sorted by context length, so contiguous ranges would give one thread all
  // the long contexts: each thread takes every `threads`-th row instead.
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t r = t; r < rows; r += threads) {
        attend(q + r * query.stride(0), k, v, o + r * out.stride(0), tables + r * table_stride, lens[r], block_size,
               kv_heads, group, head_dim, static_cast<float>(scale), scratch);
      }
    }
  });
}

}  // namespace

// query [rows, heads, head_dim]; caches [slots, kv_heads, head_dim] (slot = block * block_size + offset);
// block_tables int32 [rows, max_blocks]; context_lens int32 [rows], each at least 1. The caches
// hold the query's dtype, or a narrower one (--kv-cache-dtype): bfloat16 or float16 under a
// float32 query, float8 e5m2 under any. Widening to float is exact, so only the bytes read change.
at::Tensor paged_decode_attention(at::Tensor query, at::Tensor key_cache, at::Tensor value_cache,
                                  at::Tensor block_tables, at::Tensor context_lens, int64_t block_size, double scale) {
  TORCH_CHECK(query.device().is_cpu(), "paged_decode_attention runs on the CPU");
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 3 && value_cache.dim() == 3, "expected 3-d query and caches");
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2), "query rows must be contiguous");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  const auto cache_type = key_cache.scalar_type();
  TORCH_CHECK(value_cache.scalar_type() == cache_type, "key and value caches must share a dtype");
  TORCH_CHECK(cache_type == query.scalar_type() || cache_type == at::kFloat8_e5m2 ||
                  (query.scalar_type() == at::kFloat && (cache_type == at::kBFloat16 || cache_type == at::kHalf)),
              "the caches must hold the query's dtype, float8_e5m2, or bfloat16 or float16 for a float32 query");
  TORCH_CHECK(query.size(1) % key_cache.size(1) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block tables and context lengths must be int32");
  TORCH_CHECK(block_tables.stride(1) == 1 && context_lens.is_contiguous(), "block tables must be row-contiguous");
  auto out = at::empty_like(query, at::MemoryFormat::Contiguous);
  if (cache_type == at::kFloat8_e5m2) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode_attention", [&] {
      decode_attention<scalar_t, c10::Float8_e5m2>(query, key_cache, value_cache, block_tables, context_lens,
                                                   block_size, scale, out);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cache_type, "paged_decode_attention", [&] {
    if (query.scalar_type() == cache_type)
      decode_attention<scalar_t, scalar_t>(query, key_cache, value_cache, block_tables, context_lens, block_size,
                                           scale, out);
    else
      decode_attention<float, scalar_t>(query, key_cache, value_cache, block_tables, context_lens, block_size,
                                        scale, out);
  });
  return out;
}

// Which build this is: "avx512", "avx2" or "portable".
std::string isa() { return ITERSERVE_ISA; }

// One level of indirection, so that ITERSERVE_OPS is expanded before TORCH_LIBRARY pastes it.
#define ITERSERVE_REGISTER(ns, m) TORCH_LIBRARY(ns, m)
ITERSERVE_REGISTER(ITERSERVE_OPS, m) {
  m.def("paged_decode_attention", &paged_decode_attention);
  m.def("isa", &isa);
}
