// Warp-level matrix products on mma.sync m16n8k16 tiles (fp16/bf16 in, fp32 accumulate).
//
// Names say how each operand is stored, BLAS style: for A, "n" = A[m][k] (k contiguous),
// "t" = stored as A^T[k][m], "r" = already in registers as fp32 accumulator fragments, "f" =
// already in registers as 16-bit A fragments (load_a_frags), "s" = in shared memory as either
// "n" or "t"; for B, "n" = B[k][n] (n contiguous) and "t" = stored as B^T[n][k]. Every product
// of the kernels is one of these:
//   gemm_nt        S = Q K^T, S^T = K Q^T, dP = dO V^T, dP^T = V dO^T
//   gemm_ft        S = Q K^T with Q's fragments held across K tiles (decoding)
//   gemm_ft_sw128  the same on a K tile a TMA copy laid out in 128-byte swizzled boxes
//   gemm_rn        O += P V, dQ += dS K (P, dS still in registers)
//   gemm_rn_sw128  O += P V on such a V tile
//   gemm_sn<false> dV += P^T dO, dK += dS^T Q (P^T, dS^T in shared memory)
//   gemm_sn<true>  dQ += dS K (dS stored transposed, as dS^T)
//
// Fragment layouts (PTX ISA, mma.m16n8k16; lane = 4 * g + t): A holds (g, 2t..2t+1),
// (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..); B holds (k = 2t..2t+1, n = g) and (k = 2t+8.., n = g);
// the accumulator holds (g, 2t..2t+1) and (g+8, 2t..2t+1). ldmatrix.x4 gives lane l's address
// to matrix l / 8 and hands each lane row l / 4, columns 2 (l % 4) .. +1 of every matrix.
#pragma once
#include "ptx.cuh"

namespace cf {

// A fragment of rows [row0, row0 + 16), columns [k0, k0 + 16) of A[m][k].
template <int kStride>
__device__ __forceinline__ void load_a(u32 (&a)[4], const u16 (*smem)[kStride], int row0, int k0, int lane) {
  ldmatrix_x4(a, smem_addr(&smem[row0 + (lane & 15)][k0 + (lane >> 4) * 8]));
}

// Every A fragment of rows [row0, row0 + 16 kMTiles), columns [0, kK) of A[m][k], for an A that
// stays in registers across many products (gemm_ft): a[k0 / 16][mt] is load_a's fragment at
// (row0 + 16 mt, k0). kK / 16 * kMTiles * 4 registers for as long as the fragments live.
template <int kMTiles, int kK, int kStride>
__device__ __forceinline__ void load_a_frags(u32 (&a)[kK / 16][kMTiles][4], const u16 (*smem)[kStride], int row0,
                                             int lane) {
  static_assert(kK % 16 == 0, "k16 steps");
#pragma unroll
  for (int ks = 0; ks < kK / 16; ++ks)
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) load_a(a[ks][mt], smem, row0 + 16 * mt, 16 * ks, lane);
}

// The same fragment when shared memory holds A^T[k][m].
template <int kStride>
__device__ __forceinline__ void load_a_trans(u32 (&a)[4], const u16 (*smem)[kStride], int row0, int k0, int lane) {
  ldmatrix_x4_trans(a, smem_addr(&smem[k0 + (lane & 7) + (lane >> 4) * 8][row0 + ((lane >> 3) & 1) * 8]));
}

// The lane's ldmatrix address for load_b_pair at (n0, k0). The pair at (n0 + n, k0 + k) is
// kStride * n + k elements further, so a product can form this once and add constants:
// smem_addr is an asm block the compiler cannot see through, and an address formed from a
// pointer per ldmatrix costs a 64-bit add and a move each (3 instructions per ldmatrix in
// flash_decode's loop), where a constant offset from a 32-bit address folds into the instruction.
template <int kStride>
__device__ __forceinline__ u32 b_pair_addr(const u16 (*smem)[kStride], int n0, int k0, int lane) {
  return smem_addr(&smem[n0 + (lane & 7) + (lane >> 4) * 8][k0 + ((lane >> 3) & 1) * 8]);
}

// The same for load_b_pair_trans: the pair at (n0 + n, k0 + k) is kStride * k + n elements further.
template <int kStride>
__device__ __forceinline__ u32 b_pair_trans_addr(const u16 (*smem)[kStride], int n0, int k0, int lane) {
  return smem_addr(&smem[k0 + (lane & 7) + ((lane >> 3) & 1) * 8][n0 + (lane >> 4) * 8]);
}

// B fragments of two n8 tiles (b[0..1]: columns n0.., b[2..3]: n0 + 8..), rows [k0, k0 + 16),
// when shared memory holds B^T[n][k].
template <int kStride>
__device__ __forceinline__ void load_b_pair(u32 (&b)[4], const u16 (*smem)[kStride], int n0, int k0, int lane) {
  ldmatrix_x4(b, b_pair_addr(smem, n0, k0, lane));
}

// The same two tiles when shared memory holds B[k][n].
template <int kStride>
__device__ __forceinline__ void load_b_pair_trans(u32 (&b)[4], const u16 (*smem)[kStride], int n0, int k0,
                                                  int lane) {
  ldmatrix_x4_trans(b, b_pair_trans_addr(smem, n0, k0, lane));
}

// Two accumulator tiles (n8 each, 16 columns together) repacked as one A fragment: the m16n8
// accumulator layout matches the A layout, so no data crosses lanes.
template <class Element>
__device__ __forceinline__ void pack_a(u32 (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = Element::pack(lo[0], lo[1]);
  a[1] = Element::pack(lo[2], lo[3]);
  a[2] = Element::pack(hi[0], hi[1]);
  a[3] = Element::pack(hi[2], hi[3]);
}

template <class Element, int kMTiles, int kNTiles>
__device__ __forceinline__ void mma_pairs(float (&acc)[kMTiles][kNTiles][4], const u32 (&a)[kMTiles][4],
                                          const u32 (&b)[4], int nt) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    Element::mma(acc[mt][nt], a[mt], b[0], b[1]);
    Element::mma(acc[mt][nt + 1], a[mt], b[2], b[3]);
  }
}

// acc += A[a_row0 + (0..16 kMTiles), 0..kK] * (B^T[b_row0 + (0..8 kNTiles), 0..kK])^T
template <class Element, int kMTiles, int kNTiles, int kK, int kStrideA, int kStrideB>
__device__ __forceinline__ void gemm_nt(float (&acc)[kMTiles][kNTiles][4], const u16 (*a_smem)[kStrideA],
                                        int a_row0, const u16 (*b_smem)[kStrideB], int b_row0, int lane) {
  static_assert(kK % 16 == 0 && kNTiles % 2 == 0, "k16 steps, n8 tiles in pairs");
#pragma unroll
  for (int k0 = 0; k0 < kK; k0 += 16) {
    u32 a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) load_a(a[mt], a_smem, a_row0 + 16 * mt, k0, lane);
#pragma unroll
    for (int nt = 0; nt < kNTiles; nt += 2) {
      u32 b[4];
      load_b_pair(b, b_smem, b_row0 + 8 * nt, k0, lane);
      mma_pairs<Element>(acc, a, b, nt);
    }
  }
}

// The loop of every S = Q K^T whose A fragments stay in registers (load_a_frags): for each k16
// step ks and pair of n8 tiles nt, nt + 1, load_b(b, ks, nt) fills B's ldmatrix_x4 fragments.
template <class Element, int kMTiles, int kNTiles, int kK, class LoadB>
__device__ __forceinline__ void gemm_f_by(float (&acc)[kMTiles][kNTiles][4], const u32 (&a)[kK / 16][kMTiles][4],
                                          LoadB load_b) {
  static_assert(kK % 16 == 0 && kNTiles % 2 == 0, "k16 steps, n8 tiles in pairs");
#pragma unroll
  for (int ks = 0; ks < kK / 16; ++ks)
#pragma unroll
    for (int nt = 0; nt < kNTiles; nt += 2) {
      u32 b[4];
      load_b(b, ks, nt);
      mma_pairs<Element>(acc, a[ks], b, nt);
    }
}

// gemm_nt with A already in registers (load_a_frags) and B^T[b_row0.., 0..] given by its lane
// address b_pair_addr(b_smem, b_row0, 0, lane), kStrideB its row pitch: the same MMAs in the
// same order, so the same sums, without reloading A from shared memory on every call.
template <class Element, int kMTiles, int kNTiles, int kK, int kStrideB>
__device__ __forceinline__ void gemm_ft(float (&acc)[kMTiles][kNTiles][4], const u32 (&a)[kK / 16][kMTiles][4],
                                        u32 b_addr) {
  gemm_f_by<Element, kMTiles, kNTiles, kK>(acc, a, [&](u32 (&b)[4], int ks, int nt) {
    ldmatrix_x4(b, b_addr + (8 * nt * kStrideB + 16 * ks) * sizeof(u16));
  });
}

// The loop of every O += P V: for each k16 step kt, P (fp32 accumulator fragments, rows of the
// A operand) repacked as A fragments, and for each pair of n8 tiles nt, nt + 1, load_b(b, kt, nt)
// fills B's ldmatrix_x4 fragments.
template <class Element, int kMTiles, int kNTiles, int kKTiles, class LoadB>
__device__ __forceinline__ void gemm_r_by(float (&acc)[kMTiles][kNTiles][4], const float (&p)[kMTiles][kKTiles][4],
                                          LoadB load_b) {
  static_assert(kKTiles % 2 == 0 && kNTiles % 2 == 0, "k16 steps, n8 tiles in pairs");
#pragma unroll
  for (int kt = 0; kt < kKTiles; kt += 2) {
    u32 a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) pack_a<Element>(a[mt], p[mt][kt], p[mt][kt + 1]);
#pragma unroll
    for (int nt = 0; nt < kNTiles; nt += 2) {
      u32 b[4];
      load_b(b, kt, nt);
      mma_pairs<Element>(acc, a, b, nt);
    }
  }
}

// acc += P * B[0..8 kKTiles, b_col0 + (0..8 kNTiles)], P given as fp32 accumulator fragments.
template <class Element, int kMTiles, int kNTiles, int kKTiles, int kStrideB>
__device__ __forceinline__ void gemm_rn(float (&acc)[kMTiles][kNTiles][4], const float (&p)[kMTiles][kKTiles][4],
                                        const u16 (*b_smem)[kStrideB], int b_col0, int lane) {
  gemm_r_by<Element, kMTiles, kNTiles, kKTiles>(acc, p, [&](u32 (&b)[4], int kt, int nt) {
    load_b_pair_trans(b, b_smem, b_col0 + 8 * nt, 8 * kt, lane);
  });
}

// gemm_rn with B[0.., b_col0..] given by its lane address b_pair_trans_addr(b_smem, b_col0, 0,
// lane), kStrideB its row pitch (the same MMAs, addresses formed as constants from it).
template <class Element, int kMTiles, int kNTiles, int kKTiles, int kStrideB>
__device__ __forceinline__ void gemm_rn(float (&acc)[kMTiles][kNTiles][4], const float (&p)[kMTiles][kKTiles][4],
                                        u32 b_addr) {
  gemm_r_by<Element, kMTiles, kNTiles, kKTiles>(acc, p, [&](u32 (&b)[4], int kt, int nt) {
    ldmatrix_x4_trans(b, b_addr + (8 * kt * kStrideB + 8 * nt) * sizeof(u16));
  });
}

// Tiles copied by TMA with the 128-byte swizzle (flash_decode's CF_KV_TMA): a tile of kRows rows
// is a row of boxes, box c holding columns [64 c, 64 c + 64) of every row, 128 bytes a row, and
// 16-byte chunk j of row r stored at chunk j ^ (r % 8) of it (so the 8 rows an ldmatrix reads
// hit 8 different bank groups). In both products below every lane's rows keep r % 8 = lane % 8
// across the loops, and the chunk a lane reads is an even constant c plus its own bit y (0 or
// 1), so its swizzled chunk is c ^ (y ^ lane % 8): four addresses per lane, one per c % 8,
// cover every load, the rest being constants. sw128_lane_addrs forms them: addrs[i] is the
// lane's row at `row_addr` (128-byte aligned) with chunk (2 i) ^ y ^ (lane % 8).
__device__ __forceinline__ void sw128_lane_addrs(u32 (&addrs)[4], u32 row_addr, int y, int lane) {
  const int x = (y ^ lane) & 7;
#pragma unroll
  for (int i = 0; i < 4; ++i) addrs[i] = row_addr + (((2 * i) ^ x) << 4);
}

// The lane's four addresses for gemm_ft_sw128 over the keys [n0, n0 + 8 kNTiles) (n0 a multiple
// of 8) of the tile at tile_addr: ldmatrix_x4 of B^T pairs, lane l reading key n0 + l % 8 +
// 8 (l / 16) at chunk 2 ks + (l / 8) % 2.
__device__ __forceinline__ void b_pair_sw128_addrs(u32 (&addrs)[4], u32 tile_addr, int n0, int lane) {
  sw128_lane_addrs(addrs, tile_addr + (n0 + (lane & 7) + (lane >> 4) * 8) * 128, (lane >> 3) & 1, lane);
}

// The same for gemm_rn_sw128 over the keys [k0, ..) (k0 a multiple of 8): ldmatrix_x4_trans, lane
// l reading key k0 + l % 8 + 8 ((l / 8) % 2) at chunk nt + l / 16.
__device__ __forceinline__ void b_pair_trans_sw128_addrs(u32 (&addrs)[4], u32 tile_addr, int k0, int lane) {
  sw128_lane_addrs(addrs, tile_addr + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * 128, lane >> 4, lane);
}

// gemm_ft with B^T (kRows keys x kK columns) in 128-byte swizzled boxes; b_addrs from
// b_pair_sw128_addrs, plus the byte offset of the tile's copy in use (`offset`). The same MMAs
// in the same order as gemm_ft, so the same sums.
template <class Element, int kMTiles, int kNTiles, int kK, int kRows>
__device__ __forceinline__ void gemm_ft_sw128(float (&acc)[kMTiles][kNTiles][4], const u32 (&a)[kK / 16][kMTiles][4],
                                              const u32 (&b_addrs)[4], u32 offset) {
  gemm_f_by<Element, kMTiles, kNTiles, kK>(acc, a, [&](u32 (&b)[4], int ks, int nt) {
    // columns 16 ks..: box ks / 4, chunk 2 (ks % 4) + the lane's bit
    ldmatrix_x4(b, b_addrs[ks % 4] + offset + (ks / 4) * kRows * 128 + 8 * nt * 128);
  });
}

// gemm_rn with B (kRows keys x 8 kNTiles columns) in 128-byte swizzled boxes; b_addrs from
// b_pair_trans_sw128_addrs, offset as in gemm_ft_sw128. The same MMAs in the same order as gemm_rn.
template <class Element, int kMTiles, int kNTiles, int kKTiles, int kRows>
__device__ __forceinline__ void gemm_rn_sw128(float (&acc)[kMTiles][kNTiles][4], const float (&p)[kMTiles][kKTiles][4],
                                              const u32 (&b_addrs)[4], u32 offset) {
  gemm_r_by<Element, kMTiles, kNTiles, kKTiles>(acc, p, [&](u32 (&b)[4], int kt, int nt) {
    // columns 8 nt..: box nt / 8, chunk nt % 8 + the lane's bit
    ldmatrix_x4_trans(b, b_addrs[(nt / 2) % 4] + offset + (nt / 8) * kRows * 128 + 8 * kt * 128);
  });
}

// acc += A[a_row0 + (0..16 kMTiles), 0..kK] * B[0..kK, b_col0 + (0..8 kNTiles)], A and B in
// shared memory; A as A[m][k] ("nn") or, with kATransposed, stored as A^T[k][m] ("tn").
template <class Element, bool kATransposed, int kMTiles, int kNTiles, int kK, int kStrideA, int kStrideB>
__device__ __forceinline__ void gemm_sn(float (&acc)[kMTiles][kNTiles][4], const u16 (*a_smem)[kStrideA],
                                        int a_row0, const u16 (*b_smem)[kStrideB], int b_col0, int lane) {
  static_assert(kK % 16 == 0 && kNTiles % 2 == 0, "k16 steps, n8 tiles in pairs");
#pragma unroll
  for (int k0 = 0; k0 < kK; k0 += 16) {
    u32 a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      if constexpr (kATransposed)
        load_a_trans(a[mt], a_smem, a_row0 + 16 * mt, k0, lane);
      else
        load_a(a[mt], a_smem, a_row0 + 16 * mt, k0, lane);
    }
#pragma unroll
    for (int nt = 0; nt < kNTiles; nt += 2) {
      u32 b[4];
      load_b_pair_trans(b, b_smem, b_col0 + 8 * nt, k0, lane);
      mma_pairs<Element>(acc, a, b, nt);
    }
  }
}

template <int kMTiles, int kNTiles>
__device__ __forceinline__ void zero(float (&acc)[kMTiles][kNTiles][4]) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mt][nt][c] = 0.f;
}

// One warpgroup's fragments (the wgmma kernels keep a single m64 row tile per warpgroup).
template <int kNTiles>
__device__ __forceinline__ void zero(float (&acc)[kNTiles][4]) {
  zero(*reinterpret_cast<float(*)[1][kNTiles][4]>(&acc));
}

}  // namespace cf
