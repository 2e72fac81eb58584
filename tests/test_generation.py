"""Generation: templates, post-processing, the hf backend on a tiny model, the resumable
cache, the CLI, and the vLLM backend's call shape."""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import sys
import types

import pytest

from mergeflow import benchmarks
from mergeflow.errors import MergeflowError
from mergeflow.generation import templates
from mergeflow.generation.base import Decoding
from mergeflow.generation.cache import PromptCache
from mergeflow.generation.postprocess import code_della, code_mergelm, cut_at_stop, postprocess
from mergeflow.generation.settings import GenerationSettings, load_settings

# ---------------------------------------------------------------- templates (byte-exact)
# Copied from /work/shared/reference/evaluation.md ("Prompt templates").
VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. USER: {instruction} ASSISTANT:"
)
MERGELM_NON_CHAT = "{instruction}\n\n### Response:\n"
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)


def test_templates_are_the_papers_strings():
    assert templates.VICUNA == VICUNA
    assert templates.MERGELM_NON_CHAT == MERGELM_NON_CHAT
    assert templates.ALPACA == ALPACA
    assert templates.ALPACA_COT_DELLA == ALPACA + " Let's think step by step"
    assert templates.ALPACA_COT_MERGELM == ALPACA + " Let's think step by step."
    # "MergeLM's code prompt puts three newlines (not two) before ### Instruction:"
    assert templates.ALPACA_CODE == ALPACA.replace("request.\n\n###", "request.\n\n\n###")
    assert templates.MBPP_INSTRUCTION == "Create a Python script for this problem:\n{text}\nTest examples:\n{tests}"
    assert templates.HUMANEVAL_INSTRUCTION == "Create a Python script for this problem:\n{prompt}"


def test_gsm8k_prompt_byte_exact():
    doc = {"question": "Tom has 3 apples. How many?", "answer": "3\n#### 3"}
    got = templates.build_prompt(templates.ALPACA_COT_DELLA, "{question}", benchmarks.get("gsm8k").fields(doc))
    assert got == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nTom has 3 apples. How many?\n\n### Response: Let's think step by step"
    )


def test_mbpp_prompts_byte_exact():
    doc = {
        "task_id": 11, "text": "Write a function to add.", "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_setup_code": "",
        "challenge_test_list": [],
    }
    fields = benchmarks.get("mbpp").fields(doc)
    della = templates.build_prompt(templates.ALPACA, templates.MBPP_INSTRUCTION, fields)
    assert della == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nCreate a Python script for this problem:\nWrite a function to add.\n"
        "Test examples:\nassert add(1, 2) == 3\nassert add(0, 0) == 0\n\n### Response:"
    )
    repos = templates.build_prompt(templates.ALPACA_CODE, templates.MBPP_INSTRUCTION_REPOS, fields)
    assert repos == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n\n### Instruction:\nCreate a Python script for this problem:\n\nWrite a function to add.\n"
        "Test examples:\nassert add(1, 2) == 3\nassert add(0, 0) == 0\n\n### Response:"
    )


def test_humaneval_and_vicuna_prompts_byte_exact():
    doc = {"task_id": "HumanEval/0", "prompt": "def f(x):\n    \"\"\"Double.\"\"\"\n", "entry_point": "f", "test": ""}
    fields = benchmarks.get("humaneval").fields(doc)
    got = templates.build_prompt(templates.ALPACA_CODE, templates.HUMANEVAL_INSTRUCTION_REPOS, fields)
    assert got.endswith("### Instruction:\nCreate a Python script for this problem:\ndef f(x):\n\t\"\"\"Double.\"\"\"\n\n\n### Response:")
    vic = templates.build_prompt(templates.VICUNA, "{instruction}", {"instruction": "Name a {color}."})
    assert vic == VICUNA.replace("{instruction}", "Name a {color}.")  # braces in a field stay literal


def test_build_prompt_errors_name_the_culprit():
    with pytest.raises(MergeflowError, match="'questoin'"):
        templates.build_prompt(ALPACA, "{questoin}", {"question": "q"})
    with pytest.raises(MergeflowError, match="template"):
        templates.build_prompt("no placeholder", "{question}", {"question": "q"})


# ---------------------------------------------------------------- post-processing
def test_cut_at_stop_uses_earliest_stop():
    assert cut_at_stop("a USER: b ### Instruction c", ["### Instruction", "USER:"]) == "a "
    assert cut_at_stop("nothing here", ["USER:"]) == "nothing here"


@pytest.mark.parametrize("fn", [code_della, code_mergelm])
def test_code_postprocess_common_cases(fn):
    fenced = "Here you go:\n```python\ndef f(x):\n\treturn 2 * x\n```\nIt doubles x."
    assert fn(fenced) == "def f(x):\n    return 2 * x"
    main = "def f(x):\n    return x\n\nif __name__ == \"__main__\":\n    print(f(1))"
    assert fn(main) == "def f(x):\n    return x"
    example = "def f(x):\n    return x\n\n# Example usage\nprint(f(2))"
    assert fn(example) == "def f(x):\n    return x"
    solution = "The solution is:\n\ndef f(x):\n    return x\n\nThe answer is: f"
    assert fn(solution) == "def f(x):\n    return x"
    assert fn("### Response:\ndef g():\n    pass") == "def g():\n    pass"


def test_code_postprocess_differences_between_repos():
    text = "def f(x):\n    return x\n# Test examples\nassert f(1) == 1"
    assert code_della(text) == "def f(x):\n    return x"  # DELLA also cuts at '# Test examples'
    assert code_mergelm(text) == text
    # DELLA closes a fence only at a line start, MergeLM at any ```.
    inline = "```python\ns = 'a```b'\n```"
    assert code_della(inline) == "s = 'a```b'"
    assert code_mergelm(inline) == "s = 'a"


def test_postprocess_dispatch():
    assert postprocess("none", "```python\nx\n```") == "```python\nx\n```"
    with pytest.raises(MergeflowError, match="postprocess"):
        postprocess("codez", "x")


# ---------------------------------------------------------------- settings
def test_settings_validation():
    ok = {"template": ALPACA, "instruction": "{question}", "max_new_tokens": 8}
    s = GenerationSettings.from_dict(ok)
    assert (s.batch_size, s.backend, s.stop, s.limit) == (1, "auto", (), None)
    assert load_settings(json.dumps(ok)) == s
    with pytest.raises(MergeflowError, match="max_new_tokens"):
        GenerationSettings.from_dict({**ok, "max_new_tokens": 0})
    with pytest.raises(MergeflowError, match="temperatur"):
        GenerationSettings.from_dict({**ok, "temperatur": 0})
    with pytest.raises(MergeflowError, match="backend"):
        GenerationSettings.from_dict({**ok, "backend": "tgi"})
    with pytest.raises(MergeflowError, match="stop"):
        GenerationSettings.from_dict({**ok, "stop": "USER:"})
    assert s.hf_decoding == "auto"
    assert GenerationSettings.from_dict({**ok, "hf_decoding": "static"}).hf_decoding == "static"
    with pytest.raises(MergeflowError, match="'hf_decoding' is 'cuda_graphs'; allowed: auto, plain, static, compiled"):
        GenerationSettings.from_dict({**ok, "hf_decoding": "cuda_graphs"})


# ---------------------------------------------------------------- hf backend on a tiny model
PROMPTS = [
    "The answer is: 42. Let's think",
    "def add(a, b):\n    return",
    "Below is an instruction that describes a task. Write a response.",
    "0 1 2",
]


@pytest.fixture(scope="module")
def hf_backend(tiny_model_dir):
    from mergeflow.generation.hf import HFBackend

    return HFBackend(tiny_model_dir, Decoding("hf", "float32", 24, (), 0))


def test_hf_batched_equals_unbatched(hf_backend):
    batched = hf_backend.generate(PROMPTS)
    single = [hf_backend.generate([p])[0] for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) > 1  # not a constant output


def test_hf_max_new_tokens_respected(tiny_model_dir):
    from mergeflow.generation.hf import HFBackend

    backend = HFBackend(tiny_model_dir, Decoding("hf", "float32", 5, (), 0))
    generate, shapes = backend.model.generate, []

    def spy(**kw):
        out = generate(**kw)
        shapes.append((kw["input_ids"].shape[1], out.shape[1]))
        return out

    backend.model.generate = spy
    short = backend.generate(PROMPTS[:2])
    n_in, n_out = shapes[0]
    assert 0 < n_out - n_in <= 5
    longer = HFBackend(tiny_model_dir, Decoding("hf", "float32", 24, (), 0)).generate(PROMPTS[:2])
    for s, l in zip(short, longer):
        assert l.startswith(s) and len(l) >= len(s)


def test_hf_stop_strings_cut(tiny_model_dir, hf_backend):
    from mergeflow.generation.hf import HFBackend

    full = hf_backend.generate(PROMPTS[:1])[0]
    # A stop string that the unstopped output really contains, a few characters in.
    import re

    candidates = [m.group() for m in re.finditer(r"[A-Za-z]{3,}", full[2:])]
    assert candidates, f"tiny model output has no ASCII word to stop on: {full!r}"
    stop = candidates[0]
    backend = HFBackend(tiny_model_dir, Decoding("hf", "float32", 24, (stop,), 0))
    got = backend.generate(PROMPTS[:1])[0]
    assert got == full[: full.index(stop)]
    assert stop not in got


# ---------------------------------------------------------------- hf decoding set-ups (issue 21)
def test_hf_decoding_resolves_per_device(monkeypatch, tiny_model_dir):
    """auto: compiled (static cache + torch.compile) on CUDA, plain on the CPU; n/a for vLLM."""
    import dataclasses

    import torch

    from mergeflow.generation.base import resolve_decoding

    settings = GenerationSettings.from_dict(
        {"template": ALPACA, "instruction": "{question}", "max_new_tokens": 6, "backend": "hf", "dtype": "float32"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_decoding(settings, tiny_model_dir).hf_decoding == "plain"
    for explicit in ("plain", "static", "compiled"):
        d = resolve_decoding(dataclasses.replace(settings, hf_decoding=explicit), tiny_model_dir)
        assert d.hf_decoding == explicit and d.setup()["hf_decoding"] == explicit
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_decoding(settings, tiny_model_dir).hf_decoding == "compiled"
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm({}))
    assert resolve_decoding(dataclasses.replace(settings, backend="vllm"), tiny_model_dir).hf_decoding == "n/a"


def test_hf_decoding_generation_arguments():
    from mergeflow.generation.hf import generation_kwargs, load_kwargs

    assert generation_kwargs("plain", "cuda") == {} and load_kwargs("plain") == {}
    assert generation_kwargs("static", "cpu") == {"cache_implementation": "static", "disable_compile": True}
    compiled = generation_kwargs("compiled", "cuda")
    assert compiled["cache_implementation"] == "static" and compiled["compile_config"].mode == "reduce-overhead"
    assert not compiled["compile_config"]._compile_all_devices
    assert generation_kwargs("compiled", "cpu")["compile_config"]._compile_all_devices
    assert load_kwargs("compiled") == {"attn_implementation": "sdpa"}
    with pytest.raises(MergeflowError, match="'auto' unknown"):
        generation_kwargs("auto", "cpu")  # resolved before it reaches the backend


STATIC_PROMPTS = PROMPTS + ["The answer is: 42. Let's think step by step. 0 1 2 3 4 5 6 7 8 9 + - * / = ( )"]


@pytest.mark.slow  # ~30 s on 2 cores: transformers' static cache is slow on the CPU
def test_hf_static_cache_equals_plain(tiny_model_dir, hf_backend):
    """The static KV cache gives plain generate's greedy tokens: left-padded batches of prompts
    of different lengths, calls whose prompts are longer than the first call's (a bigger cache),
    a batch of one, and stop strings."""
    from mergeflow.generation.hf import HFBackend

    static = HFBackend(tiny_model_dir, Decoding("hf", "float32", 24, (), 0, hf_decoding="static"))
    assert static.generation_config.cache_implementation == "static"
    plain = hf_backend.generate(STATIC_PROMPTS)
    assert static.generate(PROMPTS[1:]) == plain[1:4]  # shorter prompts first: the cache grows
    assert static.generate(STATIC_PROMPTS) == plain
    assert [static.generate([p])[0] for p in STATIC_PROMPTS] == plain
    stop = "2"
    with_stop = HFBackend(tiny_model_dir, Decoding("hf", "float32", 24, (stop,), 0, hf_decoding="static"))
    plain_stop = HFBackend(tiny_model_dir, Decoding("hf", "float32", 24, (stop,), 0))
    assert with_stop.generate(STATIC_PROMPTS) == plain_stop.generate(STATIC_PROMPTS)


@pytest.mark.slow
def test_hf_compiled_equals_plain_on_cpu(tiny_model_dir, hf_backend):
    """torch.compile of the static-cache step (forced on the CPU; about a minute on 2 cores):
    the same tokens as plain, one compiled graph for every call, a short last batch filled up."""
    import torch

    from mergeflow.generation.hf import HFBackend

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = HFBackend(tiny_model_dir, Decoding("hf", "float32", 24, (), 0, batch_size=3, hf_decoding="compiled"))
    plain = hf_backend.generate(STATIC_PROMPTS)
    sizes = []
    generate = compiled.model.generate
    compiled.model.generate = lambda **kw: sizes.append(kw["input_ids"].shape[0]) or generate(**kw)
    assert compiled.generate(STATIC_PROMPTS[4:] + STATIC_PROMPTS[:2]) == plain[4:] + plain[:2]
    assert compiled.generate(STATIC_PROMPTS[2:4]) == plain[2:4]  # filled up to 3 prompts
    assert sizes == [3, 3]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------- resumable cache
def _gsm8k_file(tmp_path, n):
    path = tmp_path / "gsm8k.jsonl"
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"}) + "\n")
    return path


class _Interrupted(Exception):
    pass


def test_killed_run_resumes_with_only_remaining_prompts(tmp_path, tiny_model_dir):
    from mergeflow.generation.base import load_backend
    from mergeflow.generation.run import generate_records

    bench = benchmarks.get("gsm8k")
    docs = bench.load(_gsm8k_file(tmp_path, 7))
    settings = GenerationSettings.from_dict(
        {"template": ALPACA, "instruction": "{question}", "max_new_tokens": 6, "batch_size": 2, "stop": ["###"]}
    )
    decoding = Decoding("hf", "float32", 6, ("###",), 0, batch_size=2)
    calls: list[str] = []

    class Counting:
        def __init__(self, model_dir, dec):
            self.inner = load_backend(model_dir, dec)

        def generate(self, prompts):
            calls.extend(prompts)
            return self.inner.generate(prompts)

    def die_after_two_batches(n_done):
        if n_done >= 4:
            raise _Interrupted

    cache_path = tmp_path / "cache.jsonl"
    with pytest.raises(_Interrupted):
        generate_records(docs, bench, settings, tiny_model_dir, decoding, PromptCache(cache_path),
                         backend_factory=Counting, on_batch_done=die_after_two_batches, progress=False)
    assert len(calls) == 4
    assert len(cache_path.read_text().splitlines()) == 4
    # A kill in the middle of a write leaves a partial line: it must be ignored, not fatal.
    with open(cache_path, "a") as fh:
        fh.write('{"key": "trunc')

    calls.clear()
    records = generate_records(docs, bench, settings, tiny_model_dir, decoding, PromptCache(cache_path),
                               backend_factory=Counting, progress=False)
    assert len(calls) == 3  # only the remaining prompts
    assert [r["doc_id"] for r in records] == [bench.doc_id(d) for d in docs]
    assert all(set(r) == {"doc_id", "prompt", "output", "completion", "setup"} for r in records)
    assert all(r["setup"] == decoding.setup() for r in records)  # cached outputs too

    # The same outputs as an uninterrupted run; a third run generates nothing.
    calls.clear()
    fresh = generate_records(docs, bench, settings, tiny_model_dir, decoding, PromptCache(None),
                             backend_factory=Counting, progress=False)
    assert fresh == records and len(calls) == 7
    calls.clear()
    again = generate_records(docs, bench, settings, tiny_model_dir, decoding, PromptCache(cache_path),
                             backend_factory=Counting, progress=False)
    assert again == records and calls == []
    # Other decoding settings are other cache keys.
    other = Decoding("hf", "float32", 7, ("###",), 0)
    generate_records(docs[:1], bench, settings, tiny_model_dir, other, PromptCache(cache_path),
                     backend_factory=Counting, progress=False)
    assert len(calls) == 1


def test_generate_cli(tmp_path, tiny_model_dir):
    from mergeflow.generation import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    data = tmp_path / "mbpp.jsonl"
    data.write_text(
        "".join(
            json.dumps({"task_id": 11 + i, "text": f"Write a function number {i}.", "code": "def f():\n    return 1",
                        "test_list": ["assert f() == 1"], "test_setup_code": "", "challenge_test_list": []}) + "\n"
            for i in range(3)
        )
    )
    settings = {"template": templates.ALPACA_CODE, "instruction": templates.MBPP_INSTRUCTION, "max_new_tokens": 8,
                "postprocess": "code", "limit": 2, "batch_size": 2, "backend": "hf", "seed": 1}
    out, cache = tmp_path / "gen" / "mbpp.jsonl", tmp_path / "cache" / "mbpp.jsonl"
    argv = ["generate", "--model", str(tiny_model_dir), "--benchmark", "mbpp", "--data", str(data),
            "--settings", json.dumps(settings), "--out", str(out), "--cache", str(cache), "--no-progress"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == ["11", "12"]
    assert rows[0]["prompt"].startswith(templates.ALPACA_CODE.split("{instruction}")[0] + "Create a Python script")
    assert all(r["completion"] == code_della(r["output"]) for r in rows)
    # auto on this CPU-only machine: plain generate, recorded beside every output
    assert all(r["setup"]["hf_decoding"] == "plain" and r["setup"]["batch_size"] == 2 for r in rows)
    assert len(cache.read_text().splitlines()) == 2
    bad_settings = json.dumps({**settings, "instruction": "{prompt}"})
    bad = parser.parse_args([bad_settings if a == argv[argv.index("--settings") + 1] else a for a in argv])
    with pytest.raises(MergeflowError, match="'prompt'"):
        bad.func(bad)


def test_generate_cli_tasks_share_one_model_load(tmp_path, tiny_model_dir, monkeypatch):
    """Several benchmarks in one `mergeflow generate`: one model load, each benchmark's own
    decoding (max_new_tokens, stops, batch, post-processing), cache and output, the same
    records as one call per benchmark; editing one benchmark's settings regenerates only its
    prompts (issue 21)."""
    from mergeflow.generation import cli, run
    from mergeflow.generation.base import load_backend

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    loads: list[tuple] = []

    def counting_load(model_dir, decoding):
        loads.append(decoding.load_key())
        return load_backend(model_dir, decoding)

    monkeypatch.setattr(run, "load_backend", counting_load)
    mbpp_data = tmp_path / "mbpp.jsonl"
    mbpp_data.write_text("".join(
        json.dumps({"task_id": 11 + i, "text": f"Write a function f{i}.", "code": "def f(): return 1",
                    "test_list": ["assert f() == 1"], "test_setup_code": "", "challenge_test_list": []}) + "\n"
        for i in range(3)))
    gsm8k = {"template": ALPACA, "instruction": "{question}", "max_new_tokens": 6, "stop": ["###"], "backend": "hf",
             "batch_size": 2}
    mbpp = {"template": templates.ALPACA_CODE, "instruction": templates.MBPP_INSTRUCTION, "max_new_tokens": 9,
            "postprocess": "code", "batch_size": 3, "backend": "hf"}
    data = {"gsm8k": _gsm8k_file(tmp_path, 5), "mbpp": mbpp_data}

    def tasks(settings, root):
        return [a for b in ("gsm8k", "mbpp") for a in (
            "--task", b, str(data[b]), json.dumps(settings[b]), str(root / "cache" / f"{b}.jsonl"),
            str(root / "gen" / f"{b}.jsonl"))]

    def generate(argv):
        args = parser.parse_args(["generate", "--model", str(tiny_model_dir), *argv, "--no-progress"])
        assert args.func(args) == 0

    def lines(path):
        return path.read_text().splitlines()

    both = tmp_path / "both"
    generate(tasks({"gsm8k": gsm8k, "mbpp": mbpp}, both))
    assert len(loads) == 1  # one load for both benchmarks
    assert len(lines(both / "cache" / "gsm8k.jsonl")) == 5 and len(lines(both / "cache" / "mbpp.jsonl")) == 3
    # the same records as one call per benchmark (each its own load): each kept its own decoding
    for b, settings in (("gsm8k", gsm8k), ("mbpp", mbpp)):
        alone = tmp_path / "alone" / f"{b}.jsonl"
        generate(["--benchmark", b, "--data", str(data[b]), "--settings", json.dumps(settings), "--out", str(alone)])
        assert lines(alone) == lines(both / "gen" / f"{b}.jsonl")
    rows = [json.loads(r) for r in lines(both / "gen" / "mbpp.jsonl")]
    assert rows[0]["setup"]["max_new_tokens"] == 9 and rows[0]["setup"]["batch_size"] == 3
    assert all(r["completion"] == code_della(r["output"]) for r in rows)
    assert len(loads) == 3

    # one benchmark's setting edited: one load, only that benchmark's prompts generated
    loads.clear()
    mbpp_out = (both / "gen" / "mbpp.jsonl").read_text()
    generate(tasks({"gsm8k": {**gsm8k, "max_new_tokens": 7}, "mbpp": mbpp}, both))
    assert len(loads) == 1
    assert len(lines(both / "cache" / "gsm8k.jsonl")) == 10  # 5 new prompts
    assert len(lines(both / "cache" / "mbpp.jsonl")) == 3  # none: all from the cache
    assert (both / "gen" / "mbpp.jsonl").read_text() == mbpp_out
    assert all(json.loads(r)["setup"]["max_new_tokens"] == 7 for r in lines(both / "gen" / "gsm8k.jsonl"))
    # nothing edited: no model load at all
    loads.clear()
    generate(tasks({"gsm8k": {**gsm8k, "max_new_tokens": 7}, "mbpp": mbpp}, both))
    assert loads == []


def test_generate_cli_task_errors_are_one_line_exit_2(tmp_path, tiny_model_dir):
    import subprocess

    settings = json.dumps({"template": ALPACA, "instruction": "{question}", "max_new_tokens": 4, "backend": "hf"})
    data = str(_gsm8k_file(tmp_path, 1))
    base = [sys.executable, "-m", "mergeflow", "generate", "--model", str(tiny_model_dir)]
    task = ["--task", "gsm8k", data, settings, "-", str(tmp_path / "o.jsonl")]
    for argv, message in (
        (task + ["--benchmark", "gsm8k"], "--task and --benchmark given together"),
        (task + task, "named twice"),
        (["--benchmark", "gsm8k", "--data", data], "missing --settings, --out"),
        (task + ["--task", "gsm9k", data, settings, "-", str(tmp_path / "p.jsonl")], "gsm9k"),
    ):
        proc = subprocess.run(base + argv, capture_output=True, text=True)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "o.jsonl").exists()  # the bad last task stopped it before any generation


# ---------------------------------------------------------------- vLLM
def _fake_vllm(calls, version="0.11.0"):
    """A stand-in `vllm` module that records how it is called. It checks our call shape
    against vLLM's documented offline API (LLM(...), SamplingParams(...), LLM.generate(prompts,
    sampling_params) -> RequestOutput.outputs[0].text), not vLLM itself."""
    mod = types.ModuleType("vllm")
    mod.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    mod.__version__ = version

    class SamplingParams:
        def __init__(self, **kw):
            calls["sampling"] = kw

    class LLM:
        def __init__(self, **kw):
            calls["llm"] = kw

        def generate(self, prompts, sampling_params, use_tqdm=True):
            calls["generate"] = (list(prompts), sampling_params)
            calls.setdefault("calls", []).append(list(prompts))
            return [types.SimpleNamespace(prompt=p, outputs=[types.SimpleNamespace(text=f"out {p} USER: more")])
                    for p in prompts]

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


def test_vllm_backend_argument_mapping(monkeypatch, tiny_model_dir):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    import torch

    from mergeflow.generation.base import load_backend, resolve_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU mapping (the CPU one: below)
    assert resolve_backend("vllm") == "vllm"
    backend = load_backend(tiny_model_dir, Decoding("vllm", "bfloat16", 17, ("USER:",), 42, "0.11.0", 2, 512, 0.5))
    assert calls["llm"] == {"model": str(tiny_model_dir), "tensor_parallel_size": 2, "seed": 42, "dtype": "bfloat16",
                            "gpu_memory_utilization": 0.5}
    assert calls["sampling"] == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 17, "stop": ["USER:"], "seed": 42}
    assert backend.generate(["a", "b"]) == ["out a ", "out b "]
    assert calls["generate"][0] == ["a", "b"]


def test_tensor_parallel_size_divides_heads():
    from mergeflow.generation.vllm import tensor_parallel_size

    assert tensor_parallel_size(8, 40) == 8
    assert tensor_parallel_size(3, 40) == 2
    assert tensor_parallel_size(0, 40) == 1
    assert tensor_parallel_size(4, None) == 4


def test_vllm_memory_default_fits_a_cpu(monkeypatch, tiny_model_dir):
    """Without a GPU vLLM's KV cache is in host RAM: its 0.92 default share cannot work there."""
    import torch

    from mergeflow.generation.vllm import CPU_KV_CACHE_BYTES, VLLMBackend, memory_args

    assert memory_args(None, cuda=True, environ={}) == {}  # vLLM's own default on a GPU
    assert memory_args(None, cuda=False, environ={}) == {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
    assert memory_args(None, cuda=False, environ={"VLLM_CPU_KVCACHE_SPACE": "2"}) == {}  # vLLM reads it
    assert memory_args(0.15, cuda=False, environ={"VLLM_CPU_KVCACHE_SPACE": "2"}) == {"gpu_memory_utilization": 0.15}
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    VLLMBackend(tiny_model_dir, Decoding("vllm", "float32", 8, (), 0))
    assert calls["llm"]["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES and "gpu_memory_utilization" not in calls["llm"]
    assert calls["llm"]["enforce_eager"] is True  # no minute-long inductor compile on a CPU
    import os

    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    with pytest.raises(MergeflowError, match="gpu_memory_utilization"):
        GenerationSettings.from_dict({"template": ALPACA, "instruction": "{question}", "max_new_tokens": 8,
                                      "gpu_memory_utilization": 1.5})


def test_package_main_is_import_safe():
    """vLLM's engine core is spawned: the child re-imports `__main__`, which must not run the CLI."""
    import runpy

    runpy.run_module("mergeflow.__main__", run_name="__mp_main__")  # would exit (usage error) if unguarded


def _vllm_job(tmp_path, n, chunk):
    bench = benchmarks.get("gsm8k")
    docs = bench.load(_gsm8k_file(tmp_path, n))
    settings = GenerationSettings.from_dict(
        {"template": ALPACA, "instruction": "{question}", "max_new_tokens": 6, "batch_size": 2,
         "vllm_chunk_size": chunk, "stop": ["USER:"], "backend": "vllm"}
    )
    return bench, docs, settings


def test_vllm_gets_all_prompts_in_chunks_and_resumes(monkeypatch, tmp_path, tiny_model_dir):
    from mergeflow.generation.base import resolve_decoding
    from mergeflow.generation.run import generate_records

    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    cache_path = tmp_path / "cache.jsonl"
    # One call for a whole job that fits one chunk, whatever batch_size says.
    bench, docs, settings = _vllm_job(tmp_path, 7, chunk=512)
    decoding = resolve_decoding(settings, tiny_model_dir)
    assert (decoding.backend, decoding.batch_size) == ("vllm", 512)
    records = generate_records(docs, bench, settings, tiny_model_dir, decoding, PromptCache(None), progress=False)
    assert [len(c) for c in calls["calls"]] == [7]
    assert [r["output"] for r in records] == [f"out {r['prompt']} " for r in records]

    # Chunks of the chosen size; each chunk is in the cache before the next call; a kill after
    # chunk 1 resumes with only the rest.
    calls.clear()
    bench, docs, settings = _vllm_job(tmp_path, 10, chunk=4)
    decoding = resolve_decoding(settings, tiny_model_dir)
    cached_before_call = []
    inner = sys.modules["vllm"].LLM.generate

    def spying_generate(self, prompts, sampling_params, use_tqdm=True):
        cached_before_call.append(len(cache_path.read_text().splitlines()) if cache_path.exists() else 0)
        return inner(self, prompts, sampling_params, use_tqdm)

    monkeypatch.setattr(sys.modules["vllm"].LLM, "generate", spying_generate)

    def die_after_first_chunk(n_done):
        raise _Interrupted

    with pytest.raises(_Interrupted):
        generate_records(docs, bench, settings, tiny_model_dir, decoding, PromptCache(cache_path),
                         on_batch_done=die_after_first_chunk, progress=False)
    assert [len(c) for c in calls["calls"]] == [4]
    first = set(calls["calls"][0])
    calls.clear()
    records = generate_records(docs, bench, settings, tiny_model_dir, decoding, PromptCache(cache_path),
                               progress=False)
    assert [len(c) for c in calls["calls"]] == [4, 2]
    assert cached_before_call == [0, 4, 8]
    setups = [json.loads(line)["setup"] for line in cache_path.read_text().splitlines()]
    assert setups[0] == {"backend": "vllm", "backend_version": "0.11.0", "dtype": "auto", "tensor_parallel_size": 1,
                         "batch_size": 4, "max_new_tokens": 6, "stop": ["USER:"], "seed": 0, "hf_decoding": "n/a"}
    assert all(s == setups[0] for s in setups) and len(setups) == 10
    assert not first & {p for c in calls["calls"] for p in c}
    assert len(records) == 10 and all(r["output"] == f"out {r['prompt']} " for r in records)


def test_cache_key_covers_the_generation_setup(monkeypatch, tiny_model_dir):
    """Backend, its version, dtype, tensor-parallel size and batch size each change the key."""
    import dataclasses

    import transformers

    from mergeflow.generation.base import resolve_decoding
    from mergeflow.generation.cache import cache_key

    settings = GenerationSettings.from_dict(
        {"template": ALPACA, "instruction": "{question}", "max_new_tokens": 6, "batch_size": 2, "backend": "hf",
         "dtype": "float32"}
    )
    hf = resolve_decoding(settings, tiny_model_dir)
    assert (hf.backend, hf.backend_version, hf.dtype, hf.tensor_parallel_size, hf.batch_size) == (
        "hf", transformers.__version__, "float32", 1, 2)
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm({}, version="0.11.0"))
    vllm = resolve_decoding(dataclasses.replace(settings, backend="vllm"), tiny_model_dir)
    assert (vllm.backend, vllm.backend_version) == ("vllm", "0.11.0")
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm({}, version="0.11.1"))
    vllm_next = resolve_decoding(dataclasses.replace(settings, backend="vllm"), tiny_model_dir)

    key = lambda d: cache_key("model", "prompt", d)  # noqa: E731
    assert key(vllm) != key(hf)  # backend
    assert key(vllm_next) != key(vllm)  # backend version
    assert key(dataclasses.replace(hf, backend_version="0.0.1")) != key(hf)
    variants = {
        "dtype": resolve_decoding(dataclasses.replace(settings, dtype="bfloat16"), tiny_model_dir),
        "tensor parallel": dataclasses.replace(hf, tensor_parallel_size=2),
        "batch size": resolve_decoding(dataclasses.replace(settings, batch_size=3), tiny_model_dir),
    }
    for name, d in variants.items():
        assert key(d) != key(hf), name
    assert key(dataclasses.replace(hf, hf_decoding="compiled")) != key(hf)  # hf decoding set-up
    assert key(resolve_decoding(dataclasses.replace(settings, hf_decoding="static"), tiny_model_dir)) != key(hf)
    # What changes only memory use, not outputs, keeps the key.
    assert key(dataclasses.replace(hf, gpu_memory_utilization=0.5)) == key(hf)
    assert key(resolve_decoding(settings, tiny_model_dir)) == key(hf)


# ---------------------------------------------------------------- hf_decoding in configs, CLI, score files
def test_hf_decoding_in_a_config_is_checked_and_reaches_the_settings():
    import copy
    from pathlib import Path

    import yaml

    from mergeflow import config as mfconfig

    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text())
    good = copy.deepcopy(demo)
    good["protocol"]["benchmarks"]["gsm8k"]["hf_decoding"] = "compiled"
    s = GenerationSettings.from_dict(mfconfig.generation_settings(mfconfig.prepare(good), "gsm8k"))
    assert s.hf_decoding == "compiled"
    demo["protocol"]["benchmarks"]["gsm8k"]["hf_decoding"] = "graphs"
    with pytest.raises(MergeflowError, match=r"protocol\.benchmarks\.gsm8k\.hf_decoding"):
        mfconfig.prepare(demo)


def test_generate_cli_bad_hf_decoding_is_one_line_exit_2(tmp_path, tiny_model_dir):
    import subprocess

    settings = {"template": ALPACA, "instruction": "{question}", "max_new_tokens": 4, "hf_decoding": "fast"}
    proc = subprocess.run(
        [sys.executable, "-m", "mergeflow", "generate", "--model", str(tiny_model_dir), "--benchmark", "gsm8k",
         "--data", str(_gsm8k_file(tmp_path, 1)), "--settings", json.dumps(settings), "--out", str(tmp_path / "o")],
        capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'hf_decoding' is 'fast'; allowed: auto, plain, static, compiled" in lines[0]


def test_score_file_records_the_generation_setup(tmp_path):
    from mergeflow.scoring import results

    setup = Decoding("hf", "bfloat16", 8, (), 0, hf_decoding="compiled").setup()
    gens = [{"doc_id": str(i), "prompt": "p", "output": "o", "completion": "o", "setup": setup} for i in range(3)]
    rows = [results.row("acc", [1.0, 0.0, 1.0])]
    out = results.write_score(tmp_path / "s.json", "gsm8k", "lm_eval", rows, {}, generations=gens)
    assert json.loads(out.read_text())["details"]["generation"] == setup
    other = {**setup, "hf_decoding": "plain"}
    assert results.generation_setup(gens + [{**gens[0], "setup": other}]) == [setup, other]
    assert results.generation_setup([{k: v for k, v in g.items() if k != "setup"} for g in gens]) is None
