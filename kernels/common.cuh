// Shared helpers of the fused kernels: dtype conversions and block reductions.
// Every kernel computes in f32 and rounds once per value the composite reference rounds,
// so bf16 results match `ops::*` (the CPU reference) to the last bit in most elements.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// Rounds through T and back: models a composite op that stores an intermediate in T.
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_f(from_f<T>(x)); }

// 16-byte vector of T, indexable.
template <typename T>
union Vec16 {
    uint4 raw;
    T v[16 / sizeof(T)];
};

// W consecutive elements of T at p as floats, and back: one 16-byte access when W fills a
// vector (p then 16-byte aligned), else element by element.
template <typename T, int W>
__device__ __forceinline__ void load_w(const T *p, float (&out)[W]) {
    if constexpr (W * sizeof(T) == 16) {
        Vec16<T> v;
        v.raw = *reinterpret_cast<const uint4 *>(p);
#pragma unroll
        for (int k = 0; k < W; ++k) out[k] = to_f(v.v[k]);
    } else if constexpr (W * sizeof(T) == 8) {
        // Half of a 16-byte vector (4 half-precision values beside 4 floats); the caller
        // checks that p is 8-byte aligned.
        union {
            uint2 raw;
            T v[W];
        } v;
        v.raw = *reinterpret_cast<const uint2 *>(p);
#pragma unroll
        for (int k = 0; k < W; ++k) out[k] = to_f(v.v[k]);
    } else {
#pragma unroll
        for (int k = 0; k < W; ++k) out[k] = to_f(p[k]);
    }
}

template <typename T, int W>
__device__ __forceinline__ void store_w(T *p, const float (&in)[W]) {
    if constexpr (W * sizeof(T) == 16) {
        Vec16<T> v;
#pragma unroll
        for (int k = 0; k < W; ++k) v.v[k] = from_f<T>(in[k]);
        *reinterpret_cast<uint4 *>(p) = v.raw;
    } else if constexpr (W * sizeof(T) == 8) {
        union {
            uint2 raw;
            T v[W];
        } v;
#pragma unroll
        for (int k = 0; k < W; ++k) v.v[k] = from_f<T>(in[k]);
        *reinterpret_cast<uint2 *>(p) = v.raw;
    } else {
#pragma unroll
        for (int k = 0; k < W; ++k) p[k] = from_f<T>(in[k]);
    }
}

__device__ __forceinline__ bool aligned16(const void *p) {
    return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Non-negative floats order as their bit patterns: atomicMax on the bits is a float max.
__device__ __forceinline__ void atomic_max_nonneg(float *addr, float v) {
    atomicMax(reinterpret_cast<unsigned int *>(addr), __float_as_uint(v));
}

// amax[0] = max(amax[0], the largest m of the block's threads), m ≥ 0: FP8 current scaling's
// amax (fp8.cu), also from kernels that produce a tensor to be quantized. Every thread of the
// block calls it (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ void block_amax_into(float m, float *amax) {
    __shared__ float sh[32];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    m = warp_max(m);
    if (lane == 0) sh[wid] = m;
    __syncthreads();
    if (wid == 0) {
        m = warp_max(lane < (int)(blockDim.x >> 5) ? sh[lane] : 0.f);
        if (lane == 0) atomic_max_nonneg(amax, m);
    }
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// The leading barrier lets a kernel call it repeatedly with the same shared scratch.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float sh[32];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    if (wid == 0) {
        const int nw = blockDim.x >> 5;
        float w = lane < nw ? sh[lane] : 0.f;
        w = warp_sum(w);
        if (lane == 0) sh[0] = w;
    }
    __syncthreads();
    return sh[0];
}

// Online-softmax pair (running max m, Σ exp(x − m)) merged across the block.
__device__ __forceinline__ void merge_max_sum(float &m, float &s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    if (mm == -INFINITY) { s = 0.f; m = mm; return; }
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

__device__ __forceinline__ void block_max_sum(float &m, float &s) {
    __shared__ float shm[32], shs[32];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        merge_max_sum(m, s, m2, s2);
    }
    __syncthreads();
    if (lane == 0) { shm[wid] = m; shs[wid] = s; }
    __syncthreads();
    if (wid == 0) {
        const int nw = blockDim.x >> 5;
        float a = lane < nw ? shm[lane] : -INFINITY, b = lane < nw ? shs[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) {
            const float a2 = __shfl_xor_sync(0xffffffffu, a, o);
            const float b2 = __shfl_xor_sync(0xffffffffu, b, o);
            merge_max_sum(a, b, a2, b2);
        }
        if (lane == 0) { shm[0] = a; shs[0] = b; }
    }
    __syncthreads();
    m = shm[0];
    s = shs[0];
}

// extern "C" entry points for the three float dtypes from one template.
#define INSTANTIATE3(MACRO) MACRO(f32, float) MACRO(bf16, __nv_bfloat16) MACRO(f16, __half)
