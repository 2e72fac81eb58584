// Per-element arithmetic shared by the GPU kernels (kernels.cu, nvcc) and the CPU kernels
// (cpu_kernels.c, cc): one definition of each step, so both engines compute the same bits.
// Every float operation is spelled out (no contraction): the order and the single fused
// multiply-add are those of the torch engine's steps.py.
#ifndef MERGEFLOW_MERGE_OPS_H
#define MERGEFLOW_MERGE_OPS_H

#define MAXE 8
typedef unsigned int u32;
typedef unsigned long long u64;

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define MF_FN __device__ __forceinline__
#define MF_ADD(a, b) __fadd_rn((a), (b))
#define MF_SUB(a, b) __fsub_rn((a), (b))
#define MF_MUL(a, b) __fmul_rn((a), (b))
#define MF_DIV(a, b) __fdiv_rn((a), (b))
#define MF_FMA(a, b, c) __fmaf_rn((a), (b), (c))
#define MF_FINITE(x) isfinite(x)
#define MF_BITS(x) __float_as_uint(x)
#define MF_FLOAT(u) __uint_as_float(u)
#define MF_H2F(p, i) __half2float(((const __half*)(p))[i])
#define MF_F2H(p, i, v) (((__half*)(p))[i] = __float2half_rn(v))
#else
#include <math.h>
#include <string.h>
#define MF_FN static inline
#define MF_ADD(a, b) ((a) + (b))
#define MF_SUB(a, b) ((a) - (b))
#define MF_MUL(a, b) ((a) * (b))
#define MF_DIV(a, b) ((a) / (b))
#define MF_FMA(a, b, c) fmaf((a), (b), (c))
#define MF_FINITE(x) isfinite(x)
static inline u32 MF_BITS(float x) { u32 u; memcpy(&u, &x, 4); return u; }
static inline float MF_FLOAT(u32 u) { float x; memcpy(&x, &u, 4); return x; }
#define MF_H2F(p, i) ((float)((const _Float16*)(p))[i])
#define MF_F2H(p, i, v) (((_Float16*)(p))[i] = (_Float16)(v))
#endif

// dtype codes: 0 float32, 1 float16, 2 bfloat16
MF_FN float mf_ld(const void* p, int dt, u64 i) {
    if (dt == 2) return MF_FLOAT(((u32)((const unsigned short*)p)[i]) << 16);
    if (dt == 1) return MF_H2F(p, i);
    return ((const float*)p)[i];
}

MF_FN void mf_st(void* p, int dt, u64 i, float v) {
    if (dt == 2) {  // round to nearest even, as c10::BFloat16
        u32 x = MF_BITS(v);
        ((unsigned short*)p)[i] = (v != v) ? (unsigned short)0x7FC0
                                           : (unsigned short)((x + (((x >> 16) & 1u) + 0x7FFFu)) >> 16);
    } else if (dt == 1) {
        MF_F2H(p, i, v);
    } else {
        ((float*)p)[i] = v;
    }
}

// rng.py: x = H(H(i ^ k0) ^ k1), u = (x >> 8) / 2**24, H = lowbias32
MF_FN u32 mf_lowbias32(u32 x) {
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16;
    return x;
}
MF_FN float mf_uniform(u32 i, u32 k0, u32 k1) {
    u32 x = mf_lowbias32(mf_lowbias32(i ^ k0) ^ k1);
    return (float)(x >> 8) * (1.0f / 16777216.0f);
}

MF_FN u32 mf_absbits(float v) { return MF_BITS(v) & 0x7FFFFFFFu; }

// Task vector of element i (counter = its flat index in the tensor): expert - base (or the
// expert itself without a base); DARE keeps it where u < keep and divides by keep.
MF_FN float mf_delta_one(const void* ex, int ex_dt, const void* base, int base_dt, u64 i, u32 counter,
                         int dare, float keep, int inverse, u32 k0, u32 k1) {
    float v = mf_ld(ex, ex_dt, i);
    if (base) v = MF_SUB(v, mf_ld(base, base_dt, i));
    if (dare) {
        v = MF_MUL(v, mf_uniform(counter, k0, k1) < keep ? 1.0f : 0.0f);
        if (inverse) v = MF_DIV(v, keep);
    }
    return v;
}

// MagPrune of one element with keep probability `prob` (its rank's entry of the table).
MF_FN float mf_prune_one(float v, float prob, u32 counter, int inverse, u32 k0, u32 k1) {
    float u = mf_uniform(counter, k0, k1);
    if (inverse) v = MF_DIV(v, prob);
    return MF_MUL(v, u < prob ? 1.0f : 0.0f);
}

struct Fuse {
    const float* d[MAXE];  // task vectors (or expert weights without a base), float32
    float w[MAXE];         // expert weights
    float m[MAXE];         // M3 mixing ratios
    int n_exp;
    int mode;              // 0 sum, 1 mean, 2 disjoint (sign election), 3 M3 mixup disjoint
    float lam;
    float total;           // mean: sum of weights (1 where it is below 1e-8, as mergekit)
    int base_dt;           // -1: no base (plain average of expert weights)
    int out_dt;
};

// steps.weighted_sum / weighted_mean / disjoint_fuse_ and scale_add for element i of a
// block (d and base indexed by i). n_exp, mode and base_dt are f's, passed apart so that
// the CPU code can hand in constants (and get vectorised loops). ORs 1 into *bad when an
// input or the result is not finite.
MF_FN float mf_fuse_one(const struct Fuse* f, int n_exp, int mode, int base_dt, const void* base, u64 i,
                        int* bad) {
    float dv[MAXE];
    float tau = 0.0f;
    int finite = 1;
    for (int t = 0; t < n_exp; t++) {
        float x = f->d[t][i];
        finite &= MF_FINITE(x) ? 1 : 0;
        dv[t] = f->w[t] != 1.0f ? MF_MUL(x, f->w[t]) : x;
        if (mode >= 2 || t == 0) {  // disjoint: the weighted deltas' plain sum elects
            tau = t == 0 ? dv[t] : MF_ADD(tau, dv[t]);
        } else {  // sum / mean: torch's add_(d, alpha=w) is one fused multiply-add
            tau = f->w[t] != 1.0f ? MF_FMA(x, f->w[t], tau) : MF_ADD(tau, x);
        }
    }
    if (mode == 1) {
        tau = MF_DIV(tau, f->total);
    } else if (mode >= 2) {
        float g = tau >= 0.0f ? 1.0f : -1.0f;  // elected sign; a zero sum counts as +
        float num = 0.0f, den = 0.0f, cnt = 0.0f, plain = 0.0f;
        for (int t = 0; t < n_exp; t++) {
            float y = MF_MUL(dv[t], g);
            int agree = y > 0.0f;
            // Branch-free (the CPU loop vectorises): adding +0 where an expert disagrees
            // leaves every sum as it was, none of them can be -0.
            if (mode == 2) {
                num = MF_ADD(num, agree ? y : 0.0f);
                den = MF_ADD(den, agree ? f->w[t] : 0.0f);
            } else {
                float raw = agree ? (f->w[t] != 1.0f ? MF_DIV(dv[t], f->w[t]) : dv[t]) : 0.0f;
                plain = MF_ADD(plain, raw);
                cnt = MF_ADD(cnt, agree ? 1.0f : 0.0f);
                num = MF_FMA(raw, f->m[t], num);  // num.add_(raw, alpha=m)
                den = MF_ADD(den, agree ? f->m[t] : 0.0f);
            }
        }
        if (mode == 2) {
            tau = MF_DIV(MF_MUL(num, g), den == 0.0f ? 1.0f : den);
        } else {
            tau = MF_DIV(num, den == 0.0f ? 1.0f : den);
            if (den == 0.0f && cnt > 0.0f) tau = MF_DIV(plain, cnt);
        }
    }
    float v = tau;
    if (base_dt >= 0) {
        float b = mf_ld(base, base_dt, i);
        finite &= MF_FINITE(b) ? 1 : 0;
        if (f->lam != 1.0f) v = MF_MUL(v, f->lam);
        v = MF_ADD(v, b);
    }
    *bad |= (finite & (MF_FINITE(v) ? 1 : 0)) ^ 1;
    return v;
}

#endif
