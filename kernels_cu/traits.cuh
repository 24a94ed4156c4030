// Compile-time numbers of every kernel: tile sizes, warps, pipeline depth, and what follows from
// them. cupyflash/build.py sets the CF_* macros (one cubin per variant); each kernel family's
// module in cupyflash/kernels/ mirrors its shared-memory arithmetic, and every kernel checks the
// two agree (CF_SMEM_BYTES).
#pragma once
#include "params.cuh"
#include "ptx.cuh"

namespace cf {

// The 16-bit element types. Each knows its tensor-core instruction and its conversions.
struct Half {
  static constexpr bool kIsBf16 = false;  // selects the wgmma type suffix (flash_fwd_sm90.cu)
  static __device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    mma_16816_f16(d, a, b0, b1);
  }
  static __device__ __forceinline__ u32 pack(float lo, float hi) { return pack_f16x2(lo, hi); }
  static __device__ __forceinline__ void unpack(u32 v, float& lo, float& hi) { unpack_f16x2(v, lo, hi); }
};

struct BFloat16 {
  static constexpr bool kIsBf16 = true;
  static __device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    mma_16816_bf16(d, a, b0, b1);
  }
  static __device__ __forceinline__ u32 pack(float lo, float hi) { return pack_bf16x2(lo, hi); }
  static __device__ __forceinline__ void unpack(u32 v, float& lo, float& hi) { unpack_bf16x2(v, lo, hi); }
};

// Shared-memory rows are padded by one 16-byte chunk: with a row pitch of (head_dim + 8)
// elements, the 8 rows one ldmatrix reads at the same column land in 8 different bank groups
// whenever head_dim / 8 is even, which holds for every instantiated head dim.
constexpr int kSmemPad = 8;
// Elements per 16-byte chunk: the unit of every global <-> shared copy.
constexpr int kChunk = 8;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;

// Shared by the forward kernel and the backward dQ kernel: a warp owns kWarpRows query rows.
template <int HeadDim, int BlockM, int BlockN, int NWarps, int Stages>
struct RowTraits {
  static constexpr int kHeadDim = HeadDim;
  static constexpr int kBlockM = BlockM;
  static constexpr int kBlockN = BlockN;
  static constexpr int kNWarps = NWarps;
  static constexpr int kStages = Stages;
  static constexpr int kThreads = NWarps * 32;
  static constexpr int kWarpRows = BlockM / NWarps;  // query rows per warp
  static constexpr int kMTiles = kWarpRows / 16;     // m16 MMA tiles per warp
  static constexpr int kNTiles = BlockN / 8;         // n8 tiles of S = Q K^T per warp
  static constexpr int kDTiles = HeadDim / 8;        // n8 tiles of the head_dim accumulator
  static constexpr int kStride = HeadDim + kSmemPad;  // shared row pitch, elements

  static_assert(HeadDim % 32 == 0 && HeadDim <= 256, "instantiated head dims are multiples of 32 up to 256");
  static_assert(BlockM % (16 * NWarps) == 0, "each warp owns a whole number of m16 tiles");
  static_assert(kMTiles >= 1 && kMTiles <= 2, "one or two m16 tiles per warp");
  static_assert(BlockN % 16 == 0, "K/V tiles are consumed 16 keys (one k16 step) at a time");
  static_assert(Stages >= 2, "K/V tiles are at least double-buffered");
};

// Forward: Q tile, and kStages slots of K and V tiles.
template <class T>
struct FwdSmem {
  u16 q[T::kBlockM][T::kStride];  // reused to stage O for coalesced stores
  u16 k[T::kStages][T::kBlockN][T::kStride];
  u16 v[T::kStages][T::kBlockN][T::kStride];
};

// Backward dK/dV: the block owns kBlockN keys; Q / dO tiles of kBlockM queries stream through
// kStages slots. Warps form a kWarpsN x kWarpsD grid: warp (wn, wd) owns key rows
// [16 kMTiles wn, +16 kMTiles) and, for S^T and dP^T, query columns [kBlockM / kWarpsD * wd, ...);
// for dK and dV, head_dim columns [kHeadDim / kWarpsD * wd, ...). Splitting head_dim keeps the
// two accumulators at 2 * kHeadDim / kWarpsD floats per thread (head_dim 256 needs kWarpsD 2).
template <int HeadDim, int BlockM, int BlockN, int NWarps, int Stages, int WarpsD, bool AccumDq>
struct DkdvTraits {
  static constexpr int kHeadDim = HeadDim;
  static constexpr int kBlockM = BlockM;
  static constexpr int kBlockN = BlockN;
  static constexpr int kNWarps = NWarps;
  static constexpr int kStages = Stages;
  static constexpr int kWarpsD = WarpsD;
  static constexpr bool kAccumDq = AccumDq;
  static constexpr int kThreads = NWarps * 32;
  static constexpr int kWarpsN = NWarps / WarpsD;
  static constexpr int kMTiles = BlockN / (16 * kWarpsN);    // m16 key tiles per warp
  static constexpr int kQTiles = BlockM / WarpsD / 8;        // n8 query tiles of S^T per warp
  static constexpr int kAccDTiles = HeadDim / WarpsD / 8;    // n8 head_dim tiles of dK, dV per warp
  static constexpr int kStride = HeadDim + kSmemPad;
  static constexpr int kPStride = BlockM + kSmemPad;         // P^T and dS^T rows: BlockM queries
  // dQ = dS K (only with AccumDq): a kDqWarpsM x kDqWarpsD grid over (queries, head_dim).
  static constexpr int kDqWarpsM = (BlockM / 16 < NWarps) ? BlockM / 16 : NWarps;
  static constexpr int kDqWarpsD = NWarps / kDqWarpsM;
  static constexpr int kDqMTiles = BlockM / 16 / kDqWarpsM;
  static constexpr int kDqDTiles = HeadDim / kDqWarpsD / 8;

  static_assert(HeadDim % 32 == 0 && HeadDim <= 256, "instantiated head dims are multiples of 32 up to 256");
  static_assert(NWarps % WarpsD == 0, "warps split evenly between keys and head_dim");
  static_assert(BlockN % (16 * kWarpsN) == 0 && kMTiles >= 1 && kMTiles <= 2, "one or two m16 key tiles per warp");
  static_assert(BlockM % (16 * WarpsD) == 0, "query columns of S^T split into whole k16 steps");
  static_assert(HeadDim % (16 * WarpsD) == 0, "head_dim columns of dK/dV split into n8 pairs");
  static_assert(kDqWarpsM * kDqWarpsD == NWarps && (BlockM / 16) % kDqWarpsM == 0, "dQ rows split evenly");
  static_assert(HeadDim % (16 * kDqWarpsD) == 0, "dQ head_dim columns split into n8 pairs");
  static_assert(Stages >= 2, "Q/dO tiles are at least double-buffered");
};

template <class T>
struct DkdvSmem {
  u16 k[T::kBlockN][T::kStride];  // reused to stage dK for coalesced stores
  u16 v[T::kBlockN][T::kStride];  // reused to stage dV
  u16 q[T::kStages][T::kBlockM][T::kStride];
  u16 dout[T::kStages][T::kBlockM][T::kStride];
  float lse_log2[T::kStages][T::kBlockM];  // 0 for rows past seqlen_q (their Q and dO rows are 0 too)
  float delta[T::kStages][T::kBlockM];
  u16 pt[T::kBlockN][T::kPStride];   // P^T, for dV = P^T dO
  u16 dst[T::kBlockN][T::kPStride];  // dS^T, for dK = dS^T Q and dQ = dS K
};

// Hopper forward (flash_fwd_sm90.cu): kNWarps / 4 warpgroups, each owning 64 query rows and
// computing with wgmma. Shared tiles are unpadded and 128-byte swizzled: a tile of R rows is
// kHeadDim / 64 slabs of R rows x 128 bytes (64 elements), 16-byte chunk c of row r stored at
// chunk c ^ (r % 8) of its row (the hardware's 128-byte swizzle; see swizzled_offset).
template <int HeadDim, int BlockN, int NWarps, int Stages>
struct Sm90FwdTraits {
  static constexpr int kHeadDim = HeadDim;
  static constexpr int kBlockN = BlockN;
  static constexpr int kNWarps = NWarps;
  static constexpr int kStages = Stages;
  static constexpr int kThreads = NWarps * 32;
  static constexpr int kWarpgroups = NWarps / 4;
  static constexpr int kBlockM = 64 * kWarpgroups;  // query rows per block
  static constexpr int kWarpRows = 16;              // each warp's rows of its warpgroup's 64
  static constexpr int kNTiles = BlockN / 8;        // n8 tiles of S per warp
  static constexpr int kDTiles = HeadDim / 8;       // n8 tiles of O per warp
  static constexpr int kSlabs = HeadDim / 64;       // 128-byte column slabs of a tile
  static constexpr int kSwizzleBytes = 1024;        // one 8-row x 128-byte swizzle atom

  static_assert(NWarps % 4 == 0 && NWarps >= 4 && NWarps <= 12, "one to three warpgroups");
  static_assert(HeadDim % 64 == 0 && HeadDim <= 256, "head_dim in whole 128-byte slabs");
  static_assert(BlockN == 64 || BlockN == 128, "S = Q K^T is one m64n64 or m64n128 wgmma per k16 step");
  static_assert(Stages >= 2, "K/V tiles are at least double-buffered");
};

// Every tile starts on a swizzle atom: the struct is laid at a 1024-byte aligned address, and
// each tile is a whole number of atoms (rows multiple of 8, 128-byte rows).
template <class T>
struct Sm90FwdSmem {
  u16 q[T::kBlockM * T::kHeadDim];  // reused to stage O for coalesced stores
  u16 k[T::kStages][T::kBlockN * T::kHeadDim];
  u16 v[T::kStages][T::kBlockN * T::kHeadDim];
};

// The float32 dQ accumulator of the Hopper dK/dV kernel (plan.py allocates it, zeroed; the kernel
// adds into it, flash_bwd_convert_dq_tiled reads it): [batch][heads_q][ceil(seqlen_q / 64)]
// [head_dim / 32][64 rows][32 columns] for the kernel's head_dim. Each 64 x 32 unit is one
// contiguous 8 KB block, so a staged piece goes out as one bulk reduction. Within a unit,
// 16-byte chunk c of row r sits at chunk c ^ (r % 8) of its row, which keeps the fragment stores
// into the shared copy free of bank conflicts.
struct DqUnits {
  static constexpr int kRows = kDqUnitRows, kCols = kDqUnitCols, kFloats = kRows * kCols;

  // The unit holding (row, col) of the dQ of (batch, head). An int is enough for the unit's
  // index: 2^31 units would be 2^42 floats.
  template <class Float>  // float, or const float for the reader
  static __device__ __forceinline__ Float* unit(Float* dq_accum, int batch, int head, int heads_q, int seqlen_q,
                                                int head_dim, int row, int col) {
    const int index = ((batch * heads_q + head) * ((seqlen_q + kRows - 1) / kRows) + row / kRows) * (head_dim / kCols) +
                      col / kCols;
    return dq_accum + static_cast<i64>(index) * kFloats;
  }

  // Packed variable-length batches (CF_VARLEN) instead: [heads_q][unit_rows][head_dim / 32][64
  // rows][32 columns], sequence b's row r in unit row first_packed_unit(cu_seqlens_q[b], b) + r / 64.
  // Every sequence starts a unit of its own; padding it to 64 rows costs at most 64 rows per
  // sequence, which packed_unit_rows leaves room for (the host sizes the buffer with it).
  template <class Float>
  static __device__ __forceinline__ Float* packed_unit(Float* dq_accum, int head, int unit_rows, int first_unit,
                                                       int head_dim, int row, int col) {
    const int index = (head * unit_rows + first_unit + row / kRows) * (head_dim / kCols) + col / kCols;  // as unit()
    return dq_accum + static_cast<i64>(index) * kFloats;
  }
  static __device__ __forceinline__ int first_packed_unit(int q_row0, int batch) {
    return (q_row0 + kRows * batch) / kRows;
  }
  static __device__ __forceinline__ int packed_unit_rows(int total_q, int batches) {
    return (total_q + kRows * batches + kRows - 1) / kRows;
  }

  // The offset in floats, within its unit, of row r's 16-byte chunk c (columns 4c .. 4c + 3).
  static __device__ __forceinline__ int chunk_offset(int r, int c) { return r * kCols + (c ^ (r % 8)) * 4; }
};

// Hopper backward dK/dV (flash_bwd_dkdv_sm90.cu): two 4-warp warpgroups; Q / dO tiles of
// kBlockM queries stream through kStages slots; tiles are 128-byte swizzled like Sm90FwdTraits'.
// Shared tiles hold whole 64-column slabs, kTileDim columns: 64 up to head dim 64, 128 up to 128,
// 256 above (96 runs in tiles of 128, 160 and 192 in tiles of 256); the copies zero-fill the
// columns past head_dim, S^T and dP^T stop at kHeadDim, and dQ has kHeadDim columns (DqUnits).
// Tiles of 64 and 128: each warpgroup owns 64 keys (block_n 128) and all the columns.
// Tiles of 256 (kSplitD): dK and dV of 64 keys x 256 would need 256 floats per thread, so both
// warpgroups share the block's 64 keys and split the columns: warpgroup w keeps columns
// [128 w, 128 w + 128) of dK and dV; warpgroup 0 computes S^T and warpgroup 1 dP^T, and P^T and
// dS^T meet in shared memory. dQ's (kBlockM x kHeadDim) share of the tile is cut into 64 x 64
// pieces, dealt out to the warpgroups in turn.
template <int HeadDim, int BlockM, int NWarps, int Stages, bool AccumDq>
struct Sm90DkdvTraits {
  static constexpr int kHeadDim = HeadDim;  // the compiled head dim
  static constexpr int kTileDim = HeadDim <= 64 ? 64 : HeadDim <= 128 ? 128 : 256;
  static constexpr int kBlockM = BlockM;
  static constexpr int kNWarps = NWarps;
  static constexpr int kStages = Stages;
  static constexpr bool kAccumDq = AccumDq;
  static constexpr int kThreads = NWarps * 32;
  static constexpr int kWarpgroups = NWarps / 4;
  static constexpr bool kSplitD = kTileDim > 128;
  static constexpr int kBlockN = kSplitD ? 64 : 64 * kWarpgroups;  // keys per block
  static constexpr int kAccCols = kSplitD ? kTileDim / kWarpgroups : kTileDim;  // dK, dV columns per warpgroup
  static constexpr int kQTiles = BlockM / 8;     // n8 query tiles of S^T, dP^T per warp
  static constexpr int kDTiles = kAccCols / 8;   // n8 tiles of dK, dV per warp
  static constexpr int kAccSlabs = kAccCols / 64;
  static constexpr int kUsedSlabs = (HeadDim + 63) / 64;  // the tile's 64-column slabs that hold some of head_dim
  static constexpr int kDqPieces = (BlockM / 64) * kUsedSlabs;  // 64 x 64 pieces of the dQ tile
  static constexpr int kSwizzleBytes = 1024;
  // A warpgroup stages kDqStageCols columns of a 64 x 64 dQ piece at a time in shared memory and
  // adds them into the accumulator (DqUnits) with one bulk reduction: the whole piece (16 KB)
  // where it fits, half of it in tiles of 256 (which leave 17 KB).
  static constexpr int kDqStageCols = kSplitD ? 32 : 64;
  static constexpr int kDqStageFloats = 64 * kDqStageCols;

  static_assert(NWarps == 4 || NWarps == 8, "one or two warpgroups (kernels/flash_bwd_dkdv_sm90.py offers two: one spills)");
  static_assert(!kSplitD || NWarps == 8, "tiles of 256 columns split them over two warpgroups");
  static_assert(HeadDim % 32 == 0 && HeadDim <= 256, "head dims are whole dQ units of 32 columns, up to 256");
  static_assert(BlockM == 64 || BlockM == 128, "S^T is one m64n64 or m64n128 wgmma per k16 step");
  static_assert(Stages >= 2, "Q/dO tiles are at least double-buffered");
};

// Every tile is a whole number of 1024-byte swizzle atoms and the struct is 1024-byte aligned.
template <class T>
struct Sm90DkdvSmem {
  u16 k[T::kBlockN * T::kTileDim];  // reused to stage dK for coalesced stores
  u16 v[T::kBlockN * T::kTileDim];  // reused to stage dV
  u16 q[T::kStages][T::kBlockM * T::kTileDim];
  u16 dout[T::kStages][T::kBlockM * T::kTileDim];
  u16 dst[T::kBlockN * T::kBlockM];  // dS^T (keys x queries), the A operand of dQ = dS K
  float lse_log2[T::kStages][T::kBlockM];  // 0 for rows past seqlen_q (their Q and dO rows are 0 too)
  float delta[T::kStages][T::kBlockM];
  float dq_stage[T::kWarpgroups][T::kDqStageFloats];  // each warpgroup's dQ on its way out (DqUnits)
};

// kSplitD adds P^T, which warpgroup 0 hands to warpgroup 1 (for dS^T) and both read for dV.
template <class T>
struct Sm90DkdvSplitSmem : Sm90DkdvSmem<T> {
  alignas(1024) u16 pt[T::kBlockN * T::kBlockM];
};

template <bool kFirst, class A, class B>
struct Select {
  using type = A;
};
template <class A, class B>
struct Select<false, A, B> {
  using type = B;
};

}  // namespace cf
