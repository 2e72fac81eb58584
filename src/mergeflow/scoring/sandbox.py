"""Run untrusted generated programs, each in its own limited, isolated process.

Every program gets: a fresh working directory, a scrubbed environment, resource limits
(CPU seconds, address space, processes, file size, open files) set with
`resource.setrlimit` before exec, a wall-clock timeout that kills its whole process
group, and, where the machine allows it, Linux namespaces without network:

* ``bwrap``: bubblewrap; the file system is read-only except a private, size-limited
  /tmp (``disk_mb``) that holds the working directory, home directories are hidden, no
  network, own PID namespace;
* ``unshare``: util-linux `unshare` with network, PID and mount namespaces: /tmp, /var/tmp
  and /dev/shm are one private tmpfs of ``disk_mb`` (the working directory is on it), so
  nothing reaches the host's; the rest of the file system is the host's;
* ``none``: a plain subprocess with the limits only (no total-disk limit); never chosen by
  ``auto``, only when asked for by name.

`detect_isolation()` probes the best level that actually works here; the score file
records which one was used.

"Passed" is decided by `_verdict`: exit status 0 is not enough (it can be had without
running the tests); the harness must also write this run's token after the last line. The
program runs as the harness's second thread, so it cannot install signal handlers, and it
may not trace, walk gc objects or use ctypes (the process is killed if it tries).

Root is exempt from RLIMIT_NPROC, so when running as root the program is started under
an unprivileged uid leased for that one program (an flock per uid, so programs of
parallel workers and of concurrent scoring jobs never share a process budget or kill each
other's leftovers); a uid is leased only when no process of it is left, zombies included,
and the scorer reaps the zombies that reach it (it is their subreaper);
under bwrap the interpreter's prefixes are re-exposed inside hidden homes.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from mergeflow.errors import MergeflowError
from mergeflow.judge.server import parent_death_signal

log = logging.getLogger(__name__)

ISOLATIONS = ("bwrap", "unshare", "none")
_PDEATHSIG = parent_death_signal(signal.SIGKILL)
# Unprivileged uids for programs when we run as root, leased one per running program;
# chosen far from the usual system and login ranges.
SANDBOX_UID_BASE = 61000
SANDBOX_UID_COUNT = 1000
_UID_LOCK_DIR = Path(tempfile.gettempdir()) / "mergeflow-sandbox-uids"
# Environment variables a Python program legitimately needs; everything else (API keys,
# tokens, proxies, PYTHON* knobs) is dropped.
_KEPT_ENV = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PATH": "/usr/local/bin:/usr/bin:/bin"}
_OUTPUT_TAIL = 2000  # characters of stdout/stderr kept per program
# Where the program runs inside bwrap/unshare: on the private, size-limited /tmp.
_INNER_WORKDIR = "/tmp/work"
_TESTS_FINISHED = "mergeflow.tests_finished"  # audit event the harness raises after the last test

# The wrapper every program runs under (`python -I -B -c _HARNESS TOKEN_FD VERDICT_FD PROGRAM`);
# `_verdict` says why the evidence it writes cannot be forged by the program.
_HARNESS = r'''
import os, signal, sys, threading, traceback, types


def _arm(token_fd, verdict_fd, program_code):
    token = b""
    while True:
        chunk = os.read(token_fd, 4096)
        if not chunk:
            break
        token += chunk
    os.close(token_fd)
    import ctypes, gc
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: /proc/<pid>/mem closed
    # Builtins bound now: the program may replace names in builtins or in this module.
    getframe, write, die, next_, len_, type_, str_ = sys._getframe, os.write, os._exit, next, len, type, str
    gc_disable, gc_enable, gc_isenabled = gc.disable, gc.enable, gc.isenabled
    denied = frozenset(("sys.settrace", "sys.setprofile", "sys._current_frames", "sys._current_exceptions",
                        "sys.addaudithook", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                        "sys.monitoring.register_callback"))
    anchor = None

    def release():
        yield
        gc_disable()  # no collection (and no program finalizer) runs inside this frame
        caller = getframe(1)
        if anchor is not None and caller.f_code is hook_code and caller.f_back is anchor:
            if token is not None:
                write(verdict_fd, token)
            yield
        write(2, b"sandbox: forged test verdict\n")
        die(90)

    def hook(event, args):
        nonlocal anchor
        was_enabled = gc_isenabled()
        gc_disable()
        try:
            if type_(event) is not str_:
                die(90)
            if event == "exec":
                if anchor is None and len_(args) == 1 and args[0] is program_code:
                    anchor = getframe(1)  # the wrapper's _run frame, before any program code runs
            elif event == _EVENT:
                next_(releaser)
            elif event in denied or event.startswith("ctypes."):
                write(2, b"sandbox: refused " + event.encode() + b"\n")
                die(90)
            elif event == "object.__getattr__" and len_(args) == 2 and args[0] is releaser:
                write(2, b"sandbox: refused reading the verdict generator\n")
                die(90)
        except BaseException:
            die(90)
        if was_enabled:
            gc_enable()

    def forget_token():
        # A forked child's thread becomes its main thread, where signal handlers run: no
        # child holds the token, only the process the scorer started.
        nonlocal token
        token = None

    hook_code = hook.__code__
    releaser = release()
    next_(releaser)
    os.register_at_fork(after_in_child=forget_token)
    sys.addaudithook(hook)


def _run():
    status = 1
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, _MASK)
        exec(_CODE, _MODULE.__dict__)
        sys.audit(_EVENT)
        status = 0
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(status)


_EVENT = %r
_PATH = sys.argv[3]
try:
    with open(_PATH, "rb") as _fh:
        _CODE = compile(_fh.read(), _PATH, "exec")
except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
_arm(int(sys.argv[1]), int(sys.argv[2]), _CODE)
del _arm
_MODULE = types.ModuleType("__main__")
_MODULE.__file__ = _PATH
sys.modules["__main__"] = _MODULE
sys.argv = [_PATH]
# The program runs in a second thread; this one waits with every signal blocked, so Python
# signal handlers (which run only in the main thread) never run.
_MASK = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
threading.Thread(target=_run, name="program").start()
_WAIT = threading.Lock()
_WAIT.acquire()
_WAIT.acquire()
''' % _TESTS_FINISHED


LIMIT_KEYS = ("timeout", "memory_mb", "nproc", "fsize_mb", "nofile", "disk_mb")


@dataclass(frozen=True)
class Limits:
    """Per-program limits; `timeout` is wall-clock seconds."""

    timeout: float = 10.0
    memory_mb: int = 1536  # address space (RLIMIT_AS)
    nproc: int = 32  # processes/threads of the program's uid (RLIMIT_NPROC)
    fsize_mb: int = 16  # largest file it may write, stdout/stderr included (RLIMIT_FSIZE)
    nofile: int = 256  # open file descriptors (RLIMIT_NOFILE)
    disk_mb: int = 64  # everything it may write, all files together (its tmpfs; bwrap/unshare)

    @property
    def cpu_seconds(self) -> int:
        return int(self.timeout) + 1

    @classmethod
    def from_settings(cls, settings: dict) -> Limits:
        fields = {k: settings[k] for k in LIMIT_KEYS if k in settings}
        for key, value in fields.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise MergeflowError(f"sandbox setting {key!r} must be a positive number, got {value!r}")
        return cls(**fields)


@dataclass(frozen=True)
class RunResult:
    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None
    duration: float
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Sandbox:
    """How programs are run on this machine: isolation level, uid drop, interpreter."""

    isolation: str
    python: str
    drop_uid: bool  # run under a leased uid >= SANDBOX_UID_BASE (we are root)
    limits: Limits

    def describe(self) -> dict:
        return {
            "isolation": self.isolation,
            "python": self.python,
            "unprivileged_uid": self.drop_uid,
            "nproc_enforced": self.drop_uid or os.geteuid() != 0,
            "limits": asdict(self.limits),
        }

    # ----------------------------------------------------------------- running
    def run(self, source: str) -> RunResult:
        """Run one program (Python source); passed = every test ran to its end (`_verdict`)."""
        try:
            source.encode("utf-8")
        except UnicodeEncodeError as err:  # e.g. a lone surrogate: no Python file can hold it
            return RunResult("failed", None, 0.0, "", f"program is not UTF-8 text: {err}")
        with contextlib.ExitStack() as stack:
            uid = stack.enter_context(_lease_uid()) if self.drop_uid else None
            return self._run(source, uid)

    def _run(self, source: str, uid: int | None) -> RunResult:
        with tempfile.TemporaryDirectory(prefix="mergeflow-sbx-") as host_dir:
            host = Path(host_dir)
            workdir = host / "work"  # its working directory (bwrap/unshare: copied onto its private tmpfs)
            workdir.mkdir()
            program = workdir / "program.py"
            program.write_bytes(source.encode("utf-8"))
            if uid is not None:
                os.chmod(host, 0o711)  # traversable, not listable; stdout/stderr stay root's
                os.chown(workdir, uid, uid)
                os.chown(program, uid, uid)
            inner = workdir if self.isolation == "none" else Path(_INNER_WORKDIR)
            out_path, err_path, verdict_path = host / "stdout", host / "stderr", host / "verdict"
            token = secrets.token_hex(16).encode()
            token_read, token_write = os.pipe()
            os.write(token_write, token)
            os.close(token_write)
            verdict_fd = os.open(verdict_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            argv = self._argv(workdir, inner / "program.py", uid, token_read, verdict_fd)
            start = time.monotonic()
            try:
                with open(out_path, "wb") as out, open(err_path, "wb") as err:
                    proc = subprocess.Popen(
                        argv,
                        cwd=workdir,
                        env=dict(_KEPT_ENV, HOME=str(inner), TMPDIR=str(inner)),
                        stdin=subprocess.DEVNULL,
                        stdout=out,  # files, not pipes: a program printing forever is cut by RLIMIT_FSIZE
                        stderr=err,
                        start_new_session=True,  # own process group, killed as a whole on timeout
                        preexec_fn=functools.partial(_apply_limits, self.limits, self._nproc_limit(), _PDEATHSIG),
                        close_fds=True,
                        pass_fds=(token_read, verdict_fd),
                    )
            finally:
                os.close(token_read)
                os.close(verdict_fd)
            try:
                returncode = proc.wait(timeout=self.limits.timeout)
                status = _verdict(returncode, verdict_path.read_bytes(), token)
            except subprocess.TimeoutExpired:
                status, returncode = "timeout", None
            finally:
                _kill_group(proc)
            duration = time.monotonic() - start
            stdout, stderr = _tail(out_path), _tail(err_path)
            if uid is not None:
                _kill_uid_leftovers(uid)
        return RunResult(status, returncode, round(duration, 3), stdout, stderr)

    def run_many(self, sources: Sequence[str], max_workers: int = 2, progress=None) -> list[RunResult]:
        """Run programs in parallel (a small thread pool; each program is its own process)."""

        def one(source: str) -> RunResult:
            try:
                return self.run(source)
            finally:
                if progress is not None:
                    progress()

        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            return list(pool.map(one, sources))

    # ----------------------------------------------------------------- helpers
    def _nproc_limit(self) -> int:
        if os.geteuid() == 0:
            return self.limits.nproc  # counted for the sandbox uid alone
        # Unprivileged: RLIMIT_NPROC counts all processes of our uid, so allow what already
        # runs plus the program's own budget.
        return _count_own_processes() + self.limits.nproc

    def _argv(self, workdir: Path, program: Path, uid: int | None, token_fd: int, verdict_fd: int) -> list[str]:
        # -I: no user site, no PYTHON* env; the wrapper runs the program (see _HARNESS)
        python = [self.python, "-I", "-B", "-c", _HARNESS, str(token_fd), str(verdict_fd), str(program)]
        if uid is not None:
            python = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *python]
        if self.isolation == "bwrap":
            return _bwrap_prefix(workdir, self.python, uid is not None, self.limits.disk_mb) + python
        if self.isolation == "unshare":
            return _unshare_prefix(workdir, self.python, uid, self.limits.disk_mb) + python
        return python


def _verdict(returncode: int, verdict: bytes, token: bytes) -> str:
    """Passed only on positive evidence that the program's last line (its last test) ran to
    its end: exit status 0 and exactly this run's random token in the verdict file.

    Why the program cannot forge it: the scorer draws the token per run. It is never in
    the program's source, argv, environment or files, nor in any descriptor the program
    holds: `_HARNESS` reads it from a pipe and closes the pipe before the program is even
    compiled, and the verdict descriptor is write-only. In the process it lives only in a
    suspended generator that writes it only when resumed by the audit hook for the event
    raised by the harness's own `_run` frame (the frame that exec'd the program, recorded
    before any program code ran) after `exec` returned, that is after the last statement
    ran without an exception; any other caller is killed. The ways to read it anyway are
    closed before the program starts: the audit hook (which cannot be removed) kills the
    process on tracing/profiling, gc object walks, other threads' frames, ctypes, new audit
    hooks and reading the generator's frame, and it disables collection while it runs, so
    no program finalizer runs inside it; the process is non-dumpable (PR_SET_DUMPABLE 0), so
    neither it nor a program it execs can open its /proc/<pid>/mem; the program runs in a
    second thread while the main thread waits with every signal blocked, so no Python
    signal handler ever runs (they run only in the main thread) and sees the hook's frame;
    a forked child (whose thread becomes its main thread) forgets the token at the fork.
    Under a leased uid (the scorer is root) the scorer's own memory is out of reach too.
    So exiting early in any way (sys.exit, os._exit, atexit/excepthook, signals, exec,
    killing itself, closing stdout, a daemon thread) leaves the file without the token.
    Not covered: code that makes wrong answers pass the asserts (e.g. an object equal to
    everything) runs the tests to their end; that is the benchmark's problem, not a forgery.
    """
    return "passed" if returncode == 0 and verdict == token else "failed"


# --------------------------------------------------------------------------- limits
def _apply_limits(limits: Limits, nproc: int, die_with_parent=None) -> None:
    # Runs in the child between fork and exec: only setrlimit calls, no locks, no logging.
    if die_with_parent is not None:
        die_with_parent()  # a killed scorer takes its programs along
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.fsize_mb * mb, limits.fsize_mb * mb))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.nofile, limits.nofile))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _kill_uid_leftovers(uid: int, wait: float = 5.0, warn: bool = True) -> bool:
    """Kill anything still running under a sandbox uid (a program that left its group, or
    a PID namespace still being torn down), reap its zombies that reached us, and wait until
    nothing of the uid is left, so the next program under it starts with its whole process
    budget (zombies count against RLIMIT_NPROC too). True when the uid is clean."""
    deadline = time.monotonic() + wait
    while True:
        procs = _processes_of_uid(uid)
        if not procs:
            return True
        for pid, zombie, parent in procs:
            try:
                if not zombie:
                    os.kill(pid, signal.SIGKILL)
                elif parent == os.getpid():
                    os.waitpid(pid, os.WNOHANG)  # an orphan we inherited as subreaper
            except OSError:
                pass
        if time.monotonic() > deadline:
            if warn:
                log.warning("sandbox uid %d still has %d process(es) after %.0f s", uid, len(procs), wait)
            return False
        time.sleep(0.02)


def _processes_of_uid(uid: int) -> list[tuple[int, bool, int]]:
    """(pid, is_zombie, parent pid) of every process of `uid`."""
    procs = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if fields.get("Uid", "").split()[:1] == [str(uid)]:
                zombie = fields.get("State", "").strip().startswith("Z")
                procs.append((int(entry.name), zombie, int(fields.get("PPid", "0").strip() or 0)))
    return procs


@functools.lru_cache(maxsize=None)
def _become_subreaper() -> None:
    """Orphans of programs (a fork bomb's children) become our children, so we can reap
    their zombies instead of leaving them to an init that may never do it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError) as err:
        log.debug("cannot become a child subreaper: %s", err)


@contextlib.contextmanager
def _lease_uid():
    """An unused sandbox uid with no process left (zombies included), held (flock) until
    the block ends."""
    _become_subreaper()
    _UID_LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    for uid in range(SANDBOX_UID_BASE, SANDBOX_UID_BASE + SANDBOX_UID_COUNT):
        fd = os.open(_UID_LOCK_DIR / f"{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            # Leftovers of an earlier scorer (or zombies nobody reaps): not a clean budget.
            if _processes_of_uid(uid) and not _kill_uid_leftovers(uid, wait=0.5, warn=False):
                continue
            yield uid
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return
    raise MergeflowError(f"all {SANDBOX_UID_COUNT} sandbox uids are in use or unclean (locks in {_UID_LOCK_DIR})")


def _count_own_processes() -> int:
    uid = str(os.getuid())
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "status").read_text().split("Uid:")[1].split()[0] == uid:
                    count += len(list((entry / "task").iterdir()))  # threads count too
            except (OSError, IndexError):
                continue
    return count


def _tail(path: Path) -> str:
    data = path.read_bytes()
    return data[-_OUTPUT_TAIL * 4 :].decode("utf-8", errors="replace")[-_OUTPUT_TAIL:]


# --------------------------------------------------------------------------- isolation
def _hidden_dirs() -> list[str]:
    """Home directories hidden from programs (keys, tokens, caches live there)."""
    dirs = {"/root", os.path.expanduser("~")}
    return sorted(d for d in dirs if d not in ("/", "") and os.path.isdir(d))


def _interpreter_prefixes(python: str) -> list[str]:
    return sorted({sys.prefix, sys.base_prefix, str(Path(python).resolve().parent.parent)})


def _bwrap_prefix(workdir: Path, python: str, privileged: bool, disk_mb: int) -> list[str]:
    argv = ["bwrap", "--die-with-parent", "--new-session"]
    if privileged:
        # As root: no user namespace, so the program can be moved to an unprivileged uid
        # (setpriv needs CAP_SETUID/CAP_SETGID; bwrap drops every other capability).
        argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-all"]
    # /tmp is the only writable place: a tmpfs of disk_mb holding the working directory.
    argv += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    argv += ["--size", str(disk_mb * 1024 * 1024), "--perms", "1777", "--tmpfs", "/tmp"]
    hidden = _hidden_dirs()
    for d in hidden:
        argv += ["--tmpfs", d]
    # The interpreter (and a virtualenv's base) may live inside a hidden home or under the
    # private /tmp (a checkout in /tmp, as CI may have it): re-expose it read-only.
    for prefix in _interpreter_prefixes(python):
        if any(prefix == d or prefix.startswith(d + "/") for d in (*hidden, "/tmp")) and os.path.isdir(prefix):
            argv += ["--ro-bind", prefix, prefix]
    argv += ["--perms", "0777", "--dir", _INNER_WORKDIR]
    argv += ["--ro-bind", str(workdir / "program.py"), f"{_INNER_WORKDIR}/program.py"]
    argv += ["--chdir", _INNER_WORKDIR, "--"]
    return argv


# Runs as (namespace) root inside `unshare`: one tmpfs of disk_mb becomes /tmp, /var/tmp
# and /dev/shm, the program is copied onto it, interpreter prefixes under /tmp are bound
# back read-only; then the program's command runs. Arguments: SIZE PROGRAM OWNER BOX
# [PREFIX-UNDER-/tmp ...] -- COMMAND...
_UNSHARE_SETUP = r"""
set -eu
size=$1 src=$2 owner=$3 box=$4
shift 4
mount -t tmpfs -o "size=$size,mode=0755,nosuid,nodev" mergeflow-sandbox "$box"
mkdir -m 1777 "$box/tmp" "$box/var-tmp" "$box/shm"
mkdir -m 0755 "$box/tmp/work"
cp "$src" "$box/tmp/work/program.py"
if [ -n "$owner" ]; then chown "$owner:$owner" "$box/tmp/work" "$box/tmp/work/program.py"; fi
while [ "$1" != -- ]; do
  mkdir -p "$box/tmp/$1"
  mount --bind "/tmp/$1" "$box/tmp/$1"
  mount -o remount,bind,ro "$box/tmp/$1"
  shift
done
shift
if [ -d /var/tmp ]; then mount --bind "$box/var-tmp" /var/tmp; fi
if [ -d /dev/shm ]; then mount --bind "$box/shm" /dev/shm; fi
mount --rbind "$box/tmp" /tmp
cd /tmp/work
exec "$@"
"""


def _unshare_prefix(workdir: Path, python: str, uid: int | None, disk_mb: int) -> list[str]:
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    box = workdir.parent / "box"  # mount point, private to the program's mount namespace
    box.mkdir(mode=0o700)
    under_tmp = [str(Path(p).relative_to("/tmp")) for p in _interpreter_prefixes(python)
                 if p.startswith("/tmp/") and os.path.isdir(p)]
    return ["unshare", *user, "--mount", "--propagation", "private", "--net", "--pid", "--fork", "--kill-child",
            "--mount-proc", "--", "sh", "-c", _UNSHARE_SETUP, "sh", str(disk_mb * 1024 * 1024),
            str(workdir / "program.py"), "" if uid is None else str(uid), str(box), *under_tmp, "--"]


@functools.lru_cache(maxsize=None)
def _probe(isolation: str, python: str, drop_uid: bool) -> bool:
    """Does a trivial program run under this isolation here (and see no network)?"""
    box = Sandbox(isolation, python, drop_uid, Limits(timeout=20))
    check = (
        "import socket\n"
        "s = socket.socket()\n"
        "s.settimeout(2)\n"
        "try:\n"
        "    s.connect(('1.1.1.1', 53))\n"
        "    raise SystemExit(3)\n"  # network reachable: the isolation is not what it claims
        "except OSError:\n"
        "    pass\n"
        if isolation != "none"
        else ""
    )
    try:
        result = box.run(check + "print('ok')\n")
    except (OSError, subprocess.SubprocessError) as err:
        log.debug("sandbox probe %s failed: %s", isolation, err)
        return False
    ok = result.passed and result.stdout.strip() == "ok"
    if not ok:
        log.debug("sandbox probe %s failed: %s %s", isolation, result.status, result.stderr[-300:])
    return ok


ISOLATION_KEY = "scoring.code.isolation"  # the config key that chooses the level


def detect_isolation(
    prefer: str = "auto", python: str | None = None, limits: Limits | None = None
) -> Sandbox:
    """The strongest working sandbox here, or exactly `prefer` (error if it does not work).
    `auto` never falls back to `none`: running without isolation must be asked for."""
    python = python or sys.executable
    limits = limits or Limits()
    if prefer not in ("auto", *ISOLATIONS):
        raise MergeflowError(f"config key '{ISOLATION_KEY}' (sandbox setting 'isolation') must be "
                             f"auto|{'|'.join(ISOLATIONS)}, got {prefer!r}")
    candidates = ("bwrap", "unshare") if prefer == "auto" else (prefer,)
    root = os.geteuid() == 0
    for isolation in candidates:
        tool = {"bwrap": "bwrap", "unshare": "unshare", "none": None}[isolation]
        if tool and shutil.which(tool) is None:
            continue
        # As root prefer an unprivileged uid (RLIMIT_NPROC applies); it needs setpriv and an
        # interpreter that uid can reach (bwrap re-exposes hidden prefixes; others cannot).
        for drop in ([True, False] if root and shutil.which("setpriv") else [False]):
            if _probe(isolation, python, drop):
                if root and not drop:
                    log.warning("sandbox %s runs programs as root: RLIMIT_NPROC is not enforced", isolation)
                return Sandbox(isolation, python, drop, limits)
    if prefer == "auto":
        raise MergeflowError(
            f"config key '{ISOLATION_KEY}': auto found no working sandbox on this machine (bubblewrap, or "
            f"util-linux unshare with mount namespaces; python {python}): install bubblewrap, or set "
            f"{ISOLATION_KEY}: none to run generated programs without isolation"
        )
    raise MergeflowError(f"config key '{ISOLATION_KEY}': {prefer!r} does not work on this machine (python {python})")
