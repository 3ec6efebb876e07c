// Batched bicubic resize + normalisation of uint8 images, bit-exact with Pillow.
//
// Trade-offs: the arithmetic is Pillow's own (double-precision filter weights
// rounded to 22-bit fixed point, int32 accumulation, uint8 clipping between the
// horizontal and the vertical pass), so the result equals
// `Image.resize(size, BICUBIC, reducing_gap=None)` bit for bit rather than to a
// tolerance: every caller of vlv_engine.images gets the same pixels with or
// without the extension, and batch invariance holds trivially.  The price is
// int32 multiplies where a float kernel could use FMAs; SIMD over the channels
// of a pixel (horizontal pass) and over a row (vertical pass) recovers most of it.
// Normalisation is a per-channel 256-entry lookup table computed by the caller,
// so the output dtype (float32 / float16 / bfloat16 bits) is the caller's
// business and matches torch's own casts exactly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace vlv {

// One input image: uint8, rows of `width * channels` bytes, `row_stride` bytes apart.
// channels: 1 (grey, replicated to RGB), 3 (RGB), 4 (RGBA, composited on white
// exactly as Pillow's paste(mask=alpha) does).
struct ImageView {
  const uint8_t* data;
  int height;
  int width;
  int channels;
  std::ptrdiff_t row_stride;
};

// Pillow's fixed-point filter weights for one axis: output position i reads
// `count[i]` inputs starting at `first[i]`, with weights `weight[i * ksize + j]`.
struct AxisCoeffs {
  int in_size = 0;
  int out_size = 0;
  int ksize = 0;
  std::vector<int> first;
  std::vector<int> count;
  std::vector<int32_t> weight;
};

constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow's PRECISION_BITS for 8-bit images

AxisCoeffs bicubic_coeffs(int in_size, int out_size);

// Where the results go.  kind == U8: `out` is [B, H, W, 3] uint8.
// kind == LUT16 / LUT32: `out` is [B, 3, H, W] of 2- or 4-byte elements and
// element (c, value) of `lut` ([3, 256], same element size) is written for each
// resized uint8 value.
enum class OutKind { U8, LUT16, LUT32 };

struct BatchOutput {
  OutKind kind;
  void* out;
  const void* lut;  // null for U8
  int height;
  int width;
};

// Which pass Pillow runs first.  Pillow < 13 always resizes horizontally
// first; Pillow 13 runs the vertical pass first when the height shrinks by more
// than twice as many pixels as the width.  The uint8 rounding between the passes
// makes the order visible in the pixels.
enum class PassOrder { HorizontalFirst, Pillow13 };

// Resizes every image to (height, width) and writes it to slot i of `out`.
// `num_threads` <= 1 runs on the calling thread.  `simd` false forces the
// portable scalar path (same results; used by tests).  Thread-safe, no globals.
void resize_batch(const std::vector<ImageView>& images, const BatchOutput& out, int num_threads, bool simd,
                  PassOrder order);

// "avx2", "sse4.1" or "scalar": what `simd = true` uses on this CPU.
std::string simd_level();

}  // namespace vlv
