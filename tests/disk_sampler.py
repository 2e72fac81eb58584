"""A background sampler of the disk a directory tree uses: its peak total, and the largest
size any one of its entries (a merged checkpoint) reached."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def tree_bytes(path: Path) -> int:
    """Apparent size of a file or directory tree (0 if it vanished meanwhile)."""
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
        total = 0
        with os.scandir(path) as entries:
            for entry in entries:
                total += tree_bytes(Path(entry.path))
        return total
    except FileNotFoundError:  # a temp output removed while we walked it
        return 0


class DiskSampler(threading.Thread):
    """Measures the entries of `roots` every `interval` seconds until stopped (use as a context manager)."""

    def __init__(self, *roots: Path, interval: float = 0.2):
        super().__init__(daemon=True)
        self.roots, self.interval = [Path(r) for r in roots], interval
        self.peak_bytes = 0
        self.largest_entry_bytes = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        sizes = []
        for root in self.roots:
            try:
                sizes += [tree_bytes(p) for p in root.iterdir()]
            except FileNotFoundError:  # not created yet
                pass
        self.peak_bytes = max(self.peak_bytes, sum(sizes))
        self.largest_entry_bytes = max([self.largest_entry_bytes, *sizes])
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def __enter__(self) -> DiskSampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop_event.set()
        self.join()
        self.sample()
