// CUDA version of resample.h's resize_batch with lookup-table output: the same
// fixed-point arithmetic (weights from bicubic_coeffs, computed on the host), so
// the GPU result equals the CPU one and Pillow's bit for bit.
#pragma once

#include <cstdint>
#include <vector>

#include "resample.h"

namespace vlv {

// Writes images[i], resized to (height, width), through `lut` ([3, 256] elements
// of `elem_bytes` = 2 or 4, device memory) into `out` ([B, 3, height, width],
// device memory), on `stream` (a cudaStream_t; 0 is the legacy default stream).
// Host images are copied to the device inside; returns when they may be freed.
void resize_batch_cuda(const std::vector<ImageView>& images, void* out, const void* lut, int elem_bytes, int height,
                       int width, PassOrder order, int device, uintptr_t stream);

}  // namespace vlv
