// CPU kernels of the direct engine (mergeflow/merging/direct.py, CpuEngine): the steps of
// kernels.cu for a block of rows on one core, built from the same per-element code
// (merge_ops.h). Compiled on first use (cc -O3 -ffp-contract=off, no fast-math) into the
// user's cache and called through ctypes, which releases the GIL: the engine runs one
// block per thread.
#include <stdlib.h>
#include "merge_ops.h"

// The hot loops are compiled for AVX2 (x86-64-v3) next to the baseline,
// picked at load time (GCC/clang function multi-versioning). Vector instructions do the
// same IEEE operations per element: the bits do not depend on the version.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MF_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
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

// Per row of d [rows, cols] (`row0`: the block's first row in the tensor):
//   mode 0, MagPrune: element of ascending rank q (|d| bits, then column) kept with
//           probability table[q], divided by it if `inverse`;
//   mode 1, row top-k: the `topk` largest |d| kept, ties to the lower column.
// `work` holds 4 * cols words.
MF_HOT void mfc_rows(float* d, u32 rows, u32 cols, u64 row0, int mode, const float* table, int inverse, u32 topk,
                     u32 k0, u32 k1, u32* work) {
    for (u32 row = 0; row < rows; row++) {
        float* r = d + (u64)row * cols;
        u32 *key = work, *col = work + cols, *key2 = work + 2 * (u64)cols, *col2 = work + 3 * (u64)cols;
        for (u32 j = 0; j < cols; j++) {
            u32 b = mf_absbits(r[j]);
            key[j] = mode == 1 ? ~b : b;
            col[j] = j;
        }
        // ascending stable order of the keys (the columns start ascending, so ties stay in
        // column order): LSD radix sort, 8-bit digits, a digit every key shares skipped
        u32 count[256];
        for (int shift = 0; shift < 32; shift += 8) {
            for (int b = 0; b < 256; b++) count[b] = 0;
            for (u32 i = 0; i < cols; i++) count[(key[i] >> shift) & 255u]++;
            if (count[(key[0] >> shift) & 255u] == cols) continue;
            u32 pos = 0;
            for (int b = 0; b < 256; b++) { u32 c = count[b]; count[b] = pos; pos += c; }
            for (u32 i = 0; i < cols; i++) {
                u32 at = count[(key[i] >> shift) & 255u]++;
                key2[at] = key[i];
                col2[at] = col[i];
            }
            u32* s = key; key = key2; key2 = s;
            s = col; col = col2; col2 = s;
        }
        u64 first = (row0 + row) * (u64)cols;
        for (u32 q = 0; q < cols; q++) {
            u32 j = col[q];
            r[j] = mode == 0 ? mf_prune_one(r[j], table[q], (u32)(first + j), inverse, k0, k1)
                             : MF_MUL(r[j], q < topk ? 1.0f : 0.0f);
        }
    }
}

// Tensor-wide top-k by |d| (TIES trim): keep the k largest, ties to the lower index.
// Threshold by radix select over the 31 bits of |d| (11 + 10 + 10: the histograms stay in
// L1). Deltas of bf16 weights take few distinct values: four interleaved histograms in
// the full pass keep consecutive increments of one bin from waiting on each other.
static u32 pick_from_top(const u32* hist, int bins, u64* left, u64* count) {
    u64 cum = 0;
    for (int b = bins - 1; b >= 0; b--) {
        if (cum + hist[b] >= *left) { *left -= cum; *count = hist[b]; return (u32)b; }
        cum += hist[b];
    }
    *count = 0;
    return 0;  // (unreachable for 1 <= left <= n)
}

// Histogram of digit(d[i]) over the elements in the current bin: branch-free (a digit of
// NONE lands in a spare bin), four interleaved copies.
#define NONE 2048u
#define HIST4(DIGIT)                                                                            \
    do {                                                                                        \
        for (int s_ = 0; s_ < 4; s_++)                                                          \
            for (int b_ = 0; b_ <= 2048; b_++) h4[s_][b_] = 0;                                  \
        u64 i_ = 0;                                                                             \
        for (; i_ + 4 <= n; i_ += 4)                                                            \
            for (int s_ = 0; s_ < 4; s_++) { u32 v = mf_absbits(d[i_ + s_]); h4[s_][DIGIT]++; } \
        for (; i_ < n; i_++) { u32 v = mf_absbits(d[i_]); h4[0][DIGIT]++; }                    \
        for (int b_ = 0; b_ < 2048; b_++) hist[b_] = h4[0][b_] + h4[1][b_] + h4[2][b_] + h4[3][b_]; \
    } while (0)

MF_HOT int mfc_topk(float* d, u64 n, u64 k) {
    u32 h4[4][2049];
    u32 hist[2048];
    u64 left = k, eq = 0;
    HIST4(v >> 20);
    u32 p1 = pick_from_top(hist, 2048, &left, &eq);
    HIST4((v >> 20) == p1 ? (v >> 10) & 1023u : NONE);
    u32 p2 = (p1 << 10) | pick_from_top(hist, 1024, &left, &eq);
    HIST4((v >> 10) == p2 ? v & 1023u : NONE);
    u32 thr = (p2 << 10) | pick_from_top(hist, 1024, &left, &eq);
    // Elements equal to the threshold are kept in index order up to the `left`-th: find its
    // index (counts per block, then one block element-wise), then one vectorised pass.
    u64 cut = n;  // eq kept where index <= cut
    if (eq != left) {
        u64 seen = 0, i = 0;
        for (; i < n; i += 4096) {
            u64 end = i + 4096 < n ? i + 4096 : n, c = 0;
            for (u64 j = i; j < end; j++) c += mf_absbits(d[j]) == thr;
            if (seen + c >= left) break;
            seen += c;
        }
        for (; i < n; i++)
            if (mf_absbits(d[i]) == thr && ++seen == left) { cut = i; break; }
    }
    for (u64 i = 0; i < n; i++) {
        u32 v = mf_absbits(d[i]);
        d[i] = MF_MUL(d[i], ((v > thr) | ((v == thr) & (i <= cut))) ? 1.0f : 0.0f);
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
