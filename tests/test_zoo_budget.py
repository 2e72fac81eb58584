"""benchmarks/zoo_budget.py's parsing and gates (the training itself: `--small`, see benchmarks/README.md),
and `mergeflow demo --spec-json`'s override."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zb():
    spec = importlib.util.spec_from_file_location("zoo_budget", ROOT / "benchmarks" / "zoo_budget.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo_budget"] = module
    spec.loader.exec_module(module)
    return module


def test_override_spec_replaces_fields_and_names_bad_ones():
    from mergeflow.demo.cli import override_spec
    from mergeflow.demo.models import FULL
    from mergeflow.errors import MergeflowError

    spec = override_spec(FULL, '{"pretrain_steps": 200, "lr_finetune": 1}')
    assert spec.pretrain_steps == 200 and spec.lr_finetune == 1.0 and isinstance(spec.lr_finetune, float)
    assert spec.judge_steps == FULL.judge_steps and FULL.pretrain_steps == 800  # FULL itself untouched
    for raw, culprit in (('{"bogus": 1}', "bogus"), ('{"num_layers": 1.5}', "num_layers"),
                         ('{"num_layers": true}', "num_layers"), ("[1]", "neither a JSON object"), ("{", "not valid JSON")):
        with pytest.raises(MergeflowError, match=culprit):
            override_spec(FULL, raw)


def test_variants_parse_from_flags_and_the_shipped_file(zb):
    assert zb.parse_variant("name=a,pretrain_steps=200,lr_finetune=0.1,finetune_optimizer=sgd") == {
        "name": "a", "pretrain_steps": 200, "lr_finetune": 0.1, "finetune_optimizer": "sgd"}
    shipped = zb.resolve(zb.load_variants(ROOT / "benchmarks" / "zoo_variants.jsonl", []), small=False)
    assert 8 <= len(shipped) <= 12 and len({n for n, _, _ in shipped}) == len(shipped)
    assert all(spec.pretrain_steps < 800 for _, _, spec in shipped)  # all cheaper than FULL
    with pytest.raises(zb.MergeflowError, match="variant a: unknown ZooSpec field 'steps'"):
        zb.resolve([{"name": "a", "steps": 3}], small=False)
    with pytest.raises(zb.MergeflowError, match="not key=value"):
        zb.parse_variant("pretrain_steps")


def test_main_rejects_bad_input_with_status_2(zb, tmp_path, capsys):
    bad = tmp_path / "v.jsonl"
    bad.write_text('{"name": "a"}\nnot json\n')
    assert zb.main(["--variants", str(bad)]) == 2
    assert f"{bad}:2: not JSON" in capsys.readouterr().err
    assert zb.main([]) == 2


def _metrics(**kw):
    m = {"base_gsm8k": 0.0, "math_gsm8k": 0.5, "code_gsm8k": 0.0, "merge_gsm8k": 0.25, "base_mbpp": 0.0,
         "math_mbpp": 0.0, "code_mbpp": 0.75, "nll_base_alpaca_eval": 3.0, "nll_lm_alpaca_eval": 2.0,
         "retention_gsm8k": 0.5, "retention_mbpp": 0.6, "retention_alpaca_eval": 0.45, "judge_balanced_accuracy": 0.7}
    return {**m, **kw}


def test_gates_mirror_the_e2e_thresholds(zb):
    assert all(zb.gates(_metrics(), judge=True).values())
    assert zb.gates(_metrics(), judge=False)["judge"] is None
    assert not zb.gates(_metrics(math_gsm8k=0.1), judge=True)["math_gsm8k"]  # margin 0.15
    assert not zb.gates(_metrics(code_mbpp=0.45), judge=True)["code_mbpp"]  # margin 0.5
    assert not zb.gates(_metrics(code_gsm8k=0.5), judge=True)["own_skills"]
    assert not zb.gates(_metrics(retention_mbpp=0.39), judge=True)["retention"]
    assert not zb.gates(_metrics(retention_mbpp=None), judge=True)["retention"]
    assert not zb.gates(_metrics(merge_gsm8k=0.1), judge=True)["merge_gsm8k*"]  # < 1/3 of the gain
    assert not zb.gates(_metrics(judge_balanced_accuracy=0.6), judge=True)["judge"]
    record = {"name": "v", "steps": {"base": {"wall_s": 1.0, "cpu_s": 2.0}}, "finetune_wall_s": 3.0,
              "zoo_wall_s": 4.0, "zoo_cpu_s": 5.0, "metrics": _metrics(), "gates": zb.gates(_metrics(), True),
              "pass": True}
    table = zb.markdown([record, {"name": "w", "error": "RuntimeError: boom", "pass": False}])
    assert "| v | 1.0 | - |" in table and "0.00/0.50" in table and "| w | error: RuntimeError: boom |" in table
    json.dumps(record)  # a JSON line
