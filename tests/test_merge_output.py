"""A merge never destroys what it did not write: `--out` guards (inputs, foreign files,
regular files, --force), temporaries of dead merges cleaned, a full disk as a clean error."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergeflow.cli import main
from mergeflow.merging.engine import METADATA_FILE
from test_merge_engine import make_expert


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    return tiny_model_dir, {n: make_expert(tiny_model_dir, root / n, i + 1) for i, n in enumerate(("a", "b"))}


def merge(models, out, *extra):
    base, experts = models
    argv = ["merge", "--method", "task_arithmetic", "--base", str(base), "--out", str(out), "--device", "cpu",
            *extra]
    for name, path in experts.items():
        argv += ["--expert", f"{name}={path}"]
    return main(argv)


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_directory_with_other_files_is_refused_unless_forced(models, tmp_path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("years of work")
    assert merge(models, out) == 2
    one_error_line(capsys, f"--out {out}", "chapter1.tex", "--force")
    assert tree(out) == {"chapter1.tex": hashlib.sha256(b"years of work").hexdigest()}
    assert merge(models, out, "--force") == 0
    assert (out / METADATA_FILE).is_file() and not (out / "chapter1.tex").exists()


def test_regular_file_is_refused(models, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    assert merge(models, out) == 2
    one_error_line(capsys, f"--out {out}", "existing file")
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("where", ["base", "expert", "inside_expert", "above_expert", "symlink_to_expert"])
def test_an_input_is_refused_even_with_force(models, tmp_path, capsys, where):
    base, experts = models
    out = {"base": base, "expert": experts["a"], "inside_expert": experts["a"] / "merged",
           "above_expert": experts["a"].parent, "symlink_to_expert": tmp_path / "link"}[where]
    if where == "symlink_to_expert":
        out.symlink_to(experts["a"], target_is_directory=True)
    before = {p: tree(p) for p in (base, *experts.values())}
    assert merge(models, out, "--force") == 2
    one_error_line(capsys, f"--out {out}", "input", "never writes over")
    assert {p: tree(p) for p in before} == before


def test_previous_output_and_empty_dir_are_replaced_but_not_with_extra_files(models, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert merge(models, empty) == 0
    assert merge(models, empty) == 0  # a previous merge output: replaced (a rerun)
    (empty / "my_eval.jsonl").write_text("{}\n")
    capsys.readouterr()
    assert merge(models, empty) == 2
    one_error_line(capsys, f"--out {empty}", "my_eval.jsonl")
    assert (empty / "my_eval.jsonl").read_text() == "{}\n"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _fake_temp(out: Path, pid: int, files=("model.safetensors", "config.json")) -> Path:
    tmp = out.parent / f"{out.name}.tmp-{pid}"
    tmp.mkdir()
    for name in files:
        (tmp / name).write_bytes(b"\0" * 4096)
    return tmp


def test_temporaries_of_dead_merges_are_removed_live_ones_kept(models, tmp_path):
    out = tmp_path / "merged"
    dead = _fake_temp(out, _dead_pid())
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live_proc, \
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as reused_proc:
        try:
            live = _fake_temp(out, live_proc.pid)
            os.utime(live, (time.time() + 30, time.time() + 30))  # written after its writer started
            reused = _fake_temp(out, reused_proc.pid)  # pid taken by a process younger than the temporary
            os.utime(reused, (time.time() - 3600, time.time() - 3600))
            foreign = _fake_temp(out, _dead_pid(), files=("model.safetensors", "my_notes.txt"))
            assert merge(models, out) == 0
            assert not dead.exists() and not reused.exists()
            assert live.is_dir() and foreign.is_dir() and (foreign / "my_notes.txt").exists()
        finally:
            live_proc.kill()
            reused_proc.kill()


def test_full_disk_is_a_clean_error_leaving_previous_output_and_no_temporary(models, tmp_path, capsys,
                                                                               monkeypatch):
    from mergeflow import checkpoints

    out = tmp_path / "merged"
    assert merge(models, out) == 0
    before = tree(out)
    capsys.readouterr()

    def full(fd, view, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints, "_pwrite_all", full)
    assert merge(models, out) == 2
    one_error_line(capsys, f"--out {out}", "no space left")
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_commit_killed_between_its_renames_loses_nothing(models, tmp_path):
    out = tmp_path / "merged"
    assert merge(models, out) == 0
    before = tree(out)
    # killed after moving the previous output aside, before renaming the new one in
    aside = tmp_path / f"merged.old-{_dead_pid()}"
    os.rename(out, aside)
    foreign = _fake_temp(out, _dead_pid(), files=("model.safetensors", "thesis.tex"))
    os.rename(foreign, tmp_path / f"merged.old-{_dead_pid()}")  # not what a merge writes: kept
    assert merge(models, out) == 0
    del before[METADATA_FILE]  # (its timings differ)
    assert {k: v for k, v in tree(out).items() if k != METADATA_FILE} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("merged.")) \
        == [p.name for p in tmp_path.glob("merged.old-*") if (p / "thesis.tex").exists()]


def test_unwritable_metadata_out_is_a_clean_error(models, tmp_path, capsys, monkeypatch):
    from mergeflow import atomic

    def full(path, text, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "write_text", full)
    meta = tmp_path / "meta.json"
    assert merge(models, tmp_path / "merged", "--metadata-out", str(meta)) == 2
    one_error_line(capsys, f"--metadata-out {meta}", "No space left")


@pytest.fixture
def small_disk(tmp_path):
    """A size-limited tmpfs (root only): `mount(size_bytes)` -> its mount point."""
    mounted = []

    def mount(size: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(point)
        return point

    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    yield mount
    busy = [p for p in mounted if subprocess.run(["umount", str(p)], capture_output=True).returncode != 0]
    for point in busy:  # detach it all the same, then fail: a file on it is still open
        subprocess.run(["umount", "-l", str(point)], check=False)
    assert not busy, f"files left open on {busy}"


def test_a_real_full_disk_keeps_the_previous_output(models, tmp_path, capsys, small_disk):
    probe = tmp_path / "probe"
    assert merge(models, probe) == 0
    size = sum(p.stat().st_size for p in probe.iterdir())
    disk = small_disk(size * 3 // 2 + 65536)  # room for one output, not for a second beside it
    out = disk / "merged"
    assert merge(models, out) == 0
    before = tree(out)
    capsys.readouterr()
    assert merge(models, out) == 2
    one_error_line(capsys, f"--out {out}", "no space left")
    assert tree(out) == before
    assert sorted(p.name for p in disk.iterdir()) == ["merged"]
