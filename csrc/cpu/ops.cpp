// CPU kernels of the harmonica ops. Schemas: ../bindings.cpp; exact semantics (the oracle):
// harmonica_kernels/reference.py.
//
// Every op sees x as B*N rows of D contiguous elements. Row `row` belongs to sample row / N, whose
// gate / shift / scale row starts at data + (row / N) * batch_stride (stride 0 broadcasts), so
// strided views from chunk() are read in place. at::parallel_for splits the rows; arithmetic is
// fp32 and every value is rounded once, on store.
//
// Vectorisation: the per-row loops are plain C++ that GCC auto-vectorises at -O3. The one function
// that runs a range of rows is multiversioned with target_clones: an x86-64-v3 (AVX2/FMA) clone
// and a baseline clone, picked at load time by an ifunc, so the binary stays portable (no -march)
// and the row loops, inlined into each clone, are vectorised for its ISA. We use our own fp16/bf16
// <-> fp32 conversions because c10's are not vectorisable (c10::Half goes through scalar code):
// they are the same branch-free, bit-exact formulas, written so that the vectoriser accepts them.
// Sums use kLanes independent accumulators, which vectorise without -ffast-math and do not depend
// on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
#define HARMONICA_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HARMONICA_MULTIVERSION
#endif

#if defined(__GNUC__)
#define HARMONICA_INLINE inline __attribute__((always_inline))
#else
#define HARMONICA_INLINE inline
#endif

namespace harmonica {
namespace {

// ---- fp16 / bf16 <-> fp32, bit-exact with c10 (round to nearest even, quiet NaN) ----------------

HARMONICA_INLINE float half_bits_to_float(uint16_t h) {
  // fp16 -> fp32 (the FP16 library's formula, as in c10): rescale normals through the exponent,
  // rebuild subnormals with a magic-number subtraction.
  const uint32_t w = uint32_t{h} << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = std::bit_cast<float>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = std::bit_cast<float>((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude =
      two_w < (1u << 27) ? std::bit_cast<uint32_t>(denormalized) : std::bit_cast<uint32_t>(normalized);
  return std::bit_cast<float>(sign | magnitude);
}

HARMONICA_INLINE uint16_t float_to_half_bits(float f) {
  // fp32 -> fp16: overflow to inf by scaling, then round by adding a power of two that leaves the
  // fp16 mantissa in the low float bits.
  const float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = std::bit_cast<uint32_t>(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
  const uint32_t bits = std::bit_cast<uint32_t>(std::bit_cast<float>((bias >> 1) + 0x07800000u) + base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

HARMONICA_INLINE uint16_t float_to_bfloat16_bits(float f) {
  const uint32_t w = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}

HARMONICA_INLINE float to_float(float v) { return v; }
HARMONICA_INLINE float to_float(c10::Half v) { return half_bits_to_float(v.x); }
HARMONICA_INLINE float to_float(c10::BFloat16 v) { return std::bit_cast<float>(uint32_t{v.x} << 16); }

template <class T>
HARMONICA_INLINE T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return c10::Half(float_to_half_bits(v), c10::Half::from_bits());
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>);
    return c10::BFloat16(float_to_bfloat16_bits(v), c10::BFloat16::from_bits());
  }
}

// ---- sums -------------------------------------------------------------------------------------

constexpr int kLanes = 16;

// sum of term(d) for d in [0, D), in kLanes fp32 accumulators.
template <class Term>
HARMONICA_INLINE float lane_sum(int64_t D, const Term& term) {
  float acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += term(d + l);
  }
  for (int l = 0; d < D; ++d, ++l) acc[l] += term(d);
  float total = 0.f;
  for (float a : acc) total += a;
  return total;
}

// ---- row loops (restrict-qualified parameters let GCC vectorise without alias checks) -----------

template <class T, class V>
HARMONICA_INLINE void gated_row(const T* __restrict x, const T* __restrict gate, const V* __restrict value,
                                T* __restrict out, int64_t D) {
  for (int64_t d = 0; d < D; ++d) out[d] = from_float<T>(to_float(x[d]) + to_float(gate[d]) * to_float(value[d]));
}

template <class T, class C>
HARMONICA_INLINE void gated_update_row(const T* __restrict x, const T* __restrict gate, const T* __restrict branch,
                                       T* __restrict out, C* __restrict cache, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    const float b = to_float(branch[d]);
    out[d] = from_float<T>(to_float(x[d]) + to_float(gate[d]) * b);
    cache[d] = from_float<C>(b);
  }
}

// torch.lerp(cache, branch, r) with torch's formula, so r = 0 gives cache and r = 1 branch exactly.
struct Lerp {
  float weight;
  bool from_branch;
  explicit Lerp(float r) : weight(std::fabs(r) < 0.5f ? r : r - 1.f), from_branch(std::fabs(r) >= 0.5f) {}
  HARMONICA_INLINE float operator()(float cache, float branch) const {
    return (from_branch ? branch : cache) + weight * (branch - cache);
  }
};

template <class T, class C>
HARMONICA_INLINE void routed_row(const T* __restrict x, const T* __restrict gate, const T* __restrict branch,
                                 const C* __restrict cache, T* __restrict out, Lerp lerp, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    const float mixed = lerp(to_float(cache[d]), to_float(branch[d]));
    out[d] = from_float<T>(to_float(x[d]) + to_float(gate[d]) * mixed);
  }
}

// Adds this row's terms of grad_gate (grad_out * mixed) and grad_r (grad_out * gate * (branch - cache))
// to per-column accumulators, and writes grad_branch = grad_out * gate * r.
template <bool kGateGrad, class T, class C>
HARMONICA_INLINE void routed_backward_row(const T* __restrict grad_out, const T* __restrict gate,
                                          const T* __restrict branch, const C* __restrict cache,
                                          T* __restrict grad_branch, float* __restrict gate_acc,
                                          float* __restrict r_acc, float r, Lerp lerp, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    const float g = to_float(grad_out[d]);
    const float b = to_float(branch[d]);
    const float c = to_float(cache[d]);
    const float g_gated = g * to_float(gate[d]);
    grad_branch[d] = from_float<T>(g_gated * r);
    r_acc[d] += g_gated * (b - c);
    if constexpr (kGateGrad) gate_acc[d] += g * lerp(c, b);
  }
}

// x_out = x + gate * value (value = y or the cache), optionally cache[:] = value;
// h = LayerNorm(x_out) * (1 + scale) + shift from the fp32 x_out kept in `row`.
template <bool kWriteCache, class T, class V, class C>
HARMONICA_INLINE void norm_modulate_row(const T* __restrict x, const T* __restrict gate, const V* __restrict value,
                                        C* __restrict cache, const T* __restrict shift, const T* __restrict scale,
                                        T* __restrict x_out, T* __restrict h, float* __restrict row, float eps,
                                        int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    const float v = to_float(value[d]);
    if constexpr (kWriteCache) cache[d] = from_float<C>(v);
    row[d] = to_float(x[d]) + to_float(gate[d]) * v;
    x_out[d] = from_float<T>(row[d]);
  }
  // Two-pass moments (biased variance), like F.layer_norm.
  const float mean = lane_sum(D, [&](int64_t d) { return row[d]; }) / static_cast<float>(D);
  const float var = lane_sum(D, [&](int64_t d) { return (row[d] - mean) * (row[d] - mean); }) / static_cast<float>(D);
  const float rstd = 1.f / std::sqrt(var + eps);
  for (int64_t d = 0; d < D; ++d) {
    h[d] = from_float<T>((row[d] - mean) * rstd * (1.f + to_float(scale[d])) + to_float(shift[d]));
  }
}

// ---- parallel driver ----------------------------------------------------------------------------

// The only multiversioned function: fn is inlined into each clone and vectorised for its ISA.
template <class Fn>
HARMONICA_MULTIVERSION void run_range(int64_t begin, int64_t end, const Fn& fn) {
  for (int64_t i = begin; i < end; ++i) fn(i);
}

// About 32K elements per task (ATen's own grain): large enough to amortise a task, small enough
// to balance the threads.
constexpr int64_t kGrainElements = 32768;

int64_t rows_per_task(int64_t D) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(D, 1)); }

// make_row_fn(scratch) returns the per-row function; scratch is a per-task fp32 buffer of
// `scratch_size` elements (per task, not per row, to keep allocation off the row loop).
template <class MakeRowFn>
void parallel_rows(int64_t rows, int64_t D, int64_t scratch_size, const MakeRowFn& make_row_fn) {
  at::parallel_for(0, rows, rows_per_task(D), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(scratch_size);
    run_range(begin, end, make_row_fn(scratch.data()));
  });
}

// ---- dtype dispatch -----------------------------------------------------------------------------

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

// A per-sample row vector (gate, shift, scale) as a base pointer and a batch stride in elements.
template <class T>
struct RowVector {
  const T* data;
  int64_t batch_stride;
  const T* row(int64_t sample) const { return data + sample * batch_stride; }
};

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

// Marks "no cache to write" in gated_residual_norm_modulate's dispatch.
struct NoCacheWrite {};

float read_scalar(const at::Tensor& r) {
  switch (r.scalar_type()) {
    case at::kDouble:
      return static_cast<float>(*r.const_data_ptr<double>());
    case at::kFloat:
      return *r.const_data_ptr<float>();
    case at::kHalf:
      return to_float(*r.const_data_ptr<c10::Half>());
    case at::kBFloat16:
      return to_float(*r.const_data_ptr<c10::BFloat16>());
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
      const T* x_p = x.const_data_ptr<T>();
      const C* cache_p = cache.const_data_ptr<C>();
      T* out_p = out.mutable_data_ptr<T>();
      const RowVector<T> gate_rows = gate.rows<T>();
      parallel_rows(x.size(0) * N, D, 0, [&](float*) {
        return [=](int64_t row) {
          const int64_t o = row * D;
          gated_row(x_p + o, gate_rows.row(row / N), cache_p + o, out_p + o, D);
        };
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
      const T* x_p = x.const_data_ptr<T>();
      const T* branch_p = branch.const_data_ptr<T>();
      C* cache_p = cache.mutable_data_ptr<C>();
      T* out_p = out.mutable_data_ptr<T>();
      const RowVector<T> gate_rows = gate.rows<T>();
      parallel_rows(x.size(0) * N, D, 0, [&](float*) {
        return [=](int64_t row) {
          const int64_t o = row * D;
          gated_update_row(x_p + o, gate_rows.row(row / N), branch_p + o, out_p + o, cache_p + o, D);
        };
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
  const Lerp lerp(read_scalar(r));
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t N = x.size(1), D = x.size(2);
  dispatch_float(x.scalar_type(), "x", [&](auto x_type) {
    using T = decltype(x_type);
    dispatch_float(cache.scalar_type(), "cache", [&](auto cache_type) {
      using C = decltype(cache_type);
      const T* x_p = x.const_data_ptr<T>();
      const T* branch_p = branch.const_data_ptr<T>();
      const C* cache_p = cache.const_data_ptr<C>();
      T* out_p = out.mutable_data_ptr<T>();
      const RowVector<T> gate_rows = gate.rows<T>();
      parallel_rows(x.size(0) * N, D, 0, [&](float*) {
        return [=](int64_t row) {
          const int64_t o = row * D;
          routed_row(x_p + o, gate_rows.row(row / N), branch_p + o, cache_p + o, out_p + o, lerp, D);
        };
      });
    });
  });
  return out;
}

// The reductions over tokens run in fixed blocks of rows of one sample (independent of the thread
// count, so results are reproducible): block k accumulates its grad_gate partial into row k of a
// [blocks, D] fp32 buffer and its grad_r partial into partial_r[k]; both are then summed in block
// order in double.
std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_gated_residual_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& gate_opt, const at::Tensor& branch,
    const at::Tensor& cache, const at::Tensor& r) {
  check_x(grad_out);
  check_like_x(branch, grad_out, "branch", /*same_dtype=*/true);
  check_like_x(cache, grad_out, "cache", /*same_dtype=*/false);
  check_r(r, grad_out);
  const Gate gate(gate_opt, grad_out);
  const float r_value = read_scalar(r);
  const Lerp lerp(r_value);
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
      const T* grad_p = grad_out.const_data_ptr<T>();
      const T* branch_p = branch.const_data_ptr<T>();
      const C* cache_p = cache.const_data_ptr<C>();
      T* grad_branch_p = grad_branch.mutable_data_ptr<T>();
      const RowVector<T> gate_rows = gate.rows<T>();
      float* partial_gate_p = partial_gate.data();
      double* partial_r_p = partial_r.data();
      auto run = [&](auto gate_grad_tag) {
        constexpr bool kGateGrad = decltype(gate_grad_tag)::value;
        at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
          std::vector<float> r_acc(D);
          run_range(begin, end, [&, r_acc = r_acc.data()](int64_t block) {
            const int64_t sample = block / blocks_per_sample;
            const int64_t n0 = (block % blocks_per_sample) * block_rows;
            const int64_t n1 = std::min(N, n0 + block_rows);
            float* gate_acc = kGateGrad ? partial_gate_p + block * D : nullptr;
            std::fill_n(r_acc, D, 0.f);
            if constexpr (kGateGrad) std::fill_n(gate_acc, D, 0.f);
            for (int64_t n = n0; n < n1; ++n) {
              const int64_t o = (sample * N + n) * D;
              routed_backward_row<kGateGrad>(grad_p + o, gate_rows.row(sample), branch_p + o, cache_p + o,
                                             grad_branch_p + o, gate_acc, r_acc, r_value, lerp, D);
            }
            double total = 0.0;
            for (int64_t d = 0; d < D; ++d) total += r_acc[d];
            partial_r_p[block] = total;
          });
        });
      };
      if (gate_grad) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
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
  const int64_t blocks_per_gate_row = blocks / gate_batch;
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
                         grad_gate_p[i] = from_float<T>(static_cast<float>(total));
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
  const float eps_f = static_cast<float>(eps);

  dispatch_float(x.scalar_type(), "x", [&](auto x_type) {
    using T = decltype(x_type);
    // V: element type of the value added under the gate; C: of the cache written, NoCacheWrite if none.
    auto launch = [&](auto value_type, auto cache_type) {
      using V = decltype(value_type);
      constexpr bool kWriteCache = !std::is_same_v<decltype(cache_type), NoCacheWrite>;
      using C = std::conditional_t<kWriteCache, decltype(cache_type), T>;
      const T* x_p = x.const_data_ptr<T>();
      const V* value_p = value.const_data_ptr<V>();
      C* cache_p = kWriteCache ? cache->mutable_data_ptr<C>() : nullptr;
      T* x_out_p = x_out.mutable_data_ptr<T>();
      T* h_p = h.mutable_data_ptr<T>();
      const RowVector<T> gate_rows = gate.rows<T>();
      const RowVector<T> shift_rows{shift.const_data_ptr<T>(), shift_stride};
      const RowVector<T> scale_rows{scale.const_data_ptr<T>(), scale_stride};
      parallel_rows(x.size(0) * N, D, D, [&](float* row_buffer) {
        return [=](int64_t row) {
          const int64_t o = row * D, sample = row / N;
          norm_modulate_row<kWriteCache>(x_p + o, gate_rows.row(sample), value_p + o,
                                         kWriteCache ? cache_p + o : nullptr, shift_rows.row(sample),
                                         scale_rows.row(sample), x_out_p + o, h_p + o, row_buffer, eps_f, D);
        };
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

}  // namespace
}  // namespace harmonica

TORCH_LIBRARY_IMPL(harmonica, CPU, m) {
  m.impl("cached_gated_residual", &harmonica::cached_gated_residual);
  m.impl("gated_residual_update_", &harmonica::gated_residual_update_);
  m.impl("routed_gated_residual", &harmonica::routed_gated_residual);
  m.impl("routed_gated_residual_backward", &harmonica::routed_gated_residual_backward);
  m.impl("gated_residual_norm_modulate", &harmonica::gated_residual_norm_modulate);
}
