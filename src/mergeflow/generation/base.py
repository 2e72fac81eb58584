"""The one interface every generation backend implements, and choosing a backend."""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mergeflow.errors import MergeflowError


@dataclass(frozen=True)
class Decoding:
    """What decides a greedy generation besides the model and the prompt: the generation
    set-up. Every field is part of the cache key unless marked `metadata={"cache_key": False}`."""

    backend: str  # resolved: "hf" or "vllm"
    dtype: str  # resolved for hf ("float32"/"bfloat16"/"float16"); vllm may keep "auto"
    max_new_tokens: int
    stop: tuple[str, ...]
    seed: int
    backend_version: str = ""  # transformers.__version__ or vllm.__version__
    tensor_parallel_size: int = 1
    batch_size: int = 1  # prompts per backend call (hf: padding depends on the batch)
    # Memory for vLLM's KV cache changes its speed, not its outputs.
    gpu_memory_utilization: float | None = field(default=None, metadata={"cache_key": False})
    # hf: "plain" generate, "static" KV cache, or "compiled" (static cache + torch.compile); "n/a" for vllm.
    hf_decoding: str = "plain"

    def setup(self) -> dict:
        """The fields that identify an output (the cache key's decoding part)."""
        out = {f: getattr(self, f) for f, spec in self.__dataclass_fields__.items()
               if spec.metadata.get("cache_key", True)}
        out["stop"] = list(self.stop)
        return out

    def load_key(self) -> tuple:
        """What a loaded backend is built from: decodings that share it share one model load
        (the rest, max_new_tokens, stop, seed of hf, batch size, is per call)."""
        return tuple(getattr(self, f) for f in LOAD_FIELDS[self.backend])

    def check_loaded_for(self, loaded: "Decoding", what: str) -> None:
        """One-line error when this decoding needs another load than `loaded`'s (`what`: the load)."""
        if self.load_key() != loaded.load_key():
            raise MergeflowError(f"{what} loaded for {loaded.load_key()} asked to decode with {self.load_key()}: "
                                 f"another {what}")


# The Decoding fields fixed when a backend loads its model (vLLM's engine takes its seed).
LOAD_FIELDS = {
    "hf": ("backend", "dtype", "backend_version", "hf_decoding"),
    "vllm": ("backend", "dtype", "backend_version", "tensor_parallel_size", "gpu_memory_utilization", "seed"),
}


class Backend(Protocol):
    def generate(self, prompts: list[str], decoding: Decoding | None = None) -> list[str]:
        """Greedy continuations of `prompts` under `decoding` (one with this backend's
        `load_key`; None: the one it was built with), each cut before its first stop string."""
        ...


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(name: str) -> str:
    import torch

    if name == "auto":
        return "vllm" if vllm_available() and torch.cuda.is_available() else "hf"
    if name == "vllm" and not vllm_available():
        raise MergeflowError(
            "generation setting backend='vllm' but vllm is not importable here; "
            "install it (envs/vllm.yaml) or use backend 'hf'"
        )
    if name not in ("hf", "vllm"):
        raise MergeflowError(f"unknown generation backend {name!r}; known: auto, hf, vllm")
    return name


def resolve_dtype(dtype: str, backend: str) -> str:
    """`auto`: bf16 on GPU and fp32 on CPU for hf; vLLM's own `auto` (the checkpoint's dtype)."""
    if dtype != "auto" or backend == "vllm":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def resolve_hf_decoding(value: str, backend: str) -> str:
    """`auto`: static cache + torch.compile (CUDA graphs) on a GPU, where plain `generate` is
    launch-bound; plain `generate` on the CPU, where compiling costs more than it saves."""
    if backend != "hf":
        return "n/a"
    if value != "auto":
        return value
    import torch

    return "compiled" if torch.cuda.is_available() else "plain"


def resolve_decoding(settings, model_dir: Path) -> Decoding:
    """The full generation set-up of `settings` for `model_dir` on this machine."""
    backend = resolve_backend(settings.backend)
    module = importlib.import_module("vllm" if backend == "vllm" else "transformers")
    tp = 1
    if backend == "vllm":
        import torch

        from mergeflow.generation.vllm import tensor_parallel_size

        heads = json.loads((Path(model_dir) / "config.json").read_text()).get("num_attention_heads")
        tp = tensor_parallel_size(torch.cuda.device_count(), heads)
    return Decoding(
        backend=backend,
        dtype=resolve_dtype(settings.dtype, backend),
        max_new_tokens=settings.max_new_tokens,
        stop=settings.stop,
        seed=settings.seed,
        backend_version=str(getattr(module, "__version__", "")),
        tensor_parallel_size=tp,
        batch_size=settings.prompts_per_call(backend),
        gpu_memory_utilization=settings.gpu_memory_utilization,
        hf_decoding=resolve_hf_decoding(settings.hf_decoding, backend),
    )


def load_backend(model_dir: Path, decoding: Decoding) -> Backend:
    if decoding.backend == "hf":
        from mergeflow.generation.hf import HFBackend

        return HFBackend(model_dir, decoding)
    if decoding.backend == "vllm":
        from mergeflow.generation.vllm import VLLMBackend

        return VLLMBackend(model_dir, decoding)
    raise MergeflowError(f"unknown generation backend {decoding.backend!r}")
