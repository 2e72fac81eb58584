"""Direct engines: merges without torch. This module: what both share, and the GPU engine.

On a GPU the torch engine spends more time starting than merging: `import torch` alone
takes longer than reading, merging and writing a 2.7 B model (benchmarks/README.md). The GPU engine drives the GPU through the
CUDA driver API (ctypes, `cudrv`) with the PTX kernels of `kernels.cu`; the CPU engine
(`direct_cpu`) runs the same per-element code (`merge_ops.h`) compiled as C. A merge
process then imports numpy and the standard library only.

Same plan, same validation, same output layout and metadata as the torch engine (both
are subclasses of it); each step mirrors `steps.py` in arithmetic order, keyed random
draws, exact ranks and tie rules, so the outputs are the torch engine's bits
(tests/test_merge_direct.py; on 2.7 B models too, benchmarks/README.md).

GPU pipeline, whole tensors (as the torch engine on CUDA):
  reader threads: pread from the page cache into pinned slabs -> async copy to a device
      ring buffer (each input tensor split into pieces read by several threads);
  main thread: kernels on one stream (task vectors into a float32 scratch, sparsify,
      trim, fuse into the output dtype), then the result back through pinned slabs;
  writer threads: pwrite each slab at its planned offset in the output shards.
The ring holds the inputs and output of the tensors in flight; a tensor's region is
reused once its output has left the GPU, so the next tensors are read while the current
one is merged and written.

Methods: average, task_arithmetic, ties (trim scope tensor | row), dare (inverse or no
rescale, any combine), della / della_noelect / dare_della / nodrop_noelect, m3 (any
combine, with or without DARE), with either vocabulary policy. Anything else (L1
rescale, della_norank, della_layer, model-scope trim, pickled checkpoints, float64, more
than 8 experts, GPU rows too long for shared memory, no C compiler) raises `Unsupported`
before anything is written, and the CLI falls back to the torch engine.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mergeflow.checkpoints import ITEMSIZE, ShardedWriter, _pread_into
from mergeflow.errors import MergeflowError
from mergeflow.merging import cudrv, rng, steps
from mergeflow.merging.engine import SLAB_BYTES, Item, MergeEngine

log = logging.getLogger(__name__)

DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
MAX_EXPERTS = 8  # kernels.cu MAXE
PIECE_BYTES = 64 << 20  # a reader job: at most this much of one input tensor
RING_BYTES = 6 << 30  # device ring target (at least 3 of the largest tensor's regions)
ALIGN = 256
THREADS = 256
FUSE_MODES = {"sum": 0, "mixup_sum": 0, "mean": 1, "average": 1, "disjoint": 2, "mixup_disjoint": 3}
PTX_PATH = Path(__file__).with_name("kernels.ptx")
KERNELS = ("mf_colmean", "mf_fit", "mf_delta", "mf_rows", "mf_sel_init", "mf_hist", "mf_select", "mf_trim", "mf_fuse")

# CUDA driver enums
_ATTR_SM_COUNT = 16  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
_ATTR_SMEM_OPTIN = 97  # CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
_FUNC_MAX_DYN_SMEM = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_EVENT_DISABLE_TIMING = 2
_STREAM_NON_BLOCKING = 1
_NOT_READY = 600  # CUDA_ERROR_NOT_READY


class Unsupported(Exception):
    """This merge needs the torch engine (the message says why; `quiet`: nothing worth
    telling, e.g. no GPU at all)."""

    def __init__(self, reason: str, quiet: bool = False):
        super().__init__(reason)
        self.quiet = quiet


class _Fuse(ctypes.Structure):
    """kernels.cu `struct Fuse`, passed by value."""

    _fields_ = [("d", ctypes.c_uint64 * MAX_EXPERTS), ("w", ctypes.c_float * MAX_EXPERTS),
                ("m", ctypes.c_float * MAX_EXPERTS), ("n_exp", ctypes.c_int), ("mode", ctypes.c_int),
                ("lam", ctypes.c_float), ("total", ctypes.c_float), ("base_dt", ctypes.c_int),
                ("out_dt", ctypes.c_int)]


class _Device:
    """What the shared engine code asks of a device: `.type` and `.index`."""

    type = "cuda"

    def __init__(self, index: int):
        self.index = index

    def __str__(self) -> str:
        return f"cuda:{self.index}"


def ordinal_of(device: str) -> int | None:
    """The GPU a `--device` value asks for (auto: GPU 0 when the driver sees one)."""
    device = str(device)
    if device == "cpu":
        return None
    if device in ("auto", "cuda"):
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise MergeflowError(f"device {device!r}: expected auto, cpu or cuda")


def device_count() -> int:
    """GPUs the CUDA driver sees (0 without a driver); initialises the driver."""
    lib = cudrv._driver()
    if lib is None or lib.cuInit(0) != 0:
        return 0
    n = ctypes.c_int()
    return n.value if lib.cuDeviceGetCount(ctypes.byref(n)) == 0 else 0


def recipe_unsupported(method) -> str | None:
    """Why the direct engine cannot run this method's recipe, or None."""
    r = method.recipe
    if len(r.weights) > MAX_EXPERTS:
        return f"{len(r.weights)} experts (the direct engine takes at most {MAX_EXPERTS})"
    if r.sparsify is not None and r.rescale not in ("inverse", "none"):
        return f"rescale {r.rescale!r}"
    if r.sparsify == "magprune" and (r.prune_scope != "row" or r.prune_score != "rank"):
        return f"MagPrune scope {r.prune_scope!r} / score {r.prune_score!r}"
    if r.trim_density < 1 and r.trim_scope not in ("tensor", "row"):
        return f"trim scope {r.trim_scope!r}"
    if r.fuse not in FUSE_MODES:
        return f"fuse {r.fuse!r}"
    return None


def sorts_rows(recipe) -> bool:
    """Whether the recipe ranks the elements of each row (MagPrune, row-scope TIES trim)."""
    return recipe.sparsify == "magprune" or (recipe.trim_density < 1 and recipe.trim_scope == "row")


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class DeviceRing:
    """FIFO allocator over one device allocation (`size` bytes at `base`).

    Tensors are merged in plan order, so their regions are released in the order they were
    taken: a circular buffer. A region is released once the event recorded after its last
    use has completed; `alloc(blocking=True)` waits for the oldest such event.
    """

    def __init__(self, base: int, size: int, event_done, event_wait):
        self.base, self.size = base, size
        self.head = 0  # end of the newest region
        self.live: deque = deque()  # [start, nbytes, event or None], oldest first
        self._done, self._wait = event_done, event_wait

    def _place(self, n: int) -> int | None:
        if not self.live:
            return 0 if n <= self.size else None
        tail = self.live[0][0]
        if self.head > tail:
            if self.head + n <= self.size:
                return self.head
            return 0 if n <= tail else None
        return self.head if self.head + n <= tail else None

    def _release_done(self) -> None:
        while self.live and self.live[0][2] is not None and self._done(self.live[0][2]):
            self.live.popleft()
        if not self.live:
            self.head = 0

    def alloc(self, n: int, blocking: bool) -> list | None:
        """A region [offset, n, event] (call `retire` with its event), or None when
        `blocking` is False and no space is free without waiting."""
        self._release_done()
        while True:
            at = self._place(n)
            if at is not None:
                region = [at, n, None]
                self.live.append(region)
                self.head = at + n
                return region
            if not blocking or not self.live or self.live[0][2] is None:
                if blocking:
                    raise MergeflowError(f"internal: device ring of {self.size} bytes cannot hold {n}")
                return None
            self._wait(self.live[0][2])
            self._release_done()

    @staticmethod
    def retire(region: list, event) -> None:
        region[2] = event


class _Slab:
    """A pinned host buffer with the event of its last copy."""

    def __init__(self, addr: int, size: int, event):
        self.addr, self.size, self.event = addr, size, event
        self.view = memoryview((ctypes.c_uint8 * size).from_address(addr)).cast("B")


class _Gpu(cudrv.EarlyInit):
    """Context, kernels, pinned slabs of one device, set up in a background thread (the
    main thread meanwhile reads the checkpoint headers and plans the merge); `result()`
    waits for it. `pinned` is the address of the pinned slabs."""

    def _run(self) -> None:
        try:
            lib = self.lib = cudrv._driver()
            if lib is None:
                raise cudrv.DriverError("libcuda.so.1 not found")
            t = time.time()
            self.ctx = cudrv._context(self.ordinal)
            self.timings["ctx_s"] = time.time() - t
            t = time.time()
            self.pinned = cudrv.host_alloc(self.pinned_bytes)
            self.timings["pin_s"] = time.time() - t
            t = time.time()
            self.fn = cudrv.load_module(PTX_PATH.read_bytes(), KERNELS, PTX_PATH.name)
            self.timings["kernels_s"] = time.time() - t
            v = ctypes.c_int()
            cudrv._check(lib.cuDeviceGetAttribute(ctypes.byref(v), _ATTR_SM_COUNT, self.ordinal), "attribute")
            self.sm_count = v.value
            cudrv._check(lib.cuDeviceGetAttribute(ctypes.byref(v), _ATTR_SMEM_OPTIN, self.ordinal), "attribute")
            self.smem_optin = v.value
            name = ctypes.create_string_buffer(256)
            cudrv._check(lib.cuDeviceGetName(name, 256, self.ordinal), "cuDeviceGetName")
            self.name = name.value.decode(errors="replace")
            self.stream = self.new_stream()
        except cudrv.DriverError as err:
            self.error = str(err)

    # -- thin driver wrappers --------------------------------------------------------------
    def current(self) -> None:
        cudrv._context(self.ordinal)

    def check(self, rc: int, what: str) -> None:
        cudrv._check(rc, what)

    def new_stream(self):
        s = ctypes.c_void_p()
        self.check(self.lib.cuStreamCreate(ctypes.byref(s), _STREAM_NON_BLOCKING), "cuStreamCreate")
        return s

    def new_event(self):
        e = ctypes.c_void_p()
        self.check(self.lib.cuEventCreate(ctypes.byref(e), _EVENT_DISABLE_TIMING), "cuEventCreate")
        return e

    def record(self, event, stream) -> None:
        self.check(self.lib.cuEventRecord(event, stream), "cuEventRecord")

    def wait(self, event) -> None:
        self.check(self.lib.cuEventSynchronize(event), "cuEventSynchronize")

    def done(self, event) -> bool:
        rc = self.lib.cuEventQuery(event)
        if rc == _NOT_READY:
            return False
        self.check(rc, "cuEventQuery")
        return True

    def alloc(self, nbytes: int) -> int:
        p = ctypes.c_uint64()
        self.check(self.lib.cuMemAlloc_v2(ctypes.byref(p), max(nbytes, ALIGN)), f"cuMemAlloc({nbytes} bytes)")
        return p.value

    def free_memory(self) -> int:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.check(self.lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)), "cuMemGetInfo")
        return free.value

    def launch(self, name: str, grid: int, block: int, args: list, smem: int = 0) -> None:
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        self.check(self.lib.cuLaunchKernel(self.fn[name], max(1, grid), 1, 1, block, 1, 1, smem, self.stream,
                                           params, None), name)


class _DirectBase(MergeEngine):
    """What both direct engines share: the checks, the run, inputs, NaN reports."""

    def _start(self) -> None:
        """Start the device set-up (in the background where it can be)."""

    def _ready(self) -> None:
        """Wait for the device set-up; raise Unsupported if it failed."""

    def _device_unsupported(self, items: list[Item]) -> str | None:
        return None

    def _setup(self, items: list[Item]) -> None:
        """Buffers sized from the plan."""

    def _tensor_unsupported(self) -> str | None:
        for label in self.inputs:
            r = self.readers[label]
            if r.format != "safetensors":
                return f"{r.label} is a pickled checkpoint ({r.path})"
            odd = sorted(self.input_dtypes[label] - set(DTYPE_CODES))
            if odd:
                return f"{r.label} holds {odd[0]} tensors"
        odd = sorted({dt for _, _, dt in self.plan} - set(DTYPE_CODES))
        if odd:
            return f"output dtype {odd[0]}"
        return None

    # -- main ----------------------------------------------------------------------------
    def run(self) -> dict:
        self.timings: dict[str, float] = {}
        why = recipe_unsupported(self.method)
        if why:
            raise Unsupported(why)
        self._start()
        try:
            t = time.time()
            self._open()
            items = self._plan()
            self.timings["plan_s"] = time.time() - t
            self._ready()
            why = self._tensor_unsupported() or self._device_unsupported(items)
            if why:
                raise Unsupported(why)
            self._setup(items)
            donor_label, writer = self._open_output()
        except BaseException:
            self._close()
            raise
        return self._write_all(lambda: self._merge_all(items, writer), writer, donor_label, None)

    def _input_rows(self, label: str, item: Item) -> int:
        """Rows of input `label` read for `item`: the block's, or for a vocab-resized tensor
        (always whole) all the rows up to the output's (a truncating policy reads fewer)."""
        info = self.readers[label].info(item.name)
        return min(info.shape[0], item.rows) if item.fit else item.r1 - item.r0

    def _input_bytes(self, label: str, item: Item) -> int:
        info = self.readers[label].info(item.name)
        return self._input_rows(label, item) * item.cols * ITEMSIZE[info.dtype]

    def _out_dtype(self, item: Item) -> str:
        return self._plan_dtype[item.name]

    def _plan(self) -> list[Item]:
        items = super()._plan()
        self._plan_dtype = {name: dt for name, _, dt in self.plan}
        return items

    def _runtime_metadata(self) -> dict:
        try:  # (without importing it)
            from importlib.metadata import version

            torch_version = version("torch")
        except Exception:  # noqa: BLE001 - informational only
            torch_version = None
        return {"torch_version": torch_version, "device": str(self.device)}

    def _fuse_struct(self, item: Item, d_ptrs: list[int], base_dt: int) -> _Fuse:
        """The fuse step's parameters for tensor `item` (Method.merge: mixup_sum weighs by the
        mixing ratios; mixup_disjoint elects with the weights and mixes with the ratios;
        without a base, fuse is average or mixup_sum)."""
        r = self.method.recipe
        fuse = _Fuse()
        for t, ptr in enumerate(d_ptrs):
            fuse.d[t] = ptr
        weights = r.mixup if r.fuse == "mixup_sum" else r.weights
        for t, w in enumerate(weights):
            fuse.w[t] = w
        for t, m in enumerate(r.mixup or []):
            fuse.m[t] = m
        fuse.n_exp = len(d_ptrs)
        fuse.mode = FUSE_MODES[r.fuse]
        fuse.lam = r.lam
        total = sum(weights)
        fuse.total = total if abs(total) >= 1e-8 else 1.0
        fuse.base_dt = base_dt
        fuse.out_dt = DTYPE_CODES[self._out_dtype(item)]
        return fuse

    def _not_finite_np(self, item: Item) -> MergeflowError:
        """Name the input holding NaN/Inf (re-read from disk with numpy), or the output."""
        import numpy as np

        for label in self.inputs:
            r = self.readers[label]
            info = r.info(item.name)
            buf = np.empty(info.numel * ITEMSIZE[info.dtype], dtype=np.uint8)
            _pread_into(r.fd(info.file), memoryview(buf), info.offset)
            if info.dtype == "float32":
                bad = not np.isfinite(buf.view(np.float32)).all()
            else:
                exp = 0x7F80 if info.dtype == "bfloat16" else 0x7C00
                bad = bool(((buf.view(np.uint16) & exp) == exp).any())
            if bad:
                return MergeflowError(f"tensor {item.name!r} of {r.label} ({r.path}) contains NaN or Inf")
        return MergeflowError(f"merged tensor {item.name!r} is not finite although its inputs are "
                              f"(overflow? check lambda and weights)")


class DirectEngine(_DirectBase):
    """The merge engine on the CUDA driver API (see module docstring)."""

    engine_name = "cuda-direct"

    def _resolve_device(self, device: str):
        ordinal = ordinal_of(device)
        if ordinal is None:
            raise Unsupported("the direct engine runs on a GPU only", quiet=True)
        n = device_count()
        if n == 0:
            if str(device) == "auto":
                raise Unsupported("no GPU visible to the CUDA driver", quiet=True)
            raise MergeflowError(f"device {device!r} requested but CUDA is not available")
        if ordinal >= n:
            raise MergeflowError(f"device {device!r}: the CUDA driver sees {n} GPU(s)")
        return _Device(ordinal)

    def _start(self) -> None:
        n_read, n_write = 2 * self.io_threads, 2 * self.write_threads
        self.gpu = _Gpu(self.device.index, (n_read + n_write) * SLAB_BYTES)

    def _ready(self) -> None:
        gpu = self.gpu.result()
        self.timings.update({f"init_{k}": v for k, v in gpu.timings.items()})
        if gpu.error:
            raise Unsupported(f"CUDA driver: {gpu.error}")
        gpu.current()

    def _device_unsupported(self, items: list[Item]) -> str | None:
        if sorts_rows(self.method.recipe):
            cols = max(it.cols for it in items)
            need = 8 * _pow2(cols)
            if need > self.gpu.smem_optin:
                return (f"rows of {cols} elements need {need} bytes of shared memory per block "
                        f"(the GPU offers {self.gpu.smem_optin})")
        return None

    def _setup(self, items: list[Item]) -> None:
        try:
            self._setup_memory(items)
        except cudrv.DriverError as err:  # e.g. out of GPU memory
            raise Unsupported(f"setting up GPU memory: {err}") from err

    def _runtime_metadata(self) -> dict:
        return {**super()._runtime_metadata(), "device": f"{self.device} ({self.gpu.name})",
                "peak_gpu_bytes": self.gpu_bytes}

    def _setup_memory(self, items: list[Item]) -> None:
        """Scratch, selection state and the ring; sized from the plan and free memory."""
        gpu = self.gpu
        n_exp = len(self.expert_names)
        max_numel = max((it.r1 - it.r0) * it.cols for it in items)
        sizes = [self._region_bytes(it) for it in items]
        scratch = _align(n_exp * max_numel * 4)
        small = _align(n_exp * (16 + 256) * 4) + _align(4 * len(items))
        free = gpu.free_memory()
        want = max(3 * max(sizes), min(RING_BYTES, sum(sizes)))
        room = free - scratch - small - (512 << 20)  # leave headroom for the driver
        ring = min(want, room)
        if ring < max(sizes):
            raise Unsupported(f"{free / 2**30:.1f} GiB of free GPU memory cannot hold the largest tensor's "
                              f"inputs, output and scratch ({(max(sizes) + scratch) / 2**30:.1f} GiB)")
        self.scratch = gpu.alloc(scratch)
        self.scratch_stride = max_numel * 4
        self.small = gpu.alloc(small)
        self.flags_dev = self.small + _align(n_exp * (16 + 256) * 4)
        gpu.check(gpu.lib.cuMemsetD32Async(self.flags_dev, 0, len(items), gpu.stream), "cuMemsetD32")
        self.ring = DeviceRing(gpu.alloc(ring), ring, gpu.done, gpu.wait)
        self.gpu_bytes = scratch + small + ring
        # vocabulary policy: fitted inputs as float32, plus one mean row
        fitted = [it for it in items if it.fit]
        fit_bytes = max((len(self.inputs) * _align(it.rows * it.cols * 4) + _align(it.cols * 4)
                         for it in fitted), default=0)
        self.fit_area = gpu.alloc(fit_bytes) if fit_bytes else 0
        self.gpu_bytes += fit_bytes
        self.flags_addr = cudrv.host_alloc(_align(4 * len(items)))
        self.flags_host = (ctypes.c_uint32 * len(items)).from_address(self.flags_addr)
        self.tables: dict[int, tuple[int, object]] = {}
        if sorts_rows(self.method.recipe):
            cols = max(it.cols for it in items)
            smem = 8 * _pow2(cols)
            if smem > 48 * 1024:
                gpu.check(gpu.lib.cuFuncSetAttribute(gpu.fn["mf_rows"], _FUNC_MAX_DYN_SMEM, smem),
                          "cuFuncSetAttribute")
        # pinned slabs: readers' first, writers' after
        n_read, n_write = 2 * self.io_threads, 2 * self.write_threads
        self._read_pool: queue.Queue = queue.Queue()
        self._write_pool: queue.Queue = queue.Queue()
        for i in range(n_read + n_write):
            slab = _Slab(gpu.pinned + i * SLAB_BYTES, SLAB_BYTES, gpu.new_event())
            (self._read_pool if i < n_read else self._write_pool).put(slab)

    def _region_bytes(self, item: Item) -> int:
        total = sum(_align(self._input_bytes(label, item)) for label in self.inputs)
        return total + _align(item.rows * item.cols * ITEMSIZE[self._out_dtype(item)])

    # -- reading --------------------------------------------------------------------------
    def _reader_init(self) -> None:
        self.gpu.current()
        self._local.stream = self.gpu.new_stream()

    def _read_piece(self, label: str, name: str, dst: int, start: int, end: int) -> None:
        """Bytes [start, end) of input tensor `name` of `label` to device address dst+start."""
        gpu = self.gpu
        r = self.readers[label]
        info = r.info(name)
        fd = r.fd(info.file)
        stream = self._local.stream
        in_flight: deque = deque()
        try:
            for pos in range(start, end, SLAB_BYTES):
                n = min(SLAB_BYTES, end - pos)
                if len(in_flight) >= 2:
                    done = in_flight.popleft()
                    gpu.wait(done.event)
                    self._read_pool.put(done)
                slab = self._read_pool.get()
                in_flight.append(slab)
                try:
                    _pread_into(fd, slab.view[:n], info.offset + pos)
                except OSError as err:
                    raise MergeflowError(f"{r.label}: reading {name!r} from {info.file}: {err}") from err
                gpu.check(gpu.lib.cuMemcpyHtoDAsync_v2(dst + pos, slab.addr, n, stream), "cuMemcpyHtoDAsync")
                gpu.record(slab.event, stream)
        finally:
            for slab in in_flight:
                gpu.wait(slab.event)
                self._read_pool.put(slab)

    def _schedule(self, pool, item: Item, blocking: bool) -> dict | None:
        """Take a ring region for `item` and start reading its inputs into it."""
        size = self._region_bytes(item)
        region = self.ring.alloc(size, blocking)
        if region is None:
            return None
        at = self.ring.base + region[0]
        ptrs, futs = {}, []
        for label in self.inputs:
            nbytes = self._input_bytes(label, item)
            ptrs[label] = at
            for s in range(0, nbytes, PIECE_BYTES):
                futs.append(pool.submit(self._read_piece, label, item.name, at, s, min(nbytes, s + PIECE_BYTES)))
            at += _align(nbytes)
        return {"region": region, "ptrs": ptrs, "out": at, "futs": futs}

    # -- merging --------------------------------------------------------------------------
    def _table(self, n: int) -> int:
        """Device address of the MagPrune keep table for rows of n elements."""
        hit = self.tables.get(n)
        if hit is None:
            r = self.method.recipe
            host = steps.keep_table_np(n, r.drop_rate, r.window_size)
            addr = self.gpu.alloc(host.nbytes)
            self.gpu.check(self.gpu.lib.cuMemcpyHtoDAsync_v2(addr, host.ctypes.data, host.nbytes, self.gpu.stream),
                           "cuMemcpyHtoDAsync")
            hit = self.tables[n] = (addr, host)  # (host copy kept alive for the async copy)
            self.gpu_bytes += _align(host.nbytes)
        return hit[0]

    def _grid(self, n: int, per_sm: int = 16) -> int:
        return max(1, min(-(-n // THREADS), self.gpu.sm_count * per_sm))

    def _launch_merge(self, j: int, item: Item, sched: dict) -> int:
        """Queue the kernels of tensor j; returns the device address of its output."""
        gpu, r = self.gpu, self.method.recipe
        u32, u64, i32, f32 = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int, ctypes.c_float
        n = item.rows * item.cols
        rows, cols = item.rows, item.cols
        ptrs = dict(sched["ptrs"])
        dts = {label: DTYPE_CODES[self.readers[label].info(item.name).dtype] for label in self.inputs}
        grid = self._grid(n)
        if item.fit:  # vocabulary policy: each input as float32 [rows, cols]
            mean = self.fit_area + len(self.inputs) * _align(n * 4)
            for k, label in enumerate(self.inputs):
                have = self._input_rows(label, item)
                dst = self.fit_area + k * _align(n * 4)
                if have < rows:
                    gpu.launch("mf_colmean", -(-cols // THREADS), THREADS, [
                        u64(mean), u64(ptrs[label]), i32(dts[label]), u32(have), u32(cols)])
                gpu.launch("mf_fit", grid, THREADS, [u64(dst), u64(ptrs[label]), i32(dts[label]),
                                                     u64(have * cols), u64(n), u32(cols), u64(mean)])
                ptrs[label], dts[label] = dst, 0
        base_label = "base" if self.method.uses_base else None
        base_ptr = ptrs[base_label] if base_label else 0
        base_dt = dts[base_label] if base_label else -1
        d = [self.scratch + t * self.scratch_stride for t in range(len(self.expert_names))]
        dare = r.sparsify == "dare" and r.drop_rate > 0
        keep = steps.f32(1.0 - r.drop_rate) if dare else 1.0
        for t, label in enumerate(self.expert_names):
            k0, k1 = rng.stream_key(self.seed, item.name, t, "dare") if dare else (0, 0)
            gpu.launch("mf_delta", grid, THREADS, [
                u64(d[t]), u64(ptrs[label]), i32(dts[label]),
                u64(base_ptr), i32(max(base_dt, 0)), u64(n), i32(int(dare)), f32(keep),
                i32(int(r.rescale == "inverse")), u32(k0), u32(k1)])
        p = _pow2(cols)
        row_block = 512 if p >= 1024 else max(32, p // 2)
        row_grid = min(rows, gpu.sm_count * 16)
        if r.sparsify == "magprune":
            table = self._table(cols)
            for t in range(len(d)):
                k0, k1 = rng.stream_key(self.seed, item.name, t, "magprune")
                gpu.launch("mf_rows", row_grid, row_block, [
                    u64(d[t]), u32(rows), u32(cols), u32(p), i32(0), u64(table),
                    i32(int(r.rescale == "inverse")), u32(0), u32(k0), u32(k1)], smem=8 * p)
        if r.trim_density < 1:
            if r.trim_scope == "row":
                k = steps.keep_count(r.trim_density, cols)
                if k < cols:
                    for t in range(len(d)):
                        gpu.launch("mf_rows", row_grid, row_block, [
                            u64(d[t]), u32(rows), u32(cols), u32(p), i32(1), u64(0), i32(0), u32(k),
                            u32(0), u32(0)], smem=8 * p)
            else:
                k = steps.keep_count(r.trim_density, n)
                hgrid = self._grid(n, per_sm=8)
                for t in range(len(d)):
                    st = self.small + t * 16 * 4
                    hist = self.small + len(d) * 16 * 4 + t * 256 * 4
                    gpu.launch("mf_sel_init", 1, 256, [u64(st), u64(hist), u32(k)])
                    for mode in (0, 1):
                        for shift in (24, 16, 8, 0):
                            gpu.launch("mf_hist", hgrid, THREADS, [u64(d[t]), u64(n), u64(st), u64(hist),
                                                                    i32(shift), i32(mode)])
                            gpu.launch("mf_select", 1, 32, [u64(st), u64(hist), i32(shift), i32(mode)])
                    gpu.launch("mf_trim", grid, THREADS, [u64(d[t]), u64(n), u64(st)])
        fuse = self._fuse_struct(item, d, base_dt)
        out = sched["out"]
        flag = self.flags_dev + 4 * j
        gpu.launch("mf_fuse", grid, THREADS, [fuse, u64(base_ptr), u64(out), u64(n), u64(flag)])
        gpu.check(gpu.lib.cuMemcpyDtoHAsync_v2(self.flags_addr + 4 * j, flag, 4, gpu.stream), "flag copy")
        return out

    def _merge_all(self, items: list[Item], writer: ShardedWriter) -> None:
        gpu = self.gpu
        bar = None
        if self.progress and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=writer.total_size, unit="B", unit_scale=True, desc="merge", file=sys.stderr)
        lock = threading.Lock()
        writes: deque = deque()

        def store(j, item, offset, slab, n):
            try:
                gpu.wait(slab.event)
                if self.flags_host[j]:
                    raise self._not_finite_np(item)
                writer.write_bytes(item.name, offset, slab.view[:n])
            finally:
                self._write_pool.put(slab)
            if bar is not None:
                with lock:
                    bar.update(n)

        def writer_init():
            gpu.current()

        sched: dict[int, dict] = {}
        ahead = 0  # next item to schedule
        with ThreadPoolExecutor(self.io_threads, thread_name_prefix="mergeflow-read",
                                initializer=self._reader_init) as rpool, \
                ThreadPoolExecutor(self.write_threads, thread_name_prefix="mergeflow-write",
                                   initializer=writer_init) as wpool:
            try:
                for j, item in enumerate(items):
                    while ahead <= j:
                        sched[ahead] = self._schedule(rpool, items[ahead], blocking=True)
                        ahead += 1
                    while ahead < len(items) and ahead - j < 64:
                        s = self._schedule(rpool, items[ahead], blocking=False)
                        if s is None:
                            break
                        sched[ahead] = s
                        ahead += 1
                    cur = sched.pop(j)
                    for f in cur["futs"]:
                        f.result()
                    out = self._launch_merge(j, item, cur)
                    nbytes = item.rows * item.cols * ITEMSIZE[self._out_dtype(item)]
                    for start in range(0, nbytes, SLAB_BYTES):
                        n = min(SLAB_BYTES, nbytes - start)
                        slab = self._write_pool.get()
                        gpu.check(gpu.lib.cuMemcpyDtoHAsync_v2(slab.addr, out + start, n, gpu.stream),
                                  "cuMemcpyDtoHAsync")
                        gpu.record(slab.event, gpu.stream)
                        writes.append(wpool.submit(store, j, item, start, slab, n))
                        while writes and writes[0].done():
                            writes.popleft().result()
                    done = gpu.new_event()
                    gpu.record(done, gpu.stream)
                    DeviceRing.retire(cur["region"], done)
                while writes:
                    writes.popleft().result()
            except BaseException:
                for s in sched.values():  # let the readers finish before their memory goes
                    for f in s["futs"]:
                        f.cancel()
                raise
        gpu.check(gpu.lib.cuStreamSynchronize(gpu.stream), "cuStreamSynchronize")
        if bar is not None:
            bar.close()


def run_merge(method: str, experts: dict[str, str], out: str, base: str | None = None,
              params: dict | None = None, seed: int = 42, device: str = "auto",
              vocab_policy: str | None = None, shard_size="5GB", io_threads: int | None = None,
              progress: bool = True, force: bool = False) -> dict:
    """`engine.run_merge` on a direct engine: the CUDA one on a GPU (device `cuda[:N]`, or
    `auto` where the driver sees a GPU), else the CPU one. Raises `Unsupported` (before
    writing anything) when the merge needs the torch engine."""
    args = (method, experts, base, params, seed, device, vocab_policy, out, shard_size, io_threads, None, progress)
    if ordinal_of(device) is None or (str(device) == "auto" and device_count() == 0):
        from mergeflow.merging.direct_cpu import CpuEngine

        return CpuEngine(*args, force=force).run()
    return DirectEngine(*args, force=force).run()
