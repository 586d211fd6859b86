// RoPE inside Megatron's fused QKV layout [tokens, groups, hpg + 2, D] (per query group: hpg
// query heads, one key head, one value head), in place, for layers with a written-out backward:
//
// rope_qkv_fwd   rotates the query and key heads of linear_qkv's output (the value heads are
//                untouched), with the rounding of `ops::rope::apply_rope` (see kernels/rope.cu).
// rope_qkv_bwd   applies the transposed rotation to the query and key parts of dQKV, which the
//                flash backward wrote in the same layout (the value part is already final).
//
// With a dense query buffer `qd` [tokens, G·hpg, D] (full rotary only, rot = D), the query
// heads go through it instead: the forward writes the rotated queries there (the fused
// buffer's query slots are left as they are) and the backward reads dQ from there and writes
// its rotation into dQKV's query slots. cuDNN's attention needs evenly strided query heads,
// which the fused layout does not have: this spares a copy of q each way and one of dQ.
//
// One thread per rotated pair group (i.., i + rot/2..), so each element is read before it is
// written; the work items of all tokens form one flat index, so blocks stay full whatever the
// head count (one block per token left a third of the threads idle at 5 rotated heads).
// cos/sin are [CB, 1, S, rot] contiguous, CB = 1 or B; token t = b·S + s.
//
// 16-byte vectors (VEC columns per thread) when the rotary half is whole vectors and every
// buffer is 16-byte aligned, else one element per thread: these passes are memory-bound.
#include "common.cuh"

// Offset of the rotary table row of token tok = b·S + s.
__device__ __forceinline__ size_t rope_row(int tok, int S, int cb, int rot) {
    const int b = tok / S, s = tok % S;
    return ((size_t)(cb == 1 ? 0 : b) * S + s) * rot;
}

// Forward:   y1 = x1·c1 − x2·s1, y2 = x2·c2 + x1·s2 (each product rounded like the reference);
// backward:  the transpose, dx1 = dy1·c1 + dy2·s2, dx2 = dy2·c2 − dy1·s1 (f32, rounded once),
// where c1, s1 are the table at column i and c2, s2 at column i + rot/2.
template <typename T, int W, bool BACKWARD>
__device__ void rope_qkv_items(T *qkv, T *qd, const T *cs, const T *sn, int B, int S, int G,
                               int hpg, int D, int rot, int cb) {
    const int half = rot / 2;
    const int per_head = half / W;
    const int items = G * (hpg + 1) * per_head;  // per token
    const long long total = (long long)B * S * items;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += step) {
        const int tok = (int)(e / items);
        const int it = (int)(e % items);
        const int i = (it % per_head) * W;
        const int hj = it / per_head;  // g · (hpg + 1) + j, j <= hpg
        const int j = hj % (hpg + 1), g = hj / (hpg + 1);
        const T *ct = cs + rope_row(tok, S, cb, rot);
        const T *st = sn + rope_row(tok, S, cb, rot);
        T *r = qkv + (size_t)tok * G * (hpg + 2) * D + (g * (hpg + 2) + j) * D;
        // Where this head is read from and written to (see the dense query buffer above).
        const T *src = r;
        T *dst = r;
        if (qd != nullptr && j < hpg) {
            T *d = qd + ((size_t)tok * G * hpg + g * hpg + j) * D;
            if constexpr (BACKWARD) src = d;
            else dst = d;
        }
        float x1[W], x2[W], c1[W], c2[W], s1[W], s2[W], y1[W], y2[W];
        load_w<T, W>(src + i, x1);
        load_w<T, W>(src + i + half, x2);
        load_w<T, W>(ct + i, c1);
        load_w<T, W>(ct + i + half, c2);
        load_w<T, W>(st + i, s1);
        load_w<T, W>(st + i + half, s2);
#pragma unroll
        for (int k = 0; k < W; ++k) {
            if constexpr (BACKWARD) {
                y1[k] = x1[k] * c1[k] + x2[k] * s2[k];
                y2[k] = x2[k] * c2[k] - x1[k] * s1[k];
            } else {
                y1[k] = round_to<T>(x1[k] * c1[k]) + round_to<T>(-x2[k] * s1[k]);
                y2[k] = round_to<T>(x2[k] * c2[k]) + round_to<T>(x1[k] * s2[k]);
            }
        }
        store_w<T, W>(dst + i, y1);
        store_w<T, W>(dst + i + half, y2);
    }
}

template <typename T, bool BACKWARD>
__device__ void rope_qkv(T *qkv, T *qd, const T *cs, const T *sn, int B, int S, int G, int hpg,
                         int D, int rot, int cb) {
    constexpr int VEC = 16 / sizeof(T);
    if ((rot / 2) % VEC == 0 && D % VEC == 0 && aligned16(qkv) && aligned16(qd) &&
        aligned16(cs) && aligned16(sn))
        rope_qkv_items<T, VEC, BACKWARD>(qkv, qd, cs, sn, B, S, G, hpg, D, rot, cb);
    else
        rope_qkv_items<T, 1, BACKWARD>(qkv, qd, cs, sn, B, S, G, hpg, D, rot, cb);
}

// `qd`: the dense query buffer, or null for the query heads in place.
#define ROPE_QKV(NAME, T)                                                                       \
    extern "C" __global__ void rope_qkv_fwd_##NAME(T *qkv, T *qd, const T *cs, const T *sn,    \
                                                   int B, int S, int G, int hpg, int D,        \
                                                   int rot, int cb) {                          \
        rope_qkv<T, false>(qkv, qd, cs, sn, B, S, G, hpg, D, rot, cb);                         \
    }                                                                                          \
    extern "C" __global__ void rope_qkv_bwd_##NAME(T *dqkv, T *dqd, const T *cs, const T *sn,  \
                                                   int B, int S, int G, int hpg, int D,        \
                                                   int rot, int cb) {                          \
        rope_qkv<T, true>(dqkv, dqd, cs, sn, B, S, G, hpg, D, rot, cb);                        \
    }
INSTANTIATE3(ROPE_QKV)
