"""Model merging: steps, method registry, keyed randomness and the streaming engine."""

import os

_CPU_THREADS: int | None = None


def cpu_threads() -> int:
    """Threads a merge may keep busy: its job's `--threads` (Snakemake's {threads}), else
    every CPU of the machine."""
    return _CPU_THREADS or os.cpu_count() or 2


def set_cpu_threads(threads: int | None) -> None:
    """Size every pool of this process's merges (readers, writers, RNG, sort) to `threads`."""
    global _CPU_THREADS
    _CPU_THREADS = threads
