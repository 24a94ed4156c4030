// Every inline PTX instruction the kernels use, one named wrapper each.
//
// The kernels include no CUDA headers at all: 16-bit floats travel as raw bits (u16 / packed u32)
// and are converted here, so NVRTC from a pip wheel compiles them with no toolkit installed.
#pragma once

namespace cf {

using u16 = unsigned short;
using u32 = unsigned int;
using u64 = unsigned long long;
using i64 = long long;

// +infinity: negated, the mask value and the lse of a row that sees nothing. NVRTC without
// headers has no constexpr infinity, so it is built from its bit pattern.
__device__ __forceinline__ float infinity() { return __int_as_float(0x7f800000); }

// 16 bytes moved as one vector by loads and stores.
struct alignas(16) Vec16 {
  u32 x, y, z, w;
};

// cvta.to.shared: generic pointer -> 32-bit shared-window address (for ldmatrix / cp.async).
__device__ __forceinline__ u32 smem_addr(const void* ptr) {
  u32 addr;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(addr) : "l"(ptr));
  return addr;
}

// cp.async.cg.shared.global: copy 16 bytes global -> shared, bypassing L1; bytes past
// src_bytes (0 or 16) are zero-filled, which is how out-of-range rows are padded.
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

// The same copy for data read once from DRAM (the decode kernels' K/V stream): .L2::128B asks L2
// to fetch the chunk's whole 128-byte line, and the full-size form (src_bytes 16) carries no
// src-size operand. Measured on an H200 against cp_async_16 (flash_decode, bf16, d 128, one
// token, 32/8 heads): 4.02 -> 4.13 TB/s at batch 16 x 32k keys, 3.07 -> 3.45 at 1 x 128k; the
// form without src-size alone gave 3.39 there (benchmarks/results/h200-2026-12-04-decode-l2/).
__device__ __forceinline__ void cp_async_16_stream(u32 dst, const void* src, int src_bytes) {
  if (src_bytes == 16)
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
  else
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

// cp.async.ca.shared.global: copy 4 bytes global -> shared; zero-filled when src_bytes is 0.
__device__ __forceinline__ void cp_async_4(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

// cp.async.commit_group: close the group of copies issued so far.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// cp.async.wait_group N: wait until at most N most recent groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8x8 16-bit matrices, one register each.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: the same, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32: d += a * b, fp16 in, fp32 accumulate.
__device__ __forceinline__ void mma_16816_f16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: d += a * b, bf16 in, fp32 accumulate.
__device__ __forceinline__ void mma_16816_bf16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// cvt.rn.f16x2.f32: two floats -> packed fp16 pair (lo in bits 0..15), round to nearest even.
__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// cvt.rn.bf16x2.f32: two floats -> packed bf16 pair (lo in bits 0..15), round to nearest even.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// cvt.f32.f16 (twice): packed fp16 pair -> two floats.
__device__ __forceinline__ void unpack_f16x2(u32 v, float& lo, float& hi) {
  asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }\n"
      : "=f"(lo), "=f"(hi)
      : "r"(v));
}

// mov.b32 (twice): packed bf16 pair -> two floats (a bf16 is the top half of a float).
__device__ __forceinline__ void unpack_bf16x2(u32 v, float& lo, float& hi) {
  asm("mov.b32 %0, %1;\n" : "=f"(lo) : "r"(v << 16));
  asm("mov.b32 %0, %1;\n" : "=f"(hi) : "r"(v & 0xffff0000u));
}

// ex2.approx.ftz.f32: 2^x (2^-inf = +0), the exponential of the online softmax.
__device__ __forceinline__ float exp2_approx(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}

// lg2.approx.ftz.f32: log2(x), used once per row for lse.
__device__ __forceinline__ float log2_approx(float x) {
  float r;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}

// shfl.sync.bfly.b32: butterfly exchange within the warp (quad reductions of row statistics).
__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
  float r;
  asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;\n"
               : "=f"(r)
               : "f"(v), "r"(lane_mask));
  return r;
}

// bar.warp.sync: all lanes of the warp reach this point and see each other's shared stores.
__device__ __forceinline__ void sync_warp() { asm volatile("bar.warp.sync 0xffffffff;\n" ::: "memory"); }

// red.global.add.f32: fire-and-forget float add to global memory (dq accumulation).
__device__ __forceinline__ void red_add_f32(float* addr, float v) {
  asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(addr), "f"(v) : "memory");
}

// st.shared.v2.f32: two adjacent floats at an 8-byte aligned shared address.
__device__ __forceinline__ void st_shared_f32x2(u32 addr, float a, float b) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(a), "f"(b) : "memory");
}

// bar.sync id, threads: a barrier for `threads` threads (whole warps) on named barrier `id`
// (0 is __syncthreads'), here one warpgroup's.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// bar.arrive id, threads: count this warp in on named barrier `id` without waiting (the other
// side of a named_barrier_sync: a signal that lets waiting warps go on).
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

#if __CUDA_ARCH__ >= 900
// cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 (sm_90): global[i] += shared[i] for
// `bytes` bytes (a multiple of 16; both addresses 16-byte aligned), done by the copy engine in
// the background. The shared source must not change until a bulk_wait_read has seen it read.
__device__ __forceinline__ void bulk_reduce_add_f32(float* global_dst, u32 smem_src, u32 bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(global_dst),
               "r"(smem_src), "r"(bytes)
               : "memory");
}

// cp.async.bulk.commit_group: close the group of bulk operations this thread issued so far.
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }

// cp.async.bulk.wait_group.read N: at most N of this thread's bulk groups still read shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}

// cp.async.bulk.wait_group N: at most N of this thread's bulk groups are still in flight.
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

// barrier.cluster.arrive.release + wait.acquire: every block of the cluster has arrived, and the
// shared-memory writes each made before arriving are visible to the others' reads after it.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// %cluster_ctarank: this block's rank in its cluster.
__device__ __forceinline__ u32 cluster_rank() {
  u32 rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}

// mapa.shared::cluster: the address in block `rank`'s shared memory of what lies at smem_addr in ours.
__device__ __forceinline__ u32 cluster_map(u32 smem_addr, u32 rank) {
  u32 remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem_addr), "r"(rank));
  return remote;
}

// ld.shared::cluster: a float, or two, from another block's shared memory (an address of cluster_map).
__device__ __forceinline__ float cluster_load_f32(u32 addr) {
  float x;
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(x) : "r"(addr) : "memory");
  return x;
}
__device__ __forceinline__ float2 cluster_load_f32x2(u32 addr) {
  float2 x;
  asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];\n" : "=f"(x.x), "=f"(x.y) : "r"(addr) : "memory");
  return x;
}

// ---- Hopper's asynchronous copies: mbarriers and bulk tensor copies (TMA), plain sm_90. ----
// Used by flash_fwd_tma.cu and flash_decode.cu (CF_KV_TMA). An mbarrier is a 64-bit word in
// shared memory that completes a phase when its expected arrivals and its expected transaction
// bytes (what TMA copies deliver) have all come in; waiters poll the phase's parity (PTX ISA,
// "mbarrier").

// A bulk tensor copy's descriptor (CUtensorMap: 128 bytes, 64-byte aligned), encoded by the host
// (cupyflash/tma.py) and passed inside a __grid_constant__ parameter.
struct alignas(64) TensorMap {
  u64 words[16];
};

// mbarrier.init.shared::cta.b64: a barrier whose phases each need `count` arrivals.
__device__ __forceinline__ void mbarrier_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// fence.mbarrier_init.release.cluster: initialized barriers become visible to the async proxy
// (the TMA unit that completes them); a __syncthreads follows for the other threads.
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// mbarrier.arrive.shared::cta.b64: one arrival on this phase.
__device__ __forceinline__ void mbarrier_arrive(u32 bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}

// mbarrier.arrive.expect_tx.shared::cta.b64: one arrival, and `bytes` more bytes this phase waits
// for (the TMA copies issued next complete them).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(u32 bar, u32 bytes) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(bar),
               "r"(bytes)
               : "memory");
}

// mbarrier.try_wait.parity.shared::cta.b64 in a loop: returns once the phase of parity `phase`
// has completed (acquire: what the phase's arrivals and copies wrote is visible after).
__device__ __forceinline__ void mbarrier_wait(u32 bar, u32 phase) {
  // (labels are local to the braces, so every inlined copy has its own)
  asm volatile(
      "{\n.reg .pred done;\nwait:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait;\n}\n" ::"r"(bar),
      "r"(phase)
      : "memory");
}

// cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes: the box of `map`
// at coordinates (c0 innermost .. c3) into shared memory at dst (1024-byte aligned for the
// 128-byte swizzle), completing `bytes` of bar's transaction count. Out-of-range elements read 0.
__device__ __forceinline__ void tma_load_4d(u32 dst, const TensorMap* map, u32 bar, int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<u64>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// cp.async.bulk.tensor.4d.global.shared::cta.bulk_group: the box at src into `map` at the
// coordinates; elements out of the tensor's range are not written. Close with bulk_commit and
// keep src until bulk_wait_read.
__device__ __forceinline__ void tma_store_4d(const TensorMap* map, u32 src, int c0, int c1, int c2, int c3) {
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
                   reinterpret_cast<u64>(map)),
               "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}

// prefetch.tensormap: bring a descriptor into the cache before its first copy.
__device__ __forceinline__ void prefetch_tensormap(const TensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<u64>(map)) : "memory");
}
#endif  // __CUDA_ARCH__ >= 900

// ---- Hopper only (sm_90a): warpgroup MMA. Used by flash_fwd_sm90.cu, compiled for sm_90a. ----
// A warpgroup (4 consecutive warps) computes a 64 x N tile; each warp holds rows 16w..16w+15 in
// the m16n8 accumulator layout, N / 8 tiles of 4 floats. Shared operands are described by a
// 64-bit matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address >> 4 in bits
// 0-13, leading-dimension byte offset >> 4 in bits 16-29, stride-dimension byte offset >> 4 in
// bits 32-45, swizzle mode in bits 62-63 (1 = 128-byte swizzle).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ u64 wgmma_desc_sw128(u32 smem_address, u32 leading_bytes, u32 stride_bytes) {
  return static_cast<u64>((smem_address & 0x3FFFF) >> 4) | (static_cast<u64>(leading_bytes >> 4) << 16) |
         (static_cast<u64>(stride_bytes >> 4) << 32) | (1ull << 62);
}

// wgmma.fence.sync.aligned: order earlier register writes (accumulators, A fragments) before
// the warpgroup MMAs that read them.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

// wgmma.commit_group.sync.aligned: close the group of MMAs issued so far.
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// wgmma.wait_group.sync.aligned N: wait until at most N groups are in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// fence.proxy.async.shared::cta: make this thread's (cp.async) shared-memory writes visible to
// the async proxy that wgmma reads shared operands through.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// An empty asm that "reads and writes" a register: the compiler must keep the value in it, and
// not move its uses, across the wgmma_wait before it. For accumulators (float), which wgmma
// writes asynchronously, and for the 16-bit A fragments (u32) a register-sourced wgmma reads
// asynchronously: until its wait, their registers must still hold them.
__device__ __forceinline__ void hold_register(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void hold_register(u32& x) { asm volatile("" : "+r"(x)::"memory"); }

template <class Register, int kTiles>
__device__ __forceinline__ void wgmma_fence_operands(Register (&d)[kTiles][4]) {
#pragma unroll
  for (int i = 0; i < kTiles; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) hold_register(d[i][c]);
}

// setmaxnreg.{inc,dec}.sync.aligned.u32: this warpgroup's registers per thread become N (a
// multiple of 8 in 24..256); every warp of the warpgroup executes it. The copy warpgroup gives
// registers back so that the computing ones can take them.
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

#define CF_ACC2(d, i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3]), \
                      "+f"(d[i + 1][0]), "+f"(d[i + 1][1]), "+f"(d[i + 1][2]), "+f"(d[i + 1][3])
#define CF_ACC8(d, i) CF_ACC2(d, i), CF_ACC2(d, i + 2), CF_ACC2(d, i + 4), CF_ACC2(d, i + 6)
// The accumulator operands %0 ... %(N/2 - 1) of an m64nN wgmma, each list the one before it and
// 32 more.
#define CF_LIST32 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define CF_LIST64 CF_LIST32 ", " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define CF_LIST96 CF_LIST64 ", " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define CF_LIST128 CF_LIST96 ", " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define CF_REGS32 "{" CF_LIST32 "}"
#define CF_REGS64 "{" CF_LIST64 "}"
#define CF_REGS96 "{" CF_LIST96 "}"
#define CF_REGS128 "{" CF_LIST128 "}"
// d = a * b (+ d when accumulate): m64nNk16, A and B in shared memory; TRANS "0, 0" for both
// K-major, "1, 1" for both MN-major.
#define CF_WGMMA_SS(N, TYPE, TRANS, REGS, A, B, P, ...)                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #P ", 0;\n"                                     \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " " REGS ", %" #A ", %" #B \
               ", p, 1, 1, " TRANS ";\n}\n"                                                           \
               : __VA_ARGS__                                                                          \
               : "l"(a_desc), "l"(b_desc), "r"(accumulate))
// d += a * b: m64nNk16, A from registers (operands A0..A3), B in shared memory stored MN-major
// (operand B; scale-d 1, imm-scale-a 1, imm-scale-b 1, imm-trans-b 1).
#define CF_WGMMA_RS_TB(N, TYPE, REGS, A0, A1, A2, A3, B, ...)                           \
  asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " " REGS \
               ", {%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #B ", 1, 1, 1, 1;\n"     \
               : __VA_ARGS__                                                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc))

// wgmma.mma_async.sync.aligned.m64n{64,128}k16.f32.{f16,bf16}: d = A B (+ d), both operands
// shared and K-major (A[m][k], B^T[n][k]).
template <int N, bool kBf16>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], u64 a_desc, u64 b_desc, int accumulate) {
  static_assert(N == 64 || N == 128, "instantiated wgmma widths: 64, 128");
  if constexpr (N == 64 && !kBf16) CF_WGMMA_SS(64, "f16", "0, 0", CF_REGS32, 32, 33, 34, CF_ACC8(d, 0));
  if constexpr (N == 64 && kBf16) CF_WGMMA_SS(64, "bf16", "0, 0", CF_REGS32, 32, 33, 34, CF_ACC8(d, 0));
  if constexpr (N == 128 && !kBf16)
    CF_WGMMA_SS(128, "f16", "0, 0", CF_REGS64, 64, 65, 66, CF_ACC8(d, 0), CF_ACC8(d, 8));
  if constexpr (N == 128 && kBf16)
    CF_WGMMA_SS(128, "bf16", "0, 0", CF_REGS64, 64, 65, 66, CF_ACC8(d, 0), CF_ACC8(d, 8));
}

// The same, m64n64k16, with B stored MN-major (B[k][n], n contiguous) and A K-major or, with
// kTransA, MN-major too (A[k][m], m contiguous): the backward's dQ = dS K with dS kept as dS^T,
// and its head_dim 256 dK and dV with P^T and dS^T in shared memory.
template <bool kBf16, bool kTransA>
__device__ __forceinline__ void wgmma_ss_tb(float (&d)[8][4], u64 a_desc, u64 b_desc, int accumulate) {
  if constexpr (!kBf16 && kTransA) CF_WGMMA_SS(64, "f16", "1, 1", CF_REGS32, 32, 33, 34, CF_ACC8(d, 0));
  if constexpr (kBf16 && kTransA) CF_WGMMA_SS(64, "bf16", "1, 1", CF_REGS32, 32, 33, 34, CF_ACC8(d, 0));
  if constexpr (!kBf16 && !kTransA) CF_WGMMA_SS(64, "f16", "0, 1", CF_REGS32, 32, 33, 34, CF_ACC8(d, 0));
  if constexpr (kBf16 && !kTransA) CF_WGMMA_SS(64, "bf16", "0, 1", CF_REGS32, 32, 33, 34, CF_ACC8(d, 0));
}

// wgmma.mma_async.sync.aligned.m64n{64,128,192,256}k16.f32.{f16,bf16} with A in registers:
// d += A B, where B is shared and stored MN-major (B[k][n], n contiguous).
template <int N, bool kBf16>
__device__ __forceinline__ void wgmma_rs_tb(float (&d)[N / 8][4], const u32 (&a)[4], u64 b_desc) {
  static_assert(N == 64 || N == 128 || N == 192 || N == 256, "instantiated wgmma widths: 64, 128, 192, 256");
  if constexpr (N == 64 && !kBf16) CF_WGMMA_RS_TB(64, "f16", CF_REGS32, 32, 33, 34, 35, 36, CF_ACC8(d, 0));
  if constexpr (N == 64 && kBf16) CF_WGMMA_RS_TB(64, "bf16", CF_REGS32, 32, 33, 34, 35, 36, CF_ACC8(d, 0));
  if constexpr (N == 128 && !kBf16)
    CF_WGMMA_RS_TB(128, "f16", CF_REGS64, 64, 65, 66, 67, 68, CF_ACC8(d, 0), CF_ACC8(d, 8));
  if constexpr (N == 128 && kBf16)
    CF_WGMMA_RS_TB(128, "bf16", CF_REGS64, 64, 65, 66, 67, 68, CF_ACC8(d, 0), CF_ACC8(d, 8));
  if constexpr (N == 192 && !kBf16)
    CF_WGMMA_RS_TB(192, "f16", CF_REGS96, 96, 97, 98, 99, 100, CF_ACC8(d, 0), CF_ACC8(d, 8), CF_ACC8(d, 16));
  if constexpr (N == 192 && kBf16)
    CF_WGMMA_RS_TB(192, "bf16", CF_REGS96, 96, 97, 98, 99, 100, CF_ACC8(d, 0), CF_ACC8(d, 8), CF_ACC8(d, 16));
  if constexpr (N == 256 && !kBf16)
    CF_WGMMA_RS_TB(256, "f16", CF_REGS128, 128, 129, 130, 131, 132, CF_ACC8(d, 0), CF_ACC8(d, 8), CF_ACC8(d, 16),
                   CF_ACC8(d, 24));
  if constexpr (N == 256 && kBf16)
    CF_WGMMA_RS_TB(256, "bf16", CF_REGS128, 128, 129, 130, 131, 132, CF_ACC8(d, 0), CF_ACC8(d, 8), CF_ACC8(d, 16),
                   CF_ACC8(d, 24));
}

#undef CF_ACC2
#undef CF_ACC8
#undef CF_REGS32
#undef CF_REGS64
#undef CF_REGS96
#undef CF_REGS128
#undef CF_LIST32
#undef CF_LIST64
#undef CF_LIST96
#undef CF_LIST128
#undef CF_WGMMA_SS
#undef CF_WGMMA_RS_TB

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace cf
