// What both forward kernels (flash_fwd.cu on mma.sync, flash_fwd_sm90.cu on wgmma) know about
// one thread block before they compute anything: its query rows, where its tiles live, which
// K/V tiles it must visit, and what it writes when its rows see no key at all.
#pragma once
#include "mask.cuh"
#include "params.cuh"
#include "sequence.cuh"
#include "tile_io.cuh"

namespace cf {

struct FwdBlock {
  int head, batch;
  int row_begin, rows;  // query rows [row_begin, row_begin + rows)
  int n_begin, n_end;   // K/V tiles [n_begin, n_end) hold a key some row sees (empty: n_end <= n_begin)
  const u16* q_tile;    // row row_begin of q, this head
  const u16* k_head;    // key 0 of k, the kv head of this head (MQA/GQA: head / group_size)
  const u16* v_head;
  u16* o_tile;
  float* lse_tile;
};

// Blocks run in reverse row order so that, under a causal mask, those with the most K tiles
// start first. Grid: (ceil(seqlen_q / kBlockM), heads_q, batch). With CF_VARLEN, rows <= 0 for a
// block past its sequence's end: the kernel returns before anything else.
template <int kBlockM, int kBlockN>
__device__ __forceinline__ FwdBlock locate_fwd_block(const Mask& mask, const Sequence& seq, const FwdParams& p) {
  FwdBlock b;
  const int m_block = gridDim.x - 1 - blockIdx.x;
  b.head = blockIdx.y;
  b.batch = blockIdx.z;
  b.row_begin = m_block * kBlockM;
  b.rows = min(kBlockM, mask.seqlen_q - b.row_begin);
  const int kv_head = b.head / p.group_size;
  const i64 q_row = seq.q_row0 + b.row_begin;  // in the packed arrays (fixed lengths: q_row0 = 0)
  b.q_tile = p.q.ptr + b.batch * p.q.batch_stride + b.head * p.q.head_stride + q_row * p.q.row_stride;
  b.k_head = p.k.ptr + b.batch * p.k.batch_stride + kv_head * p.k.head_stride + seq.k_row0 * p.k.row_stride;
  b.v_head = p.v.ptr + b.batch * p.v.batch_stride + kv_head * p.v.head_stride + seq.k_row0 * p.v.row_stride;
  b.o_tile = p.out.ptr + b.batch * p.out.batch_stride + b.head * p.out.head_stride + q_row * p.out.row_stride;
  b.lse_tile = p.lse + seq.stats(b.head, b.row_begin);
  mask.key_tiles<kBlockN>(b.row_begin, b.row_begin + b.rows, b.n_begin, b.n_end);
  return b;
}

// A block whose rows see no key writes out = 0 and lse = -inf and is done: returns true then.
template <int kBlockM, int kHeadDim, int kThreads>
__device__ __forceinline__ bool finish_empty_block(const FwdBlock& b, i64 o_row_stride, int head_dim, int tid) {
  if (b.n_end > b.n_begin) return false;
  store_zero_tile<kBlockM, kHeadDim, kThreads>(b.o_tile, o_row_stride, b.rows, head_dim, tid);
  for (int row = tid; row < b.rows; row += kThreads) b.lse_tile[row] = -infinity();
  return true;
}

}  // namespace cf
