"""A Hugging Face Hub on 127.0.0.1: olah serving local git repositories, no upstream.

`HubRepo` writes a repository in the Hub's own layout (one git commit per snapshot, large
files as Git LFS pointers with their objects under `.git/lfs/objects`, as olah reads them
without git-lfs); `OlahHub` starts `olah-cli` on a free port over a mirrors folder
`M/{models,datasets}/<org>/<name>`. olah comes from its own virtualenv (`.venv/olah`, made
by scripts/setup.sh), since its dependencies are not in the pinned stack.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLAH = ROOT / ".venv" / "olah" / "bin" / "olah-cli"
# files the Hub stores in LFS (its default .gitattributes covers these suffixes)
LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".model")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)


def _git(repo: Path, *args: str, env: dict | None = None) -> str:
    res = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {repo}: {res.stderr.strip()}")
    return res.stdout.strip()


class HubRepo:
    """One Hub repository as a git repo; `commit(files)` returns the new commit's SHA."""

    def __init__(self, mirrors: Path, kind: str, repo_id: str):
        assert kind in ("model", "dataset"), kind
        self.kind, self.repo_id = kind, repo_id
        self.path = mirrors / f"{kind}s" / repo_id
        self.path.mkdir(parents=True)
        _git(self.path, "init", "-q", "-b", "main")
        self.commits: list[str] = []

    def commit(self, files: dict[str, bytes | str], message: str) -> str:
        """Replace the tree with `files` (path -> content) and commit it; fixed dates and
        author, so a repository built twice has the same SHAs."""
        for old in _git(self.path, "ls-files").splitlines():
            (self.path / old).unlink()
        files = {".gitattributes": GITATTRIBUTES, **files}
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if name.endswith(LFS_SUFFIXES):
                oid = hashlib.sha256(data).hexdigest()
                obj = self.path / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
                obj.parent.mkdir(parents=True, exist_ok=True)
                obj.write_bytes(data)
                data = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\n"
                        f"size {len(data)}\n").encode()
            target.write_bytes(data)
        _git(self.path, "add", "-A")
        stamp = f"2026-01-01T00:00:{len(self.commits):02d}+00:00"
        env = {**os.environ, "GIT_AUTHOR_NAME": "hub", "GIT_AUTHOR_EMAIL": "hub@127.0.0.1",
               "GIT_COMMITTER_NAME": "hub", "GIT_COMMITTER_EMAIL": "hub@127.0.0.1",
               "GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp}
        _git(self.path, "-c", "commit.gpgsign=false", "commit", "-q", "-m", message, env=env)
        sha = _git(self.path, "rev-parse", "HEAD")
        self.commits.append(sha)
        return sha


def model_files(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(model_dir).iterdir()) if p.is_file()}


def parquet_bytes(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def dataset_card(configs: dict[str, list[str]]) -> str:
    """README.md whose card names each config's splits and files, as the Hub's parquet
    conversions do (configs: name -> splits; files at <config>/<split>-00000-of-00001.parquet)."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        for split in splits:
            lines += [f"  - split: {split}", f"    path: {name}/{split}-*"]
    return "\n".join(lines + ["---", ""])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OlahHub:
    """`olah-cli` serving `mirrors` offline on 127.0.0.1; a context manager."""

    def __init__(self, mirrors: Path, workdir: Path):
        self.mirrors, self.workdir = Path(mirrors), Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def env(self, base: dict | None = None) -> dict:
        """The environment a Hub client needs: HF_ENDPOINT here, offline flags unset."""
        env = dict(os.environ if base is None else base)
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env.pop(key, None)
        no_proxy = ",".join(filter(None, [env.get("NO_PROXY"), "127.0.0.1", "localhost"]))
        env.update(HF_ENDPOINT=self.url, NO_PROXY=no_proxy, no_proxy=no_proxy, HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1")
        return env

    def __enter__(self) -> "OlahHub":
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "configs.toml"
        cfg.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'mirror-netloc = "127.0.0.1:{self.port}"\nmirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            f'repos-path = "{self.workdir / "repos"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            "[accessibility]\noffline = true\n"
        )
        self.log = self.workdir / "olah.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([str(OLAH), "-c", str(cfg)], cwd=self.workdir, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"olah exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                opener.open(self.url + "/", timeout=2)
                return self
            except urllib.error.HTTPError:
                return self  # it answers (a 404 on / is an answer)
            except OSError:
                time.sleep(0.3)
        self.__exit__(None, None, None)
        raise RuntimeError(f"olah did not answer on {self.url} within 60 s: {self.log.read_text()[-2000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
