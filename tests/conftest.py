"""Shared fixtures: a tiny Llama checkpoint with a locally trained tokenizer, and Snakemake
dry runs of whole configs run once per session.

Built from transformers/tokenizers directly (not from mergeflow.demo) so that tests of
every stage share one independent, seconds-cheap model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dry_run_jobs import dry_run_env


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject): one worker per core, at most 4 (each imports torch; the demo
    and the SLURM test bring their own processes)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


# The longest modules of the slow tier, started first when every tier runs on the workers
# (scripts/test.sh: --no-loadscope-reorder keeps this order): the rest fills the other cores.
LONGEST_FIRST = ("test_demo_e2e.py", "test_vllm.py", "test_slurm.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Snakemake's slurm executor plugin asks `scontrol show config` when it is loaded: about 10 s
# where SLURM is installed but no controller runs (CI); only the cluster fixture
# (tests/slurm_cluster.py) needs SLURM's real config, and it sets it.
os.environ.setdefault("SLURM_CONF", "/dev/null")

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_llama(out: Path, seed: int = 0, vocab_size: int = 512) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    corpus = [
        "The answer is: 42. Let's think step by step.",
        "def add(a, b):\n    return a + b\nassert add(1, 2) == 3",
        "Below is an instruction that describes a task. Write a response.",
        "### Instruction:\n### Response:\nUSER: ASSISTANT: correct incorrect Output (a) Output (b)",
        "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } : , . ? !",
    ] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny, randomly initialised Llama checkpoint (safetensors + tokenizer)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def judge_server(tiny_model_dir):
    """A real `transformers serve` of the tiny model on 127.0.0.1: (base_url, model name)."""
    from mergeflow.judge.server import local_server, served_model_name

    with local_server(tiny_model_dir, device="cpu") as base_url:
        yield base_url, served_model_name(tiny_model_dir)


# --- Snakemake dry runs of whole configs, shared by the tests that read them ------------------

ROOT = Path(__file__).resolve().parents[1]


class DryRuns:
    """`snakemake -n -p --forceall --cores 64` of a config, each (config, profile) run once per
    session and only when a test asks: the paper configs schedule thousands of jobs, and
    several tests read the same plan (job counts, shell commands, resources, threads).

    --forceall: every job of the DAG, whatever results/ already holds; --cores 64: a dry run
    otherwise caps each job's threads at its cores. configfile None: no --configfile, so the
    default profile (profiles/default) names the demo."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str | None, str | None], subprocess.CompletedProcess] = {}

    def __call__(self, configfile: str | None = None, profile: str | None = None) -> subprocess.CompletedProcess:
        key = (configfile, profile)
        if key not in self._runs:
            args = [sys.executable, "-m", "snakemake", "-n", "-p", "--forceall", "--cores", "64"]
            args += ["--workflow-profile", profile] if profile else []
            args += ["--configfile", configfile] if configfile else []
            self._runs[key] = subprocess.run(args, cwd=ROOT, env=dry_run_env(), capture_output=True, text=True,
                                             timeout=900)
        return self._runs[key]


@pytest.fixture(scope="session")
def snakemake_dry_run() -> DryRuns:
    """snakemake_dry_run(configfile=None, profile=None) -> the CompletedProcess of its dry run
    (stdout: the job blocks and the job stats table), cached for the session."""
    return DryRuns()


def perturbed_experts(base_dir: Path, out_dir: Path, n: int, seed: int, scale: float = 0.01) -> dict[str, str]:
    """n experts e0..e{n-1} of a checkpoint: its tensors plus seeded Gaussian noise (seed + i)."""
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(Path(base_dir) / "model.safetensors")
    experts = {}
    for i in range(n):
        d = Path(out_dir) / f"e{i}"
        d.mkdir()
        g = torch.Generator().manual_seed(seed + i)
        save_file({k: v + scale * torch.randn(v.shape, generator=g) for k, v in sd.items()}, d / "model.safetensors")
        experts[f"e{i}"] = str(d)
    return experts
