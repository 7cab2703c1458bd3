// Decode attention read straight out of the paged KV cache, for the CPU.
//
// One query token per request. Each (request, KV head) is one work item: its query heads
// are scored against every key of the context as the block table finds them, then the
// values are summed with the softmax weights. Keys and values are read once, in place;
// the pure-torch path gathers them into a padded copy first and reads that again.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// HD is the head size when known at compile time (0: runtime `head_dim`), so that the
// per-token dot products unroll into a few vector FMAs.
template <typename T, int HD>
void decode_item(const T* query, const T* key_cache, const T* value_cache, T* out,
                 const int32_t* block_table, int64_t context, int64_t block_size,
                 int64_t kv_head, int64_t group, int64_t head_dim, int64_t slot_stride,
                 float scale, std::vector<float>& scratch) {
  const int64_t hd = HD > 0 ? HD : head_dim;
  // scratch: the group's queries (scaled, float), its accumulators, group x context scores.
  scratch.resize(group * hd * 2 + group * context);
  float* q = scratch.data();
  float* acc = q + group * hd;
  float* scores = acc + group * hd;
  const T* query_heads = query + kv_head * group * hd;
  for (int64_t i = 0; i < group * hd; ++i) q[i] = static_cast<float>(query_heads[i]) * scale;
  std::fill(acc, acc + group * hd, 0.0f);
  const int64_t head_offset = kv_head * hd;

  for (int64_t b = 0, t0 = 0; t0 < context; ++b, t0 += block_size) {
    const int64_t n = std::min(block_size, context - t0);
    const T* keys = key_cache + static_cast<int64_t>(block_table[b]) * block_size * slot_stride + head_offset;
    for (int64_t i = 0; i < n; ++i) {
      const T* k = keys + i * slot_stride;
      for (int64_t g = 0; g < group; ++g) {
        const float* qg = q + g * hd;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < hd; ++d) dot += qg[d] * static_cast<float>(k[d]);
        scores[g * context + t0 + i] = dot;
      }
    }
  }

  // Built with -ffast-math (vector reductions and exp), so no infinities: the maximum
  // starts from the first score.
  std::vector<float> total(group);
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * context;
    float m = s[0];
    for (int64_t t = 1; t < context; ++t) m = std::max(m, s[t]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < context; ++t) {
      s[t] = std::exp(s[t] - m);
      sum += s[t];
    }
    total[g] = sum;
  }

  for (int64_t b = 0, t0 = 0; t0 < context; ++b, t0 += block_size) {
    const int64_t n = std::min(block_size, context - t0);
    const T* values = value_cache + static_cast<int64_t>(block_table[b]) * block_size * slot_stride + head_offset;
    for (int64_t i = 0; i < n; ++i) {
      const T* v = values + i * slot_stride;
      for (int64_t g = 0; g < group; ++g) {
        const float p = scores[g * context + t0 + i];
        float* a = acc + g * hd;
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) a[d] += p * static_cast<float>(v[d]);
      }
    }
  }

  T* o = out + kv_head * group * hd;
  for (int64_t g = 0; g < group; ++g) {
    const float inverse = 1.0f / total[g];
    for (int64_t d = 0; d < hd; ++d) o[g * hd + d] = static_cast<T>(acc[g * hd + d] * inverse);
  }
}

template <typename T>
void decode_attention(const torch::Tensor& query, const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                      const torch::Tensor& block_tables, const torch::Tensor& context_lens, int64_t block_size,
                      double scale, torch::Tensor& out) {
  const int64_t rows = query.size(0), heads = query.size(1), head_dim = query.size(2);
  const int64_t kv_heads = key_cache.size(1);
  const int64_t group = heads / kv_heads;
  const int64_t slot_stride = key_cache.stride(0);
  const int64_t table_stride = block_tables.stride(0);
  const T* q = query.data_ptr<T>();
  const T* k = key_cache.data_ptr<T>();
  const T* v = value_cache.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const auto attend = head_dim == 64 ? decode_item<T, 64> : head_dim == 128 ? decode_item<T, 128> : decode_item<T, 0>;
  const int64_t items = rows * kv_heads;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  // Rows arrive sorted by context length, so contiguous ranges would give one thread all
  // the long contexts: each thread takes every `threads`-th item instead.
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t item = t; item < items; item += threads) {
        const int64_t r = item / kv_heads, h = item % kv_heads;
        attend(q + r * query.stride(0), k, v, o + r * out.stride(0), tables + r * table_stride, lens[r], block_size,
             h, group, head_dim, slot_stride, static_cast<float>(scale), scratch);
      }
    }
  });
}

}  // namespace

// query [rows, heads, head_dim]; caches [slots, kv_heads, head_dim] (slot = block * block_size + offset);
// block_tables int32 [rows, max_blocks]; context_lens int32 [rows], each at least 1.
torch::Tensor paged_decode_attention(torch::Tensor query, torch::Tensor key_cache, torch::Tensor value_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, int64_t block_size,
                                     double scale) {
  TORCH_CHECK(query.device().is_cpu(), "paged_decode_attention runs on the CPU");
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 3 && value_cache.dim() == 3, "expected 3-d query and caches");
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2), "query rows must be contiguous");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type() && value_cache.scalar_type() == query.scalar_type(),
              "query and caches must share a dtype");
  TORCH_CHECK(query.size(1) % key_cache.size(1) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && context_lens.scalar_type() == torch::kInt32,
              "block tables and context lengths must be int32");
  TORCH_CHECK(block_tables.stride(1) == 1 && context_lens.is_contiguous(), "block tables must be row-contiguous");
  auto out = torch::empty_like(query, torch::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode_attention", [&] {
    decode_attention<scalar_t>(query, key_cache, value_cache, block_tables, context_lens, block_size, scale, out);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "Decode attention over the paged KV cache (CPU)");
}
