// CPU ops of the `harmonica` library. Schemas: ../bindings.cpp; exact semantics (the oracle):
// harmonica_kernels/reference.py. This file checks arguments, allocates outputs and splits the
// work; the vector kernels are in kernels.h.
//
// Every op sees x as B*N rows of D contiguous elements. Row `row` belongs to sample row / N, whose
// gate / shift / scale row starts at data + (row / N) * batch_stride (stride 0 broadcasts), so
// strided views from chunk() are read in place. at::parallel_for splits the rows; arithmetic is
// fp32 and every value is rounded once, on store.
//
// Vectorisation. The kernels work on 8 fp32 lanes in a GCC vector type (f32x8: one AVX2 register,
// two SSE/NEON registers). kernels.h is compiled twice: for the baseline ISA, and for
// AVX2 + FMA + F16C under #pragma GCC target, where fp16 converts with F16C (one instruction
// instead of ~15, which otherwise makes fp16 kernels compute-bound, 3x slower than torch's). The
// set is picked at run time from cpuid, so the binary needs no -march flag and runs on any
// x86-64 or non-x86 machine. (ATen's at::vec::Vectorized would only be wide with per-ISA
// CPU_CAPABILITY compile flags, which an extension build does not get.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"

// The AVX2 kernels need GCC's #pragma GCC target; other compilers build the baseline ones only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HARMONICA_AVX2_KERNELS 1
#include <immintrin.h>
#else
#define HARMONICA_AVX2_KERNELS 0
#endif

// f32x8 values cross function boundaries only inside inlined code, so GCC's -Wpsabi notes that
// their ABI differs with and without AVX do not apply. (Vector parameters are passed by const
// reference: the note on by-value parameters ignores this pragma once <immintrin.h> is included.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define HARMONICA_INLINE inline __attribute__((always_inline))
#define HARMONICA_INLINE_LAMBDA __attribute__((always_inline))

namespace harmonica {
namespace {

// ---- types shared by both kernel sets -----------------------------------------------------------

using f32x8 = float __attribute__((vector_size(32)));
using u32x8 = uint32_t __attribute__((vector_size(32)));
using i32x8 = int32_t __attribute__((vector_size(32)));
using u16x8 = uint16_t __attribute__((vector_size(16)));
constexpr int64_t kW = 8;

// A per-sample row vector (gate, shift, scale): base pointer and batch stride in elements.
template <class T>
struct RowVector {
  const T* data;
  int64_t batch_stride;
  const T* row(int64_t sample) const { return data + sample * batch_stride; }
};

template <class T, class V>
struct GatedResidualArgs {
  const T* x;
  RowVector<T> gate;
  const V* value;
  T* out;
  int64_t N, D;
};

template <class T, class C>
struct GatedResidualUpdateArgs {
  const T* x;
  RowVector<T> gate;
  const T* branch;
  T* out;
  C* cache;
  int64_t N, D;
};

template <class T, class C>
struct RoutedArgs {
  const T* x;
  RowVector<T> gate;
  const T* branch;
  const C* cache;
  T* out;
  float r;
  int64_t N, D;
};

// The reductions over tokens run in fixed blocks of block_rows rows of one sample (independent of
// the thread count, so results are reproducible).
template <class T, class C>
struct RoutedBackwardArgs {
  const T* grad_out;
  RowVector<T> gate;
  const T* branch;
  const C* cache;
  T* grad_branch;
  float* partial_gate;  // [blocks, D]; unused without a gate
  double* partial_r;    // [blocks]
  float r;
  int64_t N, D, block_rows, blocks_per_sample;
};

// C = NoCacheWrite: no cache is written.
struct NoCacheWrite {};

template <class T, class V, class C>
struct NormModulateArgs {
  const T* x;
  RowVector<T> gate;
  const V* value;  // y, or the cache when reused
  C* cache;
  RowVector<T> shift, scale;
  T* x_out;
  T* h;
  float eps;
  int64_t N, D;
};

// Forecast reads (order 1 or 2; c2 unused at order 1): (a, b) the coefficients read from coeffs.
template <class T, class C>
struct ForecastArgs {
  const T* x;
  RowVector<T> gate;
  const C *c0, *c1, *c2;
  T* out;
  float a, b;
  int64_t N, D;
};

template <class T, class C>
struct ForecastNormArgs {
  const T* x;
  RowVector<T> gate;
  const C *c0, *c1, *c2;
  RowVector<T> shift, scale;
  T* x_out;
  T* h;
  float a, b, eps;
  int64_t N, D;
};

// ---- the two kernel sets ------------------------------------------------------------------------
// Both copies live in this file's anonymous namespace, so the linker never merges an AVX2
// instantiation with a baseline one; every header is included above, before the target pragma, so
// no library inline function is compiled for AVX2 either.

namespace baseline {
#include "kernels.h"
}  // namespace baseline

#if HARMONICA_AVX2_KERNELS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define HARMONICA_KERNELS_AVX2 1
#include "kernels.h"
#undef HARMONICA_KERNELS_AVX2
}  // namespace avx2
#pragma GCC pop_options

// HARMONICA_CPU_BASELINE=1 forces the baseline kernels, so that tests can cover them on any machine.
bool use_avx2() {
  static const bool enabled = [] {
    const char* force_baseline = std::getenv("HARMONICA_CPU_BASELINE");
    if (force_baseline != nullptr && std::string_view(force_baseline) == "1") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return enabled;
}
#endif

// fn(kernels) with the kernel set (a Kernels struct of static functions) this CPU runs.
template <class Fn>
void with_kernels(const Fn& fn) {
#if HARMONICA_AVX2_KERNELS
  if (use_avx2()) return fn(avx2::Kernels{});
#endif
  fn(baseline::Kernels{});
}

// About 32K elements per task (ATen's own grain size): enough to amortise a task, small enough to
// balance the threads.
constexpr int64_t kGrainElements = 32768;

int64_t rows_per_task(int64_t D) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(D, 1)); }

// ---- arguments ----------------------------------------------------------------------------------

// Calls fn(T{}) with T the C++ type of `type` (float, c10::Half or c10::BFloat16).
template <class Fn>
void dispatch_float(at::ScalarType type, const char* name, const Fn& fn) {
  switch (type) {
    case at::kFloat:
      return fn(float{});
    case at::kHalf:
      return fn(c10::Half{});
    case at::kBFloat16:
      return fn(c10::BFloat16{});
    default:
      TORCH_CHECK(false, "harmonica: ", name, " must be float32, float16 or bfloat16, got ", type);
  }
}

// The gate, or a row of ones when it is None: multiplying by 1 is exact, so one kernel serves both.
struct Gate {
  at::Tensor tensor;
  int64_t batch_stride;
  Gate(const std::optional<at::Tensor>& gate, const at::Tensor& x)
      : tensor(gate ? *gate : at::ones({x.size(2)}, x.options())),
        batch_stride(gate ? row_vector_batch_stride(*gate, x, "gate") : 0) {}
  template <class T>
  RowVector<T> rows() const {
    return {tensor.const_data_ptr<T>(), batch_stride};
  }
};

float read_scalar(const at::Tensor& r) {
  switch (r.scalar_type()) {
    case at::kDouble:
      return static_cast<float>(*r.const_data_ptr<double>());
    case at::kFloat:
      return *r.const_data_ptr<float>();
    case at::kHalf:
      return static_cast<float>(*r.const_data_ptr<c10::Half>());
    case at::kBFloat16:
      return static_cast<float>(*r.const_data_ptr<c10::BFloat16>());
    default:
      TORCH_CHECK(false, "harmonica: r must be a floating tensor, got ", r.scalar_type());
  }
}

// ---- ops ----------------------------------------------------------------------------------------

at::Tensor cached_gated_residual(const at::Tensor& x, const std::optional<at::Tensor>& gate_opt,
                                 const at::Tensor& cache) {
  check_x(x);
  check_like_x(cache, x, "cache", /*same_dtype=*/false);
  const Gate gate(gate_opt, x);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t N = x.size(1), D = x.size(2);
  dispatch_float(x.scalar_type(), "x", [&](auto x_type) {
    using T = decltype(x_type);
    dispatch_float(cache.scalar_type(), "cache", [&](auto cache_type) {
      using C = decltype(cache_type);
      const GatedResidualArgs<T, C> args{.x = x.const_data_ptr<T>(),
                                         .gate = gate.rows<T>(),
                                         .value = cache.const_data_ptr<C>(),
                                         .out = out.mutable_data_ptr<T>(),
                                         .N = N,
                                         .D = D};
      with_kernels([&](auto kernels) {
        at::parallel_for(0, x.size(0) * N, rows_per_task(D), [&](int64_t begin, int64_t end) {
          kernels.gated_residual(args, begin, end);
        });
      });
    });
  });
  return out;
}

at::Tensor gated_residual_update_(const at::Tensor& x, const std::optional<at::Tensor>& gate_opt,
                                  const at::Tensor& branch, at::Tensor& cache) {
  check_x(x);
  check_like_x(branch, x, "branch", /*same_dtype=*/true);
  check_like_x(cache, x, "cache", /*same_dtype=*/false);
  check_no_overlap(cache, x, "cache", "x");
  check_no_overlap(cache, branch, "cache", "branch");
  const Gate gate(gate_opt, x);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t N = x.size(1), D = x.size(2);
  dispatch_float(x.scalar_type(), "x", [&](auto x_type) {
    using T = decltype(x_type);
    dispatch_float(cache.scalar_type(), "cache", [&](auto cache_type) {
      using C = decltype(cache_type);
      const GatedResidualUpdateArgs<T, C> args{.x = x.const_data_ptr<T>(),
                                               .gate = gate.rows<T>(),
                                               .branch = branch.const_data_ptr<T>(),
                                               .out = out.mutable_data_ptr<T>(),
                                               .cache = cache.mutable_data_ptr<C>(),
                                               .N = N,
                                               .D = D};
      with_kernels([&](auto kernels) {
        at::parallel_for(0, x.size(0) * N, rows_per_task(D), [&](int64_t begin, int64_t end) {
          kernels.gated_residual_update(args, begin, end);
        });
      });
    });
  });
  return out;
}

at::Tensor routed_gated_residual(const at::Tensor& x, const std::optional<at::Tensor>& gate_opt,
                                 const at::Tensor& branch, const at::Tensor& cache, const at::Tensor& r) {
  check_x(x);
  check_like_x(branch, x, "branch", /*same_dtype=*/true);
  check_like_x(cache, x, "cache", /*same_dtype=*/false);
  check_r(r, x);
  const Gate gate(gate_opt, x);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t N = x.size(1), D = x.size(2);
  dispatch_float(x.scalar_type(), "x", [&](auto x_type) {
    using T = decltype(x_type);
    dispatch_float(cache.scalar_type(), "cache", [&](auto cache_type) {
      using C = decltype(cache_type);
      const RoutedArgs<T, C> args{.x = x.const_data_ptr<T>(),
                                  .gate = gate.rows<T>(),
                                  .branch = branch.const_data_ptr<T>(),
                                  .cache = cache.const_data_ptr<C>(),
                                  .out = out.mutable_data_ptr<T>(),
                                  .r = read_scalar(r),
                                  .N = N,
                                  .D = D};
      with_kernels([&](auto kernels) {
        at::parallel_for(0, x.size(0) * N, rows_per_task(D), [&](int64_t begin, int64_t end) {
          kernels.routed_gated_residual(args, begin, end);
        });
      });
    });
  });
  return out;
}

// Block k accumulates its grad_gate partial into row k of a [blocks, D] fp32 buffer and its grad_r
// partial into partial_r[k]; both are then summed in block order in double.
std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_gated_residual_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& gate_opt, const at::Tensor& branch,
    const at::Tensor& cache, const at::Tensor& r) {
  check_x(grad_out);
  check_like_x(branch, grad_out, "branch", /*same_dtype=*/true);
  check_like_x(cache, grad_out, "cache", /*same_dtype=*/false);
  check_r(r, grad_out);
  const Gate gate(gate_opt, grad_out);
  const bool gate_grad = gate_opt.has_value();
  const int64_t B = grad_out.size(0), N = grad_out.size(1), D = grad_out.size(2);
  const int64_t block_rows = rows_per_task(D);
  const int64_t blocks_per_sample = (N + block_rows - 1) / block_rows;
  const int64_t blocks = B * blocks_per_sample;

  at::Tensor grad_branch = at::empty_like(branch, at::MemoryFormat::Contiguous);
  std::vector<float> partial_gate(gate_grad ? blocks * D : 0);
  std::vector<double> partial_r(blocks);

  dispatch_float(grad_out.scalar_type(), "grad_out", [&](auto x_type) {
    using T = decltype(x_type);
    dispatch_float(cache.scalar_type(), "cache", [&](auto cache_type) {
      using C = decltype(cache_type);
      const RoutedBackwardArgs<T, C> args{.grad_out = grad_out.const_data_ptr<T>(),
                                          .gate = gate.rows<T>(),
                                          .branch = branch.const_data_ptr<T>(),
                                          .cache = cache.const_data_ptr<C>(),
                                          .grad_branch = grad_branch.mutable_data_ptr<T>(),
                                          .partial_gate = partial_gate.data(),
                                          .partial_r = partial_r.data(),
                                          .r = read_scalar(r),
                                          .N = N,
                                          .D = D,
                                          .block_rows = block_rows,
                                          .blocks_per_sample = blocks_per_sample};
      with_kernels([&](auto kernels) {
        at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
          if (gate_grad) {
            kernels.template routed_gated_residual_backward<true>(args, begin, end);
          } else {
            kernels.template routed_gated_residual_backward<false>(args, begin, end);
          }
        });
      });
    });
  });

  double grad_r_value = 0.0;
  for (double p : partial_r) grad_r_value += p;
  at::Tensor grad_r = at::empty_like(r, at::MemoryFormat::Contiguous).fill_(grad_r_value);

  if (!gate_grad) return {grad_branch, at::empty({0}, grad_out.options()), grad_r};

  // grad_gate[s, d]: sum over the blocks of sample s, or of every sample when the gate broadcasts.
  const at::Tensor& gate_t = *gate_opt;
  at::Tensor grad_gate = at::empty(gate_t.sizes(), gate_t.options());
  const int64_t gate_batch = gate_t.size(0);
  const int64_t blocks_per_gate_row = gate_batch == 1 ? blocks : blocks_per_sample;
  dispatch_float(grad_gate.scalar_type(), "gate", [&](auto gate_type) {
    using T = decltype(gate_type);
    T* grad_gate_p = grad_gate.mutable_data_ptr<T>();
    const float* partial_p = partial_gate.data();
    at::parallel_for(0, gate_batch * D, kGrainElements / std::max<int64_t>(blocks_per_gate_row, 1),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t i = begin; i < end; ++i) {
                         const int64_t s = i / D, d = i % D;
                         double total = 0.0;
                         for (int64_t k = s * blocks_per_gate_row; k < (s + 1) * blocks_per_gate_row; ++k) {
                           total += partial_p[k * D + d];
                         }
                         grad_gate_p[i] = static_cast<T>(static_cast<float>(total));
                       }
                     });
  });
  return {grad_branch, grad_gate, grad_r};
}

std::tuple<at::Tensor, at::Tensor> gated_residual_norm_modulate(
    const at::Tensor& x, const std::optional<at::Tensor>& gate_opt, const std::optional<at::Tensor>& y,
    const at::Tensor& shift, const at::Tensor& scale, double eps, const std::optional<at::Tensor>& cache,
    bool reuse) {
  check_x(x);
  TORCH_CHECK(!reuse || cache.has_value(), "harmonica: gated_residual_norm_modulate: reuse=True needs a cache");
  TORCH_CHECK(!reuse || !y.has_value(),
              "harmonica: gated_residual_norm_modulate: reuse=True reads the cache; pass y=None");
  TORCH_CHECK(reuse || y.has_value(), "harmonica: gated_residual_norm_modulate: y is required unless reuse=True");
  if (y) check_like_x(*y, x, "y", /*same_dtype=*/true);
  if (cache) check_like_x(*cache, x, "cache", /*same_dtype=*/false);
  const bool write_cache = cache.has_value() && !reuse;
  if (write_cache) {
    check_no_overlap(*cache, x, "cache", "x");
    check_no_overlap(*cache, *y, "cache", "y");
  }
  const Gate gate(gate_opt, x);
  const int64_t shift_stride = row_vector_batch_stride(shift, x, "shift");
  const int64_t scale_stride = row_vector_batch_stride(scale, x, "scale");
  const at::Tensor& value = reuse ? *cache : *y;
  at::Tensor x_out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor h = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t N = x.size(1), D = x.size(2);

  dispatch_float(x.scalar_type(), "x", [&](auto x_type) {
    using T = decltype(x_type);
    // V: element type of the value added under the gate; C: of the cache written, or NoCacheWrite.
    auto launch = [&](auto value_type, auto cache_type) {
      using V = decltype(value_type);
      using C = decltype(cache_type);
      C* cache_p = nullptr;
      if constexpr (!std::is_same_v<C, NoCacheWrite>) cache_p = cache->mutable_data_ptr<C>();
      const NormModulateArgs<T, V, C> args{.x = x.const_data_ptr<T>(),
                                           .gate = gate.rows<T>(),
                                           .value = value.const_data_ptr<V>(),
                                           .cache = cache_p,
                                           .shift = {shift.const_data_ptr<T>(), shift_stride},
                                           .scale = {scale.const_data_ptr<T>(), scale_stride},
                                           .x_out = x_out.mutable_data_ptr<T>(),
                                           .h = h.mutable_data_ptr<T>(),
                                           .eps = static_cast<float>(eps),
                                           .N = N,
                                           .D = D};
      with_kernels([&](auto kernels) {
        at::parallel_for(0, x.size(0) * N, rows_per_task(D), [&](int64_t begin, int64_t end) {
          kernels.gated_residual_norm_modulate(args, begin, end);
        });
      });
    };
    if (reuse) {
      dispatch_float(cache->scalar_type(), "cache", [&](auto cache_type) { launch(cache_type, NoCacheWrite{}); });
    } else if (write_cache) {
      dispatch_float(cache->scalar_type(), "cache", [&](auto cache_type) { launch(T{}, cache_type); });
    } else {
      launch(T{}, NoCacheWrite{});
    }
  });
  return {x_out, h};
}

// fn(order constant, c2 pointer) for a forecast read of order 1 or 2 (c1 given), after the checks;
// (a, b) from coeffs (a CPU tensor here: read directly).
template <class C, class Fn>
void with_forecast_order(const std::optional<at::Tensor>& c2, const Fn& fn) {
  if (c2.has_value()) {
    fn(std::integral_constant<int, 2>{}, c2->const_data_ptr<C>());
  } else {
    fn(std::integral_constant<int, 1>{}, static_cast<const C*>(nullptr));
  }
}

at::Tensor forecast_gated_residual(const at::Tensor& x, const std::optional<at::Tensor>& gate_opt,
                                   const at::Tensor& c0, const std::optional<at::Tensor>& c1,
                                   const std::optional<at::Tensor>& c2, const std::optional<at::Tensor>& coeffs) {
  check_x(x);
  check_forecast(x, c0, c1, c2, coeffs);
  if (!c1.has_value()) return cached_gated_residual(x, gate_opt, c0);  // order 0: plain reuse
  const Gate gate(gate_opt, x);
  const float* ab = coeffs->const_data_ptr<float>();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t N = x.size(1), D = x.size(2);
  dispatch_float(x.scalar_type(), "x", [&](auto x_type) {
    using T = decltype(x_type);
    dispatch_float(c0.scalar_type(), "c0", [&](auto history_type) {
      using C = decltype(history_type);
      with_forecast_order<C>(c2, [&](auto order, const C* c2_p) {
        constexpr int kOrder = decltype(order)::value;
        const ForecastArgs<T, C> args{.x = x.const_data_ptr<T>(),
                                      .gate = gate.rows<T>(),
                                      .c0 = c0.const_data_ptr<C>(),
                                      .c1 = c1->const_data_ptr<C>(),
                                      .c2 = c2_p,
                                      .out = out.mutable_data_ptr<T>(),
                                      .a = ab[0],
                                      .b = ab[1],
                                      .N = N,
                                      .D = D};
        with_kernels([&](auto kernels) {
          at::parallel_for(0, x.size(0) * N, rows_per_task(D), [&](int64_t begin, int64_t end) {
            kernels.template forecast_gated_residual<kOrder>(args, begin, end);
          });
        });
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> forecast_residual_norm_modulate(
    const at::Tensor& x, const std::optional<at::Tensor>& gate_opt, const at::Tensor& c0,
    const std::optional<at::Tensor>& c1, const std::optional<at::Tensor>& c2, const std::optional<at::Tensor>& coeffs,
    const at::Tensor& shift, const at::Tensor& scale, double eps) {
  check_x(x);
  check_forecast(x, c0, c1, c2, coeffs);
  if (!c1.has_value()) {  // order 0: plain reuse
    return gated_residual_norm_modulate(x, gate_opt, std::nullopt, shift, scale, eps, c0, /*reuse=*/true);
  }
  const Gate gate(gate_opt, x);
  const int64_t shift_stride = row_vector_batch_stride(shift, x, "shift");
  const int64_t scale_stride = row_vector_batch_stride(scale, x, "scale");
  const float* ab = coeffs->const_data_ptr<float>();
  at::Tensor x_out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor h = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t N = x.size(1), D = x.size(2);
  dispatch_float(x.scalar_type(), "x", [&](auto x_type) {
    using T = decltype(x_type);
    dispatch_float(c0.scalar_type(), "c0", [&](auto history_type) {
      using C = decltype(history_type);
      with_forecast_order<C>(c2, [&](auto order, const C* c2_p) {
        constexpr int kOrder = decltype(order)::value;
        const ForecastNormArgs<T, C> args{.x = x.const_data_ptr<T>(),
                                          .gate = gate.rows<T>(),
                                          .c0 = c0.const_data_ptr<C>(),
                                          .c1 = c1->const_data_ptr<C>(),
                                          .c2 = c2_p,
                                          .shift = {shift.const_data_ptr<T>(), shift_stride},
                                          .scale = {scale.const_data_ptr<T>(), scale_stride},
                                          .x_out = x_out.mutable_data_ptr<T>(),
                                          .h = h.mutable_data_ptr<T>(),
                                          .a = ab[0],
                                          .b = ab[1],
                                          .eps = static_cast<float>(eps),
                                          .N = N,
                                          .D = D};
        with_kernels([&](auto kernels) {
          at::parallel_for(0, x.size(0) * N, rows_per_task(D), [&](int64_t begin, int64_t end) {
            kernels.template forecast_residual_norm_modulate<kOrder>(args, begin, end);
          });
        });
      });
    });
  });
  return {x_out, h};
}

}  // namespace
}  // namespace harmonica

TORCH_LIBRARY_IMPL(harmonica, CPU, m) {
  m.impl("cached_gated_residual", &harmonica::cached_gated_residual);
  m.impl("gated_residual_update_", &harmonica::gated_residual_update_);
  m.impl("routed_gated_residual", &harmonica::routed_gated_residual);
  m.impl("routed_gated_residual_backward", &harmonica::routed_gated_residual_backward);
  m.impl("gated_residual_norm_modulate", &harmonica::gated_residual_norm_modulate);
  m.impl("forecast_gated_residual", &harmonica::forecast_gated_residual);
  m.impl("forecast_residual_norm_modulate", &harmonica::forecast_residual_norm_modulate);
}
