"""Keyed random draws: the same bits whatever the tensor order, chunking or device.

Every random number a merge uses is a pure function of (seed, tensor name, expert
index, element position). A 64-bit key is derived from the first three with BLAKE2b; the
element's flat index within its tensor is the counter. The counter and key go through two
rounds of the `lowbias32` integer hash (C. Wellons, "Hash function prospector", 2018;
good avalanche, bias ~0.17 of the ideal), keyed between rounds:

    x = H(H(i ^ k0) ^ k1),  u = (x >> 8) / 2**24   in [0, 1), 24 random bits.

It is computed with plain int32 tensor arithmetic (wrapping multiply, masked shifts), so
CPU and CUDA give identical bits; torch's own generators differ between devices and
depend on draw order, which is why they are not used for masks.
"""

from __future__ import annotations

import hashlib
import struct
import threading

_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)  # as signed int32: torch multiplies int32 by int32 scalars

MAX_ELEMENTS = 1 << 32  # counters are 32-bit; no LLM tensor comes near 4G elements


def stream_key(seed: int, tensor: str, expert: int, purpose: str = "mask") -> tuple[int, int]:
    """Two 32-bit key words for (seed, tensor name, expert index, purpose)."""
    h = hashlib.blake2b(f"{int(seed)}\x1f{tensor}\x1f{int(expert)}\x1f{purpose}".encode(), digest_size=8)
    k0, k1 = struct.unpack("<II", h.digest())
    return k0, k1


def _signed(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= (1 << 31) else x


def _lowbias32_(x):
    """In-place lowbias32 on an int32 tensor holding uint32 bit patterns."""
    import torch

    t = torch.empty_like(x)
    torch.bitwise_right_shift(x, 16, out=t).bitwise_and_(0xFFFF)
    x.bitwise_xor_(t).mul_(_M1)
    torch.bitwise_right_shift(x, 15, out=t).bitwise_and_(0x1FFFF)
    x.bitwise_xor_(t).mul_(_M2)
    torch.bitwise_right_shift(x, 16, out=t).bitwise_and_(0xFFFF)
    x.bitwise_xor_(t)
    return x


def random_bits(key: tuple[int, int], offset: int, numel: int, device="cpu"):
    """int32 tensor of `numel` hashed words for counters offset .. offset+numel-1."""
    import torch

    if offset < 0 or offset + numel > MAX_ELEMENTS:
        raise ValueError(f"counter range {offset}+{numel} exceeds 2**32")
    x = torch.arange(numel, dtype=torch.int32, device=device)
    if offset:
        x.add_(_signed(offset))  # wraps like uint32 addition
    x.bitwise_xor_(_signed(key[0]))
    _lowbias32_(x)
    x.bitwise_xor_(_signed(key[1]))
    _lowbias32_(x)
    return x


def uniform(key: tuple[int, int], offset: int, shape, device="cpu"):
    """float32 uniforms in [0, 1) on a 2**-24 grid, shaped `shape`."""
    import torch

    numel = 1
    for s in shape:
        numel *= s
    if offset < 0 or offset + numel > MAX_ELEMENTS:
        raise ValueError(f"counter range {offset}+{numel} exceeds 2**32")
    if torch.device(device).type == "cuda" and numel >= (1 << 16):
        kernel = _gpu_uniform(torch.device(device))
        if kernel is not None:  # one fused pass instead of ~30 elementwise kernels
            return kernel(key, offset, numel, device).view(shape)
    if torch.device(device).type == "cpu" and numel >= (1 << 16):
        return torch.from_numpy(_np_uniform(key, offset, numel)).view(shape)
    x = random_bits(key, offset, numel, device)
    x.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF)
    u = x.to(torch.float32).mul_(1.0 / (1 << 24))  # exact: 24-bit integers times 2**-24
    return u.view(shape)


_SUB = 1 << 16  # elements hashed per step on the CPU: the working set stays in L2 cache
_POOL = None


def _np_uniform_part(out, key, offset: int) -> None:
    """`uniform` for counters offset.. into float32 `out`, with numpy uint32 arithmetic
    (logical shifts, wrapping products) in cache-sized steps: the ~20 passes of the hash
    then run from L2 instead of memory, faster than whole-block torch ops."""
    import numpy as np

    m1, m2 = np.uint32(_M1), np.uint32(0x846CA68B)
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    ramp = np.arange(_SUB, dtype=np.uint32)
    x = np.empty(_SUB, np.uint32)
    t = np.empty(_SUB, np.uint32)
    with np.errstate(over="ignore"):
        for s in range(0, out.size, _SUB):
            m = min(_SUB, out.size - s)
            xv, tv = x[:m], t[:m]
            np.add(ramp[:m], np.uint32((offset + s) & 0xFFFFFFFF), out=xv)
            for k in (k0, k1):
                np.bitwise_xor(xv, k, out=xv)
                np.right_shift(xv, 16, out=tv)
                np.bitwise_xor(xv, tv, out=xv)
                np.multiply(xv, m1, out=xv)
                np.right_shift(xv, 15, out=tv)
                np.bitwise_xor(xv, tv, out=xv)
                np.multiply(xv, m2, out=xv)
                np.right_shift(xv, 16, out=tv)
                np.bitwise_xor(xv, tv, out=xv)
            np.right_shift(xv, 8, out=xv)
            np.multiply(xv, np.float32(1.0 / (1 << 24)), out=out[s:s + m], casting="unsafe")


def _np_uniform(key, offset: int, numel: int):
    """CPU uniforms, split over a few threads (numpy releases the GIL in its loops)."""
    global _POOL
    from concurrent.futures import ThreadPoolExecutor

    from mergeflow.merging import cpu_threads

    import numpy as np

    out = np.empty(numel, np.float32)
    workers = min(4, cpu_threads(), max(1, numel // (1 << 20)))
    if workers <= 1:
        _np_uniform_part(out, key, offset)
        return out
    if _POOL is None:
        _POOL = ThreadPoolExecutor(4, thread_name_prefix="mergeflow-rng")
    step = -(-numel // workers // _SUB) * _SUB
    list(_POOL.map(lambda s: _np_uniform_part(out[s:s + step], key, offset + s), range(0, numel, step)))
    return out


def mixup_weights(seed: int, alpha: float, n: int) -> list[float]:
    """M3 mixing ratios: Dirichlet(alpha, ..., alpha) over n experts (Beta for n = 2).

    Drawn once per merge from a generator keyed by the seed alone; alpha <= 0 gives
    (1, 0, ..., 0) as in the reference code.
    """
    import numpy as np

    if alpha <= 0:
        return [1.0] + [0.0] * (n - 1)
    k0, k1 = stream_key(seed, "", 0, "m3-mixup")
    rng = np.random.Generator(np.random.PCG64([k0, k1]))
    if n == 2:
        lam = float(rng.beta(alpha, alpha))
        return [lam, 1.0 - lam]
    return [float(v) for v in rng.dirichlet([alpha] * n)]


_GPU: dict = {}
_GPU_LOCK = threading.Lock()  # one thread imports and loads the kernel; the others wait for it


def _gpu_uniform(device):
    """The fused Triton kernel for `uniform` on `device`, or None (tensor ops):
    MERGEFLOW_GPU_RNG=torch (tests compare the two) or no Triton."""
    import os

    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _GPU:
        with _GPU_LOCK:
            if index not in _GPU:
                _GPU[index] = _triton_uniform() if os.environ.get("MERGEFLOW_GPU_RNG", "triton") != "torch" else None
    return _GPU[index]


def _triton_uniform():
    """The same hash as a fused Triton kernel (CUDA only; `fused.py`), or None when Triton is
    absent. Bit-identical to the tensor-op version (integer arithmetic)."""
    from mergeflow.merging import fused

    kernels = fused._kernels()
    return kernels["uniform"] if kernels else None
