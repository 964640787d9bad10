// Argument checks shared by the CPU and CUDA kernels. The Python layer validates first with
// friendlier messages; these keep direct `torch.ops.harmonica.*` callers memory-safe.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <optional>
#include <string>
#include <utility>

namespace harmonica {

// Error messages spell numbers with std::to_string (and shapes with shape_of) instead of streaming
// integers into TORCH_CHECK: on the H100 machine (torch 2.11 wheel, this extension built there with
// /opt/gcc, C++20) a message that streamed an integer or a shape crashed the process instead of
// raising; strings, dtypes and devices stream fine. shape_of(t) is "[2, 5, 24]".
inline std::string shape_of(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(t.size(i));
  }
  return out + "]";
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// x: [B, N, D] contiguous, fp32/fp16/bf16.
inline void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3, "harmonica: x must be [B, N, D], got shape ", shape_of(x));
  TORCH_CHECK(is_supported_float(x.scalar_type()), "harmonica: x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "harmonica: x must be contiguous");
}

// A tensor of x's shape and device, contiguous. `same_dtype` for activations (branch/y);
// a cache may be stored in any supported float dtype.
inline void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* name, bool same_dtype) {
  TORCH_CHECK(t.sizes() == x.sizes(), "harmonica: ", name, " must have x's shape ", shape_of(x), ", got ",
              shape_of(t));
  TORCH_CHECK(t.device() == x.device(), "harmonica: ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.is_contiguous(), "harmonica: ", name, " must be contiguous");
  if (same_dtype) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "harmonica: ", name, " has dtype ", t.scalar_type(),
                " but x has ", x.scalar_type());
  } else {
    TORCH_CHECK(is_supported_float(t.scalar_type()), "harmonica: ", name,
                " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// A per-sample row vector (gate, shift, scale): [B, D] or [B, 1, D] with B equal to x's batch or 1,
// x's dtype and device, unit stride along D. Returns the stride between samples in elements
// (0 when broadcast over the batch). Strided views from chunk() pass without a copy.
inline int64_t row_vector_batch_stride(const at::Tensor& v, const at::Tensor& x, const char* name) {
  const int64_t B = x.size(0), D = x.size(2);
  const bool ok_shape = (v.dim() == 2 && v.size(1) == D) || (v.dim() == 3 && v.size(1) == 1 && v.size(2) == D);
  TORCH_CHECK(ok_shape && (v.size(0) == B || v.size(0) == 1), "harmonica: ", name, " must be [B, D] or [B, 1, D] with B=",
              std::to_string(B), " (or 1) and D=", std::to_string(D), ", got ", shape_of(v));
  TORCH_CHECK(v.device() == x.device(), "harmonica: ", name, " is on ", v.device(), " but x is on ", x.device());
  TORCH_CHECK(v.scalar_type() == x.scalar_type(), "harmonica: ", name, " has dtype ", v.scalar_type(),
              " but x has ", x.scalar_type());
  TORCH_CHECK(v.stride(-1) == 1, "harmonica: ", name, " must have unit stride along D");
  return v.size(0) == 1 ? 0 : v.stride(0);
}

// The routing weight r: one element, floating, on x's device.
inline void check_r(const at::Tensor& r, const at::Tensor& x) {
  TORCH_CHECK(r.numel() == 1, "harmonica: r must hold exactly one element, got shape ", shape_of(r));
  TORCH_CHECK(is_supported_float(r.scalar_type()) || r.scalar_type() == at::kDouble,
              "harmonica: r must be a floating tensor, got ", r.scalar_type());
  TORCH_CHECK(r.device() == x.device(), "harmonica: r is on ", r.device(), " but x is on ", x.device());
}

// A tensor written in place must not share memory with what is read.
inline void check_no_overlap(const at::Tensor& written, const at::Tensor& read, const char* wname,
                             const char* rname) {
  TORCH_CHECK(at::get_overlap_status(written, read) == at::MemOverlapStatus::No, "harmonica: ", wname,
              " shares memory with ", rname, "; pass a separate buffer (e.g. ", rname, ".clone())");
}

// The history of a forecast read: c0 (and c1, c2 when given) of x's shape and device, contiguous,
// one float dtype for all three, none sharing memory with x; c2 only with c1; coeffs (when c1 is
// given) an fp32 [2] contiguous tensor on x's device.
inline void check_forecast(const at::Tensor& x, const at::Tensor& c0, const std::optional<at::Tensor>& c1,
                           const std::optional<at::Tensor>& c2, const std::optional<at::Tensor>& coeffs) {
  TORCH_CHECK(c1.has_value() || !c2.has_value(),
              "harmonica: c2 given without c1: a second-order forecast needs c0, c1 and c2");
  const std::pair<const char*, const at::Tensor*> history[] = {
      {"c0", &c0}, {"c1", c1 ? &*c1 : nullptr}, {"c2", c2 ? &*c2 : nullptr}};
  for (const auto& [name, c] : history) {
    if (c == nullptr) continue;
    check_like_x(*c, x, name, /*same_dtype=*/false);
    TORCH_CHECK(c->scalar_type() == c0.scalar_type(), "harmonica: ", name, " has dtype ", c->scalar_type(),
                " but c0 has ", c0.scalar_type(), "; store the history in one dtype");
    TORCH_CHECK(at::get_overlap_status(*c, x) == at::MemOverlapStatus::No, "harmonica: ", name,
                " shares memory with x; the history holds the unit's cached outputs");
  }
  if (!c1.has_value()) return;
  TORCH_CHECK(coeffs.has_value(), "harmonica: coeffs (a, b) is required for a forecast of order 1 or 2");
  TORCH_CHECK(coeffs->dim() == 1 && coeffs->size(0) == 2, "harmonica: coeffs must have shape [2] (a, b), got ",
              shape_of(*coeffs));
  TORCH_CHECK(coeffs->scalar_type() == at::kFloat, "harmonica: coeffs must be float32, got ",
              coeffs->scalar_type());
  TORCH_CHECK(coeffs->device() == x.device(), "harmonica: coeffs is on ", coeffs->device(), " but x is on ",
              x.device());
  TORCH_CHECK(coeffs->is_contiguous(), "harmonica: coeffs must be contiguous");
}

}  // namespace harmonica
