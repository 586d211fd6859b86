// Token cross-entropy straight from half-precision logits [N, V] (no f32 copy of them):
// forward writes out[N, 2] = (lse − x[label], lse) in f32 with one online-softmax pass per
// row; backward writes dx = (softmax − onehot(label))·g_loss + softmax·g_lse in the logits'
// dtype. A label outside [0, V) gives a NaN loss (the caller checks labels before).
//
// Both passes stream the whole [N, V] logits (the largest tensor of a step), so they move
// 16-byte vectors where every row starts 16-byte aligned, and work in the log2 domain
// (exp2 of pre-scaled values is one instruction); the running maximum is updated once per
// vector, not per element.
#include "common.cuh"

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

template <typename T, int W>
__device__ void ce_fwd_rows(const T *x, const unsigned *labels, float *out, int v) {
    const size_t row = blockIdx.x;
    const T *xr = x + row * v;
    float m = -INFINITY, s = 0.f;  // log2 domain: s = Σ exp2(a·log2e − m)
    for (int c = threadIdx.x * W; c < v; c += blockDim.x * W) {
        float a[W];
        load_w<T, W>(xr + c, a);
        float vm = a[0];
#pragma unroll
        for (int k = 1; k < W; ++k) vm = fmaxf(vm, a[k]);
        vm *= LOG2E;
        if (vm > m) {
            s *= exp2f(m - vm);
            m = vm;
        }
#pragma unroll
        for (int k = 0; k < W; ++k) s += exp2f(fmaf(a[k], LOG2E, -m));
    }
    // Back to the natural-log domain for the block reduction (merge_max_sum uses expf).
    m *= LN2;
    block_max_sum(m, s);
    if (threadIdx.x == 0) {
        const float lse = m + logf(s);
        const unsigned l = labels[row];
        out[2 * row] = l < (unsigned)v ? lse - to_f(xr[l]) : NAN;
        out[2 * row + 1] = lse;
    }
}

template <typename T, int W>
__device__ void ce_bwd_rows(const T *x, const unsigned *labels, const float *res, const float *g,
                            T *dx, int v) {
    const size_t row = blockIdx.x;
    const T *xr = x + row * v;
    T *dr = dx + row * v;
    const float lse2 = res[2 * row + 1] * LOG2E;
    const float gl = g[2 * row], gs = g[2 * row + 1];
    const unsigned l = labels[row];
    for (int c = threadIdx.x * W; c < v; c += blockDim.x * W) {
        float a[W];
        load_w<T, W>(xr + c, a);
#pragma unroll
        for (int k = 0; k < W; ++k) {
            const float p = exp2f(fmaf(a[k], LOG2E, -lse2));
            a[k] = p * (gl + gs) - ((unsigned)(c + k) == l ? gl : 0.f);
        }
        store_w<T, W>(dr + c, a);
    }
}

// Vectors when every row starts on a 16-byte boundary (v a multiple of the vector width).
template <typename T>
__device__ __forceinline__ bool ce_vectorized(const T *x, const T *dx, int v) {
    constexpr int VEC = 16 / sizeof(T);
    return v % VEC == 0 && aligned16(x) && aligned16(dx);
}

#define CE(NAME, T)                                                                             \
    extern "C" __global__ void ce_fwd_##NAME(const T *x, const unsigned *labels, float *out,    \
                                             int v) {                                           \
        if (ce_vectorized<T>(x, x, v))                                                          \
            ce_fwd_rows<T, 16 / sizeof(T)>(x, labels, out, v);                                  \
        else                                                                                    \
            ce_fwd_rows<T, 1>(x, labels, out, v);                                               \
    }                                                                                           \
    extern "C" __global__ void ce_bwd_##NAME(const T *x, const unsigned *labels,               \
                                             const float *res, const float *g, T *dx, int v) {  \
        if (ce_vectorized<T>(x, dx, v))                                                         \
            ce_bwd_rows<T, 16 / sizeof(T)>(x, labels, res, g, dx, v);                           \
        else                                                                                    \
            ce_bwd_rows<T, 1>(x, labels, res, g, dx, v);                                        \
    }
INSTANTIATE3(CE)
