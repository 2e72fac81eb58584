"""`mergeflow fetch`: local paths are checked (models) or validated and copied (data); the Hub
unreachable gives a clear error naming the id and the local-path way out."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from mergeflow import fetch
from mergeflow.errors import MergeflowError


@pytest.fixture
def offline(monkeypatch):
    """Force huggingface_hub and datasets offline even if the machine had network."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    try:
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass


def _cli(argv):
    parser = argparse.ArgumentParser()
    fetch.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_local_model_dir_is_verified_in_place(tiny_model_dir, tmp_path, capsys):
    assert _cli(["fetch", "model", "--source", str(tiny_model_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_model_dir)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").unlink()
    with pytest.raises(MergeflowError, match="no config.json"):
        fetch.fetch_model(str(broken), None, None)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(tiny_model_dir / "config.json", weightless)
    with pytest.raises(MergeflowError, match="no \\*.safetensors"):
        fetch.fetch_model(str(weightless), None, None)
    with pytest.raises(MergeflowError, match="no such local path"):
        fetch.fetch_model(str(tmp_path / "a" / "b" / "c"), None, None)


def test_hub_model_offline_error(offline, tmp_path):
    with pytest.raises(MergeflowError) as err:
        fetch.fetch_model("WizardLMTeam/WizardMath-13B-V1.0", "main", tmp_path / "wm")
    msg = str(err.value)
    assert "WizardLMTeam/WizardMath-13B-V1.0" in msg and "unreachable" in msg and "--source /path/to/model" in msg


def test_hub_data_offline_error(offline, tmp_path):
    for bench, source in (("gsm8k", "openai/gsm8k"), ("alpaca_eval", "tatsu-lab/alpaca_eval")):
        with pytest.raises(MergeflowError) as err:
            fetch.fetch_data(bench, None, tmp_path / f"{bench}.jsonl")
        msg = str(err.value)
        assert source in msg and "unreachable" in msg and "--source FILE.jsonl" in msg
    assert not (tmp_path / "gsm8k.jsonl").exists()


def test_local_data_validated_and_written(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(3)]
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out" / "gsm8k.jsonl"
    assert _cli(["fetch", "data", "--benchmark", "gsm8k", "--source", str(src), "--out", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows

    src.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(MergeflowError, match="lacks field 'answer'"):
        fetch.fetch_data("gsm8k", str(src), tmp_path / "x.jsonl")


def test_local_mbpp_keeps_test_split_ids(tmp_path):
    def row(tid):
        return {"task_id": tid, "text": f"task {tid}", "code": "x = 1", "test_list": ["assert x == 1"],
                "test_setup_code": "", "challenge_test_list": []}

    src = tmp_path / "mbpp_all.json"  # a .json list, as some dumps come
    src.write_text(json.dumps([row(t) for t in (3, 11, 200, 510, 511, 900)]))
    out = tmp_path / "mbpp.jsonl"
    assert fetch.fetch_data("mbpp", str(src), out) == 3
    assert [json.loads(line)["task_id"] for line in out.read_text().splitlines()] == [11, 200, 510]
    assert fetch.fetch_data("mbpp", str(src), out, split="train") == 6


def test_humaneval_from_package(tmp_path):
    out = tmp_path / "humaneval.jsonl"
    assert fetch.fetch_data("humaneval", None, out) == 164
    first = json.loads(out.read_text().splitlines()[0])
    assert first["task_id"] == "HumanEval/0" and "def has_close_elements" in first["prompt"]


def test_unknown_source(tmp_path):
    with pytest.raises(MergeflowError, match="not a Hub dataset id"):
        fetch.fetch_data("gsm8k", str(tmp_path / "missing" / "file.jsonl"), tmp_path / "o.jsonl")


def _entry_not_found(url: str):
    """The error huggingface_hub raises for a file missing from an existing repo, made by its
    own response check from the Hub's 404 reply."""
    import sys

    from huggingface_hub.utils import hf_raise_for_status

    http_module = sys.modules[hf_raise_for_status.__module__]
    httpx = getattr(http_module, "httpx2", None) or getattr(http_module, "httpx")  # the HTTP client it uses
    response = httpx.Response(404, headers={"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"},
                              request=httpx.Request("GET", url))
    try:
        hf_raise_for_status(response)
    except Exception as err:  # noqa: BLE001 (whatever class this huggingface_hub version uses)
        return err
    raise AssertionError("hf_raise_for_status accepted a 404")


def _revision_exists(monkeypatch):
    """The Hub resolves the dataset's revision (fetch asks for its commit before loading)."""
    import types

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info",
                        lambda self, repo_id, revision=None, **kw: types.SimpleNamespace(sha=f"commit-of-{revision}"))


def test_missing_file_in_existing_repo_is_named(monkeypatch, tmp_path, capsys):
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    from mergeflow.cli import main

    url = "https://huggingface.co/datasets/tatsu-lab/alpaca_eval/resolve/abc123/alpaca_eval_gpt5.json"
    err = _entry_not_found(url)
    assert isinstance(err, hf_errors.EntryNotFoundError) and not isinstance(err, hf_errors.LocalEntryNotFoundError)

    def missing(repo_id, filename, **kw):
        raise err

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    _revision_exists(monkeypatch)
    rc = main(["fetch", "data", "--benchmark", "alpaca_eval", "--subset", "alpaca_eval_gpt5", "--revision", "abc123",
               "--out", str(tmp_path / "a.jsonl")])
    msg = capsys.readouterr().err
    assert rc == 2
    assert "'alpaca_eval_gpt5.json' not found" in msg and "tatsu-lab/alpaca_eval" in msg and "abc123" in msg
    assert "unreachable" not in msg
    assert not (tmp_path / "a.jsonl").exists()

    # Offline with the file not cached is LocalEntryNotFoundError: still "unreachable".
    def offline(repo_id, filename, **kw):
        raise hf_errors.LocalEntryNotFoundError("Cannot find the requested files in the disk cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(MergeflowError, match="unreachable"):
        fetch.fetch_data("alpaca_eval", None, tmp_path / "a.jsonl", revision="abc123")


def test_wrong_dataset_config_is_named(monkeypatch, tmp_path, capsys):
    import datasets

    from mergeflow.cli import main

    class Mbpp(datasets.GeneratorBasedBuilder):
        """A builder with MBPP's two configs: `datasets` itself rejects an unknown one."""

        BUILDER_CONFIGS = [datasets.BuilderConfig(name="full"), datasets.BuilderConfig(name="sanitized")]

        def _info(self):
            return datasets.DatasetInfo()

    def load_dataset(path, name=None, split=None, revision=None, **kw):
        Mbpp(config_name=name, cache_dir=str(tmp_path / "hf"))
        raise AssertionError("the builder accepted an unknown config")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    _revision_exists(monkeypatch)
    rc = main(["fetch", "data", "--benchmark", "mbpp", "--subset", "sanitised", "--revision", "r1",
               "--out", str(tmp_path / "m.jsonl")])
    msg = capsys.readouterr().err
    assert rc == 2
    assert "config 'sanitised' not found" in msg and "google-research-datasets/mbpp" in msg and "r1" in msg
    assert "sanitized" in msg  # the configs that exist
    assert "unreachable" not in msg
