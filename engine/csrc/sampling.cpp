// One token per row of a step's logits, for the CPU: greedy rows by argmax, the others drawn
// by inverse CDF from the weights exp((logit - max) / temperature), with top-k as a floor on
// the logits (ties with the k-th best kept), min-p on the weights and top-p by rejection.
//
// torch's way (engine/sampler.py, draw_by_inverse_cdf) widens the rows into fresh float32
// and float64 tensors, divides, exponentiates and sums them whole: on 64 rows of a 49k
// vocabulary a fifth of a decode step, mostly memory traffic and first-touch page faults.
// Here a row stays in its own dtype: one pass finds its max, one writes its weights into a
// thread's scratch row, one sums them kBlock at a time, all but the first from L2; the draw
// then finds its block by those partial sums and reads a block or two.
//
// Built with paged_attention.cpp into one extension, under the same ITERSERVE_OPS namespace,
// and, like it, under -ffast-math, which lets the compiler assume no infinity or NaN: none is
// relied on. A row whose best logit is not finite is answered before any weight (is_special
// reads the bits); a masked token gets weight 0 by a comparison against finite bounds, never
// through exp(-inf); whatever the row, the token is an id of the vocabulary.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

#ifndef ITERSERVE_OPS
#define ITERSERVE_OPS iterserve_cpu
#endif

namespace {

constexpr int64_t kBlock = 256;  // weights per partial sum
constexpr int64_t kStretch = 64;  // logits per maximum taken in gather_best
// Weights under exp(-88) of the best token's are 0: exp would leave float's normal range
// there, and such a token is beyond what a float64 uniform draw can land on anyway.
constexpr float kMinExponent = -88.0f;

// The row's redraws (top-p) take further uniforms from its first, by splitmix64 over its
// bits: a seeded row's draws stay a function of its generator alone.
double next_uniform(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

template <typename T>
float row_max(const T* x, int64_t n) {
  float best = std::numeric_limits<float>::lowest();
#pragma omp simd reduction(max : best)
  for (int64_t j = 0; j < n; ++j) best = std::max(best, static_cast<float>(x[j]));
  return best;
}

// The first token whose logit is `best`, as torch's argmax picks it; 0 where none is (NaN).
template <typename T>
int64_t first_of(const T* x, int64_t n, float best) {
  for (int64_t j = 0; j < n; ++j)
    if (static_cast<float>(x[j]) == best) return j;
  return 0;
}

// A candidate for a row's best tokens: likelier first, the lower id first among equals.
struct Scored {
  float value;
  int64_t id;
};

inline bool better(const Scored& a, const Scored& b) {
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

// The row's `most` best tokens (most >= 1) as a heap whose front is the worst of them. Most
// stretches of kStretch logits have nothing above that front once the heap has filled, which
// their maximum tells; only the others are looked at one by one. Tokens come in id order, so
// one equal to the front is never better.
template <typename T>
void gather_best(const T* x, int64_t n, int64_t most, std::vector<Scored>& heap) {
  heap.clear();
  for (int64_t j = 0; j < most; ++j) heap.push_back({static_cast<float>(x[j]), j});
  std::make_heap(heap.begin(), heap.end(), better);
  for (int64_t start = most; start < n; start += kStretch) {
    const int64_t end = std::min(n, start + kStretch);
    if (!(row_max(x + start, end - start) > heap.front().value)) continue;
    for (int64_t j = start; j < end; ++j) {
      const float v = static_cast<float>(x[j]);
      if (v > heap.front().value) {
        std::pop_heap(heap.begin(), heap.end(), better);
        heap.back() = {v, j};
        std::push_heap(heap.begin(), heap.end(), better);
      }
    }
  }
}

// The sum of term(j) over [0, n), in float kBlock terms at a time (vectorised) and in double
// across blocks; with `sums`, each block's sum is kept there.
template <typename Term>
double sum_blocks(int64_t n, Term term, double* sums = nullptr) {
  double total = 0.0;
  for (int64_t start = 0, b = 0; start < n; start += kBlock, ++b) {
    const int64_t end = std::min(n, start + kBlock);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = start; j < end; ++j) sum += term(j);
    if (sums != nullptr) sums[b] = sum;
    total += sum;
  }
  return total;
}

// w[j] = exp((x[j] - best) * inverse_t) for the tokens at or above `floor`, 0 for the rest.
// Returns their sum, the mass top-p's share is taken of.
template <typename T>
double weigh(const T* x, int64_t n, float best, float inverse_t, float floor, float* w) {
  return sum_blocks(n, [&](int64_t j) {
    const float x_j = static_cast<float>(x[j]);
    const float exponent = (x_j - best) * inverse_t;
    const float weight = std::exp(std::max(exponent, kMinExponent));
    w[j] = x_j >= floor && exponent > kMinExponent ? weight : 0.0f;
    return w[j];
  });
}

// Token j's weight where a draw may take it, at or above `floor` and at least `min_p` (the
// best token's weight is 1); 0 elsewhere.
template <typename T>
inline float drawable(const T* x, const float* w, int64_t j, float floor, float min_p) {
  return static_cast<float>(x[j]) >= floor && w[j] >= min_p ? w[j] : 0.0f;
}

// Each block's sum of the drawable weights. Returns the blocks' total.
template <typename T>
double block_sums(const T* x, const float* w, int64_t n, float floor, float min_p, double* sums) {
  return sum_blocks(n, [&](int64_t j) { return drawable(x, w, j, floor, min_p); }, sums);
}

// The first token whose running sum of drawable weights passes `target` (< the total); -1
// where rounding or NaN leaves none. The block is found by its partial sums, then its tokens
// are summed one by one, on past its end if the float block sum was rounded up.
template <typename T>
int64_t find_token(const T* x, const float* w, const double* sums, int64_t n, float floor, float min_p,
                   double target) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  double before = 0.0;
  int64_t b = 0;
  while (b < blocks && !(before + sums[b] > target)) before += sums[b++];
  int64_t last = -1;
  for (int64_t j = b * kBlock; j < n; ++j) {
    const float weight = drawable(x, w, j, floor, min_p);
    if (weight > 0.0f) {
      last = j;
      before += weight;
      if (before > target) return j;
    }
  }
  return last;
}

// The mass of the tokens likelier than `token`, by their weights before min-p.
template <typename T>
double likelier_mass(const T* x, const float* w, int64_t n, int64_t token) {
  const float drawn = static_cast<float>(x[token]);
  return sum_blocks(n, [&](int64_t j) { return static_cast<float>(x[j]) > drawn ? w[j] : 0.0f; });
}

struct RowParams {
  float temperature;  // 0: greedy
  int64_t top_k;      // 0: every token
  float min_p;
  float top_p;
  double uniform;  // in [0, 1)
};

// A thread's working rows, reused for each row it samples.
struct Scratch {
  std::vector<float> weights;  // [vocab]
  std::vector<double> sums;    // [vocab / kBlock], rounded up
  std::vector<Scored> best;    // [top_k]
};

// One row's token. Top-p by rejection: a drawn token stands if the tokens likelier than it
// weigh at most top_p of the row; otherwise every token no likelier than it is dropped and
// the row draws again. What stands is distributed as top-p's renormalised distribution (the
// tokens a full sort would keep), and each draw stands with probability at least top_p.
// Top-k is a floor at the k-th best logit: tokens tied with it are kept too, as vLLM keeps
// them (a bfloat16 model's logits tie often).
// Whether v is inf or NaN, read from its bits: under -ffast-math std::isfinite may be folded
// to true.
inline bool is_special(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits & 0x7f800000u) == 0x7f800000u;
}

template <typename T>
int64_t sample_row(const T* x, int64_t n, const RowParams& p, Scratch& scratch) {
  const float best = row_max(x, n);
  // A row whose best is +inf or NaN (a broken model) has no distribution to draw from: it
  // takes its first best, as argmax would, and the weights below only ever see finite ones.
  if (p.temperature == 0.0f || is_special(best)) return first_of(x, n, best);
  float* w = scratch.weights.data();
  float floor = std::numeric_limits<float>::lowest();
  if (p.top_k > 0 && p.top_k < n) {  // the k-th best logit, counting ties
    gather_best(x, n, p.top_k, scratch.best);
    floor = scratch.best.front().value;
  }
  double* sums = scratch.sums.data();
  const double mass = weigh(x, n, best, 1.0f / p.temperature, floor, w);
  const double limit = static_cast<double>(p.top_p) * mass;
  uint64_t state;
  std::memcpy(&state, &p.uniform, sizeof(state));
  double uniform = p.uniform;
  while (true) {
    const double total = block_sums(x, w, n, floor, p.min_p, sums);
    // Kept below the total even where rounding would reach it, so the search lands on a
    // token that adds weight.
    const double target = std::min(uniform * total, std::nextafter(total, 0.0));
    const int64_t token = find_token(x, w, sums, n, floor, p.min_p, target);
    if (token < 0) return first_of(x, n, best);
    if (p.top_p >= 1.0f || likelier_mass(x, w, n, token) <= limit) return token;
    floor = std::nextafter(static_cast<float>(x[token]), std::numeric_limits<float>::max());
    uniform = next_uniform(state);
  }
}

template <typename T>
void sample_rows(const at::Tensor& logits, const RowParams* params, int64_t* tokens) {
  const int64_t rows = logits.size(0), n = logits.size(1), stride = logits.stride(0);
  const T* base = logits.data_ptr<T>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch{std::vector<float>(n), std::vector<double>((n + kBlock - 1) / kBlock), {}};
    for (int64_t r = begin; r < end; ++r) tokens[r] = sample_row(base + r * stride, n, params[r], scratch);
  });
}

template <typename V>
const V* checked_rows(const at::Tensor& t, int64_t rows, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == c10::CppTypeToScalarType<V>::value && t.dim() == 1 &&
                  t.size(0) == rows && t.is_contiguous(),
              name, " must be a contiguous ", c10::CppTypeToScalarType<V>::value,
              " CPU tensor of one value per row");
  return t.data_ptr<V>();
}

// log(sum(exp(x - best))) + best: the row's log-partition.
template <typename T>
float log_partition(const T* x, int64_t n, float best) {
  const double total =
      sum_blocks(n, [&](int64_t j) { return std::exp(std::max(static_cast<float>(x[j]) - best, kMinExponent)); });
  return best + static_cast<float>(std::log(total));
}

// The row's `most` best tokens, best first, into `out`.
template <typename T>
void best_tokens(const T* x, int64_t n, int64_t most, std::vector<Scored>& out) {
  out.clear();
  if (most == 0) return;
  gather_best(x, n, most, out);
  std::sort_heap(out.begin(), out.end(), better);
}

template <typename T>
void logprob_rows(const at::Tensor& logits, const int64_t* tokens, int64_t most, float* chosen, int64_t* ranks,
                  float* top_values, int64_t* top_ids) {
  const int64_t rows = logits.size(0), n = logits.size(1), stride = logits.stride(0);
  const T* base = logits.data_ptr<T>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<Scored> best;
    for (int64_t r = begin; r < end; ++r) {
      const T* x = base + r * stride;
      const float partition = log_partition(x, n, row_max(x, n));
      const float own = static_cast<float>(x[tokens[r]]);
      int64_t likelier = 0;
#pragma omp simd reduction(+ : likelier)
      for (int64_t j = 0; j < n; ++j) likelier += static_cast<float>(x[j]) > own;
      chosen[r] = own - partition;
      ranks[r] = likelier + 1;
      best_tokens(x, n, most, best);
      for (int64_t i = 0; i < most; ++i) {
        top_values[r * most + i] = best[i].value - partition;
        top_ids[r * most + i] = best[i].id;
      }
    }
  });
}

}  // namespace

// One token id per row of logits [rows, vocab] (float32, bfloat16 or float16, contiguous
// rows). Per row: temperature (float32, 0 for greedy), top_k (int64, 0 for none), min_p
// (float32, 0 for none), top_p (float32, 1 for none, 0 for the best token alone) and
// uniform (float64 in [0, 1), the row's draw).
at::Tensor sample_tokens(at::Tensor logits, at::Tensor temperature, at::Tensor top_k, at::Tensor min_p,
                         at::Tensor top_p, at::Tensor uniform) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.stride(1) == 1 && logits.size(1) > 0,
              "logits must be a CPU [rows, vocab] tensor with contiguous rows");
  const int64_t rows = logits.size(0);
  const float* t = checked_rows<float>(temperature, rows, "temperature");
  const int64_t* k = checked_rows<int64_t>(top_k, rows, "top_k");
  const float* m = checked_rows<float>(min_p, rows, "min_p");
  const float* p = checked_rows<float>(top_p, rows, "top_p");
  const double* u = checked_rows<double>(uniform, rows, "uniform");
  std::vector<RowParams> params(rows);
  for (int64_t r = 0; r < rows; ++r) {
    // top_p may be 0: a request's tiny top_p rounds to it in float32, and keeps the best token.
    TORCH_CHECK(t[r] >= 0.0f && k[r] >= 0 && p[r] >= 0.0f && u[r] >= 0.0 && u[r] < 1.0, "row ", r,
                ": expected temperature >= 0, top_k >= 0, top_p >= 0 and a uniform in [0, 1)");
    params[r] = {t[r], k[r], m[r], p[r], u[r]};
  }
  auto tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sample_tokens",
                                  [&] { sample_rows<scalar_t>(logits, params.data(), tokens.data_ptr<int64_t>()); });
  return tokens;
}

// For each row of logits [rows, vocab] (float32, bfloat16 or float16, contiguous rows) and
// its token (token_ids, int64 [rows]): the token's log-probability under the row's softmax,
// its rank (1 + how many tokens are likelier), and the row's `most` best log-probabilities
// and their ids, best first (the lower id first among equals). float32 log-probabilities,
// as torch's log_softmax over the widened row gives them up to the order of a sum.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_logprobs(at::Tensor logits, at::Tensor token_ids,
                                                                           int64_t most) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.stride(1) == 1 && logits.size(1) > 0,
              "logits must be a CPU [rows, vocab] tensor with contiguous rows");
  const int64_t rows = logits.size(0), n = logits.size(1);
  const int64_t* tokens = checked_rows<int64_t>(token_ids, rows, "token_ids");
  TORCH_CHECK(most >= 0 && most <= n, "most must be between 0 and the vocabulary's size, got ", most);
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(tokens[r] >= 0 && tokens[r] < n, "row ", r, ": token ", tokens[r], " is outside the vocabulary");
  auto floats = logits.options().dtype(at::kFloat);
  auto longs = logits.options().dtype(at::kLong);
  auto chosen = at::empty({rows}, floats), top_values = at::empty({rows, most}, floats);
  auto ranks = at::empty({rows}, longs), top_ids = at::empty({rows, most}, longs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs", [&] {
    logprob_rows<scalar_t>(logits, tokens, most, chosen.data_ptr<float>(), ranks.data_ptr<int64_t>(),
                           top_values.data_ptr<float>(), top_ids.data_ptr<int64_t>());
  });
  return {chosen, ranks, top_values, top_ids};
}

// A fragment of the namespace paged_attention.cpp defines; the same indirection, so that
// ITERSERVE_OPS is expanded before the macro pastes it.
#define ITERSERVE_REGISTER_SAMPLING(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
ITERSERVE_REGISTER_SAMPLING(ITERSERVE_OPS, m) {
  m.def("sample_tokens", &sample_tokens);
  m.def("token_logprobs", &token_logprobs);
}
