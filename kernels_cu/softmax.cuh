// The online softmax of FlashAttention-2, on mma.sync accumulator fragments.
//
// Fragment layout (m16n8 fp32 accumulator, PTX ISA "mma.m16n8k16"): lane = 4 * g + t holds
// rows g and g + 8 of each tile, columns 2t and 2t + 1. So a thread owns two rows per m16 tile,
// and the four lanes of a quad (same g) share them: row reductions are two butterfly shuffles.
//
// Rules for rows that see nothing (masked with -infinity, never a finite sentinel): a row max of
// -inf is replaced by 0 in the exponent, so exp2(-inf - 0) = 0 and no NaN appears; a zero row
// sum gives out = 0 and lse = -inf (the log of an empty sum, so merging partial results by
// their lse weighs such a row 0 instead of making NaN).
#pragma once
#include "traits.cuh"

namespace cf {

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, shfl_xor(v, 1));
  return fmaxf(v, shfl_xor(v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += shfl_xor(v, 1);
  return v + shfl_xor(v, 2);
}

// Row max in the exponent's units, with the fully-masked-row guard.
__device__ __forceinline__ float scaled_max(float row_max, float scale_log2) {
  return row_max == -infinity() ? 0.f : row_max * scale_log2;
}

// Running statistics of the kMTiles * 2 rows a thread owns: m_i (max of raw scores) and l_i
// (this thread's partial row sum of exp2; the quad is summed once, at the end).
template <int kMTiles>
struct OnlineSoftmax {
  float m_i[kMTiles][2];
  float l_i[kMTiles][2];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        m_i[mt][h] = -infinity();
        l_i[mt][h] = 0.f;
      }
  }

  // s: raw scores of one K tile (masked entries -inf). Turns s into P = exp2(s * scale_log2 -
  // m * scale_log2) in place and rescales acc_o by exp2(m_old - m_new) where the max grew.
  // kSkipIdleRescale: a row whose max did not change gets correction 1 exactly, and acc_o is
  // left alone when no row of the warp changed its max (a warp vote). That saves 2 kDTiles
  // multiplies per row per tile where the max settles early, as it does over a long KV cache
  // (flash_decode.cu). Why the exact 1: the compiler fuses m_old * scale - m_new * scale into
  // one FFMA, so an unchanged max gives exp2(the rounding error of m_new * scale), not 1;
  // skipping the acc_o multiply by that but not l_i's would bias out by up to an ulp per tile.
  template <bool kSkipIdleRescale = false, int kNTiles, int kDTiles>
  __device__ __forceinline__ void update(float (&s)[kMTiles][kNTiles][4], float (&acc_o)[kMTiles][kDTiles][4],
                                         float scale_log2) {
    float correction[kMTiles][2];
    const bool max_changed = probabilities<kSkipIdleRescale>(s, scale_log2, correction);
    if (kSkipIdleRescale && !__any_sync(0xffffffffu, max_changed)) return;
    rescale(acc_o, correction);
  }

  // update() in two halves, for a kernel whose P V of the previous tile still runs while this
  // tile's probabilities are computed (flash_fwd_tma.cu): first s -> P, l_i and m_i, with each
  // row's correction of acc_o kept; then, once P V has landed in acc_o, the rescale. Returns
  // whether any row of this thread changed its max.
  template <bool kSkipIdleRescale = false, int kNTiles>
  __device__ __forceinline__ bool probabilities(float (&s)[kMTiles][kNTiles][4], float scale_log2,
                                                float (&correction)[kMTiles][2]) {
    bool max_changed = false;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float m_new = m_i[mt][h];
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) m_new = fmaxf(m_new, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
        m_new = quad_max(m_new);
        const float m_scaled = scaled_max(m_new, scale_log2);
        // m_i = -inf (nothing seen yet) gives correction 0, and acc_o / l_i are 0 anyway.
        correction[mt][h] = kSkipIdleRescale && m_new == m_i[mt][h] ? 1.f
                                                                    : exp2_approx(m_i[mt][h] * scale_log2 - m_scaled);
        max_changed |= m_new != m_i[mt][h];
        float row_sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float p = exp2_approx(fmaf(s[mt][nt][2 * h + c], scale_log2, -m_scaled));
            s[mt][nt][2 * h + c] = p;
            row_sum += p;
          }
        l_i[mt][h] = l_i[mt][h] * correction[mt][h] + row_sum;
        m_i[mt][h] = m_new;
      }
    return max_changed;
  }

  template <int kDTiles>
  __device__ __forceinline__ static void rescale(float (&acc_o)[kMTiles][kDTiles][4],
                                                 const float (&correction)[kMTiles][2]) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          acc_o[mt][dt][2 * h] *= correction[mt][h];
          acc_o[mt][dt][2 * h + 1] *= correction[mt][h];
        }
  }

  // Divides acc_o by the row sums and returns lse (natural log) for each owned row.
  template <int kDTiles>
  __device__ __forceinline__ void finalize(float (&acc_o)[kMTiles][kDTiles][4], float (&lse)[kMTiles][2],
                                           float scale_log2) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float l = quad_sum(l_i[mt][h]);
        const bool empty = !(l > 0.f);
        const float inv_l = empty ? 0.f : 1.f / l;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          acc_o[mt][dt][2 * h] *= inv_l;
          acc_o[mt][dt][2 * h + 1] *= inv_l;
        }
        lse[mt][h] = empty ? -infinity() : (m_i[mt][h] * scale_log2 + log2_approx(l)) * kLn2;
      }
  }
};

}  // namespace cf
