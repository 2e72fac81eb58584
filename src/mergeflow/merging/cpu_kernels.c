// CPU kernels of the direct engine (mergeflow/merging/direct.py, CpuEngine): the steps of
// kernels.cu for a block of rows on one core, built from the same per-element code
// (merge_ops.h). Compiled on first use (cc -O3 -ffp-contract=off, no fast-math) into the
// user's cache and called through ctypes, which releases the GIL: the engine runs one
// block per thread.
#include <stdlib.h>
#include "merge_ops.h"

// The hot loops are compiled for AVX2 (x86-64-v3) and AVX-512 (v4) next to the baseline,
// picked at load time (GCC/clang function multi-versioning). Vector instructions do the
// same IEEE operations per element: the bits do not depend on the version.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MF_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MF_HOT
#endif
#define MF_INLINE static inline __attribute__((always_inline))

// Loops over one block with the dtypes, modes and expert count as constants, so that the
// per-element code's branches fold away and the loop vectorises; the generic loop runs
// the rest.
MF_INLINE void delta_loop(float* restrict d, const void* ex, int ex_dt, const void* base, int base_dt, u64 n,
                          u64 offset, int dare, float keep, int inverse, u32 k0, u32 k1) {
    for (u64 i = 0; i < n; i++)
        d[i] = mf_delta_one(ex, ex_dt, base, base_dt, i, (u32)(offset + i), dare, keep, inverse, k0, k1);
}

#define DELTA_CASE(EX, B, DARE)                                                                 \
    if (ex_dt == EX && (B < 0 ? base == 0 : base != 0 && base_dt == B) && dare == DARE) {      \
        delta_loop(d, ex, EX, B < 0 ? 0 : base, B < 0 ? 0 : B, n, offset, DARE, keep, inverse, k0, k1); \
        return;                                                                                 \
    }

// d[i] = task vector of element i; `offset` is the block's first flat index (RNG counter).
MF_HOT void mfc_delta(float* d, const void* ex, int ex_dt, const void* base, int base_dt, u64 n, u64 offset,
                      int dare, float keep, int inverse, u32 k0, u32 k1) {
    DELTA_CASE(2, 2, 0) DELTA_CASE(2, 2, 1) DELTA_CASE(1, 1, 0) DELTA_CASE(1, 1, 1)
    DELTA_CASE(0, 0, 0) DELTA_CASE(0, 0, 1) DELTA_CASE(2, -1, 0) DELTA_CASE(1, -1, 0) DELTA_CASE(0, -1, 0)
    delta_loop(d, ex, ex_dt, base, base_dt, n, offset, dare, keep, inverse, k0, k1);
}

// Stable order of unique 64-bit keys: LSD radix sort, 8-bit digits; a digit that every key
// shares is skipped (the column's high bytes, the exponent's often).
static void sort_keys(u64* keys, u64* tmp, u32 n) {
    u64 *src = keys, *dst = tmp;
    u32 count[256];
    for (int shift = 0; shift < 64; shift += 8) {
        for (int b = 0; b < 256; b++) count[b] = 0;
        for (u32 i = 0; i < n; i++) count[(src[i] >> shift) & 255u]++;
        if (count[(src[0] >> shift) & 255u] == n) continue;
        u32 pos = 0;
        for (int b = 0; b < 256; b++) { u32 c = count[b]; count[b] = pos; pos += c; }
        for (u32 i = 0; i < n; i++) dst[count[(src[i] >> shift) & 255u]++] = src[i];
        u64* s = src; src = dst; dst = s;
    }
    if (src != keys) memcpy(keys, src, (size_t)n * sizeof(u64));
}

// Per row of d [rows, cols] (`row0`: the block's first row in the tensor):
//   mode 0, MagPrune: element of ascending rank q (|d| bits, then column) kept with
//           probability table[q], divided by it if `inverse`;
//   mode 1, row top-k: the `topk` largest |d| kept, ties to the lower column.
// `work` holds 2 * cols keys.
MF_HOT void mfc_rows(float* d, u32 rows, u32 cols, u64 row0, int mode, const float* table, int inverse, u32 topk,
              u32 k0, u32 k1, u64* work) {
    u64* keys = work;
    u64* tmp = work + cols;
    for (u32 row = 0; row < rows; row++) {
        float* r = d + (u64)row * cols;
        for (u32 j = 0; j < cols; j++) {
            u32 b = mf_absbits(r[j]);
            if (mode == 1) b = ~b;
            keys[j] = ((u64)b << 32) | j;
        }
        sort_keys(keys, tmp, cols);
        u64 first = (row0 + row) * (u64)cols;
        for (u32 q = 0; q < cols; q++) {
            u32 j = (u32)(keys[q] & 0xFFFFFFFFu);
            r[j] = mode == 0 ? mf_prune_one(r[j], table[q], (u32)(first + j), inverse, k0, k1)
                             : MF_MUL(r[j], q < topk ? 1.0f : 0.0f);
        }
    }
}

// Tensor-wide top-k by |d| (TIES trim): keep the k largest, ties to the lower index.
// Threshold by a two-pass radix select over the float bits (16 + 16 bits). Deltas of bf16
// weights take few distinct values: four interleaved histograms keep consecutive
// increments of one bin from waiting on each other.
MF_HOT int mfc_topk(float* d, u64 n, u64 k) {
    u32* hist = (u32*)calloc(4 * 65536, sizeof(u32));
    if (!hist) return 1;
    u64 i = 0;
    for (; i + 4 <= n; i += 4)
        for (int s = 0; s < 4; s++) hist[s * 65536 + (mf_absbits(d[i + s]) >> 16)]++;
    for (; i < n; i++) hist[mf_absbits(d[i]) >> 16]++;
    u64 cum = 0, left = k;
    u32 hi = 0;
    for (int b = 65535; b >= 0; b--) {
        u64 c = (u64)hist[b] + hist[65536 + b] + hist[2 * 65536 + b] + hist[3 * 65536 + b];
        if (cum + c >= k) { hi = (u32)b; left = k - cum; break; }
        cum += c;
    }
    for (int b = 0; b < 65536; b++) hist[b] = 0;
    for (i = 0; i < n; i++) {
        u32 v = mf_absbits(d[i]);
        if ((v >> 16) == hi) hist[v & 0xFFFFu]++;
    }
    cum = 0;
    u32 lo = 0;
    u64 eq = 0;
    for (int b = 65535; b >= 0; b--) {
        if (cum + hist[b] >= left) { lo = (u32)b; eq = hist[b]; left -= cum; break; }
        cum += hist[b];
    }
    free(hist);
    u32 thr = (hi << 16) | lo;
    if (eq == left) {  // every element equal to the threshold is kept
        for (i = 0; i < n; i++) d[i] = MF_MUL(d[i], mf_absbits(d[i]) >= thr ? 1.0f : 0.0f);
        return 0;
    }
    u64 eq_seen = 0;  // equal elements are kept in index order until `left` are kept
    for (i = 0; i < n; i++) {
        u32 v = mf_absbits(d[i]);
        int keep = v > thr || (v == thr && ++eq_seen <= left);
        d[i] = MF_MUL(d[i], keep ? 1.0f : 0.0f);
    }
    return 0;
}

// Vocabulary policy: src (`have` rows) as float32 [rows, cols], truncated or padded with
// the mean of its rows (accumulated in float64, row by row as the GPU kernel does).
int mfc_fit(float* dst, const void* src, int dt, u32 have, u32 rows, u32 cols) {
    u32 copy = have < rows ? have : rows;
    for (u64 i = 0; i < (u64)copy * cols; i++) dst[i] = mf_ld(src, dt, i);
    if (have >= rows) return 0;
    double* s = (double*)calloc(cols, sizeof(double));
    if (!s) return 1;
    for (u32 r = 0; r < have; r++)
        for (u32 c = 0; c < cols; c++) s[c] += (double)mf_ld(src, dt, (u64)r * cols + c);
    for (u32 r = have; r < rows; r++)
        for (u32 c = 0; c < cols; c++) dst[(u64)r * cols + c] = (float)(s[c] / (double)have);
    free(s);
    return 0;
}

MF_INLINE int fuse_loop(const struct Fuse* f, int n_exp, int mode, int base_dt, int out_dt, const void* base,
                        void* out, u64 n) {
    int bad = 0;
    for (u64 i = 0; i < n; i++) mf_st(out, out_dt, i, mf_fuse_one(f, n_exp, mode, base_dt, base, i, &bad));
    return bad;
}

#define FUSE_CASE(N, MODE, B, O)                                                                \
    if (lf.n_exp == N && lf.mode == MODE && lf.base_dt == B && lf.out_dt == O)                  \
        return fuse_loop(&lf, N, MODE, B, O, base, out, n);
#define FUSE_MODES(N, B, O) FUSE_CASE(N, 0, B, O) FUSE_CASE(N, 1, B, O) FUSE_CASE(N, 2, B, O) FUSE_CASE(N, 3, B, O)
#define FUSE_DTYPES(N) FUSE_MODES(N, 2, 2) FUSE_MODES(N, 1, 1) FUSE_MODES(N, 0, 0) FUSE_MODES(N, -1, 2) \
    FUSE_MODES(N, -1, 1) FUSE_MODES(N, -1, 0)

// out[i] = fused, scaled, base-added element i, in the output dtype; returns 1 when an
// input or the result is not finite.
MF_HOT int mfc_fuse(const struct Fuse* f, const void* base, void* out, u64 n) {
    struct Fuse lf = *f;  // a local copy: no store to `out` can change it
    FUSE_DTYPES(2) FUSE_DTYPES(3) FUSE_DTYPES(4)
    return fuse_loop(&lf, lf.n_exp, lf.mode, lf.base_dt, lf.out_dt, base, out, n);
}
