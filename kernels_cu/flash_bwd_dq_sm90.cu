// The dQ pass of flash_bwd_dq.cu on Hopper warpgroup MMAs (wgmma, sm_90a): one thread block per
// Q tile walks the K/V tiles in a fixed order and keeps dQ in registers, so no atomics and
// bitwise-repeatable results. Each 4-warp warpgroup owns 64 query rows. deterministic=True runs
// it, and so does the default backward at head dims above 128, where it was faster than adding
// dQ from the dK/dV kernel (cupyflash/kernels/flash_bwd_dkdv_sm90.py, atomic_dq_by_default).
//
// Why a second kernel: deterministic=True ran this pass on mma.sync, at 0.61-0.87x the default
// backward on an H200 (README, 2026-12-02), while the dK/dV kernel beside it runs on wgmma. The
// shape is flash_fwd_sm90.cu's, with three products per K/V tile instead of two:
//     S = Q K^T and dP = dO V^T         wgmma, both operands shared and K-major
//     P = exp2(S scale_log2 - lse_log2), dS = P (dP - delta)   in registers
//     dQ += dS K                        wgmma, dS from registers, K shared and read MN-major
// finally dQ *= softmax_scale. Masking, tails, GQA and the lse / delta conventions are
// flash_bwd_dq.cu's.
//
// Compile-time macros: CF_ELEMENT, CF_HEAD_DIM (a multiple of 32 up to 256), CF_BLOCK_N (64 | 128),
// CF_NUM_WARPS (4 | 8), CF_STAGES, CF_SMEM_BYTES.
#include "gemm.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "sequence.cuh"
#include "tile_io.cuh"
#include "traits.cuh"
#include "wgmma_gemm.cuh"

namespace cf {
// The forward's tile shape (Sm90FwdTraits) over tiles of whole 64-column slabs: head dims 96 and 160
// are stored as 128 and 192, zero-filled past head_dim by the copies. S and dP run over the
// kernel's own head dim only (kQkDepth); dQ = dS K over every slab (its zero columns are not stored).
constexpr int kQkDepth = CF_HEAD_DIM;
using Sm90Dq = Sm90FwdTraits<(CF_HEAD_DIM + 63) / 64 * 64, CF_BLOCK_N, CF_NUM_WARPS, CF_STAGES>;
using Element = CF_ELEMENT;

template <class T>
struct Sm90DqSmem {
  u16 q[T::kBlockM * T::kHeadDim];  // reused to stage dQ for coalesced stores
  u16 dout[T::kBlockM * T::kHeadDim];
  u16 k[T::kStages][T::kBlockN * T::kHeadDim];
  u16 v[T::kStages][T::kBlockN * T::kHeadDim];
};
}  // namespace cf

// cupyflash/kernels/flash_bwd_dq_sm90.py computes the same size for the launch; the build passes it here.
static_assert(sizeof(cf::Sm90DqSmem<cf::Sm90Dq>) + cf::kSmemAlignSlack == CF_SMEM_BYTES,
              "cupyflash/kernels/flash_bwd_dq_sm90.py smem_bytes() disagrees with the kernel's layout");

// Reads BwdParams (params.cuh): q, k, v, dout, lse_log2, delta; writes dq. Grid: (ceil(seqlen_q /
// kBlockM), heads_q, batch); block: kThreads; dynamic smem: Sm90DqSmem plus kSmemAlignSlack.
extern "C" __global__ void __launch_bounds__(cf::Sm90Dq::kThreads, 1)
    flash_bwd_dq_sm90(const __grid_constant__ cf::BwdParams p) {
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
  const float scale_log2 = p.scale_log2;
  const float softmax_scale = p.softmax_scale;
  const u16* __restrict__ q = p.q.ptr + seq.q_row0 * p.q.row_stride;
  const u16* __restrict__ k = p.k.ptr + seq.k_row0 * p.k.row_stride;
  const u16* __restrict__ v = p.v.ptr + seq.k_row0 * p.v.row_stride;
  const u16* __restrict__ dout = p.dout.ptr + seq.q_row0 * p.dout.row_stride;
  const float* __restrict__ lse_log2 = p.lse_log2;
  const float* __restrict__ delta = p.delta;
  u16* __restrict__ dq = p.dq.ptr + seq.q_row0 * p.dq.row_stride;
  using T = Sm90Dq;
  extern __shared__ Vec16 smem_raw[];
  const u32 raw_address = smem_addr(smem_raw);
  const u32 smem_base = (raw_address + kSmemAlignSlack - 1) & ~static_cast<u32>(kSmemAlignSlack - 1);
  Sm90DqSmem<T>& sm = *reinterpret_cast<Sm90DqSmem<T>*>(reinterpret_cast<char*>(smem_raw) +
                                                      (smem_base - raw_address));

  const int m_block = gridDim.x - 1 - blockIdx.x;  // causal: the longest rows first
  const int head = blockIdx.y, batch = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warpgroup = warp / 4, g = lane >> 2;
  const Mask mask{seqlen_q, seqlen_k, window_left, window_right};
  const int row_begin = m_block * T::kBlockM;
  const int rows = min(T::kBlockM, seqlen_q - row_begin);
  if constexpr (kVarlen)
    if (rows <= 0) return;  // past this sequence's last query
  const int kv_head = head / group_size;

  u16* dq_tile = dq + batch * dq_batch_stride + head * dq_head_stride + row_begin * dq_row_stride;
  int n_begin, n_end;
  mask.key_tiles<T::kBlockN>(row_begin, row_begin + rows, n_begin, n_end);
  if (n_end <= n_begin) {  // these rows see no key: their dQ is 0
    store_zero_tile<T::kBlockM, T::kHeadDim, T::kThreads>(dq_tile, dq_row_stride, rows, head_dim, tid);
    return;
  }
  const int n_tiles = n_end - n_begin;
  const u16* k_head = k + batch * k_batch_stride + kv_head * k_head_stride;
  const u16* v_head = v + batch * v_batch_stride + kv_head * v_head_stride;
  constexpr int kKvTileBytes = T::kBlockN * T::kHeadDim * 2;
  const u32 q_smem = smem_addr(sm.q), do_smem = smem_addr(sm.dout);
  const u32 k_smem = smem_addr(sm.k[0]), v_smem = smem_addr(sm.v[0]);
  auto load_kv = [&](int slot, int n_block) {
    const int key0 = n_block * T::kBlockN;
    const int keys = min(T::kBlockN, seqlen_k - key0);
    load_tile_swizzled_async<T::kBlockN, T::kHeadDim, T::kThreads>(
        k_smem + slot * kKvTileBytes, k_head + key0 * k_row_stride, k_row_stride, keys, head_dim, tid);
    load_tile_swizzled_async<T::kBlockN, T::kHeadDim, T::kThreads>(
        v_smem + slot * kKvTileBytes, v_head + key0 * v_row_stride, v_row_stride, keys, head_dim, tid);
  };

  // Prologue: Q, dO and the first kStages - 1 K/V tiles, one commit group per tile (Q and dO join
  // the first).
  load_tile_swizzled_async<T::kBlockM, T::kHeadDim, T::kThreads>(
      q_smem, q + batch * q_batch_stride + head * q_head_stride + row_begin * q_row_stride, q_row_stride, rows,
      head_dim, tid);
  load_tile_swizzled_async<T::kBlockM, T::kHeadDim, T::kThreads>(
      do_smem, dout + batch * do_batch_stride + head * do_head_stride + row_begin * do_row_stride, do_row_stride,
      rows, head_dim, tid);
#pragma unroll
  for (int s = 0; s < T::kStages - 1; ++s) {
    if (s < n_tiles) load_kv(s, n_begin + s);
    cp_async_commit();
  }

  // Row statistics of the two rows this thread owns (rows g and g + 8 of its warp's 16); rows past
  // seqlen_q get lse_log2 = +inf, so their P (and dS) is 0.
  const int warp_row0 = warp * T::kWarpRows;
  float row_lse_log2[2], row_delta[2];
  const i64 stats = seq.stats(head, row_begin);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp_row0 + g + 8 * h;
    row_lse_log2[h] = row < rows ? lse_log2[stats + row] : infinity();
    row_delta[h] = row < rows ? delta[stats + row] : 0.f;
  }

  // Descriptors (see flash_fwd_sm90.cu): Q, dO, K and V K-major for S and dP (the warpgroup's
  // rows start 64 rows in); K read MN-major by 64-column slabs for dQ = dS K.
  const u64 q_desc = wgmma_desc_sw128(q_smem + warpgroup * 64 * 128, 16, T::kSwizzleBytes);
  const u64 do_desc = wgmma_desc_sw128(do_smem + warpgroup * 64 * 128, 16, T::kSwizzleBytes);
  const u64 k_desc0 = wgmma_desc_sw128(k_smem, 16, T::kSwizzleBytes);
  const u64 v_desc0 = wgmma_desc_sw128(v_smem, 16, T::kSwizzleBytes);
  const u64 k_mn_desc0 = wgmma_desc_sw128(k_smem, T::kSwizzleBytes, T::kSwizzleBytes);

  float acc_dq[T::kDTiles][4];
  float s[1][T::kNTiles][4];  // S, then P
  float dp[T::kNTiles][4];    // dP, then dS
  zero(acc_dq);
  zero(s);
  zero(dp);
  u32 ds_frag[T::kBlockN / 16][4];
  for (int it = 0; it < n_tiles; ++it) {
    // Tile `it` has landed once at most kStages - 2 younger groups are in flight. The fence hands
    // this thread's copies to the async proxy; the barrier tells every warpgroup that all copies
    // landed and that the slot refilled below is no longer read (each warpgroup waited for its
    // last dQ product before it got here).
    cp_async_wait<T::kStages - 2>();
    fence_proxy_async();
    __syncthreads();
    const int next = it + T::kStages - 1;
    if (next < n_tiles) load_kv(next % T::kStages, n_begin + next);
    cp_async_commit();

    const u64 slot_offset = static_cast<u64>((it % T::kStages) * kKvTileBytes) >> 4;
    const int key0 = (n_begin + it) * T::kBlockN;
    // S and dP in two commit groups: P = exp2(...) runs while the tensor cores compute dP.
    wgmma_fence();
    wgmma_k_major<Element, T::kBlockN, T::kBlockM, kQkDepth>(s[0], q_desc, k_desc0 + slot_offset);  // S
    wgmma_commit();
    wgmma_k_major<Element, T::kBlockN, T::kBlockM, kQkDepth>(dp, do_desc, v_desc0 + slot_offset);  // dP
    wgmma_commit();
    wgmma_wait<1>();
    wgmma_fence_operands(s[0]);
    if (!mask.tile_is_full(row_begin, row_begin + rows, key0, key0 + T::kBlockN))
      mask_scores(s, mask, row_begin + warp_row0, key0, lane);
#pragma unroll
    for (int nt = 0; nt < T::kNTiles; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[0][nt][c] = exp2_approx(fmaf(s[0][nt][c], scale_log2, -row_lse_log2[c / 2]));
    wgmma_wait<0>();
    wgmma_fence_operands(dp);
#pragma unroll
    for (int nt = 0; nt < T::kNTiles; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) dp[nt][c] = s[0][nt][c] * (dp[nt][c] - row_delta[c / 2]);
    pack_a_frags<Element, T::kBlockN>(ds_frag, dp);

    wgmma_fence();
    wgmma_rs_mn_major<Element, T::kBlockN, T::kSlabs>(acc_dq, ds_frag, k_mn_desc0 + slot_offset);  // dQ += dS K
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(acc_dq);
  }

  // dQ (times softmax_scale: S = scale Q K^T) is staged in the Q tile for 16-byte stores. Every
  // warpgroup must be done reading Q first.
#pragma unroll
  for (int nt = 0; nt < T::kDTiles; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc_dq[nt][c] *= softmax_scale;
  __syncthreads();
  store_frags_swizzled<Element, T::kBlockM, T::kDTiles>(sm.q, acc_dq, warp_row0, lane);
  __syncthreads();
  store_tile_swizzled<T::kBlockM, T::kHeadDim, T::kThreads>(dq_tile, dq_row_stride, sm.q, rows, head_dim, tid);
}
