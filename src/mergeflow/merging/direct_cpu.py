"""Direct engine on the CPU: the GPU kernels' per-element code (merge_ops.h) compiled as C.

A CPU merge with the torch engine pays `import torch` (about 1.2 s on the 2-core
development machine, half of a 0.3 B task-arithmetic merge) and runs each step as
several full passes over float32 tensors. Here each block of rows is read with pread,
merged by a few C calls that each make one pass (task vectors with DARE, MagPrune or
row top-k per row, tensor top-k, fuse into the output dtype) and written with pwrite,
one block per thread; ctypes releases the GIL during each call.

The C source is compiled on first use with the system's C compiler (`$CC`, else `cc`)
into `$MERGEFLOW_CACHE` (default `~/.cache/mergeflow`), keyed by a hash of the sources and
flags. Without a compiler (or with one that lacks `_Float16`, GCC < 12) the merge falls
back to the torch engine. Floating point is strict (`-ffp-contract=off`, no fast-math),
so the results are the torch engine's bits (tests/test_merge_direct.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mergeflow.checkpoints import ITEMSIZE, ShardedWriter, _pread_into
from mergeflow.merging import rng, steps
from mergeflow.merging.direct import DTYPE_CODES, Unsupported, _DirectBase, sorts_rows
from mergeflow.merging.engine import Item

HERE = Path(__file__).parent
SOURCES = ("cpu_kernels.c", "merge_ops.h")
CFLAGS = ("-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-fPIC", "-shared")
INFLIGHT_BYTES = 512 << 20  # working sets of the blocks being merged at once (at least one)

_lib_lock = threading.Lock()
_lib = None


def cache_dir() -> Path:
    return Path(os.environ.get("MERGEFLOW_CACHE") or Path.home() / ".cache" / "mergeflow")


def library():
    """The compiled CPU kernels (built on first use); raises Unsupported without a compiler."""
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _load(_build())
        return _lib


def _build() -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise Unsupported("no C compiler for the CPU kernels (set CC)")
    h = hashlib.sha256(" ".join((cc, *CFLAGS)).encode())
    for name in SOURCES:
        h.update((HERE / name).read_bytes())
    so = cache_dir() / f"cpu_kernels-{h.hexdigest()[:16]}-{platform.machine()}.so"
    if so.exists():
        return so
    so.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=so.parent, prefix=".cpu_kernels-", suffix=".so")
    os.close(fd)
    cmd = [cc, *CFLAGS, "-I", str(HERE), "-o", tmp, str(HERE / "cpu_kernels.c"), "-lm"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise Unsupported(f"compiling the CPU kernels failed ({' '.join(cmd)}): "
                              f"{(res.stderr or res.stdout).strip()[-400:]}")
        os.replace(tmp, so)  # atomic: concurrent merges may build the same library
    except OSError as err:
        raise Unsupported(f"compiling the CPU kernels with {cc}: {err}") from err
    finally:
        Path(tmp).unlink(missing_ok=True)
    return so


def _load(so: Path):
    lib = ctypes.CDLL(str(so))
    vp, u32, u64, i32, f32 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int, ctypes.c_float
    lib.mfc_delta.argtypes = [vp, vp, i32, vp, i32, u64, u64, i32, f32, i32, u32, u32]
    lib.mfc_delta.restype = None
    lib.mfc_rows.argtypes = [vp, u32, u32, u64, i32, vp, i32, u32, u32, u32, vp]
    lib.mfc_rows.restype = None
    lib.mfc_topk.argtypes = [vp, u64, u64]
    lib.mfc_fit.argtypes = [vp, vp, i32, u32, u32, u32]
    lib.mfc_fuse.argtypes = [vp, vp, vp, u64]
    return lib


class _Cpu:
    type = "cpu"
    index = None

    def __str__(self) -> str:
        return "cpu"


class CpuEngine(_DirectBase):
    """The direct engine on the CPU (see module docstring)."""

    engine_name = "cpu-direct"

    def _resolve_device(self, device: str):
        return _Cpu()

    def _ready(self) -> None:
        t = time.time()
        self.lib = library()
        self.timings["kernels_s"] = time.time() - t

    def _setup(self, items: list[Item]) -> None:
        self.tables: dict[int, object] = {}

    def _table(self, n: int):
        t = self.tables.get(n)
        if t is None:
            r = self.method.recipe
            t = self.tables[n] = steps.keep_table_np(n, r.drop_rate, r.window_size)
        return t

    def _working_set(self, item: Item) -> int:
        n = (item.r1 - item.r0) * item.cols
        inputs = sum(self._input_bytes(label, item) for label in self.inputs)
        fitted = len(self.inputs) * n * 4 if item.fit else 0
        return inputs + fitted + len(self.expert_names) * n * 4 + n * ITEMSIZE[self._out_dtype(item)]

    def _read(self, label: str, item: Item):
        import numpy as np

        r = self.readers[label]
        info = r.info(item.name)
        nbytes = self._input_bytes(label, item)
        buf = np.empty(nbytes, dtype=np.uint8)
        row0 = 0 if item.fit else item.r0
        offset = info.offset + row0 * item.cols * ITEMSIZE[info.dtype]
        try:
            _pread_into(r.fd(info.file), memoryview(buf), offset)
        except OSError as err:
            from mergeflow.errors import MergeflowError

            raise MergeflowError(f"{r.label}: reading {item.name!r} from {info.file}: {err}") from err
        return buf

    def _merge_block(self, item: Item, writer: ShardedWriter) -> None:
        import numpy as np

        lib, r = self.lib, self.method.recipe
        rows, cols = item.r1 - item.r0, item.cols
        n = rows * cols
        offset = item.r0 * cols  # first flat index: the RNG counter of element 0
        ptrs, dts, keep_alive = {}, {}, []
        for label in self.inputs:
            buf = self._read(label, item)
            dt = DTYPE_CODES[self.readers[label].info(item.name).dtype]
            if item.fit:  # vocabulary policy: float32 [rows, cols], truncated or mean-padded
                dst = np.empty(n, dtype=np.float32)
                if lib.mfc_fit(dst.ctypes.data, buf.ctypes.data, dt, self._input_rows(label, item), rows, cols):
                    raise MemoryError("mfc_fit")
                buf, dt = dst, 0
            keep_alive.append(buf)
            ptrs[label], dts[label] = buf.ctypes.data, dt
        base = ptrs.get("base") if self.method.uses_base else None
        base_dt = dts["base"] if self.method.uses_base else -1
        scratch = np.empty((len(self.expert_names), n), dtype=np.float32)
        d = [scratch[t].ctypes.data for t in range(len(self.expert_names))]
        dare = r.sparsify == "dare" and r.drop_rate > 0
        keep = steps.f32(1.0 - r.drop_rate) if dare else 1.0
        for t, label in enumerate(self.expert_names):
            k0, k1 = rng.stream_key(self.seed, item.name, t, "dare") if dare else (0, 0)
            lib.mfc_delta(d[t], ptrs[label], dts[label], base, max(base_dt, 0), n, offset, int(dare), keep,
                          int(r.rescale == "inverse"), k0, k1)
        work = None
        if sorts_rows(r):
            work = np.empty(4 * cols, dtype=np.uint32)
        if r.sparsify == "magprune":
            table = self._table(cols)
            for t in range(len(d)):
                k0, k1 = rng.stream_key(self.seed, item.name, t, "magprune")
                lib.mfc_rows(d[t], rows, cols, item.r0, 0, table.ctypes.data, int(r.rescale == "inverse"), 0,
                             k0, k1, work.ctypes.data)
        if r.trim_density < 1:
            if r.trim_scope == "row":
                k = steps.keep_count(r.trim_density, cols)
                if k < cols:
                    for t in range(len(d)):
                        lib.mfc_rows(d[t], rows, cols, item.r0, 1, None, 0, k, 0, 0, work.ctypes.data)
            else:  # the block is the whole tensor (the planner keeps tensor-wide steps whole)
                k = steps.keep_count(r.trim_density, n)
                for t in range(len(d)):
                    if lib.mfc_topk(d[t], n, k):
                        raise MemoryError("mfc_topk")
        fuse = self._fuse_struct(item, d, base_dt)
        out = np.empty(n * ITEMSIZE[self._out_dtype(item)], dtype=np.uint8)
        if lib.mfc_fuse(ctypes.byref(fuse), base, out.ctypes.data, n):
            raise self._not_finite_np(item)
        writer.write_bytes(item.name, offset * ITEMSIZE[self._out_dtype(item)], out)

    def _merge_all(self, items: list[Item], writer: ShardedWriter) -> None:
        workers = self.io_threads + 1  # one more than the cores: reads and writes overlap the C
        in_flight: deque = deque()
        held = 0
        with ThreadPoolExecutor(workers, thread_name_prefix="mergeflow-block") as pool:
            for item in items:
                size = self._working_set(item)
                while in_flight and (len(in_flight) >= 2 * workers or held + size > INFLIGHT_BYTES):
                    fut, s = in_flight.popleft()
                    fut.result()
                    held -= s
                in_flight.append((pool.submit(self._merge_block, item, writer), size))
                held += size
            while in_flight:
                in_flight.popleft()[0].result()
