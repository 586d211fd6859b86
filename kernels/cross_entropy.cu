// Token cross-entropy straight from half-precision logits [N, V] (no f32 copy of them):
// forward writes out[N, 2] = (lse − x[label], lse) in f32 with one online-softmax pass per
// row; backward writes dx = (softmax − onehot(label))·g_loss + softmax·g_lse in the logits'
// dtype. A label outside [0, V) gives a NaN loss (the caller checks labels before).
#include "common.cuh"

template <typename T>
__device__ void ce_fwd(const T *x, const unsigned *labels, float *out, int v) {
    const size_t row = blockIdx.x;
    const T *xr = x + row * v;
    float m = -INFINITY, s = 0.f;
    for (int c = threadIdx.x; c < v; c += blockDim.x) {
        const float a = to_f(xr[c]);
        if (a > m) {
            s = s * expf(m - a) + 1.f;
            m = a;
        } else {
            s += expf(a - m);
        }
    }
    block_max_sum(m, s);
    if (threadIdx.x == 0) {
        const float lse = m + logf(s);
        const unsigned l = labels[row];
        out[2 * row] = l < (unsigned)v ? lse - to_f(xr[l]) : NAN;
        out[2 * row + 1] = lse;
    }
}

template <typename T>
__device__ void ce_bwd(const T *x, const unsigned *labels, const float *res, const float *g,
                       T *dx, int v) {
    const size_t row = blockIdx.x;
    const T *xr = x + row * v;
    T *dr = dx + row * v;
    const float lse = res[2 * row + 1];
    const float gl = g[2 * row], gs = g[2 * row + 1];
    const unsigned l = labels[row];
    for (int c = threadIdx.x; c < v; c += blockDim.x) {
        const float p = expf(to_f(xr[c]) - lse);
        dr[c] = from_f<T>(p * (gl + gs) - ((unsigned)c == l ? gl : 0.f));
    }
}

#define CE(NAME, T)                                                                             \
    extern "C" __global__ void ce_fwd_##NAME(const T *x, const unsigned *labels, float *out,    \
                                             int v) {                                           \
        ce_fwd<T>(x, labels, out, v);                                                           \
    }                                                                                           \
    extern "C" __global__ void ce_bwd_##NAME(const T *x, const unsigned *labels,               \
                                             const float *res, const float *g, T *dx, int v) {  \
        ce_bwd<T>(x, labels, res, g, dx, v);                                                    \
    }
INSTANTIATE3(CE)
