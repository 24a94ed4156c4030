// The small kernels around the backward pass:
//   flash_bwd_zero_unused_keys: (packed variable lengths only) zeroes the dK, dV rows of keys no
//                               sequence uses, before dK/dV writes every row a sequence does use.
//   flash_bwd_delta:            delta = rowsum(dO * O) and lse_log2 (params.cuh) per query
//                               row, before dK/dV.
//   flash_bwd_convert_dq:       dq = softmax_scale * dq_accum (float32) rounded to the 16-bit type,
//                               after the dK/dV kernel has accumulated dQ with atomics.
//   flash_bwd_convert_dq_tiled: the same from the Hopper dK/dV kernel's unit layout of dq_accum.
//
// Compile-time macros: CF_ELEMENT (Half | BFloat16), CF_VARLEN (sequence.cuh).
// Every kernel takes the pass's BwdParams (params.cuh); the block sizes the host launches them
// with (kZeroThreads, kZeroBlocksPerGap, kDeltaThreads, kDeltaRows, kConvertThreads,
// kConvertChunk) are defined there too.
#include "params.cuh"
#include "sequence.cuh"
#include "traits.cuh"

namespace cf {
using Element = CF_ELEMENT;
}  // namespace cf

// Packed keys no sequence uses: those past seqused_k[b] (or past max_seqlen_k) in sequence b's
// slot, and those past cu_seqlens_k[batch]. The dK/dV kernel writes no row of theirs, and they
// must read 0; zeroing only these, instead of allocating dk and dv zeroed, saves two full
// memsets (6% of a causal backward over sequences of 1024).
// Gap g < batch is the tail of sequence g's slot; gap batch is the tail after the last slot.
// Grid: (kZeroBlocksPerGap, batch + 1); block: kZeroThreads. Each thread writes 16-byte chunks.
extern "C" __global__ void __launch_bounds__(cf::kZeroThreads)
    flash_bwd_zero_unused_keys(const __grid_constant__ cf::BwdParams p) {
  using namespace cf;
  if constexpr (kVarlen) {
    const int gap = blockIdx.y, total_k = p.next.total_k;
    int lo, hi;  // key rows [lo, hi) to zero, clamped into [0, total_k] like sequence_of's
    if (gap < p.batch) {
      const Sequence seq = sequence_of(p, gap);
      lo = seq.k_row0 + min(seq.seqlen_k, p.seqlen_k);
      hi = min(max(p.next.cu_seqlens_k[gap + 1], lo), total_k);
    } else {
      lo = min(max(p.next.cu_seqlens_k[p.batch], 0), total_k);
      hi = total_k;
    }
    if (lo >= hi) return;
    const int heads_kv = p.heads_q / p.group_size;
    const int chunks = p.head_dim / kChunk;  // stored head dims are multiples of kChunk
    const i64 per_row = static_cast<i64>(heads_kv) * chunks;
    const i64 n = (hi - lo) * per_row;
    const i64 dk_row_stride = p.dk.row_stride, dk_head_stride = p.dk.head_stride;
    const i64 dv_row_stride = p.dv.row_stride, dv_head_stride = p.dv.head_stride;
    u16* __restrict__ dk = p.dk.ptr;
    u16* __restrict__ dv = p.dv.ptr;
    for (i64 i = static_cast<i64>(blockIdx.x) * kZeroThreads + threadIdx.x; i < n;
         i += static_cast<i64>(kZeroBlocksPerGap) * kZeroThreads) {
      const i64 row = lo + i / per_row;
      const int head = static_cast<int>((i % per_row) / chunks), col = static_cast<int>(i % chunks) * kChunk;
      *reinterpret_cast<Vec16*>(dk + row * dk_row_stride + head * dk_head_stride + col) = Vec16{0, 0, 0, 0};
      *reinterpret_cast<Vec16*>(dv + row * dv_row_stride + head * dv_head_stride + col) = Vec16{0, 0, 0, 0};
    }
  }
}

// Reads out, dout, lse; writes delta, lse_log2.
// Grid: (ceil(seqlen_q / kDeltaRows), heads_q, batch); block: kDeltaThreads.
extern "C" __global__ void __launch_bounds__(cf::kDeltaThreads)
    flash_bwd_delta(const __grid_constant__ cf::BwdParams p) {
  using namespace cf;
  // The fields the body reads, as values: a lambda capturing p by reference would read them
  // through p's address (ld.param [reg]) in every iteration instead of once.
  const Sequence seq = sequence_of(p, blockIdx.z);  // this batch entry's lengths (CF_VARLEN: its own)
  const int seqlen_q = seq.seqlen_q;
  const i64 o_batch_stride = p.out.batch_stride;
  const i64 o_row_stride = p.out.row_stride;
  const i64 o_head_stride = p.out.head_stride;
  const i64 do_batch_stride = p.dout.batch_stride;
  const i64 do_row_stride = p.dout.row_stride;
  const i64 do_head_stride = p.dout.head_stride;
  const int head_dim = p.head_dim;
  const int heads_q = p.heads_q;
  const u16* __restrict__ out = p.out.ptr + seq.q_row0 * p.out.row_stride;
  const u16* __restrict__ dout = p.dout.ptr + seq.q_row0 * p.dout.row_stride;
  float* __restrict__ delta = p.delta;
  const float* __restrict__ lse = p.lse;
  float* __restrict__ lse_log2 = p.lse_log2;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int row = blockIdx.x * kDeltaRows + threadIdx.x / kDeltaLanesPerRow;
  const int sub = threadIdx.x % kDeltaLanesPerRow;
  float sum = 0.f;
  if (row < seqlen_q) {
    const u16* o_row = out + batch * o_batch_stride + row * o_row_stride + head * o_head_stride;
    const u16* do_row = dout + batch * do_batch_stride + row * do_row_stride + head * do_head_stride;
    for (int col = sub * kChunk; col < head_dim; col += kDeltaLanesPerRow * kChunk) {
      const Vec16 o = *reinterpret_cast<const Vec16*>(o_row + col);
      const Vec16 d = *reinterpret_cast<const Vec16*>(do_row + col);
      const u32 o_words[4] = {o.x, o.y, o.z, o.w}, d_words[4] = {d.x, d.y, d.z, d.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        float o_lo, o_hi, d_lo, d_hi;
        Element::unpack(o_words[w], o_lo, o_hi);
        Element::unpack(d_words[w], d_lo, d_hi);
        sum = fmaf(o_lo, d_lo, fmaf(o_hi, d_hi, sum));
      }
    }
  }
  // The kDeltaLanesPerRow lanes of a row are adjacent within one warp.
#pragma unroll
  for (int mask = 1; mask < kDeltaLanesPerRow; mask <<= 1) sum += shfl_xor(sum, mask);
  if (row < seqlen_q && sub == 0) {
    const i64 at = seq.stats(head, row);
    delta[at] = sum;
    // The forward's -inf for a row that sees no key becomes +inf here: every score of the row is
    // then weighed exp2(s * scale_log2 - inf) = 0, masked (-inf) or not, and never NaN.
    const float row_lse = lse[at];
    lse_log2[at] = row_lse == -infinity() ? infinity() : row_lse * kLog2e;
  }
}

// dq_accum: float32 like q, dq: 16-bit like q, both contiguous (the plan allocates them so):
// n_elements = batch * seqlen_q * heads_q * head_dim, a multiple of kConvertChunk.
// Grid: ceil(n_elements / kConvertChunk / kConvertThreads); block: kConvertThreads.
extern "C" __global__ void __launch_bounds__(cf::kConvertThreads)
    flash_bwd_convert_dq(const __grid_constant__ cf::BwdParams p) {
  using namespace cf;
  // The fields the body reads, as values: a lambda capturing p by reference would read them
  // through p's address (ld.param [reg]) in every iteration instead of once.
  const int batch = p.batch;
  const int seqlen_q = p.seqlen_q;
  const int heads_q = p.heads_q;
  const int head_dim = p.head_dim;
  const float softmax_scale = p.softmax_scale;
  const float* __restrict__ dq_accum = p.dq_accum;
  u16* __restrict__ dq = p.dq.ptr;
  // Packed variable lengths: all total_q rows (rows of no sequence hold zeros, and stay so).
  const i64 n_elements = static_cast<i64>(kVarlen ? p.next.total_q : batch * seqlen_q) * heads_q * head_dim;
  const i64 chunk = static_cast<i64>(blockIdx.x) * kConvertThreads + threadIdx.x;
  if (chunk * kConvertChunk >= n_elements) return;
  const Vec16* src = reinterpret_cast<const Vec16*>(dq_accum + chunk * kConvertChunk);
  u32 words[4];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const Vec16 v = src[half];
    words[2 * half] = Element::pack(__uint_as_float(v.x) * softmax_scale, __uint_as_float(v.y) * softmax_scale);
    words[2 * half + 1] = Element::pack(__uint_as_float(v.z) * softmax_scale, __uint_as_float(v.w) * softmax_scale);
  }
  *reinterpret_cast<Vec16*>(dq + chunk * kConvertChunk) = Vec16{words[0], words[1], words[2], words[3]};
}

// dq_accum: float32 in the DqUnits layout (traits.cuh) of the dK/dV kernel's head dim,
//   dq_accum_head_dim. dq: (batch, seqlen_q, heads_q, head_dim) 16-bit, strides in elements,
//   head_dim a multiple of 8 (columns past it in dq_accum are dropped).
// Grid: (seqlen_q, ceil(heads_q * head_dim / 4 / kConvertThreads), batch); block: kConvertThreads.
// Each thread converts 4 columns of one row: consecutive threads write consecutive dq columns.
extern "C" __global__ void __launch_bounds__(cf::kConvertThreads)
    flash_bwd_convert_dq_tiled(const __grid_constant__ cf::BwdParams p) {
  using namespace cf;
  // The fields the body reads, as values: a lambda capturing p by reference would read them
  // through p's address (ld.param [reg]) in every iteration instead of once.
  const Sequence seq = sequence_of(p, blockIdx.z);  // this batch entry's lengths (CF_VARLEN: its own)
  const int head_dim = p.head_dim;
  const int heads_q = p.heads_q;
  const int seqlen_q = seq.seqlen_q;
  const int dq_accum_head_dim = p.dq_accum_head_dim;
  const float softmax_scale = p.softmax_scale;
  const i64 dq_batch_stride = p.dq.batch_stride;
  const i64 dq_row_stride = p.dq.row_stride;
  const i64 dq_head_stride = p.dq.head_stride;
  const float* __restrict__ dq_accum = p.dq_accum;
  u16* __restrict__ dq = p.dq.ptr + seq.q_row0 * p.dq.row_stride;
  constexpr int kChunksPerUnitRow = DqUnits::kCols / 4;
  const int chunks = head_dim / 4;  // of 4 columns, per (row, head)
  const int row = blockIdx.x, batch = blockIdx.z;
  const int index = blockIdx.y * kConvertThreads + threadIdx.x;  // within the row: (head, chunk)
  if (index >= heads_q * chunks) return;
  if constexpr (kVarlen)
    if (row >= seqlen_q) return;  // past this sequence's last query
  const int head = index / chunks, chunk = index % chunks;
  const float* unit;
  if constexpr (kVarlen) {
    unit = DqUnits::packed_unit(dq_accum, head, DqUnits::packed_unit_rows(seq.total_q, p.batch),
                                DqUnits::first_packed_unit(seq.q_row0, batch), dq_accum_head_dim, row, 4 * chunk);
  } else {
    unit = DqUnits::unit(dq_accum, batch, head, heads_q, seqlen_q, dq_accum_head_dim, row, 4 * chunk);
  }
  const Vec16 v =
      *reinterpret_cast<const Vec16*>(unit + DqUnits::chunk_offset(row % DqUnits::kRows, chunk % kChunksPerUnitRow));
  const u32 lo = Element::pack(__uint_as_float(v.x) * softmax_scale, __uint_as_float(v.y) * softmax_scale);
  const u32 hi = Element::pack(__uint_as_float(v.z) * softmax_scale, __uint_as_float(v.w) * softmax_scale);
  u32* dst = reinterpret_cast<u32*>(dq + batch * dq_batch_stride + row * dq_row_stride + head * dq_head_stride +
                                    4 * chunk);
  dst[0] = lo;
  dst[1] = hi;
}
