// One Adam/AdamW step of one parameter in one pass: f32 master, both moments, and the model's
// copy (bf16/f16, or the f32 parameter itself) updated together. Operation order and rounding
// are those of `train::optimizer::adam_update` (torch `_single_tensor_adam`); the _rn
// intrinsics stop nvcc from fusing into FMAs so the f32 results equal the CPU path's.
#include "common.cuh"

struct AdamArgs {
    float lr_wd_keep;   // 1 − lr·wd (decoupled)
    float wd;           // L2 coefficient (coupled)
    float one_m_beta1;  // 1 − β1
    float beta2;
    float one_m_beta2;  // 1 − β2
    float inv_bc2_sqrt; // 1 / sqrt(1 − β2^t)
    float eps;
    float neg_step;     // −lr / (1 − β1^t)
    int mode;           // 0: no weight decay, 1: decoupled, 2: coupled L2
    int has_grad;       // 0: the parameter got no gradient (treated as zeros)
    float grad_scale;   // the gradient is multiplied by this first (clipping / loss scale)
};

__device__ __forceinline__ float adam_element(float &master, float &m, float &v, float g,
                                              const AdamArgs &a) {
    float p = master;
    float gr = a.has_grad ? __fmul_rn(g, a.grad_scale) : 0.f;
    if (a.mode == 1) p = __fmul_rn(p, a.lr_wd_keep);
    if (a.mode == 2) gr = __fadd_rn(gr, __fmul_rn(p, a.wd));
    const float mo = m;
    const float mn = __fadd_rn(mo, __fmul_rn(__fsub_rn(gr, mo), a.one_m_beta1));
    const float vn = __fadd_rn(__fmul_rn(v, a.beta2), __fmul_rn(__fmul_rn(gr, gr), a.one_m_beta2));
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vn), a.inv_bc2_sqrt), a.eps);
    p = __fadd_rn(p, __fdiv_rn(__fmul_rn(mn, a.neg_step), denom));
    m = mn;
    v = vn;
    master = p;
    return p;
}

// W elements per thread and step: 4 (16-byte loads of the f32 buffers) when every buffer is
// 16-byte aligned, else 1. The step reads ~26 bytes per element, so it runs at memory
// bandwidth only with wide loads.
// G: the gradient's type, f32 or (bf16 main grads) the parameter's own. M: the moments' type,
// f32 or bf16 (the precision-aware optimizer's `exp_avg_dtype`): a bf16 moment is read into
// f32, the step uses the new f32 value, and the stored value is rounded to nearest even.
template <typename P, typename G, typename M, int W>
__device__ void adam_impl(float *master, M *m, M *v, const G *g, P *param, size_t n,
                          AdamArgs a) {
    const size_t vectors = n / W;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < vectors;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t e = i * W;
        float pw[W], mw[W], vw[W], gw[W];
        load_w<float, W>(master + e, pw);
        load_w<M, W>(m + e, mw);
        load_w<M, W>(v + e, vw);
        if (a.has_grad) load_w<G, W>(g + e, gw);
#pragma unroll
        for (int k = 0; k < W; ++k) adam_element(pw[k], mw[k], vw[k], a.has_grad ? gw[k] : 0.f, a);
        store_w<float, W>(master + e, pw);
        store_w<M, W>(m + e, mw);
        store_w<M, W>(v + e, vw);
        if (param != nullptr) store_w<P, W>(param + e, pw);
    }
    for (size_t i = vectors * W + (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float mi = to_f(m[i]), vi = to_f(v[i]);
        const float p = adam_element(master[i], mi, vi, a.has_grad ? to_f(g[i]) : 0.f, a);
        m[i] = from_f<M>(mi);
        v[i] = from_f<M>(vi);
        if (param != nullptr) param[i] = from_f<P>(p);
    }
}

// Whether the 4-wide path may access `p` (4 elements of `bytes` each).
__device__ __forceinline__ bool aligned4(const void *p, size_t bytes) {
    return ((unsigned long long)p % (4 * bytes)) == 0;
}

// `param` may be null (f32 parameters are their own master). The gradient is f32 (`adamw_T`)
// or T (`adamw_T_tgrad`, half precision only); the moments f32, or bf16 (`..._m16`). The
// 4-wide path needs every buffer aligned to 4 of its elements.
#define ADAM_GM(NAME, T, G, M)                                                                  \
    extern "C" __global__ void NAME(float *master, M *m, M *v, const G *g, T *param,           \
                                    unsigned long long n, AdamArgs a) {                         \
        if (aligned16(master) && aligned4(m, sizeof(M)) && aligned4(v, sizeof(M)) &&            \
            aligned4(g, sizeof(G)) && (param == nullptr || aligned4(param, sizeof(T))))         \
            adam_impl<T, G, M, 4>(master, m, v, g, param, n, a);                                \
        else                                                                                    \
            adam_impl<T, G, M, 1>(master, m, v, g, param, n, a);                                \
    }
#define ADAM_G(NAME, T, G)                                                                      \
    ADAM_GM(NAME, T, G, float)                                                                  \
    ADAM_GM(NAME##_m16, T, G, __nv_bfloat16)
#define ADAM(NAME, T) ADAM_G(adamw_##NAME, T, float)
INSTANTIATE3(ADAM)
ADAM_G(adamw_bf16_tgrad, __nv_bfloat16, __nv_bfloat16)
ADAM_G(adamw_f16_tgrad, __half, __half)
// An f32 master with a bf16 gradient and no parameter copy (an FP8 primary weight's master,
// cast to FP8 after the step): the gradient is widened as it is read.
ADAM_G(adamw_f32_bgrad, float, __nv_bfloat16)

// ---- optimizer.store_param_remainders (Transformer Engine's FusedAdam layout) ----
// The f32 master is not stored: its high 16 bits are the bf16 parameter and its low 16 bits a
// signed remainder. The parameter is the master's high half rounded half away from zero: a
// negative remainder (low half ≥ 0x8000) means the high half was rounded up by one, which the
// merge undoes. Master bits = (hi << 16) + sign_extend(rem), exactly, for every f32.

__device__ __forceinline__ float merge_master(unsigned short hi, short rem) {
    return __uint_as_float(((unsigned)hi << 16) + (unsigned)(int)rem);
}

__device__ __forceinline__ void split_master(float p, unsigned short &hi, short &rem) {
    const unsigned bits = __float_as_uint(p);
    rem = (short)(bits & 0xffffu);
    hi = (unsigned short)((bits >> 16) + (rem < 0 ? 1u : 0u));
}

__device__ __forceinline__ void adam_rem_element(unsigned short &hi, short &rem, float &m,
                                                 float &v, float g, const AdamArgs &a) {
    float p = merge_master(hi, rem);
    adam_element(p, m, v, g, a);
    split_master(p, hi, rem);
}

// VEC: 4 elements per access (8-byte parameter and remainder loads, 4 moments each).
template <typename G, typename M, bool VEC>
__device__ void adam_rem_impl(short *rem, M *m, M *v, const G *g, unsigned short *param,
                              size_t n, AdamArgs a) {
    constexpr int W = VEC ? 4 : 1;
    const size_t vectors = n / W;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < vectors;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t e = i * W;
        unsigned short hw[W];
        short rw[W];
        float mw[W], vw[W], gw[W];
        if constexpr (VEC) {
            const ushort4 h = *reinterpret_cast<const ushort4 *>(param + e);
            const short4 r = *reinterpret_cast<const short4 *>(rem + e);
            hw[0] = h.x, hw[1] = h.y, hw[2] = h.z, hw[3] = h.w;
            rw[0] = r.x, rw[1] = r.y, rw[2] = r.z, rw[3] = r.w;
        } else {
            hw[0] = param[e];
            rw[0] = rem[e];
        }
        load_w<M, W>(m + e, mw);
        load_w<M, W>(v + e, vw);
        if (a.has_grad) load_w<G, W>(g + e, gw);
#pragma unroll
        for (int k = 0; k < W; ++k)
            adam_rem_element(hw[k], rw[k], mw[k], vw[k], a.has_grad ? gw[k] : 0.f, a);
        if constexpr (VEC) {
            *reinterpret_cast<ushort4 *>(param + e) = make_ushort4(hw[0], hw[1], hw[2], hw[3]);
            *reinterpret_cast<short4 *>(rem + e) = make_short4(rw[0], rw[1], rw[2], rw[3]);
        } else {
            param[e] = hw[0];
            rem[e] = rw[0];
        }
        store_w<M, W>(m + e, mw);
        store_w<M, W>(v + e, vw);
    }
    for (size_t i = vectors * W + (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float mi = to_f(m[i]), vi = to_f(v[i]);
        adam_rem_element(param[i], rem[i], mi, vi, a.has_grad ? to_f(g[i]) : 0.f, a);
        m[i] = from_f<M>(mi);
        v[i] = from_f<M>(vi);
    }
}

// `param`: the bf16 parameter's bits; the gradient is f32 or bf16 (`_tgrad`).
#define ADAM_REM_M(NAME, G, M)                                                                  \
    extern "C" __global__ void NAME(short *rem, M *m, M *v, const G *g, unsigned short *param,  \
                                    unsigned long long n, AdamArgs a) {                         \
        if (aligned4(m, sizeof(M)) && aligned4(v, sizeof(M)) && aligned4(rem, 2) &&             \
            aligned4(param, 2) && aligned4(g, sizeof(G)))                                       \
            adam_rem_impl<G, M, true>(rem, m, v, g, param, n, a);                               \
        else                                                                                    \
            adam_rem_impl<G, M, false>(rem, m, v, g, param, n, a);                              \
    }
#define ADAM_REM(NAME, G)                                                                       \
    ADAM_REM_M(NAME, G, float)                                                                  \
    ADAM_REM_M(NAME##_m16, G, __nv_bfloat16)
ADAM_REM(adamw_bf16_rem, float)
ADAM_REM(adamw_bf16_rem_tgrad, __nv_bfloat16)

// The f32 masters of n parameters (checkpoints, the unfused update path).
extern "C" __global__ void remainder_merge(const unsigned short *hi, const short *rem,
                                           float *master, unsigned long long n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        master[i] = merge_master(hi[i], rem[i]);
}

// A checkpoint's f32 masters into parameter bits and remainders.
extern "C" __global__ void remainder_split(const float *master, unsigned short *hi, short *rem,
                                           unsigned long long n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        split_master(master[i], hi[i], rem[i]);
}
