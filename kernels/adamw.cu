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

template <typename P>
__device__ void adam_impl(float *master, float *m, float *v, const float *g, P *param, size_t n,
                          AdamArgs a) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float p = master[i];
        float gr = a.has_grad ? __fmul_rn(g[i], a.grad_scale) : 0.f;
        if (a.mode == 1) p = __fmul_rn(p, a.lr_wd_keep);
        if (a.mode == 2) gr = __fadd_rn(gr, __fmul_rn(p, a.wd));
        const float mo = m[i];
        const float mn = __fadd_rn(mo, __fmul_rn(__fsub_rn(gr, mo), a.one_m_beta1));
        const float vn = __fadd_rn(__fmul_rn(v[i], a.beta2), __fmul_rn(__fmul_rn(gr, gr), a.one_m_beta2));
        const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vn), a.inv_bc2_sqrt), a.eps);
        p = __fadd_rn(p, __fdiv_rn(__fmul_rn(mn, a.neg_step), denom));
        m[i] = mn;
        v[i] = vn;
        master[i] = p;
        if (param != nullptr) param[i] = from_f<P>(p);
    }
}

// `param` may be null (f32 parameters are their own master).
#define ADAM(NAME, T)                                                                           \
    extern "C" __global__ void adamw_##NAME(float *master, float *m, float *v, const float *g,  \
                                            T *param, unsigned long long n, AdamArgs a) {       \
        adam_impl<T>(master, m, v, g, param, n, a);                                             \
    }
INSTANTIATE3(ADAM)
