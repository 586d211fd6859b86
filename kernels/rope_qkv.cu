// RoPE inside Megatron's fused QKV layout [tokens, groups, hpg + 2, D] (per query group: hpg
// query heads, one key head, one value head), for layers with a written-out backward:
//
// rope_qkv_fwd   rotates the query and key heads in place (the value heads are untouched), with
//                the rounding of `ops::rope::apply_rope` (see kernels/rope.cu). One thread per
//                rotated pair (i, i + rot/2), so each element is read before it is written.
// rope_qkv_bwd   assembles dQKV in the same layout from the attention gradients dq [.., heads,
//                D], dk and dv [.., groups, D] (any token/head strides): query and key parts
//                rotated back (the transpose of the rotation), value part copied.
//
// cos/sin are [CB, 1, S, rot] contiguous, CB = 1 or B; token t = b·S + s.
//
// Both move 16-byte vectors (VEC columns per thread) when the head and rotary halves are whole
// vectors and every buffer and stride is 16-byte aligned, else one element per thread: these
// passes are memory-bound, and 2-byte accesses left most of the bandwidth unused.
#include "common.cuh"

// W consecutive elements of T at p as floats, and back: one 16-byte access when W fills a
// vector (p then 16-byte aligned), else element by element.
template <typename T, int W>
__device__ __forceinline__ void load_w(const T *p, float (&out)[W]) {
    if constexpr (W * sizeof(T) == 16) {
        Vec16<T> v;
        v.raw = *reinterpret_cast<const uint4 *>(p);
#pragma unroll
        for (int k = 0; k < W; ++k) out[k] = to_f(v.v[k]);
    } else {
#pragma unroll
        for (int k = 0; k < W; ++k) out[k] = to_f(p[k]);
    }
}

template <typename T, int W>
__device__ __forceinline__ void store_w(T *p, const float (&in)[W]) {
    if constexpr (W * sizeof(T) == 16) {
        Vec16<T> v;
#pragma unroll
        for (int k = 0; k < W; ++k) v.v[k] = from_f<T>(in[k]);
        *reinterpret_cast<uint4 *>(p) = v.raw;
    } else {
#pragma unroll
        for (int k = 0; k < W; ++k) p[k] = from_f<T>(in[k]);
    }
}

// Offset of the rotary table row of token tok = b·S + s.
__device__ __forceinline__ size_t rope_row(int tok, int S, int cb, int rot) {
    const int b = tok / S, s = tok % S;
    return ((size_t)(cb == 1 ? 0 : b) * S + s) * rot;
}

// Rotates W pairs (i.., i + half..) per work item.
template <typename T, int W>
__device__ void rope_qkv_fwd_items(T *qkv, const T *cs, const T *sn, int B, int S, int G,
                                   int hpg, int D, int rot, int cb) {
    // One block per token (grid-stride over tokens); 32-bit index math within the token.
    const int half = rot / 2;
    const int per_head = half / W;
    const int items = G * (hpg + 1) * per_head;
    for (int tok = blockIdx.x; tok < B * S; tok += gridDim.x) {
        const T *ct = cs + rope_row(tok, S, cb, rot);
        const T *st = sn + rope_row(tok, S, cb, rot);
        T *base = qkv + (size_t)tok * G * (hpg + 2) * D;
        for (int e = threadIdx.x; e < items; e += blockDim.x) {
            const int i = (e % per_head) * W;
            const int hj = e / per_head;  // g · (hpg + 1) + j, j <= hpg
            const int j = hj % (hpg + 1), g = hj / (hpg + 1);
            T *r = base + (g * (hpg + 2) + j) * D;
            float x1[W], x2[W], c1[W], c2[W], s1[W], s2[W], y1[W], y2[W];
            load_w<T, W>(r + i, x1);
            load_w<T, W>(r + i + half, x2);
            load_w<T, W>(ct + i, c1);
            load_w<T, W>(ct + i + half, c2);
            load_w<T, W>(st + i, s1);
            load_w<T, W>(st + i + half, s2);
#pragma unroll
            for (int k = 0; k < W; ++k) {
                y1[k] = round_to<T>(x1[k] * c1[k]) + round_to<T>(-x2[k] * s1[k]);
                y2[k] = round_to<T>(x2[k] * c2[k]) + round_to<T>(x1[k] * s2[k]);
            }
            store_w<T, W>(r + i, y1);
            store_w<T, W>(r + i + half, y2);
        }
    }
}

template <typename T>
__device__ void rope_qkv_fwd(T *qkv, const T *cs, const T *sn, int B, int S, int G, int hpg,
                             int D, int rot, int cb) {
    constexpr int VEC = 16 / sizeof(T);
    if ((rot / 2) % VEC == 0 && D % VEC == 0 && aligned16(qkv) && aligned16(cs) && aligned16(sn))
        rope_qkv_fwd_items<T, VEC>(qkv, cs, sn, B, S, G, hpg, D, rot, cb);
    else
        rope_qkv_fwd_items<T, 1>(qkv, cs, sn, B, S, G, hpg, D, rot, cb);
}

// Writes W consecutive elements of dQKV per work item.
template <typename T, int W>
__device__ void rope_qkv_bwd_items(const T *dq, const T *dk, const T *dv, const T *cs,
                                   const T *sn, T *out, int B, int S, int G, int hpg, int D,
                                   int rot, int cb, long long qb, long long qs, long long qh,
                                   long long kb, long long ks, long long kh, long long vb,
                                   long long vs, long long vh) {
    // One block per token (grid-stride over tokens); 32-bit index math within the token.
    const int half = rot / 2;
    const int row = G * (hpg + 2) * D;
    const int per_head = D / W;
    for (int tok = blockIdx.x; tok < B * S; tok += gridDim.x) {
        const int b = tok / S, s = tok % S;
        const T *q0 = dq + b * qb + s * qs;
        const T *k0 = dk + b * kb + s * ks;
        const T *v0 = dv + b * vb + s * vs;
        const T *ct = cs + rope_row(tok, S, cb, rot);
        const T *st = sn + rope_row(tok, S, cb, rot);
        T *o = out + (size_t)tok * row;
        for (int e = threadIdx.x; e < row / W; e += blockDim.x) {
            const int c = (e % per_head) * W;
            const int hj = e / per_head;  // g · (hpg + 2) + j
            const int j = hj % (hpg + 2), g = hj / (hpg + 2);
            const T *src = j < hpg    ? q0 + (long long)(g * hpg + j) * qh
                           : j == hpg ? k0 + (long long)g * kh
                                      : v0 + (long long)g * vh;
            float r[W];
            load_w<T, W>(src + c, r);
            if (j <= hpg && c < rot) {
                // The transposed rotation: the partner column with the opposite angle.
                const bool first = c < half;
                const int p = first ? c + half : c - half;
                float xq[W], cv[W], sp[W];
                load_w<T, W>(src + p, xq);
                load_w<T, W>(ct + c, cv);
                load_w<T, W>(st + p, sp);
#pragma unroll
                for (int k = 0; k < W; ++k)
                    r[k] = first ? r[k] * cv[k] + xq[k] * sp[k] : r[k] * cv[k] - xq[k] * sp[k];
            }
            store_w<T, W>(o + (size_t)e * W, r);
        }
    }
}

template <typename T>
__device__ void rope_qkv_bwd(const T *dq, const T *dk, const T *dv, const T *cs, const T *sn,
                             T *out, int B, int S, int G, int hpg, int D, int rot, int cb,
                             long long qb, long long qs, long long qh, long long kb,
                             long long ks, long long kh, long long vb, long long vs,
                             long long vh) {
    constexpr int VEC = 16 / sizeof(T);
    const bool strides_aligned = (qb | qs | qh | kb | ks | kh | vb | vs | vh) % VEC == 0;
    if ((rot / 2) % VEC == 0 && D % VEC == 0 && strides_aligned && aligned16(dq) &&
        aligned16(dk) && aligned16(dv) && aligned16(cs) && aligned16(sn) && aligned16(out))
        rope_qkv_bwd_items<T, VEC>(dq, dk, dv, cs, sn, out, B, S, G, hpg, D, rot, cb, qb, qs, qh,
                                   kb, ks, kh, vb, vs, vh);
    else
        rope_qkv_bwd_items<T, 1>(dq, dk, dv, cs, sn, out, B, S, G, hpg, D, rot, cb, qb, qs, qh,
                                 kb, ks, kh, vb, vs, vh);
}

#define ROPE_QKV(NAME, T)                                                                       \
    extern "C" __global__ void rope_qkv_fwd_##NAME(T *qkv, const T *cs, const T *sn, int B,    \
                                                   int S, int G, int hpg, int D, int rot,      \
                                                   int cb) {                                   \
        rope_qkv_fwd<T>(qkv, cs, sn, B, S, G, hpg, D, rot, cb);                                \
    }                                                                                          \
    extern "C" __global__ void rope_qkv_bwd_##NAME(                                            \
        const T *dq, const T *dk, const T *dv, const T *cs, const T *sn, T *out, int B, int S, \
        int G, int hpg, int D, int rot, int cb, long long qb, long long qs, long long qh,      \
        long long kb, long long ks, long long kh, long long vb, long long vs, long long vh) {   \
        rope_qkv_bwd<T>(dq, dk, dv, cs, sn, out, B, S, G, hpg, D, rot, cb, qb, qs, qh, kb, ks, \
                        kh, vb, vs, vh);                                                       \
    }
INSTANTIATE3(ROPE_QKV)
