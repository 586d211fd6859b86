// Embedding backward: dW[ids[t], :] += dy[t, :] for every token t, accumulated in f32 with
// atomics (repeated ids add up in any order; f32 addition order makes the result
// nondeterministic in the last bits, as Megatron's embedding backward on the GPU).
#include "common.cuh"

template <typename T>
__device__ void embedding_bwd(const T *dy, const unsigned *ids, float *dw, int h) {
    const size_t t = blockIdx.x;
    const size_t row = ids[t];
    const T *g = dy + t * h;
    float *out = dw + row * h;
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        atomicAdd(out + c, to_f(g[c]));
    }
}

#define EMB(NAME, T)                                                                            \
    extern "C" __global__ void embedding_bwd_##NAME(const T *dy, const unsigned *ids,          \
                                                    float *dw, int h) {                         \
        embedding_bwd<T>(dy, ids, dw, h);                                                       \
    }
INSTANTIATE3(EMB)
