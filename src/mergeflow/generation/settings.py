"""Generation settings (`--settings` JSON; keys as in docs/architecture.md), validated."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mergeflow.errors import MergeflowError

BACKENDS = ("auto", "hf", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
POSTPROCESS = ("none", "code", "code_mergelm")
# How the hf backend decodes (generation/hf.py says more); auto: compiled on CUDA, plain on CPU.
HF_DECODINGS = ("auto", "plain", "static", "compiled")


@dataclass(frozen=True)
class GenerationSettings:
    template: str
    instruction: str
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    postprocess: str = "none"
    limit: int | None = None
    batch_size: int = 1
    backend: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    # vLLM batches a whole call itself; a call's outputs are cached before the next (resume unit).
    vllm_chunk_size: int = 512
    gpu_memory_utilization: float | None = None  # vLLM's share of GPU memory (host RAM on CPU)
    hf_decoding: str = "auto"  # hf only: plain generate, static KV cache, or static cache + torch.compile

    @classmethod
    def from_dict(cls, raw: dict) -> GenerationSettings:
        if not isinstance(raw, dict):
            raise MergeflowError(f"generation settings must be a JSON object, got {type(raw).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise MergeflowError(f"unknown generation setting(s) {unknown}; known: {sorted(known)}")
        for key in ("template", "instruction", "max_new_tokens"):
            if raw.get(key) is None:
                raise MergeflowError(f"generation setting {key!r} is required")
        _expect(raw, "template", str)
        _expect(raw, "instruction", str)
        _expect_int(raw, "max_new_tokens", minimum=1)
        _expect_int(raw, "batch_size", minimum=1)
        _expect_int(raw, "seed", minimum=0)
        _expect_int(raw, "vllm_chunk_size", minimum=1)
        gmu = raw.get("gpu_memory_utilization")
        if gmu is not None and (isinstance(gmu, bool) or not isinstance(gmu, (int, float)) or not 0 < gmu <= 1):
            raise MergeflowError(f"generation setting 'gpu_memory_utilization' must be in (0, 1], got {gmu!r}")
        if raw.get("limit") is not None:
            _expect_int(raw, "limit", minimum=0)
        stop = raw.get("stop") or []
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise MergeflowError(f"generation setting 'stop' must be a list of non-empty strings, got {stop!r}")
        for key, allowed in (("backend", BACKENDS), ("dtype", DTYPES), ("postprocess", POSTPROCESS),
                             ("hf_decoding", HF_DECODINGS)):
            if key in raw and raw[key] not in allowed:
                raise MergeflowError(f"generation setting {key!r} is {raw[key]!r}; allowed: {', '.join(allowed)}")
        return cls(**{**raw, "stop": tuple(stop)})

    def prompts_per_call(self, backend: str) -> int:
        """Prompts handed to the backend at once: one padded batch (hf), one vLLM call."""
        return self.vllm_chunk_size if backend == "vllm" else self.batch_size

    def to_dict(self) -> dict:
        out = asdict(self)
        out["stop"] = list(self.stop)
        return out


def load_settings(value: str) -> GenerationSettings:
    """`--settings`: inline JSON, or the path of a JSON file."""
    from mergeflow.config import parse_settings

    return GenerationSettings.from_dict(parse_settings(value))


def _expect(raw: dict, key: str, typ: type) -> None:
    if key in raw and not isinstance(raw[key], typ):
        raise MergeflowError(f"generation setting {key!r} must be a {typ.__name__}, got {raw[key]!r}")


def _expect_int(raw: dict, key: str, minimum: int) -> None:
    if key in raw:
        v = raw[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise MergeflowError(f"generation setting {key!r} must be an integer >= {minimum}, got {v!r}")
