// Fused causal / sliding-window grouped-query attention, forward and backward
// (FlashAttention-2 algorithm) for bf16 / f16 with fp32 accumulation.
//
// Semantics match `ops::attention` + `build_attention_mask` (src/ops/attention.rs):
//   query row i (absolute position i + sk - sq) may attend key j iff
//   j <= i + sk - sq (when causal) and i + sk - sq - j <= window_left (when window_left >= 0).
//   Query head h reads kv group h / (heads / groups) (heads are group-major, as in Megatron).
// With cu_seqlens (packed THD batches) grid.z walks the sequences; every sequence attends
// only to itself and batch strides are ignored (one packed row).
//
// Tensor cores: mma.sync m16n8k16 (fp32 accumulate) fed by ldmatrix from XOR-swizzled
// shared memory, global->shared with cp.async. Tiles (BM query rows x BN key rows):
//   forward: BM=128, BN=64, 4 warps, each warp owns 32 query rows (two m16 tiles) so every
//            K/V fragment read from shared memory feeds two MMAs.
//   backward: one block per BN=16*WARPS key rows; it walks all query blocks of all heads of
//            the kv group, accumulating dK/dV in registers (the GQA sum needs no atomics);
//            dQ is accumulated in fp32 with atomics and converted in a last pass.
// The per-row logsumexp is kept in the log2 domain of the scaled scores:
//   lse2 = max_j(s_ij) * scale * log2(e) + log2(sum_j exp2(s_ij * scale * log2(e) - max)).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

struct FlashParams;
struct FlashParams {
  const void* q;
  const void* k;
  const void* v;
  const void* o;      // forward: output; backward: forward output O (input)
  const void* dout;   // backward only: dO
  void* dq;           // forward: unused; backward: dQ (T, strided like dq_* and dq_gs)
  void* dk;           // backward: dK [b, groups, sk, d] with dk_* strides
  void* dv;           // backward: dV, dv_* strides equal dk_*
  float* lse;         // [b, heads, sq] (varlen: [heads, total]) log2-domain logsumexp
  float* dsum;        // backward: rowsum(dO * O), same layout as lse
  float* dq_accum;    // backward: fp32 dQ accumulator, contiguous [b, heads, sq, d]
  const int* cu_seqlens;  // null, or [nseq + 1] token offsets (varlen)
  float* dkv_accum;   // backward with split_heads: fp32 [2][b, groups, sk, d] (dK then dV)
  long long q_bs, q_hs, q_ss;
  long long k_bs, k_hs, k_ss;
  long long v_bs, v_hs, v_ss;
  long long o_bs, o_hs, o_ss;
  long long do_bs, do_hs, do_ss;
  long long dq_bs, dq_hs, dq_ss;
  long long dk_bs, dk_hs, dk_ss;
  // Stride between q's kv groups: query head h sits at (h / hpg)·q_gs + (h % hpg)·q_hs, so q
  // can be read in place from the fused QKV buffer ([groups, hpg + 2, d] per token), whose
  // heads are not evenly spaced. Equals hpg·q_hs for an ordinary [b, heads, s, d] view.
  long long q_gs;
  // The same for dQ, which the backward can write straight into a fused dQKV buffer.
  long long dq_gs;
  int batch;  // grid.z: batch rows, or sequences with cu_seqlens
  int heads;
  int groups;
  int sq;     // per-row query length (varlen: total tokens)
  int sk;
  int causal;
  int window_left;  // < 0: unlimited
  int split_heads;  // backward: one block per query head (GQA), dK/dV summed with atomics
  float scale_log2; // softmax_scale * log2(e)
  float scale;      // softmax_scale
};

static_assert(sizeof(FlashParams) == 328, "FlashParams layout is mirrored in flash_attn.rs");

namespace fa {

// Element offset of query head h within one batch row (see FlashParams::q_gs).
__device__ __forceinline__ long long q_head_offset(const FlashParams& p, int h) {
  const int hpg = p.heads / p.groups;
  return (long long)(h / hpg) * p.q_gs + (long long)(h % hpg) * p.q_hs;
}

// Element offset of dQ's head h within one batch row (see FlashParams::dq_gs).
__device__ __forceinline__ long long dq_head_offset(const FlashParams& p, int h) {
  const int hpg = p.heads / p.groups;
  return (long long)(h / hpg) * p.dq_gs + (long long)(h % hpg) * p.dq_hs;
}

template <typename T> struct Vec2;
template <> struct Vec2<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    __nv_bfloat162 v = *reinterpret_cast<__nv_bfloat162*>(&u);
    return __bfloat1622float2(v);
  }
};
template <> struct Vec2<__half> {
  using type = __half2;
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    __half2 v = *reinterpret_cast<__half2*>(&u);
    return __half22float2(v);
  }
};

template <typename T>
__device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0,
                                                   uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma<__half>(float* c, const uint32_t* a, uint32_t b0,
                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// exp2 as the single MUFU instruction (no denormal/range fix-ups): arguments are
// max-subtracted scores, so results lie in [0, 1]; exp2(-inf) = 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void ldsm4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm4t(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte global->shared copy; src_bytes = 0 zero-fills (rows past the sequence end).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
// 4-byte global->shared copy (cp.async's .ca form; .cg takes 16 bytes only).
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Element offset of (row, 16-byte chunk) in a [rows][COLS] tile whose chunks are XOR-swizzled
// with the row so that ldmatrix's 8 row reads of one chunk column hit 8 different bank groups.
template <int COLS>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * COLS + ((chunk ^ (row & 7)) << 3);
}

// Copies rows [row0, row0+ROWS) of a strided [seq][D] matrix into a swizzled shared tile;
// rows at or past `nrows` become zeros.
template <int ROWS, int D, int NTHREADS, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* g, long long stride, int row0,
                                          int nrows, int tid) {
  constexpr int CH = D / 8;
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
#pragma unroll
  for (int i = tid; i < ROWS * CH; i += NTHREADS) {
    const int r = i / CH, c = i % CH;
    const int gr = row0 + r;
    const bool ok = gr < nrows;
    const T* src = ok ? g + (long long)gr * stride + c * 8 : g;
    cp_async16(base + swz<D>(r, c) * 2, src, ok ? 16 : 0);
  }
}

// The backward's per-row statistics (logsumexp, dsum) of query rows [i0, i0 + BM) into shared
// memory. cp.async, like the tiles, so the warps that fetch them do not stall on global loads
// every step (plain loads put their latency in front of the block's next barrier). Rows past
// the sequence end get lse = +inf, making P = 0, so they contribute nothing.
template <int BM, int NT>
__device__ __forceinline__ void load_row_stats(float* s_lse, float* s_dsum, const float* lse,
                                               const float* dsum, int i0, int sq, int tid) {
  for (int r = tid; r < BM; r += NT) {
    if (i0 + r < sq) {
      cp_async4(s_lse + r, lse + i0 + r);
      cp_async4(s_dsum + r, dsum + i0 + r);
    } else {
      s_lse[r] = INFINITY;
      s_dsum[r] = 0.f;
    }
  }
}

struct Seq {
  int b;       // batch index for strides (0 with varlen)
  int q0, k0;  // first query / key token of this sequence
  int sq, sk;  // lengths
};

__device__ __forceinline__ Seq seq_info(const FlashParams& p, int z) {
  Seq s;
  if (p.cu_seqlens != nullptr) {
    const int a = p.cu_seqlens[z], e = p.cu_seqlens[z + 1];
    s.b = 0;
    s.q0 = a;
    s.k0 = a;
    s.sq = e - a;
    s.sk = e - a;
  } else {
    s.b = z;
    s.q0 = 0;
    s.k0 = 0;
    s.sq = p.sq;
    s.sk = p.sk;
  }
  return s;
}

__device__ __forceinline__ bool allowed(const FlashParams& p, int qabs, int k, int sk) {
  if (k >= sk) return false;
  if (p.causal && k > qabs) return false;
  if (p.window_left >= 0 && qabs - k > p.window_left) return false;
  return true;
}

// A backward block's work: one block per kv group walking all its query heads (dK/dV stay in
// registers), or, with split_heads, one block per query head (more parallelism) adding into
// fp32 dK/dV; and the query blocks of BM rows that can see a key of [n0, n0 + BN).
struct BwdWork {
  int g;        // kv group
  int h_first;  // first query head walked
  int m_begin;  // first query row of the first query block
  int n_m;      // query blocks per head
  int n_it;     // steps: n_m per head walked
};

template <int BN, int BM>
__device__ __forceinline__ BwdWork bwd_work(const FlashParams& p, const Seq& sq, int n0) {
  const int hpg = p.heads / p.groups;
  BwdWork w;
  w.g = p.split_heads ? blockIdx.y / hpg : blockIdx.y;
  w.h_first = p.split_heads ? blockIdx.y : w.g * hpg;
  const int nh = p.split_heads ? 1 : hpg;
  const int offset = sq.sk - sq.sq;
  int m_begin = 0, m_end = sq.sq;
  if (p.causal) m_begin = max(0, n0 - offset) / BM * BM;
  if (p.window_left >= 0) m_end = min(m_end, n0 + BN + p.window_left - offset);
  w.m_begin = m_begin;
  w.n_m = m_end > m_begin ? (m_end - m_begin + BM - 1) / BM : 0;
  w.n_it = w.n_m * nh;
  return w;
}

// Tag for the two instantiations of a backward tile's probability pass: tiles wholly inside
// the causal / window band and the key range (Masked<false>) skip the per-element test. A
// single pass with the test in it makes the compiler branch around every exp2, which
// serializes the exponentials (H100: the d=64 backward spent most of its time there).
template <bool B>
struct Masked {
  static constexpr bool value = B;
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename T, int D, int BN, int MT>
__device__ __forceinline__ void fwd_kernel(const FlashParams& p) {
  // MT m16 row tiles per warp: 2 reuses every K/V fragment twice, 1 halves registers.
  constexpr int BM = 128, WARPS = BM / (16 * MT), NT = WARPS * 32;
  constexpr int NTILE_N = BN / 8, NTILE_D = D / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;
  T* sV = sK + BN * D;
  const uint32_t aQ = static_cast<uint32_t>(__cvta_generic_to_shared(sQ));
  const uint32_t aK = static_cast<uint32_t>(__cvta_generic_to_shared(sK));
  const uint32_t aV = static_cast<uint32_t>(__cvta_generic_to_shared(sV));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const Seq sq = seq_info(p, blockIdx.z);
  // Heaviest (last) query blocks first: better tail balance under causal masking.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int m0 = m_block * BM;
  if (m0 >= sq.sq) return;
  const int h = blockIdx.y;
  const int g = h / (p.heads / p.groups);
  const int offset = sq.sk - sq.sq;  // bottom-right aligned causal diagonal

  const T* q = static_cast<const T*>(p.q) + sq.b * p.q_bs + q_head_offset(p, h) + (long long)sq.q0 * p.q_ss;
  const T* k = static_cast<const T*>(p.k) + sq.b * p.k_bs + g * p.k_hs + (long long)sq.k0 * p.k_ss;
  const T* v = static_cast<const T*>(p.v) + sq.b * p.v_bs + g * p.v_hs + (long long)sq.k0 * p.v_ss;
  T* o = const_cast<T*>(static_cast<const T*>(p.o)) + sq.b * p.o_bs + h * p.o_hs +
         (long long)sq.q0 * p.o_ss;

  int n_end = sq.sk;
  if (p.causal) n_end = min(n_end, m0 + BM + offset);
  int n_begin = 0;
  if (p.window_left >= 0) n_begin = max(0, m0 + offset - p.window_left) / BN * BN;

  float acc_o[MT][NTILE_D][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < NTILE_D; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][j][e] = 0.f;
  float row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      row_max[mt][hh] = -INFINITY;
      row_sum[mt][hh] = 0.f;
    }

  load_tile<BM, D, NT>(sQ, q, p.q_ss, m0, sq.sq, tid);
  if (n_begin < n_end) load_tile<BN, D, NT>(sK, k, p.k_ss, n_begin, sq.sk, tid);
  cp_commit();

  for (int n0 = n_begin; n0 < n_end; n0 += BN) {
    cp_wait<0>();
    __syncthreads();  // K(n0) landed; every warp finished reading V of the previous block
    load_tile<BN, D, NT>(sV, v, p.v_ss, n0, sq.sk, tid);
    cp_commit();

    float s[MT][NTILE_N][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < NTILE_N; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][j][e] = 0.f;

#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldsm4(a[mt], aQ + 2 * swz<D>(warp * 16 * MT + mt * 16 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
      for (int j2 = 0; j2 < BN / 16; ++j2) {
        uint32_t b[4];
        ldsm4(b, aK + 2 * swz<D>(j2 * 16 + ((lane >> 4) << 3) + (lane & 7),
                                 kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma<T>(s[mt][2 * j2], a[mt], b[0], b[1]);
          mma<T>(s[mt][2 * j2 + 1], a[mt], b[2], b[3]);
        }
      }
    }

    const bool need_mask = (n0 + BN > sq.sk) || (p.causal && n0 + BN - 1 > m0 + offset) ||
                           (p.window_left >= 0 && m0 + BM - 1 + offset - n0 > p.window_left);
    if (need_mask) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < NTILE_N; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = m0 + warp * 16 * MT + mt * 16 + (lane >> 2) + ((e >> 1) << 3);
            const int col = n0 + j * 8 + (lane & 3) * 2 + (e & 1);
            if (!allowed(p, row + offset, col, sq.sk)) s[mt][j][e] = -INFINITY;
          }
    }

    // Online softmax: rescale the running output by exp2(old_max - new_max).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float mx = row_max[mt][hh];
#pragma unroll
        for (int j = 0; j < NTILE_N; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * hh], s[mt][j][2 * hh + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        // A row with no allowed key so far keeps max -inf; use 0 so exp2 gives 0, not NaN.
        const float m_scaled = mx == -INFINITY ? 0.f : mx * p.scale_log2;
        const float corr = fast_exp2(row_max[mt][hh] * p.scale_log2 - m_scaled);
        row_max[mt][hh] = mx;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < NTILE_N; ++j) {
          const float e0 = fast_exp2(s[mt][j][2 * hh] * p.scale_log2 - m_scaled);
          const float e1 = fast_exp2(s[mt][j][2 * hh + 1] * p.scale_log2 - m_scaled);
          s[mt][j][2 * hh] = e0;
          s[mt][j][2 * hh + 1] = e1;
          sum += e0 + e1;
        }
        row_sum[mt][hh] = row_sum[mt][hh] * corr + sum;
#pragma unroll
        for (int j = 0; j < NTILE_D; ++j) {
          acc_o[mt][j][2 * hh] *= corr;
          acc_o[mt][j][2 * hh + 1] *= corr;
        }
      }

    cp_wait<0>();
    __syncthreads();  // V(n0) landed; every warp finished reading K(n0)
    if (n0 + BN < n_end) {
      load_tile<BN, D, NT>(sK, k, p.k_ss, n0 + BN, sq.sk, tid);
      cp_commit();
    }

#pragma unroll
    for (int kt = 0; kt < BN / 16; ++kt) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = Vec2<T>::pack(s[mt][2 * kt][0], s[mt][2 * kt][1]);
        a[mt][1] = Vec2<T>::pack(s[mt][2 * kt][2], s[mt][2 * kt][3]);
        a[mt][2] = Vec2<T>::pack(s[mt][2 * kt + 1][0], s[mt][2 * kt + 1][1]);
        a[mt][3] = Vec2<T>::pack(s[mt][2 * kt + 1][2], s[mt][2 * kt + 1][3]);
      }
#pragma unroll
      for (int d2 = 0; d2 < D / 16; ++d2) {
        uint32_t b[4];
        ldsm4t(b, aV + 2 * swz<D>(kt * 16 + (lane & 15), d2 * 2 + (lane >> 4)));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma<T>(acc_o[mt][2 * d2], a[mt], b[0], b[1]);
          mma<T>(acc_o[mt][2 * d2 + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }

  cp_wait<0>();  // nothing may be in flight at exit (e.g. a block with no visible key)
  // Normalize, write O and the log2-domain logsumexp.
  float* lse = p.lse + ((long long)sq.b * p.heads + h) * p.sq + sq.q0;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float l = row_sum[mt][hh];
      l += __shfl_xor_sync(0xffffffff, l, 1);
      l += __shfl_xor_sync(0xffffffff, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int row = m0 + warp * 16 * MT + mt * 16 + (lane >> 2) + hh * 8;
      if (row < sq.sq) {
        T* orow = o + (long long)row * p.o_ss;
#pragma unroll
        for (int j = 0; j < NTILE_D; ++j) {
          const uint32_t pk = Vec2<T>::pack(acc_o[mt][j][2 * hh] * inv, acc_o[mt][j][2 * hh + 1] * inv);
          *reinterpret_cast<uint32_t*>(orow + j * 8 + (lane & 3) * 2) = pk;
        }
        if ((lane & 3) == 0) {
          const float mx = row_max[mt][hh];
          lse[row] = (mx == -INFINITY || l <= 0.f) ? INFINITY : mx * p.scale_log2 + log2f(l);
        }
      }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// The backward's elementwise passes (the dO·O row sums before it, the f32 dQ and dK/dV
// accumulators converted to T after it) run on a (rows, head, batch) grid: no thread divides
// by a run-time size. With a flat index split by 64-bit divisions these passes were bound by
// the divisions (about 1.2 TB/s on an H200, whatever the width of their accesses).
// Threads per block of these passes, and the pairs of elements each converts.
constexpr int ELEM_THREADS = 256, ELEM_PAIRS = 4;
// Rows of one block of the dQ / dK,dV conversion (the host mirrors it).
template <int D>
constexpr int conv_rows() {
  return ELEM_THREADS * ELEM_PAIRS / (D / 2);
}
// Rows of one warp (and of a block: 8 warps) of the dO·O pass.
constexpr int DOT_ROWS_PER_WARP = 4;

// dsum[b, h, row] = sum_d dO[row, d] * O[row, d] (fp32); grid (sq / 32, heads, batch), one
// warp per 4 rows (their loads issued together).
template <typename T, int D>
__device__ __forceinline__ void bwd_dot_kernel(const FlashParams& p) {
  const int lane = threadIdx.x & 31;
  const int h = blockIdx.y, b = blockIdx.z;
  const int row0 = (blockIdx.x * (ELEM_THREADS / 32) + (threadIdx.x >> 5)) * DOT_ROWS_PER_WARP;
  float acc[DOT_ROWS_PER_WARP];
#pragma unroll
  for (int k = 0; k < DOT_ROWS_PER_WARP; ++k) {
    acc[k] = 0.f;
    const int row = row0 + k;
    if (row >= p.sq) continue;
    const T* o = static_cast<const T*>(p.o) + b * p.o_bs + h * p.o_hs + (long long)row * p.o_ss;
    const T* d = static_cast<const T*>(p.dout) + b * p.do_bs + h * p.do_hs + (long long)row * p.do_ss;
#pragma unroll
    for (int c = lane * 2; c < D; c += 64) {
      const float2 x = Vec2<T>::unpack(*reinterpret_cast<const uint32_t*>(o + c));
      const float2 y = Vec2<T>::unpack(*reinterpret_cast<const uint32_t*>(d + c));
      acc[k] += x.x * y.x + x.y * y.y;
    }
  }
#pragma unroll
  for (int k = 0; k < DOT_ROWS_PER_WARP; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[k] += __shfl_xor_sync(0xffffffff, acc[k], off);
    if (lane == 0 && row0 + k < p.sq) p.dsum[((long long)b * p.heads + h) * p.sq + row0 + k] = acc[k];
  }
}

// This block's rows [blockIdx.x * conv_rows, + conv_rows) of an f32 [nrows][D] accumulator,
// times `scale`, converted to T rows `dst_ss` elements apart; ELEM_PAIRS pairs per thread.
template <typename T, int D>
__device__ __forceinline__ void convert_rows(const float* acc, T* dst, long long dst_ss,
                                             int nrows, float scale) {
#pragma unroll
  for (int k = 0; k < ELEM_PAIRS; ++k) {
    const int i = k * ELEM_THREADS + threadIdx.x;
    const int row = blockIdx.x * conv_rows<D>() + i / (D / 2), c = (i % (D / 2)) * 2;
    if (row < nrows) {
      const float2 a = *reinterpret_cast<const float2*>(acc + (long long)row * D + c);
      *reinterpret_cast<uint32_t*>(dst + (long long)row * dst_ss + c) =
          Vec2<T>::pack(a.x * scale, a.y * scale);
    }
  }
}

// dQ = scale * dq_accum, converted to T with dq_* strides (and dq_gs); grid
// (sq / conv_rows, heads, batch).
template <typename T, int D>
__device__ __forceinline__ void bwd_dq_kernel(const FlashParams& p) {
  const int h = blockIdx.y, b = blockIdx.z;
  const float* acc = p.dq_accum + ((long long)b * p.heads + h) * p.sq * D;
  T* dq = static_cast<T*>(p.dq) + b * p.dq_bs + dq_head_offset(p, h);
  convert_rows<T, D>(acc, dq, p.dq_ss, p.sq, p.scale);
}

__device__ __forceinline__ void atomic_add2(float* addr, float a, float b) {
#if __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(addr), make_float2(a, b));
#else
  atomicAdd(addr, a);
  atomicAdd(addr + 1, b);
#endif
}

template <typename T, int D, int WARPS>
__device__ __forceinline__ void bwd_kernel(const FlashParams& p) {
  constexpr int BN = 16 * WARPS, BM = 64, NT = WARPS * 32;
  constexpr int NTILE_M = BM / 8, NTILE_D = D / 8;
  // dQ = dS K is split over the warps: BM/16 row tiles x DSPLIT column ranges.
  constexpr int DSPLIT = WARPS / (BM / 16);
  constexpr int DQ_COLS = D / DSPLIT;
  static_assert(DSPLIT >= 1 && D % DSPLIT == 0 && DQ_COLS % 16 == 0, "dQ warp split");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * D;
  T* sQ = sV + BN * D;            // [2][BM][D]
  T* sdO = sQ + 2 * BM * D;       // [2][BM][D]
  T* sdS = sdO + 2 * BM * D;      // [BN][BM]: dS^T
  float* sLse = reinterpret_cast<float*>(sdS + BN * BM);  // [2][BM]
  float* sDsum = sLse + 2 * BM;                           // [2][BM]
  const uint32_t aK = static_cast<uint32_t>(__cvta_generic_to_shared(sK));
  const uint32_t aV = static_cast<uint32_t>(__cvta_generic_to_shared(sV));
  const uint32_t aQ0 = static_cast<uint32_t>(__cvta_generic_to_shared(sQ));
  const uint32_t adO0 = static_cast<uint32_t>(__cvta_generic_to_shared(sdO));
  const uint32_t adS = static_cast<uint32_t>(__cvta_generic_to_shared(sdS));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const Seq sq = seq_info(p, blockIdx.z);
  const int n0 = blockIdx.x * BN;
  if (n0 >= sq.sk) return;
  const BwdWork w = bwd_work<BN, BM>(p, sq, n0);
  const int g = w.g, h_first = w.h_first, n_m = w.n_m, n_it = w.n_it, m_begin = w.m_begin;
  const int offset = sq.sk - sq.sq;
  const T* k = static_cast<const T*>(p.k) + sq.b * p.k_bs + g * p.k_hs + (long long)sq.k0 * p.k_ss;
  const T* v = static_cast<const T*>(p.v) + sq.b * p.v_bs + g * p.v_hs + (long long)sq.k0 * p.v_ss;

  float acc_dk[NTILE_D][4], acc_dv[NTILE_D][4];
#pragma unroll
  for (int j = 0; j < NTILE_D; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc_dk[j][e] = 0.f;
      acc_dv[j][e] = 0.f;
    }

  load_tile<BN, D, NT>(sK, k, p.k_ss, n0, sq.sk, tid);
  load_tile<BN, D, NT>(sV, v, p.v_ss, n0, sq.sk, tid);

  // Loads query block `it` (head-major over the group's heads) into buffer it & 1.
  auto prefetch = [&](int it) {
    const int h = h_first + it / n_m;
    const int i0 = m_begin + (it % n_m) * BM;
    const int buf = it & 1;
    const T* q = static_cast<const T*>(p.q) + sq.b * p.q_bs + q_head_offset(p, h) + (long long)sq.q0 * p.q_ss;
    const T* dout =
        static_cast<const T*>(p.dout) + sq.b * p.do_bs + h * p.do_hs + (long long)sq.q0 * p.do_ss;
    load_tile<BM, D, NT>(sQ + buf * BM * D, q, p.q_ss, i0, sq.sq, tid);
    load_tile<BM, D, NT>(sdO + buf * BM * D, dout, p.do_ss, i0, sq.sq, tid);
    const long long lbase = ((long long)sq.b * p.heads + h) * p.sq + sq.q0;
    load_row_stats<BM, NT>(sLse + buf * BM, sDsum + buf * BM, p.lse + lbase, p.dsum + lbase, i0,
                           sq.sq, tid);
  };

  if (n_it > 0) prefetch(0);
  cp_commit();

  for (int it = 0; it < n_it; ++it) {
    if (it + 1 < n_it) {
      prefetch(it + 1);
      cp_commit();
      cp_wait<1>();
    } else {
      cp_wait<0>();
    }
    __syncthreads();
    const int buf = it & 1;
    const int h = h_first + it / n_m;
    const int i0 = m_begin + (it % n_m) * BM;
    const uint32_t aQ = aQ0 + buf * BM * D * 2;
    const uint32_t adO = adO0 + buf * BM * D * 2;
    const float* lse = sLse + buf * BM;
    const float* dsum = sDsum + buf * BM;

    // S^T = K Q^T and dP^T = V dO^T: this warp's 16 key rows x BM query columns.
    float st[NTILE_M][4], dpt[NTILE_M][4];
#pragma unroll
    for (int j = 0; j < NTILE_M; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        st[j][e] = 0.f;
        dpt[j][e] = 0.f;
      }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[4], av[4];
      ldsm4(ak, aK + 2 * swz<D>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
      ldsm4(av, aV + 2 * swz<D>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
      for (int j2 = 0; j2 < BM / 16; ++j2) {
        uint32_t bq[4], bo[4];
        const int r = j2 * 16 + ((lane >> 4) << 3) + (lane & 7);
        const int c = kk * 2 + ((lane >> 3) & 1);
        ldsm4(bq, aQ + 2 * swz<D>(r, c));
        ldsm4(bo, adO + 2 * swz<D>(r, c));
        mma<T>(st[2 * j2], ak, bq[0], bq[1]);
        mma<T>(st[2 * j2 + 1], ak, bq[2], bq[3]);
        mma<T>(dpt[2 * j2], av, bo[0], bo[1]);
        mma<T>(dpt[2 * j2 + 1], av, bo[2], bo[3]);
      }
    }

    // P^T = exp2(S^T * scale_log2 - lse) (0 where masked); dS^T = P^T * (dP^T - dsum).
    // Tiles wholly inside the causal / window band and the key range skip the per-element test.
    const bool need_mask = (n0 + BN > sq.sk) ||
                           (p.causal && n0 + BN - 1 > i0 + offset) ||
                           (p.window_left >= 0 && i0 + BM - 1 + offset - n0 > p.window_left);
    auto probs = [&](auto masked) {
#pragma unroll
      for (int j = 0; j < NTILE_M; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int kr = n0 + warp * 16 + (lane >> 2) + ((e >> 1) << 3);
          const int qc = j * 8 + (lane & 3) * 2 + (e & 1);
          const float x = fast_exp2(st[j][e] * p.scale_log2 - lse[qc]);
          const float pr =
              (!decltype(masked)::value || allowed(p, i0 + qc + offset, kr, sq.sk)) ? x : 0.f;
          st[j][e] = pr;
          dpt[j][e] = pr * (dpt[j][e] - dsum[qc]);
        }
    };
    if (need_mask) {
      probs(Masked<true>{});
    } else {
      probs(Masked<false>{});
    }

    // dV += P^T dO and dK += dS^T Q (scale applied at the end); store dS^T for dQ.
#pragma unroll
    for (int kt = 0; kt < BM / 16; ++kt) {
      uint32_t ap[4], ads[4];
      ap[0] = Vec2<T>::pack(st[2 * kt][0], st[2 * kt][1]);
      ap[1] = Vec2<T>::pack(st[2 * kt][2], st[2 * kt][3]);
      ap[2] = Vec2<T>::pack(st[2 * kt + 1][0], st[2 * kt + 1][1]);
      ap[3] = Vec2<T>::pack(st[2 * kt + 1][2], st[2 * kt + 1][3]);
      ads[0] = Vec2<T>::pack(dpt[2 * kt][0], dpt[2 * kt][1]);
      ads[1] = Vec2<T>::pack(dpt[2 * kt][2], dpt[2 * kt][3]);
      ads[2] = Vec2<T>::pack(dpt[2 * kt + 1][0], dpt[2 * kt + 1][1]);
      ads[3] = Vec2<T>::pack(dpt[2 * kt + 1][2], dpt[2 * kt + 1][3]);
      {
        // dS^T tile [BN][BM]: rows = keys, 16-byte chunks of 8 query columns.
        const int r0 = warp * 16 + (lane >> 2);
        const int cb = (lane & 3) * 2;
        T* base = sdS;
        *reinterpret_cast<uint32_t*>(base + swz<BM>(r0, 2 * kt) + cb) = ads[0];
        *reinterpret_cast<uint32_t*>(base + swz<BM>(r0 + 8, 2 * kt) + cb) = ads[1];
        *reinterpret_cast<uint32_t*>(base + swz<BM>(r0, 2 * kt + 1) + cb) = ads[2];
        *reinterpret_cast<uint32_t*>(base + swz<BM>(r0 + 8, 2 * kt + 1) + cb) = ads[3];
      }
#pragma unroll
      for (int d2 = 0; d2 < D / 16; ++d2) {
        uint32_t bo[4], bq[4];
        ldsm4t(bo, adO + 2 * swz<D>(kt * 16 + (lane & 15), d2 * 2 + (lane >> 4)));
        ldsm4t(bq, aQ + 2 * swz<D>(kt * 16 + (lane & 15), d2 * 2 + (lane >> 4)));
        mma<T>(acc_dv[2 * d2], ap, bo[0], bo[1]);
        mma<T>(acc_dv[2 * d2 + 1], ap, bo[2], bo[3]);
        mma<T>(acc_dk[2 * d2], ads, bq[0], bq[1]);
        mma<T>(acc_dk[2 * d2 + 1], ads, bq[2], bq[3]);
      }
    }
    __syncthreads();  // dS^T complete

    // dQ[i0 + rows] += dS K: warp -> (row tile mt, column range dc).
    {
      const int mt = warp % (BM / 16);
      const int dc = (warp / (BM / 16)) * DQ_COLS;
      float acc[DQ_COLS / 8][4];
#pragma unroll
      for (int j = 0; j < DQ_COLS / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
#pragma unroll
      for (int kt = 0; kt < BN / 16; ++kt) {
        uint32_t a[4];
        // A = dS (rows = queries) read transposed out of dS^T [keys][queries].
        ldsm4t(a, adS + 2 * swz<BM>(kt * 16 + (lane & 7) + ((lane >> 4) << 3),
                                    mt * 2 + ((lane >> 3) & 1)));
#pragma unroll
        for (int d2 = 0; d2 < DQ_COLS / 16; ++d2) {
          uint32_t b[4];
          ldsm4t(b, aK + 2 * swz<D>(kt * 16 + (lane & 15), dc / 8 + d2 * 2 + (lane >> 4)));
          mma<T>(acc[2 * d2], a, b[0], b[1]);
          mma<T>(acc[2 * d2 + 1], a, b[2], b[3]);
        }
      }
      float* dqa = p.dq_accum +
                   (((long long)sq.b * p.heads + h) * p.sq + sq.q0 + i0) * (long long)D;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = mt * 16 + (lane >> 2) + hh * 8;
        if (i0 + r < sq.sq) {
#pragma unroll
          for (int j = 0; j < DQ_COLS / 8; ++j)
            atomic_add2(dqa + (long long)r * D + dc + j * 8 + (lane & 3) * 2, acc[j][2 * hh],
                        acc[j][2 * hh + 1]);
        }
      }
    }
    __syncthreads();  // buffers of this block may now be refilled
  }

  cp_wait<0>();
  // Write dK (times the softmax scale) and dV for this block's keys.
  if (p.split_heads) {
    const long long rows = (long long)(p.cu_seqlens ? 1 : p.batch) * p.groups * p.sk;
    float* acck = p.dkv_accum + (((long long)sq.b * p.groups + g) * p.sk + sq.k0) * D;
    float* accv = acck + rows * D;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int r = n0 + warp * 16 + (lane >> 2) + hh * 8;
      if (r < sq.sk) {
#pragma unroll
        for (int j = 0; j < NTILE_D; ++j) {
          const int c = j * 8 + (lane & 3) * 2;
          atomic_add2(acck + (long long)r * D + c, acc_dk[j][2 * hh] * p.scale,
                      acc_dk[j][2 * hh + 1] * p.scale);
          atomic_add2(accv + (long long)r * D + c, acc_dv[j][2 * hh], acc_dv[j][2 * hh + 1]);
        }
      }
    }
    return;
  }
  T* dk = static_cast<T*>(p.dk) + sq.b * p.dk_bs + g * p.dk_hs + (long long)sq.k0 * p.dk_ss;
  T* dv = static_cast<T*>(p.dv) + sq.b * p.dk_bs + g * p.dk_hs + (long long)sq.k0 * p.dk_ss;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = n0 + warp * 16 + (lane >> 2) + hh * 8;
    if (r < sq.sk) {
#pragma unroll
      for (int j = 0; j < NTILE_D; ++j) {
        const int c = j * 8 + (lane & 3) * 2;
        *reinterpret_cast<uint32_t*>(dk + (long long)r * p.dk_ss + c) =
            Vec2<T>::pack(acc_dk[j][2 * hh] * p.scale, acc_dk[j][2 * hh + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(dv + (long long)r * p.dk_ss + c) =
            Vec2<T>::pack(acc_dv[j][2 * hh], acc_dv[j][2 * hh + 1]);
      }
    }
  }
}

// split_heads epilogue: dK/dV = the fp32 sums, converted to T with dk_* strides; grid
// (sk / conv_rows, 2 * groups: dK's then dV's, batch), as `bwd_dq_kernel`.
template <typename T, int D>
__device__ __forceinline__ void bwd_dkv_kernel(const FlashParams& p) {
  const long long rows = (long long)gridDim.z * p.groups * p.sk;
  const int which = blockIdx.y >= p.groups ? 1 : 0;
  const int g = blockIdx.y - which * p.groups, b = blockIdx.z;
  const float* acc = p.dkv_accum + (which * rows + ((long long)b * p.groups + g) * p.sk) * D;
  T* dst = static_cast<T*>(which ? p.dv : p.dk) + b * p.dk_bs + g * p.dk_hs;
  convert_rows<T, D>(acc, dst, p.dk_ss, p.sk, 1.f);
}


// ---------------------------------------------------------------------------------------------
// Forward on Hopper (sm_90a): warpgroup MMA. Same algorithm and masking as `fwd_kernel`; the
// two GEMMs run as wgmma with K and V read by the tensor cores straight from shared memory
// (no ldmatrix, no register copies of the operands) and P fed from registers.
//   Block: BM = 128 query rows, two warpgroups of 64 rows; BN = 128 keys per step; K and V
//   double-buffered with cp.async while the current step computes.
//   Shared tiles are stored as [D/64 panels][rows][64 elements] with the hardware's 128-byte
//   swizzle (16-byte chunk c of row r at chunk c ^ (r & 7)); every panel is 1024-byte aligned.
// ---------------------------------------------------------------------------------------------

// Element offset of (row, 16-byte chunk over D) in a panelled, 128B-swizzled [ROWS][D] tile.
template <int ROWS>
__device__ __forceinline__ int pswz(int row, int chunk) {
  return (chunk >> 3) * ROWS * 64 + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
}

template <int ROWS, int D, int NTHREADS, typename T>
__device__ __forceinline__ void load_panels(T* smem, const T* g, long long stride, int row0,
                                            int nrows, int tid) {
  constexpr int CH = D / 8;
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
#pragma unroll
  for (int i = tid; i < ROWS * CH; i += NTHREADS) {
    const int r = i / CH, c = i % CH;
    const int gr = row0 + r;
    const bool ok = gr < nrows;
    const T* src = ok ? g + (long long)gr * stride + c * 8 : g;
    cp_async16(base + pswz<ROWS>(r, c) * 2, src, ok ? 16 : 0);
  }
}

// wgmma shared-memory matrix descriptor, 128-byte swizzle: start address, leading / stride
// byte offsets (K-major: LBO unused, SBO = 8 rows x 128 B; MN-major: LBO = next 64 MN
// elements, SBO = next 8 K rows).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) |
         ((uint64_t)(sbo >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most N committed wgmma groups are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void wgmma_wait0() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across wgmma issue/wait.
template <int N>
__device__ __forceinline__ void fence_regs(float* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// cp.async (generic proxy) writes must be visible to wgmma's operand reads (async proxy).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// D[64 x 128] (+)= A·B with both operands in shared memory (K-major, 128B swizzle);
// `accumulate` = 0 overwrites D.
__device__ __forceinline__ void wgmma_ss_n128(float* d, uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(accumulate));
}
// D[64 x 128] += A·B with A (bf16 fragments, the mma.m16n8k16 A layout per warp) in
// registers and B in shared memory MN-major (transposed, 128B swizzle).
__device__ __forceinline__ void wgmma_rs_n128_tb(float* d, const uint32_t* a, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
// D[64 x 64] += A·B with A (bf16 fragments, the mma.m16n8k16 A layout per warp) in
// registers and B in shared memory MN-major (transposed, 128B swizzle).
__device__ __forceinline__ void wgmma_rs_n64_tb(float* d, const uint32_t* a, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}


// D[64 x 64] (+)= A·B, both K-major in shared memory.
__device__ __forceinline__ void wgmma_ss_n64(float* d, uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(accumulate));
}
// D[64 x N] (+)= A·B, both MN-major (transposed) in shared memory.
__device__ __forceinline__ void wgmma_ss_n64_tt(float* d, uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_ss_n32_tt(float* d, uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(da), "l"(db), "r"(accumulate));
}

template <int D>
__device__ __forceinline__ void wgmma_pv(float* acc, const uint32_t* a, uint64_t db) {
  if constexpr (D == 128) {
    wgmma_rs_n128_tb(acc, a, db);
  } else {
    wgmma_rs_n64_tb(acc, a, db);
  }
}

// One forward tile's online softmax, per thread (rows row_base and row_base + 8 of the
// warpgroup's m64 fragment): masks S (keys from n0) where needed, turns it into unnormalized
// probabilities against the updated running maxima, adds them to the running sums and returns
// in `corr` the factor the running output of each row must be scaled by.
template <int NTILE_N>
__device__ __forceinline__ void fwd_online_softmax(const FlashParams& p, const Seq& sq, float* s,
                                                   float (&row_max)[2], float (&row_sum)[2],
                                                   float (&corr)[2], int row_base, int n0,
                                                   bool need_mask, int lane) {
  const int offset = sq.sk - sq.sq;
  if (need_mask) {
#pragma unroll
    for (int j = 0; j < NTILE_N; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = row_base + ((e >> 1) << 3);
        const int col = n0 + j * 8 + (lane & 3) * 2 + (e & 1);
        if (!allowed(p, row + offset, col, sq.sk)) s[j * 4 + e] = -INFINITY;
      }
  }
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float mx = row_max[hh];
#pragma unroll
    for (int j = 0; j < NTILE_N; ++j) mx = fmaxf(mx, fmaxf(s[j * 4 + 2 * hh], s[j * 4 + 2 * hh + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
    const float m_scaled = mx == -INFINITY ? 0.f : mx * p.scale_log2;
    corr[hh] = fast_exp2(row_max[hh] * p.scale_log2 - m_scaled);
    row_max[hh] = mx;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < NTILE_N; ++j) {
      const float e0 = fast_exp2(s[j * 4 + 2 * hh] * p.scale_log2 - m_scaled);
      const float e1 = fast_exp2(s[j * 4 + 2 * hh + 1] * p.scale_log2 - m_scaled);
      s[j * 4 + 2 * hh] = e0;
      s[j * 4 + 2 * hh + 1] = e1;
      sum += e0 + e1;
    }
    row_sum[hh] = row_sum[hh] * corr[hh] + sum;
  }
}

// Scales each row of the running output fragment by its softmax correction.
template <int NTILE_D>
__device__ __forceinline__ void fwd_rescale(float* acc_o, const float (&corr)[2]) {
#pragma unroll
  for (int hh = 0; hh < 2; ++hh)
#pragma unroll
    for (int j = 0; j < NTILE_D; ++j) {
      acc_o[j * 4 + 2 * hh] *= corr[hh];
      acc_o[j * 4 + 2 * hh + 1] *= corr[hh];
    }
}

// An m64 x K fp32 wgmma accumulator fragment (P in the forward; Pᵀ, dSᵀ in the backward) as
// bf16 A fragments (the mma.m16n8k16 A layout per warp) of a register-sourced wgmma over K.
template <int K>
__device__ __forceinline__ void pack_a_frags(const float* s, uint32_t (&a)[K / 16][4]) {
  using T = __nv_bfloat16;
#pragma unroll
  for (int kt = 0; kt < K / 16; ++kt) {
    a[kt][0] = Vec2<T>::pack(s[(2 * kt) * 4 + 0], s[(2 * kt) * 4 + 1]);
    a[kt][1] = Vec2<T>::pack(s[(2 * kt) * 4 + 2], s[(2 * kt) * 4 + 3]);
    a[kt][2] = Vec2<T>::pack(s[(2 * kt + 1) * 4 + 0], s[(2 * kt + 1) * 4 + 1]);
    a[kt][3] = Vec2<T>::pack(s[(2 * kt + 1) * 4 + 2], s[(2 * kt + 1) * 4 + 3]);
  }
}

// O += P V for one key tile: BN/16 k-steps of 16 keys; V is read transposed (MN-major), its
// 64-column panels BN * 128 bytes apart. Issued and committed, not waited for.
template <int D, int BN>
__device__ __forceinline__ void fwd_issue_pv(float* acc_o, const uint32_t (&a)[BN / 16][4],
                                             uint32_t aVs) {
#pragma unroll
  for (int kt = 0; kt < BN / 16; ++kt) {
    const uint64_t db = smem_desc(aVs + kt * 16 * 128, BN * 128, 1024);
    wgmma_pv<D>(acc_o, a[kt], db);
  }
  wgmma_commit();
}

// acc[64 x N] (+)= A·Bᵀ over the head dim D, both operands K-major panelled tiles in shared
// memory: A is this warpgroup's 64 rows (address `a`) of an A_ROWS-row tile, B an N-row tile
// (N = 64 or 128). D/16 k-steps; within a panel the start address moves 32 bytes per step.
// Issued, not committed.
template <int D, int N, int A_ROWS>
__device__ __forceinline__ void wgmma_head_dot(float* acc, uint32_t a, uint32_t b) {
  static_assert(N == 64 || N == 128, "N");
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t koff = (kk & 3) * 32;
    const uint64_t da = smem_desc(a + (kk >> 2) * A_ROWS * 128 + koff, 16, 1024);
    const uint64_t db = smem_desc(b + (kk >> 2) * N * 128 + koff, 16, 1024);
    if constexpr (N == 128) {
      wgmma_ss_n128(acc, da, db, kk > 0);
    } else {
      wgmma_ss_n64(acc, da, db, kk > 0);
    }
  }
}

// S = Q Kᵀ for one key tile, issued and committed, not waited for.
template <int D, int BN>
__device__ __forceinline__ void fwd_issue_s(float* s, uint32_t aQwg, uint32_t aKs) {
  wgmma_head_dot<D, BN, 128>(s, aQwg, aKs);
  wgmma_commit();
}

// Normalizes the output rows of this thread, writes them and their log2-domain logsumexp.
template <int D>
__device__ __forceinline__ void fwd_epilogue(const FlashParams& p, const Seq& sq, int h, int m0,
                                             const float* acc_o, const float (&row_max)[2],
                                             const float (&row_sum)[2]) {
  using T = __nv_bfloat16;
  constexpr int NTILE_D = D / 8;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wg = warp >> 2;
  T* o = const_cast<T*>(static_cast<const T*>(p.o)) + sq.b * p.o_bs + h * p.o_hs +
         (long long)sq.q0 * p.o_ss;
  float* lse = p.lse + ((long long)sq.b * p.heads + h) * p.sq + sq.q0;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float l = row_sum[hh];
    l += __shfl_xor_sync(0xffffffff, l, 1);
    l += __shfl_xor_sync(0xffffffff, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = m0 + wg * 64 + (warp & 3) * 16 + (lane >> 2) + hh * 8;
    if (row < sq.sq) {
      T* orow = o + (long long)row * p.o_ss;
#pragma unroll
      for (int j = 0; j < NTILE_D; ++j) {
        const uint32_t pk = Vec2<T>::pack(acc_o[j * 4 + 2 * hh] * inv, acc_o[j * 4 + 2 * hh + 1] * inv);
        *reinterpret_cast<uint32_t*>(orow + j * 8 + (lane & 3) * 2) = pk;
      }
      if ((lane & 3) == 0) {
        const float mx = row_max[hh];
        lse[row] = (mx == -INFINITY || l <= 0.f) ? INFINITY : mx * p.scale_log2 + log2f(l);
      }
    }
  }
}

// Whether key tile [n0, n0 + BN) needs the per-element mask for query rows [m0, m0 + 128).
template <int BN>
__device__ __forceinline__ bool fwd_needs_mask(const FlashParams& p, const Seq& sq, int m0, int n0) {
  const int offset = sq.sk - sq.sq;
  return (n0 + BN > sq.sk) || (p.causal && n0 + BN - 1 > m0 + offset) ||
         (p.window_left >= 0 && m0 + 128 - 1 + offset - n0 > p.window_left);
}

// One step per key tile: S = Q Kᵀ, softmax, O += P V, each waited for. A software-pipelined
// form (FlashAttention-3's: S_j and P_{j-1} V_{j-1} issued together, the softmax of S_j
// computed while the P·V MMA runs) passed the self-test but measured no faster on an H200
// (d=64: 222 TFLOP/s against 247 for the two-blocks-per-SM default; d=128: equal), so it was
// not kept.
template <int D, int BN>
__device__ __forceinline__ void fwd_wgmma_kernel(const FlashParams& p) {
  using T = __nv_bfloat16;
  constexpr int BM = 128, NT = 256;
  static_assert(BN == 64 || BN == 128, "key tile");
  constexpr int NTILE_N = BN / 8, NTILE_D = D / 8;
  // 128B-swizzled tiles must start 1024-byte aligned (the host adds 1024 bytes of slack).
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  T* sQ = reinterpret_cast<T*>(smem_raw + ((1024 - (raw & 1023)) & 1023));
  T* sK = sQ + BM * D;       // [2][BN][D]
  T* sV = sK + 2 * BN * D;   // [2][BN][D]
  const uint32_t aQ = static_cast<uint32_t>(__cvta_generic_to_shared(sQ));
  const uint32_t aK = static_cast<uint32_t>(__cvta_generic_to_shared(sK));
  const uint32_t aV = static_cast<uint32_t>(__cvta_generic_to_shared(sV));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2;  // warpgroup: query rows [64 wg, 64 wg + 64) of the block
  const Seq sq = seq_info(p, blockIdx.z);
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int m0 = m_block * BM;
  if (m0 >= sq.sq) return;
  const int h = blockIdx.y;
  const int g = h / (p.heads / p.groups);
  const int offset = sq.sk - sq.sq;

  const T* q = static_cast<const T*>(p.q) + sq.b * p.q_bs + q_head_offset(p, h) + (long long)sq.q0 * p.q_ss;
  const T* k = static_cast<const T*>(p.k) + sq.b * p.k_bs + g * p.k_hs + (long long)sq.k0 * p.k_ss;
  const T* v = static_cast<const T*>(p.v) + sq.b * p.v_bs + g * p.v_hs + (long long)sq.k0 * p.v_ss;

  int n_end = sq.sk;
  if (p.causal) n_end = min(n_end, m0 + BM + offset);
  int n_begin = 0;
  if (p.window_left >= 0) n_begin = max(0, m0 + offset - p.window_left) / BN * BN;

  float acc_o[NTILE_D * 4];
#pragma unroll
  for (int i = 0; i < NTILE_D * 4; ++i) acc_o[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  load_panels<BM, D, NT>(sQ, q, p.q_ss, m0, sq.sq, tid);
  if (n_begin < n_end) {
    load_panels<BN, D, NT>(sK, k, p.k_ss, n_begin, sq.sk, tid);
    load_panels<BN, D, NT>(sV, v, p.v_ss, n_begin, sq.sk, tid);
  }
  cp_commit();

  // This warpgroup's rows of Q: row offset 64 wg inside every panel.
  const uint32_t aQwg = aQ + wg * 64 * 128;
  const int row_base = m0 + wg * 64 + (warp & 3) * 16 + (lane >> 2);
  int stage = 0;
  for (int n0 = n_begin; n0 < n_end; n0 += BN, stage ^= 1) {
    cp_wait<0>();
    fence_proxy_async();
    __syncthreads();  // K, V of this step landed; both warpgroups are done with the other stage
    if (n0 + BN < n_end) {
      load_panels<BN, D, NT>(sK + (stage ^ 1) * BN * D, k, p.k_ss, n0 + BN, sq.sk, tid);
      load_panels<BN, D, NT>(sV + (stage ^ 1) * BN * D, v, p.v_ss, n0 + BN, sq.sk, tid);
      cp_commit();
    }
    float s[NTILE_N * 4];
    wgmma_fence();
    fwd_issue_s<D, BN>(s, aQwg, aK + stage * BN * D * 2);
    wgmma_wait0();
    fence_regs<NTILE_N * 4>(s);
    float corr[2];
    fwd_online_softmax<NTILE_N>(p, sq, s, row_max, row_sum, corr, row_base, n0,
                                fwd_needs_mask<BN>(p, sq, m0, n0), lane);
    fwd_rescale<NTILE_D>(acc_o, corr);
    // P packed before the first wgmma (registers an issued wgmma reads must not change until
    // it completes).
    uint32_t a[BN / 16][4];
    pack_a_frags<BN>(s, a);
    fence_regs<NTILE_D * 4>(acc_o);
    wgmma_fence();
    fwd_issue_pv<D, BN>(acc_o, a, aV + stage * BN * D * 2);
    wgmma_wait0();
    fence_regs<NTILE_D * 4>(acc_o);
  }
  cp_wait<0>();
  fwd_epilogue<D>(p, sq, h, m0, acc_o, row_max, row_sum);
}

// Backward on Hopper (sm_90a): warpgroup MMA, same algorithm, masking, GQA handling and
// outputs as `bwd_kernel`. Block: BN = 128 keys, two warpgroups of 64 keys; it walks query
// blocks of BM = 64 rows (double-buffered Q, dO). Per step and warpgroup:
//   Sᵀ = K Qᵀ, dPᵀ = V dOᵀ (operands in shared memory), Pᵀ / dSᵀ in registers,
//   dV += Pᵀ dO and dK += dSᵀ Q (A from registers, B transposed from shared memory),
//   dSᵀ stored to shared memory, then dQ = dS K (both operands transposed from shared
//   memory), added to the fp32 accumulator with atomics: with BM = 64 each warpgroup takes
//   half of D, with BM = 128 (d = 64 only) half of the query rows.
// BM = 128 halves the steps, so the per-step barriers, waits and statistics loads, and
// makes Sᵀ / dPᵀ one m64n128 MMA per k-step. (Adding a warpgroup's dQ tile with one TMA bulk
// reduction instead of the per-thread atomics measured no faster: 1.415 vs 1.407 ms, H200.)
template <int D, int BM>
__device__ __forceinline__ void bwd_wgmma_kernel(const FlashParams& p) {
  using T = __nv_bfloat16;
  static_assert(BM == 64 || (BM == 128 && D == 64), "query tile");
  constexpr int BN = 128, NT = 256, NTILE_D = D / 8, NTILE_M = BM / 8;
  // Columns of D per warpgroup in dQ = dS K (64 query rows each).
  constexpr int DQ_N = BM == 64 ? D / 2 : D;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  T* sK = reinterpret_cast<T*>(smem_raw + ((1024 - (raw & 1023)) & 1023));
  T* sV = sK + BN * D;
  T* sQ = sV + BN * D;        // [2][BM][D]
  T* sdO = sQ + 2 * BM * D;   // [2][BM][D]
  T* sdS = sdO + 2 * BM * D;  // [BN][BM]: dSᵀ, BM / 64 panels of 64 query columns
  float* sLse = reinterpret_cast<float*>(sdS + BN * BM);  // [2][BM]
  float* sDsum = sLse + 2 * BM;                           // [2][BM]
  const uint32_t aK = static_cast<uint32_t>(__cvta_generic_to_shared(sK));
  const uint32_t aV = static_cast<uint32_t>(__cvta_generic_to_shared(sV));
  const uint32_t aQ0 = static_cast<uint32_t>(__cvta_generic_to_shared(sQ));
  const uint32_t adO0 = static_cast<uint32_t>(__cvta_generic_to_shared(sdO));
  const uint32_t adS = static_cast<uint32_t>(__cvta_generic_to_shared(sdS));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wr = warp & 3;
  const Seq sq = seq_info(p, blockIdx.z);
  const int n0 = blockIdx.x * BN;
  if (n0 >= sq.sk) return;
  const BwdWork w = bwd_work<BN, BM>(p, sq, n0);
  const int g = w.g, h_first = w.h_first, n_m = w.n_m, n_it = w.n_it, m_begin = w.m_begin;
  const int offset = sq.sk - sq.sq;
  const T* k = static_cast<const T*>(p.k) + sq.b * p.k_bs + g * p.k_hs + (long long)sq.k0 * p.k_ss;
  const T* v = static_cast<const T*>(p.v) + sq.b * p.v_bs + g * p.v_hs + (long long)sq.k0 * p.v_ss;

  float acc_dk[NTILE_D * 4], acc_dv[NTILE_D * 4];
#pragma unroll
  for (int i = 0; i < NTILE_D * 4; ++i) {
    acc_dk[i] = 0.f;
    acc_dv[i] = 0.f;
  }

  load_panels<BN, D, NT>(sK, k, p.k_ss, n0, sq.sk, tid);
  load_panels<BN, D, NT>(sV, v, p.v_ss, n0, sq.sk, tid);

  auto prefetch = [&](int it) {
    const int h = h_first + it / n_m;
    const int i0 = m_begin + (it % n_m) * BM;
    const int buf = it & 1;
    const T* q = static_cast<const T*>(p.q) + sq.b * p.q_bs + q_head_offset(p, h) + (long long)sq.q0 * p.q_ss;
    const T* dout =
        static_cast<const T*>(p.dout) + sq.b * p.do_bs + h * p.do_hs + (long long)sq.q0 * p.do_ss;
    load_panels<BM, D, NT>(sQ + buf * BM * D, q, p.q_ss, i0, sq.sq, tid);
    load_panels<BM, D, NT>(sdO + buf * BM * D, dout, p.do_ss, i0, sq.sq, tid);
    const long long lbase = ((long long)sq.b * p.heads + h) * p.sq + sq.q0;
    load_row_stats<BM, NT>(sLse + buf * BM, sDsum + buf * BM, p.lse + lbase, p.dsum + lbase, i0,
                           sq.sq, tid);
  };

  if (n_it > 0) prefetch(0);
  cp_commit();

  // This warpgroup's 64 key rows inside every panel of K and V.
  const uint32_t aKwg = aK + wg * 64 * 128, aVwg = aV + wg * 64 * 128;
  for (int it = 0; it < n_it; ++it) {
    if (it + 1 < n_it) {
      prefetch(it + 1);
      cp_commit();
      cp_wait<1>();
    } else {
      cp_wait<0>();
    }
    fence_proxy_async();
    __syncthreads();
    const int buf = it & 1;
    const int h = h_first + it / n_m;
    const int i0 = m_begin + (it % n_m) * BM;
    const uint32_t aQ = aQ0 + buf * BM * D * 2;
    const uint32_t adO = adO0 + buf * BM * D * 2;
    const float* lse = sLse + buf * BM;
    const float* dsum = sDsum + buf * BM;

    float st[NTILE_M * 4], dpt[NTILE_M * 4];
    wgmma_fence();
    wgmma_head_dot<D, BM, BN>(st, aKwg, aQ);
    // dPᵀ in its own group: the probabilities below are computed while it runs.
    wgmma_commit();
    wgmma_head_dot<D, BM, BN>(dpt, aVwg, adO);
    wgmma_commit();
    wgmma_wait<1>();  // Sᵀ is in; dPᵀ may still be in flight (its registers stay untouched)
    fence_regs<NTILE_M * 4>(st);

    const bool need_mask = (n0 + BN > sq.sk) || (p.causal && n0 + BN - 1 > i0 + offset) ||
                           (p.window_left >= 0 && i0 + BM - 1 + offset - n0 > p.window_left);
    const int kr0 = n0 + wg * 64 + wr * 16 + (lane >> 2);
    auto probs = [&](auto masked) {
#pragma unroll
      for (int j = 0; j < NTILE_M; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int kr = kr0 + ((e >> 1) << 3);
          const int qc = j * 8 + (lane & 3) * 2 + (e & 1);
          const float x = fast_exp2(st[j * 4 + e] * p.scale_log2 - lse[qc]);
          st[j * 4 + e] =
              (!decltype(masked)::value || allowed(p, i0 + qc + offset, kr, sq.sk)) ? x : 0.f;
        }
    };
    if (need_mask) {
      probs(Masked<true>{});
    } else {
      probs(Masked<false>{});
    }
    wgmma_wait0();
    fence_regs<NTILE_M * 4>(dpt);
#pragma unroll
    for (int j = 0; j < NTILE_M; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qc = j * 8 + (lane & 3) * 2 + (e & 1);
        dpt[j * 4 + e] = st[j * 4 + e] * (dpt[j * 4 + e] - dsum[qc]);
      }

    uint32_t ap[BM / 16][4], ads[BM / 16][4];
    pack_a_frags<BM>(st, ap);
    pack_a_frags<BM>(dpt, ads);

    // dV += Pᵀ dO, dK += dSᵀ Q: B = dO / Q read transposed (K-dim = query rows).
    fence_regs<NTILE_D * 4>(acc_dv);
    fence_regs<NTILE_D * 4>(acc_dk);
    wgmma_fence();
#pragma unroll
    for (int kt = 0; kt < BM / 16; ++kt)
      wgmma_pv<D>(acc_dv, ap[kt], smem_desc(adO + kt * 16 * 128, BM * 128, 1024));
#pragma unroll
    for (int kt = 0; kt < BM / 16; ++kt)
      wgmma_pv<D>(acc_dk, ads[kt], smem_desc(aQ + kt * 16 * 128, BM * 128, 1024));
    wgmma_commit();

    // dSᵀ [keys][queries] into shared memory for dQ.
    {
      const int r0 = wg * 64 + wr * 16 + (lane >> 2);
      const int cb = (lane & 3) * 2;
#pragma unroll
      for (int kt = 0; kt < BM / 16; ++kt) {
        *reinterpret_cast<uint32_t*>(sdS + pswz<BN>(r0, 2 * kt) + cb) = ads[kt][0];
        *reinterpret_cast<uint32_t*>(sdS + pswz<BN>(r0 + 8, 2 * kt) + cb) = ads[kt][1];
        *reinterpret_cast<uint32_t*>(sdS + pswz<BN>(r0, 2 * kt + 1) + cb) = ads[kt][2];
        *reinterpret_cast<uint32_t*>(sdS + pswz<BN>(r0 + 8, 2 * kt + 1) + cb) = ads[kt][3];
      }
    }
    fence_proxy_async();
    __syncthreads();  // both warpgroups' halves of dSᵀ are in

    // dQ[rows, cols] = dS K: A = dSᵀ transposed (M = this warpgroup's query rows: a 64-column
    // panel of dSᵀ), B = K transposed (N = its columns of D, K-dim = keys).
    const int dq_row0 = BM == 64 ? 0 : wg * 64;
    const int dq_col0 = BM == 64 ? wg * DQ_N : 0;
    float dq[DQ_N / 2];
    wgmma_fence();
#pragma unroll
    for (int kt = 0; kt < BN / 16; ++kt) {
      const uint64_t da = smem_desc(adS + (dq_row0 / 64) * BN * 128 + kt * 16 * 128, BN * 128, 1024);
      const uint32_t col = dq_col0;  // elements into D
      const uint64_t db =
          smem_desc(aK + (col / 64) * BN * 128 + (col % 64) * 2 + kt * 16 * 128, BN * 128, 1024);
      if constexpr (DQ_N == 64) {
        wgmma_ss_n64_tt(dq, da, db, kt > 0);
      } else {
        wgmma_ss_n32_tt(dq, da, db, kt > 0);
      }
    }
    wgmma_commit();
    wgmma_wait0();
    fence_regs<DQ_N / 2>(dq);
    fence_regs<NTILE_D * 4>(acc_dv);
    fence_regs<NTILE_D * 4>(acc_dk);

    float* dqa = p.dq_accum + (((long long)sq.b * p.heads + h) * p.sq + sq.q0 + i0) * (long long)D;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int r = dq_row0 + wr * 16 + (lane >> 2) + hh * 8;
      if (i0 + r < sq.sq) {
#pragma unroll
        for (int j = 0; j < DQ_N / 8; ++j)
          atomic_add2(dqa + (long long)r * D + dq_col0 + j * 8 + (lane & 3) * 2, dq[j * 4 + 2 * hh],
                      dq[j * 4 + 2 * hh + 1]);
      }
    }
    __syncthreads();  // buffers and dSᵀ may now be refilled
  }

  cp_wait<0>();
  if (p.split_heads) {
    const long long rows = (long long)(p.cu_seqlens ? 1 : p.batch) * p.groups * p.sk;
    float* acck = p.dkv_accum + (((long long)sq.b * p.groups + g) * p.sk + sq.k0) * D;
    float* accv = acck + rows * D;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int r = n0 + wg * 64 + wr * 16 + (lane >> 2) + hh * 8;
      if (r < sq.sk) {
#pragma unroll
        for (int j = 0; j < NTILE_D; ++j) {
          const int c = j * 8 + (lane & 3) * 2;
          atomic_add2(acck + (long long)r * D + c, acc_dk[j * 4 + 2 * hh] * p.scale,
                      acc_dk[j * 4 + 2 * hh + 1] * p.scale);
          atomic_add2(accv + (long long)r * D + c, acc_dv[j * 4 + 2 * hh], acc_dv[j * 4 + 2 * hh + 1]);
        }
      }
    }
    return;
  }
  T* dk = static_cast<T*>(p.dk) + sq.b * p.dk_bs + g * p.dk_hs + (long long)sq.k0 * p.dk_ss;
  T* dv = static_cast<T*>(p.dv) + sq.b * p.dk_bs + g * p.dk_hs + (long long)sq.k0 * p.dk_ss;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = n0 + wg * 64 + wr * 16 + (lane >> 2) + hh * 8;
    if (r < sq.sk) {
#pragma unroll
      for (int j = 0; j < NTILE_D; ++j) {
        const int c = j * 8 + (lane & 3) * 2;
        *reinterpret_cast<uint32_t*>(dk + (long long)r * p.dk_ss + c) =
            Vec2<T>::pack(acc_dk[j * 4 + 2 * hh] * p.scale, acc_dk[j * 4 + 2 * hh + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(dv + (long long)r * p.dk_ss + c) =
            Vec2<T>::pack(acc_dv[j * 4 + 2 * hh], acc_dv[j * 4 + 2 * hh + 1]);
      }
    }
  }
}

}  // namespace fa

// Shared memory bytes (the host mirrors these formulas in src/ops/cuda/flash_attn.rs).
//   fwd: (128 + 2 * BN) * D * 2
//   bwd: (2 * BN + 4 * BM) * D * 2 + BN * BM * 2 + 4 * BM * 4, BN = 16 * WARPS or 128
//        (warpgroup MMA, + 1024 alignment slack), BM = 64 or 128 (_wg_m128)
// Kernel names: flash_{fwd,bwd_dot,bwd_dq,bwd}_<type>_d<D>; tile variants (picked by the host's
// tuning knobs) add _n<BN> (forward key tile) or _w<WARPS> (backward warps).

#define FA_INSTANCE(NAME, T, D, WARPS)                                                      \
  extern "C" __global__ void __launch_bounds__(128) flash_fwd_##NAME##_d##D(FlashParams p) { \
    fa::fwd_kernel<T, D, 64, 2>(p);                                                            \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(256) flash_bwd_dot_##NAME##_d##D(           \
      FlashParams p) {                                                                      \
    fa::bwd_dot_kernel<T, D>(p);                                                            \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(256) flash_bwd_dq_##NAME##_d##D(            \
      FlashParams p) {                                                                      \
    fa::bwd_dq_kernel<T, D>(p);                                                             \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(256) flash_bwd_dkv_##NAME##_d##D(           \
      FlashParams p) {                                                                      \
    fa::bwd_dkv_kernel<T, D>(p);                                                            \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(WARPS * 32)                                  \
      flash_bwd_##NAME##_d##D(FlashParams p) {                                              \
    fa::bwd_kernel<T, D, WARPS>(p);                                                         \
  }

FA_INSTANCE(bf16, __nv_bfloat16, 64, 8)
FA_INSTANCE(bf16, __nv_bfloat16, 128, 8)
FA_INSTANCE(f16, __half, 64, 8)
FA_INSTANCE(f16, __half, 128, 8)

// Tile variants for tuning (bf16 only): _n128 / _n32 forward key tile 128 / 32 (_n32: no
// register spills at d=128); _b3 forward capped at 168 registers for 3 blocks per SM; _w8
// forward with 8 warps of 16 query rows; _w4 backward with 4 warps (64 keys per block).
extern "C" __global__ void __launch_bounds__(128) flash_fwd_bf16_d64_n128(FlashParams p) {
  fa::fwd_kernel<__nv_bfloat16, 64, 128, 2>(p);
}
extern "C" __global__ void __launch_bounds__(128) flash_fwd_bf16_d128_n32(FlashParams p) {
  fa::fwd_kernel<__nv_bfloat16, 128, 32, 2>(p);
}
extern "C" __global__ void __launch_bounds__(128, 3) flash_fwd_bf16_d64_b3(FlashParams p) {
  fa::fwd_kernel<__nv_bfloat16, 64, 64, 2>(p);
}
extern "C" __global__ void __launch_bounds__(256) flash_fwd_bf16_d128_w8(FlashParams p) {
  fa::fwd_kernel<__nv_bfloat16, 128, 64, 1>(p);
}
extern "C" __global__ void __launch_bounds__(256) flash_fwd_bf16_d64_w8(FlashParams p) {
  fa::fwd_kernel<__nv_bfloat16, 64, 64, 1>(p);
}
// Hopper forward (warpgroup MMA), bf16: 2 warpgroups, BM = BN = 128.
extern "C" __global__ void __launch_bounds__(256, 1) flash_fwd_bf16_d128_wg(FlashParams p) {
  fa::fwd_wgmma_kernel<128, 128>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) flash_fwd_bf16_d64_wg(FlashParams p) {
  fa::fwd_wgmma_kernel<64, 128>(p);
}
// d=64 with 64-key tiles and two blocks per SM (the other block's GEMMs overlap this one's
// softmax).
extern "C" __global__ void __launch_bounds__(256, 2) flash_fwd_bf16_d64_wg2(FlashParams p) {
  fa::fwd_wgmma_kernel<64, 64>(p);
}
// Hopper backward (warpgroup MMA), bf16: 2 warpgroups, BN = 128 keys, BM = 64 queries.
extern "C" __global__ void __launch_bounds__(256, 1) flash_bwd_bf16_d128_wg(FlashParams p) {
  fa::bwd_wgmma_kernel<128, 64>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) flash_bwd_bf16_d64_wg(FlashParams p) {
  fa::bwd_wgmma_kernel<64, 64>(p);
}
// d=64 with BM = 128 query rows per step.
extern "C" __global__ void __launch_bounds__(256, 1) flash_bwd_bf16_d64_wg_m128(FlashParams p) {
  fa::bwd_wgmma_kernel<64, 128>(p);
}
extern "C" __global__ void __launch_bounds__(128) flash_bwd_bf16_d64_w4(FlashParams p) {
  fa::bwd_kernel<__nv_bfloat16, 64, 4>(p);
}
extern "C" __global__ void __launch_bounds__(128) flash_bwd_bf16_d128_w4(FlashParams p) {
  fa::bwd_kernel<__nv_bfloat16, 128, 4>(p);
}
