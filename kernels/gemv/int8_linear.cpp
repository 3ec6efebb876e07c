#include "int8_linear.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <sched.h>

namespace vlv {
namespace {

// ----------------------------------------------------------------------------- kernels

// One output row `o` for R input rows: dot products of w[o, :] with x[r, :].
template <int R>
void rows_scalar(const float* x, int64_t x_stride, const int8_t* wrow, int64_t in, float* acc) {
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
  for (int64_t i = 0; i < in; ++i) {
    const float wi = static_cast<float>(wrow[i]);
    for (int r = 0; r < R; ++r) acc[r] += x[r * x_stride + i] * wi;
  }
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline __m256 widen8(const int8_t* p) {
  // 8 int8 -> 8 int32 -> 8 float, in registers.
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

// Software prefetch distance (bytes) along a weight row. The hardware prefetcher stops at
// each 4 KB page and ramps up again; asking 2 KB ahead kept long rows (down_proj, 4.75 KB
// per row) and the small q/k/v products streaming: measured on the 2-core EPYC, down_proj
// went from 11-14 to ~20 GB/s (noisy machine; never slower in repeated runs).
#ifndef VLV_GEMV_PREFETCH
#define VLV_GEMV_PREFETCH 2048
#endif
constexpr int kPrefetch = VLV_GEMV_PREFETCH;

// The input rows are re-read from L1 for every weight row. Once they outgrow a few KB
// (down_proj reads 19 KB per row, the 3B decoder's 44 KB), T0 prefetches of the streamed
// weights evict them, and each weight row then also pays for reloading x from L2.
// Prefetching the weights further ahead into L2 only leaves L1 to x: measured on the
// 2-core EPYC, down_proj went from ~25 to ~36 GB/s and the 3B shapes gained 20-60 %,
// while narrow inputs (q/k/v, gate/up, lm_head) stay fastest with the near T0 hint.
#ifndef VLV_GEMV_WIDE_BYTES
#define VLV_GEMV_WIDE_BYTES 4096
#endif
#ifndef VLV_GEMV_WIDE_PREFETCH
#define VLV_GEMV_WIDE_PREFETCH 8192
#endif
constexpr int64_t kWideInputBytes = VLV_GEMV_WIDE_BYTES;
constexpr int kWidePrefetch = VLV_GEMV_WIDE_PREFETCH;

// U independent accumulators per row hide the FMA latency; every weight vector is
// loaded and widened once for all R rows.
template <int R, int U, int Hint, int Distance>
__attribute__((target("avx2,fma"))) void rows_avx2(const float* x, int64_t x_stride, const int8_t* wrow, int64_t in,
                                                   float* acc) {
  __m256 a[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) a[r][u] = _mm256_setzero_ps();
  constexpr int step = 8 * U;
  int64_t i = 0;
  for (; i + step <= in; i += step) {
    // GCC declares the hint as an enum; the template carries it as an int.
    _mm_prefetch(reinterpret_cast<const char*>(wrow + i) + Distance, static_cast<decltype(_MM_HINT_T0)>(Hint));
    __m256 wv[U];
    for (int u = 0; u < U; ++u) wv[u] = widen8(wrow + i + 8 * u);
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) a[r][u] = _mm256_fmadd_ps(wv[u], _mm256_loadu_ps(x + r * x_stride + i + 8 * u), a[r][u]);
  }
  for (; i + 8 <= in; i += 8) {
    const __m256 wv = widen8(wrow + i);
    for (int r = 0; r < R; ++r) a[r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * x_stride + i), a[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    __m256 s = a[r][0];
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, a[r][u]);
    float total = hsum(s);
    for (int64_t j = i; j < in; ++j) total += x[r * x_stride + j] * static_cast<float>(wrow[j]);
    acc[r] = total;
  }
}

// The same loop on 16-lane vectors (AVX-512F): half the widening and FMA instructions
// per weight byte. Measured on a 2-core AMX Xeon, the small preset's batch-1 step products
// with the two loops alternating in one process: 28.9 ms (AVX-512) vs 30.6 ms (AVX2),
// median of 16 each. The rest of the gap to the copy bandwidth is memory-level
// parallelism per core, which the prefetch distances below tune (builds can set them).
__attribute__((target("avx512f"))) inline __m512 widen16(const int8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

template <int R, int U, int Hint, int Distance>
__attribute__((target("avx512f"))) void rows_avx512(const float* x, int64_t x_stride, const int8_t* wrow,
                                                     int64_t in, float* acc) {
  __m512 a[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) a[r][u] = _mm512_setzero_ps();
  constexpr int step = 16 * U;
  int64_t i = 0;
  for (; i + step <= in; i += step) {
    for (int line = 0; line < step; line += 64)  // one prefetch per cache line of weights
      _mm_prefetch(reinterpret_cast<const char*>(wrow + i + line) + Distance, static_cast<decltype(_MM_HINT_T0)>(Hint));
    __m512 wv[U];
    for (int u = 0; u < U; ++u) wv[u] = widen16(wrow + i + 16 * u);
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u)
        a[r][u] = _mm512_fmadd_ps(wv[u], _mm512_loadu_ps(x + r * x_stride + i + 16 * u), a[r][u]);
  }
  for (; i + 16 <= in; i += 16) {
    const __m512 wv = widen16(wrow + i);
    for (int r = 0; r < R; ++r) a[r][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * x_stride + i), a[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    __m512 s = a[r][0];
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, a[r][u]);
    float total = _mm512_reduce_add_ps(s);
    for (int64_t j = i; j < in; ++j) total += x[r * x_stride + j] * static_cast<float>(wrow[j]);
    acc[r] = total;
  }
}

template <int R>
void block(const float* x, int64_t x_stride, const int8_t* w, const float* scale, const float* bias, int64_t in,
           int64_t o0, int64_t o1, float* y, int64_t y_stride, GemvSimd simd) {
  float acc[R];
  for (int64_t o = o0; o < o1; ++o) {
    const int8_t* wrow = w + o * in;
    const bool wide = static_cast<int64_t>(sizeof(float)) * R * in > kWideInputBytes;
    if (simd == GemvSimd::Avx512) {
      constexpr int U = R == 1 ? 4 : R == 2 ? 2 : 1;
      if (wide)
        rows_avx512<R, U, _MM_HINT_T1, kWidePrefetch>(x, x_stride, wrow, in, acc);
      else
        rows_avx512<R, U, _MM_HINT_T0, kPrefetch>(x, x_stride, wrow, in, acc);
    } else if (simd == GemvSimd::Avx2) {
      constexpr int U = R == 1 ? 4 : R == 2 ? 2 : 1;
      if (wide)
        rows_avx2<R, U, _MM_HINT_T1, kWidePrefetch>(x, x_stride, wrow, in, acc);
      else
        rows_avx2<R, U, _MM_HINT_T0, kPrefetch>(x, x_stride, wrow, in, acc);
    } else {
      rows_scalar<R>(x, x_stride, wrow, in, acc);
    }
    const float b = bias ? bias[o] : 0.f;
    for (int r = 0; r < R; ++r) y[r * y_stride + o] = acc[r] * scale[o] + b;
  }
}

// Many input rows (beams, a batch, a prefill) make the product compute-bound, and the
// one-output-row loop above is then bound by FMA latency: four accumulators cannot keep
// two FMA pipes busy, and every 8 weights are widened again for each group of 4 rows.
// A tile of R input rows x C output rows keeps R*C accumulators in flight and widens
// each weight vector once for R rows (R=4, C=3: 12 accumulators + 3 weights + 1 input
// vector fill the 16 AVX2 registers).
template <int R, int C>
__attribute__((target("avx2,fma"))) void tile_avx2(const float* x, int64_t x_stride, const int8_t* w, int64_t in,
                                                   float* acc /* [R][C] */) {
  __m256 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) a[r][c] = _mm256_setzero_ps();
  // One cache line of each weight row per outer step, fetched ahead: the weights stream
  // from memory once. Into L2 when the input tile is wide, as in rows_avx2 (4 beams of
  // the small preset: the products of a token step 40.6 -> 36.5 ms; 32 rows, compute-bound,
  // unchanged).
  const bool wide = static_cast<int64_t>(sizeof(float)) * R * in > kWideInputBytes;
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    if ((i & 63) == 0)
      for (int c = 0; c < C; ++c) {
        const char* p = reinterpret_cast<const char*>(w + c * in + i);
        if (wide)
          _mm_prefetch(p + kWidePrefetch, _MM_HINT_T1);
        else
          _mm_prefetch(p + kPrefetch, _MM_HINT_T0);
      }
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = widen8(w + c * in + i);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * x_stride + i);
      for (int c = 0; c < C; ++c) a[r][c] = _mm256_fmadd_ps(wv[c], xv, a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float total = hsum(a[r][c]);
      for (int64_t j = i; j < in; ++j) total += x[r * x_stride + j] * static_cast<float>(w[c * in + j]);
      acc[r * C + c] = total;
    }
}

#ifndef VLV_GEMV_TILE_ROWS
#define VLV_GEMV_TILE_ROWS 4
#endif
#ifndef VLV_GEMV_TILE_COLS
#define VLV_GEMV_TILE_COLS 3
#endif
constexpr int kTileRows = VLV_GEMV_TILE_ROWS;
constexpr int kTileCols = VLV_GEMV_TILE_COLS;

// The tile for the last `left` (< R) input rows.
template <int R, int C>
void tile_left(int64_t left, const float* x, int64_t x_stride, const int8_t* w, int64_t in, float* acc) {
  if (left == R) {
    tile_avx2<R, C>(x, x_stride, w, in, acc);
  } else if constexpr (R > 1) {
    tile_left<R - 1, C>(left, x, x_stride, w, in, acc);
  }
}

// Output rows [o, o + C) for every input row: C weight rows stay in L1 while all input
// rows pass over them.
template <int C>
__attribute__((target("avx2,fma"))) void tile_column(const float* x, int64_t rows, int64_t x_stride, const int8_t* w,
                                                     const float* scale, const float* bias, int64_t in, int64_t o,
                                                     float* y, int64_t y_stride) {
  float acc[kTileRows * C];
  const int8_t* wo = w + o * in;
  for (int64_t r = 0; r < rows; r += kTileRows) {
    const int64_t left = std::min<int64_t>(kTileRows, rows - r);
    const float* xr = x + r * x_stride;
    tile_left<kTileRows, C>(left, xr, x_stride, wo, in, acc);
    for (int64_t rr = 0; rr < left; ++rr)
      for (int c = 0; c < C; ++c)
        y[(r + rr) * y_stride + o + c] = acc[rr * C + c] * scale[o + c] + (bias ? bias[o + c] : 0.f);
  }
}

// Below this many input rows a product reads its weights once and is memory-bound: the
// row-at-a-time loop with its prefetching streams them fastest.
constexpr int64_t kTileMinRows = 3;

// Output rows [o0, o1) for every input row.
void compute(const float* x, int64_t rows, int64_t x_stride, const int8_t* w, const float* scale, const float* bias,
             int64_t in, int64_t o0, int64_t o1, float* y, int64_t y_stride, GemvSimd simd) {
  // Many rows: the AVX2 tiles on AVX-512 machines too (compute-bound; not tuned for 16 lanes).
  if (simd != GemvSimd::Scalar && rows >= kTileMinRows) {
    int64_t o = o0;
    for (; o + kTileCols <= o1; o += kTileCols)
      tile_column<kTileCols>(x, rows, x_stride, w, scale, bias, in, o, y, y_stride);
    for (; o < o1; ++o) tile_column<1>(x, rows, x_stride, w, scale, bias, in, o, y, y_stride);
    return;
  }
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    block<4>(x + r * x_stride, x_stride, w, scale, bias, in, o0, o1, y + r * y_stride, y_stride, simd);
  const int64_t left = rows - r;
  const float* xr = x + r * x_stride;
  float* yr = y + r * y_stride;
  if (left == 3) block<3>(xr, x_stride, w, scale, bias, in, o0, o1, yr, y_stride, simd);
  if (left == 2) block<2>(xr, x_stride, w, scale, bias, in, o0, o1, yr, y_stride, simd);
  if (left == 1) block<1>(xr, x_stride, w, scale, bias, in, o0, o1, yr, y_stride, simd);
}

// ----------------------------------------------------------------------------- threads

// A persistent pool: a decode step makes ~170 of these calls, so starting threads per
// call (tens of microseconds each) would cost more than the products themselves. The
// caller's thread takes tasks too. Workers spin briefly after a job (the next call
// comes within microseconds during a decode step), then sleep on a condition variable.
class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int size() const { return static_cast<int>(threads_.size()) + 1; }

  // Runs fn(0..tasks-1), each exactly once, and returns when all are done.
  void run(int64_t tasks, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock() || threads_.empty() || tasks <= 1) {  // another caller holds the pool: run inline
      for (int64_t t = 0; t < tasks; ++t) fn(t);
      return;
    }
    Job job{&fn, tasks};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    work(job);
    while (job.remaining.load(std::memory_order_acquire) > 0) _mm_pause();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = nullptr;  // no worker joins from now on
    }
    while (job.active.load(std::memory_order_acquire) > 0) _mm_pause();  // nor is any still inside
  }

 private:
  struct Job {
    const std::function<void(int64_t)>* fn;
    int64_t tasks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> remaining;
    std::atomic<int> active{0};
    Job(const std::function<void(int64_t)>* f, int64_t n) : fn(f), tasks(n), remaining(n) {}
  };

  static void work(Job& job) {
    for (;;) {
      const int64_t t = job.next.fetch_add(1, std::memory_order_relaxed);
      if (t >= job.tasks) return;
      (*job.fn)(t);
      job.remaining.fetch_sub(1, std::memory_order_release);
    }
  }

  void loop() {
    uint64_t seen = generation_.load();
    for (;;) {
      for (int spin = 0; spin < kSpins && generation_.load(std::memory_order_acquire) == seen; ++spin) _mm_pause();
      Job* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_.load() != seen; });
        if (stop_) return;
        seen = generation_.load();
        job = job_;
        if (job) job->active.fetch_add(1);
      }
      if (job) {
        work(*job);
        job->active.fetch_sub(1, std::memory_order_release);
      }
    }
  }

  // ~0.5 ms of pause instructions: long enough to span the torch ops between two products
  // of a decode step (torch runs on one thread meanwhile, `kernel_threads`), so a worker is
  // awake for the next call; a futex wake-up costs more than a small product.
  static constexpr int kSpins = 20000;
  std::vector<std::thread> threads_;
  std::mutex run_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  Job* job_ = nullptr;
  bool stop_ = false;
};

int default_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Shared ownership: a caller still running on a pool that another caller has just
// replaced (a different thread count) keeps it alive until its call returns.
std::shared_ptr<Pool> pool(int threads) {
  static std::mutex m;
  static std::shared_ptr<Pool> p;
  std::lock_guard<std::mutex> lock(m);
  if (!p || p->size() != threads) p = std::make_shared<Pool>(threads - 1);
  return p;
}

}  // namespace

// Below this many weight bytes a product runs on the caller's thread alone: waking a
// worker costs more than its share. Measured on 2 cores with torch on one thread
// (`kernel_threads`), a 1 MB q/k/v product takes 133 us alone and 81 us on two.
#ifndef VLV_GEMV_SERIAL_BYTES
#define VLV_GEMV_SERIAL_BYTES (int64_t{128} << 10)
#endif
constexpr int64_t kSerialBytes = VLV_GEMV_SERIAL_BYTES;

GemvSimd gemv_simd_level() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    if (__builtin_cpu_supports("avx512f")) return GemvSimd::Avx512;
    return GemvSimd::Avx2;
  }
  return GemvSimd::Scalar;
}

void int8_linear(const float* x, int64_t rows, int64_t x_stride, const int8_t* w, const float* scale,
                 const float* bias, int64_t in, int64_t out, float* y, int64_t y_stride, int num_threads,
                 GemvSimd simd) {
  if (rows <= 0 || out <= 0) return;
  const int threads = num_threads > 0 ? num_threads : default_threads();
  // Tasks of >= 16 output rows (a few KB of weights each), a few per thread for balance.
  const int64_t per = std::max<int64_t>(16, (out + 4 * threads - 1) / (4 * threads));
  const int64_t tasks = (out + per - 1) / per;
  auto fn = [&](int64_t t) {
    const int64_t o0 = t * per, o1 = std::min(out, o0 + per);
    compute(x, rows, x_stride, w, scale, bias, in, o0, o1, y, y_stride, simd);
  };
  // Small matrices run on the caller's thread alone (kSerialBytes).
  if (threads == 1 || tasks == 1 || in * out < kSerialBytes) {
    for (int64_t t = 0; t < tasks; ++t) fn(t);
    return;
  }
  pool(threads)->run(tasks, fn);
}

}  // namespace vlv
