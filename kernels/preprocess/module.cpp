// Python bindings of resample.h (vlv_engine.native._preprocess).  Raw buffers
// only, no torch headers: the Python side (vlv_engine/native) allocates the
// output tensor and passes numpy views of it.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "resample.h"

namespace nb = nanobind;

namespace {

using InArray = nb::ndarray<const uint8_t, nb::device::cpu>;
using AnyArray = nb::ndarray<nb::device::cpu>;

std::vector<vlv::ImageView> views(const std::vector<InArray>& images) {
  std::vector<vlv::ImageView> out;
  out.reserve(images.size());
  for (size_t i = 0; i < images.size(); ++i) {
    const InArray& a = images[i];
    const std::string where = "image " + std::to_string(i) + ": ";
    if (a.ndim() != 3) throw nb::value_error((where + "expected an HWC array (3 dimensions)").c_str());
    const int64_t c = static_cast<int64_t>(a.shape(2));
    if (c != 1 && c != 3 && c != 4) throw nb::value_error((where + "needs 1, 3 or 4 channels").c_str());
    if (a.shape(0) == 0 || a.shape(1) == 0) throw nb::value_error((where + "empty image").c_str());
    if ((c > 1 && a.stride(2) != 1) || a.stride(1) != c || a.stride(0) < static_cast<int64_t>(a.shape(1)) * c)
      throw nb::value_error((where + "pixels must be contiguous within rows (np.ascontiguousarray)").c_str());
    out.push_back({a.data(), static_cast<int>(a.shape(0)), static_cast<int>(a.shape(1)), static_cast<int>(c),
                   static_cast<std::ptrdiff_t>(a.stride(0))});
  }
  return out;
}

bool is_c_contiguous(const AnyArray& a) {
  int64_t expected = 1;
  for (size_t d = a.ndim(); d-- > 0;) {
    if (a.shape(d) != 1 && a.stride(d) != expected) return false;
    expected *= static_cast<int64_t>(a.shape(d));
  }
  return true;
}

vlv::PassOrder pass_order(int order) {
  if (order != 0 && order != 1) throw nb::value_error("order must be 0 (horizontal first) or 1 (Pillow 13)");
  return order == 1 ? vlv::PassOrder::Pillow13 : vlv::PassOrder::HorizontalFirst;
}

void resize_normalize(const std::vector<InArray>& images, AnyArray out, AnyArray lut, int order, int num_threads,
                      bool simd) {
  const vlv::PassOrder pass = pass_order(order);
  const auto in = views(images);
  if (out.ndim() != 4 || out.shape(0) != images.size() || out.shape(1) != 3 || !is_c_contiguous(out))
    throw nb::value_error("out must be a contiguous [B, 3, H, W] array with B = len(images)");
  const size_t bytes = out.itemsize();
  if (bytes != 2 && bytes != 4) throw nb::value_error("out elements must be 2 or 4 bytes");
  if (lut.ndim() != 2 || lut.shape(0) != 3 || lut.shape(1) != 256 || lut.itemsize() != bytes || !is_c_contiguous(lut))
    throw nb::value_error("lut must be a contiguous [3, 256] array with out's element size");
  vlv::BatchOutput target{bytes == 4 ? vlv::OutKind::LUT32 : vlv::OutKind::LUT16, out.data(), lut.data(),
                          static_cast<int>(out.shape(2)), static_cast<int>(out.shape(3))};
  nb::gil_scoped_release release;
  vlv::resize_batch(in, target, num_threads, simd, pass);
}

void resize_u8(const std::vector<InArray>& images, AnyArray out, int order, int num_threads, bool simd) {
  const vlv::PassOrder pass = pass_order(order);
  const auto in = views(images);
  if (out.ndim() != 4 || out.shape(0) != images.size() || out.shape(3) != 3 || out.itemsize() != 1 ||
      !is_c_contiguous(out))
    throw nb::value_error("out must be a contiguous uint8 [B, H, W, 3] array with B = len(images)");
  vlv::BatchOutput target{vlv::OutKind::U8, out.data(), nullptr, static_cast<int>(out.shape(1)),
                          static_cast<int>(out.shape(2))};
  nb::gil_scoped_release release;
  vlv::resize_batch(in, target, num_threads, simd, pass);
}

}  // namespace

NB_MODULE(_preprocess, m) {
  m.doc() = "Batched bicubic resize + normalisation, bit-exact with Pillow (kernels/preprocess).";
  m.def("resize_normalize", &resize_normalize, nb::arg("images"), nb::arg("out"), nb::arg("lut"),
        nb::arg("order"), nb::arg("num_threads"), nb::arg("simd") = true,
        "Resize uint8 HWC images into out [B, 3, H, W] through lut [3, 256] (2- or 4-byte elements).\n"
        "order: 0 = horizontal pass first (Pillow < 13), 1 = Pillow 13's choice of the first pass.");
  m.def("resize_u8", &resize_u8, nb::arg("images"), nb::arg("out"), nb::arg("order"), nb::arg("num_threads"),
        nb::arg("simd") = true, "Resize uint8 HWC images into out uint8 [B, H, W, 3].");
  m.def("simd_level", &vlv::simd_level, "The instruction set the SIMD path uses on this CPU.");
}
