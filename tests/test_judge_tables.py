"""Every table says which judge judged and which judge the paper used (judge.paper); the
paper configs name judges that exist and record the retired ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mergeflow import config as mfconfig
from mergeflow.cli import main
from mergeflow.errors import MergeflowError
from test_aggregate import write_score

ROOT = Path(__file__).resolve().parents[1]
RETIRED = {"gpt-4", "gpt-4-0613", "gpt-4-0314", "gpt-4-1106-preview", "gpt-3.5-turbo-16k-0613"}


def test_every_table_names_the_judge_and_the_papers_judge(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    spec = mfconfig.prepare(cfg)
    ties_id = next(m for m in mfconfig.merge_specs(spec) if m.startswith("ties-"))
    published = tmp_path / "published.csv"
    published.write_text("paper,experts,method,dare,m3,benchmark,value,source\n"
                         "della,lm+math+code,ties,false,false,alpaca_eval,40.0,Table 2\n")
    cfg["judge"]["paper"] = {"alpaca_eval": "alpaca_eval_gpt4 (gpt-4)", "gsm8k_judge": "gpt-4-0613"}
    cfg["aggregate"] = {"published": [str(published)], "claims": None}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    scores = tmp_path / "scores"
    judge = {"model": "gpt-4.1-2025-04-14", "endpoint": "https://api.openai.com/v1"}
    files = [
        write_score(scores, ties_id, "alpaca_eval", [{"metric": "win_rate", "value": 37.5, "n": 8}],
                    scorer="alpaca_eval", details={"judge": {**judge, "annotator": "alpaca_eval_gpt4.1"}}),
        write_score(scores, ties_id, "gsm8k_judge", [{"metric": "judge_accuracy", "value": 0.5, "n": 8}],
                    scorer="llm_judge", details={"judge": judge}),
        write_score(scores, ties_id, "gsm8k", [{"metric": "exact_match,strict-match", "value": 0.5, "n": 8}]),
    ]
    merge_dir = tmp_path / "merges" / ties_id
    merge_dir.mkdir(parents=True)
    (merge_dir / "mergeflow_merge.json").write_text(json.dumps({"method": "ties"}))
    tables = tmp_path / "tables"
    assert main(["aggregate", "--scores", *map(str, files), "--merges", str(merge_dir), "--config", str(config),
                 "--out", str(tmp_path / "scores.csv"), "--tables", str(tables)]) == 0
    note = ("Judges: alpaca_eval judged by alpaca_eval_gpt4.1 (gpt-4.1-2025-04-14); the paper used "
            "alpaca_eval_gpt4 (gpt-4). gsm8k_judge judged by gpt-4.1-2025-04-14; the paper used gpt-4-0613.")
    written = sorted(tables.glob("*.md"))
    assert {p.name for p in written} >= {"scores.md", "paper_lm_math_code.md"}
    for path in written:
        assert path.read_text().rstrip().endswith(note), path
    for path in tables.glob("*.tex"):
        assert path.read_text().rstrip().endswith(f"% {note}"), path


@pytest.mark.slow
@pytest.mark.parametrize("paper", ["della", "m3"])
def test_paper_configs_name_judges_that_exist_and_record_the_papers(paper):
    from mergeflow.scoring.alpaca import resolve_annotator

    cfg = mfconfig.load(ROOT / "config" / f"{paper}.yaml")
    judge = cfg["judge"]
    assert judge["endpoint"]["model"] not in RETIRED
    annotator = yaml.safe_load(resolve_annotator(judge["alpaca_eval"]["annotator"]).read_text())
    (settings,) = annotator.values()
    assert settings["completions_kwargs"]["model_name"] not in RETIRED  # the annotator of a current model
    assert "alpaca_eval" in judge["paper"]
    assert ("gsm8k_judge" in judge["paper"]) == cfg["evaluate"]["gsm8k_judge"]
    with_overlay = mfconfig.prepare(_merged(paper, "judges/open_weights"))  # Snakemake's left-to-right merge
    assert with_overlay["judge"]["endpoint"]["launch"]["server"] == "vllm"
    assert with_overlay["judge"]["paper"] == judge["paper"]
    assert with_overlay["resources"]["judge_gpus"] >= 1


def _merged(*names: str) -> dict:
    from snakemake.common.configfile import load_configfile
    from snakemake.utils import update_config

    out: dict = {}
    for name in names:
        update_config(out, load_configfile(str(ROOT / "config" / f"{name}.yaml")))
    return out


def test_launch_names_a_directory_or_a_hub_id_not_both():
    cfg = _merged("della", "judges/open_weights")
    cfg["judge"]["endpoint"]["launch"]["model"] = "/models/judge"
    with pytest.raises(MergeflowError, match="judge.endpoint.launch"):
        mfconfig.prepare(cfg)
    del cfg["judge"]["endpoint"]["launch"]["model"]
    cfg["judge"]["paper"]["mmlu"] = "gpt-4"
    with pytest.raises(MergeflowError, match="judge.paper"):
        mfconfig.prepare(cfg)
