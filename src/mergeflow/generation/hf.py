"""transformers backend: batched greedy generation with left padding and stop strings.

How it decodes is the generation setting `hf_decoding` (resolved in base.py, recorded in the
cache key and beside every output):

- `plain`: `generate` as transformers does it by default: a dynamic KV cache that grows by
  one token per step, every kernel launched from Python (on a GPU the step time is the
  launch overhead, not the weights read: issue 21).
- `static`: a static (preallocated) KV cache and SDPA attention, run eagerly. The same
  greedy tokens as `plain` on the CPU (tests/test_generation.py); it exists to test the
  static-cache path without a compiler.
- `compiled`: the static cache with the decoding step compiled by `torch.compile` in mode
  "reduce-overhead" (CUDA graphs: one graph replay per step instead of hundreds of launches),
  transformers' own automatic compilation (`CompileConfig`). Prefill runs uncompiled.

The static cache holds prompt + `max_new_tokens` tokens. transformers sizes a new one to the
largest length any earlier call needed (so the compiled step keeps its shapes) and
`generate_records` hands prompts longest first, so the first call sets the size. Compiled,
a short last batch is filled up to `batch_size` with copies of its last prompt (whose
outputs are dropped): a new batch dimension would cost a second compilation.
"""

from __future__ import annotations

from pathlib import Path

from mergeflow.errors import MergeflowError
from mergeflow.generation.base import Decoding
from mergeflow.generation.postprocess import cut_at_stop

HF_DECODINGS = ("plain", "static", "compiled")  # resolved values (settings.py adds "auto")


def load_kwargs(hf_decoding: str) -> dict:
    """`from_pretrained` arguments of a decoding set-up: the static cache's set-ups ask for
    SDPA by name (plain keeps transformers' default, SDPA for Llama-like models anyway)."""
    _check(hf_decoding)
    return {} if hf_decoding == "plain" else {"attn_implementation": "sdpa"}


def generation_kwargs(hf_decoding: str, device_type: str) -> dict:
    """`GenerationConfig` arguments of a decoding set-up on a device ("cuda", "cpu")."""
    _check(hf_decoding)
    if hf_decoding == "plain":
        return {}
    if hf_decoding == "static":
        return {"cache_implementation": "static", "disable_compile": True}
    from transformers import CompileConfig

    config = CompileConfig(mode="reduce-overhead")
    if device_type != "cuda":
        # transformers compiles only on accelerators unless told; on the CPU it is for tests.
        config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def _check(hf_decoding: str) -> None:
    if hf_decoding not in HF_DECODINGS:
        raise MergeflowError(f"hf decoding set-up {hf_decoding!r} unknown; known: {', '.join(HF_DECODINGS)}")


class HFBackend:
    def __init__(self, model_dir: Path, decoding: Decoding):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.decoding = decoding
        cuda = torch.cuda.is_available()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        if self.tokenizer.pad_token is None:  # Llama-2 has none; DELLA's script pads with unk
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        if self.tokenizer.pad_token is None:
            raise MergeflowError(f"{model_dir}: tokenizer has no pad, unk or eos token to pad batches with")
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=getattr(torch, decoding.dtype),
            device_map="auto" if cuda else None,
            **load_kwargs(decoding.hf_decoding),
        )
        self.model.eval()
        self.device = next(self.model.parameters()).device
        self._configs: dict[tuple, object] = {}
        self.generation_config = self._config(decoding)

    def _config(self, decoding: Decoding):
        """The `GenerationConfig` of a decoding (cheap; one per max_new_tokens and stops)."""
        from transformers import GenerationConfig

        decoding.check_loaded_for(self.decoding, "hf model")
        key = (decoding.max_new_tokens, decoding.stop)
        if key not in self._configs:
            eos = self.model.generation_config.eos_token_id
            if eos is None:
                eos = self.tokenizer.eos_token_id
            self._configs[key] = GenerationConfig(
                do_sample=False,
                num_beams=1,
                max_new_tokens=decoding.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=self.tokenizer.pad_token_id,
                bos_token_id=self.model.generation_config.bos_token_id,
                stop_strings=list(decoding.stop) or None,
                **generation_kwargs(decoding.hf_decoding, self.device.type),
            )
        return self._configs[key]

    def generate(self, prompts: list[str], decoding: Decoding | None = None) -> list[str]:
        torch = self.torch
        decoding = decoding or self.decoding
        config = self._config(decoding)
        n = len(prompts)
        if decoding.hf_decoding == "compiled" and 0 < n < decoding.batch_size:
            prompts = list(prompts) + [prompts[-1]] * (decoding.batch_size - n)
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        torch.manual_seed(decoding.seed)
        with torch.inference_mode():
            out = self.model.generate(**enc, generation_config=config, tokenizer=self.tokenizer)
        new_tokens = out[:n, enc["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        # generate() stops *after* a stop string; the contract cuts before it.
        return [cut_at_stop(t, list(decoding.stop)) for t in texts]
