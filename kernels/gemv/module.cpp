// Python bindings of int8_linear.h (vlv_engine.native._gemv). Raw buffers only, no
// torch headers: vlv_engine/native/int8_linear.py passes numpy views of torch tensors.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <optional>
#include <string>

#include "int8_linear.h"

namespace nb = nanobind;

namespace {

using F32 = nb::ndarray<float, nb::ndim<2>, nb::device::cpu>;
using CF32 = nb::ndarray<const float, nb::ndim<2>, nb::device::cpu>;
using CI8 = nb::ndarray<const int8_t, nb::ndim<2>, nb::device::cpu, nb::c_contig>;
using CVec = nb::ndarray<const float, nb::ndim<1>, nb::device::cpu, nb::c_contig>;

const char* level_name(vlv::GemvSimd level) {
  switch (level) {
    case vlv::GemvSimd::Avx512: return "avx512";
    case vlv::GemvSimd::Avx2: return "avx2";
    default: return "scalar";
  }
}

// "best": what this CPU runs best; a lower level by name (tests compare them).
vlv::GemvSimd parse_level(const std::string& name) {
  static const vlv::GemvSimd best = vlv::gemv_simd_level();  // every call asks (~170 a decode token)
  if (name == "best") return best;
  for (vlv::GemvSimd level : {vlv::GemvSimd::Scalar, vlv::GemvSimd::Avx2, vlv::GemvSimd::Avx512}) {
    if (name != level_name(level)) continue;
    if (static_cast<int>(level) > static_cast<int>(best))
      throw nb::value_error(("simd='" + name + "': this CPU's best is " + level_name(best)).c_str());
    return level;
  }
  throw nb::value_error(("simd='" + name + "': choose best, avx512, avx2 or scalar").c_str());
}

void int8_linear(CF32 x, CI8 w, CVec scale, std::optional<CVec> bias, F32 y, int num_threads,
                 const std::string& simd) {
  const int64_t rows = static_cast<int64_t>(x.shape(0)), in = static_cast<int64_t>(x.shape(1));
  const int64_t out = static_cast<int64_t>(w.shape(0));
  if (static_cast<int64_t>(w.shape(1)) != in)
    throw nb::value_error(("w has " + std::to_string(w.shape(1)) + " input features, x has " + std::to_string(in)).c_str());
  if (static_cast<int64_t>(scale.shape(0)) != out) throw nb::value_error("scale must have one entry per output row");
  if (bias && static_cast<int64_t>(bias->shape(0)) != out) throw nb::value_error("bias must have one entry per output row");
  if (static_cast<int64_t>(y.shape(0)) != rows || static_cast<int64_t>(y.shape(1)) != out)
    throw nb::value_error("y must be [rows of x, rows of w]");
  if (x.stride(1) != 1 || y.stride(1) != 1) throw nb::value_error("x and y rows must be contiguous");
  const vlv::GemvSimd level = parse_level(simd);
  const float* b = bias ? bias->data() : nullptr;
  nb::gil_scoped_release release;
  vlv::int8_linear(x.data(), rows, x.stride(0), w.data(), scale.data(), b, in, out, y.data(), y.stride(0),
                   num_threads, level);
}

const char* simd_level() { return level_name(vlv::gemv_simd_level()); }

}  // namespace

NB_MODULE(_gemv, m) {
  m.doc() = "Linear layers over int8 weights with per-row scales, float32 activations (kernels/gemv).";
  m.def("int8_linear", &int8_linear, nb::arg("x"), nb::arg("w"), nb::arg("scale"), nb::arg("bias").none(),
        nb::arg("y"), nb::arg("num_threads"), nb::arg("simd") = "best",
        "y[r, o] = scale[o] * dot(x[r], w[o]) + bias[o]; x [R, K] fp32, w [N, K] int8, y [R, N] fp32 (written).");
  m.def("simd_level", &simd_level, "The instruction set the kernel uses on this CPU (avx512, avx2 or scalar).");
}
