// The small per-layer ops of a Llama layer, fused, for the CPU: RMSNorm, the residual add
// with the RMSNorm after it, rotary embedding and SiLU-and-multiply.
//
// In torch each is several ops (F.rms_norm alone is eight), and at a decode step's few rows
// a torch op costs more in dispatch and temporaries than in arithmetic; a long prompt chunk
// reads and writes each temporary once more. Here each is one pass over its rows.
//
// Every op rounds where the torch reference (engine/model.py, TorchLayerOps) rounds, so a
// bfloat16 model gives what that gives up to the order of a sum: values are widened to
// float, combined, and narrowed to the model's dtype at the same steps.
//
// Built with paged_attention.cpp into one extension, under the same ITERSERVE_OPS namespace;
// plain loops, vectorised by the compiler under each build's ISA flags (-fopenmp-simd).
// Rows are split over torch's threads only when there are enough of them to pay for it.

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

#ifndef ITERSERVE_OPS
#define ITERSERVE_OPS iterserve_cpu
#endif

namespace {

// Elements below which one thread does a whole op: waking the others costs more.
constexpr int64_t kElementsPerThread = 32768;

int64_t grain_rows(int64_t row_size) {
  return std::max<int64_t>(1, kElementsPerThread / std::max<int64_t>(row_size, 1));
}

template <typename T>
inline T narrow(float x) { return static_cast<T>(x); }

// out = weight * narrow(x / rms(x)), with the rms in float.
template <typename T>
inline void norm_row(const T* x, const T* weight, T* out, int64_t n, float eps) {
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    squares += v * v;
  }
  const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float normed = static_cast<float>(narrow<T>(static_cast<float>(x[i]) * inverse));
    out[i] = narrow<T>(static_cast<float>(weight[i]) * normed);
  }
}

template <typename T>
void rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out, double eps) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norm_row(xp + r * x.stride(0), w, o + r * n, n, static_cast<float>(eps));
  });
}

// residual += x (narrowed, as torch's add), then out = rms_norm(residual).
template <typename T>
void add_rms_norm_rows(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, at::Tensor& out,
                       double eps) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* xp = x.data_ptr<T>();
  T* res = residual.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = res + r * residual.stride(0);
      const T* add = xp + r * x.stride(0);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) row[i] = narrow<T>(static_cast<float>(row[i]) + static_cast<float>(add[i]));
      norm_row(row, w, o + r * n, n, static_cast<float>(eps));
    }
  });
}

// Each head's halves (a, b) become (a cos - b sin, b cos + a sin), in place, in float.
template <typename T>
void rotate_rows(at::Tensor& qk, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t tokens = qk.size(0), heads = qk.size(1), half = qk.size(2) / 2;
  T* base = qk.data_ptr<T>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  at::parallel_for(0, tokens, grain_rows(heads * half * 2), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* ct = c + t * cos.stride(0);
      const float* st = s + t * sin.stride(0);
      for (int64_t h = 0; h < heads; ++h) {
        T* first = base + t * qk.stride(0) + h * qk.stride(1);
        T* second = first + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = static_cast<float>(first[i]), b = static_cast<float>(second[i]);
          first[i] = narrow<T>(a * ct[i] - b * st[i]);
          second[i] = narrow<T>(b * ct[i] + a * st[i]);
        }
      }
    }
  });
}

// exp(-g) overflows float below g = -88; under -ffast-math (no infinities assumed) the
// quotient is then NaN, not 0, so the exponent is capped there: silu is 0 to float precision.
constexpr float kMaxExponent = 88.0f;

// out = narrow(silu(gate)) * up, gate and up the two halves of each row.
template <typename T>
void silu_and_mul_rows(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  const T* in = gate_up.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = in + r * gate_up.stride(0);
      const T* up = gate + n;
      T* row = o + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float g = static_cast<float>(gate[i]);
        const float silu = g / (1.0f + std::exp(std::min(-g, kMaxExponent)));
        row[i] = narrow<T>(static_cast<float>(narrow<T>(silu)) * static_cast<float>(up[i]));
      }
    }
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be 2-d with contiguous rows");
}

void check_weight(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1),
              "weight must be contiguous, one value per column of x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and x must share a dtype");
}

}  // namespace

// x [rows, n] -> weight * rms-normalised x.
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  check_rows(x, "x");
  check_weight(x, weight);
  auto out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm",
                                  [&] { rms_norm_rows<scalar_t>(x, weight, out, eps); });
  return out;
}

// residual [rows, n] += x, in place; returns rms_norm(residual).
at::Tensor add_rms_norm(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  check_weight(x, weight);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "residual and x must share a shape and dtype");
  auto out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm",
                                  [&] { add_rms_norm_rows<scalar_t>(x, residual, weight, out, eps); });
  return out;
}

// qk [tokens, heads, head_dim] rotated in place (Hugging Face's split halves) by float32
// cos, sin [tokens, head_dim / 2]; returns qk.
at::Tensor rotary_embedding(at::Tensor qk, at::Tensor cos, at::Tensor sin) {
  TORCH_CHECK(qk.device().is_cpu() && qk.dim() == 3 && qk.stride(2) == 1 && qk.size(2) % 2 == 0,
              "qk must be a CPU [tokens, heads, head_dim] tensor with contiguous heads of even size");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.dim() == 2 &&
                  sin.dim() == 2 && cos.stride(1) == 1 && sin.stride(1) == 1,
              "cos and sin must be float32 [tokens, head_dim / 2] with contiguous rows");
  TORCH_CHECK(cos.size(0) == qk.size(0) && cos.size(1) * 2 == qk.size(2) && sin.sizes() == cos.sizes(),
              "cos and sin must have a row of head_dim / 2 per token");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qk.scalar_type(), "rotary_embedding",
                                  [&] { rotate_rows<scalar_t>(qk, cos, sin); });
  return qk;
}

// gate_up [rows, 2n] -> silu(gate) * up [rows, n].
at::Tensor silu_and_mul(at::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns");
  auto out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul",
                                  [&] { silu_and_mul_rows<scalar_t>(gate_up, out); });
  return out;
}

// A fragment of the namespace paged_attention.cpp defines; the same indirection, so that
// ITERSERVE_OPS is expanded before the macro pastes it.
#define ITERSERVE_REGISTER_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
ITERSERVE_REGISTER_FRAGMENT(ITERSERVE_OPS, m) {
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("rotary_embedding", &rotary_embedding);
  m.def("silu_and_mul", &silu_and_mul);
}
