"""vLLM backend (GPUs, or vLLM's CPU build; vllm lives in its own environment, imported lazily here).

Call shape per vLLM's documented offline API: `LLM(model=..., tensor_parallel_size=...,
seed=..., dtype=..., gpu_memory_utilization=...)`, `SamplingParams(temperature=0, top_p=1, max_tokens=..., stop=...,
seed=...)`, `llm.generate(prompts, sampling_params)` -> RequestOutputs whose
`.outputs[0].text` excludes the prompt and the stop string.
"""

from __future__ import annotations

import os
from pathlib import Path

from mergeflow.generation.base import Decoding
from mergeflow.generation.postprocess import cut_at_stop


def tensor_parallel_size(visible_gpus: int, attention_heads: int | None) -> int:
    """All visible GPUs, reduced to the largest count that divides the attention heads
    (vLLM shards heads evenly: 40 heads cannot go on 3 GPUs)."""
    n = max(1, visible_gpus)
    if attention_heads:
        while attention_heads % n:
            n -= 1
    return n


# Without a GPU vLLM sizes its KV cache as a share of host RAM, which also holds the
# weights: its GPU default (0.92) cannot be allocated there.
CPU_MEMORY_SHARE = 0.3


def memory_share(requested: float | None, cuda: bool) -> float | None:
    """`gpu_memory_utilization` to pass: the setting, else vLLM's default on a GPU (None)
    and CPU_MEMORY_SHARE of host RAM without one."""
    if requested is not None:
        return requested
    return None if cuda else CPU_MEMORY_SHARE


class VLLMBackend:
    def __init__(self, model_dir: Path, decoding: Decoding):
        import torch

        # vLLM's engine core is a child process; spawn (not fork) keeps it clear of this
        # process's CUDA and threads. Entry points guard `__main__` for this.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        import vllm

        self.decoding = decoding
        engine_args = {}
        share = memory_share(decoding.gpu_memory_utilization, torch.cuda.is_available())
        if share is not None:
            engine_args["gpu_memory_utilization"] = share
        self.llm = vllm.LLM(model=str(model_dir), tensor_parallel_size=decoding.tensor_parallel_size,
                            seed=decoding.seed, dtype=decoding.dtype, **engine_args)
        self.params = vllm.SamplingParams(
            temperature=0.0,
            top_p=1.0,
            max_tokens=decoding.max_new_tokens,
            stop=list(decoding.stop) or None,
            seed=decoding.seed,
        )

    def generate(self, prompts: list[str]) -> list[str]:
        """All `prompts` in one call: vLLM's scheduler batches them (outputs in prompt order)."""
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [cut_at_stop(o.outputs[0].text, list(self.decoding.stop)) for o in outputs]
