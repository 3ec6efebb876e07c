// Python bindings of resample_cuda.h (vlv_engine.native._preprocess_cuda), built
// only with VLV_NATIVE_CUDA=ON.  Device memory comes in as raw pointers of torch
// tensors (data_ptr()), the stream as torch.cuda.Stream.cuda_stream: no torch headers.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "resample_cuda.h"

namespace nb = nanobind;

namespace {

using InArray = nb::ndarray<const uint8_t, nb::device::cpu>;

void resize_normalize_cuda(const std::vector<InArray>& images, uintptr_t out_ptr, uintptr_t lut_ptr, int elem_bytes,
                           int height, int width, int order, int device, uintptr_t stream) {
  std::vector<vlv::ImageView> views;
  views.reserve(images.size());
  for (size_t i = 0; i < images.size(); ++i) {
    const InArray& a = images[i];
    const std::string where = "image " + std::to_string(i) + ": ";
    if (a.ndim() != 3) throw nb::value_error((where + "expected an HWC array (3 dimensions)").c_str());
    const int64_t c = static_cast<int64_t>(a.shape(2));
    if (c != 1 && c != 3 && c != 4) throw nb::value_error((where + "needs 1, 3 or 4 channels").c_str());
    if (a.shape(0) == 0 || a.shape(1) == 0) throw nb::value_error((where + "empty image").c_str());
    if ((c > 1 && a.stride(2) != 1) || a.stride(1) != c || a.stride(0) < static_cast<int64_t>(a.shape(1)) * c)
      throw nb::value_error((where + "pixels must be contiguous within rows").c_str());
    views.push_back({a.data(), static_cast<int>(a.shape(0)), static_cast<int>(a.shape(1)), static_cast<int>(c),
                     static_cast<std::ptrdiff_t>(a.stride(0))});
  }
  if (order != 0 && order != 1) throw nb::value_error("order must be 0 or 1");
  nb::gil_scoped_release release;
  vlv::resize_batch_cuda(views, reinterpret_cast<void*>(out_ptr), reinterpret_cast<const void*>(lut_ptr), elem_bytes,
                         height, width, order == 1 ? vlv::PassOrder::Pillow13 : vlv::PassOrder::HorizontalFirst,
                         device, stream);
}

}  // namespace

NB_MODULE(_preprocess_cuda, m) {
  m.doc() = "CUDA batched bicubic resize + normalisation, bit-exact with Pillow (kernels/preprocess).";
  m.def("resize_normalize_cuda", &resize_normalize_cuda, nb::arg("images"), nb::arg("out_ptr"), nb::arg("lut_ptr"),
        nb::arg("elem_bytes"), nb::arg("height"), nb::arg("width"), nb::arg("order"), nb::arg("device"),
        nb::arg("stream"));
}
