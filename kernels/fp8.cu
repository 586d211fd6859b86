// FP8 quantization with Transformer Engine's tensorwise current scaling (`ops::fp8` is the
// reference): the largest magnitude of a tensor (`fp8_amax`), then one pass that derives the
// scale from it and writes the FP8 values row-major and/or transposed (`fp8_cast_*`), so the
// GEMMs get the K-major operands Hopper's FP8 tensor cores need.
#include "common.cuh"
#include <cuda_fp8.h>

// amax[0] = max(amax[0], max |x|) over n elements; amax starts at 0. fmaxf skips NaN, as the
// CPU reference's f32::max does: a NaN element stays NaN in the cast and reaches the loss.
// 16-byte loads when x is aligned, four of them in flight per thread (one at a time left a
// third of the bandwidth unused).
template <typename T>
__device__ void amax_impl(const T *x, unsigned long long n, float *amax) {
    constexpr int W = 16 / sizeof(T), U = 4;
    float m = 0.f;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t done = 0;
    if (aligned16(x)) {
        const size_t vectors = n / W;
        size_t i = first;
        for (; i + (U - 1) * stride < vectors; i += U * stride) {
            float v[U][W];
#pragma unroll
            for (int u = 0; u < U; ++u) load_w<T, W>(x + (i + u * stride) * W, v[u]);
#pragma unroll
            for (int u = 0; u < U; ++u)
#pragma unroll
                for (int k = 0; k < W; ++k) m = fmaxf(m, fabsf(v[u][k]));
        }
        for (; i < vectors; i += stride) {
            float v[W];
            load_w<T, W>(x + i * W, v);
#pragma unroll
            for (int k = 0; k < W; ++k) m = fmaxf(m, fabsf(v[k]));
        }
        done = vectors * W;
    }
    for (size_t i = done + first; i < n; i += stride) m = fmaxf(m, fabsf(to_f(x[i])));
    block_amax_into(m, amax);
}

#define AMAX(NAME, T)                                                                           \
    extern "C" __global__ void fp8_amax_##NAME(const T *x, unsigned long long n, float *amax) { \
        amax_impl<T>(x, n, amax);                                                               \
    }
INSTANTIATE3(AMAX)

// `ops::fp8::scale_for`: fp8_max / amax; 1 for a zero or non-finite amax; FLT_MAX on overflow.
__device__ __forceinline__ float scale_for(float amax, float fp8_max) {
    if (amax == 0.f || !isfinite(amax)) return 1.f;
    const float s = __fdiv_rn(fp8_max, amax);
    return isinf(s) ? 3.402823466e38f : s;
}

template <int E5M2>
__device__ __forceinline__ unsigned char to_fp8(float v) {
    return (unsigned char)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, E5M2 ? __NV_E5M2 : __NV_E4M3);
}

// x [rows, cols] row-major → out (row-major, may be null) and out_t [cols, rows] (may be
// null), each value round(x·scale) in the format; scale_inv[0] = 1 / scale. 32×32 tiles
// through shared memory keep both writes coalesced. Block (32, 8).
template <typename T, int E5M2>
__device__ void cast_impl(const T *x, unsigned long long rows, unsigned long long cols,
                          const float *amax, float fp8_max, unsigned char *out,
                          unsigned char *out_t, float *scale_inv) {
    const float scale = scale_for(*amax, fp8_max);
    if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && threadIdx.y == 0)
        *scale_inv = __frcp_rn(scale);
    __shared__ unsigned char tile[32][33];
    const size_t r0 = (size_t)blockIdx.y * 32, c0 = (size_t)blockIdx.x * 32;
    for (int dy = threadIdx.y; dy < 32; dy += 8) {
        const size_t r = r0 + dy, c = c0 + threadIdx.x;
        if (r < rows && c < cols) {
            const unsigned char q = to_fp8<E5M2>(__fmul_rn(to_f(x[r * cols + c]), scale));
            if (out != nullptr) out[r * cols + c] = q;
            tile[dy][threadIdx.x] = q;
        }
    }
    if (out_t == nullptr) return;
    __syncthreads();
    for (int dx = threadIdx.y; dx < 32; dx += 8) {
        const size_t c = c0 + dx, r = r0 + threadIdx.x;
        if (r < rows && c < cols) out_t[c * rows + r] = tile[threadIdx.x][dx];
    }
}

// fp8_<KIND>_{e4m3,e5m2}_<NAME>: the two formats of one cast implementation.
#define CAST_FORMATS(KIND, IMPL, NAME, T)                                                      \
    extern "C" __global__ void fp8_##KIND##_e4m3_##NAME(                                        \
        const T *x, unsigned long long rows, unsigned long long cols, const float *amax,        \
        unsigned char *out, unsigned char *out_t, float *scale_inv) {                           \
        IMPL<T, 0>(x, rows, cols, amax, 448.f, out, out_t, scale_inv);                          \
    }                                                                                           \
    extern "C" __global__ void fp8_##KIND##_e5m2_##NAME(                                        \
        const T *x, unsigned long long rows, unsigned long long cols, const float *amax,        \
        unsigned char *out, unsigned char *out_t, float *scale_inv) {                           \
        IMPL<T, 1>(x, rows, cols, amax, 57344.f, out, out_t, scale_inv);                        \
    }
#define CAST(NAME, T) CAST_FORMATS(cast, cast_impl, NAME, T)
INSTANTIATE3(CAST)

// cast_impl for rows and cols multiples of 64 and 16-byte aligned buffers: 64×64 tiles, each
// of 256 threads loads 2 × 8 consecutive values (16-byte loads of bf16/f16), stores them as
// 8-byte FP8 runs, and writes one 16-byte run of the transposed tile.
template <typename T, int E5M2>
__device__ void cast64_impl(const T *x, unsigned long long rows, unsigned long long cols,
                            const float *amax, float fp8_max, unsigned char *out,
                            unsigned char *out_t, float *scale_inv) {
    static_assert(sizeof(T) == 2, "16-bit inputs");
    const float scale = scale_for(*amax, fp8_max);
    if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *scale_inv = __frcp_rn(scale);
    __shared__ __align__(16) unsigned char tile[64][64 + 16];
    const size_t r0 = (size_t)blockIdx.y * 64, c0 = (size_t)blockIdx.x * 64;
    const int t = threadIdx.x;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int idx = t + half * 256;       // 512 runs of 8 values
        const int r = idx >> 3, c = (idx & 7) * 8;
        float v[8];
        load_w<T, 8>(x + (r0 + r) * cols + c0 + c, v);
        union {
            uint2 raw;
            unsigned char b[8];
        } q;
#pragma unroll
        for (int k = 0; k < 8; ++k) q.b[k] = to_fp8<E5M2>(__fmul_rn(v[k], scale));
        if (out != nullptr) *reinterpret_cast<uint2 *>(out + (r0 + r) * cols + c0 + c) = q.raw;
        *reinterpret_cast<uint2 *>(&tile[r][c]) = q.raw;
    }
    if (out_t == nullptr) return;
    __syncthreads();
    // Thread t writes transposed row c = t / 4 (a column of x), rows 16·(t % 4) .. +16.
    const int c = t >> 2, rs = (t & 3) * 16;
    union {
        uint4 raw;
        unsigned char b[16];
    } q;
#pragma unroll
    for (int k = 0; k < 16; ++k) q.b[k] = tile[rs + k][c];
    *reinterpret_cast<uint4 *>(out_t + (c0 + c) * rows + r0 + rs) = q.raw;
}

#define CAST64(NAME, T) CAST_FORMATS(cast64, cast64_impl, NAME, T)
CAST64(bf16, __nv_bfloat16)
CAST64(f16, __half)

// Stored FP8 primary weights (`model::fp8_params`): E4M3 bytes widened, times scale_inv[0]
// when it is given (dequantized f32 values), else unscaled (f16: exact for every E4M3 value,
// what the transposed cast of a stored weight reads).
template <typename T>
__device__ void widen_impl(const unsigned char *x, unsigned long long n, const float *scale_inv,
                           T *out) {
    const float s = scale_inv == nullptr ? 1.f : *scale_inv;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float v = __half2float(__half(__nv_cvt_fp8_to_halfraw(x[i], __NV_E4M3)));
        out[i] = from_f<T>(__fmul_rn(v, s));
    }
}

#define WIDEN(NAME, T)                                                                          \
    extern "C" __global__ void fp8_e4m3_widen_##NAME(const unsigned char *x,                   \
                                                     unsigned long long n,                     \
                                                     const float *scale_inv, T *out) {         \
        widen_impl<T>(x, n, scale_inv, out);                                                    \
    }
WIDEN(f32, float)
WIDEN(f16, __half)
