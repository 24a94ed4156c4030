// Decoding: a few new query tokens per sequence against a long KV cache (attention_with_kvcache).
//
// The work is bound by reading K and V once, so the kernel is laid out for bandwidth, not for
// tensor-core throughput:
// - Packed GQA: the query tokens and the query heads that share one kv head are the rows of one
//   tile. Packed row r of kv head h_kv is token r / group_size of q head h_kv * group_size +
//   r % group_size, so one token with 4-8 heads per kv head fills most of an m16 tile, and each
//   K/V element is read by one block for all the heads that use it.
// - Split-KV: the keys of one (batch, kv head) are cut into num_splits ranges of whole 64-key
//   tiles, one block each, so a single long sequence still spreads over the whole GPU. With more
//   than one split a block writes float32 partials (out and lse) that flash_decode_combine merges,
//   or, compiled with CF_CLUSTER = num_splits (2, 4 or 8; sm_90 and up), the splits of one
//   (kv head, query tile) form a thread-block cluster and merge their rows through distributed
//   shared memory at the end: no partials in global memory and no second launch, which is most
//   of the time of a small decode step (merge_in_cluster).
// - Inside a block, 4 warps form a kRowWarps x kKeyWarps grid: warp (wm, wk) owns packed rows
//   [16 wm, +16) and keys [kWarpKeys wk, +kWarpKeys) of every tile, each with its own online
//   softmax. At the end the kKeyWarps results of a row are merged through shared memory by
//   their row max and sum, the same rule flash_merge applies between splits.
// - The cache is contiguous (slot cache_batch_idx[b], or b) or paged (block_table): each key row
//   is found through its page. The page numbers of the next tile are read one tile ahead, so
//   the table lookup never stalls the copy it addresses.
//
// - Compiled with CF_KV_TMA (sm_90 and up), the K/V tiles come by Hopper's bulk tensor copies
//   instead: one thread issues each stage's boxes (CF_KV_TMA keys by 64 columns, through the
//   tensor maps of k_cache and v_cache, 128-byte swizzled) and the warps wait on the stage's
//   mbarrier. The copy engine then keeps up to kStages tiles in flight for a block of 4 warps,
//   which at one block per SM is more than its cp.async copies can (see the config's note).
//
// flash_decode_append writes the new keys and values into the cache first (a launch of its own,
// so the attention reads them like any cached key).
//
// Every index read from the device is clamped into its array: cache_seqlens into [0, capacity -
// seqlen_new], cache_batch_idx into [0, batch_cache), pages into [0, num_pages). Values that break
// the rules give wrong results, never an access outside the arrays (attention_with_kvcache's
// check=True tests them on the host).
//
// Compile-time macros: CF_ELEMENT (Half | BFloat16), CF_HEAD_DIM (64, 96, 128, 192, 256),
// CF_ROW_WARPS (1, 2, 4: kKeyWarps = 4 / CF_ROW_WARPS), CF_STAGES, CF_WINDOW_LEFT / CF_WINDOW_RIGHT
// (mask.cuh), CF_SMEM_BYTES, CF_CLUSTER (0: no cluster; else num_splits, the blocks of a cluster),
// CF_KV_TMA (0: cp.async copies; else the keys of one tensor-map box: 64, or a page of 16 or 32).
#include "gemm.cuh"
#include "mask.cuh"
#include "params.cuh"
#include "softmax.cuh"
#include "traits.cuh"

namespace cf {
using Element = CF_ELEMENT;

__host__ __device__ constexpr int floor_power_of_two(int n) { return n >= 2 ? 2 * floor_power_of_two(n / 2) : 1; }

template <int HeadDim, int RowWarps, int Stages>
struct DecodeTraits {
  static constexpr int kHeadDim = HeadDim;
  static constexpr int kRowWarps = RowWarps;
  static constexpr int kKeyWarps = kDecodeWarps / RowWarps;
  static constexpr int kStages = Stages;
  static constexpr int kThreads = kDecodeWarps * 32;
  static constexpr int kBlockM = 16 * RowWarps;          // packed rows per block
  static constexpr int kBlockN = kDecodeBlockN;          // keys per tile
  static constexpr int kWarpKeys = kBlockN / kKeyWarps;  // keys of a tile per warp
  static constexpr int kNTiles = kWarpKeys / 8;
  static constexpr int kDTiles = HeadDim / 8;
  static constexpr int kStride = HeadDim + kSmemPad;
  static constexpr int kChunksPerRow = HeadDim / kChunk;
  // Each warp's Q A-fragments stay in registers for the whole K/V loop (HeadDim / 2 registers)
  // instead of being reloaded from shared memory by every tile's Q K^T (8 ldmatrix.x4 per warp
  // and tile at head dim 128). Above 128 they do not fit beside the accumulators: ptxas spilled
  // 8 bytes at head dim 192 (4 row warps, sm_86) and 172-208 bytes at 256 (sm_80, sm_90), so
  // those head dims reload Q every tile as before.
  static constexpr bool kQInRegisters = HeadDim <= 128;
  // K/V copies: each thread keeps one 16-byte column of a tile and walks down its rows,
  // kCopyRows rows per step, with one moving address. kCopyRows is a power of two, so the steps
  // that fall into one page of 16 or more keys are consecutive. Where a row's chunks do not
  // divide the threads (head dims 96 and 192) the last warp copies nothing.
  static constexpr int kCopyRows = floor_power_of_two(kThreads / kChunksPerRow);
  static constexpr int kCopyThreads = kCopyRows * kChunksPerRow;
  static constexpr int kCopySteps = kBlockN / kCopyRows;
  // A full tile's rows lie in at most this many pages on the fast path (pages of 16 keys).
  static constexpr int kMaxCopyRuns = 4;

  // Bulk tensor copies (CF_KV_TMA): a tile is kColBoxes boxes of 64 columns side by side.
  static constexpr int kColBoxes = HeadDim / 64;
  static constexpr int kBoxRows = CF_KV_TMA > 0 ? CF_KV_TMA : kBlockN;
  static constexpr int kTileBytes = kBlockN * HeadDim * 2;  // one K or V tile, swizzled, unpadded

  static_assert(RowWarps == 1 || RowWarps == 2 || RowWarps == 4, "4 warps in a rows x keys grid");
  static_assert(HeadDim % 32 == 0 && HeadDim <= 256, "head dims are multiples of 32 up to 256");
  static_assert(kNTiles % 2 == 0, "each warp's keys are whole k16 steps");
  static_assert(Stages >= 2, "K/V tiles are at least double-buffered");
  static_assert(kCopyThreads % 32 == 0, "whole warps copy or skip the K/V copies");
  static_assert(kCopySteps % kMaxCopyRuns == 0 && kCopyRows <= kBlockN / kMaxCopyRuns,
                "a page of kBlockN / kMaxCopyRuns keys holds whole copy steps");
  static_assert(CF_KV_TMA == 0 || (HeadDim % 64 == 0 && kQInRegisters && kBlockN % kBoxRows == 0 && kBoxRows % 8 == 0),
                "bulk tensor copies: whole 64-column boxes, Q in registers, boxes of whole swizzle atoms");
};
using T = DecodeTraits<CF_HEAD_DIM, CF_ROW_WARPS, CF_STAGES>;

// After the last tile the tiles' bytes hold the merge of the warps' results.
struct DecodeMerge {
  float max_log2[T::kKeyWarps][T::kBlockM];  // each warp's row max, exponent units; -inf: no key
  float sum[T::kKeyWarps][T::kBlockM];       // each warp's row sum relative to it
  float weight[T::kKeyWarps][T::kBlockM];    // exp2(max_w - max) / total sum
  float lse[T::kBlockM];
  float o[T::kKeyWarps][T::kBlockM][T::kHeadDim];  // each warp's unnormalised O
};

#if CF_KV_TMA
// The tiles first, on the 1024-byte boundary the swizzle needs (the kernel aligns the struct):
// stage s of K is kColBoxes boxes of kBlockN rows x 64 columns (gemm.cuh, gemm_ft_sw128). Then Q
// (padded rows, cp.async) and each stage's "full" mbarrier.
struct DecodeSmem {
  union {
    struct {
      alignas(1024) u16 k[T::kStages][T::kColBoxes][T::kBlockN][64];
      u16 v[T::kStages][T::kColBoxes][T::kBlockN][64];
    } tiles;
    DecodeMerge merge;
  };
  u16 q[T::kBlockM][T::kStride];
  u64 full[T::kStages];
};
constexpr int kDecodeSmemSlack = kSmemAlignSlack;

// flash_decode's second parameter: the maps of k_cache and v_cache (cupyflash/kvcache.py).
struct DecodeTensorMaps {
  TensorMap k, v;
};
#else
struct DecodeSmem {
  u16 q[T::kBlockM][T::kStride];
  union {
    struct {
      u16 k[T::kStages][T::kBlockN][T::kStride];
      u16 v[T::kStages][T::kBlockN][T::kStride];
    } tiles;
    DecodeMerge merge;
  };
};
constexpr int kDecodeSmemSlack = 0;
#endif

// One sequence of the batch as the cache holds it.
struct CacheSequence {
  int cached;      // keys in the cache before this call's appends
  int seqlen_k;    // keys attended: cached + seqlen_new
  i64 slot;        // contiguous cache: element offset of this sequence's slot
  const int* pages;  // paged cache: this sequence's block_table row; null: contiguous
  int page_shift;    // log2(page_size) when it is a power of two, else -1 (then / and %, ~20x the work)
};

// Sequence b's slot of a contiguous cache (cache_batch_idx[b] clamped into it, or b).
__device__ __forceinline__ int cache_slot_of(const DecodeParams& p, int b) {
  return p.cache_batch_idx != nullptr ? min(max(p.cache_batch_idx[b], 0), p.batch_cache - 1) : b;
}

__device__ __forceinline__ CacheSequence cache_sequence_of(const DecodeParams& p, int b) {
  CacheSequence s;
  const int cached = p.cache_seqlens != nullptr ? p.cache_seqlens[b] : p.cache_seqlen;
  s.cached = min(max(cached, 0), p.capacity - p.seqlen_new);
  s.seqlen_k = s.cached + p.seqlen_new;
  s.slot = static_cast<i64>(cache_slot_of(p, b)) * p.k_cache.batch_stride;
  s.pages = p.block_table != nullptr ? p.block_table + b * p.block_table_batch_stride : nullptr;
  s.page_shift = (p.page_size & (p.page_size - 1)) == 0 ? __ffs(p.page_size) - 1 : -1;
  return s;
}

// The page of key j (paged cache), clamped into the cache. kPowerOfTwoPages: the caller has
// checked that page_size is a power of two (no division code).
template <bool kPowerOfTwoPages = false>
__device__ __forceinline__ int page_of(const DecodeParams& p, const CacheSequence& s, int j) {
  const int logical = kPowerOfTwoPages || s.page_shift >= 0 ? j >> s.page_shift : j / p.page_size;
  return min(max(s.pages[logical], 0), p.num_pages - 1);
}

// Element offset of key j from the cache's first element, for a kv head's column 0 (K and V
// share strides). page: page_of(j) for a paged cache, ignored otherwise.
template <bool kPowerOfTwoPages = false>
__device__ __forceinline__ i64 key_offset(const DecodeParams& p, const CacheSequence& s, int j, int page) {
  if (s.pages != nullptr) {
    const int in_page = kPowerOfTwoPages || s.page_shift >= 0 ? j & (p.page_size - 1) : j % p.page_size;
    return static_cast<i64>(page) * p.k_cache.batch_stride + static_cast<i64>(in_page) * p.k_cache.row_stride;
  }
  return s.slot + static_cast<i64>(j) * p.k_cache.row_stride;
}

// Where packed row r (< seqlen_q * group_size) of kv head kv_head lives: its token and q head.
struct PackedRow {
  int token, head;
};
__device__ __forceinline__ PackedRow packed_row(int r, int kv_head, int group_size) {
  return PackedRow{r / group_size, kv_head * group_size + r % group_size};
}

// One thread's share of the K/V tile copies: the chunk at column col of tile rows row +
// kCopyRows * step, step < kCopySteps (threads from kCopyThreads on copy nothing).
struct KvCopy {
  static constexpr u32 kStepBytes = T::kCopyRows * T::kStride * sizeof(u16);
  static constexpr u32 kVBytes = sizeof(DecodeSmem::tiles.k);  // from a K chunk to its V chunk
  static_assert(sizeof(DecodeSmem::tiles) == 2 * kVBytes, "V follows K with no padding");

  const u16* k_head;  // the kv head's column 0 of the K cache's first row; v_head: of V
  const u16* v_head;
  u32 k_dst;          // shared address of the thread's first chunk in K slot 0
  int row;            // first tile row
  // The column (elements) and 16 where it is < head_dim; else 0 and 0: the chunk is zero-filled,
  // reading nothing from an address that still lies inside the array (the row's column 0).
  int col_offset, src_bytes;
  i64 step_stride;    // elements between the rows of consecutive steps: kCopyRows rows
};

// The tile's rows lie in kRuns pages (a contiguous slot is one) of a power-of-two size, and every
// row is below seqlen_k: run r's steps are its kCopySteps / kRuns consecutive ones, one page.
// The pages of a tile, one per run: pages[r].
template <int kRuns>
__device__ __forceinline__ void read_run_pages(int (&pages)[T::kCopySteps], const KvCopy& c, const DecodeParams& p,
                                               const CacheSequence& seq, int n_block) {
#pragma unroll
  for (int r = 0; r < kRuns; ++r)
    pages[r] = page_of<true>(p, seq, n_block * T::kBlockN + r * (T::kBlockN / kRuns) + c.row);
}

// The copies of such a tile: one address per run, then kCopyRows rows further per step. Every
// address lies in a row below seqlen_k, so inside the cache.
template <int kRuns>
__device__ __forceinline__ void copy_run_tile(const KvCopy& c, const DecodeParams& p, const CacheSequence& seq,
                                              int n_block, u32 slot_bytes, const int (&pages)[T::kCopySteps]) {
  constexpr int kRunSteps = T::kCopySteps / kRuns;
#pragma unroll
  for (int r = 0; r < kRuns; ++r) {
    const int j = n_block * T::kBlockN + r * (T::kBlockN / kRuns) + c.row;
    const i64 offset = key_offset<true>(p, seq, j, pages[r]) + c.col_offset;
    const u16* k_src = c.k_head + offset;
    const u16* v_src = c.v_head + offset;
#pragma unroll
    for (int i = 0; i < kRunSteps; ++i) {
      const u32 dst = c.k_dst + slot_bytes + (r * kRunSteps + i) * KvCopy::kStepBytes;
      cp_async_16_stream(dst, k_src, c.src_bytes);
      cp_async_16_stream(dst + KvCopy::kVBytes, v_src, c.src_bytes);
      k_src += c.step_stride;
      v_src += c.step_stride;
    }
  }
}

// Any other tile (a sequence's last, or pages of another size): each step's row finds its own
// page (pages[step]), and rows past seqlen_k are zero-filled from the head's first row.
__device__ __forceinline__ void read_step_pages(int (&pages)[T::kCopySteps], const KvCopy& c, const DecodeParams& p,
                                                const CacheSequence& seq, int n_block) {
#pragma unroll
  for (int step = 0; step < T::kCopySteps; ++step) {
    const int j = n_block * T::kBlockN + c.row + step * T::kCopyRows;
    pages[step] = j < seq.seqlen_k ? page_of(p, seq, j) : 0;
  }
}

__device__ __forceinline__ void copy_step_tile(const KvCopy& c, const DecodeParams& p, const CacheSequence& seq,
                                               int n_block, u32 slot_bytes, const int (&pages)[T::kCopySteps]) {
#pragma unroll
  for (int step = 0; step < T::kCopySteps; ++step) {
    const int j = n_block * T::kBlockN + c.row + step * T::kCopyRows;
    const bool valid = j < seq.seqlen_k && c.src_bytes != 0;
    const i64 offset = valid ? key_offset(p, seq, j, pages[step]) + c.col_offset : 0;
    const u32 dst = c.k_dst + slot_bytes + step * KvCopy::kStepBytes;
    cp_async_16_stream(dst, c.k_head + offset, valid ? 16 : 0);
    cp_async_16_stream(dst + KvCopy::kVBytes, c.v_head + offset, valid ? 16 : 0);
  }
}
}  // namespace cf

static_assert(sizeof(cf::DecodeSmem) + cf::kDecodeSmemSlack == CF_SMEM_BYTES,
              "cupyflash/kernels/flash_decode.py smem_bytes() disagrees with the kernel's layout");

namespace cf {
// Row `row`, columns col and col + 1, of the block's result: the key warps' unnormalised O
// weighted by merge.weight (exp2(max_w - max) / total sum; 0 for a row that saw no key).
__device__ __forceinline__ float2 block_result_pair(const DecodeSmem& sm, int row, int col) {
  float o0 = 0.f, o1 = 0.f;
#pragma unroll
  for (int w = 0; w < T::kKeyWarps; ++w) {
    const float weight = sm.merge.weight[w][row];
    o0 = fmaf(weight, sm.merge.o[w][row][col], o0);
    o1 = fmaf(weight, sm.merge.o[w][row][col + 1], o1);
  }
  return make_float2(o0, o1);
}

#if CF_CLUSTER > 0
// The cluster's kSplits blocks (the splits of one kv head and query tile) have each left their
// rows' normalised O in merge.o[0] and lse in merge.lse. Block `rank` merges column pairs
// [rank * per_block, +per_block) of every row, reading each split's values from its block's
// shared memory, by flash_merge's rule (float32, expf / logf: a split whose lse is -inf weighs 0;
// its O is 0, written by the block, so every load can be in flight at once); the block of rank
// 0 writes each row's lse. The caller syncs the cluster before and after.
template <int kSplits>
__device__ __forceinline__ void merge_in_cluster(const DecodeSmem& sm, const DecodeParams& p, int b, int kv_head,
                                                 int row_begin, int rows) {
  const u32 rank = cluster_rank();
  const int pairs = p.head_dim / 2;
  const int per_block = (pairs + kSplits - 1) / kSplits;
  const int first = static_cast<int>(rank) * per_block, mine = min(per_block, pairs - first);
  if (mine <= 0) return;
  for (int idx = threadIdx.x; idx < rows * mine; idx += T::kThreads) {
    const int row = idx / mine, col = 2 * (first + idx % mine);
    const u32 lse_addr = smem_addr(&sm.merge.lse[row]), o_addr = smem_addr(&sm.merge.o[0][row][col]);
    float lse[kSplits];
    float2 o[kSplits];
#pragma unroll
    for (int s = 0; s < kSplits; ++s) {
      lse[s] = cluster_load_f32(cluster_map(lse_addr, s));
      o[s] = cluster_load_f32x2(cluster_map(o_addr, s));
    }
    float m = -infinity();
#pragma unroll
    for (int s = 0; s < kSplits; ++s) m = fmaxf(m, lse[s]);
    const bool empty = m == -infinity();  // no split saw a key: out 0, lse -inf
    float total = 0.f, o0 = 0.f, o1 = 0.f;
#pragma unroll
    for (int s = 0; s < kSplits; ++s) {
      const float w = empty ? 0.f : expf(lse[s] - m);  // -inf: 0
      total += w;
      o0 = fmaf(w, o[s].x, o0);
      o1 = fmaf(w, o[s].y, o1);
    }
    const float inv = empty ? 0.f : 1.f / total;
    const PackedRow at = packed_row(row_begin + row, kv_head, p.group_size);
    u16* out = p.out.ptr + b * p.out.batch_stride + at.token * p.out.row_stride + at.head * p.out.head_stride;
    *reinterpret_cast<u32*>(out + col) = Element::pack(o0 * inv, o1 * inv);
    if (col == 0)
      p.lse[(static_cast<i64>(b) * p.heads_q + at.head) * p.seqlen_q + at.token] = empty ? -infinity() : m + logf(total);
  }
}
#endif
}  // namespace cf

#if CF_CLUSTER > 0
#define CF_DECODE_CLUSTER __cluster_dims__(CF_CLUSTER, 1, 1)
#else
#define CF_DECODE_CLUSTER
#endif

#if CF_KV_TMA
#define CF_DECODE_MAPS , const __grid_constant__ cf::DecodeTensorMaps maps
#else
#define CF_DECODE_MAPS
#endif

// Reads DecodeParams (params.cuh), and with CF_KV_TMA the tensor maps after it. Grid: (heads_kv *
// m_tiles * num_splits, batch), kv head fastest (blocks that run together read neighbouring
// 256-byte pieces of the same key rows), then m tile; with CF_CLUSTER split fastest (a cluster
// is CF_CLUSTER consecutive blocks), then kv head, then m tile. Block: 128 threads; dynamic
// smem: DecodeSmem plus kDecodeSmemSlack. Writes out and lse (num_splits 1, or CF_CLUSTER) or
// the split's out_partial and lse_partial rows.
extern "C" __global__ void __launch_bounds__(cf::T::kThreads) CF_DECODE_CLUSTER
    flash_decode(const __grid_constant__ cf::DecodeParams p CF_DECODE_MAPS) {
  using namespace cf;
  extern __shared__ Vec16 smem_raw[];
#if CF_KV_TMA
  const u32 raw_address = smem_addr(smem_raw);
  const u32 smem_base = (raw_address + kDecodeSmemSlack - 1) & ~static_cast<u32>(kDecodeSmemSlack - 1);
  DecodeSmem& sm = *reinterpret_cast<DecodeSmem*>(reinterpret_cast<char*>(smem_raw) + (smem_base - raw_address));
#else
  DecodeSmem& sm = *reinterpret_cast<DecodeSmem*>(smem_raw);
#endif
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / T::kKeyWarps, wk = warp % T::kKeyWarps;
  const int group_size = p.group_size, seqlen_q = p.seqlen_q, head_dim = p.head_dim;
  const int heads_kv = p.heads_q / group_size;
#if CF_CLUSTER > 0
  constexpr int num_splits = CF_CLUSTER;  // one cluster: the grid holds exactly these splits
  const int split = blockIdx.x % num_splits;
  const int kv_head = blockIdx.x / num_splits % heads_kv, m_tile = blockIdx.x / num_splits / heads_kv;
#else
  const int num_splits = p.num_splits;
  const int m_tiles = (seqlen_q * group_size + T::kBlockM - 1) / T::kBlockM;
  const int kv_head = blockIdx.x % heads_kv, m_tile = blockIdx.x / heads_kv % m_tiles;
  const int split = blockIdx.x / heads_kv / m_tiles;
#endif
  const int b = blockIdx.y;
  const int packed_rows = seqlen_q * group_size;
  const int row_begin = m_tile * T::kBlockM;
  const int rows = min(T::kBlockM, packed_rows - row_begin);
  const CacheSequence seq = cache_sequence_of(p, b);

  // The key tiles some row of this block sees, then this split's share of them.
  const Mask mask{seqlen_q, seq.seqlen_k, p.window_left, p.window_right};
  const int token_begin = row_begin / group_size, token_end = (row_begin + rows - 1) / group_size + 1;
  int n_begin, n_end;
  mask.key_tiles<T::kBlockN>(token_begin, token_end, n_begin, n_end);
  const int tiles_per_split = p.split_tiles > 0 ? p.split_tiles : (n_end + num_splits - 1) / num_splits;
  n_begin = max(n_begin, split * tiles_per_split);
  n_end = min(n_end, (split + 1) * tiles_per_split);
  const int n_tiles = max(n_end - n_begin, 0);

  // Q: the block's packed rows, zero past the last one.
  const u16* q_batch = p.q.ptr + b * p.q.batch_stride;
  for (int idx = tid; idx < T::kBlockM * T::kChunksPerRow; idx += T::kThreads) {
    const int row = idx / T::kChunksPerRow, col = (idx % T::kChunksPerRow) * kChunk;
    const bool valid = row < rows && col < head_dim;
    const PackedRow at = packed_row(row_begin + row, kv_head, group_size);
    const u16* src = q_batch + at.token * p.q.row_stride + at.head * p.q.head_stride + col;
    cp_async_16(smem_addr(&sm.q[row][col]), valid ? src : p.q.ptr, valid ? 16 : 0);
  }

#if CF_KV_TMA
  // K/V tiles by bulk tensor copies, issued by thread 0 into each stage a tile is free: every box
  // of the tile (kBoxRows keys x 64 columns of K and of V) completes the stage's mbarrier. A
  // contiguous cache's box is at (column, kv head, key, slot); a paged one's at (column, kv head,
  // key in its page, page), every box inside one page. Boxes past the array's ends read zeros;
  // rows past seqlen_k but inside it are cleared before use (see the loop).
  const u32 full_bar = smem_addr(&sm.full[0]);
  const u32 k_tiles = smem_addr(&sm.tiles.k[0]), v_tiles = smem_addr(&sm.tiles.v[0]);
  const int cache_slot = cache_slot_of(p, b);
  // Thread 0 reads the pages of the next tile it will issue as it issues one, so that the table
  // read has a tile's time to arrive (a contiguous cache has none).
  constexpr int kBoxes = T::kBlockN / T::kBoxRows;
  int box_pages[kBoxes] = {};
  auto read_box_pages = [&](int n_block) {
    if (seq.pages == nullptr) return;
#pragma unroll
    for (int box = 0; box < kBoxes; ++box) {  // a row past seqlen_k may have no table entry: any page will do
      const int j = n_block * T::kBlockN + box * T::kBoxRows;
      box_pages[box] = j < seq.seqlen_k ? page_of<true>(p, seq, j) : 0;
    }
  };
  auto issue_tile = [&](int stage, int n_block) {
    const u32 bar = full_bar + 8 * stage;
    mbarrier_arrive_expect_tx(bar, 2 * T::kTileBytes);
#pragma unroll
    for (int box = 0; box < kBoxes; ++box) {
      const int j = n_block * T::kBlockN + box * T::kBoxRows;
      const int key = seq.pages != nullptr ? j & (p.page_size - 1) : j;
      const int outer = seq.pages != nullptr ? box_pages[box] : cache_slot;
#pragma unroll
      for (int col = 0; col < T::kColBoxes; ++col) {
        const u32 at = stage * T::kTileBytes + (col * T::kBlockN + box * T::kBoxRows) * 128;
        tma_load_4d(k_tiles + at, &maps.k, bar, 64 * col, kv_head, key, outer);
        tma_load_4d(v_tiles + at, &maps.v, bar, 64 * col, kv_head, key, outer);
      }
    }
    read_box_pages(n_block + 1);  // (past the split's last tile: read, never used)
  };
  if (tid == 0) {
    for (int s = 0; s < T::kStages; ++s) mbarrier_init(full_bar + 8 * s, 1);  // the issuing thread's arrival
    fence_mbarrier_init();
    prefetch_tensormap(&maps.k);
    prefetch_tensormap(&maps.v);
    read_box_pages(n_begin);
    for (int s = 0; s < min(T::kStages, n_tiles); ++s) issue_tile(s, n_begin + s);
  }
  cp_async_commit();  // Q's copies
#else
  // K/V copies (KvCopy), and the pages of their rows read a tile ahead. A tile below seqlen_k
  // whose rows lie in at most kMaxCopyRuns pages (a contiguous slot; pages of 16 keys and up,
  // a power of two) is copied run by run; any other one step by step.
  const bool copies = T::kCopyThreads == T::kThreads || tid < T::kCopyThreads;
  KvCopy copy;
  copy.k_head = p.k_cache.ptr + kv_head * p.k_cache.head_stride;
  copy.v_head = p.v_cache.ptr + kv_head * p.v_cache.head_stride;
  const int copy_col = tid % T::kChunksPerRow * kChunk;
  copy.row = tid / T::kChunksPerRow;
  copy.k_dst = smem_addr(&sm.tiles.k[0][copy.row][copy_col]);
  copy.col_offset = copy_col < head_dim ? copy_col : 0;
  copy.src_bytes = copy_col < head_dim ? 16 : 0;
  copy.step_stride = T::kCopyRows * p.k_cache.row_stride;
  const int page_size = p.page_size;
  const int copy_runs = seq.pages == nullptr ? 1
                        : seq.page_shift < 0 ? 0
                        : page_size >= T::kBlockN ? 1
                        : page_size >= T::kBlockN / T::kMaxCopyRuns ? T::kBlockN / page_size
                                                                   : 0;
  auto by_runs = [&](int n_block) { return copy_runs > 0 && (n_block + 1) * T::kBlockN <= seq.seqlen_k; };
  int pages[T::kCopySteps] = {};
  auto read_pages = [&](int n_block) {
    if (seq.pages == nullptr || !copies) return;
    if (!by_runs(n_block))
      read_step_pages(pages, copy, p, seq, n_block);
    else if (copy_runs == 1)
      read_run_pages<1>(pages, copy, p, seq, n_block);
    else if (copy_runs == 2)
      read_run_pages<2>(pages, copy, p, seq, n_block);
    else
      read_run_pages<4>(pages, copy, p, seq, n_block);
  };
  auto load_kv = [&](int slot, int n_block) {
    if (!copies) return;
    const u32 slot_bytes = slot * sizeof(sm.tiles.k[0]);
    if (!by_runs(n_block))
      copy_step_tile(copy, p, seq, n_block, slot_bytes, pages);
    else if (copy_runs == 1)
      copy_run_tile<1>(copy, p, seq, n_block, slot_bytes, pages);
    else if (copy_runs == 2)
      copy_run_tile<2>(copy, p, seq, n_block, slot_bytes, pages);
    else
      copy_run_tile<4>(copy, p, seq, n_block, slot_bytes, pages);
  };

  // Prologue: kStages - 1 tiles, one commit group each (Q joins the first); then the pages of
  // the next tile to load. Not unrolled: each load_kv is four copy paths of code.
#pragma unroll 1
  for (int s = 0; s < T::kStages - 1; ++s) {
    if (s < n_tiles) {
      read_pages(n_begin + s);
      load_kv(s, n_begin + s);
    }
    cp_async_commit();
  }
  if (T::kStages - 1 < n_tiles) read_pages(n_begin + T::kStages - 1);
#endif

  float acc_o[1][T::kDTiles][4];
  zero(acc_o);
  OnlineSoftmax<1> softmax;
  softmax.init();
  const float scale_log2 = p.scale_log2;
  const int g = lane >> 2, t4 = lane & 3;

  // Q landed with the first commit group (the first K/V tile's): the same wait as the first
  // tile's, so only the barrier before it comes early. (With CF_KV_TMA Q is the only group,
  // and the barrier also publishes the initialised mbarriers.)
  u32 q_frag[T::kHeadDim / 16][1][4];  // unused (and not allocated) without kQInRegisters
  if constexpr (T::kQInRegisters) {
    cp_async_wait<CF_KV_TMA ? 0 : T::kStages - 2>();
    __syncthreads();
    load_a_frags<1, T::kHeadDim>(q_frag, sm.q, 16 * wm, lane);
  }
#if CF_KV_TMA
  // The lane's ldmatrix addresses in stage 0 (gemm_ft_sw128, gemm_rn_sw128).
  u32 k_addrs[4], v_addrs[4];
  b_pair_sw128_addrs(k_addrs, k_tiles, wk * T::kWarpKeys, lane);
  b_pair_trans_sw128_addrs(v_addrs, v_tiles, wk * T::kWarpKeys, lane);
#else
  // The warp's ldmatrix addresses of its keys in slot 0 of K and V; a slot is a constant further.
  const u32 k_lane_addr = b_pair_addr(sm.tiles.k[0], wk * T::kWarpKeys, 0, lane);
  const u32 v_lane_addr = b_pair_trans_addr(sm.tiles.v[0], 0, wk * T::kWarpKeys, lane);
#endif

  for (int it = 0; it < n_tiles; ++it) {
#if CF_KV_TMA
    const int slot = it % T::kStages;
    mbarrier_wait(full_bar + 8 * slot, (it / T::kStages) & 1);
    const int tile_keys = seq.seqlen_k - (n_begin + it) * T::kBlockN;
    if (tile_keys < T::kBlockN) {
      // The sequence's last tile: its V rows past seqlen_k hold whatever the cache holds there,
      // and P is 0 for them but 0 * NaN is not 0. Zero them (K's are masked to -inf).
      const int chunks = (T::kBlockN - tile_keys) * 8;  // 16-byte chunks of one box's rows
      for (int idx = tid; idx < chunks * T::kColBoxes; idx += T::kThreads) {
        const int col = idx / chunks, rest = idx % chunks;
        *reinterpret_cast<Vec16*>(&sm.tiles.v[slot][col][tile_keys + rest / 8][8 * (rest % 8)]) = Vec16{};
      }
      __syncthreads();
    }
    const u32 slot_bytes = slot * T::kTileBytes;
#else
    cp_async_wait<T::kStages - 2>();
    __syncthreads();
    const int next = it + T::kStages - 1;
    if (next < n_tiles) {
      load_kv(next % T::kStages, n_begin + next);
      if (next + 1 < n_tiles) read_pages(n_begin + next + 1);
    }
    cp_async_commit();

    const int slot = it % T::kStages;
    const u32 slot_bytes = slot * sizeof(sm.tiles.k[0]);
#endif
    const int key0 = (n_begin + it) * T::kBlockN + wk * T::kWarpKeys;
    float s[1][T::kNTiles][4];
    zero(s);
#if CF_KV_TMA
    gemm_ft_sw128<Element, 1, T::kNTiles, T::kHeadDim, T::kBlockN>(s, q_frag, k_addrs, slot_bytes);
#else
    if constexpr (T::kQInRegisters)
      gemm_ft<Element, 1, T::kNTiles, T::kHeadDim, T::kStride>(s, q_frag, k_lane_addr + slot_bytes);
    else
      gemm_nt<Element, 1, T::kNTiles, T::kHeadDim>(s, sm.q, 16 * wm, sm.tiles.k[slot], wk * T::kWarpKeys, lane);
#endif
    if (!mask.tile_is_full(token_begin, token_end, key0, key0 + T::kWarpKeys)) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = (row_begin + 16 * wm + g + 8 * h) / group_size;  // the row's token
        const int begin = mask.key_begin(i), end = mask.key_end(i);
#pragma unroll
        for (int nt = 0; nt < T::kNTiles; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int j = key0 + 8 * nt + 2 * t4 + c;
            if (j < begin || j >= end) s[0][nt][2 * h + c] = -infinity();
          }
      }
    }
    softmax.update<true>(s, acc_o, scale_log2);  // over a long cache the row max settles early
#if CF_KV_TMA
    gemm_rn_sw128<Element, 1, T::kDTiles, T::kNTiles, T::kBlockN>(acc_o, s, v_addrs, slot_bytes);
    __syncthreads();  // every warp is done with this stage: its next tile may come in
    if (tid == 0 && it + T::kStages < n_tiles) issue_tile(slot, n_begin + it + T::kStages);
#else
    gemm_rn<Element, 1, T::kDTiles, T::kNTiles, T::kStride>(acc_o, s, v_lane_addr + slot_bytes);
#endif
  }

  // Merge the kKeyWarps partial results of each row. The tiles' bytes are reused: wait for
  // every copy and every warp's last reads first (bulk copies: every one issued was waited for).
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float l = quad_sum(softmax.l_i[0][h]);
    const int row = 16 * wm + g + 8 * h;
    if (t4 == 0) {
      sm.merge.max_log2[wk][row] = l > 0.f ? scaled_max(softmax.m_i[0][h], scale_log2) : -infinity();
      sm.merge.sum[wk][row] = l;
    }
#pragma unroll
    for (int dt = 0; dt < T::kDTiles; ++dt) {
      sm.merge.o[wk][row][8 * dt + 2 * t4] = acc_o[0][dt][2 * h];
      sm.merge.o[wk][row][8 * dt + 2 * t4 + 1] = acc_o[0][dt][2 * h + 1];
    }
  }
  __syncthreads();
  if (tid < T::kBlockM) {
    float m = -infinity();
#pragma unroll
    for (int w = 0; w < T::kKeyWarps; ++w) m = fmaxf(m, sm.merge.max_log2[w][tid]);
    float total = 0.f;
    if (m != -infinity())
#pragma unroll
      for (int w = 0; w < T::kKeyWarps; ++w) total += sm.merge.sum[w][tid] * exp2f(sm.merge.max_log2[w][tid] - m);
    const bool empty = !(total > 0.f);  // out = 0, lse = -inf: the row saw no key
#pragma unroll
    for (int w = 0; w < T::kKeyWarps; ++w)
      sm.merge.weight[w][tid] = empty ? 0.f : exp2f(sm.merge.max_log2[w][tid] - m) / total;
    sm.merge.lse[tid] = empty ? -infinity() : (m + log2f(total)) * kLn2;
  }
  __syncthreads();

#if CF_CLUSTER > 0
  // The block's result stays in shared memory, normalised into merge.o[0] (each thread rewrites
  // only the pair it read), for the cluster to merge.
  for (int idx = tid; idx < rows * (head_dim / 2); idx += T::kThreads) {
    const int row = idx / (head_dim / 2), col = 2 * (idx % (head_dim / 2));
    const float2 o = block_result_pair(sm, row, col);
    sm.merge.o[0][row][col] = o.x;
    sm.merge.o[0][row][col + 1] = o.y;
  }
  cluster_sync();
  merge_in_cluster<CF_CLUSTER>(sm, p, b, kv_head, row_begin, rows);
  cluster_sync();  // the other blocks read this one's shared memory until here
#else
  // Store: rows [0, rows), columns [0, head_dim), two columns per thread per step.
  const bool partial = num_splits > 1;
  for (int idx = tid; idx < rows * (head_dim / 2); idx += T::kThreads) {
    const int row = idx / (head_dim / 2), col = 2 * (idx % (head_dim / 2));
    const float2 o = block_result_pair(sm, row, col);
    const PackedRow at = packed_row(row_begin + row, kv_head, group_size);
    if (partial) {
      const i64 stat = ((static_cast<i64>(split) * p.batch + b) * p.heads_q + at.head) * seqlen_q + at.token;
      *reinterpret_cast<float2*>(p.out_partial + stat * head_dim + col) = o;
    } else {
      u16* out = p.out.ptr + b * p.out.batch_stride + at.token * p.out.row_stride + at.head * p.out.head_stride;
      *reinterpret_cast<u32*>(out + col) = Element::pack(o.x, o.y);
    }
  }
  for (int row = tid; row < rows; row += T::kThreads) {
    const PackedRow at = packed_row(row_begin + row, kv_head, group_size);
    const i64 stat = (static_cast<i64>(b) * p.heads_q + at.head) * seqlen_q + at.token;
    if (partial)
      p.lse_partial[static_cast<i64>(split) * p.batch * p.heads_q * seqlen_q + stat] = sm.merge.lse[row];
    else
      p.lse[stat] = sm.merge.lse[row];
  }
#endif
}

// Writes k_new and v_new (batch, seqlen_new, heads_kv, head_dim) into the cache at keys
// [cached, cached + seqlen_new) of each sequence, 16 bytes per thread. Grid: (ceil(seqlen_new *
// heads_kv * head_dim / 8 / kAppendThreads), batch); block: kAppendThreads.
extern "C" __global__ void __launch_bounds__(cf::kAppendThreads)
    flash_decode_append(const __grid_constant__ cf::DecodeParams p) {
  using namespace cf;
  const int b = blockIdx.y;
  const int chunks = p.head_dim / kChunk;
  const int heads_kv = p.heads_q / p.group_size;
  const i64 idx = static_cast<i64>(blockIdx.x) * kAppendThreads + threadIdx.x;
  if (idx >= static_cast<i64>(p.seqlen_new) * heads_kv * chunks) return;
  const int col = static_cast<int>(idx % chunks) * kChunk;
  const int head = static_cast<int>(idx / chunks % heads_kv);
  const int j_new = static_cast<int>(idx / chunks / heads_kv);
  const CacheSequence seq = cache_sequence_of(p, b);
  const int j = seq.cached + j_new;
  const i64 at = key_offset(p, seq, j, seq.pages != nullptr ? page_of(p, seq, j) : 0) + col;
  const i64 k_from = b * p.k_new.batch_stride + j_new * p.k_new.row_stride + head * p.k_new.head_stride + col;
  const i64 v_from = b * p.v_new.batch_stride + j_new * p.v_new.row_stride + head * p.v_new.head_stride + col;
  *reinterpret_cast<Vec16*>(p.k_cache.ptr + head * p.k_cache.head_stride + at) =
      *reinterpret_cast<const Vec16*>(p.k_new.ptr + k_from);
  *reinterpret_cast<Vec16*>(p.v_cache.ptr + head * p.v_cache.head_stride + at) =
      *reinterpret_cast<const Vec16*>(p.v_new.ptr + v_from);
}

// Merges the num_splits float32 partials of every query row into out and lse, by the rule of
// flash_merge.cu (in float32, accurate expf / logf; a split whose lse is -inf weighs 0 and its
// out is not read). One block per row (b, i, h), h fastest. Thread s first reads split s's lse
// (once: each L2 round trip is a good part of this small kernel's time), the block finds their
// max and sum, and each split's weight is left in shared memory; then
// thread t owns the column pair t % 64 (and every 64th after it) over the splits s = t / 64 + 4 k,
// eight loads in flight at a time, and the four sums of a column meet in shared memory.
// (A warp walking all splits of a row spent ~100 us on one long sequence's 256 splits.)
// Grid: batch * seqlen_q * heads_q; block: kCombineThreads.
extern "C" __global__ void __launch_bounds__(cf::kCombineThreads)
    flash_decode_combine(const __grid_constant__ cf::DecodeParams p) {
  using namespace cf;
  constexpr int kGroups = kCombineThreads / 64;
  constexpr int kWarps = kCombineThreads / 32;
  __shared__ float weights[kDecodeMaxSplits];
  __shared__ float reduce[kWarps];
  __shared__ float2 sums[kGroups][64];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int heads_q = p.heads_q, seqlen_q = p.seqlen_q, splits = min(p.num_splits, kDecodeMaxSplits);
  const int head_dim = p.head_dim;
  const i64 row = blockIdx.x;
  const int head = static_cast<int>(row % heads_q);
  const i64 batch_row = row / heads_q;
  const int i = static_cast<int>(batch_row % seqlen_q);
  const int b = static_cast<int>(batch_row / seqlen_q);
  const i64 stat = (static_cast<i64>(b) * heads_q + head) * seqlen_q + i;
  const i64 split_stride = static_cast<i64>(p.batch) * heads_q * seqlen_q;

  // Block-wide max and sum of the splits' lse: thread s holds split s's (read once; -inf past
  // the last split weighs 0).
  static_assert(kDecodeMaxSplits <= kCombineThreads, "one split's lse per thread");
  const float my_lse = tid < splits ? p.lse_partial[tid * split_stride + stat] : -infinity();
  float m = my_lse;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, shfl_xor(m, offset));
  if (lane == 0) reduce[warp] = m;
  __syncthreads();
  m = reduce[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, reduce[w]);
  const bool empty = m == -infinity();  // no split saw a key: every weight 0
  float sum = 0.f;
  if (tid < splits) {
    sum = empty ? 0.f : expf(my_lse - m);  // -inf: 0
    weights[tid] = sum;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += shfl_xor(sum, offset);
  __syncthreads();  // every warp has read reduce[] for the max
  if (lane == 0) reduce[warp] = sum;
  __syncthreads();
  sum = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) sum += reduce[w];
  const float inv_sum = empty ? 0.f : 1.f / sum;
  if (tid == 0) p.lse[stat] = empty ? -infinity() : m + logf(sum);

  u16* out = p.out.ptr + b * p.out.batch_stride + i * p.out.row_stride + head * p.out.head_stride;
  const float* part = p.out_partial + stat * head_dim;
  const int pair = tid % 64, group = tid / 64;
  for (int col0 = 0; col0 < head_dim; col0 += 128) {
    const int col = col0 + 2 * pair;
    float o0 = 0.f, o1 = 0.f;
    if (col < head_dim) {
#pragma unroll 8
      for (int s = group; s < splits; s += kGroups) {
        const float w = weights[s];
        if (w == 0.f) continue;  // the same for every thread: a split that saw no key
        const float2 x = *reinterpret_cast<const float2*>(part + s * split_stride * head_dim + col);
        o0 = fmaf(w, x.x, o0);
        o1 = fmaf(w, x.y, o1);
      }
    }
    sums[group][pair] = make_float2(o0, o1);
    __syncthreads();
    if (group == 0 && col < head_dim) {
#pragma unroll
      for (int g = 1; g < kGroups; ++g) {
        o0 += sums[g][pair].x;
        o1 += sums[g][pair].y;
      }
      *reinterpret_cast<u32*>(out + col) = Element::pack(o0 * inv_sum, o1 * inv_sum);
    }
    __syncthreads();  // sums[] is written again by the next column block
  }
}
