// FlashAttention forward on Hopper with the asynchrony of FlashAttention-3 (sm_90a): bulk tensor
// copies (TMA) issued by a copy warpgroup, two or three computing warpgroups, and P V of one tile
// running on the tensor cores while the softmax of the next tile runs on the other units.
//
// Why a third forward kernel: flash_fwd_sm90.cu issues its cp.async copies from the warps that
// compute and orders them with a __syncthreads per tile, and it waits for each wgmma before the
// softmax. Here nothing waits for everything:
//   - Warpgroup 0 copies. One thread issues each tile's K and V as TMA boxes into a ring of
//     kStages slots; each slot has a "full" mbarrier (the copy engine completes it when the bytes
//     land) and an "empty" one (every computing warp arrives when done reading it). The
//     warpgroup gives its registers to the others (setmaxnreg).
//   - Warpgroups 1 to CF_CONSUMERS compute 64 query rows each, with the tiles' layout, descriptors and
//     fragments of flash_fwd_sm90.cu (Sm90FwdTraits). Per K/V tile t (FlashAttention-3's
//     intra-warpgroup pipelining):
//         issue S(t) = Q K(t)^T;  issue O += P(t-1) V(t-1);  wait S(t);  release K(t)
//         mask S(t); P(t), row max, row sum, correction (softmax.cuh: probabilities)
//         wait P V;  release V(t-1);  O *= correction;  pack P(t)
//     so the exponentials of tile t overlap the P V of tile t - 1. The arithmetic is the same as
//     flash_fwd_sm90's, in the same order.
// Tiles run from the last K/V tile to the first, as in flash_fwd_sm90 (the masked ones first).
// Boxes read past the tensor (rows past seqlen, columns past head_dim) arrive as zeros.
//
// No variable-length batches (a packed sequence's box would read its neighbour's rows): those run
// on flash_fwd_sm90. cupyflash/kernels/flash_fwd_tma.py encodes the tensor maps and says which
// calls can take this kernel.
//
// Compile-time macros (cupyflash/build.py): CF_ELEMENT, CF_HEAD_DIM (a multiple of 32 up to 256),
// CF_BLOCK_N (64 | 128), CF_STAGES, CF_CONSUMERS (2 | 3 computing warpgroups), CF_PINGPONG
// (0 | 1; with 2 only), CF_WIDE_PV (0 | 1): P V as one m64n(64 slabs) wgmma per k16 step instead
// of one m64n64 per slab, CF_WINDOW_LEFT / CF_WINDOW_RIGHT, CF_VARLEN (must be 0).
#include "fwd_block.cuh"
#include "gemm.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "softmax.cuh"
#include "tile_io.cuh"
#include "traits.cuh"
#include "wgmma_gemm.cuh"

namespace cf {
// Tiles hold whole 64-column slabs: head dims 96 and 160 are stored as 128 and 192, their last
// slab half zeros (the boxes read past head_dim as 0). Q K^T runs over the kernel's own head dim
// only; P V over every slab (its zero columns are not stored).
constexpr int kQkDepth = CF_HEAD_DIM;
constexpr int kTileDim = (CF_HEAD_DIM + 63) / 64 * 64;
constexpr int kConsumers = CF_CONSUMERS;
using TmaCompute = Sm90FwdTraits<kTileDim, CF_BLOCK_N, 4 * kConsumers, CF_STAGES>;  // the computing warpgroups
using Element = CF_ELEMENT;
constexpr int kCopyThreads = 128;                                    // warpgroup 0
constexpr int kTmaFwdThreads = kCopyThreads + TmaCompute::kThreads;  // 384 or 512
// setmaxnreg: 128 x 24 + 256 x 240 or 384 x 160 registers, within the SM's 64K.
constexpr int kCopyRegisters = 24, kComputeRegisters = kConsumers == 2 ? 240 : 160;
constexpr int kComputeWarps = TmaCompute::kNWarps;                   // each arrives once on an "empty" barrier
constexpr int kBoxCols = 64;                                         // one 128-byte swizzle span per box
constexpr bool kPingPong = CF_PINGPONG;
constexpr bool kWidePv = CF_WIDE_PV;  // P V: one wgmma per k16 step across the slabs
// Named barriers: 0 is __syncthreads', 1 to 3 each computing warpgroup's store of O, 4 and 5
// their turns (CF_PINGPONG).
constexpr int kTurnBarrier = 4;

// The descriptors of q, k and v: each array's axes innermost first, (head_dim, heads, seqlen,
// batch), in boxes of 64 columns x 1 head x kBlockM (q) or kBlockN (k, v) rows. The second
// kernel parameter.
struct FwdTensorMaps {
  TensorMap q, k, v;
};

template <class T>
struct TmaFwdSmem {
  Sm90FwdSmem<T> tiles;  // a whole number of 1024-byte atoms: the barriers stay out of them
  u64 q_full;
  u64 k_full[T::kStages], v_full[T::kStages];
  u64 k_empty[T::kStages], v_empty[T::kStages];
};
}  // namespace cf

static_assert(!cf::kVarlen, "flash_fwd_tma has no variable-length batches (flash_fwd_sm90 runs them)");
static_assert(cf::kConsumers == 2 || cf::kConsumers == 3, "two or three computing warpgroups");
static_assert(!cf::kPingPong || cf::kConsumers == 2, "the turn-taking is between two warpgroups");
static_assert(sizeof(cf::TmaFwdSmem<cf::TmaCompute>) + cf::kSmemAlignSlack == CF_SMEM_BYTES,
              "cupyflash/kernels/flash_fwd_tma.py smem_bytes() disagrees with the kernel's layout");
static_assert(sizeof(cf::FwdTensorMaps) == 3 * 128, "cupyflash/kernels/flash_fwd_tma.py packs three 128-byte maps");

// Reads and writes what flash_fwd does (FwdParams), with the same grid (ceil(seqlen_q / kBlockM),
// heads_q, batch; kBlockM = 64 kConsumers); q, k and v are read through `maps` instead of their
// pointers. Block: kTmaFwdThreads; dynamic smem: TmaFwdSmem plus kSmemAlignSlack.
extern "C" __global__ void __launch_bounds__(cf::kTmaFwdThreads, 1)
    flash_fwd_tma(const __grid_constant__ cf::FwdParams p, const __grid_constant__ cf::FwdTensorMaps maps) {
  using namespace cf;
  using T = TmaCompute;
  const Sequence seq = sequence_of(p, blockIdx.z);
  const Mask mask{seq.seqlen_q, seq.seqlen_k, p.window_left, p.window_right};
  const FwdBlock block = locate_fwd_block<T::kBlockM, T::kBlockN>(mask, seq, p);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (finish_empty_block<T::kBlockM, T::kHeadDim, kTmaFwdThreads>(block, p.out.row_stride, p.head_dim, tid)) return;
  const int n_tiles = block.n_end - block.n_begin;

  extern __shared__ Vec16 smem_raw[];
  const u32 raw_address = smem_addr(smem_raw);
  const u32 smem_base = (raw_address + kSmemAlignSlack - 1) & ~static_cast<u32>(kSmemAlignSlack - 1);
  TmaFwdSmem<T>& sm = *reinterpret_cast<TmaFwdSmem<T>*>(reinterpret_cast<char*>(smem_raw) + (smem_base - raw_address));
  const u32 q_smem = smem_addr(sm.tiles.q), k_smem = smem_addr(sm.tiles.k[0]), v_smem = smem_addr(sm.tiles.v[0]);
  constexpr int kKvTileBytes = T::kBlockN * T::kHeadDim * 2;
  const u32 q_full = smem_addr(&sm.q_full);
  const u32 k_full = smem_addr(&sm.k_full[0]), v_full = smem_addr(&sm.v_full[0]);
  const u32 k_empty = smem_addr(&sm.k_empty[0]), v_empty = smem_addr(&sm.v_empty[0]);

  if (tid == 0) {
    mbarrier_init(q_full, 1);
    for (int s = 0; s < T::kStages; ++s) {
      mbarrier_init(k_full + 8 * s, 1);  // the copying thread's arrive.expect_tx, then the bytes
      mbarrier_init(v_full + 8 * s, 1);
      mbarrier_init(k_empty + 8 * s, kComputeWarps);
      mbarrier_init(v_empty + 8 * s, kComputeWarps);
    }
    fence_mbarrier_init();
  }
  __syncthreads();  // the last block-wide barrier: from here on, the roles only meet at mbarriers

  if (warp < kCopyThreads / 32) {
    // ---- warpgroup 0: the copies ----
    setmaxnreg_dec<kCopyRegisters>();
    if (tid != 0) return;
    const int kv_head = block.head / p.group_size;
    prefetch_tensormap(&maps.q);
    prefetch_tensormap(&maps.k);
    prefetch_tensormap(&maps.v);
    // One tile of `rows` rows at `row` of `map` into shared memory at `dst`, a box per 64-column
    // slab, all completing the transaction bytes of barrier `full`.
    auto copy_tile = [&](const TensorMap* map, u32 dst, u32 full, int rows, int head, int row) {
      mbarrier_arrive_expect_tx(full, rows * T::kHeadDim * 2);
#pragma unroll
      for (int slab = 0; slab < T::kSlabs; ++slab)
        tma_load_4d(dst + slab * rows * 128, map, full, slab * kBoxCols, head, row, block.batch);
    };
    copy_tile(&maps.q, q_smem, q_full, T::kBlockM, block.head, block.row_begin);
    for (int it = 0; it < n_tiles; ++it) {
      const int slot = it % T::kStages;
      const u32 empty_phase = ((it / T::kStages) & 1) ^ 1;  // the release of tile it - kStages
      const int key0 = (block.n_end - 1 - it) * T::kBlockN;
      const u32 slot_bytes = slot * kKvTileBytes;
      if (it >= T::kStages) mbarrier_wait(k_empty + 8 * slot, empty_phase);
      copy_tile(&maps.k, k_smem + slot_bytes, k_full + 8 * slot, T::kBlockN, kv_head, key0);
      if (it >= T::kStages) mbarrier_wait(v_empty + 8 * slot, empty_phase);
      copy_tile(&maps.v, v_smem + slot_bytes, v_full + 8 * slot, T::kBlockN, kv_head, key0);
    }
    return;
  }

  // ---- warpgroups 1 to kConsumers: 64 query rows each ----
  setmaxnreg_inc<kComputeRegisters>();
  const int compute_group = warp / 4 - 1;     // rows [64 compute_group, + 64) of the block
  const int warp_row0 = (warp - 4) * 16;      // this warp's first row in the block
  const float scale_log2 = p.scale_log2;
  const int row_begin = block.row_begin;
  const u64 q_desc = wgmma_desc_sw128(q_smem + compute_group * 64 * 128, 16, T::kSwizzleBytes);
  const u64 k_desc0 = wgmma_desc_sw128(k_smem, 16, T::kSwizzleBytes);
  // One m64n64 wgmma per slab ignores the leading byte offset; the wide one steps by it from slab
  // to slab (wgmma_rs_mn_major_wide).
  const u64 v_desc0 = kWidePv ? wgmma_desc_sw128(v_smem, T::kBlockN * 128, T::kSwizzleBytes)
                              : wgmma_desc_sw128(v_smem, T::kSwizzleBytes, T::kSwizzleBytes);
  auto slot_offset = [](int it) { return static_cast<u64>((it % T::kStages) * kKvTileBytes) >> 4; };
  auto full_phase = [](int it) { return static_cast<u32>((it / T::kStages) & 1); };
  auto release = [&](u32 bar) {  // this warp is done reading the slot (its wgmma_wait came first)
    if (lane == 0) mbarrier_arrive(bar);
  };

  float acc_o[1][T::kDTiles][4];
  float s[1][T::kNTiles][4];
  u32 p_frag[T::kBlockN / 16][4];
  zero(acc_o);
  OnlineSoftmax<1> softmax;
  softmax.init();

  // S(it) = Q K(it)^T into s, issued once K(it) has landed; the caller waits, releases K(it)'s slot and masks.
  auto scores = [&](int it) {
    const int slot = it % T::kStages;
    mbarrier_wait(k_full + 8 * slot, full_phase(it));
    wgmma_fence();
    wgmma_k_major<Element, T::kBlockN, T::kBlockM, kQkDepth>(s[0], q_desc, k_desc0 + slot_offset(it));
    wgmma_commit();
  };
  auto mask_tile = [&](int it) {
    const int key0 = (block.n_end - 1 - it) * T::kBlockN;
    if (!mask.tile_is_full(row_begin, row_begin + block.rows, key0, key0 + T::kBlockN))
      mask_scores(s, mask, row_begin + warp_row0, key0, lane);
  };
  // O += P(it) V(it), issued; the caller waits.
  auto issue_pv = [&](int it) {
    const int slot = it % T::kStages;
    mbarrier_wait(v_full + 8 * slot, full_phase(it));
    wgmma_fence();  // acc_o was rescaled and p_frag written by ordinary instructions
    if constexpr (kWidePv)
      wgmma_rs_mn_major_wide<Element, T::kBlockN, T::kSlabs>(acc_o[0], p_frag, v_desc0 + slot_offset(it));
    else
      wgmma_rs_mn_major<Element, T::kBlockN, T::kSlabs>(acc_o[0], p_frag, v_desc0 + slot_offset(it));
    wgmma_commit();
  };

  // CF_PINGPONG (FlashAttention-3's inter-warpgroup schedule): the two warpgroups take turns
  // to issue their MMAs, so that one's softmax runs while the other's MMAs hold the tensor
  // cores. A turn starts by waiting on this warpgroup's named barrier and ends by arriving on the
  // other's; group 1 arrives once first so that group 0 starts. Both issue n_tiles + 1 times,
  // and the last turn of group 1 passes nothing on, so every arrival meets a wait.
  const int my_turn = kTurnBarrier + compute_group, their_turn = kTurnBarrier + 1 - compute_group;
  auto turn_begin = [&] {
    if constexpr (kPingPong) named_barrier_sync(my_turn, 256);
  };
  auto turn_end = [&](bool last) {
    if constexpr (kPingPong)
      if (!(last && compute_group == 1)) named_barrier_arrive(their_turn, 256);
  };
  if (kPingPong && compute_group == 1) named_barrier_arrive(their_turn, 256);

  mbarrier_wait(q_full, 0);
  turn_begin();
  scores(0);
  turn_end(false);
  wgmma_wait<0>();
  wgmma_fence_operands(s[0]);
  release(k_empty);
  mask_tile(0);
  softmax.update(s, acc_o, scale_log2);  // acc_o is 0: its rescale changes nothing
  pack_a_frags<Element, T::kBlockN>(p_frag, s[0]);

  for (int it = 1; it < n_tiles; ++it) {
    turn_begin();
    scores(it);
    issue_pv(it - 1);
    turn_end(false);
    wgmma_wait<1>();  // S(it) has landed; P(it - 1) V(it - 1) may still run
    wgmma_fence_operands(s[0]);
    release(k_empty + 8 * (it % T::kStages));
    mask_tile(it);
    float correction[1][2];
    softmax.probabilities(s, scale_log2, correction);
    wgmma_wait<0>();
    wgmma_fence_operands(acc_o[0]);
    wgmma_fence_operands(p_frag);  // held until here: the MMA read them asynchronously
    release(v_empty + 8 * ((it - 1) % T::kStages));
    softmax.rescale(acc_o, correction);
    pack_a_frags<Element, T::kBlockN>(p_frag, s[0]);
  }
  turn_begin();
  issue_pv(n_tiles - 1);
  turn_end(true);
  wgmma_wait<0>();
  wgmma_fence_operands(acc_o[0]);
  wgmma_fence_operands(p_frag);
  release(v_empty + 8 * ((n_tiles - 1) % T::kStages));

  float row_lse[1][2];
  softmax.finalize(acc_o, row_lse, scale_log2);
  // O is staged in this warpgroup's own 64 rows of the Q tile (its last Q K^T has completed; the
  // other warpgroup reads only its own rows), then stored 16 bytes at a time.
  store_frags_swizzled<Element, T::kBlockM, T::kDTiles>(sm.tiles.q, acc_o[0], warp_row0, lane);
  named_barrier_sync(1 + compute_group, 128);
  const int group_row0 = 64 * compute_group;
  const int group_tid = tid - kCopyThreads - 128 * compute_group;
  const char* staged = reinterpret_cast<const char*>(sm.tiles.q);
  u16* const o_rows = block.o_tile + group_row0 * p.out.row_stride;
  const i64 o_row_stride = p.out.row_stride;
  for_each_valid_chunk<64, T::kHeadDim, 128>(block.rows - group_row0, p.head_dim, group_tid, [&](int row, int col) {
    const char* src = staged + swizzled_offset<T::kBlockM>(group_row0 + row, col / kChunk);
    *reinterpret_cast<Vec16*>(o_rows + row * o_row_stride + col) = *reinterpret_cast<const Vec16*>(src);
  });
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp_row0 + g + 8 * h;
    if (t == 0 && row < block.rows) block.lse_tile[row] = row_lse[0][h];
  }
}
