"""The conda environments (envs/*.yaml, used with --sdm conda): one source of pins
(envs/constraints.txt, which scripts/setup.sh installs with), CUDA builds of PyTorch, only
conda-forge; and the SLURM profile never sends sbatch both --gres and --gpus."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from dry_run_jobs import dry_run_env

ROOT = Path(__file__).resolve().parents[1]
ENVS = sorted((ROOT / "envs").glob("*.yaml"))
# conda packages that are tools, not Python distributions: no PyPI pin to agree with
CONDA_TOOLS = {"python", "pip", "c-compiler", "bubblewrap", "cuda-version"}
# pins an env keeps apart from constraints.txt, each for a reason stated in the env file
OWN_PINS = {"vllm.yaml": {"vllm", "transformers"}}  # vLLM 0.32.0 requires transformers<5.20
LM_EVAL_FLOOR = Version("0.4.12")  # lm_eval.tasks._yaml_loader, used by the replay


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "envs" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def env_parts(path: Path) -> tuple[list[str], list[str], list[str]]:
    """channels, conda specs, pip lines of an env file."""
    env = yaml.safe_load(path.read_text())
    conda, pip = [], []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip += [str(x) for x in dep["pip"]]
        else:
            conda.append(str(dep))
    return list(env["channels"]), conda, pip


def pulls_torch(name: str, extras: set[str], seen: set[str]) -> bool:
    """Whether installing this requirement installs torch (from the venv's package metadata)."""
    key = canonicalize_name(name)
    if key == "torch":
        return True
    if key in seen:
        return False
    seen.add(key)
    try:
        requires = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return False
    for text in requires:
        req = Requirement(text)
        marker_ok = req.marker is None or any(
            req.marker.evaluate({**default_environment(), "extra": extra}) for extra in extras | {""})
        if marker_ok and pulls_torch(req.name, set(req.extras), seen):
            return True
    return False


@pytest.mark.parametrize("path", ENVS, ids=[p.name for p in ENVS])
def test_env_pins_agree_with_constraints_and_torch_is_a_cuda_build(path):
    pins = constraints()
    channels, conda, pip = env_parts(path)
    assert channels == ["conda-forge", "nodefaults"], f"{path.name}: channels {channels}"  # no `pytorch` channel

    torch_specs = []
    for spec in conda:
        name = re.split(r"[=<>!\s]", spec, maxsplit=1)[0]
        if name == "pytorch":
            torch_specs.append(("conda", spec))
        else:
            assert name in CONDA_TOOLS, f"{path.name}: conda package {spec!r}: Python packages go under pip:, pinned"
    assert "python=3.11" in conda

    own = OWN_PINS.get(path.name, set())
    needs_torch = False
    for line in pip:
        assert not line.startswith("-"), f"{path.name}: pip option {line!r} (another index could serve a CPU torch)"
        req = Requirement(line)
        key = canonicalize_name(req.name)
        (version,) = [s.version for s in req.specifier if s.operator == "=="] or [None]
        assert version is not None and len(req.specifier) == 1, f"{path.name}: {line!r} is not one exact pin"
        assert "+" not in version, f"{path.name}: {line!r}: a local build label (e.g. +cpu)"
        if key in own:
            assert key not in pins or version != pins[key], f"{path.name}: {key} is in OWN_PINS but agrees"
        else:
            assert pins.get(key) == version, f"{path.name}: {line!r} but envs/constraints.txt pins {pins.get(key)}"
        if key == "torch":
            torch_specs.append(("pip", line))
        needs_torch |= key == "vllm" or pulls_torch(req.name, set(req.extras), set())

    if needs_torch:
        assert torch_specs, f"{path.name}: a package pulls torch but the env does not say which build"
    assert len(torch_specs) <= 1, f"{path.name}: torch from two places: {torch_specs}"
    for source, spec in torch_specs:
        if source == "conda":
            # conda-forge builds named cuda<ver>_* are CUDA builds; cpu_* and a bare `pytorch`
            # (the CPU build where no driver is visible) are refused
            assert spec == f"pytorch={pins['torch']}=cuda*", f"{path.name}: {spec!r}"
            assert any(s.startswith("cuda-version=") for s in conda), f"{path.name}: no cuda-version pin"
        else:  # PyPI's Linux torch wheels are CUDA builds (vLLM is built against them)
            assert spec == f"torch=={pins['torch']}", f"{path.name}: {spec!r}"


def test_lm_eval_floor_everywhere():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [Requirement(r) for group in project["optional-dependencies"].values() for r in group]
    (lm_eval,) = [r for r in specs if canonicalize_name(r.name) == "lm-eval"]
    assert lm_eval.specifier.contains("0.4.12") and not lm_eval.specifier.contains("0.4.11"), lm_eval
    named = 0
    for path in ENVS:
        for line in env_parts(path)[2]:
            req = Requirement(line)
            if canonicalize_name(req.name) == "lm-eval":
                named += 1
                assert all(Version(s.version) >= LM_EVAL_FLOOR for s in req.specifier), (path.name, line)
    assert named >= 2  # score and robustness


def test_an_lm_eval_without_the_yaml_loader_is_named(monkeypatch, tmp_path):
    from mergeflow.errors import MergeflowError
    from mergeflow.scoring import lm_eval_replay

    monkeypatch.setitem(sys.modules, "lm_eval.tasks._yaml_loader", None)  # as in lm-eval < 0.4.12
    with pytest.raises(MergeflowError, match=r"needs lm-eval>=0\.4\.12"):
        lm_eval_replay.load_task_config("gsm8k", tmp_path / "gsm8k.jsonl")


def test_setup_installs_the_torch_that_constraints_pin():
    script = (ROOT / "scripts" / "setup.sh").read_text()
    assert not re.search(r"torch==\d", script), "a torch version written in setup.sh: pin it in envs/constraints.txt"
    # the lines that choose the torch spec, run as they are
    choose = "\n".join(line for line in script.splitlines() if line.startswith(("TORCH_PIN=", "TORCH_SPEC=")))
    spec = subprocess.run(["bash", "-c", f'{choose}\necho "$TORCH_SPEC"'], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"}).stdout.strip()
    assert spec == f"torch=={constraints()['torch']}"


# --- SLURM: one way to ask for GPUs -----------------------------------------------------------

def dry_run(*args: str) -> subprocess.CompletedProcess:
    # (--cores: a dry run otherwise caps each job's threads at 1 core)
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--forceall", "--cores", "64",
                           "--workflow-profile", "workflow/profiles/slurm", *args],
                          cwd=ROOT, env=dry_run_env(), capture_output=True, text=True, timeout=600)


def job_blocks(output: str) -> dict[str, list[dict[str, str]]]:
    """rule -> per job: its resources and threads, from a dry run's job blocks."""
    found: dict[str, list[dict[str, str]]] = {}
    for block in re.split(r"\n(?=\s*\[|\s*rule |\s*localrule )", output):  # (indented in group jobs)
        head = re.match(r"\s*(?:rule|localrule) (\w+):", block)
        if not head:
            continue
        line = re.search(r"^\s+resources: (.*)$", block, re.M)
        job = dict(kv.split("=", 1) for kv in line.group(1).split(", ")) if line else {}
        threads = re.search(r"^\s+threads: (\d+)$", block, re.M)
        job["threads"] = threads.group(1) if threads else "1"
        found.setdefault(head.group(1), []).append(job)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("configfile", ["config/della.yaml", "config/m3.yaml", "config/mergebench.yaml"])
def test_paper_runs_ask_gpus_one_way_and_generate_gets_two_cpus(configfile, snakemake_dry_run):
    done = snakemake_dry_run(configfile, "workflow/profiles/slurm")  # as dry_run() runs it, shared by the session
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = job_blocks(done.stdout)
    assert jobs.get("merge") and jobs.get("generate"), sorted(jobs)
    for rule, each in jobs.items():
        for job in each:
            assert not ("gres" in job and ("gpu" in job or "gpu_model" in job)), (rule, job)
    for job in (job for rule, each in jobs.items() if rule.startswith("generate") for job in each):
        assert job["gpu"] == "1" and int(job["threads"]) >= 2, job  # vLLM: front end + engine core
        # every benchmark set's generate rule gets the profile's generate runtime (12 h), not the default 1 h
        assert job["runtime"] == "720", job


@pytest.mark.slow
def test_a_gpu_gres_beside_the_rules_gpu_is_rejected():
    for args in (["--set-resources", "merge:gres=gpu:1"], ["--default-resources", 'gres="gpu:a100:1"']):
        done = dry_run("--configfile", "config/della.yaml", *args)
        assert done.returncode != 0, args
        shown = done.stdout + done.stderr
        assert "asks for GPUs, which this workflow requests with the `gpu` resource" in shown, shown[-2000:]
