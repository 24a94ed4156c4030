// The contract between the host and the kernels: one parameter struct per pass, and the few
// numbers the host also needs to size grids and buffers.
//
// Every forward kernel takes a FwdParams and every backward kernel a BwdParams, as one
// `const __grid_constant__` argument (it stays in the constant bank; taking a field's address
// makes no copy). cupyflash/launch.py writes the same layout once, as NumPy structured dtypes,
// and cupyflash/build.py passes its offsets to every compile as CF_HOST_LAYOUT, a list of
// CF_OFFSET / CF_SIZE / CF_VALUE checks expanded at the end of this file: a field added,
// moved or retyped on one side only, or a constant changed on one side only, fails the compile.
#pragma once
#include "ptx.cuh"

#ifndef CF_HOST_LAYOUT
#error "CF_HOST_LAYOUT is not defined: compile the kernels through cupyflash/build.py"
#endif

namespace cf {

// A (batch, seqlen, heads, head_dim) array of 16-bit elements; the last dimension is contiguous.
struct Tensor16 {
  u16* ptr;
  i64 batch_stride, row_stride, head_stride;  // in elements
};

// Fields of the features beyond fixed-length dense attention. The variable-length ones
// (cu_seqlens_*, seqused_k, total_*) are read by the CF_VARLEN variants (sequence.cuh); the rest
// (paged KV caches, split-KV partials, score modifiers, dropout) are written as zeros (null
// pointers) and read by no kernel yet, so a feature that needs one starts from a struct that
// already has it.
struct NextFeatures {
  const int* cu_seqlens_q;  // (batch + 1) int32 first query row of each packed sequence, then total_q
  const int* cu_seqlens_k;  // (batch + 1) int32 first key row of each packed sequence
  const int* seqused_k;     // (batch) int32 keys in use per sequence; null: up to the next sequence
  const int* block_table;   // (batch, max_pages) int32 page indices of a paged KV cache; null: dense
  i64 block_table_batch_stride;
  int page_size;            // keys per page
  int num_splits;           // key splits whose partial results are combined after; 0: one pass
  float* out_partial;       // (num_splits, batch, heads_q, seqlen_q, head_dim) float32
  float* lse_partial;       // (num_splits, batch, heads_q, seqlen_q) float32
  float softcap;            // scores become softcap * tanh(s / softcap); 0: off
  const float* alibi_slopes;  // (batch or 1, heads_q) float32; null: off
  u64 rng_seed, rng_offset;  // dropout's Philox stream
  float dropout_p;          // 0: off
  int total_q, total_k;     // rows of the packed q and k (varlen): every offset is clamped into them
};

// What a forward kernel reads. Grid and block are the kernel's own (see its header comment).
struct FwdParams {
  Tensor16 q;       // (batch, seqlen_q, heads_q, head_dim)
  Tensor16 k, v;    // (batch, seqlen_k, heads_q / group_size, head_dim): q head h reads kv head h / group_size
  Tensor16 out;     // like q
  float* lse;       // (batch, heads_q, seqlen_q) float32 contiguous: natural log of each row's softmax
                    // denominator, -inf for a row that sees no key
  int batch, seqlen_q, seqlen_k, heads_q, group_size;
  int head_dim;     // the stored head dim (the caller's, rounded up to 8), <= the compiled kHeadDim:
                    // columns past it are zero-filled on load and not stored
  int window_left, window_right;  // query i sees keys [i + off - left, i + off + right], off =
                                  // seqlen_k - seqlen_q; -1: unbounded; causal is right = 0
  float scale_log2;  // softmax_scale * log2(e): exp(scale * s) = exp2(scale_log2 * s)
  NextFeatures next;
};

// What every backward kernel reads (delta, dK/dV, dQ and the dQ conversions).
struct BwdParams {
  Tensor16 q, k, v, out, dout;  // as in FwdParams; dout like q
  Tensor16 dq, dk, dv;          // like q, k, v
  const float* lse;             // (batch, heads_q, seqlen_q) float32 from the forward
  float* delta;                 // (batch, heads_q, seqlen_q) float32: rowsum(dout * out)
  float* lse_log2;              // like delta: lse * log2(e), the exponent offset dK/dV and dQ read;
                                // +inf where lse is -inf (a row that sees no key), so that the
                                // row's P = exp2(s * scale_log2 - lse_log2) is 0 for every s
  float* dq_accum;              // float32 dQ / softmax_scale the dK/dV kernel adds into; null
                                // without atomic dQ. mma.sync kernel: like q, with the strides
                                // below; Hopper kernel: DqUnits (traits.cuh), no strides
  i64 dq_accum_batch_stride, dq_accum_row_stride, dq_accum_head_stride;  // in floats
  int dq_accum_head_dim;        // Hopper layout: the dK/dV kernel's compiled head dim
  int batch, seqlen_q, seqlen_k, heads_q, group_size, head_dim, window_left, window_right;
  float scale_log2;             // as in FwdParams
  float softmax_scale;
  NextFeatures next;
};

// What flash_merge reads: num_parts results for the same query rows, each an out like q (16-bit,
// the same strides for every part) and a float32 lse (batch, heads_q, seqlen_q) contiguous.
struct MergeParams {
  const u64* part_table;  // (num_parts, 2) on the device: each part's out and lse address
  i64 in_batch_stride, in_row_stride, in_head_stride;  // of every part's out, in elements
  Tensor16 out;           // (batch, seqlen_q, heads_q, head_dim): the merged out
  float* lse;             // (batch, heads_q, seqlen_q) float32 contiguous: the merged lse
  int num_parts, batch, seqlen_q, heads_q, head_dim;
};

// What the decoding kernels read (flash_decode.cu: flash_decode_append, flash_decode,
// flash_decode_combine): new query tokens against a KV cache, contiguous or paged.
struct DecodeParams {
  Tensor16 q;                 // (batch, seqlen_q, heads_q, head_dim)
  Tensor16 k_cache, v_cache;  // contiguous: (batch_cache, seqlen_cache, heads_kv, head_dim); paged:
                              // (num_pages, page_size, heads_kv, head_dim), batch_stride = page stride.
                              // Both have the same strides (the host checks)
  Tensor16 k_new, v_new;      // (batch, seqlen_new, heads_kv, head_dim): written into the cache first
  Tensor16 out;               // like q
  float* lse;                 // (batch, heads_q, seqlen_q) float32 contiguous
  float* out_partial;         // (num_splits, batch, heads_q, seqlen_q, head_dim) float32; num_splits > 1
  float* lse_partial;         // (num_splits, batch, heads_q, seqlen_q) float32; num_splits > 1
  const int* cache_seqlens;   // (batch) keys in the cache before the new ones; null: cache_seqlen for all
  const int* cache_batch_idx;  // (batch) contiguous cache slot of each sequence; null: slot b
  const int* block_table;     // (batch, >= capacity / page_size) page of each logical page; null: contiguous
  i64 block_table_batch_stride;  // in ints
  int batch, seqlen_q, heads_q, group_size, head_dim;  // head_dim: stored, a multiple of 8
  int seqlen_new;             // new keys per sequence (0: no appends)
  int cache_seqlen;           // every sequence's cached keys when cache_seqlens is null
  int capacity;               // keys one sequence's cache holds: seqlen_cache, or max_pages * page_size
  int page_size, num_pages, batch_cache;  // bounds the device indices are clamped into
  int num_splits;             // key ranges per (batch, kv head); 1: out and lse written directly
  int split_tiles;            // > 0: key tiles per split (split_size / kDecodeBlockN); 0: even shares
  int window_left, window_right;  // as in FwdParams (causal: right = 0)
  float scale_log2;
};

// Numbers the host computes grids and buffer shapes from.
constexpr int kSmemAlignSlack = 1024;  // Hopper kernels lay their shared struct on a 1024-byte boundary
constexpr int kZeroThreads = 256;      // flash_bwd_zero_unused_keys' block
constexpr int kZeroBlocksPerGap = 16;  // its blocks per run of unused keys
constexpr int kDeltaThreads = 128;     // flash_bwd_delta's block
constexpr int kDeltaLanesPerRow = 8;   // lanes that share one row, 16 bytes each per step
constexpr int kDeltaRows = kDeltaThreads / kDeltaLanesPerRow;  // rows per flash_bwd_delta block
constexpr int kConvertThreads = 256;   // the dQ conversions' block
constexpr int kConvertChunk = 8;       // elements per thread of flash_bwd_convert_dq
constexpr int kDqUnitRows = 64, kDqUnitCols = 32;  // DqUnits (traits.cuh)
constexpr int kMergeThreads = 256;     // flash_merge's block: one warp per query row
constexpr int kMergeRowsPerBlock = kMergeThreads / 32;
constexpr int kDecodeWarps = 4;        // flash_decode's block: 4 warps
constexpr int kDecodeBlockN = 64;      // its keys per tile, and the unit of split_size
constexpr int kAppendThreads = 256;    // flash_decode_append's block
constexpr int kCombineThreads = 256;   // flash_decode_combine's block: one per query row
constexpr int kDecodeMaxSplits = 256;  // num_splits at most (flash_decode_combine's weights)

}  // namespace cf

// The checks CF_HOST_LAYOUT expands to. NVRTC has no offsetof, so the layout is pinned another
// way: every field has the type launch.py gives it (CF_FIELD: so its size and alignment), the
// fields come in launch.py's order (CF_PROBE builds a constexpr struct from launch.py's list of
// values, in its order, and CF_AT checks each named field got its own value), and the struct has
// launch.py's size and alignment (CF_SIZE). Order, types and the C layout rule fix every offset;
// tests/test_plan.py reads the header with ctypes and checks that NumPy follows that rule.
namespace cf {
template <class A, class B>
struct SameType {
  static constexpr bool value = false;
};
template <class A>
struct SameType<A, A> {
  static constexpr bool value = true;
};
// Distinct addresses for the pointer fields of the probes (never read or written; 576 bytes of
// each module's global memory, the price of a layout check without offsetof).
constexpr int kProbePointers = 32;
static __device__ u16 probe_u16[kProbePointers];
static __device__ float probe_f32[kProbePointers];
static __device__ int probe_i32[kProbePointers];
static __device__ u64 probe_u64[kProbePointers];
}  // namespace cf

#define CF_FIELD(type, field, cpp_type)                                             \
  static_assert(cf::SameType<decltype(cf::type::field), cpp_type>::value,         \
                #type "." #field " is not of the type cupyflash/launch.py gives it");
#define CF_PROBE(type, ...) constexpr cf::type probe_##type{__VA_ARGS__};
#define CF_AT(type, field, value) \
  static_assert(probe_##type.field == (value), #type "." #field " is not where cupyflash/launch.py puts it");
#define CF_SIZE(type, bytes, align)                                                           \
  static_assert(sizeof(cf::type) == (bytes) && alignof(cf::type) == (align),                 \
                "the size or alignment of " #type " differs from cupyflash/launch.py's");
#define CF_VALUE(name, value) static_assert(cf::name == (value), #name " differs from cupyflash/launch.py's");
namespace cf_host_layout {
CF_HOST_LAYOUT
}  // namespace cf_host_layout
