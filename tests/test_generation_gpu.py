"""The hf backend's compiled decoding (static KV cache + torch.compile, CUDA graphs) against
plain `generate` on CUDA (runs only where CUDA is; issue 21). float32, where the two must
agree token for token; in bfloat16 the static cache rounds its attention differently, and
benchmarks/decode_bench.py --small counts the agreeing completions instead."""

from __future__ import annotations

import pytest
import torch

from mergeflow.generation.base import Decoding

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = [  # longest first, as generate_records hands them
    "The answer is: 42. Let's think step by step. 0 1 2 3 4 5 6 7 8 9 + - * / = ( )",
    "Below is an instruction that describes a task. Write a response.",
    "The answer is: 42. Let's think",
    "def add(a, b):\n    return",
    "0 1 2",
]


def _generate(model_dir, mode, batch, dtype="float32", stop=()):
    from mergeflow.generation.hf import HFBackend

    backend = HFBackend(model_dir, Decoding("hf", dtype, 32, stop, 0, batch_size=batch, hf_decoding=mode))
    assert backend.device.type == "cuda"
    return [t for i in range(0, len(PROMPTS), batch) for t in backend.generate(PROMPTS[i:i + batch])]


@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_equals_plain_on_cuda_float32(tiny_model_dir, batch):
    """Same completions; one compiled graph serves every call (batch 2: the last call's single
    prompt is filled up to 2, so its shapes are the compiled ones)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    plain = _generate(tiny_model_dir, "plain", batch)
    compiled = _generate(tiny_model_dir, "compiled", batch)
    assert compiled == plain
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert _generate(tiny_model_dir, "static", batch) == plain


def test_compiled_stop_strings_on_cuda(tiny_model_dir):
    plain = _generate(tiny_model_dir, "plain", 2, stop=("0 1",))
    assert _generate(tiny_model_dir, "compiled", 2, stop=("0 1",)) == plain
