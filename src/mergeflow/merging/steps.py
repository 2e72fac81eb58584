"""The steps every merge method is composed of: sparsify -> consensus -> fuse -> scale.

All functions act on float32 tensors of one tensor (or a block of its rows) viewed as 2-D
`[rows, cols]` (a 1-D tensor is one row); expert stacks are `[N, rows, cols]`. Functions
ending in `_` modify their input in place (the engine owns the buffers and they are big).
Random steps take keyed uniforms from `rng`, indexed by the element's flat position in
the whole tensor (`offset` = first row * cols), so a block gives the same draws as the
whole tensor would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mergeflow.merging import fused, rng


@dataclass
class Block:
    """One block of rows of one tensor, as the engine hands it to a method.

    `experts` is [N, rows, cols] float32, the expert weights or (`is_delta`) the task
    vectors, consumed in place; `base` is [rows, cols] float32 or None. `row0` is the
    block's first row in the whole tensor.
    """

    name: str
    base: Any
    experts: Any
    row0: int
    seed: int
    thresholds: list | None = None  # model-scope trim thresholds per expert
    topk: list | None = None  # a tensor-scope trim streamed over blocks: [threshold, ties left] per expert
    zero_sign: int = 1  # elected sign where the weighted deltas sum to 0 (model scope: majority)
    tables: dict | None = None  # cache of MagPrune keep tables
    is_delta: bool = False  # `experts` already holds task vectors (expert - base)
    shape: tuple | None = None  # the whole tensor's shape (None: the 2-D block's own)

    @property
    def is_matrix(self) -> bool:
        """A 2-D tensor (what the SVD methods decompose; 1-D and 3-D+ tensors are not)."""
        return len(self.shape) == 2 if self.shape is not None else True

    @property
    def offset(self) -> int:
        return self.row0 * self.experts.shape[-1]

    def key(self, expert: int, purpose: str):
        return rng.stream_key(self.seed, self.name, expert, purpose)

    def deltas(self):
        """The task vectors [N, rows, cols] (expert - base, computed in place once)."""
        if not self.is_delta:
            self.experts.sub_(self.base)
            self.is_delta = True
        return self.experts

# ---------------------------------------------------------------------------------------
# reductions: the same bits on every device
# ---------------------------------------------------------------------------------------

CASCADE_LANES = 8  # float32 lanes of the AVX2 kernel whose order the recorded release bytes have


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


def _running_sum(t):
    """0 + t[0] + t[1] + ... along dim 0, one element-wise add at a time (a fixed order)."""
    import torch

    acc = torch.zeros(t.shape[1:], dtype=t.dtype, device=t.device)
    for j in range(t.shape[0]):
        acc.add_(t[j])
    return acc


def _cascade_rows(rows):
    """torch's CPU `multi_row_sum` over dim 0 of `rows` [R, L]: running sums of chunks of
    2^p rows, of chunks of those, ... (4 levels), each level a fixed order. The two big
    levels run on `rows`' device, the few rows left on the CPU (a GPU would spend a kernel
    launch per add); returns a CPU tensor [L]."""
    r, lanes = rows.shape
    step = 1 << max(4, _ceil_log2(r) // 4)

    def groups(t, g):  # running sums of `g` complete groups of `step` rows
        return _running_sum(t[:g * step].view(g, step, lanes).transpose(0, 1)) if g else t.new_zeros(0, lanes)

    c0 = r // step
    chunk = groups(rows, c0)
    g1 = c0 // step
    s1 = groups(chunk, g1).cpu()
    acc0 = _running_sum(rows[c0 * step:].cpu())
    acc1 = _running_sum(chunk[g1 * step:].cpu())
    g2 = g1 // step
    acc2 = _running_sum(s1[g2 * step:])
    acc3 = _running_sum(groups(s1, g2))
    return acc0.add_(acc1).add_(acc2).add_(acc3)


def cascade_sum(x, lanes: int = CASCADE_LANES) -> float:
    """Sum of the float32 tensor `x`, rounded as torch's single-threaded CPU `sum` rounds it
    (AVX2 build): the order of its cascade, replayed with element-wise adds.

    A reduction kernel's order depends on the device, the vector width and the thread
    count (float32 addition is not associative), so `x.sum()` is not the same number on a
    GPU; element-wise adds are. Equal to `x.sum()` on one AVX2 CPU thread, which made the
    recorded release bytes (tests/data/merge_bits_sha256.json).
    """
    import torch

    flat = x.reshape(-1)
    n = flat.numel()
    w = lanes if n >= lanes else 1  # shorter: the scalar kernel
    nvec = n // w
    nilp = nvec // 4
    part = _cascade_rows(flat[:nilp * 4 * w].view(nilp, 4 * w)).view(4, w)
    rest = flat[nilp * 4 * w:].cpu()  # < 4 vectors left over from the 4-way interleave, then < w scalars
    p0 = part[0]
    for i in range(nvec - nilp * 4):
        p0.add_(rest[i * w:(i + 1) * w])
    p0.add_(part[1]).add_(part[2]).add_(part[3])
    total = torch.zeros((), dtype=torch.float32)
    for v in torch.cat([rest[(nvec - nilp * 4) * w:], p0]):  # the scalar tail, then the lanes
        total.add_(v)
    return float(total)


def l1_norm(x) -> float:
    """sum |x| (float32, `cascade_sum`): the same number on every device."""
    return cascade_sum(x.abs())


def sum_experts(stack):
    """stack[0] + stack[1] + ... over dim 0 of [N, ...], in that order on every device
    (= torch's CPU sum over dim 0 for N <= 4; a CUDA reduction may pair them otherwise)."""
    if len(stack) == 1:
        return stack[0].clone()
    out = stack[0] + stack[1]
    for s in stack[2:]:
        out.add_(s)
    return out


# ---------------------------------------------------------------------------------------
# sparsify
# ---------------------------------------------------------------------------------------


def f32(x: float) -> float:
    """Round a Python float to float32, so comparing or dividing a float32 tensor by it
    gives the same result whether a device computes the scalar in float or double."""
    import struct

    return struct.unpack("f", struct.pack("f", x))[0]


def keep_count(density: float, n: int) -> int:
    """Elements a magnitude trim keeps out of n: int(density * n), at least one.

    As mergekit's `magnitude` (and the DELLA fork's, which asserts instead of clamping).
    """
    if density >= 1:
        return n
    return max(1, int(density * n)) if n else 0


def kth_largest_flat(a, k: int) -> tuple[float, int, int]:
    """Exact k-th largest (1-based) of a flat float32 tensor of values >= 0.

    Returns (value, count of elements > value, count of elements == value). On the CPU a
    two-pass radix select over the float bits (non-negative floats order like their bit
    patterns; bincount of the high, then of the low 16 bits) is faster than
    `torch.kthvalue` and yields both counts for free; on CUDA `kthvalue` is itself a
    radix select.
    """
    import torch

    if a.device.type != "cpu" or a.numel() < (1 << 16):
        thr = torch.kthvalue(a, a.numel() - k + 1).values
        return float(thr), int(torch.count_nonzero(a > thr)), int(torch.count_nonzero(a == thr))
    bits = a.view(torch.int32)
    hi = bits >> 16
    top = torch.bincount(hi, minlength=1 << 16).flip(0).cumsum(0)  # counts from the top
    j = int(torch.searchsorted(top, k))
    b = (1 << 16) - 1 - j
    above = int(top[j - 1]) if j > 0 else 0
    # Second pass over the elements of bin b only: one compare and a gather beat shifting
    # and clamping every element (benchmarks/README.md, numbers behind comments).
    hist = torch.bincount(bits[hi == b] & 0xFFFF, minlength=1 << 16).flip(0)
    top = hist.cumsum(0)
    j2 = int(torch.searchsorted(top, k - above))
    lo = (1 << 16) - 1 - j2
    value = float(torch.tensor([(b << 16) | lo], dtype=torch.int32).view(torch.float32))
    n_gt = above + (int(top[j2 - 1]) if j2 > 0 else 0)
    return value, n_gt, int(hist[j2])


def _kth_largest_device(a, k: int):
    """k-th largest (1-based) of flat `a` (values >= 0) as a 0-dim device tensor, without
    a host sync: the smallest of the k largest float bits (non-negative floats order like
    their int32 bit patterns), by torch.topk's radix select, unsorted.

    A full sort of the bits did the same and cost more (benchmarks/kth_bench.py); a histogram
    radix select lost badly on real deltas: differences of bf16 weights have few distinct
    values, so millions of atomic increments land on a handful of bins and serialise
    (benchmarks/README.md has the timings).
    """
    import torch

    return torch.topk(a.reshape(-1).view(torch.int32), k, sorted=False).values.min().view(torch.float32)


def _keep_first_(flags, need: int, block: int = 1 << 16):
    """Clear all but the first `need` True entries of the flat bool tensor `flags`.

    Counts per block of 65536 locate the block where the count reaches `need`; only that
    block is searched element by element.
    """
    import torch

    n = flags.numel()
    nb = n // block
    before = 0
    start = nb * block  # where the element-wise search starts (the tail by default)
    if nb:
        # an int32 sum per block is faster than count_nonzero along dim 1; the running total needs int64
        cum = flags[:start].view(nb, block).sum(dim=1, dtype=torch.int32).cumsum(0, dtype=torch.int64)
        j = int(torch.searchsorted(cum, need))
        if j < nb:
            before = int(cum[j - 1]) if j > 0 else 0
            start = j * block
        else:
            before = int(cum[-1])
    end = min(n, start + block) if start < nb * block else n
    idx = flags[start:end].nonzero().view(-1)[need - before:]
    flags[start:end][idx] = False
    flags[end:] = False


def topk_mask(scores, k: int):
    """Bool mask of the k largest entries of each row of `scores` [rows, n] (scores >= 0).

    Exactly k per row; among equal scores the lower column index wins, so the mask is
    the same on every device.
    """
    import torch

    rows, n = scores.shape
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if scores.device.type != "cpu":
        # All on the device, no host synchronisation: ties resolved by a running count.
        # kthvalue gives each row one thread block, fine for many rows of thousands but
        # hopeless for one row of millions: use a radix select there.
        if rows == 1 and n >= (1 << 16):
            thr = _kth_largest_device(scores.view(-1), k).view(1, 1)
        else:
            thr = torch.kthvalue(scores, n - k + 1, dim=1, keepdim=True).values
        gt = scores > thr
        need = k - gt.sum(dim=1, keepdim=True, dtype=torch.int64)
        eq = scores == thr
        # A 1-D cumsum runs as one device-wide scan; along dim 1 of a single row it would
        # run in one thread block, the bulk of a large TIES merge.
        run = eq.view(-1).cumsum(0, dtype=torch.int64).view(rows, n) if rows == 1 else \
            eq.cumsum(dim=1, dtype=torch.int64)
        eq &= run <= need
        return eq.logical_or_(gt)
    if rows == 1:
        thr, n_gt, n_eq = kth_largest_flat(scores.view(-1), k)
        if n_gt + n_eq == k:
            return scores >= thr
        eq = scores == thr  # ties at the threshold: the lowest indices make up k
        _keep_first_(eq.view(-1), k - n_gt)
        return eq.logical_or_(scores > thr)
    # k-th largest = (n-k+1)-th smallest, per row.
    thr = torch.kthvalue(scores, n - k + 1, dim=1, keepdim=True).values
    mask = scores > thr
    need = k - mask.sum(dim=1, keepdim=True)
    eq = scores == thr
    if bool((eq.sum(dim=1, keepdim=True) != need).any()):  # ties at the threshold
        eq &= eq.to(torch.int32).cumsum(dim=1) <= need
    return mask.logical_or_(eq)


def magnitude_trim_(deltas, density: float, scope: str):
    """TIES trim in place: keep the largest-|delta| fraction `density` of each expert.

    scope `tensor`: over the whole block (must be the whole tensor); `row`: per row.
    """
    if density >= 1:
        return deltas
    for d in deltas:
        scores = d.abs()
        if scope == "tensor":
            scores = scores.view(1, -1)
        k = keep_count(density, scores.shape[1])
        d.mul_(topk_mask(scores, k).view(d.shape))
    return deltas


def streamed_topk_trim_(deltas, state):
    """The tensor-scope TIES trim of one block of a tensor merged block by block, in row
    order: keep |delta| > the tensor's k-th largest, and of the values equal to it the
    first ones in flat order while ties are left (`state`: [threshold, ties left] per
    expert, from the engine's pre-pass; updated). The same elements as `magnitude_trim_`
    over the whole tensor."""
    import torch

    for d, st in zip(deltas, state):
        a = d.abs()
        keep = a > st[0]
        if st[1] > 0:
            eq = a == st[0]
            n_eq = int(torch.count_nonzero(eq))
            if n_eq > st[1]:
                _keep_first_(eq.view(-1), st[1])
            st[1] = max(0, st[1] - n_eq)
            keep.logical_or_(eq)
        d.mul_(keep)
    return deltas


def outlier_trim_(deltas, density: float, gamma: float):
    """Model Breadcrumbs in place, per expert over the whole block (the whole tensor): keep
    int(density * n) elements by |delta|, the largest after the int(gamma * n) largest,
    mergekit's `magnitude_outliers` exactly (fewer outliers go when density + gamma > 1;
    density >= 1 keeps all). mergekit sorts without a tie rule; among equal |delta| the
    lower flat index counts as larger here (`topk_mask`), so masks agree on every device."""
    if density >= 1:
        return deltas
    for d in deltas:
        n = d.numel()
        target = int(density * n)
        n_bot = max(0, n - target - int(gamma * n))
        scores = d.abs().view(1, -1)
        # nested top-k sets (one total order): keep ranks [n - n_bot - target, n - n_bot) from the top
        keep = topk_mask(scores, n - n_bot)
        keep &= ~topk_mask(scores, n - n_bot - target)
        d.mul_(keep.view(d.shape))
    return deltas


def tall_consensus_(tau, deltas, lambdas, k: float):
    """Consensus merging (Wang et al., ICML 2024) in place on the merged task vector `tau`:
    TALL masks m_t = |delta_t| > lambda_t |tau - delta_t| (the reference code's strict >),
    keep tau where at least k experts' masks hold."""
    import torch

    count = torch.zeros_like(tau)
    for d, lam in zip(deltas, lambdas):
        count.add_(d.abs() > (tau - d).abs_().mul_(f32(lam)))
    return tau.mul_(count >= k)


def threshold_trim_(deltas, thresholds):
    """Global (model-scope) trim: keep |delta| >= the expert's model-wide threshold."""
    for d, t in zip(deltas, thresholds):
        if t is not None:
            d.mul_(d.abs() >= t)
    return deltas


def rescale_l1_(masked, original_l1: float, eps: float = 1e-7):
    """Scale `masked` so its L1 norm matches the unmasked tensor's (upstream mergekit)."""
    after = l1_norm(masked)
    if original_l1 < eps or after < eps:
        return masked
    return masked.mul_(original_l1 / after)


def bernoulli_drop_(delta, drop_rate: float, rescale: str, key, offset: int):
    """DARE: drop each element with probability p; rescale survivors by 1/(1-p) or L1."""
    if drop_rate <= 0:
        return delta
    keep = f32(1.0 - drop_rate)
    if rescale == "inverse" and fused.dare_inverse_(delta, keep, key, offset):  # CUDA: one pass
        return delta
    l1 = l1_norm(delta) if rescale == "l1" else None
    u = rng.uniform(key, offset, delta.shape, delta.device)
    mask = u < keep
    del u
    delta.mul_(mask)
    if rescale == "inverse":
        div_exact_(delta, keep)
    elif rescale == "l1":
        rescale_l1_(delta, l1)
    return delta


def keep_table_np(n: int, drop_rate: float, window_size: float):
    """MagPrune keep probability by ascending |delta| rank r = 0..n-1 (float32 numpy [n]).

    k_r = (1 - p) - eps + 2 eps r / (n - 1), eps = window_size / 2; one element: 1 - p.
    Computed in float64 on the CPU, so every device and engine uses the same float32 values.
    """
    import numpy as np

    eps = window_size / 2.0
    if n == 1:
        return np.array([1.0 - drop_rate], dtype=np.float32)
    r = np.arange(n, dtype=np.float64)
    return ((1.0 - drop_rate) - eps + (2.0 * eps) * r / (n - 1)).astype(np.float32)


def keep_table(n: int, drop_rate: float, window_size: float):
    """`keep_table_np` as a float32 CPU tensor."""
    import torch

    return torch.from_numpy(keep_table_np(n, drop_rate, window_size))


_SORT_POOL = None


def _sort_rows_np(key) -> None:
    """Sort an int64 numpy array along its rows in place, rows split over a few threads
    (numpy's SIMD sort releases the GIL)."""
    global _SORT_POOL
    from concurrent.futures import ThreadPoolExecutor

    from mergeflow.merging import cpu_threads

    rows = key.shape[0]
    workers = min(4, cpu_threads(), rows)
    if workers <= 1 or key.size < (1 << 20):
        key.sort(axis=1)
        return
    if _SORT_POOL is None:
        _SORT_POOL = ThreadPoolExecutor(4, thread_name_prefix="mergeflow-sort")
    step = -(-rows // workers)
    list(_SORT_POOL.map(lambda r: key[r:r + step].sort(axis=1), range(0, rows, step)))


def sorted_columns(scores):
    """Column indices of each row of `scores` [rows, n] (values >= 0) in ascending order,
    ties by lower index: what a stable argsort gives, on every device.

    On CUDA: torch's stable segmented sort. On the CPU a stable torch sort is slow, so
    each value's float bits and its column are packed into one int64 key (non-negative
    floats order like their bits; the column makes every key unique, so any sort is
    stable) and sorted with numpy's SIMD sort, which is much faster.
    """
    import numpy as np
    import torch

    if scores.device.type != "cpu":
        return torch.sort(scores, dim=1, stable=True).indices
    n = scores.shape[1]
    key = scores.contiguous().view(torch.int32).numpy().astype(np.int64)
    key <<= 32
    key |= np.arange(n, dtype=np.int64)
    _sort_rows_np(key)
    key &= 0xFFFFFFFF
    return torch.from_numpy(key)


def ranks_ascending(scores):
    """0-based rank of each entry within its row by ascending score (ties: lower index first)."""
    import torch

    idx = sorted_columns(scores)
    ar = torch.arange(scores.shape[1], device=scores.device).expand_as(idx)
    return torch.empty_like(idx).scatter_(1, idx, ar)


def magprune_(delta, drop_rate: float, window_size: float, rescale: str, key, offset: int,
              scope: str = "row", score: str = "rank", tables: dict | None = None, rank_key=None):
    """DELLA MagPrune in place on one expert's block `delta` [rows, cols].

    scope `row` ranks within each row (the paper), `tensor` over the whole tensor
    (`della_layer`; block must be the whole tensor). score `rank` uses the exact rank;
    `magnitude` uses min-max normalised |delta| per row instead (`della_norank`);
    `random` ranks by keyed uniforms drawn with `rank_key` instead of |delta|, a random
    permutation of the same keep table (the paper's random-ranking ablation, Table 6).
    Survivors are divided by their keep probability (rescale `inverse`) or rescaled to
    the tensor's L1 norm (`l1`, upstream mergekit) or left as is (`none`).
    """
    import torch

    shape = delta.shape
    flat = delta.view(1, -1) if scope == "tensor" else delta
    scores = flat.abs() if score != "random" else rng.uniform(rank_key, offset, flat.shape, flat.device)
    eps = window_size / 2.0
    if score in ("rank", "random"):
        n = flat.shape[1]
        table = None if tables is None else tables.get((n, str(flat.device)))
        if table is None:
            table = keep_table(n, drop_rate, window_size).to(flat.device)
            if tables is not None:
                tables[(n, str(flat.device))] = table
        # Keep probability by rank: scatter the table into each row's sorted order.
        idx = sorted_columns(scores)
        probs = torch.empty_like(scores).scatter_(1, idx, table.expand(idx.shape))
        del idx
    elif score == "magnitude":
        lo = scores.amin(dim=1, keepdim=True)
        span = scores.amax(dim=1, keepdim=True).sub_(lo).add_(f32(1e-7))
        probs = scores.sub_(lo).div_(span).mul_(f32(2.0 * eps)).add_(f32((1.0 - drop_rate) - eps))
    else:
        raise ValueError(score)
    del scores
    l1 = l1_norm(delta) if rescale == "l1" else None
    u = rng.uniform(key, offset, flat.shape, flat.device)
    keep = u < probs
    del u
    if rescale == "inverse":
        flat.div_(probs)
    flat.mul_(keep)
    if rescale == "l1":
        rescale_l1_(delta, l1)
    return delta.view(shape)


# ---------------------------------------------------------------------------------------
# consensus + fuse
# ---------------------------------------------------------------------------------------


def elected_sign(weighted, zero_sign: int = 1):
    """TIES sum election: +1 where sum_t w_t delta_t > 0, -1 where < 0, `zero_sign` where
    the sum is 0 (+1 as mergekit; model scope passes MergeLM's model-wide majority sign)."""
    total = sum_experts(weighted)
    if zero_sign == 1:
        return total.ge_(0).mul_(2).sub_(1)
    return total.sign_().masked_fill_(total == 0, zero_sign)


def sign_balance(weighted) -> int:
    """#(sum_t w_t delta_t > 0) - #(< 0): its sign over the whole model is MergeLM's majority sign."""
    total = sum_experts(weighted)
    return int((total > 0).sum()) - int((total < 0).sum())


def disjoint_fuse_(deltas, weights, fuse_weights=None, elect: bool = True, zero_sign: int = 1,
                   normalize: bool = True):
    """TIES/DELLA disjoint merge of sparsified deltas [N, ...]; consumes `deltas`.

    Elects gamma = sign(sum_t w_t delta_t); expert t agrees where w_t delta_t has sign
    gamma (zeros never agree). Returns
        sum_t w_t delta_t [agree] / sum_t w_t [agree]      (0 where none agrees),
    the divisor guarded as mergekit does (a zero sum of weights divides by 1). With
    `fuse_weights` (M3) the agreeing experts are mixed with those weights instead:
        sum_t m_t delta_t [agree] / sum_t m_t [agree],
    falling back to the plain mean of the agreeing deltas where their m_t sum to 0.
    `normalize=False`: the sum sum_t w_t delta_t [agree] (mergekit's `breadcrumbs_ties`,
    the TALL-mask code's TIES "dis-sum").
    """
    import torch

    if fuse_weights is None and normalize:
        tau = fused.disjoint_(deltas, weights, zero_sign)  # CUDA: one pass
        if tau is not None:
            return tau
    for d, w in zip(deltas, weights):
        if w != 1.0:
            d.mul_(w)
    gamma = elected_sign(deltas, zero_sign)
    if fuse_weights is None and not normalize:
        num = None
        for d in deltas:
            d.mul_(gamma).clamp_(min=0)  # w delta gamma, the agreeing entries kept
            num = d if num is None else num.add_(d)
        return num.mul_(gamma)
    if fuse_weights is None:
        num = den = None
        for d, w in zip(deltas, weights):
            d.mul_(gamma)  # now w delta gamma: agreeing entries are > 0
            agree = d > 0
            if den is None:  # the first expert's buffers start the sums (saves two tensors)
                den = agree.to(d.dtype).mul_(w) if w != 1.0 else agree.to(d.dtype)
                num = d.clamp_(min=0)
            else:
                den.add_(agree, alpha=w) if w != 1.0 else den.add_(agree)
                num.add_(d.clamp_(min=0))
            del agree
        num.mul_(gamma)
        den.masked_fill_(den == 0, 1.0)  # (indexing with a mask would sync a GPU)
        return num.div_(den)
    # M3: election on the weighted deltas, mixing of the agreeing raw deltas.
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0])
    cnt = torch.zeros_like(deltas[0])
    plain = torch.zeros_like(deltas[0])
    for d, w, m in zip(deltas, weights, fuse_weights):
        agree = (d * gamma) > 0
        raw = div_exact_(d, w) if w != 1.0 else d
        raw.mul_(agree)
        plain.add_(raw)
        cnt.add_(agree)
        num.add_(raw, alpha=m)
        den.add_(agree, alpha=m)
    mixed = num.div_(torch.where(den == 0, 1.0, den))
    fallback = (den == 0) & (cnt > 0)
    if mixed.device.type != "cpu" or bool(fallback.any()):  # (asking a GPU would stall it every block)
        mixed = torch.where(fallback, plain / cnt.clamp(min=1), mixed)
    return mixed


def div_exact_(x, divisor):
    """x / divisor in place, correctly rounded on every device: CUDA turns a division by a
    Python scalar into a multiplication by its reciprocal, a 0-dim tensor divisor it does not.
    The divisor is filled on the device (`torch.tensor(..., device=cuda)` would copy it from
    the host and wait for the GPU to finish everything queued before)."""
    import torch

    return x.div_(torch.full((), divisor, dtype=x.dtype, device=x.device))


def weighted_sum(deltas, weights):
    """sum_t w_t x_t (Task Arithmetic)."""
    out = deltas[0] * weights[0] if weights[0] != 1.0 else deltas[0].clone()
    for d, w in zip(deltas[1:], weights[1:]):
        out.add_(d, alpha=w) if w != 1.0 else out.add_(d)
    return out


def weighted_mean(deltas, weights):
    """sum_t w_t x_t / sum_t w_t (average; `*_noelect` fuse), as mergekit guards it."""
    total = sum(weights)
    out = weighted_sum(deltas, weights)
    return div_exact_(out, total) if abs(total) >= 1e-8 else out


def scale_add(base, tau, lam: float):
    """theta_b + lambda * tau (in place on tau)."""
    if lam != 1.0:
        tau.mul_(lam)
    return tau.add_(base)


def tsv_merge(deltas):
    """TSV-M of one matrix (Gargiulo et al., CVPR 2025): each task vector's top
    int(r / T) singular triplets (r = min(rows, cols), T tasks) side by side,
    U = [U_1 .. U_T], S = [S_1 .. S_T], V = [V_1 .. V_T]; U and V replaced by their nearest
    orthogonal matrices (polar factors P Q^T from their SVDs); returns U_o diag(S) V_o^T.
    float32 LAPACK / cuSOLVER, as the reference code."""
    import torch

    n_tasks, m, n = deltas.shape
    r = min(m, n)
    k = int(r * (1 / n_tasks))  # the reference's int(len(s) * sv_reduction), sv_reduction = 1 / T
    u_cat = deltas.new_zeros(m, r)
    s_cat = deltas.new_zeros(r)
    v_cat = deltas.new_zeros(r, n)
    for i in range(n_tasks):
        u, s, vh = torch.linalg.svd(deltas[i], full_matrices=False)
        u_cat[:, i * k:(i + 1) * k] = u[:, :k]
        s_cat[i * k:(i + 1) * k] = s[:k]
        v_cat[i * k:(i + 1) * k] = vh[:k]
        del u, s, vh
    pu, _, qu = torch.linalg.svd(u_cat, full_matrices=False)
    pv, _, qv = torch.linalg.svd(v_cat, full_matrices=False)
    return (pu @ qu).mul_(s_cat) @ (pv @ qv)


def iso_merge(tau):
    """Iso-C of one matrix (Marczak et al., ICML 2025): tau = U S V^T -> mean(S) U V^T
    (a flat spectrum), float32 as the reference code."""
    import torch

    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    return u.mul_(s.mean()) @ vh


def model_stock_ratio(deltas, eps: float = 1e-6) -> float:
    """Model Stock's interpolation ratio t = k cos / (1 + (k - 1) cos) for k task vectors
    (the tensors seen as vectors), cos the mean pairwise cosine, as mergekit: the product of
    norms clamped at `eps`, each cosine clamped to [-1, 1], t = 0 where |1 + (k - 1) cos| <
    `eps`. Scalars in float64 on the host from `cascade_sum`s (the same on every device)."""
    import math

    k = len(deltas)
    norms = [math.sqrt(cascade_sum(d * d)) for d in deltas]
    cos = [max(-1.0, min(1.0, cascade_sum(deltas[i] * deltas[j]) / max(norms[i] * norms[j], eps)))
           for i in range(k) for j in range(i + 1, k)]
    c = sum(cos) / len(cos)
    den = 1 + (k - 1) * c
    return 0.0 if abs(den) < eps else k * c / den


def slerp(v0, v1, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """Spherical interpolation from v0 (t = 0) to v1 (t = 1), the tensors seen as vectors.

    As mergekit: the angle from the cosine of the normalised vectors (norms below `eps`
    count as 1); where |cos| > `dot_threshold` (near parallel or antiparallel) plain
    linear interpolation, which is what SLERP tends to there and avoids dividing by
    sin(theta) ~ 0. Scalars in float64 on the host from `cascade_sum`s (two norms and a dot),
    so CPU and GPU get the same coefficients.
    """
    import math

    n0, n1 = math.sqrt(cascade_sum(v0 * v0)), math.sqrt(cascade_sum(v1 * v1))
    n0, n1 = (n0 if n0 > eps else 1.0), (n1 if n1 > eps else 1.0)
    dot = max(-1.0, min(1.0, cascade_sum(div_exact_(v0.clone(), n0).mul_(div_exact_(v1.clone(), n1)))))
    if abs(dot) > dot_threshold:
        c0, c1 = 1.0 - t, t
    else:
        theta = math.acos(dot)
        c0, c1 = math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return (v0 * f32(c0)).add_(v1 * f32(c1))


def sce_fuse(deltas, select_topk: float):
    """SCE (FuseChat, Wan et al. 2024, arXiv 2408.07990) of one whole tensor's task vectors
    [N, ...], consumed, as mergekit 0.1.5's `sce`:

    - select: where `select_topk` < 1 keep the int(select_topk · #(var > 0)) elements of
      largest variance across the experts (population variance), zero the rest (ties: the
      lower index, `topk_mask`; mergekit's topk leaves them arbitrary);
    - calculate: c_t = mean(δ_t²) of the selected deltas, normalised to sum 1 (uniform 1/N
      where the sum is below 1e-6);
    - erase: γ = sign(Σ_t δ_t) (a zero sum counts as +), expert t kept where sign(δ_t) = γ;
    - τ = Σ_t c_t δ_t [kept] / max(Σ_t c_t [kept], 1e-6).

    The coefficients' sums are `cascade_sum`s (torch's CPU order, the same on every device);
    the variance is torch's own `var` as in mergekit.
    """
    import numpy as np
    import torch

    n_tasks = deltas.shape[0]
    if select_topk < 1:
        var = torch.var(deltas, dim=0, unbiased=False)
        # mergekit's k = int(count_nonzero(var) * select_topk), a float32 product
        k = int(np.float32(int(torch.count_nonzero(var))) * np.float32(select_topk))
        keep = topk_mask(var.view(1, -1), k).view(var.shape) if k > 0 else torch.zeros_like(var, dtype=torch.bool)
        del var
        deltas.mul_(keep.to(deltas.dtype))
        del keep
    n = deltas[0].numel()
    # float32 scalars in mergekit's order: mean = sum / n, then weights / their float32 sum
    c = np.array([cascade_sum(d * d) for d in deltas], dtype=np.float32) / np.float32(n)
    total = np.float32(0)
    for x in c:
        total = np.float32(total + x)
    c = np.full(n_tasks, np.float32(1) / np.float32(n_tasks)) if abs(float(total)) < 1e-6 else c / total
    gamma = elected_sign(deltas)
    den = None
    for d, ct in zip(deltas, c.tolist()):
        # c_t where expert t keeps its sign, else 0: mergekit's erased weights
        w = (d.sign() == gamma).to(d.dtype).mul_(f32(ct))
        d.mul_(w)
        den = w if den is None else den.add_(w)
    del gamma
    return sum_experts(deltas).div_(den.clamp_(min=f32(1e-6)))


def _sorted_at_(x, lo: int, hi: int):
    """Clamp each row of `x` [N, d] in place to [its lo-th, its hi-th smallest value]
    (0-based: the values at those positions of the sorted row, as the PCB reference's `clamp`)."""
    import torch

    d = x.shape[1]
    lo_v = torch.kthvalue(x, lo + 1, dim=1, keepdim=True).values if lo > 0 else None
    hi_v = torch.kthvalue(x, hi + 1, dim=1, keepdim=True).values if hi < d - 1 else None
    return x.clamp_(min=lo_v, max=hi_v) if lo_v is not None or hi_v is not None else x


def _minmax_rows_(x):
    """(x - min) / (max - min) per row of `x` [N, d], in place; a constant row gives 0 (the
    PCB reference divides 0 by 0 there)."""
    import torch

    lo = x.amin(dim=1, keepdim=True)
    span = x.amax(dim=1, keepdim=True).sub_(lo)
    return x.sub_(lo).div_(torch.where(span > 0, span, torch.ones_like(span)))


def pcb_fuse(deltas, pcb_ratio: float, clamp_ratio: float, weights):
    """PCB-merging (Du et al., NeurIPS 2024, arXiv 2410.02396) of one whole tensor's task
    vectors [N, ...], as the authors' `PCB_merge` (duguodong7/pcb-merging, pcb-merging.py),
    the tensor flattened to [N, d]:

    - |δ_t| clamped per task to its sorted values at int(d · c) and int(d · (1 − c) − 1)
      (c = `clamp_ratio`, outliers), δ̃_t = sign(δ_t) |δ_t|clamped;
    - intra-balancing exp(N · minmax(|δ̃_t|)²); inter-balancing tanh(δ_t · Σ_j δ_j);
      score β_t = their product;
    - drop: β_t clamped below at its sorted value at int(d · (1 − pcb_ratio)), then min-max
      normalised (the lower 1 − pcb_ratio get 0): the scale s_t;
    - τ = Σ_t w_t δ̃_t s_t / max(Σ_t s_t, 1e-12) (w_t: the reference's per-task `lams`).

    float32 as the reference; a constant row normalises to 0 instead of 0/0.
    """
    n_tasks = deltas.shape[0]
    shape = deltas.shape[1:]
    x = deltas.reshape(n_tasks, -1)
    d = x.shape[1]
    a = _sorted_at_(x.abs(), int(d * clamp_ratio), int(d * (1 - clamp_ratio) - 1))
    intra = _minmax_rows_(a.clone()).square_().mul_(n_tasks).exp_()
    inter = (x * sum_experts(x)).tanh_()
    score = intra.mul_(inter)
    del inter
    min_ratio = 1 - pcb_ratio  # the reference's clamp(task_pcb, min_ratio=1 - pcb_ratio, max_ratio=0)
    scale = _minmax_rows_(_sorted_at_(score, int(d * min_ratio), int(d * (1 - 0) - 1)))
    tvs = x.sign_().mul_(a)  # the clamped task vectors, in x's buffer
    del a
    for t, w in enumerate(weights):
        if w != 1.0:
            tvs[t].mul_(w)
    den = sum_experts(scale).clamp_(min=f32(1e-12))
    return sum_experts(tvs.mul_(scale)).div_(den).view(shape)


def iso_cts_merge(deltas, common_fraction: float):
    """Iso-CTS of one matrix (Marczak et al., ICML 2025), as the authors' `iso_cts` (in
    FusionBench): r = min(rows, cols), T tasks; the common subspace is the top c singular
    vectors of Σ_t δ_t, c = r − round((r − int(r · f)) / T) · T (f = `common_fraction`, so
    the rest splits evenly; where that rounding would exceed r, one share less); each task
    adds the top k = (r − c) / T singular triplets of its δ_t projected off the common left
    subspace, (I − U_c U_cᵀ) δ_t; U = [U_1 … U_T U_c] and V likewise are replaced by their
    polar factors, and every singular value by their mean: returns mean(S) U_o V_oᵀ.
    float32 LAPACK / cuSOLVER, as the reference. The projection is U_c (U_cᵀ δ_t), the
    reference's (U_c U_cᵀ) δ_t without the rows x rows matrix (float32 rounding apart)."""
    import torch

    n_tasks, m, n = deltas.shape
    r = min(m, n)
    specific = round((r - int(r * common_fraction)) / n_tasks) * n_tasks
    if specific > r:
        specific -= n_tasks
    common = r - specific
    k = specific // n_tasks
    u, s, vh = torch.linalg.svd(sum_experts(deltas), full_matrices=False)
    uc = u[:, :common]
    u_cat = deltas.new_zeros(m, r)
    s_cat = deltas.new_zeros(r)
    v_cat = deltas.new_zeros(r, n)
    for i in range(n_tasks):
        if k == 0:
            break
        w_ts = deltas[i] - uc @ (uc.T @ deltas[i])
        ui, si, vi = torch.linalg.svd(w_ts, full_matrices=False)
        u_cat[:, i * k:(i + 1) * k] = ui[:, :k]
        s_cat[i * k:(i + 1) * k] = si[:k]
        v_cat[i * k:(i + 1) * k] = vi[:k]
        del w_ts, ui, si, vi
    u_cat[:, specific:] = uc
    s_cat[specific:] = s[:common]
    v_cat[specific:] = vh[:common]
    del u, s, vh
    pu, _, qu = torch.linalg.svd(u_cat, full_matrices=False)
    pv, _, qv = torch.linalg.svd(v_cat, full_matrices=False)
    return (pu @ qu).mul_(s_cat.mean()) @ (pv @ qv)


def _norm(v) -> float:
    """The L2 norm of a tensor seen as a vector, from a fixed-order `cascade_sum` (float64 on the host)."""
    import math

    return math.sqrt(cascade_sum(v * v))


def nuslerp(v0, v1, t: float, eps: float = 1e-8):
    """mergekit's `nuslerp` with `nuslerp_flatten` (its default): each tensor one vector,
    normalised with norms clamped at 1e-7; cos Ω clamped to [−1, 1]; linear
    (1 − t) v0 + t v1 where 1 − cos² Ω <= eps² (exactly (anti)parallel in float32), else
    (sin((1 − t)Ω) v0 + sin(tΩ) v1) / sin Ω. Scalars in float64 on the host (`cascade_sum`)."""
    import math

    n0, n1 = max(_norm(v0), 1e-7), max(_norm(v1), 1e-7)
    cos = max(-1.0, min(1.0, cascade_sum(div_exact_(v0.clone(), f32(n0)).mul_(div_exact_(v1.clone(), f32(n1))))))
    if 1.0 - f32(cos) ** 2 <= eps ** 2:
        c0, c1 = 1.0 - t, t
    else:
        theta = math.acos(cos)
        c0, c1 = math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return (v0 * f32(c0)).add_(v1 * f32(c1))


class InterpolationError(ValueError):
    """Multi-SLERP cannot place the experts' mean on the sphere (it is zero)."""


def multislerp(x, weights, eps: float = 1e-8):
    """mergekit's `multislerp` (barycentric interpolation on the hypersphere) of the stack
    x [N, ...] (weights or task vectors), each tensor one vector; `weights` normalised to
    sum 1. u_t = x_t / (‖x_t‖ + eps); m = Σ w_t u_t / ‖Σ w_t u_t‖; tangents
    g_t = u_t − (u_t · m) m, g = Σ w_t g_t; the exponential map
    m cos ‖g‖ + g sin ‖g‖ / ‖g‖ (‖g‖ + eps), scaled by Σ w_t ‖x_t‖. Where Σ w_t u_t is 0:
    two experts interpolate linearly, more raise InterpolationError. Consumes x. Scalars in
    float64 on the host from `cascade_sum`s."""
    import math

    total = sum(weights)
    w = [wt / total for wt in weights]
    norms = [_norm(v) for v in x]
    mean = None
    for v, nrm, wt in zip(x, norms, w):
        u = div_exact_(v.clone(), f32(nrm + eps)).mul_(f32(wt))
        mean = u if mean is None else mean.add_(u)
        del u
    mean_norm = _norm(mean)
    if mean_norm < eps:
        if len(w) == 2:
            return (x[0] * f32(w[0])).add_(x[1] * f32(w[1]))
        raise InterpolationError("the weighted mean of the normalised experts is zero (antipodal experts "
                                 "with balancing weights): change the weights")
    div_exact_(mean, f32(mean_norm))
    for v, nrm in zip(x, norms):
        div_exact_(v, f32(nrm + eps))  # x now holds the unit vectors
    for u in x:
        u.sub_(mean * f32(cascade_sum(u * mean)))  # the tangent at the mean
    g = weighted_sum(x, w)
    gn = _norm(g) + eps
    out = (mean * f32(math.cos(gn))).add_(g.mul_(f32(math.sin(gn) / gn)))
    return out.mul_(f32(sum(nrm * wt for nrm, wt in zip(norms, w))))
