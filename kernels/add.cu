// y = a + b for contiguous same-shape tensors (the residual adds of the transformer blocks),
// rounded once per element as candle's binary add rounds. 16-byte vectors when all three
// buffers are aligned: candle's own add moves one 2-byte element per thread and iteration,
// about a third of the bandwidth.
#include "common.cuh"

template <typename T>
__device__ void add_impl(const T *a, const T *b, T *y, size_t n) {
    constexpr int VEC = 16 / sizeof(T);
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t done = 0;
    if (aligned16(a) && aligned16(b) && aligned16(y)) {
        const size_t nv = n / VEC;
        for (size_t i = tid; i < nv; i += stride) {
            Vec16<T> va, vb, o;
            va.raw = reinterpret_cast<const uint4 *>(a)[i];
            vb.raw = reinterpret_cast<const uint4 *>(b)[i];
#pragma unroll
            for (int j = 0; j < VEC; ++j) o.v[j] = from_f<T>(to_f(va.v[j]) + to_f(vb.v[j]));
            reinterpret_cast<uint4 *>(y)[i] = o.raw;
        }
        done = nv * VEC;
    }
    for (size_t i = done + tid; i < n; i += stride) y[i] = from_f<T>(to_f(a[i]) + to_f(b[i]));
}

#define ADD(NAME, T)                                                                            \
    extern "C" __global__ void add_##NAME(const T *a, const T *b, T *y, unsigned long long n) { \
        add_impl<T>(a, b, y, n);                                                                \
    }
INSTANTIATE3(ADD)
