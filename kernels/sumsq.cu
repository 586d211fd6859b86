// Σx² of many tensors in two deterministic passes: per tensor, a fixed grid of blocks writes
// per-block f32 partial sums into the tensor's slots; then one launch, block k per tensor k,
// adds slots in f64 into out[k]. Replaces candle's `sum_all`,
// whose reduction runs one block per output element, i.e. one block for a whole tensor
// (~0.1 s for a 128k×2k embedding gradient).
#include "common.cuh"

// W elements per load (16-byte vectors when the tensor is aligned, else 1): the gradient norm
// reads every gradient once, at memory bandwidth only with wide loads.
template <typename T, int W>
__device__ void sumsq_partial_impl(const T *x, unsigned long long n, float *partial) {
    float s = 0.f;
    const size_t vectors = n / W;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < vectors;
         i += (size_t)gridDim.x * blockDim.x) {
        float v[W];
        load_w<T, W>(x + i * W, v);
#pragma unroll
        for (int k = 0; k < W; ++k) s += v[k] * v[k];
    }
    // The tail past the last whole vector (W > 1 only).
    for (size_t i = vectors * W + (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float v = to_f(x[i]);
        s += v * v;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

#define SUMSQ(NAME, T)                                                                          \
    extern "C" __global__ void sumsq_partial_##NAME(const T *x, unsigned long long n,          \
                                                    float *partial) {                           \
        if (aligned16(x))                                                                       \
            sumsq_partial_impl<T, 16 / sizeof(T)>(x, n, partial);                               \
        else                                                                                    \
            sumsq_partial_impl<T, 1>(x, n, partial);                                            \
    }
INSTANTIATE3(SUMSQ)

// Blocks of 256 threads, one per tensor; tensor k's slots are partial[k * slots, (k+1) * slots).
extern "C" __global__ void sumsq_finish(const float *partial, int slots, double *out) {
    __shared__ double sh[256];
    const int k = blockIdx.x;
    double s = 0.0;
    for (int i = threadIdx.x; i < slots; i += blockDim.x) s += (double)partial[(size_t)k * slots + i];
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int stride = 128; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) sh[threadIdx.x] += sh[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[k] = sh[0];
}
