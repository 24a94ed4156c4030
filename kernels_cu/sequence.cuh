// The sequence a thread block works on: its two lengths, where its rows start, and where its
// row statistics (lse, delta) live.
//
// Compile-time macro: CF_VARLEN (0 | 1).
// - Fixed lengths (0): every sequence has the call's seqlen_q and seqlen_k; batch b is reached
//   through the tensors' batch strides; lse and delta are (batch, heads_q, seqlen_q).
// - Packed variable lengths (1): q, out, dout, dq are (total_q, heads_q, dim) and k, v, dk, dv
//   (total_k, heads_kv, dim), with batch strides 0 (the host sets them so). Sequence b owns the
//   query rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) and the keys from cu_seqlens_k[b] on:
//   seqused_k[b] of them when the host passes seqused_k, else up to cu_seqlens_k[b + 1]. lse and
//   delta are (heads_q, total_q). The parameter block's seqlen_q and seqlen_k hold the longest
//   sequence's lengths (max_seqlen_*: they size the grid), and a block whose tile starts past
//   its own sequence's end returns at once.
#pragma once
#include "params.cuh"

#if !defined(CF_VARLEN)
#error "CF_VARLEN (0 | 1) must be defined (cupyflash/kernels/common.py sequence_defines)"
#endif

namespace cf {

constexpr bool kVarlen = CF_VARLEN;

struct Sequence {
  int seqlen_q, seqlen_k;  // this sequence's
  int q_row0, k_row0;      // its first query row and first key row in the packed arrays (0: fixed lengths)
  int batch, heads_q;
  int total_q;             // packed query rows (varlen)

  // Index of (head, row) in lse and delta; row counts from the sequence's first query.
  __device__ __forceinline__ i64 stats(int head, int row) const {
    if constexpr (kVarlen) {
      return static_cast<i64>(head) * total_q + q_row0 + row;
    } else {
      return (static_cast<i64>(batch) * heads_q + head) * seqlen_q + row;
    }
  }
};

// The sequence of grid index `batch`. Packed offsets are clamped into [0, total]: cu_seqlens or
// seqused_k that break the rules give wrong results, never an access outside the arrays (the
// host cannot check their values without a device sync; attention_varlen(check=True) does).
template <class Params>
__device__ __forceinline__ Sequence sequence_of(const Params& p, int batch) {
  if constexpr (!kVarlen) {
    return Sequence{p.seqlen_q, p.seqlen_k, 0, 0, batch, p.heads_q, 0};
  } else {
    const NextFeatures& f = p.next;
    const int q_begin = min(max(f.cu_seqlens_q[batch], 0), f.total_q);
    const int q_end = min(max(f.cu_seqlens_q[batch + 1], q_begin), f.total_q);
    const int k_begin = min(max(f.cu_seqlens_k[batch], 0), f.total_k);
    int k_end = min(max(f.cu_seqlens_k[batch + 1], k_begin), f.total_k);
    if (f.seqused_k != nullptr) k_end = min(k_end, k_begin + max(f.seqused_k[batch], 0));
    return Sequence{q_end - q_begin, k_end - k_begin, q_begin, k_begin, batch, p.heads_q, f.total_q};
  }
}

}  // namespace cf
