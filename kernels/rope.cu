// Rotary embedding, non-interleaved ("rotate half") on the first `rot` channels of
// x [B, H, S, D] (any strides), cos/sin [CB, 1, S, rot] contiguous with CB = 1 or B;
// output contiguous [B, H, S, D]. Matches `ops::rope::apply_rope`:
//   out[i]       = round(round(x[i]·cos[i]) + round(−x[i+h]·sin[i]))      i < h = rot/2
//   out[i+h]     = round(round(x[i+h]·cos[i+h]) + round(x[i]·sin[i+h]))
// inverse = 1 applies the transpose (the backward): dx[i] = dy[i]·cos[i] + dy[i+h]·sin[i+h],
// dx[i+h] = dy[i+h]·cos[i+h] − dy[i]·sin[i], rounded once.
#include "common.cuh"

template <typename T>
__device__ void rope_impl(const T *x, const T *cs, const T *sn, T *out, int B, int H, int S,
                          int D, int rot, int cb, long long sb, long long sh, long long ss,
                          long long sd, int inverse) {
    const size_t n = (size_t)B * H * S * D;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (size_t)gridDim.x * blockDim.x) {
        const int d = idx % D;
        const int s = (idx / D) % S;
        const int h = (idx / ((size_t)D * S)) % H;
        const int b = idx / ((size_t)D * S * H);
        const T *xp = x + b * sb + h * sh + s * ss;
        if (d >= rot) {
            out[idx] = xp[d * sd];
            continue;
        }
        const int half = rot / 2;
        const size_t t = ((size_t)(cb == 1 ? 0 : b) * S + s) * rot;
        const int p = d < half ? d + half : d - half;  // partner channel
        const float xv = to_f(xp[d * sd]), xq = to_f(xp[p * sd]);
        const float c = to_f(cs[t + d]);
        float r;
        if (!inverse) {
            const float rot_term = d < half ? -xq : xq;
            r = round_to<T>(xv * c) + round_to<T>(rot_term * to_f(sn[t + d]));
        } else {
            const float sp = to_f(sn[t + p]);
            r = d < half ? xv * c + xq * sp : xv * c - xq * sp;
        }
        out[idx] = from_f<T>(r);
    }
}

#define ROPE(NAME, T)                                                                           \
    extern "C" __global__ void rope_##NAME(const T *x, const T *cs, const T *sn, T *out, int B, \
                                           int H, int S, int D, int rot, int cb, long long sb,  \
                                           long long sh, long long ss, long long sd,            \
                                           int inverse) {                                       \
        rope_impl<T>(x, cs, sn, out, B, H, S, D, rot, cb, sb, sh, ss, sd, inverse);             \
    }
INSTANTIATE3(ROPE)
