// CUDA kernels of the `harmonica` ops (schemas in csrc/bindings.cpp, semantics in
// harmonica_kernels/reference.py, which is the oracle).
//
// Layout contract: x, branch, y, grad_out are [B, N, D] contiguous in one dtype S (fp32, fp16,
// bf16); the cache is [B, N, D] contiguous in any of the three (C); gate, shift, scale are
// per-sample row vectors [B, D] / [B, 1, D] with unit stride along D and an arbitrary batch
// stride (0 when broadcast over the batch). All arithmetic is fp32, rounded once on store.
//
// Every kernel is memory-bound. The common shape of all of them: a row of D elements is split
// into "vectors" of V elements, V = 16 bytes / sizeof(S), so x/out/branch move as 128-bit
// accesses (the cache as V elements of C: 8, 16 or 32 bytes). When D or any pointer/stride is not
// suitably aligned the same kernel is instantiated with V = 1 (scalar fallback: odd D such as 37
// works; only the norm kernel has a ceiling, D <= 8192 there).
//
//  * cached_gated_residual / gated_residual_update_ / routed_gated_residual: one elementwise
//    kernel, 256 threads, each thread handles kEwIlp = 2 vectors per grid-stride iteration (all
//    loads issued before any store), grid = one full wave of resident blocks (occupancy API).
//  * routed_gated_residual_backward: 2-D blocks of 32 vector-columns x 8 token-rows; each block
//    owns one column tile of one sample over a chunk of tokens and keeps its grad_gate partial
//    sums in registers, reduces them over the 8 rows through shared memory and writes one fp32
//    partial row; a second small kernel sums the partials in a fixed order and rounds to the
//    gate's dtype (deterministic, no atomics, no memset, no host sync).
//  * forecast_gated_residual / forecast_residual_norm_modulate: the same two kernels, with the value
//    computed from the history c0 (the `cache` argument), c1, c2 and the coefficients (a, b) read
//    from device memory once per thread (no host sync, graph-capturable): kForecast1/2 modes of the
//    elementwise kernel, ORDER 1/2 of the norm kernel.
//  * gated_residual_norm_modulate: one block per row (grid-stride over rows, one wave of
//    resident blocks), the row held in registers as fp32 (each thread up to 4 vectors, or 8
//    elements on the scalar path), two block reductions (mean, then the centred variance), so
//    x and y/cache are read from global memory exactly once.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>

#include "checks.h"

namespace harmonica {
namespace {

// ---------------------------------------------------------------------------------------------
// Element types and conversions (explicit intrinsics: torch builds with __CUDA_NO_HALF_*).

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Vector moves. N elements of T are moved as 32-bit words grouped into one 128-bit (or 64/32-bit)
// access -- two 128-bit accesses when N * sizeof(T) == 32 (fp32 cache under an fp16 model).
// Built from explicit words because a plain struct-of-halves copy may be split into 16-bit
// accesses by the optimiser. Requires p aligned to min(16, N * sizeof(T)) bytes.
template <int W>
__device__ __forceinline__ void load_words(const void* __restrict__ p, uint32_t (&w)[W]) {
  if constexpr (W == 1) {
    w[0] = *static_cast<const uint32_t*>(p);
  } else if constexpr (W == 2) {
    const uint2 a = *static_cast<const uint2*>(p);
    w[0] = a.x, w[1] = a.y;
  } else {
    static_assert(W % 4 == 0, "vector of 4, 8, 16 or 32 bytes");
#pragma unroll
    for (int q = 0; q < W / 4; ++q) {
      const uint4 a = static_cast<const uint4*>(p)[q];
      w[4 * q] = a.x, w[4 * q + 1] = a.y, w[4 * q + 2] = a.z, w[4 * q + 3] = a.w;
    }
  }
}

// Stores are inline PTX: NVVM was seen splitting a uint4 store into four 32-bit stores (in the
// norm kernel), which quadruples the store requests of a memory-bound kernel. Nothing in these
// kernels reads back what it stores, so no "memory" clobber is needed.
template <int W>
__device__ __forceinline__ void store_words(void* __restrict__ p, const uint32_t (&w)[W]) {
  if constexpr (W == 1) {
    *static_cast<uint32_t*>(p) = w[0];
  } else if constexpr (W == 2) {
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(w[0]), "r"(w[1]));
  } else {
    static_assert(W % 4 == 0, "vector of 4, 8, 16 or 32 bytes");
#pragma unroll
    for (int q = 0; q < W / 4; ++q) {
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(static_cast<uint4*>(p) + q), "r"(w[4 * q]),
                   "r"(w[4 * q + 1]), "r"(w[4 * q + 2]), "r"(w[4 * q + 3]));
    }
  }
}

// Two 16-bit floats <-> one 32-bit word (element 2j in the low half: little-endian memory order).
__device__ __forceinline__ float2 unpack2(uint32_t w, __half) {
  __half2 h;
  memcpy(&h, &w, 4);
  return __half22float2(h);
}
__device__ __forceinline__ float2 unpack2(uint32_t w, __nv_bfloat16) {
  __nv_bfloat162 h;
  memcpy(&h, &w, 4);
  return __bfloat1622float2(h);
}
__device__ __forceinline__ uint32_t pack2(float a, float b, __half) {
  const __half2 h = __floats2half2_rn(a, b);
  uint32_t w;
  memcpy(&w, &h, 4);
  return w;
}
__device__ __forceinline__ uint32_t pack2(float a, float b, __nv_bfloat16) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  uint32_t w;
  memcpy(&w, &h, 4);
  return w;
}

template <int N, class T>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[N]) {
  if constexpr (N * sizeof(T) < 4) {  // a single 16-bit element (scalar path)
    out[0] = to_float(*p);
  } else if constexpr (sizeof(T) == 4) {
    uint32_t w[N];
    load_words<N>(p, w);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = __uint_as_float(w[k]);
  } else {
    uint32_t w[N / 2];
    load_words<N / 2>(p, w);
#pragma unroll
    for (int j = 0; j < N / 2; ++j) {
      const float2 f = unpack2(w[j], T{});
      out[2 * j] = f.x, out[2 * j + 1] = f.y;
    }
  }
}

template <int N, class T>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[N]) {
  if constexpr (N * sizeof(T) < 4) {
    *p = from_float<T>(in[0]);
  } else if constexpr (sizeof(T) == 4) {
    uint32_t w[N];
#pragma unroll
    for (int k = 0; k < N; ++k) w[k] = __float_as_uint(in[k]);
    store_words<N>(p, w);
  } else {
    uint32_t w[N / 2];
#pragma unroll
    for (int j = 0; j < N / 2; ++j) w[j] = pack2(in[2 * j], in[2 * j + 1], T{});
    store_words<N / 2>(p, w);
  }
}

// The routing weight r lives on the device (read in the kernel: no host sync, graph-capturable).
enum RKind : int { kRFloat = 0, kRHalf = 1, kRBFloat16 = 2, kRDouble = 3 };

__device__ __forceinline__ float load_r(const void* __restrict__ r, int kind) {
  switch (kind) {
    case kRHalf:
      return __half2float(*static_cast<const __half*>(r));
    case kRBFloat16:
      return __bfloat162float(*static_cast<const __nv_bfloat16*>(r));
    case kRDouble:
      return static_cast<float>(*static_cast<const double*>(r));
    default:
      return *static_cast<const float*>(r);
  }
}

// Non-negative 64-bit division with the (usual) 32-bit fast path.
__device__ __forceinline__ int64_t div_nonneg(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
  return a / b;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the whole block (blockDim a multiple of 32, at most 1024 threads), returned to every
// thread. `red` holds 32 floats; the leading barrier makes back-to-back calls safe.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int warps = (blockDim.x * blockDim.y) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? red[lane] : 0.f);
}

// Taylor forecast of order ORDER (1 or 2) into val (which holds c0 on entry), as the reference:
// c0 + a (c0 - c1) [+ b ((c0 - c1) - (c1 - c2))].
template <int ORDER, int V, class C>
__device__ __forceinline__ void add_forecast(const C* __restrict__ c1, const C* __restrict__ c2, int64_t e, float a,
                                             float b, float (&val)[V]) {
  float c1v[V], c2v[V];
  load_vec<V>(c1 + e, c1v);
  if constexpr (ORDER == 2) load_vec<V>(c2 + e, c2v);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const float first = val[k] - c1v[k];
    float v = fmaf(a, first, val[k]);
    if constexpr (ORDER == 2) v = fmaf(b, first - (c1v[k] - c2v[k]), v);
    val[k] = v;
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise residual kernels.

enum class Mode { kCached, kUpdate, kRouted, kForecast1, kForecast2 };

template <Mode M>
constexpr int forecast_order() {
  return M == Mode::kForecast1 ? 1 : M == Mode::kForecast2 ? 2 : 0;
}

constexpr int kEwThreads = 256;
constexpr int kEwIlp = 2;

// out = x + gate * value, value = cache (kCached) | branch, cache[:] = branch (kUpdate) |
// lerp(cache, branch, r) (kRouted) | the forecast from c0 = cache, c1[, c2] (kForecast1/2, coefficients
// at `coeffs`). Indices count vectors of V elements; d_vec = D / V.
template <Mode M, class S, class C, int V>
__global__ void __launch_bounds__(kEwThreads)
    gated_residual_kernel(const S* __restrict__ x, const S* __restrict__ gate, int64_t gate_stride,
                          const S* __restrict__ branch, const C* __restrict__ cache_in, C* __restrict__ cache_out,
                          const void* __restrict__ r, int r_kind, const C* __restrict__ c1, const C* __restrict__ c2,
                          const float* __restrict__ coeffs, S* __restrict__ out, int64_t n_vec, int64_t d_vec,
                          int64_t tokens) {
  constexpr int kOrder = forecast_order<M>();
  float rv = 0.f, ca = 0.f, cb = 0.f;
  if constexpr (M == Mode::kRouted) rv = load_r(r, r_kind);
  if constexpr (kOrder > 0) ca = coeffs[0];
  if constexpr (kOrder == 2) cb = coeffs[1];
  const int64_t step = static_cast<int64_t>(gridDim.x) * kEwThreads * kEwIlp;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kEwThreads * kEwIlp + threadIdx.x; base < n_vec;
       base += step) {
    float xv[kEwIlp][V], val[kEwIlp][V], gv[kEwIlp][V];
#pragma unroll
    for (int u = 0; u < kEwIlp; ++u) {
      const int64_t i = base + u * kEwThreads;
      if (i < n_vec) {
        const int64_t e = i * V;
        load_vec<V>(x + e, xv[u]);
        if constexpr (M == Mode::kCached) {
          load_vec<V>(cache_in + e, val[u]);
        } else if constexpr (kOrder > 0) {
          load_vec<V>(cache_in + e, val[u]);
          add_forecast<kOrder, V>(c1, c2, e, ca, cb, val[u]);
        } else if constexpr (M == Mode::kUpdate) {
          load_vec<V>(branch + e, val[u]);
        } else {
          float bv[V];
          load_vec<V>(branch + e, bv);
          load_vec<V>(cache_in + e, val[u]);
#pragma unroll
          for (int k = 0; k < V; ++k) val[u][k] = fmaf(rv, bv[k] - val[u][k], val[u][k]);
        }
        if (gate != nullptr) {
          const int64_t row = div_nonneg(i, d_vec);
          const int64_t col = i - row * d_vec;
          const int64_t b = gate_stride == 0 ? 0 : div_nonneg(row, tokens);
          load_vec<V>(gate + b * gate_stride + col * V, gv[u]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kEwIlp; ++u) {
      const int64_t i = base + u * kEwThreads;
      if (i < n_vec) {
        const int64_t e = i * V;
        float o[V];
        if (gate != nullptr) {
#pragma unroll
          for (int k = 0; k < V; ++k) o[k] = fmaf(gv[u][k], val[u][k], xv[u][k]);
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) o[k] = xv[u][k] + val[u][k];
        }
        store_vec<V>(out + e, o);
        if constexpr (M == Mode::kUpdate) store_vec<V>(cache_out + e, val[u]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward of routed_gated_residual.

constexpr int kBwdTX = 32;  // vector-columns per block (one warp spans 32 * 16 contiguous bytes)
constexpr int kBwdTY = 8;   // token-rows per block
constexpr int kBwdIlp = 2;  // rows per thread per iteration
constexpr int kBwdThreads = kBwdTX * kBwdTY;

// Block (tile, chunk, b) = blockIdx.x decomposed; it covers vector-columns
// [tile * 32, tile * 32 + 32) of sample b over tokens [chunk * rows_per_chunk, ...). Writes
// grad_branch, part_gate[b * chunks + chunk, :] for its columns (when gate), part_r[blockIdx.x].
template <class S, class C, int V>
__global__ void __launch_bounds__(kBwdThreads)
    routed_backward_kernel(const S* __restrict__ grad_out, const S* __restrict__ gate, int64_t gate_stride,
                           const S* __restrict__ branch, const C* __restrict__ cache, const void* __restrict__ r,
                           int r_kind, S* __restrict__ grad_branch, float* __restrict__ part_gate,
                           float* __restrict__ part_r, int64_t tokens, int64_t d_vec, int64_t tiles, int64_t chunks,
                           int64_t rows_per_chunk) {
  __shared__ float red_gate[kBwdTY][V][kBwdTX];
  __shared__ float red_r[32];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t tile = blockIdx.x % tiles;
  const int64_t part_row = blockIdx.x / tiles;  // b * chunks + chunk
  const int64_t chunk = part_row % chunks;
  const int64_t b = part_row / chunks;
  const int64_t col = tile * kBwdTX + tx;
  const bool active = col < d_vec;
  const float rv = load_r(r, r_kind);

  float gf[V];
#pragma unroll
  for (int k = 0; k < V; ++k) gf[k] = 1.f;
  if (gate != nullptr && active) load_vec<V>(gate + b * gate_stride + col * V, gf);

  float acc_gate[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc_gate[k] = 0.f;
  float acc_r = 0.f;

  const int64_t n_begin = chunk * rows_per_chunk;
  const int64_t n_end = min(tokens, n_begin + rows_per_chunk);
  if (active) {
    for (int64_t n = n_begin + ty; n < n_end; n += kBwdTY * kBwdIlp) {
      float go[kBwdIlp][V], bv[kBwdIlp][V], cv[kBwdIlp][V];
#pragma unroll
      for (int u = 0; u < kBwdIlp; ++u) {
        const int64_t nn = n + u * kBwdTY;
        if (nn < n_end) {
          const int64_t e = ((b * tokens + nn) * d_vec + col) * V;
          load_vec<V>(grad_out + e, go[u]);
          load_vec<V>(branch + e, bv[u]);
          load_vec<V>(cache + e, cv[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kBwdIlp; ++u) {
        const int64_t nn = n + u * kBwdTY;
        if (nn < n_end) {
          const int64_t e = ((b * tokens + nn) * d_vec + col) * V;
          float gb[V];
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const float gg = go[u][k] * gf[k];
            const float diff = bv[u][k] - cv[u][k];
            gb[k] = gg * rv;
            acc_r = fmaf(gg, diff, acc_r);
            acc_gate[k] = fmaf(go[u][k], fmaf(rv, diff, cv[u][k]), acc_gate[k]);
          }
          store_vec<V>(grad_branch + e, gb);
        }
      }
    }
  }

  if (gate != nullptr) {
#pragma unroll
    for (int k = 0; k < V; ++k) red_gate[ty][k][tx] = acc_gate[k];
    __syncthreads();
    const int64_t d = d_vec * V;
    for (int s = tx + ty * kBwdTX; s < kBwdTX * V; s += kBwdThreads) {
      const int sx = s / V, k = s % V;  // consecutive s -> consecutive output columns
      const int64_t scol = tile * kBwdTX + sx;
      if (scol < d_vec) {
        float sum = 0.f;
#pragma unroll
        for (int yy = 0; yy < kBwdTY; ++yy) sum += red_gate[yy][k][sx];
        part_gate[part_row * d + scol * V + k] = sum;
      }
    }
  }
  acc_r = block_sum(acc_r, red_r);
  if (tx == 0 && ty == 0) part_r[blockIdx.x] = acc_r;
}

// grad_gate[g, d] = sum of part_gate rows [g * chunks, (g + 1) * chunks) (all B * chunks rows when
// the gate is broadcast over the batch), rounded to S; the last block sums part_r into grad_r.
// Fixed summation order: bit-for-bit reproducible.
template <class S>
__global__ void __launch_bounds__(kBwdThreads)
    routed_backward_finalize_kernel(const float* __restrict__ part_gate, int64_t rows_per_gate,
                                    int64_t col_tiles, int64_t gate_blocks, int64_t d, S* __restrict__ grad_gate,
                                    const float* __restrict__ part_r, int64_t n_part_r, float* __restrict__ grad_r) {
  __shared__ float red[kBwdTY][kBwdTX + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  if (blockIdx.x < gate_blocks) {
    const int64_t g = blockIdx.x / col_tiles;
    const int64_t col = (blockIdx.x % col_tiles) * kBwdTX + tx;
    float sum = 0.f;
    if (col < d) {
      const float* p = part_gate + g * rows_per_gate * d + col;
      for (int64_t row = ty; row < rows_per_gate; row += kBwdTY) sum += p[row * d];
    }
    red[ty][tx] = sum;
    __syncthreads();
    if (ty == 0 && col < d) {
      float total = 0.f;
#pragma unroll
      for (int yy = 0; yy < kBwdTY; ++yy) total += red[yy][tx];
      grad_gate[g * d + col] = from_float<S>(total);
    }
  } else {
    __shared__ float red_r[32];
    float sum = 0.f;
    for (int64_t i = tx + ty * kBwdTX; i < n_part_r; i += kBwdThreads) sum += part_r[i];
    sum = block_sum(sum, red_r);
    if (tx == 0 && ty == 0) *grad_r = sum;
  }
}

// ---------------------------------------------------------------------------------------------
// gated_residual_norm_modulate: one block per row, row in registers.

// The row lives in registers: each thread holds up to kNormItemsVec 16-byte vectors (x_out and
// the added value as fp32) with at most 512 threads per row (a 128-register budget; ptxas' own
// choice for a plain 512-thread bound was 64 and spilled), or kNormItemsScalar elements with up to
// 1024 threads on the scalar path. Largest D: 2048 * V on the vector path (8192 fp32, 16384
// fp16/bf16), 8192 on the scalar path.
constexpr int kNormItemsVec = 4;
constexpr int kNormItemsScalar = 8;
template <int V>
constexpr int norm_max_threads() {
  return V == 1 ? 1024 : 512;
}

// ORDER 1/2: the value is the forecast from c0 = cache_in, c1[, c2] (y is null, nothing written but
// x_out and h).
template <class S, class C, int V, int ITEMS, int ORDER>
__global__ void __launch_bounds__(norm_max_threads<V>(), 1)
    norm_modulate_kernel(const S* __restrict__ x, const S* __restrict__ gate, int64_t gate_stride,
                         const S* __restrict__ y, const C* __restrict__ cache_in, C* __restrict__ cache_out,
                         const C* __restrict__ c1, const C* __restrict__ c2, const float* __restrict__ coeffs,
                         const S* __restrict__ shift, int64_t shift_stride, const S* __restrict__ scale,
                         int64_t scale_stride, S* __restrict__ x_out, S* __restrict__ h, int64_t rows,
                         int64_t tokens, int64_t d_vec, float eps) {
  __shared__ float red[32];
  const float inv_d = 1.f / static_cast<float>(d_vec * V);
  float ca = 0.f, cb = 0.f;
  if constexpr (ORDER > 0) ca = coeffs[0];
  if constexpr (ORDER == 2) cb = coeffs[1];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = div_nonneg(row, tokens);
    const int64_t row_off = row * d_vec * V;
    // All of the row's loads first (nothing is stored before they are issued), then the stores.
    float v[ITEMS][V], val[ITEMS][V];
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t c = threadIdx.x + static_cast<int64_t>(it) * blockDim.x;
      if (c < d_vec) {
        const int64_t e = row_off + c * V;
        load_vec<V>(x + e, v[it]);
        if constexpr (ORDER > 0) {
          load_vec<V>(cache_in + e, val[it]);
          add_forecast<ORDER, V>(c1, c2, e, ca, cb, val[it]);
        } else if (y != nullptr) {
          load_vec<V>(y + e, val[it]);
        } else {
          load_vec<V>(cache_in + e, val[it]);
        }
        if (gate != nullptr) {
          float gv[V];
          load_vec<V>(gate + b * gate_stride + c * V, gv);
#pragma unroll
          for (int k = 0; k < V; ++k) v[it][k] = fmaf(gv[k], val[it][k], v[it][k]);
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) v[it][k] += val[it][k];
        }
      }
    }
    float sum = 0.f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t c = threadIdx.x + static_cast<int64_t>(it) * blockDim.x;
      if (c < d_vec) {
        const int64_t e = row_off + c * V;
        store_vec<V>(x_out + e, v[it]);
        if (ORDER == 0 && cache_out != nullptr) store_vec<V>(cache_out + e, val[it]);
#pragma unroll
        for (int k = 0; k < V; ++k) sum += v[it][k];
      }
    }
    const float mean = block_sum(sum, red) * inv_d;
    float sq = 0.f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t c = threadIdx.x + static_cast<int64_t>(it) * blockDim.x;
      if (c < d_vec) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float dv = v[it][k] - mean;
          sq = fmaf(dv, dv, sq);
        }
      }
    }
    const float rstd = rsqrtf(block_sum(sq, red) * inv_d + eps);
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t c = threadIdx.x + static_cast<int64_t>(it) * blockDim.x;
      if (c < d_vec) {
        float sh[V], sc[V], o[V];
        load_vec<V>(shift + b * shift_stride + c * V, sh);
        load_vec<V>(scale + b * scale_stride + c * V, sc);
#pragma unroll
        for (int k = 0; k < V; ++k) o[k] = fmaf((v[it][k] - mean) * rstd, 1.f + sc[k], sh[k]);
        store_vec<V>(h + row_off + c * V, o);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

template <class T>
struct Tag {
  using type = T;
};

// Calls f(Tag<float|__half|__nv_bfloat16>) for t.
template <class F>
void dispatch_float(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat:
      f(Tag<float>{});
      break;
    case at::kHalf:
      f(Tag<__half>{});
      break;
    case at::kBFloat16:
      f(Tag<__nv_bfloat16>{});
      break;
    default:
      TORCH_CHECK(false, "harmonica: ", what, " must be float32, float16 or bfloat16, got ", t);
  }
}

int r_kind_of(const at::Tensor& r) {
  switch (r.scalar_type()) {
    case at::kHalf:
      return kRHalf;
    case at::kBFloat16:
      return kRBFloat16;
    case at::kDouble:
      return kRDouble;
    default:
      return kRFloat;
  }
}

int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cached{};
  if (device >= 0 && device < static_cast<int>(cached.size())) {
    const int v = cached[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  v = std::max(v, 1);
  if (device >= 0 && device < static_cast<int>(cached.size())) cached[device].store(v, std::memory_order_relaxed);
  return v;
}

// Resident blocks per SM of `kKernel` at `threads` threads per block, from the occupancy
// calculator (a host-side query, fine under graph capture), cached per kernel and block size.
template <auto kKernel>
int blocks_per_sm(int threads) {
  static std::array<std::atomic<int>, 33> cached{};  // index threads / 32, 1..32
  const int slot = std::clamp(threads / 32, 0, 32);
  int v = cached[slot].load(std::memory_order_relaxed);
  if (v > 0) return v;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, kKernel, threads, 0));
  v = std::max(v, 1);
  cached[slot].store(v, std::memory_order_relaxed);
  return v;
}

bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Whether `t` (elements of `elem_size` bytes) can be moved `vec` elements at a time.
bool vec_aligned(const void* p, size_t elem_size, int vec) {
  return p == nullptr || aligned_to(p, std::min<size_t>(16, elem_size * vec));
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "harmonica (cuda): ", name, " must be a CUDA tensor, got device ", t.device());
}

// A per-sample row vector argument after validation.
struct RowVec {
  const void* ptr = nullptr;
  int64_t stride = 0;
};

RowVec row_vec(const std::optional<at::Tensor>& v, const at::Tensor& x, const char* name) {
  if (!v.has_value()) return {};
  return {v->data_ptr(), row_vector_batch_stride(*v, x, name)};
}

bool row_vec_ok(const RowVec& v, size_t elem_size, int vec) {
  return v.ptr == nullptr || (vec_aligned(v.ptr, elem_size, vec) && v.stride % vec == 0);
}

template <class S>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(S));
}

// The history and coefficients of a forecast read (c1, c2 null below order 1, 2), after checks.
struct History {
  const at::Tensor* c1 = nullptr;
  const at::Tensor* c2 = nullptr;
  const at::Tensor* coeffs = nullptr;
  const void* c1_ptr() const { return c1 != nullptr ? c1->data_ptr() : nullptr; }
  const void* c2_ptr() const { return c2 != nullptr ? c2->data_ptr() : nullptr; }
  const float* coeffs_ptr() const { return coeffs != nullptr ? coeffs->data_ptr<float>() : nullptr; }
};

History history_of(const std::optional<at::Tensor>& c1, const std::optional<at::Tensor>& c2,
                   const std::optional<at::Tensor>& coeffs) {
  return {c1 ? &*c1 : nullptr, c2 ? &*c2 : nullptr, coeffs ? &*coeffs : nullptr};
}

// ---- elementwise ops --------------------------------------------------------------------------

template <Mode M>
at::Tensor launch_gated_residual(const at::Tensor& x, const std::optional<at::Tensor>& gate,
                                 const at::Tensor* branch, const at::Tensor& cache, const at::Tensor* r,
                                 const History& history = {}) {
  const RowVec g = row_vec(gate, x, "gate");  // validates the gate before anything is allocated
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const int64_t tokens = x.size(1), d = x.size(2);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x.get_device());
  const void* r_ptr = r != nullptr ? r->data_ptr() : nullptr;
  const int r_kind = r != nullptr ? r_kind_of(*r) : kRFloat;

  dispatch_float(x.scalar_type(), "x", [&](auto s_tag) {
    using S = typename decltype(s_tag)::type;
    dispatch_float(cache.scalar_type(), "cache", [&](auto c_tag) {
      using C = typename decltype(c_tag)::type;
      constexpr int kV = vec_width<S>();
      const S* x_p = static_cast<const S*>(x.data_ptr());
      const S* b_p = branch != nullptr ? static_cast<const S*>(branch->data_ptr()) : nullptr;
      const C* c_in = M == Mode::kUpdate ? nullptr : static_cast<const C*>(cache.data_ptr());
      C* c_out = M == Mode::kUpdate ? static_cast<C*>(cache.data_ptr()) : nullptr;
      S* o_p = static_cast<S*>(out.data_ptr());
      const C* c1_p = static_cast<const C*>(history.c1_ptr());
      const C* c2_p = static_cast<const C*>(history.c2_ptr());
      const bool vec_ok = (g.ptr != nullptr ? d % kV == 0 : numel % kV == 0) && row_vec_ok(g, sizeof(S), kV) &&
                          vec_aligned(x_p, sizeof(S), kV) && vec_aligned(b_p, sizeof(S), kV) &&
                          vec_aligned(o_p, sizeof(S), kV) && vec_aligned(cache.data_ptr(), sizeof(C), kV) &&
                          vec_aligned(c1_p, sizeof(C), kV) && vec_aligned(c2_p, sizeof(C), kV);
      auto launch = [&](auto v_const) {
        constexpr int V = decltype(v_const)::value;
        const int64_t n_vec = numel / V;
        constexpr auto kernel = gated_residual_kernel<M, S, C, V>;
        // Grid-stride over the tensor with one full wave of resident blocks.
        const int64_t per_block = static_cast<int64_t>(kEwThreads) * kEwIlp;
        const int64_t wave = static_cast<int64_t>(sms) * blocks_per_sm<kernel>(kEwThreads);
        const int blocks = static_cast<int>(std::min((n_vec + per_block - 1) / per_block, wave));
        // d / V only matters with a gate, where d % V == 0 on the vector path.
        kernel<<<blocks, kEwThreads, 0, stream>>>(
            x_p, static_cast<const S*>(g.ptr), g.stride, b_p, c_in, c_out, r_ptr, r_kind, c1_p, c2_p,
            history.coeffs_ptr(), o_p, n_vec, std::max<int64_t>(d / V, 1), tokens);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (vec_ok) {
        launch(std::integral_constant<int, kV>{});
      } else {
        launch(std::integral_constant<int, 1>{});
      }
    });
  });
  return out;
}

at::Tensor cached_gated_residual_cuda(const at::Tensor& x, const std::optional<at::Tensor>& gate,
                                      const at::Tensor& cache) {
  check_cuda(x, "x");
  check_x(x);
  check_like_x(cache, x, "cache", /*same_dtype=*/false);
  return launch_gated_residual<Mode::kCached>(x, gate, nullptr, cache, nullptr);
}

at::Tensor gated_residual_update_cuda(const at::Tensor& x, const std::optional<at::Tensor>& gate,
                                      const at::Tensor& branch, at::Tensor& cache) {
  check_cuda(x, "x");
  check_x(x);
  check_like_x(branch, x, "branch", /*same_dtype=*/true);
  check_like_x(cache, x, "cache", /*same_dtype=*/false);
  check_no_overlap(cache, x, "cache", "x");
  check_no_overlap(cache, branch, "cache", "branch");
  return launch_gated_residual<Mode::kUpdate>(x, gate, &branch, cache, nullptr);
}

at::Tensor routed_gated_residual_cuda(const at::Tensor& x, const std::optional<at::Tensor>& gate,
                                      const at::Tensor& branch, const at::Tensor& cache, const at::Tensor& r) {
  check_cuda(x, "x");
  check_x(x);
  check_like_x(branch, x, "branch", /*same_dtype=*/true);
  check_like_x(cache, x, "cache", /*same_dtype=*/false);
  check_r(r, x);
  return launch_gated_residual<Mode::kRouted>(x, gate, &branch, cache, &r);
}

at::Tensor forecast_gated_residual_cuda(const at::Tensor& x, const std::optional<at::Tensor>& gate,
                                        const at::Tensor& c0, const std::optional<at::Tensor>& c1,
                                        const std::optional<at::Tensor>& c2, const std::optional<at::Tensor>& coeffs) {
  check_cuda(x, "x");
  check_x(x);
  check_forecast(x, c0, c1, c2, coeffs);
  const History history = history_of(c1, c2, coeffs);
  if (!c1.has_value()) return launch_gated_residual<Mode::kCached>(x, gate, nullptr, c0, nullptr);
  if (!c2.has_value()) return launch_gated_residual<Mode::kForecast1>(x, gate, nullptr, c0, nullptr, history);
  return launch_gated_residual<Mode::kForecast2>(x, gate, nullptr, c0, nullptr, history);
}

// ---- backward ---------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_gated_residual_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& gate, const at::Tensor& branch,
    const at::Tensor& cache, const at::Tensor& r) {
  check_cuda(grad_out, "grad_out");
  check_x(grad_out);
  check_like_x(branch, grad_out, "branch", /*same_dtype=*/true);
  check_like_x(cache, grad_out, "cache", /*same_dtype=*/false);
  check_r(r, grad_out);
  const RowVec g = row_vec(gate, grad_out, "gate");
  const c10::cuda::CUDAGuard guard(grad_out.device());

  at::Tensor grad_branch = at::empty(branch.sizes(), branch.options());
  const int64_t batch = grad_out.size(0), tokens = grad_out.size(1), d = grad_out.size(2);
  if (grad_out.numel() == 0) {
    at::Tensor grad_gate = gate.has_value() ? at::zeros(gate->sizes(), gate->options()) : grad_out.new_empty({0});
    return {grad_branch, grad_gate, at::zeros(r.sizes(), r.options())};
  }
  const bool gate_broadcast = gate.has_value() && gate->size(0) == 1;
  const int64_t gate_rows = gate.has_value() ? gate->size(0) : 0;  // B or 1
  at::Tensor grad_gate =
      gate.has_value() ? at::empty(gate->sizes(), gate->options()) : grad_out.new_empty({0});
  at::Tensor grad_r32 = at::empty(r.sizes(), r.options().dtype(at::kFloat));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(grad_out.get_device());
  const at::TensorOptions f32 = grad_out.options().dtype(at::kFloat);

  dispatch_float(grad_out.scalar_type(), "grad_out", [&](auto s_tag) {
    using S = typename decltype(s_tag)::type;
    dispatch_float(cache.scalar_type(), "cache", [&](auto c_tag) {
      using C = typename decltype(c_tag)::type;
      constexpr int kV = vec_width<S>();
      const S* go_p = static_cast<const S*>(grad_out.data_ptr());
      const S* b_p = static_cast<const S*>(branch.data_ptr());
      const C* c_p = static_cast<const C*>(cache.data_ptr());
      S* gb_p = static_cast<S*>(grad_branch.data_ptr());
      const bool vec_ok = d % kV == 0 && row_vec_ok(g, sizeof(S), kV) && vec_aligned(go_p, sizeof(S), kV) &&
                          vec_aligned(b_p, sizeof(S), kV) && vec_aligned(gb_p, sizeof(S), kV) &&
                          vec_aligned(c_p, sizeof(C), kV);
      auto launch = [&](auto v_const) {
        constexpr int V = decltype(v_const)::value;
        const int64_t d_vec = d / V;
        const int64_t tiles = (d_vec + kBwdTX - 1) / kBwdTX;
        constexpr auto kernel = routed_backward_kernel<S, C, V>;
        // One full wave of resident blocks; each block then streams rows_per_chunk tokens, so
        // the fp32 partials stay small (B * chunks rows of D).
        const int64_t target_blocks = static_cast<int64_t>(sms) * blocks_per_sm<kernel>(kBwdThreads);
        const int64_t max_chunks = std::max<int64_t>(1, (tokens + kBwdTY * kBwdIlp - 1) / (kBwdTY * kBwdIlp));
        int64_t chunks = std::clamp<int64_t>((target_blocks + tiles * batch - 1) / (tiles * batch), 1, max_chunks);
        const int64_t rows_per_chunk = (tokens + chunks - 1) / chunks;
        chunks = (tokens + rows_per_chunk - 1) / rows_per_chunk;
        const int64_t blocks = tiles * batch * chunks;
        TORCH_CHECK(blocks < (int64_t{1} << 31), "harmonica (cuda): problem too large for one launch");

        at::Tensor part_gate = gate.has_value() ? at::empty({batch * chunks, d}, f32) : at::Tensor();
        at::Tensor part_r = at::empty({blocks}, f32);
        float* part_gate_p = gate.has_value() ? part_gate.data_ptr<float>() : nullptr;
        kernel<<<static_cast<unsigned>(blocks), dim3(kBwdTX, kBwdTY), 0, stream>>>(
            go_p, static_cast<const S*>(g.ptr), g.stride, b_p, c_p, r.data_ptr(), r_kind_of(r), gb_p, part_gate_p,
            part_r.data_ptr<float>(), tokens, d_vec, tiles, chunks, rows_per_chunk);
        C10_CUDA_KERNEL_LAUNCH_CHECK();

        const int64_t col_tiles = (d + kBwdTX - 1) / kBwdTX;
        const int64_t gate_blocks = gate.has_value() ? gate_rows * col_tiles : 0;
        const int64_t rows_per_gate = gate_broadcast ? batch * chunks : chunks;
        routed_backward_finalize_kernel<S><<<static_cast<unsigned>(gate_blocks + 1), dim3(kBwdTX, kBwdTY), 0,
                                             stream>>>(
            part_gate_p, rows_per_gate, col_tiles, gate_blocks, d,
            gate.has_value() ? static_cast<S*>(grad_gate.data_ptr()) : nullptr, part_r.data_ptr<float>(), blocks,
            grad_r32.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (vec_ok) {
        launch(std::integral_constant<int, kV>{});
      } else {
        launch(std::integral_constant<int, 1>{});
      }
    });
  });
  at::Tensor grad_r = r.scalar_type() == at::kFloat ? grad_r32 : grad_r32.to(r.scalar_type());
  return {grad_branch, grad_gate, grad_r};
}

// ---- norm + modulate --------------------------------------------------------------------------

// ORDER 0: x_out from y (cache written when given) or, with reuse, from the cache; ORDER 1/2: from the
// forecast of c0 = cache and the history.
template <int ORDER>
std::tuple<at::Tensor, at::Tensor> launch_norm_modulate(const at::Tensor& x, const std::optional<at::Tensor>& gate,
                                                        const std::optional<at::Tensor>& y, const at::Tensor& shift,
                                                        const at::Tensor& scale, double eps,
                                                        const std::optional<at::Tensor>& cache, bool reuse,
                                                        const History& history) {
  const bool write_cache = cache.has_value() && !reuse;
  const RowVec g = row_vec(gate, x, "gate");
  const RowVec sh = row_vec(shift, x, "shift");
  const RowVec sc = row_vec(scale, x, "scale");
  const c10::cuda::CUDAGuard guard(x.device());

  at::Tensor x_out = at::empty(x.sizes(), x.options());
  at::Tensor h = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return {x_out, h};
  const int64_t tokens = x.size(1), d = x.size(2), rows = x.size(0) * tokens;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x.get_device());
  const auto cache_dtype = cache.has_value() ? cache->scalar_type() : x.scalar_type();

  dispatch_float(x.scalar_type(), "x", [&](auto s_tag) {
    using S = typename decltype(s_tag)::type;
    dispatch_float(cache_dtype, "cache", [&](auto c_tag) {
      using C = typename decltype(c_tag)::type;
      constexpr int kV = vec_width<S>();
      const S* x_p = static_cast<const S*>(x.data_ptr());
      const S* y_p = y.has_value() ? static_cast<const S*>(y->data_ptr()) : nullptr;
      const C* c_in = reuse ? static_cast<const C*>(cache->data_ptr()) : nullptr;
      C* c_out = write_cache ? static_cast<C*>(cache->data_ptr()) : nullptr;
      S* xo_p = static_cast<S*>(x_out.data_ptr());
      S* h_p = static_cast<S*>(h.data_ptr());
      const C* c1_p = static_cast<const C*>(history.c1_ptr());
      const C* c2_p = static_cast<const C*>(history.c2_ptr());
      const bool vec_ok = d % kV == 0 && row_vec_ok(g, sizeof(S), kV) && row_vec_ok(sh, sizeof(S), kV) &&
                          row_vec_ok(sc, sizeof(S), kV) && vec_aligned(x_p, sizeof(S), kV) &&
                          vec_aligned(y_p, sizeof(S), kV) && vec_aligned(xo_p, sizeof(S), kV) &&
                          vec_aligned(h_p, sizeof(S), kV) &&
                          vec_aligned(cache.has_value() ? cache->data_ptr() : nullptr, sizeof(C), kV) &&
                          vec_aligned(c1_p, sizeof(C), kV) && vec_aligned(c2_p, sizeof(C), kV);
      auto launch = [&](auto v_const, auto items_const) {
        constexpr int V = decltype(v_const)::value;
        constexpr int ITEMS = decltype(items_const)::value;
        constexpr int64_t kMaxThreads = norm_max_threads<V>();
        const int64_t d_vec = d / V;
        TORCH_CHECK(d_vec <= kMaxThreads * ITEMS, "harmonica (cuda): gated_residual_norm_modulate supports D up to ",
                    std::to_string(kMaxThreads * ITEMS * V), " for this dtype and alignment, got D=",
                    std::to_string(d));
        const int64_t per_thread = (d_vec + ITEMS - 1) / ITEMS;
        const int threads = static_cast<int>(std::clamp<int64_t>((per_thread + 31) / 32 * 32, 32, kMaxThreads));
        constexpr auto kernel = norm_modulate_kernel<S, C, V, ITEMS, ORDER>;
        // Grid-stride over rows with one full wave of resident blocks.
        const int64_t wave = static_cast<int64_t>(sms) * blocks_per_sm<kernel>(threads);
        const int blocks = static_cast<int>(std::min(rows, wave));
        kernel<<<blocks, threads, 0, stream>>>(
            x_p, static_cast<const S*>(g.ptr), g.stride, y_p, c_in, c_out, c1_p, c2_p, history.coeffs_ptr(),
            static_cast<const S*>(sh.ptr), sh.stride, static_cast<const S*>(sc.ptr), sc.stride, xo_p, h_p, rows,
            tokens, d_vec, static_cast<float>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (vec_ok) {
        launch(std::integral_constant<int, kV>{}, std::integral_constant<int, kNormItemsVec>{});
      } else {
        launch(std::integral_constant<int, 1>{}, std::integral_constant<int, kNormItemsScalar>{});
      }
    });
  });
  return {x_out, h};
}

std::tuple<at::Tensor, at::Tensor> gated_residual_norm_modulate_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& y,
    const at::Tensor& shift, const at::Tensor& scale, double eps, const std::optional<at::Tensor>& cache,
    bool reuse) {
  check_cuda(x, "x");
  check_x(x);
  if (reuse) {
    TORCH_CHECK(cache.has_value(), "harmonica: gated_residual_norm_modulate with reuse=True needs a cache");
    TORCH_CHECK(!y.has_value(),
                "harmonica: gated_residual_norm_modulate with reuse=True reads the cache; pass y=None");
  } else {
    TORCH_CHECK(y.has_value(), "harmonica: gated_residual_norm_modulate with reuse=False needs y");
  }
  if (y.has_value()) check_like_x(*y, x, "y", /*same_dtype=*/true);
  if (cache.has_value()) check_like_x(*cache, x, "cache", /*same_dtype=*/false);
  const bool write_cache = cache.has_value() && !reuse;
  if (write_cache) {
    check_no_overlap(*cache, x, "cache", "x");
    check_no_overlap(*cache, *y, "cache", "y");
  }
  return launch_norm_modulate<0>(x, gate, y, shift, scale, eps, cache, reuse, {});
}

std::tuple<at::Tensor, at::Tensor> forecast_residual_norm_modulate_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& gate, const at::Tensor& c0,
    const std::optional<at::Tensor>& c1, const std::optional<at::Tensor>& c2, const std::optional<at::Tensor>& coeffs,
    const at::Tensor& shift, const at::Tensor& scale, double eps) {
  check_cuda(x, "x");
  check_x(x);
  check_forecast(x, c0, c1, c2, coeffs);
  const History history = history_of(c1, c2, coeffs);
  const std::optional<at::Tensor> c0_opt = c0;
  if (!c1.has_value()) return launch_norm_modulate<0>(x, gate, std::nullopt, shift, scale, eps, c0_opt, true, {});
  if (!c2.has_value()) return launch_norm_modulate<1>(x, gate, std::nullopt, shift, scale, eps, c0_opt, true, history);
  return launch_norm_modulate<2>(x, gate, std::nullopt, shift, scale, eps, c0_opt, true, history);
}

}  // namespace
}  // namespace harmonica

// The dispatcher requires every backend's kernel of an op to have the same C++ signature
// (checked when the library loads): keep these in step with csrc/cpu/*.cpp, e.g. the mutated
// cache of gated_residual_update_ is `at::Tensor&` there and here.
TORCH_LIBRARY_IMPL(harmonica, CUDA, m) {
  m.impl("cached_gated_residual", &harmonica::cached_gated_residual_cuda);
  m.impl("gated_residual_update_", &harmonica::gated_residual_update_cuda);
  m.impl("routed_gated_residual", &harmonica::routed_gated_residual_cuda);
  m.impl("routed_gated_residual_backward", &harmonica::routed_gated_residual_backward_cuda);
  m.impl("gated_residual_norm_modulate", &harmonica::gated_residual_norm_modulate_cuda);
  m.impl("forecast_gated_residual", &harmonica::forecast_gated_residual_cuda);
  m.impl("forecast_residual_norm_modulate", &harmonica::forecast_residual_norm_modulate_cuda);
}
