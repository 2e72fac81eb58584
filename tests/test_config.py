"""Config validation: bad keys and values fail before any job runs, naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from mergeflow import config as mfconfig
from mergeflow.errors import MergeflowError

DEMO = Path(__file__).resolve().parents[1] / "config" / "config.yaml"


@pytest.fixture()
def demo_config() -> dict:
    return yaml.safe_load(DEMO.read_text())


def test_demo_config_is_valid(demo_config):
    from mergeflow import selection

    cfg = mfconfig.prepare(demo_config)
    assert cfg["merge"]["vocab_policy"] == "truncate"
    specs = mfconfig.merge_specs(cfg)
    # task arithmetic: three grid values; TIES and the pair's task arithmetic: one merge each;
    # DARE, DELLA and M3 (random): three seeds each
    per_entry = [len({(s.params["lambda"], s.seed) for s in specs.values()
                      if s.method == m["method"] and list(s.experts) == m["experts"]}) for m in demo_config["merges"]]
    assert per_entry == [3, 1, 3, 3, 3, 1] and len(specs) == 14
    (sweep,) = selection.sweeps(cfg, specs).values()
    assert sweep.grid == {"lambda": [1.0, 0.7, 0.5]} and sweep.select["rule"] == "mean" and not sweep.references
    assert sweep.benchmarks == ("gsm8k", "math", "mbpp", "alpaca_eval")  # HumanEval has no validation split
    for bench in sweep.benchmarks:  # each tunes on the demo data's own validation file
        assert cfg["benchmarks"][bench]["validation"]["path"] == f"resources/demo/data/validation/{bench}.jsonl"


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda c: c["merges"][0].update(method="tiess"), "merges[0].method"),
        (lambda c: c["merges"][1]["params"].update(lamda=1.0), "merges[1].params"),
        (lambda c: c["merges"][2]["params"].update(drop_rate=1.5), "merges[2].params.drop_rate"),
        (lambda c: c.update(bogus=1), "<top level>"),
        (lambda c: c["merge"].update(vocab_policy="pad"), "merge.vocab_policy"),
        (lambda c: c["protocol"]["benchmarks"]["gsm8k"].update(max_new_tokens=0), "protocol.benchmarks.gsm8k.max_new_tokens"),
        (lambda c: c["merges"][0].update(experts=["lm", "nope"]), "merges[0].experts"),
        (lambda c: c.update(base_model="missing"), "base_model"),
        (lambda c: c["evaluate"].update(benchmarks=["gsm8k", "mmlu"]), "evaluate.benchmarks[1]"),
        (lambda c: c["judge"]["endpoint"].update(api_key_env="sk-live-123"), "judge.endpoint.api_key_env"),
        (lambda c: c["merge"].update(device="cuda"), "merge.device"),  # cuda with no GPU granted
    ],
)
def test_bad_config_names_the_key(demo_config, mutate, key):
    bad = copy.deepcopy(demo_config)
    mutate(bad)
    with pytest.raises(MergeflowError) as err:
        mfconfig.prepare(bad)
    assert f"'{key}'" in str(err.value)


def test_a_bare_on_in_select_says_to_quote_it():
    text = DEMO.read_text().replace('select: {"on": validation', "select: {on: validation")
    with pytest.raises(MergeflowError, match=r"'merges\[0\]\.select': a bare `on` key reads as true in YAML; quote it"):
        mfconfig.prepare(yaml.safe_load(text))


def test_merge_id_changes_only_with_what_changes_the_output(demo_config):
    cfg = mfconfig.prepare(demo_config)
    before = list(mfconfig.merge_specs(cfg))
    edited = copy.deepcopy(demo_config)
    edited["merges"][1]["params"]["density"] = 0.7
    edited["merges"][0]["tag"] = "a label"  # labels are not part of the id
    after = list(mfconfig.merge_specs(mfconfig.prepare(edited)))
    changed = sorted(set(before) ^ set(after))
    assert len(before) == len(after) and len(changed) == 2
    assert all(i.startswith("ties-lm+math+code-") for i in changed)


def test_duplicate_merge_is_an_error(demo_config):
    demo_config["merges"].append(copy.deepcopy(demo_config["merges"][0]))
    with pytest.raises(MergeflowError, match=rf"merges\[{len(demo_config['merges']) - 1}\]"):
        mfconfig.merge_specs(mfconfig.prepare(demo_config))


def test_generation_settings_expand_template_names(demo_config):
    cfg = mfconfig.prepare(demo_config)
    s = mfconfig.generation_settings(cfg, "gsm8k")
    assert s["template"].endswith("### Response: Let's think step by step.")
    assert s["max_new_tokens"] == 48 and s["batch_size"] == 8 and s["seed"] == 42


def test_grid_expands_to_one_merge_per_combination(demo_config):
    demo_config["merges"] = [
        {"method": "della", "experts": ["math"], "params": {"lambda": 1.0},
         "grid": {"drop_rate": [0.1, 0.5, 0.9], "window_size": [0.0, 0.1]}, "benchmarks": ["gsm8k"]},
    ]
    specs = mfconfig.merge_specs(mfconfig.prepare(demo_config))
    assert len(specs) == 6
    combos = {(s.params["drop_rate"], s.params["window_size"]) for s in specs.values()}
    assert combos == {(d, w) for d in (0.1, 0.5, 0.9) for w in (0.0, 0.1)}
    assert all(s.params["lambda"] == 1.0 and s.benchmarks == ("gsm8k",) for s in specs.values())


def test_grid_key_also_in_params_is_an_error(demo_config):
    demo_config["merges"][3]["grid"] = {"drop_rate": [0.1, 0.2]}
    with pytest.raises(MergeflowError, match=r"merges\[3\]\.grid"):
        mfconfig.prepare(demo_config)


def test_config_checks_reach_cli_users_too(demo_config, tmp_path):
    # BERTAttack's similarity constraint needs a sentence encoder: mergeflow.config says so
    # for every reader of a config (mergeflow plan, aggregate), not only the Snakefile
    del demo_config["robustness"]["adversarial"]["sentence_encoder"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(demo_config))
    with pytest.raises(MergeflowError, match=r"'robustness.adversarial.sentence_encoder': BERTAttack on (sst2|cola)") as err:
        mfconfig.load(path)
    assert "\n" not in str(err.value)
    demo_config["robustness"]["adversarial"]["settings"]["min_sentence_cos_sim"] = None
    mfconfig.prepare(demo_config)  # without the constraint, no encoder is needed
    demo_config["robustness"]["adversarial"]["task_settings"] = {"cola": {"attacks": ["nope"]}}
    with pytest.raises(MergeflowError, match=r"'robustness.adversarial' \(cola\).*nope"):
        mfconfig.prepare(demo_config)


def test_dtype_and_donor_enter_the_merge_id_only_when_set(demo_config):
    before = mfconfig.merge_specs(mfconfig.prepare(copy.deepcopy(demo_config)))
    demo_config["merge"]["dtype"] = "bfloat16"
    with_dtype = mfconfig.merge_specs(mfconfig.prepare(copy.deepcopy(demo_config)))
    assert set(before).isdisjoint(with_dtype) and all(s.dtype == "bfloat16" for s in with_dtype.values())
    demo_config["merge"]["dtype"] = None
    assert list(mfconfig.merge_specs(mfconfig.prepare(copy.deepcopy(demo_config)))) == list(before)
    demo_config["merge"]["donor"] = "math"
    specs = mfconfig.merge_specs(mfconfig.prepare(copy.deepcopy(demo_config)))
    assert {s.donor_label for s in specs.values()} == {"math"}
    demo_config["merge"]["donor"] = "code"  # not an input of the LM & Math merges
    with pytest.raises(MergeflowError, match=r"'merge.donor': 'code' is neither the base nor an expert of merges\[4\]"):
        mfconfig.merge_specs(mfconfig.prepare(demo_config))
