// Which keys a query may see: causal (bottom-right aligned), sliding window and sequence tails,
// in one place. cupyflash/reference_tiled.py computes the same tile ranges in NumPy.
//
// With off = seqlen_k - seqlen_q, query i sees key j iff
//     0 <= j < seqlen_k,   j <= i + off + right (when right >= 0),   j >= i + off - left (when left >= 0).
// Causal is right = 0 (the host folds it in). -1 means unbounded.
//
// Compile-time macros: CF_WINDOW_LEFT, CF_WINDOW_RIGHT (0 | 1), whether the call's window bounds
// that side (Problem.variant). A variant compiled without a side holds it at -1 whatever the
// parameter block says, so every test of that side folds away: the causal and unmasked calls,
// nearly all of them, carry no window arithmetic and no predicates for it through their loops.
// (Tested at run time, the sides cost the Hopper dK/dV kernel 6-11% at head_dim 128 once they
// came from the parameter struct, where LLVM no longer specialised the mask code on them.)
#pragma once
#include "ptx.cuh"

#if !defined(CF_WINDOW_LEFT) || !defined(CF_WINDOW_RIGHT)
#error "CF_WINDOW_LEFT and CF_WINDOW_RIGHT (0 | 1) must be defined (cupyflash/kernels/common.py window_defines)"
#endif

namespace cf {

struct Mask {
  int seqlen_q, seqlen_k;
  int left, right;  // window; -1 = unbounded

  __device__ __forceinline__ Mask(int seqlen_q_, int seqlen_k_, int window_left, int window_right)
      : seqlen_q(seqlen_q_), seqlen_k(seqlen_k_), left(CF_WINDOW_LEFT ? window_left : -1),
        right(CF_WINDOW_RIGHT ? window_right : -1) {}

  __device__ __forceinline__ int offset() const { return seqlen_k - seqlen_q; }

  // Keys [key_begin(i), key_end(i)) are visible to query i (the range may be empty).
  __device__ __forceinline__ int key_begin(int i) const {
    return left >= 0 ? max(0, i + offset() - left) : 0;
  }
  __device__ __forceinline__ int key_end(int i) const {
    return right >= 0 ? min(seqlen_k, i + offset() + right + 1) : seqlen_k;
  }
  // Queries [query_begin(j), query_end(j)) see key j: the same inequalities solved for i.
  __device__ __forceinline__ int query_begin(int j) const {
    return right >= 0 ? max(0, j - offset() - right) : 0;
  }
  __device__ __forceinline__ int query_end(int j) const {
    return left >= 0 ? min(seqlen_q, j - offset() + left + 1) : seqlen_q;
  }

  // K tiles of kBlockN keys that hold a key visible to some row of [row_begin, row_end):
  // tiles [n_begin, n_end). Empty (n_end <= n_begin) when the rows see nothing.
  template <int kBlockN>
  __device__ __forceinline__ void key_tiles(int row_begin, int row_end, int& n_begin, int& n_end) const {
    n_begin = key_begin(row_begin) / kBlockN;
    int keys_end = key_end(row_end - 1);
    n_end = keys_end > 0 ? (keys_end + kBlockN - 1) / kBlockN : 0;
  }
  // Q tiles of kBlockM rows holding a query that sees some key of [key_begin, key_end).
  template <int kBlockM>
  __device__ __forceinline__ void query_tiles(int keys_begin, int keys_end, int& m_begin, int& m_end) const {
    m_begin = query_begin(keys_begin) / kBlockM;
    int rows_end = query_end(keys_end - 1);
    m_end = rows_end > 0 ? (rows_end + kBlockM - 1) / kBlockM : 0;
  }

  // True when every key of [keys_begin, keys_end) is visible to every row of [rows_begin,
  // rows_end), so the tile needs no per-element predicate. The ranges are within bounds.
  __device__ __forceinline__ bool tile_is_full(int rows_begin, int rows_end, int keys_begin, int keys_end) const {
    if (keys_end > seqlen_k) return false;
    if (right >= 0 && keys_end - 1 > rows_begin + offset() + right) return false;
    if (left >= 0 && keys_begin < rows_end - 1 + offset() - left) return false;
    return true;
  }
};

// Sets masked scores of a warp's S = Q K^T fragments to -inf. Rows (queries) start at row0, the
// tile's keys at key0; lane = 4 g + t holds rows g, g + 8 and columns 2t, 2t + 1 of each n8 tile.
template <int kMTiles, int kNTiles>
__device__ __forceinline__ void mask_scores(float (&s)[kMTiles][kNTiles][4], const Mask& mask, int row0, int key0,
                                            int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = row0 + 16 * mt + g + 8 * h;
      const int begin = mask.key_begin(i), end = mask.key_end(i);
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int j = key0 + 8 * nt + 2 * t + c;
          if (j < begin || j >= end) s[mt][nt][2 * h + c] = -infinity();
        }
    }
}

// The same for S^T = K Q^T fragments (rows are keys from key0, columns queries from row0).
template <int kMTiles, int kNTiles>
__device__ __forceinline__ void mask_scores_transposed(float (&st)[kMTiles][kNTiles][4], const Mask& mask, int key0,
                                                       int row0, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = key0 + 16 * mt + g + 8 * h;
      const bool key_exists = j < mask.seqlen_k;
      const int begin = mask.query_begin(j), end = key_exists ? mask.query_end(j) : 0;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int i = row0 + 8 * nt + 2 * t + c;
          if (i < begin || i >= end) st[mt][nt][2 * h + c] = -infinity();
        }
    }
}

}  // namespace cf
