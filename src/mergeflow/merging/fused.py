"""Fused Triton kernels for the CUDA merge: one pass where the torch steps take many.

A sparsifying merge of one block launches dozens of small torch operations (per expert:
draw, compare, multiply, divide; then the election and the disjoint mean); on the GPU the
main thread's launches, not the arithmetic, bound the merge (benchmarks/README.md, GPU
profile). Each kernel here does the same float32 operations in the same order, one
rounding each (no FMA contraction: `enable_fp_fusion=False`; IEEE division: `div_rn`), so
the bits equal those of the torch steps in `steps.py` on the CPU, which made the recorded
release bytes (tests/test_merge_gpu.py compares them). MERGEFLOW_GPU_FUSED=torch uses the
torch steps instead; without Triton they run.
"""

from __future__ import annotations

import os
import threading

from mergeflow.merging.rng import _signed

_KERNELS = None  # None: not loaded yet; False: no Triton (or switched off)
_LOCK = threading.Lock()
_WEIGHTS: dict = {}  # (weights, device) -> float32 device tensor, made once per merge
BLOCK = 1024
MAX_EXPERTS = 16  # the election loop is unrolled over the experts; more run the torch steps


def enabled() -> bool:
    return os.environ.get("MERGEFLOW_GPU_FUSED", "triton") != "torch" and bool(_kernels())


def _kernels():
    """The compiled kernels' launchers, or False when Triton is absent."""
    global _KERNELS
    if _KERNELS is None:
        with _LOCK:
            if _KERNELS is None:
                _KERNELS = _build() or False
    return _KERNELS


def _build():
    try:
        import triton

        from mergeflow.merging import fused_kernels as fk
    except ImportError:
        return None

    def uniform(key, offset, numel, device):
        import torch

        out = torch.empty(numel, dtype=torch.float32, device=device)
        fk.uniform[(triton.cdiv(numel, BLOCK),)](out, numel, offset, _signed(key[0]), _signed(key[1]), BLOCK=BLOCK)
        return out

    def dare_inverse_(d, keep, key, offset):
        n = d.numel()
        fk.dare_inverse[(triton.cdiv(n, BLOCK),)](d, n, offset, _signed(key[0]), _signed(key[1]), keep,
                                                  BLOCK=BLOCK, enable_fp_fusion=False)
        return d

    def disjoint_(stack, weights, zero_sign):
        n_exp = stack.shape[0]
        n = stack[0].numel()
        fk.disjoint[(triton.cdiv(n, BLOCK),)](stack, _weights(weights, stack.device), n, N=n_exp,
                                              ZERO_SIGN=int(zero_sign), BLOCK=BLOCK, enable_fp_fusion=False)
        return stack[0]

    return {"uniform": uniform, "dare_inverse_": dare_inverse_, "disjoint_": disjoint_}


def _weights(weights, device):
    """The merge's expert weights as a float32 device tensor, made once (a host copy per
    block would wait for the GPU)."""
    import torch

    from mergeflow.merging.steps import f32

    key = (tuple(weights), str(device))
    if key not in _WEIGHTS:
        _WEIGHTS[key] = torch.tensor([f32(w) for w in weights], dtype=torch.float32, device=device)
    return _WEIGHTS[key]


def dare_inverse_(delta, keep: float, key, offset: int) -> bool:
    """`steps.bernoulli_drop_` with rescale inverse in one pass, in place; False: not done."""
    if not (delta.is_cuda and delta.is_contiguous() and enabled()):
        return False
    _kernels()["dare_inverse_"](delta, keep, key, offset)
    return True


def disjoint_(deltas, weights, zero_sign: int):
    """`steps.disjoint_fuse_` (no mixing, normalised) in one pass: tau in deltas[0]'s
    buffer; None: not done (a CPU tensor, more than MAX_EXPERTS, or no Triton)."""
    if not (deltas.is_cuda and deltas.is_contiguous() and deltas.shape[0] <= MAX_EXPERTS and enabled()):
        return None
    return _kernels()["disjoint_"](deltas, weights, zero_sign)


def warm(device, *, draws: bool, experts: int | None) -> threading.Thread:
    """Import Triton and compile (or load from its cache) the kernels a merge will use, on
    `device`, in a background thread: the first block does not wait for them. `draws`: the
    keyed uniforms and DARE's drop; `experts`: the election for that many experts."""
    import torch

    def run():
        try:
            with torch.cuda.device(device):
                from mergeflow.merging import rng

                if draws:
                    rng.uniform((0, 0), 0, (1 << 16,), device)
                    dare_inverse_(torch.zeros(BLOCK, device=device), 0.5, (0, 0), 0)
                if experts:
                    disjoint_(torch.zeros(experts, BLOCK, device=device), [1.0] * experts, 1)
                torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - the merge's own first launch retries and reports
            pass

    t = threading.Thread(target=run, name="mergeflow-triton-warm", daemon=True)
    t.start()
    return t
