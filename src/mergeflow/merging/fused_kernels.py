"""The Triton kernels of `fused.py` (imported only where Triton is; the launchers and the
torch fallbacks are there)."""

import triton
import triton.language as tl


@triton.jit
def lowbias32(x):
    """One round of rng's hash on uint32, products truncated back to 32 bits explicitly."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D).to(tl.uint32)
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B).to(tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def uniform24(i, k0, k1):
    """rng.uniform for int64 counters i: lowbias32 twice, keyed between rounds (rng.py)."""
    x = lowbias32((i & 0xFFFFFFFF).to(tl.uint32) ^ k0.to(tl.uint32, bitcast=True))
    x = lowbias32(x ^ k1.to(tl.uint32, bitcast=True))
    return (x >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit(do_not_specialize=["n", "offset", "k0", "k1"])
def uniform(out_ptr, n, offset, k0, k1, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, uniform24(i + offset, k0, k1), mask=i < n)


@triton.jit(do_not_specialize=["n", "offset", "k0", "k1", "keep"])
def dare_inverse(d_ptr, n, offset, k0, k1, keep, BLOCK: tl.constexpr):
    # steps.bernoulli_drop_ (rescale inverse): d * (u < keep), then / keep
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    d = tl.load(d_ptr + i, mask=m)
    u = uniform24(i + offset, k0, k1)
    x = d * tl.where(u < keep, 1.0, 0.0)
    tl.store(d_ptr + i, tl.math.div_rn(x, keep), mask=m)


@triton.jit(do_not_specialize=["n"])
def disjoint(d_ptr, w_ptr, n, N: tl.constexpr, ZERO_SIGN: tl.constexpr, BLOCK: tl.constexpr):
    # steps.disjoint_fuse_ (no mixing, normalised) on the stack d [N, n]; tau into d[0]
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    n64 = n.to(tl.int64)  # N * n may pass 2**31
    total = tl.load(d_ptr + i, mask=m, other=0.0) * tl.load(w_ptr)
    for t in tl.static_range(1, N):
        total = total + tl.load(d_ptr + (t * n64 + i), mask=m, other=0.0) * tl.load(w_ptr + t)
    if ZERO_SIGN == 1:
        gamma = tl.where(total >= 0.0, 1.0, -1.0)
    else:  # sign(), where 0 (or NaN) the given sign
        gamma = tl.where(total > 0.0, 1.0, tl.where(total < 0.0, -1.0, ZERO_SIGN * 1.0))
    num = tl.zeros_like(total)
    den = tl.zeros_like(total)
    for t in tl.static_range(N):
        w = tl.load(w_ptr + t)
        x = (tl.load(d_ptr + (t * n64 + i), mask=m, other=0.0) * w) * gamma
        agree = x > 0.0
        kept = tl.where(x < 0.0, 0.0, x)  # clamp(min=0): -0 and NaN stay as they are
        if t == 0:
            num = kept
            den = tl.where(agree, w, 0.0)
        else:
            num = num + kept
            den = den + tl.where(agree, w, 0.0)
    num = num * gamma
    den = tl.where(den == 0.0, 1.0, den)
    tl.store(d_ptr + i, tl.math.div_rn(num, den), mask=m)
