"""AlpacaEval win rate through `alpaca_eval.evaluate`, against the configured judge.

* annotator: an alpaca_eval config name as the papers name them (`alpaca_eval_gpt4` for
  DELLA, `chatgpt_fn` for MergeLM/M3, `weighted_alpaca_eval_gpt4_turbo` for AlpacaEval 2),
  or a config under workflow/judges/ (the demo's `demo_annotator`), or a path;
* the judge endpoint comes from the judge settings: a temporary client config (base URL and
  key, read from `api_key_env`) is handed to alpaca_eval through `client_config_path` /
  OPENAI_CLIENT_CONFIG_PATH and deleted afterwards; the key never reaches results;
* reference outputs are the `output` field of the AlpacaEval data;
* annotations are cached at an explicit path under results/cache/alpaca_eval/;
* alpaca_eval silently drops annotations it cannot parse: they are counted here
  (n_unparsed) and the win rate is over the parsed ones (n).
The length-controlled win rate needs files from the Hub at metric time: it is computed only
with `length_controlled: true` in the settings, and its failure is reported, not fatal.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tempfile
from pathlib import Path

import yaml

from mergeflow.errors import MergeflowError
from mergeflow.judge.client import Endpoint, default_cache_path, describe, reach
from mergeflow.scoring import results
from mergeflow.scoring.paths import workflow_path

log = logging.getLogger(__name__)

# PairwiseAnnotator.annotation_key: alpaca_eval prefixes each per-sample field with it
ANNOTATION_KEY = "preference"
PRICE_FIELD, REPLY_FIELD = f"{ANNOTATION_KEY}_price_per_example", f"{ANNOTATION_KEY}_raw_completion"

PAPER_ANNOTATORS = {"della": "alpaca_eval_gpt4", "mergelm": "chatgpt_fn", "m3": "weighted_alpaca_eval_gpt4_turbo"}


def resolve_annotator(value: str) -> Path:
    """The annotator's configs.yaml: a path, a config under workflow/judges/, or one of
    alpaca_eval's own configs."""
    from alpaca_eval import constants

    candidates = [Path(value)]
    with contextlib.suppress(MergeflowError):
        candidates.append(workflow_path("judges", value))
    candidates.append(Path(constants.EVALUATORS_CONFIG_DIR) / value)
    for path in candidates:
        if path.is_dir() and (path / "configs.yaml").is_file():
            return path / "configs.yaml"
        if path.is_file() and path.suffix in (".yaml", ".yml"):
            return path
    raise MergeflowError(
        f"alpaca_eval annotator {value!r} not found (as a path, under workflow/judges/, or among alpaca_eval's "
        f"configs in {constants.EVALUATORS_CONFIG_DIR})"
    )


def prepare_annotator_config(config_path: Path, out_dir: Path, request_model: str | None,
                             client_config: Path, max_concurrency: int, price_per_token: float | None) -> Path:
    """A copy of the annotator config pointed at our judge: absolute prompt paths, the
    endpoint's model name, our client config, our concurrency."""
    data = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not data:
        raise MergeflowError(f"annotator config {config_path}: expected a mapping of annotator name -> config")
    base_dir = config_path.resolve().parents[1]  # alpaca_eval resolves prompt paths from here
    for name, cfg in data.items():
        if not isinstance(cfg, dict) or "prompt_template" not in cfg:
            raise MergeflowError(f"annotator config {config_path}: {name!r} lacks prompt_template")
        cfg["prompt_template"] = str(prompt_template_path(cfg["prompt_template"], base_dir, config_path))
        kwargs = cfg.setdefault("completions_kwargs", {})
        if request_model:
            kwargs["model_name"] = request_model
        kwargs["client_config_path"] = str(client_config)
        kwargs["num_procs"] = max_concurrency
        if price_per_token is not None:
            kwargs["price_per_token"] = price_per_token
    target = out_dir / "annotators" / config_path.parent.name / "configs.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return target


def prompt_template_path(template: str, base_dir: Path, config_path: Path) -> Path:
    """An annotator's prompt: beside its config (as alpaca_eval resolves it), else among
    alpaca_eval's own configs (our configs reuse its prompts rather than copy them)."""
    from alpaca_eval import constants

    for root in (base_dir, Path(constants.EVALUATORS_CONFIG_DIR)):
        if (root / template).is_file():
            return (root / template).resolve()
    raise MergeflowError(f"annotator config {config_path}: prompt_template {template!r} not found under {base_dir} "
                         f"or alpaca_eval's configs ({constants.EVALUATORS_CONFIG_DIR})")


@contextlib.contextmanager
def client_config_file(base_url: str, api_key: str, endpoint: Endpoint):
    """A private, temporary OpenAI client config for alpaca_eval (holds the key: deleted on exit)."""
    with tempfile.TemporaryDirectory(prefix="mergeflow-oai-") as tmp:
        path = Path(tmp) / "openai_configs.yaml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump({"default": [{"api_key": api_key, "base_url": base_url,
                                         "max_retries": endpoint.max_retries, "timeout": endpoint.timeout}]}, fh)
        previous = os.environ.get("OPENAI_CLIENT_CONFIG_PATH")
        os.environ["OPENAI_CLIENT_CONFIG_PATH"] = str(path)
        try:
            yield path
        finally:
            if previous is None:
                os.environ.pop("OPENAI_CLIENT_CONFIG_PATH", None)
            else:
                os.environ["OPENAI_CLIENT_CONFIG_PATH"] = previous


@contextlib.contextmanager
def annotator_for(endpoint: Endpoint, annotator_config: Path):
    """The annotator's config pointed at the judge endpoint (launched first if configured),
    valid inside the block: its client config holds the key and is deleted on exit."""
    price = endpoint.prices.get("input_per_1k")
    with reach(endpoint) as where, tempfile.TemporaryDirectory(prefix="mergeflow-alpaca-") as tmp:
        with client_config_file(where.base_url, endpoint.api_key(where.local), endpoint) as client_config:
            yield prepare_annotator_config(annotator_config, Path(tmp), where.request_model, client_config,
                                           endpoint.max_concurrency, price / 1000 if price is not None else None)


def _annotator_class():
    from alpaca_eval.annotators import PairwiseAnnotator

    class FloatCachePairwiseAnnotator(PairwiseAnnotator):
        """alpaca_eval 0.6.6 reads cached preferences back as integers when all of them are
        (2, 1, -1) and then, under pandas 3, fails to write 1.5 (ties) into that column on a
        rerun: keep the cached column float."""

        def load_(self, path=None):
            super().load_(path)
            df = getattr(self, "df_annotations", None)
            if df is not None and self.annotation_key in df:
                df[self.annotation_key] = df[self.annotation_key].astype(float)

    return FloatCachePairwiseAnnotator


def _winrate(annotations, **kwargs) -> dict:
    """alpaca_eval's get_winrate over the parsed annotations (an unparsed judgment has no
    preference), defined as NaN when nothing could be parsed."""
    from alpaca_eval import metrics, utils

    df = utils.convert_to_dataframe(annotations)
    if "preference" in df:
        df = df[df["preference"].notna()]
    if len(df) == 0:
        return {"win_rate": math.nan, "standard_error": math.nan, "n_wins": 0, "n_wins_base": 0, "n_draws": 0,
                "n_total": 0, "discrete_win_rate": math.nan}
    return metrics.get_winrate(df)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-80:] or "judge"


def score(pairs: list[tuple[dict, dict]], doc_id, settings: dict, out: str | Path,
          positions: list[int] | None = None) -> tuple[list[dict], dict, list[dict]]:
    """(rows, details, samples) of alpaca_eval over (doc, generation) pairs; `positions`: each
    pair's row in the AlpacaEval data file (default 0, 1, ...), which the length-controlled
    win rate's per-instruction difficulty is indexed by."""
    import alpaca_eval

    endpoint = Endpoint.from_settings(settings)
    annotator_name = settings.get("annotator")
    if not annotator_name:
        raise MergeflowError("judge setting 'annotator' (an alpaca_eval annotator config) is required for alpaca_eval")
    annotator_config = resolve_annotator(annotator_name)
    model_name = Path(out).parent.name or "model"
    caching_path = Path(endpoint.cache) if endpoint.cache else default_cache_path(
        out, f"alpaca_eval/{model_name}/{_slug(annotator_config.parent.name)}__{_slug(endpoint.model)}.json")
    caching_path.parent.mkdir(parents=True, exist_ok=True)
    model_outputs = [{"instruction": d["instruction"], "output": g["completion"], "generator": model_name}
                     for d, g in pairs]
    reference_outputs = [{"instruction": d["instruction"], "output": d["output"],
                          "generator": d.get("generator") or "reference"} for d, _ in pairs]
    price = endpoint.prices.get("input_per_1k")
    with annotator_for(endpoint, annotator_config) as config:
        leaderboard, annotations = alpaca_eval.evaluate(
            model_outputs=model_outputs,
            reference_outputs=reference_outputs,
            annotators_config=str(config),
            name=model_name,
            output_path=None,
            precomputed_leaderboard=None,
            is_return_instead_of_print=True,
            fn_metric=_winrate,
            sort_by="win_rate",
            is_cache_leaderboard=False,
            caching_path=str(caching_path),
            Annotator=_annotator_class(),
        )
    if hasattr(annotations, "to_dict"):
        annotations = annotations.to_dict("records")
    annotations = list(annotations) if annotations is not None else []
    parsed = [a for a in annotations if a.get("preference") is not None and not _isnan(a.get("preference"))]
    n_total, n_parsed = len(pairs), len(parsed)
    metrics = leaderboard.loc[model_name].to_dict()
    extra = {"n_unparsed": n_total - n_parsed, "n_total": n_total}
    rows = [
        results.row("win_rate", value=metrics.get("win_rate"), stderr=metrics.get("standard_error"), n=n_parsed,
                    **extra),
        results.row("discrete_win_rate", value=metrics.get("discrete_win_rate"), n=n_parsed, **extra),
    ]
    details = {
        "judge": {**describe(endpoint), "annotator": annotator_config.parent.name,
                  "annotator_config": str(annotator_config)},
        "alpaca_eval_version": alpaca_eval.__version__ if hasattr(alpaca_eval, "__version__") else _version(),
        "caching_path": str(caching_path),
        "counts": {k: _plain(metrics.get(k)) for k in ("n_wins", "n_wins_base", "n_draws", "n_total")},
        "avg_length": _plain(metrics.get("avg_length")),
        "price_usd": _plain(sum(_number(a.get(PRICE_FIELD)) for a in annotations)) if price is not None else None,
    }
    by_instruction = {a["instruction"]: a for a in annotations}
    if settings.get("length_controlled"):
        rows_lc, note = _length_controlled(_in_data_order(pairs, by_instruction, positions, model_name), n_parsed)
        rows += rows_lc
        details["length_controlled"] = note
    else:
        details["length_controlled"] = "not computed (needs Hub files at metric time; set length_controlled: true)"
    samples = []
    for doc, gen in pairs:
        ann = by_instruction.get(doc["instruction"], {})
        preference = _plain(ann.get(ANNOTATION_KEY))
        samples.append({"doc_id": doc_id(doc), "preference": preference, "parsed": preference is not None,
                        "judge_reply": _plain(ann.get(REPLY_FIELD)), "output_length": len(gen["completion"])})
    return rows, details, samples


def _in_data_order(pairs, by_instruction: dict, positions: list[int] | None, model_name: str):
    """Every pair as alpaca_eval annotates it (output_1: the reference), indexed by its row in
    the data file, unparsed ones with a NaN preference: alpaca_eval's GLM looks up each row's
    instruction difficulty by that index and predicts for unparsed rows too."""
    import pandas as pd

    records = [{"instruction": d["instruction"], "output_1": d["output"], "output_2": g["completion"],
                "generator_1": d.get("generator") or "reference", "generator_2": model_name,
                "preference": _number(by_instruction.get(d["instruction"], {}).get(ANNOTATION_KEY), math.nan)}
               for d, g in pairs]
    index = list(range(len(pairs))) if positions is None else list(positions)
    if len(index) != len(records):
        raise MergeflowError(f"{len(index)} data-file positions for {len(records)} alpaca_eval pairs")
    return pd.DataFrame(records, index=index)


def _length_controlled(frame, n_parsed: int) -> tuple[list[dict], str]:
    try:
        from alpaca_eval import metrics

        lc = metrics.get_length_controlled_winrate(frame, save_weights_dir=None)  # never into site-packages
    except Exception as err:  # offline: the GLM's files are not on this machine
        return [], f"not computed: {type(err).__name__}: {str(err)[:200]}"
    return [results.row("length_controlled_winrate", value=lc.get("length_controlled_winrate"),
                        stderr=lc.get("lc_standard_error"), n=n_parsed)], "computed"


def _number(x, missing: float = 0.0) -> float:
    """A float from an annotation field; `missing` for None or NaN."""
    return missing if x is None or _isnan(x) else float(x)


def _isnan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _plain(x):
    return results._plain(x)


def _version() -> str:
    from importlib.metadata import version

    return version("alpaca_eval")
