"""Streaming merge engine: plan, validate, read ahead, merge block by block, write.

The whole merge is planned from checkpoint headers before any weight is read, so every
naming, shape and dtype problem fails fast, naming the tensor. Tensors are then merged in
natural name order, one block of rows at a time when the method allows it (row-local
steps; the random draws are keyed by element position, so blocking changes nothing) and
whole otherwise. A reader pool loads the next blocks while the current one is merged and
a writer pool stores finished blocks at their planned offsets, so reading, arithmetic and
writing overlap and memory stays bounded by a few blocks, not by the model size.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import resource
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mergeflow.checkpoints import (
    CONFIG_FILES,
    ITEMSIZE,
    SAFE_INDEX,
    CheckpointReader,
    ShardedWriter,
    _pread_into,
    fit_rows,
    model_dir,
    model_revision,
    natural_key,
    parse_size,
    vocab_rows,
)
from mergeflow.errors import MergeflowError
from mergeflow.merging import fused, methods, steps, vocab

log = logging.getLogger(__name__)

METADATA_FILE = "mergeflow_merge.json"
OUTPUT_DTYPES = methods.OUTPUT_DTYPES
# CPU blocks of about 2M elements: every per-block buffer (3 experts x 8 MB) stays under
# glibc's mmap threshold, so freed buffers are recycled instead of page-faulted afresh.
DEFAULT_CHUNK_ELEMENTS = 1 << 21
MAX_ELEMENTS = 1 << 32
SLAB_BYTES = 8 << 20  # pinned staging buffer size for GPU transfers
HEAD_TENSOR = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")  # an output head a model may tie away


class PinnedPool:
    """A fixed set of pinned host buffers ("slabs") for host<->GPU copies.

    Allocated once: pinning memory is slow, and torch's caching host allocator would keep a
    power-of-two block for every size in flight (GBs of resident memory). A slab goes back
    to the pool once the copy that used it has completed.
    """

    def __init__(self, count: int, size: int, buffer=None):
        """`buffer`: an already pinned uint8 CPU tensor of at least count * size bytes to
        cut the slabs from (one pinning call instead of one per slab)."""
        import queue

        import torch

        self.size = size
        self._free: queue.Queue = queue.Queue()
        for i in range(count):
            self._free.put(torch.empty(size, dtype=torch.uint8, pin_memory=True) if buffer is None
                           else buffer[i * size:(i + 1) * size])

    def get(self):
        return self._free.get()

    def put(self, slab) -> None:
        self._free.put(slab)


@dataclass
class Item:
    """One block to merge: rows [r0, r1) of tensor `name` (`fit`: vocab-resized)."""

    name: str
    r0: int
    r1: int
    rows: int  # rows of the whole output tensor (2-D view)
    cols: int
    shape: tuple[int, ...]  # output shape
    fit: bool
    whole: bool


def thread_counts(device_type: str, io_threads: int | None = None) -> tuple[int, int]:
    """(reader threads, writer threads) of a merge on `device_type` ("cpu" | "cuda")."""
    from mergeflow.merging import cpu_threads

    cpus = cpu_threads()
    io = io_threads or max(2, min(12 if device_type == "cuda" else 8, cpus))
    write = max(1, min(8, io // 2 if device_type == "cpu" else cpus // 2))
    return io, write


def _resolve_device(device: str):
    import torch

    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise MergeflowError(f"device {device!r}: expected auto, cpu or cuda")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise MergeflowError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def _is_merge_output(path: Path) -> tuple[bool, set[str]]:
    """(whether `path` is a directory a merge wrote, the file names that merge wrote)."""
    try:
        meta = json.loads((path / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False, set()
    if not isinstance(meta, dict) or "mergeflow_version" not in meta or "method" not in meta:
        return False, set()
    files = (meta.get("output") or {}).get("files") or []
    # .snakemake_timestamp: Snakemake's mark in a directory() output
    return True, {*map(str, files), SAFE_INDEX, METADATA_FILE, *CONFIG_FILES, ".snakemake_timestamp"}


def check_output(out: str | os.PathLike, inputs: dict[str, str | None], force: bool = False) -> None:
    """Refuse an output whose replacement would destroy what mergeflow did not write.

    `out` may be absent, an empty directory or a previous merge output (its metadata says
    so, and it holds only the files that merge wrote); anything else needs `force`. An
    output that is, contains or lies inside an input (`inputs`: label -> path, symlinks
    resolved) is refused even with `force`.
    """
    target = Path(os.path.realpath(out))
    for label, path in inputs.items():
        if path is None:
            continue
        src = Path(os.path.realpath(path))
        if target == src or target.is_relative_to(src) or src.is_relative_to(target):
            how = "is" if target == src else "lies inside" if target.is_relative_to(src) else "contains"
            raise MergeflowError(f"--out {out} {how} the {label} input ({path}): a merge never writes over "
                                 f"its inputs; choose another --out")
    out = Path(out)
    if force or not out.exists():  # (a dangling symlink: only the link would be replaced)
        return
    advice = "choose another --out, or pass --force to replace it"
    if not out.is_dir():
        raise MergeflowError(f"--out {out} is an existing file, not a merge output: {advice}")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    ours, written = _is_merge_output(out)
    foreign = [name for name in entries if name not in written]
    if not ours:
        raise MergeflowError(f"--out {out} is a directory that holds files a merge did not write "
                             f"(e.g. {foreign[0]!r}; no {METADATA_FILE}): {advice}")
    if foreign:
        raise MergeflowError(f"--out {out} is a previous merge output that now also holds {foreign[0]!r}, "
                             f"which the merge did not write: {advice}")


def _disk_full(out: Path, err: BaseException) -> MergeflowError | None:
    """The clean error for a full disk (or quota) while writing `out`, else None."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return MergeflowError(f"--out {out}: no space left on the device ({err.strerror}); the merge stopped, "
                              f"its temporary output is removed and any previous {out} is untouched")
    return None


def _tie_hint(names: list[str], tied: str, untied: str) -> str:
    """Where an output head is the one tensor in one input only: one ties it to the embedding."""
    if len(names) != 1 or not HEAD_TENSOR.search(names[0]):
        return ""
    return (f": {tied} ties its output head to its input embedding (one tensor), {untied} stores its own; "
            f"merge models tied alike (`mergeflow check` says which)")


def _view2d(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) <= 1:
        n = shape[0] if shape else 1
        return 1, n
    cols = 1
    for s in shape[1:]:
        cols *= s
    return shape[0], cols


class MergeEngine:
    """Runs one merge; see `run_merge` for the arguments."""

    def __init__(self, method: str, experts: dict[str, str], base: str | None, params: dict | None,
                 seed: int, device: str, vocab_policy: str | None, out: str, shard_size="5GB",
                 io_threads: int | None = None, chunk_elements: int | None = None,
                 progress: bool = True, force: bool = False):
        self.t0 = time.time()
        self.params = dict(params or {})
        self.seed = int(seed)
        self.expert_names = list(experts)
        self.method = methods.build(method, self.params, self.expert_names, self.seed)
        self.device = _resolve_device(device)
        self.vocab_policy = vocab_policy
        self.union: vocab.VocabUnion | None = None  # the `union` policy's plan (_plan)
        self.out = Path(out)
        self.shard_bytes = parse_size(shard_size)
        self.io_threads, self.write_threads = thread_counts(self.device.type, io_threads)
        # Blocks read ahead live in host memory on the CPU, in GPU memory on CUDA.
        self.read_ahead_bytes = (256 << 20) if self.device.type == "cpu" else (4 << 30)
        self.progress = progress
        # on the GPU the check's weight statistics run beside the merge (CPU merges need the cores)
        self.check_in_background = self.device.type == "cuda"
        if self.method.uses_base and base is None:
            raise MergeflowError(f"merge method {method!r} needs a base model (--base)")
        self.base_path = base
        self.expert_paths = dict(experts)
        self.force = force
        check_output(self.out, self._input_paths(), force)  # before any weight is read
        self.readers: dict[str, CheckpointReader] = {}
        self._tables: dict = {}
        self._local = threading.local()
        if chunk_elements is None:  # CPU: blocks small enough for the allocator to recycle
            chunk_elements = DEFAULT_CHUNK_ELEMENTS if self.device.type == "cpu" else MAX_ELEMENTS
        self.chunk_elements = int(chunk_elements)

    def _input_paths(self) -> dict[str, str | None]:
        return {"base": self.base_path, **{f"expert {k!r}": v for k, v in self.expert_paths.items()}}

    # -- planning -------------------------------------------------------------------------
    def _open(self) -> None:
        if self.base_path is not None:
            self.readers["base"] = CheckpointReader(self.base_path, "base")
        for name, path in self.expert_paths.items():
            self.readers[name] = CheckpointReader(path, f"expert {name!r}")
        # Inputs whose weights are read: the base only if the method uses it.
        self.inputs = (["base"] if self.method.uses_base else []) + self.expert_names
        self.reference = self.inputs[0]

    def _plan(self) -> list[Item]:
        ref = self.readers[self.reference]
        ref_names = set(ref.names())
        for label in self.inputs[1:]:
            r = self.readers[label]
            names = set(r.names())
            missing = sorted(ref_names - names, key=natural_key)
            if missing:
                raise MergeflowError(f"tensor {missing[0]!r} is missing from {r.label} ({r.path})"
                                     + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                                     + _tie_hint(missing, r.label, self.readers[self.reference].label))
            extra = sorted(names - ref_names, key=natural_key)
            if extra:
                raise MergeflowError(f"tensor {extra[0]!r} of {r.label} ({r.path}) is not in "
                                     f"{self.readers[self.reference].label}"
                                     + _tie_hint(extra, self.readers[self.reference].label, r.label))
        out_dtype = self.params.get("dtype")
        if out_dtype is not None and out_dtype not in OUTPUT_DTYPES:
            raise MergeflowError(f"param 'dtype': {out_dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
        items: list[Item] = []
        self.plan: list[tuple[str, tuple[int, ...], str]] = []
        self.input_dtypes: dict[str, set] = {label: set() for label in self.inputs}
        self.vocab_resized: dict[str, int] = {}
        tensor_wide = self.method.tensor_wide
        if self.vocab_policy == "union":  # tokenizers loaded and checked before any weight is read
            self.union = vocab.plan_union(self.readers, self.inputs, self.reference, self.expert_names,
                                          self.method.uses_base)
        for name in sorted(ref_names, key=natural_key):
            shapes, dtypes = {}, {}
            for label in self.inputs:
                info = self.readers[label].info(name)
                shapes[label], dtypes[label] = info.shape, info.dtype
                self.input_dtypes[label].add(info.dtype)
                if info.dtype not in ("float32", "float16", "bfloat16", "float64"):
                    raise MergeflowError(
                        f"tensor {name!r} of {self.readers[label].label} has dtype {info.dtype}; "
                        f"only float16/bfloat16/float32/float64 tensors can be merged"
                    )
            rows = (self.union.rows_for(name, shapes) if self.union is not None
                    else vocab_rows(name, shapes, self.vocab_policy, self.reference))
            shape = tuple(shapes[self.reference])
            if rows is not None:
                shape = (rows, *shape[1:])
                self.vocab_resized[name] = rows
            if 0 in shape:
                raise MergeflowError(f"tensor {name!r} of {self.readers[self.reference].label} is empty "
                                     f"(shape {list(shape)})")
            dtype = out_dtype or dtypes[self.reference]
            self.plan.append((name, shape, dtype))
            r2, c2 = _view2d(shape)
            if r2 * c2 >= (1 << 32):
                raise MergeflowError(f"tensor {name!r} has {r2 * c2} elements; at most 2**32 are supported")
            fit = rows is not None
            whole = fit or tensor_wide or len(shape) <= 1 or r2 * c2 <= self.chunk_elements
            if whole:
                items.append(Item(name, 0, r2, r2, c2, shape, fit, True))
            else:
                step = max(1, self.chunk_elements // c2)
                for r0 in range(0, r2, step):
                    items.append(Item(name, r0, min(r2, r0 + step), r2, c2, shape, fit, False))
        return items

    # -- loading --------------------------------------------------------------------------
    def _stream(self):
        """This reader thread's CUDA stream (copies overlap with the merge arithmetic)."""
        import torch

        st = getattr(self._local, "stream", None)
        if st is None:
            st = self._local.stream = torch.cuda.Stream(self.device)
        return st

    def _read_one(self, item: Item, label: str):
        """Read one input's block; on CUDA stage it in pinned memory and start the copy.

        Returns (tensor, event): a CPU tensor and None, or a device tensor and the CUDA
        event after which it is valid.
        """
        import torch

        r = self.readers[label]
        rows = None if item.whole else (item.r0, item.r1)
        if self.device.type != "cuda":
            return r.read(item.name, rows=rows), None
        info = r.info(item.name)
        numel = info.numel if rows is None else info.numel // info.shape[0] * (rows[1] - rows[0])
        dtype = getattr(torch, info.dtype)
        nbytes = dtype.itemsize * numel
        stream = self._stream()
        with torch.cuda.stream(stream):
            dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if info.fmt == "bin":  # a pickled checkpoint: whole tensor through one pageable copy
            with torch.cuda.stream(stream):
                dev.view(dtype).copy_(r.read(item.name, rows=rows).view(-1), non_blocking=True)
            stream.synchronize()
        else:  # slab by slab: read the next piece while the previous one is copied
            pool = self._read_pool
            in_flight: deque = deque()
            offset = info.offset + (0 if rows is None else rows[0] * (info.numel // info.shape[0]) * dtype.itemsize)
            fd = r.fd(info.file)
            for start in range(0, nbytes, pool.size):
                n = min(pool.size, nbytes - start)
                if len(in_flight) >= 2:
                    ev, slab = in_flight.popleft()
                    ev.synchronize()
                    pool.put(slab)
                slab = pool.get()
                try:
                    _pread_into(fd, memoryview(slab[:n].numpy()).cast("B"), offset + start)
                except OSError as err:
                    pool.put(slab)
                    raise MergeflowError(f"{r.label}: reading {item.name!r} from {info.file}: {err}") from err
                with torch.cuda.stream(stream):
                    dev[start:start + n].copy_(slab[:n], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(stream)
                in_flight.append((ev, slab))
            for ev, slab in in_flight:
                ev.synchronize()
                pool.put(slab)
        return dev.view(dtype), None

    def _prepare(self, item: Item, parts: dict) -> methods.Block:
        """Turn one block's raw inputs into float32 task vectors (or weights) on the device."""
        import torch

        dev = self.device
        rows = item.r1 - item.r0
        raw = {}
        for label, (t, ev) in parts.items():
            if ev is not None:  # wait for the reader's copy
                torch.cuda.current_stream(dev).wait_event(ev)
            if t.device.type == "cuda":  # allocated on a reader's stream: keep it until we are done
                t.record_stream(torch.cuda.current_stream(dev))
            if item.fit and self.union is not None:  # rows mapped by token string below
                raw[label] = t.to(torch.float32).view(-1, item.cols)
                continue
            if item.fit:  # vocabulary policy: float32 first, so a padded mean row is exact
                t = t.to(torch.float32).view(-1, item.cols)  # a GPU reader's block is flat
                if t.shape[0] < item.rows:  # the mean row on the CPU: a CUDA reduction orders it otherwise
                    t = fit_rows(t.cpu(), item.rows).to(dev)
                t = fit_rows(t, item.rows)
            raw[label] = t.view(rows, item.cols)
        if item.fit and self.union is not None:
            raw = self.union.assemble(item.name, raw)
        n = len(self.expert_names)
        stack = torch.empty((n, rows, item.cols), dtype=torch.float32, device=dev)
        base = None
        if self.method.uses_base:
            base = raw["base"].to(torch.float32)
            for i, label in enumerate(self.expert_names):
                torch.sub(raw[label], base, out=stack[i])  # converts and subtracts in one pass
        else:
            for i, label in enumerate(self.expert_names):
                stack[i].copy_(raw[label])
        return methods.Block(item.name, base, stack, item.r0, self.seed, tables=self._tables,
                             is_delta=self.method.uses_base, shape=item.shape)

    def _raw_bytes(self, item: Item) -> int:
        total = 0
        for label in self.inputs:
            info = self.readers[label].info(item.name)
            rows = info.shape[0] if item.whole or not info.shape else item.r1 - item.r0
            total += info.numel // max(1, info.shape[0] if info.shape else 1) * rows * ITEMSIZE[info.dtype]
        return total

    def _blocks(self, items: list[Item]):
        """Yield (item, Block) in order; reader threads fetch the next blocks meanwhile.

        Read-ahead is bounded by a count and by bytes (`read_ahead_bytes`): on the CPU the
        blocks read ahead are resident memory, and whole embedding tensors are large.
        """
        depth = max(2, self.io_threads)
        with ThreadPoolExecutor(self.io_threads, thread_name_prefix="mergeflow-read") as pool:
            pending: deque[tuple[Item, dict, int]] = deque()
            it = iter(items)
            nxt = next(it, None)
            in_flight = 0

            def fill():
                nonlocal nxt, in_flight
                while nxt is not None and len(pending) < depth and (
                        not pending or in_flight + self._raw_bytes(nxt) <= self.read_ahead_bytes):
                    size = self._raw_bytes(nxt)
                    futs = {label: pool.submit(self._read_one, nxt, label) for label in self.inputs}
                    pending.append((nxt, futs, size))
                    in_flight += size
                    nxt = next(it, None)

            fill()
            while pending:
                item, futs, size = pending.popleft()
                parts = {label: f.result() for label, f in futs.items()}
                in_flight -= size
                fill()
                block = self._prepare(item, parts)
                del parts, futs  # the raw inputs are not needed while the block is merged
                yield item, block
                del block

    def _not_finite(self, item: Item) -> MergeflowError:
        """Name the input that holds NaN/Inf in `item` (re-read from disk), or the output."""
        import torch

        for label in self.inputs:
            r = self.readers[label]
            t = r.read(item.name, rows=None if item.whole else (item.r0, item.r1))
            if not bool(torch.isfinite(t).all()):
                return MergeflowError(f"tensor {item.name!r} of {r.label} ({r.path}) contains NaN or Inf")
        return MergeflowError(f"merged tensor {item.name!r} is not finite although its inputs are "
                              f"(overflow? check lambda and weights)")

    # -- model-scope TIES trim --------------------------------------------------------------
    def _global_thresholds(self, items: list[Item]) -> list:
        """Exact model-wide k-th smallest |delta| per expert (MergeLM's global trim).

        Two streaming radix-select passes over float32 bit patterns (|delta| >= 0, so the
        bits order like the values): the high 16 bits locate the bin holding the k-th
        value, the low 16 bits within that bin give it exactly. Same rule as MergeLM:
        keep |delta| >= the k-th smallest, k = int(n * mask_rate).
        """
        import torch

        n_exp = len(self.expert_names)
        total = sum((it.r1 - it.r0) * it.cols for it in items)
        mask_rate = 1.0 - self.method.trim_density
        k = int(total * mask_rate)
        if k <= 0:
            return [None] * n_exp

        def bits_of(block, t):
            return block.experts[t].abs().view(torch.int32).view(-1)

        hist = torch.zeros((n_exp, 1 << 16), dtype=torch.int64, device=self.device)
        for item, block in self._blocks(items):
            d = self.method.sparsified_deltas(block)
            for t in range(n_exp):
                hist[t] += torch.bincount(bits_of(block, t) >> 16, minlength=1 << 16)
            del d
        cum = hist.cumsum(dim=1)
        hi = [int(torch.searchsorted(cum[t], torch.tensor(k, device=self.device))) for t in range(n_exp)]
        before = [int(cum[t, h - 1]) if h > 0 else 0 for t, h in enumerate(hi)]
        hist.zero_()
        for item, block in self._blocks(items):
            self.method.sparsified_deltas(block)
            for t in range(n_exp):
                b = bits_of(block, t)
                sel = b[(b >> 16) == hi[t]] & 0xFFFF
                if sel.numel():
                    hist[t] += torch.bincount(sel, minlength=1 << 16)
        cum = hist.cumsum(dim=1)
        out = []
        for t in range(n_exp):
            lo = int(torch.searchsorted(cum[t], torch.tensor(k - before[t], device=self.device)))
            bits = torch.tensor([(hi[t] << 16) | lo], dtype=torch.int32)
            out.append(float(bits.view(torch.float32)))
        return out

    def _tensor_topk(self, items: list[Item]) -> dict:
        """Tensor-scope TIES trim of the tensors merged in blocks (on the CPU, those over
        `chunk_elements`: a whole one would hold all its experts' float32 deltas at once):
        per tensor and expert, the k-th largest |delta| and how many of the values equal
        to it the trim keeps, by the two streaming radix-select passes of
        `_global_thresholds`, per tensor. The trim then keeps the same elements block by
        block (`steps.streamed_topk_trim_`) as over the whole tensor."""
        import torch

        streamed = [it for it in items if not it.whole]
        if not streamed:
            return {}
        n_exp = len(self.expert_names)
        k = {it.name: steps.keep_count(self.method.trim_density, it.rows * it.cols) for it in streamed}

        def histograms(select):
            """(tensor, [expert, 65536] histogram of select(name, t, |delta| bits)), tensor by tensor."""
            cur, hist = None, None
            for item, block in self._blocks(streamed):
                if item.name != cur:
                    if cur is not None:
                        yield cur, hist
                    cur, hist = item.name, torch.zeros((n_exp, 1 << 16), dtype=torch.int64, device=self.device)
                d = self.method.sparsified_deltas(block)
                for t in range(n_exp):
                    sel = select(cur, t, d[t].abs().view(torch.int32).view(-1))
                    if sel.numel():
                        hist[t] += torch.bincount(sel, minlength=1 << 16)
            if cur is not None:
                yield cur, hist

        def pick(hist_t, k_t):
            """(bin of the k-th largest, count in the bins above it) from the top."""
            top = hist_t.flip(0).cumsum(0)
            j = int(torch.searchsorted(top, torch.tensor(k_t, device=top.device)))
            return (1 << 16) - 1 - j, (int(top[j - 1]) if j > 0 else 0)

        high = {name: [pick(h[t], k[name]) for t in range(n_exp)]
                for name, h in histograms(lambda name, t, bits: bits >> 16)}
        out = {}
        for name, h in histograms(lambda name, t, bits: bits[(bits >> 16) == high[name][t][0]] & 0xFFFF):
            out[name] = []
            for t in range(n_exp):
                hi, above = high[name][t]
                lo, between = pick(h[t], k[name] - above)
                value = float(torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32))
                out[name].append((value, k[name] - above - between))  # ties at the value that are kept
        return out

    def _majority_sign(self, items: list[Item], thresholds: list) -> int:
        """MergeLM's model-wide majority sign: sign(sum of elected signs over the whole model),
        elected where the trimmed deltas cancel exactly (a third pass over the inputs)."""
        balance = 0
        for item, block in self._blocks(items):
            block.thresholds = thresholds
            balance += self.method.sign_balance(block)
        return (balance > 0) - (balance < 0)

    # -- main -----------------------------------------------------------------------------
    def run(self) -> dict:
        import torch

        self.timings: dict[str, float] = {}
        pinning = None
        if self.device.type == "cuda":
            if self.method.random or self.method.elects:  # Triton's kernels load beside the pinning and first reads
                self._warm = fused.warm(self.device, draws=self.method.random,
                                        experts=len(self.expert_names) if self.method.elects else None)
            # CUDA's context and the pinned slabs in a thread, while the plan and the check run
            pinning = ThreadPoolExecutor(1, thread_name_prefix="mergeflow-pin")
            pinned = pinning.submit(self._pin_timed)
        try:
            t = time.time()
            self._open()
            items = self._plan()
            self.timings["plan_s"] = time.time() - t
            t = time.time()
            from mergeflow.merging.check import for_engine  # (the pre-merge check: its own module)

            self._check = for_engine(self, background=self.check_in_background)
            self.timings["check_s"] = time.time() - t
            if pinning is not None:  # start CUDA before timing the merge itself
                t = time.time()
                pinned.result()
                torch.zeros(1, device=self.device)
                torch.cuda.synchronize(self.device)
                self.timings["pin_wait_s"] = time.time() - t
            t = time.time()
            thresholds = self._global_thresholds(items) if self.method.global_trim else None
            if thresholds is not None:
                self.timings["prepass_s"] = time.time() - t
            t = time.time()
            self._topk = self._tensor_topk(items) if self.method.tensor_topk else {}
            if self._topk:
                self.timings["topk_prepass_s"] = time.time() - t
            self.zero_sign = 1
            if self.method.majority_sign:
                t = time.time()
                self.zero_sign = self._majority_sign(items, thresholds)
                self.timings["majority_sign_s"] = time.time() - t
            donor_label, writer = self._open_output()
        except BaseException as err:
            found = self._check_error(err)  # (waits for the check's thread before the readers close)
            self._close()
            if found is not None:
                raise found from None
            raise
        finally:
            if pinning is not None:  # (an error above: the thread's own error is not the one to report)
                pinning.shutdown(wait=True)
        return self._write_all(lambda: self._merge_all(items, writer, thresholds), writer, donor_label,
                               thresholds)

    def _open_output(self) -> tuple[str, ShardedWriter]:
        """Check the donor and open the output (a temporary directory until committed)."""
        donor_label = self.params.get("donor") or self._default_donor()
        if donor_label not in self.readers:
            raise MergeflowError(f"param 'donor': {donor_label!r} is neither 'base' nor an expert "
                                 f"({', '.join(self.expert_names)})")
        check_output(self.out, self._input_paths(), self.force)  # again: planning may have taken long
        writer = ShardedWriter(self.out, self.plan, self.shard_bytes)
        try:
            writer.open()
        except BaseException as err:
            writer.abort()
            raise _disk_full(self.out, err) or err
        return donor_label, writer

    def _write_all(self, merge, writer: ShardedWriter, donor_label: str, thresholds) -> dict:
        """Run `merge()`, then write the metadata and commit the output; abort on failure."""
        try:
            t = time.time()
            merge()
            self.timings["merge_s"] = time.time() - t
            t = time.time()
            self.check = self._check.wait()
            if self._check.seconds:
                self.timings["check_stats_s"] = round(self._check.seconds, 3)  # in the background
                self.timings["check_wait_s"] = time.time() - t
            meta = self._metadata(thresholds, donor_label, writer)
            donor_path = self.readers[donor_label].path
            extra = dict(self.union.files) if self.union is not None else {}  # the merged tokenizer
            writer.commit(donor_path, {**extra, METADATA_FILE: json.dumps(meta, indent=2) + "\n"},
                          self._config_updates(donor_path))
            return meta
        except BaseException as err:
            writer.abort()
            full = _disk_full(self.out, err)
            if full is not None:
                raise full from None
            found = self._check_error(err)
            if found is not None:
                raise found from None
            raise
        finally:
            self._close()

    def _check_error(self, err: BaseException) -> MergeflowError | None:
        """When a merge fails: the pre-merge check's error, if it found one (it names the input
        behind, say, a NaN in the output), to report instead of `err`. Waits for its thread first."""
        pending, self._check = getattr(self, "_check", None), None
        found = pending.error() if pending is not None else None  # (always joined: it reads the inputs)
        if isinstance(err, KeyboardInterrupt) or not isinstance(found, MergeflowError) or found is err:
            return None
        return found

    def _pin_timed(self) -> None:
        t = time.time()
        self._pin()
        self.timings["pin_s"] = time.time() - t

    def _pin(self) -> None:
        """Pinned slab pools for the readers and the writers: one pinned allocation, cut."""
        import torch

        n_read, n_write = 2 * self.io_threads, 2 * self.write_threads
        buf = torch.empty((n_read + n_write) * SLAB_BYTES, dtype=torch.uint8, pin_memory=True)
        self._read_pool = PinnedPool(n_read, SLAB_BYTES, buf[:n_read * SLAB_BYTES])
        self._write_pool = PinnedPool(n_write, SLAB_BYTES, buf[n_read * SLAB_BYTES:])

    def _merge_all(self, items: list[Item], writer: ShardedWriter, thresholds) -> None:
        import torch

        dev = self.device
        cuda = dev.type == "cuda"
        out_dtypes = {name: getattr(torch, dt) for name, _, dt in self.plan}
        bar = None
        if self.progress and sys.stderr.isatty():  # (tqdm would disable itself off a TTY)
            from tqdm import tqdm

            bar = tqdm(total=writer.total_size, unit="B", unit_scale=True, desc="merge", disable=None,
                       file=sys.stderr)
        writes: deque[Future] = deque()
        lock = threading.Lock()

        def store(item, out, finite):
            if not bool(finite):
                raise self._not_finite(item)
            writer.write(item.name, out, None if item.whole else item.r0)
            if bar is not None:
                with lock:
                    bar.update(out.numel() * out.element_size())

        def store_piece(item, offset, slab, n, finite, ev):
            try:
                ev.synchronize()
                if not bool(finite):
                    raise self._not_finite(item)
                writer.write_bytes(item.name, offset, slab[:n])
            finally:
                self._write_pool.put(slab)
            if bar is not None:
                with lock:
                    bar.update(n)

        topk: dict = {}
        with ThreadPoolExecutor(self.write_threads, thread_name_prefix="mergeflow-write") as wpool:
            for item, block in self._blocks(items):
                block.thresholds, block.zero_sign = thresholds, self.zero_sign
                if item.name in self._topk:  # the tensor's trim state, carried from block to block
                    if item.r0 == 0:
                        topk = {item.name: [list(st) for st in self._topk[item.name]]}
                    block.topk = topk[item.name]
                res = self.method.merge(block)
                del block
                # NaN/Inf in any input reaches the output (masks multiply, never select),
                # so one reduction of the result checks every input.
                finite = torch.isfinite(res.sum())
                res = res.to(out_dtypes[item.name])
                if cuda:  # back through pinned slabs; writer threads wait for each copy
                    flag = torch.empty((), dtype=torch.bool, pin_memory=True)
                    flag.copy_(finite, non_blocking=True)
                    flat = res.view(-1).view(torch.uint8)
                    base_off = item.r0 * item.cols * res.element_size()
                    for start in range(0, flat.numel(), self._write_pool.size):
                        n = min(self._write_pool.size, flat.numel() - start)
                        slab = self._write_pool.get()  # blocks while all slabs are being written
                        slab[:n].copy_(flat[start:start + n], non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record()
                        writes.append(wpool.submit(store_piece, item, base_off + start, slab, n, flag, ev))
                else:
                    shape = item.shape if item.whole else (item.r1 - item.r0, *item.shape[1:])
                    writes.append(wpool.submit(store, item, res.view(shape), finite))
                del res
                while writes and (len(writes) > 4 * self.io_threads or writes[0].done()):
                    writes.popleft().result()
            while writes:
                writes.popleft().result()
        if bar is not None:
            bar.close()

    def _default_donor(self) -> str:
        if self.vocab_resized and self.union is None:  # pad_mean: the model that owns the enlarged vocabulary
            name, rows = next(iter(self.vocab_resized.items()))
            for label in (["base"] if "base" in self.readers else []) + self.expert_names:
                if self.readers[label].info(name).shape[0] == rows:
                    return label
        return "base" if "base" in self.readers else self.expert_names[0]

    def _config_updates(self, donor: Path) -> dict:
        cfg_path = model_dir(donor) / "config.json"
        if not cfg_path.exists():
            return {}
        cfg = json.loads(cfg_path.read_text())
        updates = {}
        if self.vocab_resized and "vocab_size" in cfg:
            rows = next(iter(self.vocab_resized.values()))
            if cfg["vocab_size"] != rows:
                updates["vocab_size"] = rows
        dtypes = {dt for _, _, dt in self.plan}
        if len(dtypes) == 1:
            dt = dtypes.pop()
            for key in ("dtype", "torch_dtype"):
                if key in cfg and cfg[key] != dt:
                    updates[key] = dt
        return updates

    def _runtime_metadata(self) -> dict:
        """What ran the merge: torch version, device (with its name), GPU memory."""
        import torch

        meta = {"torch_version": torch.__version__,
                "device": str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})"
                                              if self.device.type == "cuda" else "")}
        if self.device.type == "cuda":
            meta["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return meta

    def _metadata(self, thresholds, donor_label: str, writer: ShardedWriter) -> dict:
        from mergeflow import __version__

        def model_entry(label):
            r = self.readers[label]
            return {"path": str(Path(r.path).resolve()), "revision": model_revision(r.path),
                    "format": r.format, "dtypes": sorted(self.input_dtypes.get(label, []))}

        meta = {
            "method": self.method.name,
            "params": self.method.params,
            "seed": self.seed,
            "inputs": {
                "base": model_entry("base") if "base" in self.readers else None,
                "experts": {name: model_entry(name) for name in self.expert_names},
            },
            "base_used": self.method.uses_base,
            "donor": donor_label,
            "vocab_policy": self.vocab_policy,
            "vocab_resized": self.vocab_resized,
            "threads": {"read": self.io_threads, "write": self.write_threads},
            "output": {"dtype": sorted({dt for _, _, dt in self.plan}), "tensors": len(self.plan),
                       "bytes": writer.total_size, "files": writer.files},
            "mergeflow_version": __version__,
            "engine": "torch",
            **self._runtime_metadata(),
            "compute_dtype": "float32",
            "wall_time_s": round(time.time() - self.t0, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "check": self.check.metadata(),  # the pre-merge check's warnings and statistics
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        if self.union is not None:
            meta["vocab_union"] = self.union.metadata()
        if "mixup_weights" in self.method.params:
            meta["lambda_m"] = self.method.params["mixup_weights"]
        if thresholds is not None:
            meta["global_trim_thresholds"] = dict(zip(self.expert_names, thresholds))
        if self.method.majority_sign:
            meta["majority_sign"] = self.zero_sign
        return meta

    def _close(self) -> None:
        for r in self.readers.values():
            r.close()
        if getattr(self, "_warm", None) is not None:  # never leave it running into interpreter exit
            self._warm.join()


def run_merge(method: str, experts: dict[str, str], out: str, base: str | None = None,
              params: dict | None = None, seed: int = 42, device: str = "auto",
              vocab_policy: str | None = None, shard_size="5GB", io_threads: int | None = None,
              chunk_elements: int | None = None, progress: bool = True, force: bool = False) -> dict:
    """Merge `experts` ({name: dir}) onto `base` with `method`; write `out`; return metadata.
    `force`: replace an `out` that is not a previous merge output (`check_output`)."""
    import torch

    with torch.inference_mode():
        return MergeEngine(method, experts, base, params, seed, device, vocab_policy, out, shard_size,
                           io_threads, chunk_elements, progress, force).run()
