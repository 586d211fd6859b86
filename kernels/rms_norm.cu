// RMSNorm over the last dimension: y = round(round(x·rstd)·γ), rstd = 1/sqrt(mean(x²)+eps),
// γ = w (or round(1 + w) with zero-centered gamma), matching `ops::norm::rms_norm`.
// Forward: one block per row. Backward: dx per row, dγ as per-block f32 partial sums
// (each thread owns fixed columns, so no atomics) reduced by a second kernel.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ float gamma_of(const T *w, int c, int zero_centered) {
    const float g = to_f(w[c]);
    return zero_centered ? round_to<T>(g + 1.f) : g;
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

// dx = rstd·(dn − x·rstd²·mean(dn·x)), dn = dy·γ; partial[b, c] = Σ_rows of block b dy·x·rstd.
// rstd is recomputed from the row (the row is read anyway), so the forward stores nothing.
template <typename T>
__device__ void rms_bwd(const T *x, const T *w, const T *dy, T *dx, float *partial, int rows,
                        int cols, float eps, int zc) {
    extern __shared__ float dw[];
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dw[c] = 0.f;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T *xr = x + (size_t)row * cols;
        const T *dyr = dy + (size_t)row * cols;
        T *dxr = dx + (size_t)row * cols;
        float ss = 0.f, dot = 0.f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float v = to_f(xr[c]);
            ss += v * v;
            dot += to_f(dyr[c]) * gamma_of(w, c, zc) * v;
        }
        ss = block_sum(ss);
        dot = block_sum(dot);
        const float rstd = 1.f / sqrtf(ss / (float)cols + eps);
        const float k = dot * rstd * rstd / (float)cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float v = to_f(xr[c]);
            const float g = to_f(dyr[c]);
            dxr[c] = from_f<T>(rstd * (g * gamma_of(w, c, zc) - v * k));
            dw[c] += g * v * rstd;
        }
    }
    for (int c = threadIdx.x; c < cols; c += blockDim.x) partial[(size_t)blockIdx.x * cols + c] = dw[c];
}

template <typename T>
__device__ void rms_dw_reduce(const float *partial, T *dw, int blocks, int cols) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.f;
    for (int b = 0; b < blocks; ++b) s += partial[(size_t)b * cols + c];
    dw[c] = from_f<T>(s);
}

#define RMS(NAME, T)                                                                            \
    extern "C" __global__ void rms_norm_fwd_##NAME(const T *x, const T *w, T *y, int cols,      \
                                                   float eps, int zc) {                         \
        rms_fwd<T>(x, w, y, cols, eps, zc);                                                     \
    }                                                                                           \
    extern "C" __global__ void rms_norm_bwd_##NAME(const T *x, const T *w, const T *dy, T *dx,  \
                                                   float *partial, int rows, int cols,          \
                                                   float eps, int zc) {                         \
        rms_bwd<T>(x, w, dy, dx, partial, rows, cols, eps, zc);                                 \
    }                                                                                           \
    extern "C" __global__ void rms_norm_dw_##NAME(const float *partial, T *dw, int blocks,      \
                                                  int cols) {                                   \
        rms_dw_reduce<T>(partial, dw, blocks, cols);                                            \
    }
INSTANTIATE3(RMS)
