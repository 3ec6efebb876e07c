// CPU implementation of resample.h.  Pillow's algorithm (libImaging/Resample.c):
// weights in double, rounded to fixed point, horizontal pass into uint8 rows,
// vertical pass into the output; everything here must stay bit-exact with it.
// Built with -ffp-contract=off: a fused multiply-add in the weight computation
// would change a rounding and, now and then, an output pixel.
#include "resample.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#define VLV_X86 1
#include <immintrin.h>
#endif

namespace vlv {
namespace {

double bicubic_filter(double x) {
  // Pillow's bicubic_filter, a = -0.5; same expression order.
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

inline uint8_t clip8(int32_t v) {
  // Pillow's clip8 lookup table, as arithmetic: v >> 22 clamped to [0, 255].
  const int32_t s = v >> kPrecisionBits;
  return static_cast<uint8_t>(s < 0 ? 0 : (s > 255 ? 255 : s));
}

// Padding after every scratch row: SIMD loads and stores may run this far past
// the last pixel.
constexpr int kPad = 32;

}  // namespace

AxisCoeffs bicubic_coeffs(int in_size, int out_size) {
  if (in_size <= 0 || out_size <= 0) throw std::invalid_argument("resample sizes must be positive");
  const double support_base = 2.0;  // BICUBIC.support
  const float in0 = 0.0f, in1 = static_cast<float>(in_size);
  double scale = static_cast<double>(in1 - in0) / out_size;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = support_base * filterscale;
  AxisCoeffs c;
  c.in_size = in_size;
  c.out_size = out_size;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.first.resize(out_size);
  c.count.resize(out_size);
  c.weight.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> k(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int x = 0; x < xmax; ++x) {
      const double w = bicubic_filter((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; ++x) {
      if (ww != 0.0) k[x] /= ww;
    }
    int32_t* out = &c.weight[static_cast<size_t>(xx) * c.ksize];
    for (int x = 0; x < xmax; ++x) {
      // normalize_coeffs_8bpc
      out[x] = k[x] < 0 ? static_cast<int32_t>(-0.5 + k[x] * (1 << kPrecisionBits))
                        : static_cast<int32_t>(0.5 + k[x] * (1 << kPrecisionBits));
    }
    c.first[xx] = xmin;
    c.count[xx] = xmax;
  }
  return c;
}

namespace {

// ---------------------------------------------------------------- row kernels

// RGBA -> RGB on white, Pillow's paste(mask=alpha): DIV255(255 * (255 - a) + c * a).
void composite_row(const uint8_t* src, int width, uint8_t* dst) {
  for (int x = 0; x < width; ++x) {
    const unsigned a = src[4 * x + 3];
    for (int ch = 0; ch < 3; ++ch) {
      const unsigned t = 255u * (255u - a) + src[4 * x + ch] * a + 128u;
      dst[3 * x + ch] = static_cast<uint8_t>(((t >> 8) + t) >> 8);
    }
  }
}

void grey_to_rgb_row(const uint8_t* src, int width, uint8_t* dst) {
  for (int x = 0; x < width; ++x) dst[3 * x] = dst[3 * x + 1] = dst[3 * x + 2] = src[x];
}

// Horizontal pass of one RGB row (width_in pixels) into `dst` (c.out_size RGB pixels).
void horizontal_scalar(const uint8_t* src, const AxisCoeffs& c, uint8_t* dst) {
  for (int xx = 0; xx < c.out_size; ++xx) {
    const uint8_t* p = src + 3 * c.first[xx];
    const int32_t* k = &c.weight[static_cast<size_t>(xx) * c.ksize];
    int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
    for (int j = 0; j < c.count[xx]; ++j) {
      s0 += p[3 * j] * k[j];
      s1 += p[3 * j + 1] * k[j];
      s2 += p[3 * j + 2] * k[j];
    }
    dst[3 * xx] = clip8(s0);
    dst[3 * xx + 1] = clip8(s1);
    dst[3 * xx + 2] = clip8(s2);
  }
}

// One grey row straight to RGB: the three channels of Pillow's L -> RGB are equal.
void horizontal_grey(const uint8_t* src, const AxisCoeffs& c, uint8_t* dst) {
  for (int xx = 0; xx < c.out_size; ++xx) {
    const uint8_t* p = src + c.first[xx];
    const int32_t* k = &c.weight[static_cast<size_t>(xx) * c.ksize];
    int32_t s = 1 << (kPrecisionBits - 1);
    for (int j = 0; j < c.count[xx]; ++j) s += p[j] * k[j];
    dst[3 * xx] = dst[3 * xx + 1] = dst[3 * xx + 2] = clip8(s);
  }
}

// Vertical pass: out[i] = clip8(sum_j rows[j][i] * k[j]) for i < n bytes.
void vertical_scalar(const uint8_t* const* rows, const int32_t* k, int taps, int n, uint8_t* out) {
  for (int i = 0; i < n; ++i) {
    int32_t s = 1 << (kPrecisionBits - 1);
    for (int j = 0; j < taps; ++j) s += rows[j][i] * k[j];
    out[i] = clip8(s);
  }
}

#ifdef VLV_X86
// A pixel's three channels in three int32 lanes (the fourth lane reads the next
// byte and is never stored): one multiply per tap instead of three.  `src` must
// be readable one byte past its last pixel.
__attribute__((target("sse4.1"))) void horizontal_sse41(const uint8_t* src, const AxisCoeffs& c, uint8_t* dst) {
  const __m128i half = _mm_set1_epi32(1 << (kPrecisionBits - 1));
  for (int xx = 0; xx < c.out_size; ++xx) {
    const uint8_t* p = src + 3 * c.first[xx];
    const int32_t* k = &c.weight[static_cast<size_t>(xx) * c.ksize];
    const int n = c.count[xx];
    __m128i acc0 = half, acc1 = _mm_setzero_si128();
    int j = 0;
    for (; j + 1 < n; j += 2) {  // two chains hide the multiply latency
      int32_t a, b;
      std::memcpy(&a, p + 3 * j, 4);
      std::memcpy(&b, p + 3 * j + 3, 4);
      const __m128i pa = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(a));  // [r, g, b, x]
      const __m128i pb = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(b));
      acc0 = _mm_add_epi32(acc0, _mm_mullo_epi32(pa, _mm_set1_epi32(k[j])));
      acc1 = _mm_add_epi32(acc1, _mm_mullo_epi32(pb, _mm_set1_epi32(k[j + 1])));
    }
    if (j < n) {
      int32_t a;
      std::memcpy(&a, p + 3 * j, 4);
      acc0 = _mm_add_epi32(acc0, _mm_mullo_epi32(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(a)), _mm_set1_epi32(k[j])));
    }
    __m128i v = _mm_srai_epi32(_mm_add_epi32(acc0, acc1), kPrecisionBits);
    v = _mm_packus_epi16(_mm_packs_epi32(v, v), v);  // saturating = clip8
    const int32_t px = _mm_cvtsi128_si32(v);
    std::memcpy(dst + 3 * xx, &px, 4);  // the 4th byte is overwritten by the next pixel / padding
  }
}

// Two taps per 256-bit register: lanes [r, g, b, x] of tap j and of tap j + 1.
// Reads up to two bytes past a row's last pixel.
__attribute__((target("avx2"))) void horizontal_avx2(const uint8_t* src, const AxisCoeffs& c, uint8_t* dst) {
  const __m128i spread = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i dup = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  for (int xx = 0; xx < c.out_size; ++xx) {
    const uint8_t* p = src + 3 * c.first[xx];
    const int32_t* k = &c.weight[static_cast<size_t>(xx) * c.ksize];
    const int n = c.count[xx];
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    int j = 0;
    for (; j + 3 < n; j += 4) {
      const __m128i pa = _mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 3 * j)), spread);
      const __m128i pb = _mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 3 * j + 6)), spread);
      const __m256i ka = _mm256_permutevar8x32_epi32(
          _mm256_castsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(k + j))), dup);
      const __m256i kb = _mm256_permutevar8x32_epi32(
          _mm256_castsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(k + j + 2))), dup);
      acc0 = _mm256_add_epi32(acc0, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(pa), ka));
      acc1 = _mm256_add_epi32(acc1, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(pb), kb));
    }
    acc0 = _mm256_add_epi32(acc0, acc1);
    __m128i acc = _mm_add_epi32(_mm256_castsi256_si128(acc0), _mm256_extracti128_si256(acc0, 1));
    acc = _mm_add_epi32(acc, _mm_set1_epi32(1 << (kPrecisionBits - 1)));
    for (; j < n; ++j) {
      int32_t a;
      std::memcpy(&a, p + 3 * j, 4);
      acc = _mm_add_epi32(acc, _mm_mullo_epi32(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(a)), _mm_set1_epi32(k[j])));
    }
    __m128i v = _mm_srai_epi32(acc, kPrecisionBits);
    v = _mm_packus_epi16(_mm_packs_epi32(v, v), v);
    const int32_t px = _mm_cvtsi128_si32(v);
    std::memcpy(dst + 3 * xx, &px, 4);
  }
}

__attribute__((target("avx2"))) void vertical_avx2(const uint8_t* const* rows, const int32_t* k, int taps, int n,
                                                   uint8_t* out) {
  const __m256i half = _mm256_set1_epi32(1 << (kPrecisionBits - 1));
  int i = 0;
  for (; i + 32 <= n; i += 32) {  // 32 bytes: four 8-lane int32 accumulators
    __m256i a0 = half, a1 = half, a2 = half, a3 = half;
    for (int j = 0; j < taps; ++j) {
      const __m256i w = _mm256_set1_epi32(k[j]);
      const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[j] + i));
      const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[j] + i + 16));
      a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(lo), w));
      a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), w));
      a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(hi), w));
      a3 = _mm256_add_epi32(a3, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), w));
    }
    // packs work per 128-bit lane: reorder the 64-bit quarters afterwards.
    const __m256i s01 = _mm256_packs_epi32(_mm256_srai_epi32(a0, kPrecisionBits), _mm256_srai_epi32(a1, kPrecisionBits));
    const __m256i s23 = _mm256_packs_epi32(_mm256_srai_epi32(a2, kPrecisionBits), _mm256_srai_epi32(a3, kPrecisionBits));
    const __m256i b = _mm256_packus_epi16(s01, s23);
    const __m256i ordered = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), ordered);
  }
  for (; i < n; ++i) {
    int32_t s = 1 << (kPrecisionBits - 1);
    for (int j = 0; j < taps; ++j) s += rows[j][i] * k[j];
    out[i] = clip8(s);
  }
}
#endif

enum class Simd { Scalar, Sse41, Avx2 };

Simd detect_simd() {
#ifdef VLV_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) return Simd::Avx2;
  if (__builtin_cpu_supports("sse4.1")) return Simd::Sse41;
#endif
  return Simd::Scalar;
}

// ---------------------------------------------------------------- batch driver

struct Plan {
  const AxisCoeffs* h;
  const AxisCoeffs* v;
};

struct Task {
  int image;
  int y0, y1;  // output rows
  double cost;
};

struct Scratch {
  std::vector<uint8_t> rows;  // horizontally resized rows (stride: out width * 3 + kPad)
  std::vector<uint8_t> conv;  // one input row as RGB, padded
  std::vector<uint8_t> line;  // one output row (LUT outputs)
  std::vector<const uint8_t*> ptrs;
};

class Runner {
 public:
  Runner(const std::vector<ImageView>& images, const BatchOutput& out, Simd simd, PassOrder order)
      : images_(images), out_(out), simd_(simd), order_(order) {}

  void plan(int num_threads) {
    plans_.resize(images_.size());
    for (size_t i = 0; i < images_.size(); ++i) {
      plans_[i] = {&coeffs(images_[i].width, out_.width), &coeffs(images_[i].height, out_.height)};
    }
    // Few images: split each into stripes of output rows so that every thread
    // has work (the input rows where stripes meet are resized twice).
    const int n = static_cast<int>(images_.size());
    int stripes = n >= 2 * num_threads ? 1 : (2 * num_threads + n - 1) / std::max(n, 1);
    stripes = std::max(1, std::min(stripes, out_.height));
    for (int i = 0; i < n; ++i) {
      const double cost = static_cast<double>(images_[i].height) * images_[i].width + 1.0;
      for (int s = 0; s < stripes; ++s) {
        const int y0 = static_cast<int>(static_cast<long long>(out_.height) * s / stripes);
        const int y1 = static_cast<int>(static_cast<long long>(out_.height) * (s + 1) / stripes);
        if (y1 > y0) tasks_.push_back({i, y0, y1, cost / stripes});
      }
    }
    // Largest first: the long tasks start early and the short ones fill the gaps.
    std::stable_sort(tasks_.begin(), tasks_.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  }

  void run(int num_threads) {
    const int threads = std::max(1, std::min<int>(num_threads, static_cast<int>(tasks_.size())));
    if (threads == 1) {
      work();
    } else {
      std::vector<std::thread> pool;
      pool.reserve(threads - 1);
      for (int t = 1; t < threads; ++t) pool.emplace_back([this] { work(); });
      work();
      for (auto& th : pool) th.join();
    }
    if (error_) std::rethrow_exception(error_);
  }

 private:
  const AxisCoeffs& coeffs(int in, int out) {
    auto key = std::make_pair(in, out);
    auto it = cache_.find(key);
    if (it == cache_.end()) it = cache_.emplace(key, bicubic_coeffs(in, out)).first;
    return it->second;
  }

  void work() {
    Scratch s;
    try {
      for (;;) {
        const size_t t = next_.fetch_add(1);
        if (t >= tasks_.size() || failed_.load()) return;
        stripe(tasks_[t], s);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
      failed_ = true;
    }
  }

  // One image, output rows [y0, y1).
  void stripe(const Task& task, Scratch& s) {
    const ImageView& im = images_[task.image];
    const Plan& p = plans_[task.image];
    const bool need_h = out_.width != im.width;
    const bool need_v = out_.height != im.height;
    // Pillow 13 runs the vertical pass first when the height shrinks by more
    // than twice as many pixels as the width; earlier versions never do.
    const bool vertical_first = order_ == PassOrder::Pillow13 && need_h && im.height - out_.height > 0 &&
                                im.height - out_.height > (im.width - out_.width) * 2;
    if (vertical_first) stripe_vertical_first(task, im, *p.h, *p.v, s);
    else stripe_horizontal_first(task, im, *p.h, *p.v, need_h, need_v, s);
  }

  // Input rows r0..r1 as RGB row pointers: the image's own rows when it is RGB,
  // else converted into s.rows.
  void rgb_rows(const ImageView& im, int r0, int r1, Scratch& s) {
    const size_t stride = 3 * static_cast<size_t>(im.width) + kPad;
    s.ptrs.resize(r1 - r0);
    if (im.channels != 3) s.rows.resize(stride * (r1 - r0));
    for (int r = r0; r < r1; ++r) {
      const uint8_t* src = im.data + static_cast<std::ptrdiff_t>(r) * im.row_stride;
      if (im.channels == 3) {
        s.ptrs[r - r0] = src;
        continue;
      }
      uint8_t* dst = s.rows.data() + stride * (r - r0);
      if (im.channels == 1) grey_to_rgb_row(src, im.width, dst);
      else composite_row(src, im.width, dst);
      s.ptrs[r - r0] = dst;
    }
  }

  void stripe_vertical_first(const Task& task, const ImageView& im, const AxisCoeffs& hc, const AxisCoeffs& vc,
                             Scratch& s) {
    const int r0 = vc.first[task.y0];
    const int r1 = vc.first[task.y1 - 1] + vc.count[task.y1 - 1];
    rgb_rows(im, r0, r1, s);
    s.conv.resize(3 * static_cast<size_t>(im.width) + kPad);  // one vertically resized row (padded)
    s.line.resize(3 * static_cast<size_t>(out_.width) + kPad);
    for (int y = task.y0; y < task.y1; ++y) {
      const int32_t* k = &vc.weight[static_cast<size_t>(y) * vc.ksize];
      vertical(&s.ptrs[vc.first[y] - r0], k, vc.count[y], 3 * im.width, s.conv.data());
      horizontal(s.conv.data(), hc, s.line.data());
      emit(task.image, y, s.line.data());
    }
  }

  void stripe_horizontal_first(const Task& task, const ImageView& im, const AxisCoeffs& hc, const AxisCoeffs& vc,
                               bool need_h, bool need_v, Scratch& s) {
    const int row_bytes = 3 * out_.width;
    const size_t stride = static_cast<size_t>(row_bytes) + kPad;
    // Input rows this stripe reads.
    const int r0 = vc.first[task.y0];
    const int r1 = vc.first[task.y1 - 1] + vc.count[task.y1 - 1];

    // s.ptrs[r - r0]: input row r, horizontally resized, as RGB.
    if (!need_h) {
      rgb_rows(im, r0, r1, s);
    } else {
      s.ptrs.resize(r1 - r0);
      s.rows.resize(stride * (r1 - r0));
      s.conv.resize(3 * static_cast<size_t>(im.width) + kPad);
      for (int r = r0; r < r1; ++r) {
        const uint8_t* src = im.data + static_cast<std::ptrdiff_t>(r) * im.row_stride;
        uint8_t* dst = s.rows.data() + stride * (r - r0);
        s.ptrs[r - r0] = dst;
        if (im.channels == 1) {
          horizontal_grey(src, hc, dst);
          continue;
        }
        const uint8_t* rgb = src;
        if (im.channels == 4) {
          composite_row(src, im.width, s.conv.data());
          rgb = s.conv.data();
        } else if (r == im.height - 1 && simd_ != Simd::Scalar) {
          // The SIMD passes read up to two bytes past a row's last pixel; past
          // the last row of the image those bytes are not ours to read.
          std::memcpy(s.conv.data(), src, 3 * static_cast<size_t>(im.width));
          rgb = s.conv.data();
        }
        horizontal(rgb, hc, dst);
      }
    }

    s.line.resize(stride);
    for (int y = task.y0; y < task.y1; ++y) {
      if (!need_v) {  // the horizontally resized row is the output row
        emit(task.image, y, s.ptrs[y - r0]);
        continue;
      }
      const int32_t* k = &vc.weight[static_cast<size_t>(y) * vc.ksize];
      vertical(&s.ptrs[vc.first[y] - r0], k, vc.count[y], row_bytes, s.line.data());
      emit(task.image, y, s.line.data());
    }
  }

  // Output row y of image `image` from its RGB bytes.
  void emit(int image, int y, const uint8_t* line) const {
    if (out_.kind == OutKind::U8) std::memcpy(u8_row(image, y), line, 3 * static_cast<size_t>(out_.width));
    else if (out_.kind == OutKind::LUT32) scatter<uint32_t>(image, y, line);
    else scatter<uint16_t>(image, y, line);
  }

  void horizontal(const uint8_t* src, const AxisCoeffs& hc, uint8_t* dst) const {
#ifdef VLV_X86
    if (simd_ == Simd::Avx2) return horizontal_avx2(src, hc, dst);
    if (simd_ == Simd::Sse41) return horizontal_sse41(src, hc, dst);
#endif
    horizontal_scalar(src, hc, dst);
  }

  void vertical(const uint8_t* const* rows, const int32_t* k, int taps, int n, uint8_t* out) const {
#ifdef VLV_X86
    if (simd_ == Simd::Avx2) return vertical_avx2(rows, k, taps, n, out);
#endif
    vertical_scalar(rows, k, taps, n, out);
  }

  uint8_t* u8_row(int image, int y) const {
    const size_t row = static_cast<size_t>(image) * out_.height + y;
    return static_cast<uint8_t*>(out_.out) + row * 3 * out_.width;
  }

  // One RGB row -> three planes of the [B, 3, H, W] output through the table.
  template <typename T>
  void scatter(int image, int y, const uint8_t* line) const {
    const T* lut = static_cast<const T*>(out_.lut);  // [3, 256]
    const size_t plane = static_cast<size_t>(out_.height) * out_.width;
    T* base = static_cast<T*>(out_.out) + static_cast<size_t>(image) * 3 * plane + static_cast<size_t>(y) * out_.width;
    T* r = base;
    T* g = base + plane;
    T* b = base + 2 * plane;
    for (int x = 0; x < out_.width; ++x) {
      r[x] = lut[line[3 * x]];
      g[x] = lut[256 + line[3 * x + 1]];
      b[x] = lut[512 + line[3 * x + 2]];
    }
  }

  const std::vector<ImageView>& images_;
  const BatchOutput& out_;
  const Simd simd_;
  const PassOrder order_;
  std::map<std::pair<int, int>, AxisCoeffs> cache_;
  std::vector<Plan> plans_;
  std::vector<Task> tasks_;
  std::atomic<size_t> next_{0};
  std::atomic<bool> failed_{false};
  std::mutex mu_;
  std::exception_ptr error_;
};

}  // namespace

void resize_batch(const std::vector<ImageView>& images, const BatchOutput& out, int num_threads, bool simd,
                  PassOrder order) {
  if (out.height <= 0 || out.width <= 0) throw std::invalid_argument("output size must be positive");
  for (size_t i = 0; i < images.size(); ++i) {
    const ImageView& im = images[i];
    if (im.height <= 0 || im.width <= 0) throw std::invalid_argument("image " + std::to_string(i) + ": empty image");
    if (im.channels != 1 && im.channels != 3 && im.channels != 4)
      throw std::invalid_argument("image " + std::to_string(i) + ": needs 1, 3 or 4 channels");
  }
  if ((out.kind != OutKind::U8) && out.lut == nullptr) throw std::invalid_argument("lookup table missing");
  if (images.empty()) return;
  Runner runner(images, out, simd ? detect_simd() : Simd::Scalar, order);
  runner.plan(std::max(1, num_threads));
  runner.run(std::max(1, num_threads));
}

std::string simd_level() {
  switch (detect_simd()) {
    case Simd::Avx2: return "avx2";
    case Simd::Sse41: return "sse4.1";
    default: return "scalar";
  }
}

}  // namespace vlv
