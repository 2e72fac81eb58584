"""A real single-node SLURM on localhost, for testing the SLURM executor profile.

Debian's slurm-wlm 22.05 with munge for authentication and slurmdbd on MariaDB for
accounting: snakemake-executor-plugin-slurm polls job states with `sacct`, and without a
database `sacct` fails and the plugin loses its jobs and hangs (see
../shared/reference/offline.md). There is no systemd on the test machines, so every daemon
is started by hand as root.

`start()` is idempotent: daemons already up (from an earlier test session) are reused, and
it brings up only what is missing. When the machine cannot host SLURM (not root, no
apt-get, a daemon that will not start) it raises `SlurmUnavailable` whose message says why,
for the test to skip with. Every command and every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

APT_PACKAGES = ("slurm-wlm", "munge", "slurmdbd", "mariadb-server")
CLUSTER = "local"
NODE = "localhost"
PARTITION = "main"
DB_NAME = "slurm_acct_db"
DB_USER = "slurm"
DB_PASS = "mergeflow-test"  # a throwaway local database reachable from 127.0.0.1 only

SLURM_ETC = Path("/etc/slurm")
LOG_DIR = Path("/var/log/slurm")
STATE_DIR = Path("/var/lib/slurm")
PIDS = {
    "munged": Path("/run/munge/munged.pid"),
    "mariadbd": Path("/run/mysqld/mysqld.pid"),
    "slurmdbd": Path("/run/slurmdbd.pid"),
    "slurmctld": Path("/run/slurmctld.pid"),
    "slurmd": Path("/run/slurmd.pid"),
}
LOGS = {
    "munged": Path("/var/log/munge/munged.log"),
    "mariadbd": Path("/var/log/mysql/mariadbd.log"),
    "slurmdbd": LOG_DIR / "slurmdbd.log",
    "slurmctld": LOG_DIR / "slurmctld.log",
    "slurmd": LOG_DIR / "slurmd.log",
}


class SlurmUnavailable(RuntimeError):
    """This machine cannot host the test cluster; the message says why."""


@dataclass
class Cluster:
    partition: str
    cpus: int
    real_memory_mb: int
    started: list[str] = field(default_factory=list)  # daemons this call started (stop() ends only these)


def run(cmd: list[str], timeout: float = 30, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run a command under `timeout -k` (the SLURM clients can block on a dead daemon)."""
    full = ["timeout", "-k", "5", str(int(timeout)), *cmd]
    try:
        res = subprocess.run(full, capture_output=True, text=True, timeout=timeout + 10, **kw)
    except subprocess.TimeoutExpired:
        res = subprocess.CompletedProcess(full, 124, "", f"{cmd[0]}: no answer within {timeout}s")
    if check and res.returncode != 0:
        raise SlurmUnavailable(f"`{' '.join(cmd)}` failed (exit {res.returncode}): {(res.stderr or res.stdout).strip()[-800:]}")
    return res


def wait_until(predicate, timeout: float, what: str, daemon: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise SlurmUnavailable(f"{what} within {timeout:.0f}s{log_tail(daemon)}")


def log_tail(daemon: str | None, lines: int = 15) -> str:
    if daemon is None or not LOGS[daemon].is_file():
        return ""
    tail = LOGS[daemon].read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {LOGS[daemon]}:\n" + "\n".join(tail)


def pid_alive(daemon: str) -> int | None:
    """The pid from the daemon's pid file if that process is alive and is that daemon."""
    try:
        pid = int(PIDS[daemon].read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    return pid if comm == daemon[:15] else None


# --- installation ------------------------------------------------------------------------


def ensure_installed() -> None:
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting SLURM daemons needs root (running as uid %d)" % os.geteuid())
    needed = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct", "sacctmgr", "timeout")
    if all(shutil.which(b, path="/usr/sbin:/usr/bin:/sbin:/bin") for b in needed):
        return
    if not shutil.which("apt-get"):
        raise SlurmUnavailable(f"SLURM is not installed and there is no apt-get to install {' '.join(APT_PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES]
    res = run(install, timeout=900, env=env)
    if res.returncode != 0:  # stale package lists: refresh once
        run(["apt-get", "update", "-qq"], timeout=300, env=env)
        res = run(install, timeout=900, env=env)
    if res.returncode != 0:
        raise SlurmUnavailable(f"apt-get install {' '.join(APT_PACKAGES)} failed: {res.stderr.strip()[-800:]}")


# --- configuration -----------------------------------------------------------------------


def node_resources() -> tuple[int, int]:
    """CPUs and memory to declare: 2 CPUs (the test machines have 2) and 90% of RAM."""
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:"))
    return 2, int(mem_kb / 1024 * 0.9)


def slurm_conf(cpus: int, real_memory_mb: int) -> str:
    return f"""\
# Written by tests/slurm_cluster.py: a single-node test cluster on localhost.
ClusterName={CLUSTER}
SlurmctldHost={NODE}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, each job takes the whole node's memory and jobs run one at a time.
DefMemPerCPU=2000
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={NODE}
JobAcctGatherType=jobacct_gather/none
# Finished jobs stay visible to the controller long after the plugin's first status check.
MinJobAge=600
ReturnToService=2
# Trust the declared CPUs/memory: containers may report the host's hardware.
SlurmdParameters=config_overrides
StateSaveLocation={STATE_DIR}/slurmctld
SlurmdSpoolDir={STATE_DIR}/slurmd
SlurmctldPidFile={PIDS["slurmctld"]}
SlurmdPidFile={PIDS["slurmd"]}
SlurmctldLogFile={LOGS["slurmctld"]}
SlurmdLogFile={LOGS["slurmd"]}
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={NODE} CPUs={cpus} RealMemory={real_memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


def slurmdbd_conf() -> str:
    return f"""\
# Written by tests/slurm_cluster.py.
AuthType=auth/munge
DbdHost={NODE}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StorageUser={DB_USER}
StoragePass={DB_PASS}
StorageLoc={DB_NAME}
PidFile={PIDS["slurmdbd"]}
LogFile={LOGS["slurmdbd"]}
"""


def write_if_changed(path: Path, text: str, mode: int) -> bool:
    if path.is_file() and path.read_text() == text:
        path.chmod(mode)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return True


# --- daemons -----------------------------------------------------------------------------


def munge_works() -> bool:
    return shutil.which("munge") is not None and run(["sh", "-c", "munge -n | unmunge"], timeout=10).returncode == 0


def start_munge(cluster: Cluster) -> None:
    if munge_works():
        return
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    if not Path("/etc/munge/munge.key").is_file():
        run(["runuser", "-u", "munge", "--", "mungekey", "--create"], timeout=30, check=True)
    run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], timeout=30, check=True)
    cluster.started.append("munged")
    wait_until(munge_works, 15, "munge did not answer", "munged")


def db_answers() -> bool:
    return run(["mariadb-admin", "--protocol=socket", "ping"], timeout=10).returncode == 0


def start_mariadb(cluster: Cluster) -> None:
    if not db_answers():
        for d in ("/run/mysqld", "/var/log/mysql"):  # mariadbd writes there as user mysql
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "mysql")
        # mariadbd stays in the foreground: detach it with setsid -f
        cmd = [
            "setsid", "-f", "/usr/sbin/mariadbd", "--user=mysql", "--bind-address=127.0.0.1",
            f"--pid-file={PIDS['mariadbd']}", f"--log-error={LOGS['mariadbd']}",
        ]
        run(cmd, timeout=30, check=True, stdin=subprocess.DEVNULL)
        cluster.started.append("mariadbd")
        wait_until(db_answers, 60, "MariaDB did not answer", "mariadbd")
    sql = (
        f"CREATE DATABASE IF NOT EXISTS {DB_NAME}; "
        f"CREATE USER IF NOT EXISTS '{DB_USER}'@'localhost' IDENTIFIED BY '{DB_PASS}'; "
        f"CREATE USER IF NOT EXISTS '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASS}'; "
        f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'localhost'; "
        f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'127.0.0.1'; FLUSH PRIVILEGES;"
    )
    run(["mariadb", "--protocol=socket", "-u", "root", "-e", sql], timeout=30, check=True)


def dbd_answers() -> bool:
    return run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"], timeout=15).returncode == 0


def start_slurmdbd(cluster: Cluster, restart: bool) -> None:
    if restart:
        stop_daemon("slurmdbd")
    if not (pid_alive("slurmdbd") and dbd_answers()):
        stop_daemon("slurmdbd")
        run(["/usr/sbin/slurmdbd"], timeout=30, check=True)
        cluster.started.append("slurmdbd")
        wait_until(dbd_answers, 60, "slurmdbd did not answer sacctmgr", "slurmdbd")
    clusters = run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"], timeout=15, check=True).stdout.split()
    if CLUSTER not in clusters:
        run(["sacctmgr", "-i", "add", "cluster", CLUSTER], timeout=30, check=True)


def node_state() -> str:
    res = run(["sinfo", "-h", "-N", "-n", NODE, "-o", "%T"], timeout=15)
    return res.stdout.strip().lower() if res.returncode == 0 else ""


def start_slurm_daemons(cluster: Cluster, restart: bool) -> None:
    for d in ("slurmctld", "slurmd"):
        (STATE_DIR / d).mkdir(parents=True, exist_ok=True)
    if restart:
        stop_daemon("slurmd")
        stop_daemon("slurmctld")
    if not pid_alive("slurmctld"):
        run(["/usr/sbin/slurmctld"], timeout=30, check=True)
        cluster.started.append("slurmctld")
        wait_until(lambda: run(["scontrol", "ping"], timeout=10).returncode == 0, 30, "slurmctld did not answer", "slurmctld")
    if not pid_alive("slurmd"):
        run(["/usr/sbin/slurmd", "-N", NODE], timeout=30, check=True)
        cluster.started.append("slurmd")

    def node_usable() -> bool:
        state = node_state()
        if state.startswith(("down", "drain")):  # e.g. left down by an earlier unclean stop
            run(["scontrol", "update", f"nodename={NODE}", "state=resume"], timeout=15)
        return state.startswith(("idle", "mixed", "allocated"))

    wait_until(node_usable, 60, f"node {NODE} did not become idle (state: {node_state() or 'unknown'})", "slurmd")


def stop_daemon(daemon: str, timeout: float = 20) -> None:
    """SIGTERM the daemon named by its pid file (never by name) and wait for it to exit."""
    pid = pid_alive(daemon)
    if pid is None:
        return
    os.kill(pid, 15)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, 9)


def smoke_test() -> None:
    """A trivial batch job must run and be reported COMPLETED by sacct."""
    res = run(["sbatch", "--parsable", "--wait", "-t", "1", "--mem", "10", "-o", "/dev/null", "--wrap", "true"], timeout=60)
    if res.returncode != 0:
        raise SlurmUnavailable(f"a trivial sbatch job failed: {(res.stderr or res.stdout).strip()[-500:]}{log_tail('slurmd')}")
    job = res.stdout.strip().split(";")[0]
    wait_until(
        lambda: "COMPLETED" in run(["sacct", "-n", "-X", "-j", job, "-o", "State"], timeout=15).stdout,
        30,
        f"sacct did not report job {job} as COMPLETED (accounting through slurmdbd is broken)",
        "slurmdbd",
    )


def start() -> Cluster:
    """Bring up (or reuse) the single-node cluster; raises SlurmUnavailable saying why not."""
    ensure_installed()
    cpus, mem = node_resources()
    cluster = Cluster(partition=PARTITION, cpus=cpus, real_memory_mb=mem)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    start_munge(cluster)
    start_mariadb(cluster)
    # the clients (sacctmgr) read slurm.conf too: write both before starting anything
    os.environ["SLURM_CONF"] = str(SLURM_ETC / "slurm.conf")  # tests/conftest.py points it at /dev/null
    dbd_changed = write_if_changed(SLURM_ETC / "slurmdbd.conf", slurmdbd_conf(), 0o600)
    conf_changed = write_if_changed(SLURM_ETC / "slurm.conf", slurm_conf(cpus, mem), 0o644)
    start_slurmdbd(cluster, restart=dbd_changed)
    start_slurm_daemons(cluster, restart=conf_changed)
    smoke_test()
    return cluster


def stop(cluster: Cluster) -> None:
    """Stop the daemons that `start` started, newest first; leave the rest as found."""
    for daemon in reversed(cluster.started):
        if daemon == "mariadbd":
            run(["mariadb-admin", "--protocol=socket", "shutdown"], timeout=30)
        stop_daemon(daemon)


if __name__ == "__main__":  # manual use: python tests/slurm_cluster.py
    t0 = time.monotonic()
    c = start()
    print(f"SLURM up in {time.monotonic() - t0:.1f}s: partition {c.partition}, {c.cpus} CPUs, {c.real_memory_mb} MB; started {c.started}")
