// FlashAttention-2 backward dK/dV (and atomic dQ) on Hopper warpgroup MMAs (wgmma, sm_90a): the
// algorithm and the arguments of flash_bwd_dkdv.cu, with each 4-warp warpgroup owning 64 keys.
//
// Why a second kernel: the mma.sync dK/dV kernel reaches about 0.75x FlashAttention-2 on an H100
// (benchmarks/results/h100-2026-11-23-wgmma); wgmma reads its shared operands directly and runs
// at the tensor cores' Hopper rate. Per Q / dO tile, for the warpgroup's 64 keys:
//     S^T = K Q^T and dP^T = V dO^T     wgmma, both operands shared and K-major
//     P^T = exp2(S^T scale_log2 - lse_log2),  dS^T = P^T (dP^T - delta)   in registers
//     dV += P^T dO and dK += dS^T Q      wgmma, A from registers, B shared and MN-major
//     dQ += dS K (CF_ACCUM_DQ)           dS^T goes through shared memory (every warpgroup's keys
//                                        are needed), then wgmma with both operands MN-major; the
//                                        float32 result is staged in shared memory and added into
//                                        dq_accum by the copy engine (cp.reduce.async.bulk)
// Masking, tails, GQA and the lse / delta conventions are flash_bwd_dkdv.cu's. Head dim 256
// splits head_dim between the warpgroups instead (kSplitD, see Sm90DkdvTraits): S^T and dP^T
// are one GEMM per warpgroup, and dV, dK read P^T and dS^T from shared memory. Other head dims
// run in the tiles of the next of these up (Sm90DkdvTraits::kTileDim), zero-filled.
//
// Compile-time macros: CF_ELEMENT, CF_HEAD_DIM (a multiple of 32 up to 256), CF_BLOCK_M (64 | 128),
// CF_NUM_WARPS (4 | 8), CF_STAGES, CF_ACCUM_DQ (0 | 1), CF_SMEM_BYTES.
#include "gemm.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "sequence.cuh"
#include "tile_io.cuh"
#include "traits.cuh"
#include "wgmma_gemm.cuh"

namespace cf {
using Sm90Dkdv = Sm90DkdvTraits<CF_HEAD_DIM, CF_BLOCK_M, CF_NUM_WARPS, CF_STAGES, CF_ACCUM_DQ>;
using Element = CF_ELEMENT;
using Sm90DkdvShared = Select<Sm90Dkdv::kSplitD, Sm90DkdvSplitSmem<Sm90Dkdv>, Sm90DkdvSmem<Sm90Dkdv>>::type;

// acc (64 x kAccCols) += A B for kSplitD: A (64 keys x kBlockM) a K-major shared tile, B a
// shared tile of kBlockM rows read MN-major, from column slab b_slab0 on. (Every slab, also
// warpgroup 1's second one past head dims 160 and 192: leaving it out is a branch on the
// warpgroup around wgmma, and ptxas then serialised every wgmma of the kernel, C7520.)
template <class T>
__device__ __forceinline__ void wgmma_ss_over_q(float (&acc)[T::kDTiles][4], u64 a_desc, u64 b_desc, int b_slab0) {
#pragma unroll
  for (int kk = 0; kk < T::kBlockM / 16; ++kk)
#pragma unroll
    for (int slab = 0; slab < T::kAccSlabs; ++slab) {
      const int a_offset = (kk / 4) * T::kBlockN * 128 + (kk % 4) * 32;
      const int b_offset = (b_slab0 + slab) * T::kBlockM * 128 + kk * 16 * 128;
      wgmma_ss_tb<Element::kIsBf16, false>(*reinterpret_cast<float(*)[8][4]>(&acc[8 * slab][0]),
                                           a_desc + (a_offset >> 4), b_desc + (b_offset >> 4), 1);
    }
}

// S^T -> P^T = exp2(S^T scale_log2 - lse_log2), in place (lse_log2 of the tile's query columns).
template <class T>
__device__ __forceinline__ void to_probabilities(float (&st)[T::kQTiles][4], const float* lse_log2, float scale_log2,
                                                 int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < T::kQTiles; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c)
      st[nt][c] = exp2_approx(fmaf(st[nt][c], scale_log2, -lse_log2[8 * nt + 2 * t + (c & 1)]));
}

// dP^T -> dS^T = P^T (dP^T - delta), in place.
template <class T>
__device__ __forceinline__ void to_score_gradients(const float (&pt)[T::kQTiles][4], float (&dpt)[T::kQTiles][4],
                                                   const float* delta, int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < T::kQTiles; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) dpt[nt][c] = pt[nt][c] * (dpt[nt][c] - delta[8 * nt + 2 * t + (c & 1)]);
}

// P^T's shared tile: only the kSplitD layout has one.
template <class T>
__device__ __forceinline__ u16* p_transposed_tile(Sm90DkdvSmem<T>&) {
  return nullptr;
}
template <class T>
__device__ __forceinline__ u16* p_transposed_tile(Sm90DkdvSplitSmem<T>& sm) {
  return sm.pt;
}

// Why bulk reductions into DqUnits (traits.cuh): the per-thread red.global.add.v2.f32 of every
// dQ element made the L2 the limit of this kernel (ncu at head_dim 256: L2 72% busy, the SM
// 30%); on an H200 the kernel with the adds left out ran 1.3-1.5x faster at head_dim 64, 1.5-1.8x
// at 128 and 1.7-2.0x at 256. Bulk reductions gained a median 3%, 12% and 12% there, and left the
// L2 53% busy at 256 (benchmarks/results/h200-2026-12-01). Four-float red.add (v4) gained nothing.
//
// Columns [kPart kDqStageCols, +kDqStageCols) of a warpgroup's 64 x 64 dQ piece (acc, the m64n64
// accumulator layout: this warp's rows 16 (warp % 4) + g and + 8, columns 8 nt + 2 t and + 1)
// into the staging buffer, laid out as kDqStageCols / 32 consecutive DqUnits. Row r's chunk
// c = 2 (nt % 4) + t / 2 goes to chunk c ^ (r % 8) = 2 (nt % 4) ^ (g ^ t / 2): DqUnits::chunk_offset
// with the lane's part of it computed once.
template <class T, int kPart>
__device__ __forceinline__ void stage_dq_part(u32 stage, const float (&acc)[8][4], int warp, int lane) {
  const int g = lane >> 2, t = lane & 3, swizzle = g ^ (t >> 1);
  const u32 lane_row = stage + ((warp % 4) * 16 + g) * DqUnits::kCols * 4 + (t & 1) * 8;  // bytes
#pragma unroll
  for (int j = 0; j < T::kDqStageCols / 8; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int nt = kPart * (T::kDqStageCols / 8) + j;
      const u32 address = lane_row + (j / 4) * DqUnits::kFloats * 4 + h * 8 * DqUnits::kCols * 4 +
                          ((2 * (j % 4)) ^ swizzle) * 16;
      st_shared_f32x2(address, acc[nt][2 * h], acc[nt][2 * h + 1]);
    }
}

// dq_accum += one 64 x 64 dQ piece of a warpgroup, kDqStageCols columns at a time: every thread
// stores its fragments into the warpgroup's staging buffer, then the warpgroup's first thread
// (the leader) hands the part to the copy engine as one bulk reduction and goes on. piece_dst is
// the piece's first unit in dq_accum (DqUnits::unit), col0 its first column. Without `inside` (a
// piece past the last query row, whose unit does not exist) nothing is added; nor are the units
// at and past column kHeadDim of a head dim that is not whole slabs (dq_accum has none there).
template <class T>
__device__ __forceinline__ void add_dq_piece(float* piece_dst, u32 stage, const float (&acc)[8][4], int warp,
                                             int lane, bool inside, int col0) {
  const int barrier = 1 + warp / 4;  // one per warpgroup; named barrier 0 is __syncthreads'
  const bool leader = warp % 4 == 0 && lane == 0;
  constexpr int kStageUnits = T::kDqStageCols / DqUnits::kCols;
#pragma unroll
  for (int part = 0; part < 64 / T::kDqStageCols; ++part) {
    if (leader) bulk_wait_read<0>();  // the previous part has been read out of the buffer
    named_barrier_sync(barrier, 128);
    if (part == 0) stage_dq_part<T, 0>(stage, acc, warp, lane);
    if (part == 1) stage_dq_part<T, 1>(stage, acc, warp, lane);
    fence_proxy_async();  // the stores, to the copy engine's (async) proxy
    named_barrier_sync(barrier, 128);
    int units = kStageUnits;  // of this part that dq_accum has
    if constexpr (T::kHeadDim != T::kTileDim)
      units = min(kStageUnits, (T::kHeadDim - col0 - part * T::kDqStageCols) / DqUnits::kCols);
    if (leader && inside && units > 0) {
      bulk_reduce_add_f32(piece_dst + part * kStageUnits * DqUnits::kFloats, stage, units * DqUnits::kFloats * 4);
      bulk_commit();
    }
  }
}
}  // namespace cf

// cupyflash/kernels/flash_bwd_dkdv_sm90.py computes the same size for the launch; the build passes it here.
static_assert(sizeof(cf::Sm90DkdvShared) + cf::kSmemAlignSlack == CF_SMEM_BYTES,
              "cupyflash/kernels/flash_bwd_dkdv_sm90.py smem_bytes() disagrees with the kernel's layout");

// Reads and writes what flash_bwd_dkdv does (BwdParams, params.cuh), with kBlockN keys per
// block (Sm90DkdvTraits), except dq_accum: float32 in the DqUnits layout (traits.cuh), so its
// strides are unused. Block: kThreads; dynamic smem: Sm90DkdvShared plus kSmemAlignSlack.
extern "C" __global__ void __launch_bounds__(cf::Sm90Dkdv::kThreads, 1)
    flash_bwd_dkdv_sm90(const __grid_constant__ cf::BwdParams p) {
  using namespace cf;
  // The fields the body reads, as values: a lambda capturing p by reference would read them
  // through p's address (ld.param [reg]) in every iteration instead of once.
  const Sequence seq = sequence_of(p, blockIdx.z);  // this batch entry's lengths (CF_VARLEN: its own)
  const int seqlen_q = seq.seqlen_q;
  const int seqlen_k = seq.seqlen_k;
  const int window_left = p.window_left;
  const int window_right = p.window_right;
  const i64 dk_batch_stride = kVarlen ? 0 : p.dk.batch_stride;
  const i64 dk_head_stride = p.dk.head_stride;
  const i64 dk_row_stride = p.dk.row_stride;
  const i64 dv_batch_stride = kVarlen ? 0 : p.dv.batch_stride;
  const i64 dv_head_stride = p.dv.head_stride;
  const i64 dv_row_stride = p.dv.row_stride;
  const int head_dim = p.head_dim;
  const int group_size = p.group_size;
  const i64 k_batch_stride = kVarlen ? 0 : p.k.batch_stride;
  const i64 k_head_stride = p.k.head_stride;
  const i64 k_row_stride = p.k.row_stride;
  const i64 v_batch_stride = kVarlen ? 0 : p.v.batch_stride;
  const i64 v_head_stride = p.v.head_stride;
  const i64 v_row_stride = p.v.row_stride;
  const i64 q_batch_stride = kVarlen ? 0 : p.q.batch_stride;
  const i64 q_head_stride = p.q.head_stride;
  const i64 q_row_stride = p.q.row_stride;
  const i64 do_batch_stride = kVarlen ? 0 : p.dout.batch_stride;
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
  float* __restrict__ dq_accum = p.dq_accum;
  u16* __restrict__ dk = p.dk.ptr + seq.k_row0 * p.dk.row_stride;
  u16* __restrict__ dv = p.dv.ptr + seq.k_row0 * p.dv.row_stride;
  using T = Sm90Dkdv;
  extern __shared__ Vec16 smem_raw[];
  const u32 raw_address = smem_addr(smem_raw);
  const u32 smem_base = (raw_address + kSmemAlignSlack - 1) & ~static_cast<u32>(kSmemAlignSlack - 1);
  Sm90DkdvShared& sm = *reinterpret_cast<Sm90DkdvShared*>(reinterpret_cast<char*>(smem_raw) +
                                                         (smem_base - raw_address));

  const int n_block = blockIdx.x;  // under a causal mask the first key tiles have the most work
  const int kv_head = blockIdx.y, batch = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warpgroup = warp / 4, t = lane & 3;
  // CF_VARLEN's dQ accumulator layout (DqUnits::packed_unit); unused with fixed lengths.
  const int dq_unit_rows = DqUnits::packed_unit_rows(seq.total_q, p.batch);
  const int first_dq_unit = DqUnits::first_packed_unit(seq.q_row0, batch);
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
    store_zero_tile<T::kBlockN, T::kTileDim, T::kThreads>(dk_tile, dk_row_stride, keys, head_dim, tid);
    store_zero_tile<T::kBlockN, T::kTileDim, T::kThreads>(dv_tile, dv_row_stride, keys, head_dim, tid);
    return;
  }
  const int m_tiles = m_end - m_begin;
  const int iters = group_size * m_tiles;  // (q head of the group, Q tile) pairs

  constexpr int kQTileBytes = T::kBlockM * T::kTileDim * 2;
  const u32 k_smem = smem_addr(sm.k), v_smem = smem_addr(sm.v);
  const u32 q_smem = smem_addr(sm.q[0]), do_smem = smem_addr(sm.dout[0]), dst_smem = smem_addr(sm.dst);
  load_tile_swizzled_async<T::kBlockN, T::kTileDim, T::kThreads>(
      k_smem, k + batch * k_batch_stride + kv_head * k_head_stride + key_begin * k_row_stride, k_row_stride, keys,
      head_dim, tid);
  load_tile_swizzled_async<T::kBlockN, T::kTileDim, T::kThreads>(
      v_smem, v + batch * v_batch_stride + kv_head * v_head_stride + key_begin * v_row_stride, v_row_stride, keys,
      head_dim, tid);
  auto load_q_tile = [&](int slot, int it) {
    const int head = kv_head * group_size + it / m_tiles;
    const int row0 = (m_begin + it % m_tiles) * T::kBlockM;
    const int rows = min(T::kBlockM, seqlen_q - row0);
    load_tile_swizzled_async<T::kBlockM, T::kTileDim, T::kThreads>(
        q_smem + slot * kQTileBytes, q + batch * q_batch_stride + head * q_head_stride + row0 * q_row_stride,
        q_row_stride, rows, head_dim, tid);
    load_tile_swizzled_async<T::kBlockM, T::kTileDim, T::kThreads>(
        do_smem + slot * kQTileBytes,
        dout + batch * do_batch_stride + head * do_head_stride + row0 * do_row_stride, do_row_stride, rows,
        head_dim, tid);
    const i64 stats = seq.stats(head, row0);
    load_rows_async<T::kBlockM, T::kThreads>(sm.lse_log2[slot], lse_log2 + stats, rows, tid);
    load_rows_async<T::kBlockM, T::kThreads>(sm.delta[slot], delta + stats, rows, tid);
  };
#pragma unroll
  for (int s = 0; s < T::kStages - 1; ++s) {  // K and V join the first group
    if (s < iters) load_q_tile(s, s);
    cp_async_commit();
  }

  // Descriptors (see flash_fwd_sm90.cu): K, V, Q and dO K-major for S^T and dP^T; Q and dO
  // MN-major for dK and dV; dS^T and K MN-major for dQ. Without kSplitD the warpgroup's keys
  // start 64 rows in; with it, both warpgroups have the same keys and their own columns.
  const int key_rows_in = T::kSplitD ? 0 : warpgroup * 64;
  const int acc_slab0 = T::kSplitD ? warpgroup * T::kAccSlabs : 0;  // first head_dim slab of dK, dV
  const u64 k_desc = wgmma_desc_sw128(k_smem + key_rows_in * 128, 16, T::kSwizzleBytes);
  const u64 v_desc = wgmma_desc_sw128(v_smem + key_rows_in * 128, 16, T::kSwizzleBytes);
  const u64 q_desc0 = wgmma_desc_sw128(q_smem, 16, T::kSwizzleBytes);
  const u64 do_desc0 = wgmma_desc_sw128(do_smem, 16, T::kSwizzleBytes);
  const u64 q_mn_desc0 = wgmma_desc_sw128(q_smem, T::kSwizzleBytes, T::kSwizzleBytes);
  const u64 do_mn_desc0 = wgmma_desc_sw128(do_smem, T::kSwizzleBytes, T::kSwizzleBytes);
  const u64 dst_mn_desc = wgmma_desc_sw128(dst_smem, T::kSwizzleBytes, T::kSwizzleBytes);
  const u64 k_mn_desc = wgmma_desc_sw128(k_smem, T::kSwizzleBytes, T::kSwizzleBytes);

  const int key_row0 = T::kSplitD ? (warp % 4) * 16 : warp * 16;  // this warp's 16 keys of the block
  float acc_dk[T::kDTiles][4], acc_dv[T::kDTiles][4];
  float st[T::kQTiles][4], dpt[T::kQTiles][4];  // S^T then P^T; dP^T then dS^T
  zero(acc_dk);
  zero(acc_dv);
  zero(st);
  zero(dpt);
  u32 p_frag[T::kBlockM / 16][4], ds_frag[T::kBlockM / 16][4];  // (not with kSplitD)

  // Issue the next tile's copies under this tile's S^T and dP^T GEMMs rather than before them: the
  // tensor cores start first. Before them, the GEMMs of some builds waited on the copies' address
  // registers (ncu, H200, 2026-12-02: d128 dK/dV 6693 -> 5771 us, causal varlen 3626 -> 3059).
  // Not in the deterministic varlen build, where the later copies make ptxas spill (24 B at d128).
  constexpr bool kCopiesUnderGemms = T::kAccumDq || !kVarlen;
  for (int it = 0; it < iters; ++it) {
    cp_async_wait<T::kStages - 2>();
    fence_proxy_async();  // this thread's copies (and last tile's dS^T stores) to the async proxy
    __syncthreads();      // tile `it` landed everywhere; the slot refilled below and dS^T are free
    const int next = it + T::kStages - 1;
    auto issue_next_copies = [&] {
      if (next < iters) load_q_tile(next % T::kStages, next);
      cp_async_commit();
    };
    if constexpr (!kCopiesUnderGemms) issue_next_copies();

    const int slot = it % T::kStages;
    const u64 slot_offset = static_cast<u64>(slot * kQTileBytes) >> 4;
    const int head = kv_head * group_size + it / m_tiles;
    const int row0 = (m_begin + it % m_tiles) * T::kBlockM;
    const int rows = min(T::kBlockM, seqlen_q - row0);

    if constexpr (T::kSplitD) {
      // Warpgroup 0: S^T and P^T; warpgroup 1: dP^T, then dS^T once P^T is in shared memory.
      // Both are K-major A operands of dV and dK.
      u16* const pt_tile = p_transposed_tile(sm);
      const u64 pt_desc = wgmma_desc_sw128(smem_addr(pt_tile), 16, T::kSwizzleBytes);
      const u64 dst_desc = wgmma_desc_sw128(dst_smem, 16, T::kSwizzleBytes);
      wgmma_fence();
      wgmma_k_major<Element, T::kBlockM, T::kBlockN, T::kHeadDim>(st, warpgroup == 0 ? k_desc : v_desc,
                                              (warpgroup == 0 ? q_desc0 : do_desc0) + slot_offset);
      wgmma_commit();
      if constexpr (kCopiesUnderGemms) issue_next_copies();
      wgmma_wait<0>();
      wgmma_fence_operands(st);
      if (warpgroup == 0) {
        if (!mask.tile_is_full(row0, row0 + rows, key_begin, key_begin + T::kBlockN))
          mask_scores_transposed(*reinterpret_cast<float(*)[1][T::kQTiles][4]>(&st), mask, key_begin + key_row0,
                                 row0, lane);
        to_probabilities<T>(st, sm.lse_log2[slot], scale_log2, lane);
        store_frags_swizzled<Element, T::kBlockN, T::kQTiles>(pt_tile, st, key_row0, lane);
      }
      __syncthreads();
      if (warpgroup == 1) {  // st holds dP^T here
        float pt[T::kQTiles][4];
        load_frags_swizzled<Element, T::kBlockN, T::kQTiles>(pt_tile, pt, key_row0, lane);
        to_score_gradients<T>(pt, st, sm.delta[slot], lane);
        store_frags_swizzled<Element, T::kBlockN, T::kQTiles>(sm.dst, st, key_row0, lane);
      }
      fence_proxy_async();
      __syncthreads();  // P^T and dS^T complete in shared memory
      wgmma_fence();
      wgmma_ss_over_q<T>(acc_dv, pt_desc, do_mn_desc0 + slot_offset, acc_slab0);
      wgmma_ss_over_q<T>(acc_dk, dst_desc, q_mn_desc0 + slot_offset, acc_slab0);
      wgmma_commit();
    } else {
      wgmma_fence();
      wgmma_k_major<Element, T::kBlockM, T::kBlockN, T::kHeadDim>(st, k_desc, q_desc0 + slot_offset);
      wgmma_k_major<Element, T::kBlockM, T::kBlockN, T::kHeadDim>(dpt, v_desc, do_desc0 + slot_offset);
      wgmma_commit();
      if constexpr (kCopiesUnderGemms) issue_next_copies();
      wgmma_wait<0>();
      wgmma_fence_operands(st);
      wgmma_fence_operands(dpt);

      if (!mask.tile_is_full(row0, row0 + rows, key_begin, key_begin + T::kBlockN))
        mask_scores_transposed(*reinterpret_cast<float(*)[1][T::kQTiles][4]>(&st), mask, key_begin + key_row0, row0,
                               lane);
      // to_probabilities + to_score_gradients in one pass: two passes compile to different
      // code (same registers, no spills), not yet measured on a GPU.
      const float* lse_row = sm.lse_log2[slot];
      const float* delta_row = sm.delta[slot];
#pragma unroll
      for (int nt = 0; nt < T::kQTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int i = 8 * nt + 2 * t + (c & 1);
          const float prob = exp2_approx(fmaf(st[nt][c], scale_log2, -lse_row[i]));
          st[nt][c] = prob;
          dpt[nt][c] = prob * (dpt[nt][c] - delta_row[i]);
        }
      pack_a_frags<Element, T::kBlockM>(p_frag, st);
      pack_a_frags<Element, T::kBlockM>(ds_frag, dpt);

      wgmma_fence();
      wgmma_rs_mn_major<Element, T::kBlockM, T::kAccSlabs>(acc_dv, p_frag, do_mn_desc0 + slot_offset);
      wgmma_rs_mn_major<Element, T::kBlockM, T::kAccSlabs>(acc_dk, ds_frag, q_mn_desc0 + slot_offset);
      wgmma_commit();
    }

    if constexpr (T::kAccumDq) {
      // dQ needs dS over all of the block's keys: every warpgroup writes its dS^T rows, then each
      // computes its 64 x 64 pieces of dQ = dS K from shared memory while dK and dV run, and adds
      // them into dq_accum (add_dq_piece).
      constexpr int kDealtPieces = (T::kDqPieces + T::kWarpgroups - 1) / T::kWarpgroups * T::kWarpgroups;
      if constexpr (!T::kSplitD) {  // (kSplitD wrote dS^T above)
        store_frags_swizzled<Element, T::kBlockN, T::kQTiles>(sm.dst, dpt, key_row0, lane);
        fence_proxy_async();
        __syncthreads();
      }
#pragma unroll
      for (int dealt = warpgroup; dealt < kDealtPieces; dealt += T::kWarpgroups) {
        // Both warpgroups run as many pieces, so as many named barriers: with an odd count of
        // pieces (head dims 160 and 192; Q tiles of 64 at 32 and 64) racecheck reported hazards
        // on P^T and on the dK staging, as it did on 2026-12-02 (below). The extra one repeats the
        // last piece and adds nothing.
        const bool extra = dealt >= T::kDqPieces;
        const int piece = extra ? T::kDqPieces - 1 : dealt;
        const int mq = piece / T::kUsedSlabs, slab = piece % T::kUsedSlabs;  // query block, head_dim slab
        float acc_dq[8][4];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < T::kBlockN / 16; ++kk) {
          const int a_offset = mq * T::kBlockN * 128 + kk * 16 * 128;
          const int b_offset = slab * T::kBlockN * 128 + kk * 16 * 128;
          wgmma_ss_tb<Element::kIsBf16, true>(acc_dq, dst_mn_desc + (a_offset >> 4), k_mn_desc + (b_offset >> 4),
                                              kk > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(acc_dq);
        // dq_accum rounds seqlen_q up to 64 rows (DqUnits), not to kBlockM: a piece that starts
        // past the last query row has no unit there, and its zeros would be added into whatever
        // lies beyond the buffer. Only its reduction is left out; the warpgroup still runs every
        // barrier of the piece (skipping the whole piece made racecheck report a hazard on the
        // dK staging at the end of the kernel, 2026-12-02).
        const bool inside = row0 + 64 * mq < seqlen_q && !extra;
        float* unit;
        if constexpr (kVarlen) {
          unit = DqUnits::packed_unit(dq_accum, head, dq_unit_rows, first_dq_unit, T::kHeadDim, row0 + 64 * mq,
                                      64 * slab);
        } else {
          unit = DqUnits::unit(dq_accum, batch, head, heads_q, seqlen_q, T::kHeadDim, row0 + 64 * mq, 64 * slab);
        }
        add_dq_piece<T>(unit, smem_addr(sm.dq_stage[warpgroup]), acc_dq, warp, lane, inside, 64 * slab);
      }
    }
    wgmma_wait<0>();
    wgmma_fence_operands(acc_dv);
    wgmma_fence_operands(acc_dk);
  }

  // Stage dK (times softmax_scale: S = scale Q K^T) and dV in the K and V tiles, then store.
  __syncthreads();  // every warpgroup is done reading K and V
#pragma unroll
  for (int nt = 0; nt < T::kDTiles; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc_dk[nt][c] *= softmax_scale;
  const int acc_col0 = acc_slab0 * 64 * T::kBlockN;  // elements: slabs of kBlockN rows x 64 columns
  store_frags_swizzled<Element, T::kBlockN, T::kDTiles>(sm.k + acc_col0, acc_dk, key_row0, lane);
  store_frags_swizzled<Element, T::kBlockN, T::kDTiles>(sm.v + acc_col0, acc_dv, key_row0, lane);
  __syncthreads();
  store_tile_swizzled<T::kBlockN, T::kTileDim, T::kThreads>(dk_tile, dk_row_stride, sm.k, keys, head_dim, tid);
  store_tile_swizzled<T::kBlockN, T::kTileDim, T::kThreads>(dv_tile, dv_row_stride, sm.v, keys, head_dim, tid);
  if constexpr (T::kAccumDq)
    if (tid % 128 == 0) bulk_wait<0>();  // the staging buffer stays allocated until the last reduction is done
}
