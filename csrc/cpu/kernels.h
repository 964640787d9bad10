// Row kernels of the CPU ops, on 8 fp32 lanes (f32x8). ops.cpp includes this file twice: in
// namespace `baseline` for the baseline ISA, and in namespace `avx2` under
// #pragma GCC target("avx2,fma,f16c") with HARMONICA_KERNELS_AVX2 set, so everything here is
// compiled once for each ISA. Hence no include guard and no includes: ops.cpp provides both.
//
// Each Kernels:: entry point runs one task of at::parallel_for (a range of rows or row blocks);
// ops.cpp checks the arguments, allocates the outputs and picks the ISA.

// ---- lane masks and reductions ------------------------------------------------------------------
// Masks are all-ones / all-zeros lanes, computed with shifts rather than vector comparisons: GCC
// scalarises comparisons of vectors wider than the ISA's registers (f32x8 on SSE2).

HARMONICA_INLINE u32x8 select(const u32x8& mask, const u32x8& a, const u32x8& b) { return (mask & a) | (~mask & b); }

// All ones where v, read as a signed 32-bit integer, is negative.
HARMONICA_INLINE u32x8 negative_mask(const u32x8& v) { return std::bit_cast<u32x8>(std::bit_cast<i32x8>(v) >> 31); }

HARMONICA_INLINE u32x8 nan_mask(const f32x8& v) {
  return negative_mask(0x7F800000u - (std::bit_cast<u32x8>(v) & 0x7FFFFFFFu));  // |v| above inf's bits
}

HARMONICA_INLINE float horizontal_sum(const f32x8& v) {
  float total = 0.f;
  for (int l = 0; l < kW; ++l) total += v[l];
  return total;
}

// v with the lanes from n on zeroed: the padded tail chunk of a row must not enter a sum.
HARMONICA_INLINE f32x8 first_lanes(const f32x8& v, int64_t n) {
  if (n >= kW) return v;
  const u32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  return std::bit_cast<f32x8>(std::bit_cast<u32x8>(v) & negative_mask(lane - static_cast<uint32_t>(n)));
}

// ---- loads and stores of 8 elements, converted to / rounded from fp32 ----------------------------
// Rounding is to nearest even, as c10's; NaNs stay NaN (payloads may differ).

HARMONICA_INLINE f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

HARMONICA_INLINE void store8(float* p, const f32x8& v) { std::memcpy(p, &v, sizeof v); }

// 8 16-bit values zero-extended to 32 bits, and back (bits < 2^16).
HARMONICA_INLINE u32x8 load_u16x8(const void* p) {
#if HARMONICA_KERNELS_AVX2
  // One vpmovzxwd; GCC lowers the generic widening below to four instructions.
  return std::bit_cast<u32x8>(_mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))));
#else
  u16x8 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, u32x8);
#endif
}

HARMONICA_INLINE void store_u16x8(void* p, const u32x8& bits) {
  const u16x8 h = __builtin_convertvector(bits, u16x8);
  std::memcpy(p, &h, sizeof h);
}

HARMONICA_INLINE f32x8 load8(const c10::BFloat16* p) { return std::bit_cast<f32x8>(load_u16x8(p) << 16); }

HARMONICA_INLINE void store8(c10::BFloat16* p, const f32x8& v) {
  const u32x8 w = std::bit_cast<u32x8>(v);
  const u32x8 rounded = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
  store_u16x8(p, select(nan_mask(v), u32x8{} + 0x7FC0u, rounded));
}

#if HARMONICA_KERNELS_AVX2
// F16C: one instruction each way.
HARMONICA_INLINE f32x8 load8(const c10::Half* p) {
  return std::bit_cast<f32x8>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

HARMONICA_INLINE void store8(c10::Half* p, const f32x8& v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(std::bit_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT));
}
#else
// Without F16C: the FP16 library's branch-free formulas (as c10 uses), on 8 lanes.
HARMONICA_INLINE f32x8 load8(const c10::Half* p) {
  const u32x8 w = load_u16x8(p) << 16;
  const u32x8 two_w = w + w;
  // Normals and inf/NaN: move the exponent into place and rescale; subnormals: magic subtraction.
  const f32x8 normalized = std::bit_cast<f32x8>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const f32x8 denormalized = std::bit_cast<f32x8>((two_w >> 17) | (126u << 23)) - 0.5f;
  const u32x8 is_subnormal = negative_mask((two_w >> 27) - 1u);  // exponent bits zero
  const u32x8 magnitude = select(is_subnormal, std::bit_cast<u32x8>(denormalized), std::bit_cast<u32x8>(normalized));
  return std::bit_cast<f32x8>((w & 0x80000000u) | magnitude);
}

HARMONICA_INLINE void store8(c10::Half* p, const f32x8& v) {
  const u32x8 w = std::bit_cast<u32x8>(v);
  const u32x8 shl1_w = w + w;
  // Overflow to inf by scaling up, then round by adding a power of two that leaves the fp16
  // mantissa in the low bits of the fp32 sum.
  const f32x8 scaled = (std::bit_cast<f32x8>(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  const u32x8 bias = select(negative_mask((shl1_w >> 24) - 0x71u), u32x8{} + 0x71000000u, shl1_w & 0xFF000000u);
  const u32x8 bits = std::bit_cast<u32x8>(std::bit_cast<f32x8>((bias >> 1) + 0x07800000u) + scaled);
  const u32x8 nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  store_u16x8(p, ((w & 0x80000000u) >> 16) | select(nan_mask(v), u32x8{} + 0x7E00u, nonsign));
}
#endif

// n <= kW elements; a short tail goes through a zero-padded buffer.
template <class T>
HARMONICA_INLINE f32x8 load(const T* p, int64_t n) {
  if (n >= kW) return load8(p);
  T buffer[kW] = {};
  std::copy_n(p, n, buffer);
  return load8(buffer);
}

template <class T>
HARMONICA_INLINE void store(T* p, const f32x8& v, int64_t n) {
  if (n >= kW) return store8(p, v);
  T buffer[kW];
  store8(buffer, v);
  std::copy_n(buffer, n, p);
}

// body(d, n) for the chunks [d, d + n) of a row of D elements: n = kW (a constant, so the tail
// handling folds away) except for a last, shorter chunk. Bodies are HARMONICA_INLINE_LAMBDA: GCC
// would otherwise keep some of them as calls inside the chunk loop.
template <class Body>
HARMONICA_INLINE void for_chunks(int64_t D, const Body& body) {
  int64_t d = 0;
  for (; d + kW <= D; d += kW) body(d, kW);
  if (d < D) body(d, D - d);
}

// torch.lerp(cache, branch, r) with torch's formula, so r = 0 gives the cache and r = 1 the branch
// exactly: base + weight * (branch - cache) with base = cache if |r| < 0.5, else branch.
struct Lerp {
  float weight;
  bool from_branch;
  explicit Lerp(float r) : weight(std::fabs(r) < 0.5f ? r : r - 1.f), from_branch(std::fabs(r) >= 0.5f) {}
  HARMONICA_INLINE f32x8 operator()(const f32x8& cache, const f32x8& branch) const {
    return (from_branch ? branch : cache) + weight * (branch - cache);
  }
};

// Taylor forecast from the history, as the reference: c0 + a (c0 - c1) [+ b ((c0 - c1) - (c1 - c2))].
template <int kOrder>
struct Taylor {
  float a, b;
  HARMONICA_INLINE f32x8 operator()(const f32x8& c0, const f32x8& c1, const f32x8& c2) const {
    const f32x8 first = c0 - c1;
    const f32x8 v = c0 + a * first;
    if constexpr (kOrder == 1) {
      return v;
    } else {
      return v + b * (first - (c1 - c2));
    }
  }
};

// h = LayerNorm(row) * (1 + scale) + shift for the fp32 row x_f whose lanes sum to `sum`; two-pass
// moments (biased variance), as F.layer_norm.
template <class T>
HARMONICA_INLINE void modulate_row(const float* x_f, const f32x8& sum, const T* shift, const T* scale, T* h,
                                   int64_t D, float eps) {
  const float mean = horizontal_sum(sum) / static_cast<float>(D);
  f32x8 squares = {};
  for_chunks(D, [&](int64_t d, int64_t n) HARMONICA_INLINE_LAMBDA {
    const f32x8 centered = load(x_f + d, n) - mean;
    squares += first_lanes(centered * centered, n);
  });
  const float rstd = 1.f / std::sqrt(horizontal_sum(squares) / static_cast<float>(D) + eps);
  for_chunks(D, [&](int64_t d, int64_t n) HARMONICA_INLINE_LAMBDA {
    const f32x8 normed = (load(x_f + d, n) - mean) * rstd;
    store(h + d, normed * (1.f + load(scale + d, n)) + load(shift + d, n), n);
  });
}

// ---- entry points -------------------------------------------------------------------------------

// The row pointers are locals, not reads of `a` in the loop: a store through memcpy may alias
// anything, so GCC would reload every pointer from `a` after each store.
struct Kernels {
  // out = x + gate * value
  template <class T, class V>
  static void gated_residual(const GatedResidualArgs<T, V>& a, int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row * a.D;
      const T *x = a.x + o, *gate = a.gate.row(row / a.N);
      const V* value = a.value + o;
      T* out = a.out + o;
      for_chunks(a.D, [&](int64_t d, int64_t n) HARMONICA_INLINE_LAMBDA {
        store(out + d, load(x + d, n) + load(gate + d, n) * load(value + d, n), n);
      });
    }
  }

  // out = x + gate * branch; cache = branch
  template <class T, class C>
  static void gated_residual_update(const GatedResidualUpdateArgs<T, C>& a, int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row * a.D;
      const T *x = a.x + o, *gate = a.gate.row(row / a.N), *branch = a.branch + o;
      T* out = a.out + o;
      C* cache = a.cache + o;
      for_chunks(a.D, [&](int64_t d, int64_t n) HARMONICA_INLINE_LAMBDA {
        const f32x8 b = load(branch + d, n);
        store(out + d, load(x + d, n) + load(gate + d, n) * b, n);
        store(cache + d, b, n);
      });
    }
  }

  // out = x + gate * lerp(cache, branch, r)
  template <class T, class C>
  static void routed_gated_residual(const RoutedArgs<T, C>& a, int64_t begin, int64_t end) {
    const Lerp lerp(a.r);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row * a.D;
      const T *x = a.x + o, *gate = a.gate.row(row / a.N), *branch = a.branch + o;
      const C* cache = a.cache + o;
      T* out = a.out + o;
      for_chunks(a.D, [&](int64_t d, int64_t n) HARMONICA_INLINE_LAMBDA {
        const f32x8 mixed = lerp(load(cache + d, n), load(branch + d, n));
        store(out + d, load(x + d, n) + load(gate + d, n) * mixed, n);
      });
    }
  }

  // Blocks [begin, end): grad_branch = grad_out * gate * r for the block's rows; the block's sums of
  // grad_out * gate * (branch - cache) (grad_r) and, if kGateGrad, of grad_out * mixed per column
  // (grad_gate) go to partial_r[block] and partial_gate[block, :].
  template <bool kGateGrad, class T, class C>
  static void routed_gated_residual_backward(const RoutedBackwardArgs<T, C>& a, int64_t begin, int64_t end) {
    const Lerp lerp(a.r);
    const float r = a.r;
    std::vector<float> r_acc_buffer(a.D);  // per column, summed in double once per block
    float* r_acc = r_acc_buffer.data();
    for (int64_t block = begin; block < end; ++block) {
      const int64_t sample = block / a.blocks_per_sample;
      const int64_t n0 = (block % a.blocks_per_sample) * a.block_rows;
      const int64_t n1 = std::min(a.N, n0 + a.block_rows);
      const T* gate = a.gate.row(sample);
      float* gate_acc = kGateGrad ? a.partial_gate + block * a.D : nullptr;
      std::fill_n(r_acc, a.D, 0.f);
      if constexpr (kGateGrad) std::fill_n(gate_acc, a.D, 0.f);
      for (int64_t t = n0; t < n1; ++t) {
        const int64_t o = (sample * a.N + t) * a.D;
        const T *grad_out = a.grad_out + o, *branch = a.branch + o;
        const C* cache = a.cache + o;
        T* grad_branch = a.grad_branch + o;
        for_chunks(a.D, [&](int64_t d, int64_t n) HARMONICA_INLINE_LAMBDA {
          const f32x8 g = load(grad_out + d, n);
          const f32x8 b = load(branch + d, n);
          const f32x8 c = load(cache + d, n);
          const f32x8 g_gated = g * load(gate + d, n);
          store(grad_branch + d, g_gated * r, n);
          store(r_acc + d, load(r_acc + d, n) + g_gated * (b - c), n);
          if constexpr (kGateGrad) store(gate_acc + d, load(gate_acc + d, n) + g * lerp(c, b), n);
        });
      }
      double total = 0.0;
      for (int64_t d = 0; d < a.D; ++d) total += r_acc[d];
      a.partial_r[block] = total;
    }
  }

  // x_out = x + gate * value (value = y or the cache), and cache = value unless C is NoCacheWrite;
  // h = LayerNorm(x_out) * (1 + scale) + shift, from the fp32 x_out kept in a row buffer.
  template <class T, class V, class C>
  static void gated_residual_norm_modulate(const NormModulateArgs<T, V, C>& a, int64_t begin, int64_t end) {
    constexpr bool kWriteCache = !std::is_same_v<C, NoCacheWrite>;
    const int64_t D = a.D;
    const float eps = a.eps;
    std::vector<float> row_buffer(D);
    float* x_f = row_buffer.data();
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row * D, sample = row / a.N;
      const T *x = a.x + o, *gate = a.gate.row(sample), *shift = a.shift.row(sample), *scale = a.scale.row(sample);
      const V* value = a.value + o;
      C* cache = kWriteCache ? a.cache + o : nullptr;
      T *x_out = a.x_out + o, *h = a.h + o;
      f32x8 sum = {};
      for_chunks(D, [&](int64_t d, int64_t n) HARMONICA_INLINE_LAMBDA {
        const f32x8 v = load(value + d, n);
        if constexpr (kWriteCache) store(cache + d, v, n);
        const f32x8 s = load(x + d, n) + load(gate + d, n) * v;
        store(x_f + d, s, n);
        store(x_out + d, s, n);
        sum += first_lanes(s, n);
      });
      modulate_row(x_f, sum, shift, scale, h, D, eps);
    }
  }

  // out = x + gate * forecast(c0, c1[, c2])
  template <int kOrder, class T, class C>
  static void forecast_gated_residual(const ForecastArgs<T, C>& a, int64_t begin, int64_t end) {
    const Taylor<kOrder> forecast{a.a, a.b};
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row * a.D;
      const T *x = a.x + o, *gate = a.gate.row(row / a.N);
      const C *c0 = a.c0 + o, *c1 = a.c1 + o, *c2 = kOrder == 2 ? a.c2 + o : nullptr;
      T* out = a.out + o;
      for_chunks(a.D, [&](int64_t d, int64_t n) HARMONICA_INLINE_LAMBDA {
        const f32x8 v = forecast(load(c0 + d, n), load(c1 + d, n), kOrder == 2 ? load(c2 + d, n) : f32x8{});
        store(out + d, load(x + d, n) + load(gate + d, n) * v, n);
      });
    }
  }

  // x_out = x + gate * forecast(c0, c1[, c2]); h = LayerNorm(x_out) * (1 + scale) + shift.
  template <int kOrder, class T, class C>
  static void forecast_residual_norm_modulate(const ForecastNormArgs<T, C>& a, int64_t begin, int64_t end) {
    const Taylor<kOrder> forecast{a.a, a.b};
    const int64_t D = a.D;
    std::vector<float> row_buffer(D);
    float* x_f = row_buffer.data();
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row * D, sample = row / a.N;
      const T *x = a.x + o, *gate = a.gate.row(sample), *shift = a.shift.row(sample), *scale = a.scale.row(sample);
      const C *c0 = a.c0 + o, *c1 = a.c1 + o, *c2 = kOrder == 2 ? a.c2 + o : nullptr;
      T *x_out = a.x_out + o, *h = a.h + o;
      f32x8 sum = {};
      for_chunks(D, [&](int64_t d, int64_t n) HARMONICA_INLINE_LAMBDA {
        const f32x8 v = forecast(load(c0 + d, n), load(c1 + d, n), kOrder == 2 ? load(c2 + d, n) : f32x8{});
        const f32x8 s = load(x + d, n) + load(gate + d, n) * v;
        store(x_f + d, s, n);
        store(x_out + d, s, n);
        sum += first_lanes(s, n);
      });
      modulate_row(x_f, sum, shift, scale, h, D, a.eps);
    }
  }
};
