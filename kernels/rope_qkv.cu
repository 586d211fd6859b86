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

// Loads VEC elements of T from p (16-byte aligned) as floats.
template <typename T>
__device__ __forceinline__ void load_vec(const T *p, float (&out)[16 / sizeof(T)]) {
    Vec16<T> v;
    v.raw = *reinterpret_cast<const uint4 *>(p);
#pragma unroll
    for (int k = 0; k < 16 / (int)sizeof(T); ++k) out[k] = to_f(v.v[k]);
}

template <typename T>
__device__ void rope_qkv_fwd(T *qkv, const T *cs, const T *sn, int B, int S, int G, int hpg,
                             int D, int rot, int cb) {
    // One block per token (grid-stride over tokens); 32-bit index math within the token.
    const int half = rot / 2;
    constexpr int VEC = 16 / sizeof(T);
    if (half % VEC == 0 && D % VEC == 0 && aligned16(qkv) && aligned16(cs) && aligned16(sn)) {
        const int hv = half / VEC;
        const int vpairs = G * (hpg + 1) * hv;
        for (int tok = blockIdx.x; tok < B * S; tok += gridDim.x) {
            const int b = tok / S, s = tok % S;
            const T *ct = cs + ((size_t)(cb == 1 ? 0 : b) * S + s) * rot;
            const T *st = sn + ((size_t)(cb == 1 ? 0 : b) * S + s) * rot;
            T *base = qkv + (size_t)tok * G * (hpg + 2) * D;
            for (int e = threadIdx.x; e < vpairs; e += blockDim.x) {
                const int i = (e % hv) * VEC;
                const int hj = e / hv;  // g · (hpg + 1) + j, j <= hpg
                const int j = hj % (hpg + 1), g = hj / (hpg + 1);
                T *r = base + (g * (hpg + 2) + j) * D;
                float x1[VEC], x2[VEC], c1[VEC], c2[VEC], s1[VEC], s2[VEC];
                load_vec(r + i, x1);
                load_vec(r + i + half, x2);
                load_vec(ct + i, c1);
                load_vec(ct + i + half, c2);
                load_vec(st + i, s1);
                load_vec(st + i + half, s2);
                Vec16<T> y1, y2;
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    y1.v[k] = from_f<T>(round_to<T>(x1[k] * c1[k]) + round_to<T>(-x2[k] * s1[k]));
                    y2.v[k] = from_f<T>(round_to<T>(x2[k] * c2[k]) + round_to<T>(x1[k] * s2[k]));
                }
                *reinterpret_cast<uint4 *>(r + i) = y1.raw;
                *reinterpret_cast<uint4 *>(r + i + half) = y2.raw;
            }
        }
        return;
    }
    const int pairs = G * (hpg + 1) * half;
    for (int tok = blockIdx.x; tok < B * S; tok += gridDim.x) {
        const int b = tok / S, s = tok % S;
        const T *ct = cs + ((size_t)(cb == 1 ? 0 : b) * S + s) * rot;
        const T *st = sn + ((size_t)(cb == 1 ? 0 : b) * S + s) * rot;
        T *base = qkv + (size_t)tok * G * (hpg + 2) * D;
        for (int e = threadIdx.x; e < pairs; e += blockDim.x) {
            const int i = e % half;
            const int hj = e / half;  // g · (hpg + 1) + j, j <= hpg
            const int j = hj % (hpg + 1), g = hj / (hpg + 1);
            T *r = base + (g * (hpg + 2) + j) * D;
            const float x1 = to_f(r[i]), x2 = to_f(r[i + half]);
            const float y1 = round_to<T>(x1 * to_f(ct[i])) + round_to<T>(-x2 * to_f(st[i]));
            const float y2 =
                round_to<T>(x2 * to_f(ct[i + half])) + round_to<T>(x1 * to_f(st[i + half]));
            r[i] = from_f<T>(y1);
            r[i + half] = from_f<T>(y2);
        }
    }
}

template <typename T>
__device__ void rope_qkv_bwd(const T *dq, const T *dk, const T *dv, const T *cs, const T *sn,
                             T *out, int B, int S, int G, int hpg, int D, int rot, int cb,
                             long long qb, long long qs, long long qh, long long kb,
                             long long ks, long long kh, long long vb, long long vs,
                             long long vh) {
    // One block per token (grid-stride over tokens); 32-bit index math within the token.
    const int half = rot / 2;
    const int row = G * (hpg + 2) * D;
    constexpr int VEC = 16 / sizeof(T);
    const bool strides_aligned = (qb | qs | qh | kb | ks | kh | vb | vs | vh) % VEC == 0;
    if (half % VEC == 0 && D % VEC == 0 && strides_aligned && aligned16(dq) && aligned16(dk) &&
        aligned16(dv) && aligned16(cs) && aligned16(sn) && aligned16(out)) {
        const int dvec = D / VEC;
        const int nv = row / VEC;
        for (int tok = blockIdx.x; tok < B * S; tok += gridDim.x) {
            const int b = tok / S, s = tok % S;
            const T *q0 = dq + b * qb + s * qs;
            const T *k0 = dk + b * kb + s * ks;
            const T *v0 = dv + b * vb + s * vs;
            const T *ct = cs + ((size_t)(cb == 1 ? 0 : b) * S + s) * rot;
            const T *st = sn + ((size_t)(cb == 1 ? 0 : b) * S + s) * rot;
            uint4 *o = reinterpret_cast<uint4 *>(out + (size_t)tok * row);
            for (int e = threadIdx.x; e < nv; e += blockDim.x) {
                const int c = (e % dvec) * VEC;
                const int hj = e / dvec;  // g · (hpg + 2) + j
                const int j = hj % (hpg + 2), g = hj / (hpg + 2);
                const T *src;
                if (j < hpg) {
                    src = q0 + (long long)(g * hpg + j) * qh;
                } else if (j == hpg) {
                    src = k0 + (long long)g * kh;
                } else {
                    o[e] = *reinterpret_cast<const uint4 *>(v0 + (long long)g * vh + c);
                    continue;
                }
                if (c >= rot) {
                    o[e] = *reinterpret_cast<const uint4 *>(src + c);
                    continue;
                }
                const bool first = c < half;
                const int p = first ? c + half : c - half;
                float xv[VEC], xq[VEC], cv[VEC], sp[VEC];
                load_vec(src + c, xv);
                load_vec(src + p, xq);
                load_vec(ct + c, cv);
                load_vec(st + p, sp);
                Vec16<T> r;
#pragma unroll
                for (int k = 0; k < VEC; ++k)
                    r.v[k] = from_f<T>(first ? xv[k] * cv[k] + xq[k] * sp[k]
                                             : xv[k] * cv[k] - xq[k] * sp[k]);
                o[e] = r.raw;
            }
        }
        return;
    }
    for (int tok = blockIdx.x; tok < B * S; tok += gridDim.x) {
        const int b = tok / S, s = tok % S;
        const T *q0 = dq + b * qb + s * qs;
        const T *k0 = dk + b * kb + s * ks;
        const T *v0 = dv + b * vb + s * vs;
        const T *ct = cs + ((size_t)(cb == 1 ? 0 : b) * S + s) * rot;
        const T *st = sn + ((size_t)(cb == 1 ? 0 : b) * S + s) * rot;
        T *o = out + (size_t)tok * row;
        for (int e = threadIdx.x; e < row; e += blockDim.x) {
            const int c = e % D;
            const int hj = e / D;  // g · (hpg + 2) + j
            const int j = hj % (hpg + 2), g = hj / (hpg + 2);
            const T *src;
            if (j < hpg) {
                src = q0 + (long long)(g * hpg + j) * qh;
            } else if (j == hpg) {
                src = k0 + (long long)g * kh;
            } else {
                o[e] = v0[(long long)g * vh + c];
                continue;
            }
            if (c >= rot) {
                o[e] = src[c];
                continue;
            }
            const int p = c < half ? c + half : c - half;
            const float xv = to_f(src[c]), xq = to_f(src[p]);
            const float sp = to_f(st[p]);
            const float r = c < half ? xv * to_f(ct[c]) + xq * sp : xv * to_f(ct[c]) - xq * sp;
            o[e] = from_f<T>(r);
        }
    }
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
