"""The CLIs spare the interpreter's last garbage collection (mergeflow.cli.spare_exit_collection):
gc.freeze() runs at exit, after the command, never while the process goes on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import atexit, gc, sys
atexit.register(lambda: print("at exit, frozen:", gc.get_freeze_count() > 0, flush=True))  # runs after the CLI's
from {module} import main
main({argv!r})
print("after the command, frozen:", gc.get_freeze_count() > 0, flush=True)
"""


def _run(module: str, argv: list[str]) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE.format(module=module, argv=argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_mergeflow_commands_freeze_only_at_exit():
    out = _run("mergeflow.cli", ["plan", "config/config.yaml"])
    assert "after the command, frozen: False" in out and "at exit, frozen: True" in out, out


def test_the_merge_entry_point_too(tmp_path):
    out = _run("mergeflow.merging.__main__", ["--method", "task_arithmetic", "--expert", "a=/nonexistent",
                                              "--base", "/nonexistent", "--out", str(tmp_path / "o")])
    assert "at exit, frozen: True" in out, out  # (a bad input returns 2: still spared at exit)
