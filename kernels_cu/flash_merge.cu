// flash_merge: softmax attention results for the same query rows over disjoint sets of keys,
// merged into the result over their union (split-KV, shared-prefix cascades, chunked prefill,
// ring attention). With m = max_i lse_i and w_i = exp(lse_i - m):
//     lse = m + log(sum_i w_i),   out = sum_i (w_i / sum_i w_i) * out_i,
// in float32 with the accurate expf / logf. A part whose lse is -inf saw no key and weighs 0
// (+inf, flash_attn 2's mark for such a row, is read as -inf too); a row no part saw gets out = 0
// and lse = -inf; a NaN lse in any part makes the row's out and lse NaN.
//
// Compile-time macro: CF_ELEMENT (Half | BFloat16), the parts' and the result's element type.
// Reads MergeParams (params.cuh). One warp per query row (b, i, h), rows with h fastest, so the
// warps of a block write neighbouring heads; each lane owns the columns lane + 32 j.
// Grid: ceil(batch * seqlen_q * heads_q / kMergeRowsPerBlock); block: kMergeThreads.
#include "params.cuh"
#include "traits.cuh"

namespace cf {
using Element = CF_ELEMENT;

constexpr int kMergeColsPerLane = 8;  // column block per pass: 32 lanes x 8 = 256 columns

__device__ __forceinline__ float to_float(u16 v) {
  float lo, hi;
  Element::unpack(v, lo, hi);
  return lo;
}

__device__ __forceinline__ u16 to_element(float x) { return static_cast<u16>(Element::pack(x, 0.f) & 0xffffu); }

// A part's lse, with +inf read as -inf (see above).
__device__ __forceinline__ float part_lse(const MergeParams& p, int part, i64 at) {
  const float lse = reinterpret_cast<const float*>(p.part_table[2 * part + 1])[at];
  return lse == infinity() ? -infinity() : lse;
}
}  // namespace cf

extern "C" __global__ void __launch_bounds__(cf::kMergeThreads)
    flash_merge(const __grid_constant__ cf::MergeParams p) {
  using namespace cf;
  const int lane = threadIdx.x % 32;
  const i64 row = static_cast<i64>(blockIdx.x) * kMergeRowsPerBlock + threadIdx.x / 32;
  const int heads_q = p.heads_q, seqlen_q = p.seqlen_q, num_parts = p.num_parts, head_dim = p.head_dim;
  if (row >= static_cast<i64>(p.batch) * seqlen_q * heads_q) return;
  const int head = static_cast<int>(row % heads_q);
  const i64 batch_row = row / heads_q;  // b * seqlen_q + i
  const int i = static_cast<int>(batch_row % seqlen_q);
  const int b = static_cast<int>(batch_row / seqlen_q);
  const i64 stat = (static_cast<i64>(b) * heads_q + head) * seqlen_q + i;  // (batch, heads_q, seqlen_q)

  // Every lane reads every part's lse (the same address across the warp: one transaction).
  float m = -infinity();
  bool nan = false;
  for (int part = 0; part < num_parts; ++part) {
    const float lse = part_lse(p, part, stat);
    nan |= lse != lse;
    m = fmaxf(m, lse);
  }
  if (nan) m = __int_as_float(0x7fffffff);
  const bool empty = m == -infinity();  // no part saw a key: all weights 0
  float sum = 0.f;
  if (!empty)
    for (int part = 0; part < num_parts; ++part) sum += expf(part_lse(p, part, stat) - m);
  const float inv_sum = empty ? 0.f : 1.f / sum;
  if (lane == 0) p.lse[stat] = empty ? -infinity() : m + logf(sum);

  const i64 in_offset = b * p.in_batch_stride + i * p.in_row_stride + head * p.in_head_stride;
  u16* __restrict__ out = p.out.ptr + b * p.out.batch_stride + i * p.out.row_stride + head * p.out.head_stride;
  for (int col0 = 0; col0 < head_dim; col0 += 32 * kMergeColsPerLane) {
    float acc[kMergeColsPerLane];
#pragma unroll
    for (int j = 0; j < kMergeColsPerLane; ++j) acc[j] = 0.f;
    if (!empty)
      for (int part = 0; part < num_parts; ++part) {
        const float lse = part_lse(p, part, stat);
        if (lse == -infinity()) continue;  // weighs 0: its out is not read (0 * NaN would be NaN)
        const float w = expf(lse - m) * inv_sum;
        const u16* in = reinterpret_cast<const u16*>(p.part_table[2 * part]) + in_offset;
#pragma unroll
        for (int j = 0; j < kMergeColsPerLane; ++j) {
          const int col = col0 + lane + 32 * j;
          if (col < head_dim) acc[j] = fmaf(w, to_float(in[col]), acc[j]);
        }
      }
#pragma unroll
    for (int j = 0; j < kMergeColsPerLane; ++j) {
      const int col = col0 + lane + 32 * j;
      if (col < head_dim) out[col] = to_element(acc[j]);
    }
  }
}
