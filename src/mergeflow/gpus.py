"""The GPUs of one job: claim them on a local machine, and check at start that they are usable.

Snakemake's local executor only counts `--resources gpu=N`; it does not say which GPUs a job
gets, so every job would see (and use) GPU 0. `claim(n)` takes n of the machine's GPUs with
one file lock per GPU (held by this process; the kernel drops it when the process exits or
is killed) and sets CUDA_VISIBLE_DEVICES to them. Under SLURM the scheduler has already set
CUDA_VISIBLE_DEVICES to the allocation's GPUs: jobs claim among those only (a group job runs
several jobs in one allocation), never others of the node.

`check_torch(n)` then fails at once (MergeflowError: exit status 2) when
the job cannot use what it was granted, e.g. a CPU build of torch on a GPU node.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from mergeflow.errors import MergeflowError

log = logging.getLogger(__name__)

ENV_DEVICES = "MERGEFLOW_GPU_DEVICES"  # the machine's GPUs (comma-separated), instead of nvidia-smi -L
ENV_CLAIMS = "MERGEFLOW_GPU_CLAIMS"  # directory of the per-GPU lock files
VISIBLE = "CUDA_VISIBLE_DEVICES"
POLL_S = 2.0


def add_argument(parser) -> None:
    """The `--gpus N` option of every GPU-using command (rules pass their `gpu` resource)."""
    parser.add_argument(
        "--gpus", type=int, default=None, metavar="N",
        help="GPUs granted to this job: outside SLURM, claim N of the machine's GPUs and set "
             "CUDA_VISIBLE_DEVICES to them (0 hides every GPU); then fail at once unless they are "
             "usable (default: no claim, no check)",
    )


def under_slurm() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def _split(devices: str) -> list[str]:
    return [d.strip() for d in devices.split(",") if d.strip()]


def machine_gpus() -> tuple[list[str], str]:
    """The GPUs jobs on this machine (under SLURM: in this allocation) may claim, and where
    that list came from."""
    if under_slurm():
        return _split(os.environ.get(VISIBLE, "")), "SLURM's CUDA_VISIBLE_DEVICES"
    override = os.environ.get(ENV_DEVICES)
    if override is not None:
        return _split(override), ENV_DEVICES
    inherited = os.environ.get(VISIBLE)
    if inherited is not None:  # the user gave this workflow a subset of the GPUs
        return _split(inherited), VISIBLE
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], "nvidia-smi -L (not found)"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return [], "nvidia-smi -L (failed)"
    # lines "GPU 0: NVIDIA H200 (UUID: GPU-...)"; MIG instances are indented and not listed
    return [line.split(":", 1)[0].split()[1] for line in out.splitlines() if line.startswith("GPU ")], "nvidia-smi -L"


def claims_dir() -> Path:
    where, runtime = os.environ.get(ENV_CLAIMS), os.environ.get("XDG_RUNTIME_DIR")
    if where:
        base = Path(where)
    else:
        base = Path(runtime) / "mergeflow-gpus" if runtime else Path(f"/tmp/mergeflow-gpus-{os.getuid()}")
    # SLURM may renumber each allocation's GPUs from 0: claims are per allocation there
    return base / f"slurm-{os.environ['SLURM_JOB_ID']}" if under_slurm() else base


class Claim:
    """GPUs held by this process (lock files kept open) until release() or exit."""

    def __init__(self, devices: list[str], fds: list[int]):
        self.devices = devices
        self._fds = fds

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _lock_path(device: str) -> Path:
    return claims_dir() / f"gpu-{device.replace('/', '_')}.lock"


def _try_lock(device: str) -> int | None:
    path = _lock_path(device)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for the waiting message
    return fd


def _holders(devices: list[str]) -> str:
    found = []
    for device in devices:
        try:
            pid = _lock_path(device).read_text().strip()
        except OSError:
            continue
        found.append(f"GPU {device}: pid {pid}")
    return ", ".join(found)


def claim(n: int, timeout: float | None = None) -> Claim | None:
    """Make this process see exactly n GPUs: CUDA_VISIBLE_DEVICES="" for 0, else n claimed
    GPUs (waiting while other jobs hold them), under SLURM among the scheduler's."""
    if n < 0:
        raise MergeflowError(f"--gpus {n}: expected a count >= 0")
    if n == 0:
        # a CPU job must not pick up a GPU that belongs to another job (merge --device auto would)
        os.environ[VISIBLE] = ""
        return None
    pool, source = machine_gpus()
    if not pool:  # nothing to claim from: the check that follows says what torch sees
        return None
    if n > len(pool):
        raise MergeflowError(f"--gpus {n}: this machine has {len(pool)} GPU(s) ({source}: {','.join(pool)})")
    claims_dir().mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    said = False
    while True:
        fds, got = [], []
        for device in pool:
            fd = _try_lock(device)
            if fd is not None:
                fds.append(fd)
                got.append(device)
                if len(got) == n:
                    os.environ[VISIBLE] = ",".join(got)
                    log.info("claimed GPU(s) %s of %s (%s)", ",".join(got), ",".join(pool), source)
                    return Claim(got, fds)
        for fd in fds:  # all or nothing: holding some while waiting for more could deadlock
            os.close(fd)
        if deadline is not None and time.monotonic() >= deadline:
            raise MergeflowError(f"--gpus {n}: no {n} free GPU(s) among {','.join(pool)} after {timeout:g} s "
                                 f"(held: {_holders(pool)}; claims under {claims_dir()})")
        if not said:
            log.info("waiting for %d free GPU(s) among %s (held: %s)", n, ",".join(pool), _holders(pool))
            said = True
        time.sleep(POLL_S)


def _visible() -> str:
    value = os.environ.get(VISIBLE)
    return "unset" if value is None else repr(value)


def check_torch(n: int) -> None:
    """Fail unless torch is a CUDA build that sees the n GPUs the job was granted."""
    if n <= 0:
        return
    import torch

    count = torch.cuda.device_count() if torch.version.cuda else 0
    if count < n:
        why = "a CPU build of torch" if torch.version.cuda is None else "fewer GPUs than granted"
        raise MergeflowError(
            f"this job was granted {n} GPU(s) (--gpus {n}) but torch {torch.__version__} sees {count} ({why}): "
            f"torch.version.cuda={torch.version.cuda}, torch.cuda.device_count()={count}, "
            f"CUDA_VISIBLE_DEVICES={_visible()}"
        )


def prepare(n: int | None, query: str = "torch") -> Claim | None:
    """Claim and check the job's GPUs (`--gpus`; None: neither). query: 'torch', or 'none'
    where the caller runs check_torch itself, later (the merge imports torch while it reads)."""
    if n is None:
        return None
    held = claim(n)
    if query == "torch":
        check_torch(n)
    return held
