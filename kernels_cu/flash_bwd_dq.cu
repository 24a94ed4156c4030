// FlashAttention-2 backward, deterministic dQ: one thread block per Q tile walks the K/V tiles
// in a fixed order and keeps dQ in registers, so no atomics and bitwise-repeatable results.
// It recomputes S and dP, which the dK/dV kernel also computes: 7 matrix products in all
// instead of 5, the documented cost of deterministic=True.
//     S = Q K^T,  P = exp2(S * scale_log2 - lse_log2),  dP = dO V^T,
//     dS = P (dP - delta),  dQ += dS K;  finally dQ *= softmax_scale.
//
// Compile-time macros: CF_ELEMENT, CF_HEAD_DIM, CF_BLOCK_M, CF_BLOCK_N, CF_NUM_WARPS, CF_STAGES.
#include "gemm.cuh"
#include "mask.cuh"
#include "sequence.cuh"
#include "params.cuh"
#include "tile_io.cuh"
#include "traits.cuh"

namespace cf {
using DqKernel = RowTraits<CF_HEAD_DIM, CF_BLOCK_M, CF_BLOCK_N, CF_NUM_WARPS, CF_STAGES>;
using Element = CF_ELEMENT;

template <class T>
struct DqSmem {
  u16 q[T::kBlockM][T::kStride];  // reused to stage dQ for coalesced stores
  u16 dout[T::kBlockM][T::kStride];
  u16 k[T::kStages][T::kBlockN][T::kStride];
  u16 v[T::kStages][T::kBlockN][T::kStride];
};
}  // namespace cf

// cupyflash/kernels/flash_bwd_dq.py computes the same size for the launch; the build passes it here.
static_assert(sizeof(cf::DqSmem<cf::DqKernel>) == CF_SMEM_BYTES, "cupyflash/kernels/flash_bwd_dq.py smem_bytes() disagrees with the kernel's layout");

// Reads BwdParams (params.cuh): q, k, v, dout, lse_log2, delta; writes dq.
// Grid: (ceil(seqlen_q / kBlockM), heads_q, batch); block: kThreads; dynamic smem: DqSmem.
// minBlocksPerSM = 1: without it ptxas sometimes caps registers at 128 to fit two blocks
// per SM and spills (seen on the head_dim 32 dK/dV kernel); one block per SM is the design.
extern "C" __global__ void __launch_bounds__(cf::DqKernel::kThreads, 1)
    flash_bwd_dq(const __grid_constant__ cf::BwdParams p) {
  using namespace cf;
  // The fields the body reads, as values: a lambda capturing p by reference would read them
  // through p's address (ld.param [reg]) in every iteration instead of once.
  const Sequence seq = sequence_of(p, blockIdx.z);  // this batch entry's lengths (CF_VARLEN: its own)
  const int seqlen_q = seq.seqlen_q;
  const int seqlen_k = seq.seqlen_k;
  const int window_left = p.window_left;
  const int window_right = p.window_right;
  const int group_size = p.group_size;
  const i64 dq_batch_stride = p.dq.batch_stride;
  const i64 dq_head_stride = p.dq.head_stride;
  const i64 dq_row_stride = p.dq.row_stride;
  const int head_dim = p.head_dim;
  const i64 k_batch_stride = p.k.batch_stride;
  const i64 k_head_stride = p.k.head_stride;
  const i64 v_batch_stride = p.v.batch_stride;
  const i64 v_head_stride = p.v.head_stride;
  const i64 k_row_stride = p.k.row_stride;
  const i64 v_row_stride = p.v.row_stride;
  const i64 q_batch_stride = p.q.batch_stride;
  const i64 q_head_stride = p.q.head_stride;
  const i64 q_row_stride = p.q.row_stride;
  const i64 do_batch_stride = p.dout.batch_stride;
  const i64 do_head_stride = p.dout.head_stride;
  const i64 do_row_stride = p.dout.row_stride;
  const int heads_q = p.heads_q;
  const float scale_log2 = p.scale_log2;
  const float softmax_scale = p.softmax_scale;
  const u16* __restrict__ q = p.q.ptr + seq.q_row0 * p.q.row_stride;
  const u16* __restrict__ k = p.k.ptr + seq.k_row0 * p.k.row_stride;
  const u16* __restrict__ v = p.v.ptr + seq.k_row0 * p.v.row_stride;
  const u16* __restrict__ dout = p.dout.ptr + seq.q_row0 * p.dout.row_stride;
  const float* __restrict__ lse_log2 = p.lse_log2;
  float* __restrict__ delta = p.delta;
  u16* __restrict__ dq = p.dq.ptr + seq.q_row0 * p.dq.row_stride;
  using T = DqKernel;
  extern __shared__ Vec16 smem_raw[];
  DqSmem<T>& sm = *reinterpret_cast<DqSmem<T>*>(smem_raw);

  const int m_block = gridDim.x - 1 - blockIdx.x;  // causal: the longest rows first
  const int head = blockIdx.y, batch = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2;
  const Mask mask{seqlen_q, seqlen_k, window_left, window_right};
  const int row_begin = m_block * T::kBlockM;
  const int rows = min(T::kBlockM, seqlen_q - row_begin);
  if constexpr (kVarlen)
    if (rows <= 0) return;  // past this sequence's last query
  const int kv_head = head / group_size;

  u16* dq_tile = dq + batch * dq_batch_stride + head * dq_head_stride + row_begin * dq_row_stride;
  int n_begin, n_end;
  mask.key_tiles<T::kBlockN>(row_begin, row_begin + rows, n_begin, n_end);
  if (n_end <= n_begin) {
    store_zero_tile<T::kBlockM, T::kHeadDim, T::kThreads>(dq_tile, dq_row_stride, rows, head_dim, tid);
    return;
  }
  const int n_tiles = n_end - n_begin;
  const u16* k_head = k + batch * k_batch_stride + kv_head * k_head_stride;
  const u16* v_head = v + batch * v_batch_stride + kv_head * v_head_stride;
  auto load_kv = [&](int slot, int n_block) {
    load_kv_tiles_async<T::kBlockN, T::kHeadDim, T::kStride, T::kThreads>(
        sm.k[slot], sm.v[slot], k_head, k_row_stride, v_head, v_row_stride, n_block, seqlen_k, head_dim, tid);
  };
  load_tile_async<T::kBlockM, T::kHeadDim, T::kStride, T::kThreads>(
      sm.q, q + batch * q_batch_stride + head * q_head_stride + row_begin * q_row_stride, q_row_stride, rows,
      head_dim, tid);
  load_tile_async<T::kBlockM, T::kHeadDim, T::kStride, T::kThreads>(
      sm.dout, dout + batch * do_batch_stride + head * do_head_stride + row_begin * do_row_stride, do_row_stride,
      rows, head_dim, tid);
#pragma unroll
  for (int s = 0; s < T::kStages - 1; ++s) {
    if (s < n_tiles) load_kv(s, n_begin + s);
    cp_async_commit();
  }

  // Row statistics of the two rows per m16 tile this thread owns; rows past seqlen_q get
  // lse_log2 = +inf, so their P (and dS) is 0.
  const int warp_row0 = warp * T::kWarpRows;
  float row_lse_log2[T::kMTiles][2], row_delta[T::kMTiles][2];
  const i64 stats = seq.stats(head, row_begin);
#pragma unroll
  for (int mt = 0; mt < T::kMTiles; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + 16 * mt + g + 8 * h;
      row_lse_log2[mt][h] = row < rows ? lse_log2[stats + row] : infinity();
      row_delta[mt][h] = row < rows ? delta[stats + row] : 0.f;
    }

  float acc_dq[T::kMTiles][T::kDTiles][4];
  zero(acc_dq);
  for (int it = 0; it < n_tiles; ++it) {
    cp_async_wait<T::kStages - 2>();
    __syncthreads();
    const int next = it + T::kStages - 1;
    if (next < n_tiles) load_kv(next % T::kStages, n_begin + next);
    cp_async_commit();

    const int slot = it % T::kStages;
    const int key0 = (n_begin + it) * T::kBlockN;
    float s[T::kMTiles][T::kNTiles][4];  // S, then P
    zero(s);
    gemm_nt<Element, T::kMTiles, T::kNTiles, T::kHeadDim>(s, sm.q, warp_row0, sm.k[slot], 0, lane);
    if (!mask.tile_is_full(row_begin, row_begin + rows, key0, key0 + T::kBlockN))
      mask_scores(s, mask, row_begin + warp_row0, key0, lane);
    float dp[T::kMTiles][T::kNTiles][4];  // dP, then dS
    zero(dp);
    gemm_nt<Element, T::kMTiles, T::kNTiles, T::kHeadDim>(dp, sm.dout, warp_row0, sm.v[slot], 0, lane);
#pragma unroll
    for (int mt = 0; mt < T::kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < T::kNTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float prob = exp2_approx(fmaf(s[mt][nt][c], scale_log2, -row_lse_log2[mt][c / 2]));
          dp[mt][nt][c] = prob * (dp[mt][nt][c] - row_delta[mt][c / 2]);
        }
    gemm_rn<Element, T::kMTiles, T::kDTiles, T::kNTiles>(acc_dq, dp, sm.k[slot], 0, lane);
  }

  sync_warp();  // each warp stages only its own rows of the Q tile
  store_frags_to_smem<Element>(sm.q, acc_dq, warp_row0, 0, lane, softmax_scale);
  sync_warp();
  store_tile<T::kWarpRows, T::kHeadDim, T::kStride, 32>(dq_tile + warp_row0 * dq_row_stride, dq_row_stride,
                                                        &sm.q[warp_row0], rows - warp_row0, head_dim, lane);
}
