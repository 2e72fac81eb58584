"""Checkpoint I/O for merging: lazy per-tensor reads, sharded atomic writes.

Reading. Safetensors files are read with `os.pread` at the offsets of their header (the
documented safetensors layout) instead of through `safe_open`'s memory map: mapped pages
that a merge touches count towards the process' resident memory until the map is closed,
so a memory-mapped merge of 13B experts looks (and, under cgroup limits, is charged) like
a 100 GB process. Plain reads into reused buffers keep the resident set at the working
set. Pickled `.bin` checkpoints go through `torch.load(mmap=True, weights_only=True)` and
each shard's map is dropped once all its tensors were read.

Writing. The output layout (shards, header, offsets) is planned from the tensor names,
shapes and dtypes before any data exists, so tensors can be written with `os.pwrite` in
any order and from several threads; the result is byte-identical to a sequential write
and readable by `safetensors`/`transformers`. Everything goes to `<out>.tmp-<pid>` and is
renamed to `<out>` only when complete: a killed merge never leaves a directory named
`<out>`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mergeflow.errors import MergeflowError

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Files copied from the donor model next to the merged weights (those that exist).
CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# Embedding / output-head tensors, the only ones a vocabulary policy may resize (row dim).
VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|embed_in|embed_out|word_embeddings)\.weight$")
VOCAB_POLICIES = ("truncate", "pad_mean", "union")  # union: mergeflow.merging.vocab

_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
            "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def dtype_name(dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"`."""
    return str(dtype).removeprefix("torch.")


def model_dir(path: str | os.PathLike) -> Path:
    """The directory of a checkpoint given as a directory or as one of its weight files."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def natural_key(name: str) -> list:
    """Sort key that puts `layers.2` before `layers.10`."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def is_vocab_tensor(name: str) -> bool:
    return bool(VOCAB_TENSOR.search(name))


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, byte offset of its data, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "bfloat16"
    file: Path
    offset: int  # absolute byte offset in `file` (safetensors only)
    fmt: str  # "safetensors" | "bin"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise MergeflowError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(fh.fileno()).st_size
            if n > size - 8 or n > 100_000_000:
                raise MergeflowError(f"{path}: corrupt safetensors header (length {n})")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as err:
        raise MergeflowError(f"{path}: cannot read safetensors header: {err}") from err
    infos = {}
    data_start = 8 + n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        st_dtype = entry.get("dtype")
        if st_dtype not in _ST_DTYPES:
            raise MergeflowError(f"{path}: tensor {name!r} has unsupported dtype {st_dtype!r}")
        dtype = _ST_DTYPES[st_dtype]
        shape = tuple(int(s) for s in entry["shape"])
        begin, end = entry["data_offsets"]
        numel = 1
        for s in shape:
            numel *= s
        itemsize = ITEMSIZE[dtype]
        if end - begin != numel * itemsize or data_start + end > size:
            raise MergeflowError(
                f"{path}: tensor {name!r} data_offsets {begin}..{end} do not match "
                f"shape {list(shape)} x {dtype} (file size {size})"
            )
        infos[name] = TensorInfo(name, shape, dtype, path, data_start + begin, "safetensors")
    return infos


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from `fd` at `offset` (pread may return short counts)."""
    done, total = 0, len(view)
    while done < total:
        n = os.preadv(fd, [view[done : done + (1 << 30)]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += n


def _preallocate(fd: int, size: int) -> None:
    """Allocate a file's blocks up front (Linux fallocate): writing into a sparse file's
    holes allocates blocks on the write path, which is slower. Best
    effort, and never glibc's posix_fallocate, which emulates a missing fallocate by
    writing zeros over the whole file."""
    global _FALLOCATE
    if _FALLOCATE is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _FALLOCATE = libc.fallocate
            _FALLOCATE.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        except (OSError, AttributeError):
            _FALLOCATE = False
    if _FALLOCATE and size and _FALLOCATE(fd, 0, 0, size) != 0:
        import ctypes

        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT):  # a full disk fails now, not after minutes of merging
            raise OSError(err, os.strerror(err))
        # any other failure (EOPNOTSUPP...) leaves the file sparse


_FALLOCATE = None


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done, total = 0, len(view)
    while done < total:
        n = os.pwrite(fd, view[done : done + (1 << 30)], offset + done)
        done += n


class CheckpointReader:
    """Lazy, thread-safe access to the tensors of one model directory (or file).

    Supports a sharded or single `model.safetensors`, any `*.safetensors` set, and
    pickled `pytorch_model.bin` (sharded or single). Reads return fresh CPU tensors in
    the checkpoint's dtype; `rows=(a, b)` reads a slice of the first dimension only.
    """

    def __init__(self, path: str | os.PathLike, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(path)
        self.infos: dict[str, TensorInfo] = {}
        self._fds: dict[Path, int] = {}
        self._bin: dict[Path, dict] = {}
        self._bin_left: dict[Path, set[str]] = {}
        self._lock = threading.Lock()
        self.format = self._discover()

    # -- discovery -------------------------------------------------------------------
    def _discover(self) -> str:
        p = self.path
        if not p.exists():
            raise MergeflowError(f"model {self.label}: path {p} does not exist")
        if p.is_file():
            files = [p]
        elif (p / SAFE_INDEX).exists():
            files = self._index_files(p / SAFE_INDEX)
        elif (p / SAFE_SINGLE).exists():
            files = [p / SAFE_SINGLE]
        elif sorted(p.glob("*.safetensors")):
            files = sorted(p.glob("*.safetensors"))
        elif (p / BIN_INDEX).exists():
            files = self._index_files(p / BIN_INDEX)
        elif (p / BIN_SINGLE).exists():
            files = [p / BIN_SINGLE]
        else:
            raise MergeflowError(
                f"model {self.label}: no checkpoint in {p} (expected {SAFE_INDEX}, {SAFE_SINGLE}, "
                f"*.safetensors, {BIN_INDEX} or {BIN_SINGLE})"
            )
        fmt = "safetensors" if files[0].suffix == ".safetensors" else "bin"
        for f in files:
            infos = _read_safetensors_header(f) if fmt == "safetensors" else self._bin_infos(f)
            for name, info in infos.items():
                if name in self.infos:
                    raise MergeflowError(f"model {self.label}: tensor {name!r} appears in two files")
                self.infos[name] = info
        if not self.infos:
            raise MergeflowError(f"model {self.label}: checkpoint in {p} holds no tensors")
        return fmt

    def _index_files(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise MergeflowError(f"model {self.label}: bad index {index}: {err}") from err
        files = []
        for fname in dict.fromkeys(weight_map.values()):
            f = index.parent / fname
            if not f.exists():
                raise MergeflowError(f"model {self.label}: shard {f} named in {index.name} is missing")
            files.append(f)
        return files

    def _load_bin(self, f: Path) -> dict:
        import torch

        with self._lock:
            if f not in self._bin:
                try:
                    sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
                except Exception as err:  # pickle/zip errors come in many types
                    raise MergeflowError(f"model {self.label}: cannot load {f}: {err}") from err
                if not isinstance(sd, dict):
                    raise MergeflowError(f"model {self.label}: {f} does not hold a state dict")
                self._bin[f] = sd
            return self._bin[f]

    def _bin_infos(self, f: Path) -> dict[str, TensorInfo]:
        import torch

        sd = self._load_bin(f)
        infos = {}
        for name, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise MergeflowError(f"model {self.label}: {f} entry {name!r} is not a tensor")
            infos[name] = TensorInfo(name, tuple(t.shape), dtype_name(t.dtype), f, 0, "bin")
        self._bin_left[f] = set(infos)
        # Drop the map until the tensors are needed: the header pass must not pin memory.
        with self._lock:
            del self._bin[f]
        return infos

    # -- access ----------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise MergeflowError(f"model {self.label}: tensor {name!r} is missing") from None

    def fd(self, f: Path) -> int:
        """An open read-only descriptor of checkpoint file `f` (shared; use pread)."""
        with self._lock:
            fd = self._fds.get(f)
            if fd is None:
                fd = self._fds[f] = os.open(f, os.O_RDONLY)
            return fd

    def read(self, name: str, rows: tuple[int, int] | None = None, out=None):
        """Return tensor `name` (or rows `rows[0]:rows[1]` of it) as a new CPU tensor.

        `out`, if given, is a uint8 CPU tensor with at least the needed bytes that the
        data is read into (reused buffers avoid page-faulting fresh memory).
        """
        import torch

        info = self.info(name)
        dtype = _torch_dtype(info.dtype)
        shape = info.shape
        if rows is not None:
            if not shape:
                raise ValueError(f"{name}: cannot slice rows of a scalar")
            a, b = rows
            shape = (b - a, *shape[1:])
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * dtype.itemsize
        if info.fmt == "bin":
            sd = self._load_bin(info.file)
            t = sd[name]
            if rows is not None:
                t = t[rows[0] : rows[1]]
            res = t.contiguous().clone() if out is None else _copy_into(t, out, nbytes)
            self._mark_bin_read(info.file, name, rows)
            return res
        buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out[:nbytes]
        offset = info.offset
        if rows is not None:
            row_bytes = dtype.itemsize
            for s in info.shape[1:]:
                row_bytes *= s
            offset += rows[0] * row_bytes
        if nbytes:
            try:
                _pread_into(self.fd(info.file), memoryview(buf.numpy()).cast("B"), offset)
            except OSError as err:
                raise MergeflowError(f"model {self.label}: reading {name!r} from {info.file}: {err}") from err
        return buf.view(dtype).view(shape)

    def _mark_bin_read(self, f: Path, name: str, rows) -> None:
        info = self.infos[name]
        if rows is not None and info.shape and rows[1] < info.shape[0]:
            return  # more rows of this tensor to come
        with self._lock:
            left = self._bin_left.get(f)
            if left is not None:
                left.discard(name)
                if not left:  # every tensor of this shard was read: unmap it
                    self._bin.pop(f, None)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._bin.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _copy_into(t, out, nbytes):
    dst = out[:nbytes].view(t.dtype).view(t.shape)
    dst.copy_(t)
    return dst


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / 1234 -> bytes (decimal units, as transformers uses)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise MergeflowError(f"shard size {text!r}: expected e.g. 5GB, 500MB or a byte count")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


@dataclass
class _Slot:
    shard: int
    offset: int  # absolute byte offset in the shard file
    nbytes: int
    shape: tuple[int, ...]
    dtype: str


class ShardedWriter:
    """Write a planned set of tensors as sharded safetensors, atomically.

    `plan` lists (name, shape, dtype name) in output order; shards are filled in that
    order up to `max_shard_bytes`. `write()` may be called in any order, from any thread,
    and with row slices (`row_start`). `commit()` writes the index, copies the donor's
    config/tokenizer files, writes `extra_files`, and renames the temporary directory to
    `out`. `abort()` removes the temporary directory.
    """

    def __init__(self, out: str | os.PathLike, plan: Iterable[tuple[str, tuple[int, ...], str]],
                 max_shard_bytes: int = 5 * 10**9):
        self.out = Path(out)
        self.tmp = self.out.parent / f"{self.out.name}.tmp-{os.getpid()}"
        self.slots: dict[str, _Slot] = {}
        self._remaining: dict[str, int] = {}
        self._lock = threading.Lock()
        plan = list(plan)
        # Assign shards.
        shards: list[list[tuple[str, tuple[int, ...], str, int]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            if dtype not in _ST_NAMES:
                raise MergeflowError(f"tensor {name!r}: cannot write dtype {dtype}")
            nbytes = ITEMSIZE[dtype]
            for s in shape:
                nbytes *= s
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        n = len(shards)
        self.files = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.headers: list[bytes] = []
        self.sizes: list[int] = []
        self.total_size = 0
        for i, shard in enumerate(shards):
            header: dict = {"__metadata__": {"format": "pt"}}
            pos = 0
            for name, shape, dtype, nbytes in shard:
                header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
                pos += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
            start = 8 + len(raw)
            for name, shape, dtype, nbytes in shard:
                begin = header[name]["data_offsets"][0]
                self.slots[name] = _Slot(i, start + begin, nbytes, shape, dtype)
                self._remaining[name] = nbytes
            self.headers.append(struct.pack("<Q", len(raw)) + raw)
            self.sizes.append(start + pos)
            self.total_size += pos
        self._fds: list[int] = []

    def open(self) -> ShardedWriter:
        clean_dead_temporaries(self.out)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        for fname, header, size in zip(self.files, self.headers, self.sizes):
            fd = os.open(self.tmp / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)  # before anything can fail: abort() closes it
            os.ftruncate(fd, size)
            _preallocate(fd, size)
            _pwrite_all(fd, memoryview(header), 0)
        return self

    def write(self, name: str, tensor, row_start: int | None = None) -> None:
        """Write `tensor` (CPU, planned dtype) as `name`, or as rows from `row_start`."""
        import torch

        slot = self.slots.get(name)
        if slot is None:
            raise KeyError(f"tensor {name!r} is not in the output plan")
        if dtype_name(tensor.dtype) != slot.dtype:
            raise TypeError(f"tensor {name!r}: planned {slot.dtype}, got {tensor.dtype}")
        t = tensor.contiguous()
        if row_start is None:
            if tuple(t.shape) != slot.shape:
                raise ValueError(f"tensor {name!r}: planned shape {slot.shape}, got {tuple(t.shape)}")
            offset = slot.offset
        else:
            row_bytes = slot.nbytes // slot.shape[0]
            if tuple(t.shape[1:]) != slot.shape[1:] or row_start + t.shape[0] > slot.shape[0]:
                raise ValueError(f"tensor {name!r}: rows {row_start}+{t.shape[0]} do not fit {slot.shape}")
            offset = slot.offset + row_start * row_bytes
        nbytes = t.numel() * t.element_size()
        if nbytes:
            view = memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")
            _pwrite_all(self._fds[slot.shard], view, offset)
        with self._lock:
            self._remaining[name] -= nbytes

    def write_bytes(self, name: str, offset: int, data) -> None:
        """Write raw bytes (a uint8 CPU tensor or a bytes-like object) at byte `offset`
        within tensor `name`."""
        slot = self.slots[name]
        view = memoryview(data.numpy() if hasattr(data, "numpy") else data).cast("B")
        n = len(view)
        if offset < 0 or offset + n > slot.nbytes:
            raise ValueError(f"tensor {name!r}: bytes {offset}+{n} outside its {slot.nbytes}")
        if n:
            _pwrite_all(self._fds[slot.shard], view, slot.offset + offset)
        with self._lock:
            self._remaining[name] -= n

    def missing(self) -> list[str]:
        return [n for n, left in self._remaining.items() if left != 0]

    def commit(self, donor: Path | None = None, extra_files: dict[str, str] | None = None,
               config_updates: dict | None = None) -> Path:
        missing = self.missing()
        if missing:
            raise RuntimeError(f"merge output incomplete, e.g. tensor {missing[0]!r} not written")
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if len(self.files) > 1:
            weight_map = {name: self.files[s.shard] for name, s in self.slots.items()}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if donor is not None:
            copy_model_files(donor, self.tmp, config_updates or {})
        for fname, text in (extra_files or {}).items():
            (self.tmp / fname).write_text(text, encoding="utf-8")  # tokenizer files hold any text
        # Replace atomically; an existing output is moved aside first (rename cannot
        # replace a non-empty directory) and removed after the new one is in place.
        old = None
        if self.out.exists() or self.out.is_symlink():
            old = self.out.parent / f"{self.out.name}.old-{os.getpid()}"
            os.rename(self.out, old)
        try:
            os.rename(self.tmp, self.out)
        except BaseException:
            if old is not None:  # put the previous output back
                os.rename(old, self.out)
            raise
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        return self.out

    def abort(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        shutil.rmtree(self.tmp, ignore_errors=True)


# What a ShardedWriter writes into its temporary directory: the only names that
# `clean_dead_temporaries` will delete.
_WRITER_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|mergeflow_\w+\.json")


def _process_start(pid: int) -> float | None:
    """Start time (epoch seconds) of a running process, None if there is none (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, IndexError, StopIteration, ValueError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _writer_alive(pid: int, made: float) -> bool:
    """Whether process `pid` may still be writing a temporary last modified at `made`."""
    if pid == os.getpid():
        return True
    if not Path("/proc/self/stat").exists():  # no procfs: trust a signal probe alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    start = _process_start(pid)
    # A process started after the temporary was last written cannot have written it: the
    # pid was reused (2 s: boot time and start ticks are coarse).
    return start is not None and start <= made + 2


def clean_dead_temporaries(out: str | os.PathLike) -> list[Path]:
    """Remove `<out>.tmp-<pid>` (and `<out>.old-<pid>` beside an existing `<out>`) left by
    writers that died (killed merges), never a live writer's, and only directories that
    hold nothing but files a writer writes. A `.old` without an `<out>` (killed between
    the two renames of a commit) is the previous output: it is put back."""
    out = Path(out)
    removed = []
    pattern = re.compile(re.escape(out.name) + r"\.(tmp|old)-(\d+)")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for path in entries:
        m = pattern.fullmatch(path.name)
        if m is None or path.is_symlink() or not path.is_dir():
            continue
        try:
            made = path.stat().st_mtime
            files = list(path.iterdir())
        except OSError:
            continue
        if _writer_alive(int(m.group(2)), made):
            continue
        if any(f.is_symlink() or not f.is_file() or not (_WRITER_FILE.fullmatch(f.name) or f.name in CONFIG_FILES)
               for f in files):
            log.warning("left %s alone: it holds files a merge does not write", path)
            continue
        if m.group(1) == "old" and not (out.exists() or out.is_symlink()):
            os.rename(path, out)
            log.warning("restored %s from %s (a commit was interrupted)", out, path.name)
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s, left by a merge that died (pid %s)", path, m.group(2))
        removed.append(path)
    return removed


def copy_model_files(donor: Path, dest: Path, config_updates: dict) -> list[str]:
    """Copy config/generation config/tokenizer files from `donor` into `dest`.

    `config_updates` are applied to config.json (e.g. a new vocab_size or dtype).
    """
    copied = []
    donor = Path(donor)
    if donor.is_file():
        donor = donor.parent
    for fname in CONFIG_FILES:
        src = donor / fname
        if not src.exists():
            continue
        if fname == "config.json" and config_updates:
            cfg = json.loads(src.read_text())
            cfg.update(config_updates)
            (dest / fname).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(src, dest / fname)
        copied.append(fname)
    if "config.json" not in copied:
        log.warning("donor %s has no config.json: the merged directory will lack one", donor)
    return copied


def model_revision(path: str | os.PathLike) -> str | None:
    """Best-effort revision of a model directory.

    Reads `mergeflow_fetch.json` (key `revision`, written by `mergeflow fetch`) if
    present, else the commit hash in a Hugging Face cache path (`.../snapshots/<sha>`).
    """
    p = Path(path)
    meta = p / "mergeflow_fetch.json"
    if meta.is_file():
        try:
            rev = json.loads(meta.read_text()).get("revision")
            if rev:
                return str(rev)
        except (OSError, ValueError):
            pass
    parts = p.resolve().parts
    if "snapshots" in parts:
        i = parts.index("snapshots")
        if i + 1 < len(parts):
            return parts[i + 1]
    return None


# ---------------------------------------------------------------------------------------
# Vocabulary mismatch (embedding / lm_head rows)
# ---------------------------------------------------------------------------------------


def vocab_rows(name: str, shapes: dict[str, tuple[int, ...]], policy: str | None,
               reference: str) -> int | None:
    """Rows of the merged tensor `name` given each model's shape, or raise.

    `shapes` maps model label -> shape; `reference` is the label whose shape the output
    takes when all agree (the base, or the first expert without a base). Returns None when
    all shapes agree. Only embedding/lm_head tensors that differ in their first dimension
    can be reconciled: `truncate` cuts every model to the reference's rows (DELLA),
    `pad_mean` pads every model to the largest row count (MergeLM).
    """
    ref = shapes[reference]
    if all(s == ref for s in shapes.values()):
        return None
    odd = next(label for label, s in shapes.items() if s != ref)
    detail = f"{odd} has {list(shapes[odd])}, {reference} has {list(ref)}"
    same_tail = all(len(s) == 2 and s[1:] == ref[1:] for s in shapes.values())
    if not (is_vocab_tensor(name) and same_tail):
        raise MergeflowError(f"tensor {name!r}: shape mismatch ({detail})")
    if policy is None:
        raise MergeflowError(
            f"tensor {name!r}: vocabulary size mismatch ({detail}); choose a vocabulary policy "
            f"(--vocab-policy truncate|pad_mean|union)"
        )
    if policy == "truncate":
        short = [label for label, s in shapes.items() if s[0] < ref[0]]
        if short:
            raise MergeflowError(
                f"tensor {name!r}: {short[0]} has fewer rows ({shapes[short[0]][0]}) than "
                f"{reference} ({ref[0]}); vocab policy 'truncate' cannot grow it, use 'pad_mean'"
            )
        return ref[0]
    if policy == "pad_mean":
        return max(s[0] for s in shapes.values())
    if policy == "union":  # its rows come from the tokenizers, not from the shapes
        raise MergeflowError(f"tensor {name!r}: vocab policy 'union' is planned by mergeflow.merging.vocab")
    raise MergeflowError(f"vocab policy {policy!r}: expected one of {', '.join(VOCAB_POLICIES)}")


def fit_rows(tensor, rows: int):
    """Truncate to `rows` rows, or pad with copies of the mean of the existing rows."""
    import torch

    n = tensor.shape[0]
    if n == rows:
        return tensor
    if n > rows:
        return tensor[:rows]
    mean = tensor.mean(dim=0, keepdim=True, dtype=torch.float64).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(rows - n, *tensor.shape[1:])], dim=0)
