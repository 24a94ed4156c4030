// Copies between global memory and shared tiles, 16 bytes per thread per step.
//
// Every access is predicated on the valid rows and head_dim columns: rows past the sequence end
// and columns past a non-instantiated head_dim (say 80 run by the 96 kernel) are zero-filled on
// load and skipped on store. Only the last dimension of a tensor must be contiguous; the row
// pitch comes from the array's strides.
#pragma once
#include "traits.cuh"

namespace cf {

// Issues cp.async copies of a kRows x kCols tile (16-bit elements) into shared memory, where
// dst(row, col) is the shared address of element (row, col). gmem points at the tile's first
// row; rows >= valid_rows and columns >= valid_cols become 0.
//
// Each thread keeps one column and walks down the rows with a single moving pointer. (Fully
// unrolled per-chunk addresses are loop-invariant across the K/V loop, and the compiler kept
// them all in registers: 246 instead of 132 for the head_dim 128 forward, measured with ptxas.)
template <int kRows, int kCols, int kThreads, class DstAddress>
__device__ __forceinline__ void copy_tile_async(DstAddress dst, const u16* gmem, i64 row_stride, int valid_rows,
                                                int valid_cols, int tid) {
  constexpr int kChunksPerRow = kCols / kChunk;
  static_assert(kCols % kChunk == 0, "tile rows are whole 16-byte chunks");
  if constexpr (kThreads % kChunksPerRow == 0) {
    constexpr int kRowsPerStep = kThreads / kChunksPerRow;
    const int col = (tid % kChunksPerRow) * kChunk;
    const int row0 = tid / kChunksPerRow;
    const bool col_valid = col < valid_cols;
    const u16* src = gmem + row0 * row_stride + col;
#pragma unroll
    for (int r = 0; r < (kRows + kRowsPerStep - 1) / kRowsPerStep; ++r) {
      const int row = row0 + r * kRowsPerStep;
      if (kRows % kRowsPerStep != 0 && row >= kRows) break;
      const bool valid = col_valid && row < valid_rows;
      // A masked copy reads nothing, but its address must still be a legal one: the tile start.
      cp_async_16(dst(row, col), valid ? src : gmem, valid ? 16 : 0);
      src += kRowsPerStep * row_stride;
    }
  } else {  // head dims whose chunk count does not divide the thread count (96, 160, 192)
#pragma unroll 1
    for (int idx = tid; idx < kRows * kChunksPerRow; idx += kThreads) {
      const int row = idx / kChunksPerRow;
      const int col = (idx % kChunksPerRow) * kChunk;
      const bool valid = row < valid_rows && col < valid_cols;
      cp_async_16(dst(row, col), valid ? gmem + row * row_stride + col : gmem, valid ? 16 : 0);
    }
  }
}

// The same into a padded tile with row pitch kStride.
template <int kRows, int kCols, int kStride, int kThreads>
__device__ __forceinline__ void load_tile_async(u16 (*smem)[kStride], const u16* gmem, i64 row_stride,
                                                int valid_rows, int valid_cols, int tid) {
  copy_tile_async<kRows, kCols, kThreads>([&](int row, int col) { return smem_addr(&smem[row][col]); }, gmem,
                                          row_stride, valid_rows, valid_cols, tid);
}

// cp.async copies of kRows floats (one per row: lse or delta); rows past valid_rows become 0.
template <int kRows, int kThreads>
__device__ __forceinline__ void load_rows_async(float* smem, const float* gmem, int valid_rows, int tid) {
#pragma unroll
  for (int step = 0; step < (kRows + kThreads - 1) / kThreads; ++step) {
    const int row = tid + step * kThreads;
    if (kRows % kThreads != 0 && row >= kRows) break;
    const bool valid = row < valid_rows;
    cp_async_4(smem_addr(&smem[row]), valid ? gmem + row : gmem, valid ? 4 : 0);
  }
}

// Calls store(row, col) for the 16-byte chunks of a kRows x kCols tile inside [0, valid_rows) x
// [0, valid_cols), shared out among the threads [0, kWorkers) that call it (a warp, or a block).
template <int kRows, int kCols, int kWorkers, class Store>
__device__ __forceinline__ void for_each_valid_chunk(int valid_rows, int valid_cols, int worker, Store store) {
  constexpr int kChunksPerRow = kCols / kChunk;
  constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
  for (int step = 0; step < (kChunks + kWorkers - 1) / kWorkers; ++step) {
    const int idx = worker + step * kWorkers;
    if (kChunks % kWorkers != 0 && idx >= kChunks) break;
    const int row = idx / kChunksPerRow;
    const int col = (idx % kChunksPerRow) * kChunk;
    if (row < valid_rows && col < valid_cols) store(row, col);
  }
}

// Writes a kRows x kCols shared tile to global memory, 16 bytes at a time.
template <int kRows, int kCols, int kStride, int kWorkers>
__device__ __forceinline__ void store_tile(u16* gmem, i64 row_stride, const u16 (*smem)[kStride], int valid_rows,
                                           int valid_cols, int worker) {
  for_each_valid_chunk<kRows, kCols, kWorkers>(valid_rows, valid_cols, worker, [&](int row, int col) {
    *reinterpret_cast<Vec16*>(gmem + row * row_stride + col) = *reinterpret_cast<const Vec16*>(&smem[row][col]);
  });
}

// Writes zeros to a kRows x kCols global tile (the output of rows or keys that see nothing).
template <int kRows, int kCols, int kWorkers>
__device__ __forceinline__ void store_zero_tile(u16* gmem, i64 row_stride, int valid_rows, int valid_cols,
                                                int worker) {
  for_each_valid_chunk<kRows, kCols, kWorkers>(valid_rows, valid_cols, worker, [&](int row, int col) {
    *reinterpret_cast<Vec16*>(gmem + row * row_stride + col) = Vec16{0, 0, 0, 0};
  });
}

// Issues the cp.async copies of K and V tile n_block (kBlockN keys; keys past seqlen_k and
// columns past head_dim zero-filled) into one pipeline slot. k_head / v_head point at key 0.
template <int kBlockN, int kHeadDim, int kStride, int kThreads>
__device__ __forceinline__ void load_kv_tiles_async(u16 (*k_smem)[kStride], u16 (*v_smem)[kStride], const u16* k_head,
                                                    i64 k_row_stride, const u16* v_head, i64 v_row_stride,
                                                    int n_block, int seqlen_k, int head_dim, int tid) {
  const int key0 = n_block * kBlockN;
  const int keys = min(kBlockN, seqlen_k - key0);
  load_tile_async<kBlockN, kHeadDim, kStride, kThreads>(k_smem, k_head + key0 * k_row_stride, k_row_stride, keys,
                                                        head_dim, tid);
  load_tile_async<kBlockN, kHeadDim, kStride, kThreads>(v_smem, v_head + key0 * v_row_stride, v_row_stride, keys,
                                                        head_dim, tid);
}

// Writes a warp's accumulator fragments (rows g, g + 8 of each m16 tile; columns 2t, 2t + 1 of
// each n8 tile) into a shared tile at (row0, col0) as 16-bit pairs, scaled by `scale`.
template <class Element, int kMTiles, int kNTiles, int kStride>
__device__ __forceinline__ void store_frags_to_smem(u16 (*smem)[kStride], const float (&acc)[kMTiles][kNTiles][4],
                                                    int row0, int col0, int lane, float scale) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + mt * 16 + g + 8 * h;
        const int col = col0 + nt * 8 + 2 * t;
        *reinterpret_cast<u32*>(&smem[row][col]) =
            Element::pack(acc[mt][nt][2 * h] * scale, acc[mt][nt][2 * h + 1] * scale);
      }
}

// ---- 128-byte swizzled tiles (flash_fwd_sm90.cu; layout in Sm90FwdTraits) ----

// Byte offset of 16-byte chunk `chunk` (column chunk * 8) of row `row` in a swizzled tile of
// kRows rows: slab chunk / 8, then row * 128, then the chunk's position XOR (row % 8). This is
// the layout wgmma's 128-byte swizzle mode reads; it also spreads the 8 rows of one ldmatrix-
// or store-sized access over all 32 banks.
template <int kRows>
__device__ __forceinline__ int swizzled_offset(int row, int chunk) {
  return (chunk >> 3) * (kRows * 128) + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

// cp.async copies of a kRows x kCols tile into the swizzled tile at shared address smem;
// rows >= valid_rows and columns >= valid_cols become 0.
template <int kRows, int kCols, int kThreads>
__device__ __forceinline__ void load_tile_swizzled_async(u32 smem, const u16* gmem, i64 row_stride, int valid_rows,
                                                         int valid_cols, int tid) {
  copy_tile_async<kRows, kCols, kThreads>(
      [&](int row, int col) { return smem + swizzled_offset<kRows>(row, col / kChunk); }, gmem, row_stride,
      valid_rows, valid_cols, tid);
}

// Where, in a swizzled tile of kRows rows (tile: its first byte), a warpgroup keeps the 16-bit
// pair h (rows g and g + 8) of n8 tile nt of its accumulator fragments (64 rows from row0).
template <int kRows, class Byte>
__device__ __forceinline__ Byte* frag_pair(Byte* tile, int row0, int nt, int h, int lane) {
  const int g = lane >> 2, t = lane & 3;
  return tile + swizzled_offset<kRows>(row0 + g + 8 * h, nt) + 4 * t;
}

// Writes a warpgroup's accumulator fragments (all kNTiles n8 tiles) into a swizzled tile of
// kRows rows as 16-bit pairs.
template <class Element, int kRows, int kNTiles>
__device__ __forceinline__ void store_frags_swizzled(u16* smem, const float (&acc)[kNTiles][4], int row0, int lane) {
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      char* pair = frag_pair<kRows>(reinterpret_cast<char*>(smem), row0, nt, h, lane);
      *reinterpret_cast<u32*>(pair) = Element::pack(acc[nt][2 * h], acc[nt][2 * h + 1]);
    }
}

// The inverse: a warpgroup's fragments read back (as 16-bit values) from a swizzled tile.
template <class Element, int kRows, int kNTiles>
__device__ __forceinline__ void load_frags_swizzled(const u16* smem, float (&acc)[kNTiles][4], int row0, int lane) {
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const char* pair = frag_pair<kRows>(reinterpret_cast<const char*>(smem), row0, nt, h, lane);
      Element::unpack(*reinterpret_cast<const u32*>(pair), acc[nt][2 * h], acc[nt][2 * h + 1]);
    }
}

// Writes a swizzled kRows x kCols shared tile to global memory, 16 bytes at a time.
template <int kRows, int kCols, int kWorkers>
__device__ __forceinline__ void store_tile_swizzled(u16* gmem, i64 row_stride, const u16* smem, int valid_rows,
                                                    int valid_cols, int worker) {
  for_each_valid_chunk<kRows, kCols, kWorkers>(valid_rows, valid_cols, worker, [&](int row, int col) {
    const char* src = reinterpret_cast<const char*>(smem) + swizzled_offset<kRows>(row, col / kChunk);
    *reinterpret_cast<Vec16*>(gmem + row * row_stride + col) = *reinterpret_cast<const Vec16*>(src);
  });
}

}  // namespace cf
