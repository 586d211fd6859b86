// Gated SiLU on a fused [.., 2F] input laid out [gate; up] (Megatron's linear_fc1):
// y = round(round(silu(gate))·up), as `ops::activation::swiglu` computes it in bf16.
// Backward writes d[gate; up] in one pass: d_up = dy·silu(g), d_gate = dy·up·silu'(g),
// silu'(g) = σ(g)·(1 + g·(1 − σ(g))).
// With `amax` (not null) both also fold the largest magnitude of what they write into amax[0]
// (FP8 current scaling of linear_fc2's input / linear_fc1's output gradient), sparing the
// quantization its own pass over the tensor.
// Each thread handles VEC consecutive columns with 16-byte loads and stores when F and the
// buffers allow it (one index division per vector, not per element: these passes are
// memory-bound and 2-byte accesses with 64-bit index math left bandwidth unused), else one.
#include "common.cuh"

// Calls f(row, col) for every VEC-column group of a [rows, f] index space.
template <int VEC, typename F>
__device__ __forceinline__ void for_each_group(size_t rows, int f, F body) {
    const int groups = f / VEC;
    const size_t n = rows * groups;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / groups;
        body(r, (int)(i - r * groups) * VEC);
    }
}

template <typename T>
__device__ __forceinline__ T swiglu_value(float g, float u) {
    const float silu = g / (1.f + expf(-g));
    return from_f<T>(round_to<T>(silu) * u);
}

template <typename T>
__device__ __forceinline__ void swiglu_grad(float g, float u, float d, T &dg, T &du) {
    const float sig = 1.f / (1.f + expf(-g));
    dg = from_f<T>(d * u * sig * (1.f + g * (1.f - sig)));
    du = from_f<T>(d * g * sig);
}

template <typename T>
__device__ void swiglu_fwd_impl(const T *x, T *y, size_t rows, int f, float *amax) {
    constexpr int VEC = 16 / sizeof(T);
    float m = 0.f;
    if (f % VEC == 0 && aligned16(x) && aligned16(y)) {
        for_each_group<VEC>(rows, f, [&](size_t r, int c) {
            Vec16<T> g, u, o;
            g.raw = *reinterpret_cast<const uint4 *>(x + r * 2 * f + c);
            u.raw = *reinterpret_cast<const uint4 *>(x + r * 2 * f + f + c);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                o.v[k] = swiglu_value<T>(to_f(g.v[k]), to_f(u.v[k]));
                m = fmaxf(m, fabsf(to_f(o.v[k])));
            }
            *reinterpret_cast<uint4 *>(y + r * f + c) = o.raw;
        });
    } else {
        for_each_group<1>(rows, f, [&](size_t r, int c) {
            const T o = swiglu_value<T>(to_f(x[r * 2 * f + c]), to_f(x[r * 2 * f + f + c]));
            y[r * f + c] = o;
            m = fmaxf(m, fabsf(to_f(o)));
        });
    }
    if (amax != nullptr) block_amax_into(m, amax);
}

template <typename T>
__device__ void swiglu_bwd_impl(const T *x, const T *dy, T *dx, size_t rows, int f, float *amax) {
    constexpr int VEC = 16 / sizeof(T);
    float m = 0.f;
    if (f % VEC == 0 && aligned16(x) && aligned16(dy) && aligned16(dx)) {
        for_each_group<VEC>(rows, f, [&](size_t r, int c) {
            Vec16<T> g, u, d, dg, du;
            g.raw = *reinterpret_cast<const uint4 *>(x + r * 2 * f + c);
            u.raw = *reinterpret_cast<const uint4 *>(x + r * 2 * f + f + c);
            d.raw = *reinterpret_cast<const uint4 *>(dy + r * f + c);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                swiglu_grad<T>(to_f(g.v[k]), to_f(u.v[k]), to_f(d.v[k]), dg.v[k], du.v[k]);
                m = fmaxf(m, fmaxf(fabsf(to_f(dg.v[k])), fabsf(to_f(du.v[k]))));
            }
            *reinterpret_cast<uint4 *>(dx + r * 2 * f + c) = dg.raw;
            *reinterpret_cast<uint4 *>(dx + r * 2 * f + f + c) = du.raw;
        });
    } else {
        for_each_group<1>(rows, f, [&](size_t r, int c) {
            T dg, du;
            swiglu_grad<T>(to_f(x[r * 2 * f + c]), to_f(x[r * 2 * f + f + c]), to_f(dy[r * f + c]),
                           dg, du);
            dx[r * 2 * f + c] = dg;
            dx[r * 2 * f + f + c] = du;
            m = fmaxf(m, fmaxf(fabsf(to_f(dg)), fabsf(to_f(du))));
        });
    }
    if (amax != nullptr) block_amax_into(m, amax);
}

#define SWIGLU(NAME, T)                                                                         \
    extern "C" __global__ void swiglu_fwd_##NAME(const T *x, T *y, unsigned long long rows,    \
                                                 int f, float *amax) {                          \
        swiglu_fwd_impl<T>(x, y, rows, f, amax);                                                \
    }                                                                                           \
    extern "C" __global__ void swiglu_bwd_##NAME(const T *x, const T *dy, T *dx,               \
                                                 unsigned long long rows, int f, float *amax) { \
        swiglu_bwd_impl<T>(x, dy, dx, rows, f, amax);                                           \
    }
INSTANTIATE3(SWIGLU)
