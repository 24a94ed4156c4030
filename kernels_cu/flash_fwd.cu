// FlashAttention-2 forward: O = softmax(scale * Q K^T) V and lse, never writing S or P.
//
// One thread block owns kBlockM query rows of one (batch, head); each warp owns kWarpRows of
// them. K/V tiles stream through kStages shared-memory slots with cp.async while the tensor
// cores work on the previous slot. The tiles are visited from the last to the first so that the
// few tiles that need a per-element mask (sequence tail, causal diagonal) come first and the
// rest run unmasked. cupyflash/reference_tiled.py is the same algorithm in NumPy.
//
// Compile-time macros (set by cupyflash/build.py): CF_ELEMENT (Half | BFloat16), CF_HEAD_DIM,
// CF_BLOCK_M, CF_BLOCK_N, CF_NUM_WARPS, CF_STAGES.
#include "fwd_block.cuh"
#include "gemm.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "softmax.cuh"
#include "tile_io.cuh"
#include "traits.cuh"

namespace cf {
using FwdKernel = RowTraits<CF_HEAD_DIM, CF_BLOCK_M, CF_BLOCK_N, CF_NUM_WARPS, CF_STAGES>;
using Element = CF_ELEMENT;
}  // namespace cf

// cupyflash/kernels/flash_fwd.py computes the same size for the launch; the build passes it here.
static_assert(sizeof(cf::FwdSmem<cf::FwdKernel>) == CF_SMEM_BYTES, "cupyflash/kernels/flash_fwd.py smem_bytes() disagrees with the kernel's layout");

// Reads FwdParams (params.cuh, where every field's shape and units are): q, k, v; writes out
// and lse. Grid: (ceil(seqlen_q / kBlockM), heads_q, batch); block: kThreads; dynamic smem: FwdSmem.
// minBlocksPerSM = 1: without it ptxas sometimes caps registers at 128 to fit two blocks
// per SM and spills (seen on the head_dim 32 dK/dV kernel); one block per SM is the design.
extern "C" __global__ void __launch_bounds__(cf::FwdKernel::kThreads, 1)
    flash_fwd(const __grid_constant__ cf::FwdParams p) {
  using namespace cf;
  // The fields the body reads, as values: a lambda capturing p by reference would read them
  // through p's address (ld.param [reg]) in every iteration instead of once.
  const Sequence seq = sequence_of(p, blockIdx.z);  // this batch entry's lengths (CF_VARLEN: its own)
  const int seqlen_q = seq.seqlen_q;
  const int seqlen_k = seq.seqlen_k;
  const int window_left = p.window_left;
  const int window_right = p.window_right;
  const i64 o_row_stride = p.out.row_stride;
  const int head_dim = p.head_dim;
  const i64 k_row_stride = p.k.row_stride;
  const i64 v_row_stride = p.v.row_stride;
  const i64 q_row_stride = p.q.row_stride;
  const float scale_log2 = p.scale_log2;
  using T = FwdKernel;
  extern __shared__ Vec16 smem_raw[];
  FwdSmem<T>& sm = *reinterpret_cast<FwdSmem<T>*>(smem_raw);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const Mask mask{seqlen_q, seqlen_k, window_left, window_right};
  const FwdBlock block = locate_fwd_block<T::kBlockM, T::kBlockN>(mask, seq, p);
  if constexpr (kVarlen)
    if (block.rows <= 0) return;  // past this sequence's last query
  if (finish_empty_block<T::kBlockM, T::kHeadDim, T::kThreads>(block, o_row_stride, head_dim, tid)) return;
  const int row_begin = block.row_begin, rows = block.rows, n_end = block.n_end;
  const int n_tiles = n_end - block.n_begin;
  auto load_kv = [&](int slot, int n_block) {
    load_kv_tiles_async<T::kBlockN, T::kHeadDim, T::kStride, T::kThreads>(
        sm.k[slot], sm.v[slot], block.k_head, k_row_stride, block.v_head, v_row_stride, n_block, seqlen_k,
        head_dim, tid);
  };

  // Prologue: Q and the first kStages - 1 K/V tiles, one commit group per tile (Q joins the first).
  load_tile_async<T::kBlockM, T::kHeadDim, T::kStride, T::kThreads>(sm.q, block.q_tile, q_row_stride, rows,
                                                                    head_dim, tid);
#pragma unroll
  for (int s = 0; s < T::kStages - 1; ++s) {
    if (s < n_tiles) load_kv(s, n_end - 1 - s);
    cp_async_commit();
  }

  float acc_o[T::kMTiles][T::kDTiles][4];
  zero(acc_o);
  OnlineSoftmax<T::kMTiles> softmax;
  softmax.init();
  const int warp_row0 = warp * T::kWarpRows;

  for (int it = 0; it < n_tiles; ++it) {
    // Tile `it` has landed once at most kStages - 2 younger groups are in flight; the barrier
    // also tells every warp that the slot refilled below is no longer being read.
    cp_async_wait<T::kStages - 2>();
    __syncthreads();
    const int next = it + T::kStages - 1;
    if (next < n_tiles) load_kv(next % T::kStages, n_end - 1 - next);
    cp_async_commit();

    const int slot = it % T::kStages;
    const int key0 = (n_end - 1 - it) * T::kBlockN;
    float s[T::kMTiles][T::kNTiles][4];
    zero(s);
    gemm_nt<Element, T::kMTiles, T::kNTiles, T::kHeadDim>(s, sm.q, warp_row0, sm.k[slot], 0, lane);
    if (!mask.tile_is_full(row_begin, row_begin + rows, key0, key0 + T::kBlockN))
      mask_scores(s, mask, row_begin + warp_row0, key0, lane);
    softmax.update(s, acc_o, scale_log2);
    gemm_rn<Element, T::kMTiles, T::kDTiles, T::kNTiles>(acc_o, s, sm.v[slot], 0, lane);
  }

  float row_lse[T::kMTiles][2];
  softmax.finalize(acc_o, row_lse, scale_log2);
  // Each warp stages its own rows of O in its own rows of the Q tile, then stores them 16 bytes
  // at a time; no other warp touches those rows, so a warp barrier suffices.
  sync_warp();
  store_frags_to_smem<Element>(sm.q, acc_o, warp_row0, 0, lane, 1.f);
  sync_warp();
  store_tile<T::kWarpRows, T::kHeadDim, T::kStride, 32>(block.o_tile + warp_row0 * o_row_stride, o_row_stride,
                                                        &sm.q[warp_row0], rows - warp_row0, head_dim, lane);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < T::kMTiles; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + 16 * mt + g + 8 * h;
      if (t == 0 && row < rows) block.lse_tile[row] = row_lse[mt][h];
    }
}
