// The small kernels around the backward pass:
//   flash_bwd_delta:            delta = rowsum(dO * O) per query row, before dK/dV.
//   flash_bwd_convert_dq:       dq = softmax_scale * dq_accum (float32) rounded to the 16-bit type,
//                               after the dK/dV kernel has accumulated dQ with atomics.
//   flash_bwd_convert_dq_tiled: the same from the Hopper dK/dV kernel's unit layout of dq_accum.
//
// Compile-time macro: CF_ELEMENT (Half | BFloat16).
#include "traits.cuh"

namespace cf {
using Element = CF_ELEMENT;
constexpr int kDeltaThreads = 128;
constexpr int kLanesPerRow = 8;  // lanes that share one row, 16 bytes each per step
constexpr int kDeltaRows = kDeltaThreads / kLanesPerRow;
constexpr int kConvertThreads = 256;
}  // namespace cf

// out, dout: (batch, seqlen_q, heads_q, head_dim) 16-bit, last dim contiguous; strides in
//   elements. delta: (batch, heads_q, seqlen_q) float32 contiguous.
// Grid: (ceil(seqlen_q / kDeltaRows), heads_q, batch); block: kDeltaThreads.
extern "C" __global__ void __launch_bounds__(cf::kDeltaThreads)
    flash_bwd_delta(const cf::u16* __restrict__ out, const cf::u16* __restrict__ dout, float* __restrict__ delta,
                    cf::i64 o_batch_stride, cf::i64 o_row_stride, cf::i64 o_head_stride, cf::i64 do_batch_stride,
                    cf::i64 do_row_stride, cf::i64 do_head_stride, int seqlen_q, int heads_q, int head_dim) {
  using namespace cf;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int row = blockIdx.x * kDeltaRows + threadIdx.x / kLanesPerRow;
  const int sub = threadIdx.x % kLanesPerRow;
  float sum = 0.f;
  if (row < seqlen_q) {
    const u16* o_row = out + batch * o_batch_stride + row * o_row_stride + head * o_head_stride;
    const u16* do_row = dout + batch * do_batch_stride + row * do_row_stride + head * do_head_stride;
    for (int col = sub * kChunk; col < head_dim; col += kLanesPerRow * kChunk) {
      const Vec16 o = *reinterpret_cast<const Vec16*>(o_row + col);
      const Vec16 d = *reinterpret_cast<const Vec16*>(do_row + col);
      const u32 o_words[4] = {o.x, o.y, o.z, o.w}, d_words[4] = {d.x, d.y, d.z, d.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        float o_lo, o_hi, d_lo, d_hi;
        Element::unpack(o_words[w], o_lo, o_hi);
        Element::unpack(d_words[w], d_lo, d_hi);
        sum = fmaf(o_lo, d_lo, fmaf(o_hi, d_hi, sum));
      }
    }
  }
  // The kLanesPerRow lanes of a row are adjacent within one warp.
#pragma unroll
  for (int mask = 1; mask < kLanesPerRow; mask <<= 1) sum += shfl_xor(sum, mask);
  if (row < seqlen_q && sub == 0) delta[(static_cast<i64>(batch) * heads_q + head) * seqlen_q + row] = sum;
}

// dq_accum: float32, dq: 16-bit, both contiguous with the same n_elements (a multiple of 8).
// Grid: ceil(n_elements / 8 / kConvertThreads); block: kConvertThreads.
extern "C" __global__ void __launch_bounds__(cf::kConvertThreads)
    flash_bwd_convert_dq(const float* __restrict__ dq_accum, cf::u16* __restrict__ dq, cf::i64 n_elements,
                         float softmax_scale) {
  using namespace cf;
  const i64 chunk = static_cast<i64>(blockIdx.x) * kConvertThreads + threadIdx.x;
  if (chunk * kChunk >= n_elements) return;
  const Vec16* src = reinterpret_cast<const Vec16*>(dq_accum + chunk * kChunk);
  u32 words[4];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const Vec16 v = src[half];
    words[2 * half] = Element::pack(__uint_as_float(v.x) * softmax_scale, __uint_as_float(v.y) * softmax_scale);
    words[2 * half + 1] = Element::pack(__uint_as_float(v.z) * softmax_scale, __uint_as_float(v.w) * softmax_scale);
  }
  *reinterpret_cast<Vec16*>(dq + chunk * kChunk) = Vec16{words[0], words[1], words[2], words[3]};
}

// dq_accum: float32 in the DqUnits layout (traits.cuh) of the dK/dV kernel's head dim, which is
//   32 accum_units. dq: (batch, seqlen_q, heads_q, head_dim) 16-bit, strides in elements,
//   head_dim a multiple of 8 (columns past it in dq_accum are dropped).
// Grid: (seqlen_q, ceil(heads_q * head_dim / 4 / kConvertThreads), batch); block: kConvertThreads.
// Each thread converts 4 columns of one row: consecutive threads write consecutive dq columns.
extern "C" __global__ void __launch_bounds__(cf::kConvertThreads)
    flash_bwd_convert_dq_tiled(const float* __restrict__ dq_accum, cf::u16* __restrict__ dq, cf::i64 dq_batch_stride,
                               cf::i64 dq_row_stride, cf::i64 dq_head_stride, int seqlen_q, int heads_q,
                               int head_dim, int accum_units, float softmax_scale) {
  using namespace cf;
  constexpr int kChunksPerUnitRow = DqUnits::kCols / 4;
  const int chunks = head_dim / 4;  // of 4 columns, per (row, head)
  const int row = blockIdx.x, batch = blockIdx.z;
  const int index = blockIdx.y * kConvertThreads + threadIdx.x;  // within the row: (head, chunk)
  if (index >= heads_q * chunks) return;
  const int head = index / chunks, chunk = index % chunks;
  const float* unit =
      DqUnits::unit(dq_accum, batch, head, heads_q, seqlen_q, accum_units * DqUnits::kCols, row, 4 * chunk);
  const Vec16 v =
      *reinterpret_cast<const Vec16*>(unit + DqUnits::chunk_offset(row % DqUnits::kRows, chunk % kChunksPerUnitRow));
  const u32 lo = Element::pack(__uint_as_float(v.x) * softmax_scale, __uint_as_float(v.y) * softmax_scale);
  const u32 hi = Element::pack(__uint_as_float(v.z) * softmax_scale, __uint_as_float(v.w) * softmax_scale);
  u32* dst = reinterpret_cast<u32*>(dq + batch * dq_batch_stride + row * dq_row_stride + head * dq_head_stride +
                                    4 * chunk);
  dst[0] = lo;
  dst[1] = hi;
}
