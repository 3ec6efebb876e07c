// y = x @ (scale[:, None] * w).T + bias: a linear layer over int8 weights with one fp32
// scale per output row, float32 activations (vlv_engine's "int8_cpu" scheme).
//
// Why it exists: a decode step at a few rows is a matrix-vector product that reads every
// weight once, so its time is the bytes read. int8 weights are a quarter of fp32's, but
// PyTorch's CPU int8 weight-only path dequantizes the whole matrix to float before the
// product on machines without AVX512-VNNI, reading and writing more bytes than fp32.
// This kernel widens each int8 weight in registers (AVX2 + FMA; 16 at a time on AVX-512
// CPUs) right before its multiply-add, so each weight byte crosses the memory bus once per
// call whatever the number of rows. From 3 rows on (beams, batches, a prefill) the product
// turns compute-bound, and tiles of 4 input x 3 output rows keep both FMA pipes busy.
#pragma once

#include <cstdint>

namespace vlv {

enum class GemvSimd { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// The best implementation this CPU runs (AVX-512 needs AVX2 + FMA too: the tiles are AVX2).
GemvSimd gemv_simd_level();

// x [rows, in] fp32 (row stride x_stride), w [out, in] int8 row-major, scale [out],
// bias [out] or nullptr, y [rows, out] fp32 (row stride y_stride).
// `num_threads` <= 0: all the CPUs this process may use. Output rows are split among
// a persistent pool of threads (the caller's thread takes a share).
void int8_linear(const float* x, int64_t rows, int64_t x_stride, const int8_t* w, const float* scale,
                 const float* bias, int64_t in, int64_t out, float* y, int64_t y_stride, int num_threads,
                 GemvSimd simd);

}  // namespace vlv
