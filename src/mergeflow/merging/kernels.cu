// Merge kernels of the direct CUDA engine (mergeflow/merging/direct.py).
//
// Shipped as PTX (kernels.ptx, built by scripts/build_kernels.sh) and loaded through the
// driver API, so a GPU merge needs neither torch nor a compiler at run time. Each kernel is
// one step of `steps.py` on a whole tensor, with the same arithmetic order, the same keyed
// random draws and the same tie rules, so its masks equal the torch engine's:
//   mf_colmean / mf_fit  vocabulary policy (truncate, pad_mean) as float32 inputs
//   mf_delta        task vector (expert - base) in float32, DARE drop + 1/(1-p) rescale
//   mf_rows         per row: MagPrune (exact ascending rank -> keep table) or row top-k
//   mf_sel_* / mf_hist_* / mf_trim
//                   tensor-wide top-k by |delta| (TIES trim): radix select over the float
//                   bits, then over the flat index among values equal to the threshold
//                   (ties: lower index kept first)
//   mf_fuse         sum / mean / disjoint (sign election) / M3 mixup, lambda, + base,
//                   cast to the output dtype, NaN/Inf flag
#include "merge_ops.h"

// ---------------------------------------------------------------------------------------
// vocabulary policy (checkpoints.fit_rows): an input of `have` rows as float32 [rows, cols],
// truncated, or padded with the mean of its rows (accumulated in float64)
// ---------------------------------------------------------------------------------------

extern "C" __global__ void mf_colmean(float* __restrict__ mean, const void* __restrict__ src, int dt,
                                      u32 have, u32 cols) {
    for (u32 c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
        double s = 0.0;
        for (u32 r = 0; r < have; r++) s += (double)mf_ld(src, dt, (u64)r * cols + c);
        mean[c] = (float)(s / (double)have);
    }
}

extern "C" __global__ void mf_fit(float* __restrict__ dst, const void* __restrict__ src, int dt, u64 n_have,
                                  u64 n, u32 cols, const float* __restrict__ mean) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = i < n_have ? mf_ld(src, dt, i) : mean[i % cols];
}

// ---------------------------------------------------------------------------------------
// sparsify
// ---------------------------------------------------------------------------------------

// d = expert - base (base may be null: d = expert); DARE: d *= [u < keep], d /= keep.
extern "C" __global__ void mf_delta(float* __restrict__ d, const void* __restrict__ ex, int ex_dt,
                                    const void* __restrict__ base, int base_dt, u64 n,
                                    int dare, float keep, int inverse, u32 k0, u32 k1) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        d[i] = mf_delta_one(ex, ex_dt, base, base_dt, i, (u32)i, dare, keep, inverse, k0, k1);
}

// One block per row (grid-stride over rows): sort the row's keys in shared memory
// (bitonic, p = power of two >= cols, padded with all-ones keys), then
//   mode 0 (MagPrune): key = |d| bits : column, ascending; the element at rank r is kept
//          with probability table[r] (u < table[r]) and divided by it if `inverse`;
//   mode 1 (row top-k): key = ~|d| bits : column, ascending, so the first `topk` ranks are
//          the k largest with ties going to the lower column.
extern "C" __global__ void mf_rows(float* __restrict__ d, u32 rows, u32 cols, u32 p, int mode,
                                   const float* __restrict__ table, int inverse, u32 topk,
                                   u32 k0, u32 k1) {
    extern __shared__ u64 keys[];
    for (u32 row = blockIdx.x; row < rows; row += gridDim.x) {
        float* r = d + (u64)row * cols;
        for (u32 j = threadIdx.x; j < p; j += blockDim.x) {
            u64 key = ~0ull;
            if (j < cols) {
                u32 b = mf_absbits(r[j]);
                if (mode == 1) b = ~b;
                key = ((u64)b << 32) | j;
            }
            keys[j] = key;
        }
        __syncthreads();
        for (u32 k = 2; k <= p; k <<= 1) {
            for (u32 s = k >> 1; s > 0; s >>= 1) {
                for (u32 i = threadIdx.x; i < p; i += blockDim.x) {
                    u32 o = i ^ s;
                    if (o > i) {
                        u64 a = keys[i], b = keys[o];
                        if ((a > b) == ((i & k) == 0)) { keys[i] = b; keys[o] = a; }
                    }
                }
                __syncthreads();
            }
        }
        for (u32 q = threadIdx.x; q < cols; q += blockDim.x) {
            u32 j = (u32)(keys[q] & 0xFFFFFFFFu);
            float v = r[j];
            r[j] = mode == 0 ? mf_prune_one(v, table[q], (u32)((u64)row * cols + j), inverse, k0, k1)
                             : MF_MUL(v, q < topk ? 1.0f : 0.0f);
        }
        __syncthreads();  // keys are reused by the next row
    }
}

// ---------------------------------------------------------------------------------------
// tensor-wide top-k (TIES trim): state per expert, 16 words
//   0 value prefix, 1 value mask, 2 k left, 3 index prefix, 4 index mask, 5 index k left,
//   6 count equal to the threshold, 7 index passes needed, 8 index cut (keep eq <= cut)
// hist: 256 counters per expert, zeroed by the select kernels after use.
// ---------------------------------------------------------------------------------------

extern "C" __global__ void mf_sel_init(u32* st, u32* hist, u32 k) {
    for (u32 i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    if (threadIdx.x < 16) st[threadIdx.x] = 0;
    __syncthreads();
    if (threadIdx.x == 0) { st[2] = k; st[8] = 0xFFFFFFFFu; }
}

// Warp-aggregated shared-memory histogram: differences of bf16 weights take few distinct
// values, so lanes with the same digit add once (one atomic per distinct digit per warp).
__device__ __forceinline__ void hist_add(u32* h, u32 digit) {  // digit 256 = none
    u32 peers = __match_any_sync(0xFFFFFFFFu, digit);
    u32 lane = threadIdx.x & 31u;
    if (digit < 256u && lane == (u32)(__ffs(peers) - 1)) atomicAdd(&h[digit], (u32)__popc(peers));
}

// mode 0: histogram of the value digit at `shift` among |d| matching the value prefix;
// mode 1: of the index digit among |d| == threshold matching the index prefix.
extern "C" __global__ void mf_hist(const float* __restrict__ d, u64 n, const u32* __restrict__ st,
                                   u32* hist, int shift, int mode) {
    __shared__ u32 h[256];
    if (mode == 1 && st[7] == 0) return;
    for (u32 i = threadIdx.x; i < 256; i += blockDim.x) h[i] = 0;
    __syncthreads();
    u32 vp = st[0], vm = st[1], ip = st[3], im = st[4];
    u32 lane = threadIdx.x & 31u;
    u64 stride = (u64)gridDim.x * blockDim.x;  // blockDim is a multiple of 32
    for (u64 w = (u64)blockIdx.x * blockDim.x + (threadIdx.x - lane); w < n; w += stride) {
        u64 i = w + lane;
        u32 digit = 256u;
        if (i < n) {
            u32 v = mf_absbits(d[i]);
            if (mode == 0) {
                if ((v & vm) == vp) digit = (v >> shift) & 255u;
            } else if (v == vp && ((u32)i & im) == ip) {
                digit = ((u32)i >> shift) & 255u;
            }
        }
        hist_add(h, digit);
    }
    __syncthreads();
    for (u32 i = threadIdx.x; i < 256; i += blockDim.x)
        if (h[i]) atomicAdd(&hist[i], h[i]);
}

// One thread: pick the digit holding the k-th element (values: from the top; indices:
// from the bottom), narrow the prefix, clear the histogram.
extern "C" __global__ void mf_select(u32* st, u32* hist, int shift, int mode) {
    if (threadIdx.x != 0 || (mode == 1 && st[7] == 0)) return;
    u32 k = st[mode == 0 ? 2 : 5], cum = 0;
    for (int s = 0; s < 256; s++) {
        u32 b = mode == 0 ? 255u - s : (u32)s;
        u32 c = hist[b];
        if (cum + c >= k) {
            if (mode == 0) {
                st[0] |= b << shift; st[1] |= 255u << shift; st[2] = k - cum;
                if (shift == 0) {
                    st[6] = c;
                    if (k - cum < c) { st[7] = 1; st[5] = k - cum; }  // ties at the threshold
                }
            } else {
                st[3] |= b << shift; st[4] |= 255u << shift; st[5] = k - cum;
                if (shift == 0) st[8] = st[3];
            }
            break;
        }
        cum += c;
    }
    for (int b = 0; b < 256; b++) hist[b] = 0;
}

// Keep |d| > threshold, and |d| == threshold up to the index cut.
extern "C" __global__ void mf_trim(float* __restrict__ d, u64 n, const u32* __restrict__ st) {
    u32 thr = st[0], cut = st[8];
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        u32 v = mf_absbits(d[i]);
        bool keep = v > thr || (v == thr && (u32)i <= cut);
        d[i] = MF_MUL(d[i], keep ? 1.0f : 0.0f);
    }
}

// ---------------------------------------------------------------------------------------
// consensus + fuse + scale
// ---------------------------------------------------------------------------------------

extern "C" __global__ void mf_fuse(Fuse f, const void* __restrict__ base, void* __restrict__ out, u64 n,
                                   u32* flag) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    int bad = 0;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        mf_st(out, f.out_dt, i, mf_fuse_one(&f, f.n_exp, f.mode, f.base_dt, base, i, &bad));
    if (bad) atomicOr(flag, 1u);
}
