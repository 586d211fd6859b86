// RMSNorm over the last dimension: y = round(round(x·rstd)·γ), rstd = 1/sqrt(mean(x²)+eps),
// γ = w (or round(1 + w) with zero-centered gamma), matching `ops::norm::rms_norm`.
// Forward: one block per row. Backward: dx per row (plus, optionally, a residual gradient
// added in the same pass: the pre-norm block's skip connection), dγ as per-block f32 partial
// sums (each thread owns fixed columns, so no atomics) reduced by a second kernel.
//
// The `_v{NV}` kernels move 16-byte vectors: each thread keeps NV vectors of its row in
// registers (one read of x per pass instead of two, and in the backward γ and the dγ sums stay
// in registers too). The host picks them when the row is a whole number of vectors and the
// buffers are 16-byte aligned; the scalar kernels cover the rest.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ float gamma_of(float w, int zero_centered) {
    return zero_centered ? round_to<T>(w + 1.f) : w;
}

template <typename T>
__device__ __forceinline__ float gamma_of(const T *w, int c, int zero_centered) {
    return gamma_of<T>(to_f(w[c]), zero_centered);
}

// The backward's dx element: round(dx) as the composite computes it, then the residual
// gradient added as a separate (rounded) add would.
template <typename T>
__device__ __forceinline__ T dx_value(float dx, const T *res, size_t i) {
    return res ? from_f<T>(round_to<T>(dx) + to_f(res[i])) : from_f<T>(dx);
}

template <typename T>
__device__ void rms_fwd(const T *x, const T *w, T *y, int cols, float eps, int zc) {
    const size_t row = blockIdx.x;
    const T *xr = x + row * cols;
    T *yr = y + row * cols;
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = to_f(xr[c]);
        ss += v * v;
    }
    ss = block_sum(ss);
    // Composite: (mean + eps).sqrt().recip() in f32, each step correctly rounded.
    const float rstd = 1.f / sqrtf(ss / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float n = round_to<T>(to_f(xr[c]) * rstd);
        yr[c] = from_f<T>(n * gamma_of(w, c, zc));
    }
}

template <typename T, int NV>
__device__ void rms_fwd_vec(const T *x, const T *w, T *y, int cols, float eps, int zc) {
    constexpr int VEC = 16 / sizeof(T);
    const int nvec = cols / VEC;
    const size_t base = (size_t)blockIdx.x * cols;
    Vec16<T> xv[NV];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        const int v = threadIdx.x + i * blockDim.x;
        if (v < nvec) {
            xv[i].raw = *reinterpret_cast<const uint4 *>(x + base + (size_t)v * VEC);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const float f = to_f(xv[i].v[j]);
                ss += f * f;
            }
        }
    }
    ss = block_sum(ss);
    const float rstd = 1.f / sqrtf(ss / (float)cols + eps);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        const int v = threadIdx.x + i * blockDim.x;
        if (v < nvec) {
            Vec16<T> wv, o;
            wv.raw = *reinterpret_cast<const uint4 *>(w + (size_t)v * VEC);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const float n = round_to<T>(to_f(xv[i].v[j]) * rstd);
                o.v[j] = from_f<T>(n * gamma_of<T>(to_f(wv.v[j]), zc));
            }
            *reinterpret_cast<uint4 *>(y + base + (size_t)v * VEC) = o.raw;
        }
    }
}

// dx = rstd·(dn − x·rstd²·mean(dn·x)) (+ res), dn = dy·γ; partial[b, c] = Σ_rows of block b
// dy·x·rstd. rstd is recomputed from the row (the row is read anyway), so the forward stores
// nothing.
template <typename T>
__device__ void rms_bwd(const T *x, const T *w, const T *dy, const T *res, T *dx,
                        float *partial, int rows, int cols, float eps, int zc) {
    extern __shared__ float dw[];
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dw[c] = 0.f;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const size_t base = (size_t)row * cols;
        float ss = 0.f, dot = 0.f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float v = to_f(x[base + c]);
            ss += v * v;
            dot += to_f(dy[base + c]) * gamma_of(w, c, zc) * v;
        }
        ss = block_sum(ss);
        dot = block_sum(dot);
        const float rstd = 1.f / sqrtf(ss / (float)cols + eps);
        const float k = dot * rstd * rstd / (float)cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float v = to_f(x[base + c]);
            const float g = to_f(dy[base + c]);
            dx[base + c] = dx_value(rstd * (g * gamma_of(w, c, zc) - v * k), res, base + c);
            dw[c] += g * v * rstd;
        }
    }
    for (int c = threadIdx.x; c < cols; c += blockDim.x) partial[(size_t)blockIdx.x * cols + c] = dw[c];
}

template <typename T, int NV>
__device__ void rms_bwd_vec(const T *x, const T *w, const T *dy, const T *res, T *dx,
                            float *partial, int rows, int cols, float eps, int zc) {
    constexpr int VEC = 16 / sizeof(T);
    const int nvec = cols / VEC;
    float gam[NV][VEC], dw[NV][VEC];
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        const int v = threadIdx.x + i * blockDim.x;
        Vec16<T> wv;
        if (v < nvec) wv.raw = *reinterpret_cast<const uint4 *>(w + (size_t)v * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            gam[i][j] = v < nvec ? gamma_of<T>(to_f(wv.v[j]), zc) : 0.f;
            dw[i][j] = 0.f;
        }
    }
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const size_t base = (size_t)row * cols;
        Vec16<T> xv[NV], gv[NV];
        float ss = 0.f, dot = 0.f;
#pragma unroll
        for (int i = 0; i < NV; ++i) {
            const int v = threadIdx.x + i * blockDim.x;
            if (v < nvec) {
                xv[i].raw = *reinterpret_cast<const uint4 *>(x + base + (size_t)v * VEC);
                gv[i].raw = *reinterpret_cast<const uint4 *>(dy + base + (size_t)v * VEC);
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const float f = to_f(xv[i].v[j]);
                    ss += f * f;
                    dot += to_f(gv[i].v[j]) * gam[i][j] * f;
                }
            }
        }
        ss = block_sum(ss);
        dot = block_sum(dot);
        const float rstd = 1.f / sqrtf(ss / (float)cols + eps);
        const float k = dot * rstd * rstd / (float)cols;
#pragma unroll
        for (int i = 0; i < NV; ++i) {
            const int v = threadIdx.x + i * blockDim.x;
            if (v < nvec) {
                const size_t at = base + (size_t)v * VEC;
                Vec16<T> rv, o;
                if (res) rv.raw = *reinterpret_cast<const uint4 *>(res + at);
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const float f = to_f(xv[i].v[j]);
                    const float g = to_f(gv[i].v[j]);
                    const float d = rstd * (g * gam[i][j] - f * k);
                    o.v[j] = res ? from_f<T>(round_to<T>(d) + to_f(rv.v[j])) : from_f<T>(d);
                    dw[i][j] += g * f * rstd;
                }
                *reinterpret_cast<uint4 *>(dx + at) = o.raw;
            }
        }
    }
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        const int v = threadIdx.x + i * blockDim.x;
        if (v < nvec) {
#pragma unroll
            for (int j = 0; j < VEC; ++j)
                partial[(size_t)blockIdx.x * cols + (size_t)v * VEC + j] = dw[i][j];
        }
    }
}

template <typename T>
__device__ void rms_dw_reduce(const float *partial, T *dw, int blocks, int cols) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.f;
    for (int b = 0; b < blocks; ++b) s += partial[(size_t)b * cols + c];
    dw[c] = from_f<T>(s);
}

// Block sizes the vectorized kernels are compiled for (mirrored in rms_norm.rs): the
// backward keeps γ and the dγ sums of its NV vectors in registers, so it runs narrower
// blocks to keep all of them resident.
#define FWD_THREADS 1024
#define BWD_THREADS 512

#define RMS_VEC(NAME, T, NV)                                                                    \
    extern "C" __global__ void __launch_bounds__(FWD_THREADS) rms_norm_fwd_##NAME##_v##NV(      \
        const T *x, const T *w, T *y, int cols, float eps, int zc) {                            \
        rms_fwd_vec<T, NV>(x, w, y, cols, eps, zc);                                             \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(BWD_THREADS) rms_norm_bwd_##NAME##_v##NV(      \
        const T *x, const T *w, const T *dy, const T *res, T *dx, float *partial, int rows,     \
        int cols, float eps, int zc) {                                                          \
        rms_bwd_vec<T, NV>(x, w, dy, res, dx, partial, rows, cols, eps, zc);                    \
    }

#define RMS(NAME, T)                                                                            \
    extern "C" __global__ void rms_norm_fwd_##NAME(const T *x, const T *w, T *y, int cols,      \
                                                   float eps, int zc) {                         \
        rms_fwd<T>(x, w, y, cols, eps, zc);                                                     \
    }                                                                                           \
    extern "C" __global__ void rms_norm_bwd_##NAME(const T *x, const T *w, const T *dy,         \
                                                   const T *res, T *dx, float *partial,         \
                                                   int rows, int cols, float eps, int zc) {     \
        rms_bwd<T>(x, w, dy, res, dx, partial, rows, cols, eps, zc);                            \
    }                                                                                           \
    extern "C" __global__ void rms_norm_dw_##NAME(const float *partial, T *dw, int blocks,      \
                                                  int cols) {                                   \
        rms_dw_reduce<T>(partial, dw, blocks, cols);                                            \
    }                                                                                           \
    RMS_VEC(NAME, T, 1) RMS_VEC(NAME, T, 2) RMS_VEC(NAME, T, 4)
INSTANTIATE3(RMS)
