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

// +infinity: the mask value (negated) and the lse of a row that sees nothing. NVRTC without
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

}  // namespace cf
