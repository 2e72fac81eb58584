"""vLLM backend (GPUs, or vLLM's CPU build; vllm lives in its own environment, imported lazily here).

Call shape per vLLM's documented offline API: `LLM(model=..., tensor_parallel_size=...,
seed=..., dtype=..., gpu_memory_utilization=...)`, `SamplingParams(temperature=0, top_p=1, max_tokens=..., stop=...,
seed=...)`, `llm.generate(prompts, sampling_params)` -> RequestOutputs whose
`.outputs[0].text` excludes the prompt and the stop string.

Import-safe: nothing here starts an engine at import. vLLM starts its engine core (and on
the CPU a worker) as child processes with spawn, which re-import the parent's `__main__`:
a script that builds `VLLMBackend` must guard its entry point (`if __name__ == "__main__":`),
as `mergeflow.__main__` does.

On the CPU (vLLM's CPU build, `scripts/setup_vllm.sh`) the KV cache lives in host RAM:
- `gpu_memory_utilization` (the generation setting) is then the share of host RAM that the
  worker reserves (weights + KV cache); vLLM's GPU default 0.92 can never be had, since the
  RAM also holds everything else. When it is set, it is used as given (0.15 worked here).
- otherwise `VLLM_CPU_KVCACHE_SPACE` (GiB, vLLM's own variable), when set, sizes the KV cache;
- otherwise the KV cache gets CPU_KV_CACHE_BYTES.
The CPU build also compiles the model with inductor at start-up (about a minute on two
cores); CPU engines run eagerly instead (CPU_ENFORCE_EAGER), which gives the same greedy
outputs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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


# KV cache of a CPU engine when neither the setting nor VLLM_CPU_KVCACHE_SPACE sizes it:
# 1 GiB holds about 500k tokens of the demo models, and a 4k-token sequence of a 7B model.
CPU_KV_CACHE_BYTES = 1 << 30
# Eager on the CPU: inductor's start-up compile costs a minute on small CPUs (see above).
CPU_ENFORCE_EAGER = True


def memory_args(requested: float | None, cuda: bool, environ: Mapping[str, str] = os.environ) -> dict:
    """The engine arguments that size vLLM's memory: the setting `gpu_memory_utilization`
    when given; on a GPU nothing else (vLLM's default); on the CPU VLLM_CPU_KVCACHE_SPACE
    when set (vLLM reads it), else a KV cache of CPU_KV_CACHE_BYTES."""
    if requested is not None:
        return {"gpu_memory_utilization": requested}
    if cuda or environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return {}
    return {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}


def engine_args(model_dir: Path, decoding: Decoding, cuda: bool, environ: Mapping[str, str] = os.environ) -> dict:
    """Keyword arguments of `vllm.LLM` for `decoding` (the one place they are chosen)."""
    args = {"model": str(model_dir), "tensor_parallel_size": decoding.tensor_parallel_size, "seed": decoding.seed,
            "dtype": decoding.dtype, **memory_args(decoding.gpu_memory_utilization, cuda, environ)}
    if not cuda and CPU_ENFORCE_EAGER:
        args["enforce_eager"] = True
    return args


class VLLMBackend:
    def __init__(self, model_dir: Path, decoding: Decoding):
        import torch

        # vLLM's engine core is a child process; spawn (not fork) keeps it clear of this
        # process's CUDA and threads. Entry points guard `__main__` for this.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        import vllm

        self.decoding = decoding
        self.llm = vllm.LLM(**engine_args(model_dir, decoding, torch.cuda.is_available()))
        self._params: dict[tuple, object] = {}
        self.params = self._sampling(decoding)

    def _sampling(self, decoding: Decoding):
        """The `SamplingParams` of a decoding: per call, so one engine serves every benchmark."""
        import vllm

        decoding.check_loaded_for(self.decoding, "vLLM engine")
        key = (decoding.max_new_tokens, decoding.stop)
        if key not in self._params:
            self._params[key] = vllm.SamplingParams(
                temperature=0.0,
                top_p=1.0,
                max_tokens=decoding.max_new_tokens,
                stop=list(decoding.stop) or None,
                seed=decoding.seed,
            )
        return self._params[key]

    def generate(self, prompts: list[str], decoding: Decoding | None = None) -> list[str]:
        """All `prompts` in one call: vLLM's scheduler batches them (outputs in prompt order)."""
        decoding = decoding or self.decoding
        outputs = self.llm.generate(prompts, self._sampling(decoding), use_tqdm=False)
        return [cut_at_stop(o.outputs[0].text, list(decoding.stop)) for o in outputs]
