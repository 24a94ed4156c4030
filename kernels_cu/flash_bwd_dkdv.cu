// FlashAttention-2 backward, the main kernel: dK and dV for one tile of keys, and (with
// CF_ACCUM_DQ) this tile's share of dQ added to a float32 accumulator with atomics.
//
// The block loads its K and V tiles once and streams the Q / dO tiles of every query row that
// can see them, for every q head of its GQA group (so dK and dV are summed over the group here,
// never materialised per q head). Per Q tile, with P recomputed from lse (no O(N^2) storage):
//     S^T = K Q^T,  P^T = exp2(S^T * scale_log2 - lse_log2),  dV += P^T dO,
//     dP^T = V dO^T,  dS^T = P^T (dP^T - delta),  dK += dS^T Q,  dQ += dS K (atomics).
// dK is scaled by softmax_scale at the end; dQ by the convert kernel (flash_bwd_prep.cu).
//
// Compile-time macros: CF_ELEMENT, CF_HEAD_DIM, CF_BLOCK_M, CF_BLOCK_N, CF_NUM_WARPS, CF_STAGES,
// CF_WARPS_D, CF_ACCUM_DQ (0 | 1).
#include "gemm.cuh"
#include "mask.cuh"
#include "sequence.cuh"
#include "params.cuh"
#include "tile_io.cuh"
#include "traits.cuh"

namespace cf {
using DkdvKernel = DkdvTraits<CF_HEAD_DIM, CF_BLOCK_M, CF_BLOCK_N, CF_NUM_WARPS, CF_STAGES, CF_WARPS_D, CF_ACCUM_DQ>;
using Element = CF_ELEMENT;

// dq_accum[row][col] += acc for a warp's dQ fragments (rows from row0, columns from col0).
template <int kMTiles, int kNTiles>
__device__ __forceinline__ void add_dq_frags(float* dq_accum, i64 row_stride, const float (&acc)[kMTiles][kNTiles][4],
                                             int row0, int col0, int valid_rows, int valid_cols, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 16 * mt + g + 8 * h;
      if (row >= valid_rows) continue;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        const int col = col0 + 8 * nt + 2 * t;
        if (col >= valid_cols) continue;  // head_dim is a multiple of 8, so col + 1 is valid too
        float* dst = dq_accum + row * row_stride + col;
        red_add_f32(dst, acc[mt][nt][2 * h]);
        red_add_f32(dst + 1, acc[mt][nt][2 * h + 1]);
      }
    }
}
}  // namespace cf

// cupyflash/kernels/flash_bwd_dkdv.py computes the same size for the launch; the build passes it here.
static_assert(sizeof(cf::DkdvSmem<cf::DkdvKernel>) == CF_SMEM_BYTES, "cupyflash/kernels/flash_bwd_dkdv.py smem_bytes() disagrees with the kernel's layout");

// Reads BwdParams (params.cuh): q, k, v, dout, lse_log2, delta; writes dk, dv and, with CF_ACCUM_DQ,
// adds dQ / softmax_scale into dq_accum (float32 like q, zeroed by the caller, its own strides).
// Grid: (ceil(seqlen_k / kBlockN), heads_kv, batch); block: kThreads; dynamic smem: DkdvSmem.
// minBlocksPerSM = 1: without it ptxas sometimes caps registers at 128 to fit two blocks
// per SM and spills (seen on the head_dim 32 dK/dV kernel); one block per SM is the design.
extern "C" __global__ void __launch_bounds__(cf::DkdvKernel::kThreads, 1)
    flash_bwd_dkdv(const __grid_constant__ cf::BwdParams p) {
  using namespace cf;
  // The fields the body reads, as values: a lambda capturing p by reference would read them
  // through p's address (ld.param [reg]) in every iteration instead of once.
  const Sequence seq = sequence_of(p, blockIdx.z);  // this batch entry's lengths (CF_VARLEN: its own)
  const int seqlen_q = seq.seqlen_q;
  const int seqlen_k = seq.seqlen_k;
  const int window_left = p.window_left;
  const int window_right = p.window_right;
  const i64 dk_batch_stride = p.dk.batch_stride;
  const i64 dk_head_stride = p.dk.head_stride;
  const i64 dk_row_stride = p.dk.row_stride;
  const i64 dv_batch_stride = p.dv.batch_stride;
  const i64 dv_head_stride = p.dv.head_stride;
  const i64 dv_row_stride = p.dv.row_stride;
  const int head_dim = p.head_dim;
  const int group_size = p.group_size;
  const i64 k_batch_stride = p.k.batch_stride;
  const i64 k_head_stride = p.k.head_stride;
  const i64 k_row_stride = p.k.row_stride;
  const i64 v_batch_stride = p.v.batch_stride;
  const i64 v_head_stride = p.v.head_stride;
  const i64 v_row_stride = p.v.row_stride;
  const i64 q_batch_stride = p.q.batch_stride;
  const i64 q_head_stride = p.q.head_stride;
  const i64 q_row_stride = p.q.row_stride;
  const i64 do_batch_stride = p.dout.batch_stride;
  const i64 do_head_stride = p.dout.head_stride;
  const i64 do_row_stride = p.dout.row_stride;
  const int heads_q = p.heads_q;
  const float scale_log2 = p.scale_log2;
  const i64 dqa_batch_stride = p.dq_accum_batch_stride;
  const i64 dqa_head_stride = p.dq_accum_head_stride;
  const i64 dqa_row_stride = p.dq_accum_row_stride;
  const float softmax_scale = p.softmax_scale;
  const u16* __restrict__ q = p.q.ptr + seq.q_row0 * p.q.row_stride;
  const u16* __restrict__ k = p.k.ptr + seq.k_row0 * p.k.row_stride;
  const u16* __restrict__ v = p.v.ptr + seq.k_row0 * p.v.row_stride;
  const u16* __restrict__ dout = p.dout.ptr + seq.q_row0 * p.dout.row_stride;
  const float* __restrict__ lse_log2 = p.lse_log2;
  float* __restrict__ delta = p.delta;
  float* __restrict__ dq_accum = p.dq_accum + seq.q_row0 * p.dq_accum_row_stride;  // like q
  u16* __restrict__ dk = p.dk.ptr + seq.k_row0 * p.dk.row_stride;
  u16* __restrict__ dv = p.dv.ptr + seq.k_row0 * p.dv.row_stride;
  using T = DkdvKernel;
  extern __shared__ Vec16 smem_raw[];
  DkdvSmem<T>& sm = *reinterpret_cast<DkdvSmem<T>*>(smem_raw);

  const int n_block = blockIdx.x;  // under a causal mask the first key tiles have the most work
  const int kv_head = blockIdx.y, batch = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int t = lane & 3;
  const Mask mask{seqlen_q, seqlen_k, window_left, window_right};
  const int key_begin = n_block * T::kBlockN;
  if constexpr (kVarlen)
    if (key_begin >= seqlen_k) return;  // past this sequence's last key
  const int keys = min(T::kBlockN, seqlen_k - key_begin);

  u16* dk_tile = dk + batch * dk_batch_stride + kv_head * dk_head_stride + key_begin * dk_row_stride;
  u16* dv_tile = dv + batch * dv_batch_stride + kv_head * dv_head_stride + key_begin * dv_row_stride;
  int m_begin, m_end;
  mask.query_tiles<T::kBlockM>(key_begin, key_begin + keys, m_begin, m_end);
  if (m_end <= m_begin) {  // no query sees these keys: their gradients are 0
    store_zero_tile<T::kBlockN, T::kHeadDim, T::kThreads>(dk_tile, dk_row_stride, keys, head_dim, tid);
    store_zero_tile<T::kBlockN, T::kHeadDim, T::kThreads>(dv_tile, dv_row_stride, keys, head_dim, tid);
    return;
  }
  const int m_tiles = m_end - m_begin;
  const int iters = group_size * m_tiles;  // (q head of the group, Q tile) pairs

  load_tile_async<T::kBlockN, T::kHeadDim, T::kStride, T::kThreads>(
      sm.k, k + batch * k_batch_stride + kv_head * k_head_stride + key_begin * k_row_stride, k_row_stride, keys,
      head_dim, tid);
  load_tile_async<T::kBlockN, T::kHeadDim, T::kStride, T::kThreads>(
      sm.v, v + batch * v_batch_stride + kv_head * v_head_stride + key_begin * v_row_stride, v_row_stride, keys,
      head_dim, tid);
  auto load_q_tile = [&](int slot, int it) {
    const int head = kv_head * group_size + it / m_tiles;
    const int row0 = (m_begin + it % m_tiles) * T::kBlockM;
    const int rows = min(T::kBlockM, seqlen_q - row0);
    load_tile_async<T::kBlockM, T::kHeadDim, T::kStride, T::kThreads>(
        sm.q[slot], q + batch * q_batch_stride + head * q_head_stride + row0 * q_row_stride, q_row_stride, rows,
        head_dim, tid);
    load_tile_async<T::kBlockM, T::kHeadDim, T::kStride, T::kThreads>(
        sm.dout[slot], dout + batch * do_batch_stride + head * do_head_stride + row0 * do_row_stride, do_row_stride,
        rows, head_dim, tid);
    const i64 stats = seq.stats(head, row0);
    load_rows_async<T::kBlockM, T::kThreads>(sm.lse_log2[slot], lse_log2 + stats, rows, tid);
    load_rows_async<T::kBlockM, T::kThreads>(sm.delta[slot], delta + stats, rows, tid);
  };
#pragma unroll
  for (int s = 0; s < T::kStages - 1; ++s) {  // K and V join the first group
    if (s < iters) load_q_tile(s, s);
    cp_async_commit();
  }

  const int wn = warp / T::kWarpsD, wd = warp % T::kWarpsD;
  const int key_row0 = wn * T::kMTiles * 16;                // this warp's key rows
  const int q_col0 = wd * (T::kBlockM / T::kWarpsD);        // its query columns of S^T, dP^T
  const int d_col0 = wd * (T::kHeadDim / T::kWarpsD);       // its head_dim columns of dK, dV
  float acc_dk[T::kMTiles][T::kAccDTiles][4], acc_dv[T::kMTiles][T::kAccDTiles][4];
  zero(acc_dk);
  zero(acc_dv);

  for (int it = 0; it < iters; ++it) {
    cp_async_wait<T::kStages - 2>();
    __syncthreads();  // tile `it` visible to all; the slot refilled below is free
    const int next = it + T::kStages - 1;
    if (next < iters) load_q_tile(next % T::kStages, next);
    cp_async_commit();

    const int slot = it % T::kStages;
    const int head = kv_head * group_size + it / m_tiles;
    const int row0 = (m_begin + it % m_tiles) * T::kBlockM;
    const int rows = min(T::kBlockM, seqlen_q - row0);

    float st[T::kMTiles][T::kQTiles][4];  // S^T, then P^T
    zero(st);
    gemm_nt<Element, T::kMTiles, T::kQTiles, T::kHeadDim>(st, sm.k, key_row0, sm.q[slot], q_col0, lane);
    if (!mask.tile_is_full(row0, row0 + rows, key_begin, key_begin + T::kBlockN))
      mask_scores_transposed(st, mask, key_begin + key_row0, row0 + q_col0, lane);
    float dpt[T::kMTiles][T::kQTiles][4];  // dP^T, then dS^T
    zero(dpt);
    gemm_nt<Element, T::kMTiles, T::kQTiles, T::kHeadDim>(dpt, sm.v, key_row0, sm.dout[slot], q_col0, lane);
#pragma unroll
    for (int mt = 0; mt < T::kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < T::kQTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int i = q_col0 + 8 * nt + 2 * t + (c & 1);
          const float prob = exp2_approx(fmaf(st[mt][nt][c], scale_log2, -sm.lse_log2[slot][i]));
          st[mt][nt][c] = prob;
          dpt[mt][nt][c] = prob * (dpt[mt][nt][c] - sm.delta[slot][i]);
        }
    // dV and dK need P^T and dS^T over all of the tile's queries, which other warps hold when
    // kWarpsD > 1, and dQ needs dS^T for all keys: both go through shared memory.
    store_frags_to_smem<Element>(sm.pt, st, key_row0, q_col0, lane, 1.f);
    store_frags_to_smem<Element>(sm.dst, dpt, key_row0, q_col0, lane, 1.f);
    __syncthreads();
    gemm_sn<Element, false, T::kMTiles, T::kAccDTiles, T::kBlockM>(acc_dv, sm.pt, key_row0, sm.dout[slot], d_col0,
                                                                   lane);
    gemm_sn<Element, false, T::kMTiles, T::kAccDTiles, T::kBlockM>(acc_dk, sm.dst, key_row0, sm.q[slot], d_col0,
                                                                   lane);
    if constexpr (T::kAccumDq) {
      const int dq_row0 = (warp / T::kDqWarpsD) * T::kDqMTiles * 16;
      const int dq_col0 = (warp % T::kDqWarpsD) * (T::kHeadDim / T::kDqWarpsD);
      float acc_dq[T::kDqMTiles][T::kDqDTiles][4];
      zero(acc_dq);
      gemm_sn<Element, true, T::kDqMTiles, T::kDqDTiles, T::kBlockN>(acc_dq, sm.dst, dq_row0, sm.k, dq_col0, lane);
      float* dq_tile = dq_accum + batch * dqa_batch_stride + head * dqa_head_stride + row0 * dqa_row_stride;
      add_dq_frags(dq_tile, dqa_row_stride, acc_dq, dq_row0, dq_col0, rows, head_dim, lane);
    }
  }

  // Stage dK (times softmax_scale: S = scale Q K^T) and dV in the K and V tiles, then store.
  __syncthreads();  // every warp is done reading K and V
  store_frags_to_smem<Element>(sm.k, acc_dk, key_row0, d_col0, lane, softmax_scale);
  store_frags_to_smem<Element>(sm.v, acc_dv, key_row0, d_col0, lane, 1.f);
  __syncthreads();
  store_tile<T::kBlockN, T::kHeadDim, T::kStride, T::kThreads>(dk_tile, dk_row_stride, sm.k, keys, head_dim, tid);
  store_tile<T::kBlockN, T::kHeadDim, T::kStride, T::kThreads>(dv_tile, dv_row_stride, sm.v, keys, head_dim, tid);
}
