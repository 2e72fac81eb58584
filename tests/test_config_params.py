"""Merge params are checked at workflow start-up by the method registry itself (the check
the merge job runs), so a config that passes `snakemake -n` cannot fail in its merge."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergeflow import config as mfconfig
from mergeflow.errors import MergeflowError
from mergeflow.merging import methods

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _merge(c, method):
    return next(m for m in c["merges"] if m["method"] == method)


def _index(c, method):
    return c["merges"].index(_merge(c, method))


BAD = {
    # keep probabilities 0.7 +/- 0.45 leave (0, 1]; the schema's window_size range allows 0.9
    "window_size": (lambda c: _merge(c, "della")["params"].update(window_size=0.9), "della", "params.window_size"),
    "ties_density_0": (lambda c: _merge(c, "ties")["params"].update(density=0), "ties", "params.density"),
    "ties_density_missing": (lambda c: _merge(c, "ties")["params"].pop("density"), "ties", "params.density"),
    "della_density": (lambda c: _merge(c, "della")["params"].update(density=0.5), "della", "params.density"),
    "m3_one_expert": (lambda c: _merge(c, "m3").update(experts=["lm"]), "m3", "experts"),
    "expert_twice": (lambda c: _merge(c, "ties").update(experts=["lm", "math", "lm"]), "ties", "experts"),
    "base_as_expert": (lambda c: _merge(c, "ties").update(experts=["base", "math"]), "ties", "experts"),
    "grid_value": (lambda c: _merge(c, "della").update(grid={"window_size": [0.14, 0.9]})
                   or _merge(c, "della")["params"].pop("window_size"), "della", "grid.window_size"),
}


@pytest.fixture()
def demo() -> dict:
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_merge_params_fail_prepare_naming_the_key(demo, case):
    mutate, method, key = BAD[case]
    bad = copy.deepcopy(demo)
    mutate(bad)
    with pytest.raises(MergeflowError) as err:
        mfconfig.prepare(bad)
    assert f"'merges[{_index(demo, method)}].{key}'" in str(err.value)
    assert "\n" not in str(err.value)


def test_negative_global_seed_fails_prepare(demo):
    with pytest.raises(MergeflowError, match=r"'seed'"):
        mfconfig.prepare({**demo, "seed": -1})


def test_engine_and_config_share_the_registry_check():
    # what start-up rejects, the merge itself rejects with the same words
    with pytest.raises(methods.ParamError, match="listed twice") as err:
        methods.build("average", {}, ["lm", "lm"], 0)
    assert err.value.key == "experts"
    with pytest.raises(methods.ParamError) as err:
        methods.build("della", {"drop_rate": 0.3, "window_size": 0.9}, ["a", "b"], 0)
    assert err.value.key == "window_size" and "(0, 1]" in err.value.detail


@pytest.mark.slow
@pytest.mark.parametrize("case", ["window_size", "m3_one_expert", "base_as_expert"])
def test_bad_merge_params_fail_snakemake_dry_run(demo, case, tmp_path):
    mutate, method, key = BAD[case]
    bad = copy.deepcopy(demo)
    mutate(bad)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(bad))
    run = subprocess.run([*SNAKEMAKE, "-n", "--cores", "1", "--configfile", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert f"'merges[{_index(demo, method)}].{key}'" in run.stdout + run.stderr
