// CUDA kernels for resample_cuda.h.  One thread per output pixel and pass, all
// three channels per thread; int32 accumulation exactly as on the CPU
// (resample.cpp), so there is no tolerance between the two.  Trade-off: each
// image is its own sequence of launches (upload, RGB conversion, two passes,
// lookup); batching images into one launch would save launch latency for tiny
// images, but Florence-2 inputs are large enough that the passes dominate.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "resample_cuda.h"

namespace vlv {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(err));
}

__device__ __forceinline__ uint8_t clip8_dev(int32_t v) {
  const int32_t s = v >> kPrecisionBits;
  return static_cast<uint8_t>(s < 0 ? 0 : (s > 255 ? 255 : s));
}

// Any of grey / RGB / RGBA -> packed RGB rows (RGBA composited on white like Pillow's paste).
__global__ void to_rgb_kernel(const uint8_t* __restrict__ src, int64_t row_stride, int channels, int height,
                              int width, uint8_t* __restrict__ dst) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  if (x >= width) return;
  for (int y = blockIdx.y; y < height; y += gridDim.y) {  // gridDim.y is capped at 65535
    const uint8_t* p = src + y * row_stride + static_cast<int64_t>(x) * channels;
    uint8_t* q = dst + (static_cast<int64_t>(y) * width + x) * 3;
    if (channels == 1) {
      q[0] = q[1] = q[2] = p[0];
    } else if (channels == 3) {
      q[0] = p[0]; q[1] = p[1]; q[2] = p[2];
    } else {
      const unsigned a = p[3];
      for (int c = 0; c < 3; ++c) {
        const unsigned t = 255u * (255u - a) + p[c] * a + 128u;
        q[c] = static_cast<uint8_t>(((t >> 8) + t) >> 8);
      }
    }
  }
}

// Horizontal pass: rows [row0, row0 + rows) of `src` ([*, in_w, 3]) -> dst [rows, out_w, 3].
__global__ void horizontal_kernel(const uint8_t* __restrict__ src, int in_w, int row0, int rows, int out_w,
                                  const int* __restrict__ first, const int* __restrict__ count,
                                  const int32_t* __restrict__ weight, int ksize, uint8_t* __restrict__ dst) {
  const int xx = blockIdx.x * blockDim.x + threadIdx.x;
  if (xx >= out_w) return;
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {
    const uint8_t* p = src + (static_cast<int64_t>(row0 + r) * in_w + first[xx]) * 3;
    const int32_t* k = weight + static_cast<int64_t>(xx) * ksize;
    int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
    for (int j = 0; j < count[xx]; ++j) {
      s0 += p[3 * j] * k[j];
      s1 += p[3 * j + 1] * k[j];
      s2 += p[3 * j + 2] * k[j];
    }
    uint8_t* q = dst + (static_cast<int64_t>(r) * out_w + xx) * 3;
    q[0] = clip8_dev(s0);
    q[1] = clip8_dev(s1);
    q[2] = clip8_dev(s2);
  }
}

// Vertical pass: src rows (offset by -row0) [*, w, 3] -> dst [out_h, w, 3]; one thread per byte.
__global__ void vertical_kernel(const uint8_t* __restrict__ src, int w, int row0, int out_h,
                                const int* __restrict__ first, const int* __restrict__ count,
                                const int32_t* __restrict__ weight, int ksize, uint8_t* __restrict__ dst) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;  // byte in the row
  const int n = 3 * w;
  if (i >= n) return;
  for (int y = blockIdx.y; y < out_h; y += gridDim.y) {
    const int32_t* k = weight + static_cast<int64_t>(y) * ksize;
    const uint8_t* p = src + static_cast<int64_t>(first[y] - row0) * n + i;
    int32_t s = 1 << (kPrecisionBits - 1);
    for (int j = 0; j < count[y]; ++j) s += p[static_cast<int64_t>(j) * n] * k[j];
    dst[static_cast<int64_t>(y) * n + i] = clip8_dev(s);
  }
}

// [H, W, 3] uint8 -> [3, H, W] through lut [3, 256].
template <typename T>
__global__ void lut_kernel(const uint8_t* __restrict__ rgb, int64_t pixels, const T* __restrict__ lut,
                           T* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pixels) return;
  out[i] = lut[rgb[3 * i]];
  out[pixels + i] = lut[256 + rgb[3 * i + 1]];
  out[2 * pixels + i] = lut[512 + rgb[3 * i + 2]];
}

struct DeviceCoeffs {
  int* first = nullptr;
  int* count = nullptr;
  int32_t* weight = nullptr;
  int ksize = 0;
};

DeviceCoeffs upload(const AxisCoeffs& c, cudaStream_t stream) {
  DeviceCoeffs d;
  d.ksize = c.ksize;
  check(cudaMallocAsync(&d.first, c.first.size() * sizeof(int), stream), "cudaMallocAsync");
  check(cudaMallocAsync(&d.count, c.count.size() * sizeof(int), stream), "cudaMallocAsync");
  check(cudaMallocAsync(&d.weight, c.weight.size() * sizeof(int32_t), stream), "cudaMallocAsync");
  check(cudaMemcpyAsync(d.first, c.first.data(), c.first.size() * sizeof(int), cudaMemcpyHostToDevice, stream), "copy");
  check(cudaMemcpyAsync(d.count, c.count.data(), c.count.size() * sizeof(int), cudaMemcpyHostToDevice, stream), "copy");
  check(cudaMemcpyAsync(d.weight, c.weight.data(), c.weight.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream),
        "copy");
  return d;
}

void release(DeviceCoeffs& d, cudaStream_t stream) {
  cudaFreeAsync(d.first, stream);
  cudaFreeAsync(d.count, stream);
  cudaFreeAsync(d.weight, stream);
}

unsigned blocks(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

unsigned rows_grid(int rows) { return static_cast<unsigned>(rows < 65535 ? rows : 65535); }

}  // namespace

void resize_batch_cuda(const std::vector<ImageView>& images, void* out, const void* lut, int elem_bytes, int height,
                       int width, PassOrder order, int device, uintptr_t stream_handle) {
  if (elem_bytes != 2 && elem_bytes != 4) throw std::invalid_argument("elem_bytes must be 2 or 4");
  if (height <= 0 || width <= 0) throw std::invalid_argument("output size must be positive");
  check(cudaSetDevice(device), "cudaSetDevice");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  constexpr int kThreads = 256;
  const int64_t pixels = static_cast<int64_t>(height) * width;
  for (size_t i = 0; i < images.size(); ++i) {
    const ImageView& im = images[i];
    const AxisCoeffs hc = bicubic_coeffs(im.width, width);
    const AxisCoeffs vc = bicubic_coeffs(im.height, height);
    const bool need_h = width != im.width;
    const bool need_v = height != im.height;
    const bool vertical_first = order == PassOrder::Pillow13 && need_h && im.height - height > 0 &&
                                im.height - height > (im.width - width) * 2;

    // 1. Upload and convert to RGB rows.
    const size_t src_bytes = static_cast<size_t>(im.row_stride) * (im.height - 1) +
                             static_cast<size_t>(im.width) * im.channels;
    uint8_t *src = nullptr, *rgb = nullptr, *mid = nullptr, *res = nullptr;
    check(cudaMallocAsync(&src, src_bytes, stream), "cudaMallocAsync");
    check(cudaMemcpyAsync(src, im.data, src_bytes, cudaMemcpyHostToDevice, stream), "copy");
    check(cudaMallocAsync(&rgb, static_cast<size_t>(im.height) * im.width * 3, stream), "cudaMallocAsync");
    to_rgb_kernel<<<dim3(blocks(im.width, kThreads), rows_grid(im.height)), kThreads, 0, stream>>>(
        src, im.row_stride, im.channels, im.height, im.width, rgb);

    // 2. The two passes, in Pillow's order; `res` ends as [height, width, 3].
    DeviceCoeffs dh = upload(hc, stream), dv = upload(vc, stream);
    const uint8_t* cur = rgb;
    if (vertical_first) {
      check(cudaMallocAsync(&mid, static_cast<size_t>(height) * im.width * 3, stream), "cudaMallocAsync");
      vertical_kernel<<<dim3(blocks(3LL * im.width, kThreads), rows_grid(height)), kThreads, 0, stream>>>(
          cur, im.width, 0, height, dv.first, dv.count, dv.weight, dv.ksize, mid);
      check(cudaMallocAsync(&res, static_cast<size_t>(pixels) * 3, stream), "cudaMallocAsync");
      horizontal_kernel<<<dim3(blocks(width, kThreads), rows_grid(height)), kThreads, 0, stream>>>(
          mid, im.width, 0, height, width, dh.first, dh.count, dh.weight, dh.ksize, res);
      cur = res;
    } else {
      int row0 = 0;
      if (need_h) {
        row0 = vc.first[0];
        const int rows = vc.first[height - 1] + vc.count[height - 1] - row0;
        check(cudaMallocAsync(&mid, static_cast<size_t>(rows) * width * 3, stream), "cudaMallocAsync");
        horizontal_kernel<<<dim3(blocks(width, kThreads), rows_grid(rows)), kThreads, 0, stream>>>(
            cur, im.width, row0, rows, width, dh.first, dh.count, dh.weight, dh.ksize, mid);
        cur = mid;
      }
      if (need_v) {
        check(cudaMallocAsync(&res, static_cast<size_t>(pixels) * 3, stream), "cudaMallocAsync");
        vertical_kernel<<<dim3(blocks(3LL * width, kThreads), rows_grid(height)), kThreads, 0, stream>>>(
            cur, width, need_h ? row0 : 0, height, dv.first, dv.count, dv.weight, dv.ksize, res);
        cur = res;
      }
    }
    check(cudaGetLastError(), "resample kernels");

    // 3. Normalise through the table into slot i of out.
    char* slot = static_cast<char*>(out) + static_cast<size_t>(i) * 3 * pixels * elem_bytes;
    if (elem_bytes == 4) {
      lut_kernel<uint32_t><<<blocks(pixels, kThreads), kThreads, 0, stream>>>(
          cur, pixels, static_cast<const uint32_t*>(lut), reinterpret_cast<uint32_t*>(slot));
    } else {
      lut_kernel<uint16_t><<<blocks(pixels, kThreads), kThreads, 0, stream>>>(
          cur, pixels, static_cast<const uint16_t*>(lut), reinterpret_cast<uint16_t*>(slot));
    }
    check(cudaGetLastError(), "lut kernel");
    release(dh, stream);
    release(dv, stream);
    cudaFreeAsync(src, stream);
    cudaFreeAsync(rgb, stream);
    if (mid) cudaFreeAsync(mid, stream);
    if (res) cudaFreeAsync(res, stream);
  }
  // The host vectors of coefficients went out of scope above; cudaMemcpyAsync from
  // pageable memory has staged them before returning, so no synchronisation is
  // needed for them.  The images are staged the same way.
}

}  // namespace vlv
