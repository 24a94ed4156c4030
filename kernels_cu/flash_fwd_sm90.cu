// FlashAttention-2 forward on Hopper warpgroup MMAs (wgmma, sm_90a): the algorithm and the
// arguments of flash_fwd.cu, with each 4-warp warpgroup owning 64 query rows.
//
// Why a second kernel: mma.sync on an H100 peaks far below the tensor cores' wgmma rate, and
// each warp must first copy its operands from shared memory into registers (ldmatrix). wgmma
// reads both operands of S = Q K^T straight from shared memory, and P V takes P from the
// registers the softmax leaves it in; every thread of the warpgroup only keeps accumulators.
// The shared tiles are 128-byte swizzled (Sm90FwdTraits) because that is the layout wgmma reads.
//
// Per K/V tile: wait for its cp.async copies, make them visible to wgmma's async proxy, issue
// the copy of the tile kStages - 1 ahead, S = Q K^T (wgmma, both operands shared), mask, online
// softmax in registers, O += P V (wgmma, P from registers, V shared and MN-major).
//
// Compile-time macros (cupyflash/build.py): CF_ELEMENT (Half | BFloat16), CF_HEAD_DIM (64, 128,
// 192, 256), CF_BLOCK_N (64 | 128), CF_NUM_WARPS (4, 8, 12: one to three warpgroups), CF_STAGES.
#include "fwd_block.cuh"
#include "gemm.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "softmax.cuh"
#include "tile_io.cuh"
#include "traits.cuh"
#include "wgmma_gemm.cuh"

namespace cf {
using Sm90Kernel = Sm90FwdTraits<CF_HEAD_DIM, CF_BLOCK_N, CF_NUM_WARPS, CF_STAGES>;
using Element = CF_ELEMENT;
// Dynamic shared memory is only 16-byte aligned; the layout needs 1024 (one swizzle atom), so
// the launch asks for this much more and the kernel rounds its base up.
}  // namespace cf

// cupyflash/kernels/flash_fwd_sm90.py computes the same size for the launch; the build passes it here.
static_assert(sizeof(cf::Sm90FwdSmem<cf::Sm90Kernel>) + cf::kSmemAlignSlack == CF_SMEM_BYTES,
              "cupyflash/kernels/flash_fwd_sm90.py smem_bytes() disagrees with the kernel's layout");

// Reads and writes what flash_fwd does (FwdParams, params.cuh), with the same grid; block:
// kThreads; dynamic smem: Sm90FwdSmem plus kSmemAlignSlack.
extern "C" __global__ void __launch_bounds__(cf::Sm90Kernel::kThreads, 1)
    flash_fwd_sm90(const __grid_constant__ cf::FwdParams p) {
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
  using T = Sm90Kernel;
  extern __shared__ Vec16 smem_raw[];
  const u32 raw_address = smem_addr(smem_raw);
  const u32 smem_base = (raw_address + kSmemAlignSlack - 1) & ~static_cast<u32>(kSmemAlignSlack - 1);
  char* aligned = reinterpret_cast<char*>(smem_raw) + (smem_base - raw_address);
  Sm90FwdSmem<T>& sm = *reinterpret_cast<Sm90FwdSmem<T>*>(aligned);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warpgroup = warp / 4;
  const Mask mask{seqlen_q, seqlen_k, window_left, window_right};
  const FwdBlock block = locate_fwd_block<T::kBlockM, T::kBlockN>(mask, seq, p);
  if constexpr (kVarlen)
    if (block.rows <= 0) return;  // past this sequence's last query
  if (finish_empty_block<T::kBlockM, T::kHeadDim, T::kThreads>(block, o_row_stride, head_dim, tid)) return;
  const int row_begin = block.row_begin, rows = block.rows, n_end = block.n_end;
  const int n_tiles = n_end - block.n_begin;
  constexpr int kKvTileBytes = T::kBlockN * T::kHeadDim * 2;
  const u32 q_smem = smem_addr(sm.q), k_smem = smem_addr(sm.k[0]), v_smem = smem_addr(sm.v[0]);
  auto load_kv = [&](int slot, int n_block) {
    const int key0 = n_block * T::kBlockN;
    const int keys = min(T::kBlockN, seqlen_k - key0);
    load_tile_swizzled_async<T::kBlockN, T::kHeadDim, T::kThreads>(
        k_smem + slot * kKvTileBytes, block.k_head + key0 * k_row_stride, k_row_stride, keys, head_dim, tid);
    load_tile_swizzled_async<T::kBlockN, T::kHeadDim, T::kThreads>(
        v_smem + slot * kKvTileBytes, block.v_head + key0 * v_row_stride, v_row_stride, keys, head_dim, tid);
  };

  // Prologue: Q and the first kStages - 1 K/V tiles, one commit group per tile (Q joins the first).
  load_tile_swizzled_async<T::kBlockM, T::kHeadDim, T::kThreads>(q_smem, block.q_tile, q_row_stride, rows,
                                                                 head_dim, tid);
#pragma unroll
  for (int s = 0; s < T::kStages - 1; ++s) {
    if (s < n_tiles) load_kv(s, n_end - 1 - s);
    cp_async_commit();
  }

  // Descriptors: K-major Q and K (stride 8 rows = 1024 bytes; the leading offset is unused with
  // this swizzle); V read MN-major by 64-column slabs, so both offsets are the 8-row step.
  const u64 q_desc = wgmma_desc_sw128(q_smem + warpgroup * 64 * 128, 16, T::kSwizzleBytes);
  const u64 k_desc0 = wgmma_desc_sw128(k_smem, 16, T::kSwizzleBytes);
  const u64 v_desc0 = wgmma_desc_sw128(v_smem, T::kSwizzleBytes, T::kSwizzleBytes);

  float acc_o[1][T::kDTiles][4];
  float s[1][T::kNTiles][4];
  zero(acc_o);
  zero(s);
  OnlineSoftmax<1> softmax;
  softmax.init();
  const int warp_row0 = warp * T::kWarpRows;

  u32 p_frag[T::kBlockN / 16][4];
  for (int it = 0; it < n_tiles; ++it) {
    // Tile `it` has landed once at most kStages - 2 younger groups are in flight. The fence
    // hands this thread's copies to the async proxy; the barrier then tells every warpgroup that
    // all copies landed and that the slot refilled below is no longer being read.
    cp_async_wait<T::kStages - 2>();
    fence_proxy_async();
    __syncthreads();
    const int next = it + T::kStages - 1;
    if (next < n_tiles) load_kv(next % T::kStages, n_end - 1 - next);
    cp_async_commit();

    const u64 slot_offset = static_cast<u64>((it % T::kStages) * kKvTileBytes) >> 4;
    const int key0 = (n_end - 1 - it) * T::kBlockN;
    wgmma_fence();
    // S = Q K^T
    wgmma_k_major<Element, T::kBlockN, T::kBlockM, T::kHeadDim>(s[0], q_desc, k_desc0 + slot_offset);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(s[0]);

    if (!mask.tile_is_full(row_begin, row_begin + rows, key0, key0 + T::kBlockN))
      mask_scores(s, mask, row_begin + warp_row0, key0, lane);
    softmax.update(s, acc_o, scale_log2);
    pack_a_frags<Element, T::kBlockN>(p_frag, s[0]);

    wgmma_fence();  // acc_o was rescaled by ordinary instructions
    wgmma_rs_mn_major<Element, T::kBlockN, T::kSlabs>(acc_o[0], p_frag, v_desc0 + slot_offset);  // O += P V
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(acc_o[0]);
  }

  float row_lse[1][2];
  softmax.finalize(acc_o, row_lse, scale_log2);
  // O is staged in the Q tile for 16-byte stores. Every warpgroup must be done reading Q first.
  __syncthreads();
  store_frags_swizzled<Element, T::kBlockM, T::kDTiles>(sm.q, acc_o[0], warp_row0, lane);
  __syncthreads();
  store_tile_swizzled<T::kBlockM, T::kHeadDim, T::kThreads>(block.o_tile, o_row_stride, sm.q, rows, head_dim, tid);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp_row0 + g + 8 * h;
    if (t == 0 && row < rows) block.lse_tile[row] = row_lse[0][h];
  }
}
