// Warpgroup GEMMs over 128-byte swizzled shared tiles (layout in Sm90FwdTraits), shared by the
// Hopper kernels (flash_fwd_sm90.cu, flash_fwd_tma.cu, flash_bwd_dkdv_sm90.cu, flash_bwd_dq_sm90.cu).
// Each warpgroup computes 64 rows.
#pragma once
#include "gemm.cuh"

namespace cf {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// acc = A B^T over kDepth columns: A is 64 rows of a K-major tile of kRowsA rows (a_desc already
// points at them), B a K-major tile of kN rows. One m64nN wgmma per k16 step, which reads 32
// bytes into the 128-byte rows of slab kk / 4 of each tile (the hardware applies the swizzle).
template <class Element, int kN, int kRowsA, int kDepth>
__device__ __forceinline__ void wgmma_k_major(float (&acc)[kN / 8][4], u64 a_desc, u64 b_desc) {
#pragma unroll
  for (int kk = 0; kk < kDepth / 16; ++kk) {
    const int a_offset = (kk / 4) * kRowsA * 128 + (kk % 4) * 32;
    const int b_offset = (kk / 4) * kN * 128 + (kk % 4) * 32;
    wgmma_ss<kN, Element::kIsBf16>(acc, a_desc + (a_offset >> 4), b_desc + (b_offset >> 4), kk > 0);
  }
}

// acc (64 x 64 kSlabs) += A B: A as kK / 16 k16 fragments in registers, B a shared tile of kK
// rows read MN-major. Per k16 step (16 rows of B), one m64n64 wgmma per 64-column slab.
template <class Element, int kK, int kSlabs>
__device__ __forceinline__ void wgmma_rs_mn_major(float (&acc)[8 * kSlabs][4], const u32 (&a)[kK / 16][4],
                                                  u64 b_desc) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk)
#pragma unroll
    for (int slab = 0; slab < kSlabs; ++slab) {
      const int b_offset = slab * kK * 128 + kk * 16 * 128;
      wgmma_rs_tb<64, Element::kIsBf16>(*reinterpret_cast<float(*)[8][4]>(&acc[8 * slab][0]), a[kk],
                                        b_desc + (b_offset >> 4));
    }
}

// The same product as wgmma_rs_mn_major, as one m64n(64 kSlabs) wgmma per k16 step over every
// slab at once. b_desc's leading byte offset must be the byte distance between 64-column slabs
// (kK * 128): for MN-major operands with a 128-byte swizzle, the leading-dimension byte offset is
// the stride between 64-element swizzle atoms along N, and the stride-dimension byte offset
// (1024 here) the stride between 8-row groups along K. Step kk starts 16 rows into slab 0.
template <class Element, int kK, int kSlabs>
__device__ __forceinline__ void wgmma_rs_mn_major_wide(float (&acc)[8 * kSlabs][4], const u32 (&a)[kK / 16][4],
                                                       u64 b_desc) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk)
    wgmma_rs_tb<64 * kSlabs, Element::kIsBf16>(acc, a[kk], b_desc + ((kk * 16 * 128) >> 4));
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// The fp32 fragments of a 64 x kK accumulator as the 16-bit A operands of the next GEMM, one per
// k16 step.
template <class Element, int kK>
__device__ __forceinline__ void pack_a_frags(u32 (&a)[kK / 16][4], const float (&x)[kK / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) pack_a<Element>(a[kk], x[2 * kk], x[2 * kk + 1]);
}

}  // namespace cf
