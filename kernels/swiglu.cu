// Gated SiLU on a fused [.., 2F] input laid out [gate; up] (Megatron's linear_fc1):
// y = round(round(silu(gate))·up), as `ops::activation::swiglu` computes it in bf16.
// Backward writes d[gate; up] in one pass: d_up = dy·silu(g), d_gate = dy·up·silu'(g),
// silu'(g) = σ(g)·(1 + g·(1 − σ(g))).
#include "common.cuh"

template <typename T>
__device__ void swiglu_fwd_impl(const T *x, T *y, size_t rows, int f) {
    const size_t n = rows * f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / f, c = i % f;
        const float g = to_f(x[r * 2 * f + c]), u = to_f(x[r * 2 * f + f + c]);
        const float silu = g / (1.f + expf(-g));
        y[i] = from_f<T>(round_to<T>(silu) * u);
    }
}

template <typename T>
__device__ void swiglu_bwd_impl(const T *x, const T *dy, T *dx, size_t rows, int f) {
    const size_t n = rows * f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / f, c = i % f;
        const float g = to_f(x[r * 2 * f + c]), u = to_f(x[r * 2 * f + f + c]);
        const float d = to_f(dy[i]);
        const float sig = 1.f / (1.f + expf(-g));
        const float silu = g * sig;
        dx[r * 2 * f + c] = from_f<T>(d * u * sig * (1.f + g * (1.f - sig)));
        dx[r * 2 * f + f + c] = from_f<T>(d * silu);
    }
}

#define SWIGLU(NAME, T)                                                                         \
    extern "C" __global__ void swiglu_fwd_##NAME(const T *x, T *y, unsigned long long rows,    \
                                                 int f) {                                       \
        swiglu_fwd_impl<T>(x, y, rows, f);                                                      \
    }                                                                                           \
    extern "C" __global__ void swiglu_bwd_##NAME(const T *x, const T *dy, T *dx,               \
                                                 unsigned long long rows, int f) {              \
        swiglu_bwd_impl<T>(x, dy, dx, rows, f);                                                 \
    }
INSTANTIATE3(SWIGLU)
