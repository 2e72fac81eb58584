"""Typed access to the experiment config: loading, schema validation, merge ids.

Light on purpose (yaml, jsonschema, hashlib only): the Snakefile imports it to validate
the config before any job runs, and to derive the stable merge ids its rules use.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergeflow.errors import MergeflowError

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"

# Defaults filled in after validation: their one place (the schema has none; CLI options
# that stand for a config key take theirs from here).
DEFAULTS: dict[str, Any] = {
    "seed": 42,
    "demo": {"enabled": False, "seed": 0, "out": "resources/demo"},
    "merge": {"device": "auto", "vocab_policy": "truncate", "dtype": None, "donor": None},
    "keep_merges": False,
    "evaluate": {"models": "all", "benchmarks": [], "gsm8k_judge": False, "reference_likelihood": False},
    "judge": {
        "endpoint": {
            "base_url": None,
            "model": "gpt-4.1-2025-04-14",  # the papers' GPT-4 judges are retired (docs/judges.md)
            "api_key_env": "OPENAI_API_KEY",
            "launch": None,
            "max_concurrency": 4,
            "max_retries": 6,
            "timeout": 120.0,
        },
        "alpaca_eval": {"annotator": "weighted_alpaca_eval_gpt4.1", "length_controlled": False},
        "gsm8k": {"prompt": "workflow/judges/gsm8k_judge.yaml"},
        "agreement": {},  # source -> {recorded: PATH, limit: N}: none by default
    },
    "scoring": {"code": {"timeout": 10.0, "isolation": "auto", "max_workers": 2}},
    "aggregate": {"published": [], "claims": None, "headline": {}, "ci_level": 0.95, "alpha": 0.05,
                  "bootstrap": {"resamples": 2000, "seed": 0},
                  "own_tasks": None,  # None: OWN_TASKS below (a given map replaces it whole)
                  "normalised_average": "benchmark"},  # or expert: per expert first (MergeBench)
    "resources": {"merge_gpus": 0, "generate_gpus": 0, "merge_mem_mb": 8000, "generate_mem_mb": 16000,
                  "judge_gpus": 0},
}

# Each expert's own tasks (aggregate.own_tasks when the config gives none): the DELLA/M3
# experts' benchmarks; the first is the one DELLA's Table 3 reads. Expert-normalised scores
# divide by the expert on these; forgetting is measured on the benchmarks no expert owns.
OWN_TASKS: dict[str, list[str]] = {"lm": ["alpaca_eval"], "math": ["gsm8k", "math"], "code": ["mbpp", "humaneval"]}


def own_tasks(aggregate: dict | None) -> dict[str, list[str]]:
    """model -> its own benchmarks: the config's aggregate.own_tasks, else OWN_TASKS."""
    given = (aggregate or {}).get("own_tasks")
    return {k: list(v) for k, v in (OWN_TASKS if given is None else given).items()}


GENERATION_DEFAULTS: dict[str, Any] = {
    "instruction": "{instruction}",
    "stop": [],
    "postprocess": "none",
    "limit": None,
    "batch_size": 8,
    "backend": "auto",
    "dtype": "auto",
}


# Settings of the log-likelihood multiple-choice jobs (protocol.loglik_mc; one block for every
# loglik_mc benchmark, since one job per model scores them all on one model load).
LOGLIK_MC_DEFAULTS: dict[str, Any] = {
    "backend": "auto",
    "dtype": "auto",
    "batch_size": 16,
    "limit": None,
    "gpu_memory_utilization": None,
}


def load_schema() -> dict:
    """The config schema, its benchmark names from the benchmark registry (their one source)."""
    from mergeflow.benchmarks import NAMES  # light: the registry imports a module per name on demand

    with open(SCHEMA_PATH) as fh:
        schema = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: faster
    schema["$defs"]["benchmark_name"]["enum"] = list(NAMES)
    return schema


def _key_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def validate(config: dict) -> None:
    """Validate against the JSON schema; the error names the offending key."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        lines = []
        for err in errors[:10]:
            best = jsonschema.exceptions.best_match([err])
            lines.append(f"config key '{_key_path(best.absolute_path)}': {best.message}")
        raise MergeflowError("invalid config:\n  " + "\n  ".join(lines))
    _check_references(config)


def _check_references(config: dict) -> None:
    models = config["models"]
    if config["base_model"] not in models:
        raise MergeflowError(f"config key 'base_model': '{config['base_model']}' is not a name under 'models'")
    for i, merge in enumerate(config.get("merges", [])):
        if merge.get("base", config["base_model"]) not in models:
            raise MergeflowError(f"config key 'merges[{i}].base': '{merge['base']}' is not a name under 'models'")
        if "seeds" in merge and "n_seeds" in merge:
            raise MergeflowError(f"config key 'merges[{i}].seeds': give seeds or n_seeds, not both")
        if "seeds" in merge and "seed" in merge:
            raise MergeflowError(f"config key 'merges[{i}].seeds': give seeds or seed, not both (seed with n_seeds: "
                                 "seeds seed, seed + 1, ...)")
        overlap = set(merge.get("grid", {})) & set(merge.get("params", {}))
        if overlap:
            raise MergeflowError(f"config key 'merges[{i}].grid': {sorted(overlap)} also set in params")
        for bench in merge.get("benchmarks", []):
            if bench not in config["benchmarks"]:
                raise MergeflowError(f"config key 'merges[{i}].benchmarks': '{bench}' has no data source under 'benchmarks'")
        if "select" in merge:
            _check_selectable(config, i, merge)
        for expert in merge["experts"]:
            if expert not in models:
                raise MergeflowError(f"config key 'merges[{i}].experts': '{expert}' is not a name under 'models'")
            if expert == merge.get("base", config["base_model"]):
                raise MergeflowError(f"config key 'merges[{i}].experts': '{expert}' is this merge's base model")
        _check_merge_params(config, i, merge)
    protocol = config["protocol"]
    templates = _templates(config)
    from mergeflow.benchmarks import get as benchmark  # light: declarations only

    for bench in config.get("evaluate", {}).get("benchmarks", []):
        if bench not in config["benchmarks"]:
            raise MergeflowError(f"config key 'evaluate.benchmarks': '{bench}' has no data source under 'benchmarks'")
        if not benchmark(bench).generates:  # scored on log-likelihoods: protocol.loglik_mc, no template
            continue
        settings = protocol["benchmarks"].get(bench)
        if settings is None:
            raise MergeflowError(f"config key 'protocol.benchmarks.{bench}': missing (needed to generate for '{bench}')")
        merged = {**protocol.get("defaults", {}), **settings}
        for key in ("template", "max_new_tokens"):
            if key not in merged:
                raise MergeflowError(f"config key 'protocol.benchmarks.{bench}.{key}': missing")
        tpl = merged["template"]
        if tpl not in templates and "{instruction}" not in tpl:
            raise MergeflowError(
                f"config key 'protocol.benchmarks.{bench}.template': '{tpl}' is neither a name under "
                f"'protocol.templates' or of the package ({', '.join(templates)}) nor a template containing {{instruction}}"
            )


def _check_selectable(config: dict, i: int, merge: dict) -> None:
    # validation selection scores grid members on generations (rules generate_validation*, score_validation)
    from mergeflow.benchmarks import get as benchmark

    for bench in merge.get("benchmarks") or config.get("evaluate", {}).get("benchmarks", []):
        if not benchmark(bench).generates:
            raise MergeflowError(f"config key 'merges[{i}].select': benchmark '{bench}' is scored by log-likelihood "
                                 "(rule loglik_mc), which validation selection does not run; select on generated "
                                 "benchmarks (merges[].benchmarks)")


def _check_merge_params(config: dict, i: int, merge: dict) -> None:
    """Every merge of item `i` (each grid combination) through the method registry's own
    check, the one its merge job runs: errors name `merges[i].params.<key>`."""
    import re

    from mergeflow.merging.methods import ParamError, check_params  # light: no torch

    grid = merge.get("grid") or {}
    for params in _expand_grid(merge):
        try:
            for seed in merge_seeds(config, merge):
                check_params(merge["method"], params, list(merge["experts"]), seed)
        except ParamError as err:
            root = re.split(r"[.\[]", err.key, maxsplit=1)[0]
            where = "experts" if err.key == "experts" else f"{'grid' if root in grid else 'params'}.{err.key}"
            raise MergeflowError(f"config key 'merges[{i}].{where}': {err.detail}"
                                 + (f" (grid combination {params})" if root in grid else "")) from None


def _deep_defaults(config: dict, defaults: dict) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in config.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_defaults(value, out[key])
        else:
            out[key] = copy.deepcopy(value)
    return out


def prepare(config: dict) -> dict:
    """Validate a raw config and return it with defaults filled in."""
    _check_bare_on(config)
    validate(config)
    prepared = _deep_defaults(config, DEFAULTS)
    _check_sentence_encoder(prepared)
    _check_merge_device(prepared)
    _check_own_tasks(prepared)
    return prepared


def _check_bare_on(config: dict) -> None:
    # YAML 1.1 (PyYAML, Snakemake) reads a bare `on` key as the boolean true
    for i, merge in enumerate(config.get("merges") or []):
        if isinstance(merge, dict) and isinstance(merge.get("select"), dict) and True in merge["select"]:
            raise MergeflowError(f"config key 'merges[{i}].select': a bare `on` key reads as true in YAML; "
                                 "quote it: {\"on\": validation, ...}")


def _check_own_tasks(config: dict) -> None:
    # a misspelt model would silently leave its merges without normalised scores
    for name in (config.get("aggregate") or {}).get("own_tasks") or {}:
        if name not in (config.get("models") or {}):
            raise MergeflowError(f"config key 'aggregate.own_tasks.{name}': not a model under 'models'")


def _check_merge_device(config: dict) -> None:
    # a merge job sees only the GPUs it is granted (mergeflow.gpus), so cuda with none always fails
    if config["merge"].get("device") == "cuda" and not config["resources"]["merge_gpus"]:
        raise MergeflowError("config key 'merge.device': 'cuda' needs 'resources.merge_gpus' >= 1 "
                             "(a merge job sees only the GPUs it is granted); set it, or use device 'auto'")


def attack_settings_of(config: dict, task: str) -> dict:
    """robustness.adversarial.settings with the task's task_settings over them."""
    adv = (config.get("robustness") or {}).get("adversarial") or {}
    return {**(adv.get("settings") or {}), **((adv.get("task_settings") or {}).get(task) or {})}


def _check_sentence_encoder(config: dict) -> None:
    """BERTAttack with its similarity constraint needs `adversarial.sentence_encoder`
    (checked on the settings as the attack CLI completes them, defaults included)."""
    robustness = config.get("robustness") or {}
    adv = robustness.get("adversarial") or {}
    if not robustness.get("enabled") or not adv.get("tasks"):
        return
    from mergeflow.robustness.settings import attack_settings  # light: no torch

    for task in adv["tasks"]:
        try:
            s = attack_settings(task, attack_settings_of(config, task))
        except MergeflowError as err:
            raise MergeflowError(f"config key 'robustness.adversarial' ({task}): {err}") from None
        if "bertattack" in s["attacks"] and s["min_sentence_cos_sim"] is not None and not adv.get("sentence_encoder"):
            raise MergeflowError(
                f"config key 'robustness.adversarial.sentence_encoder': BERTAttack on {task} needs a sentence "
                "encoder for its similarity constraint ({hub: ..., revision: ...} or {path: ...}); or set "
                "robustness.adversarial.settings.min_sentence_cos_sim: null to run without it")


def load(path: str | Path, *overlays: str | Path) -> dict:
    """A config file, with overlays (config/judges/*.yaml) merged over it left to right, key
    by key, as Snakemake merges several --configfile files; then validated."""
    raw: dict = {}
    for p in (path, *overlays):
        p = Path(p)
        if not p.is_file():
            raise MergeflowError(f"config file not found: {p}")
        with open(p) as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as err:
                raise MergeflowError(f"config file {p} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise MergeflowError(f"config file {p} must be a mapping of config keys, not a {type(data).__name__}")
        overlay_config(raw, data)
    return prepare(raw)


def overlay_config(config: dict, overlay: dict) -> dict:
    """`config` updated in place by `overlay`, nested mappings key by key: snakemake.utils.update_config's rule."""
    for key, value in overlay.items():
        if isinstance(value, dict):
            below = config.get(key)
            config[key] = overlay_config(below if isinstance(below, dict) else {}, value)
        else:
            config[key] = value
    return config


# ---------------------------------------------------------------------------------------
# Merge ids


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


@dataclass(frozen=True)
class MergeSpec:
    """Everything that determines a merge's bytes (plus labels that do not)."""

    method: str
    base: str
    experts: tuple[str, ...]
    params: dict
    seed: int
    tag: str | None = None
    benchmarks: tuple[str, ...] | None = None  # evaluation plan, not part of the id
    dtype: str | None = None  # output dtype (config merge.dtype); None: the inputs'
    donor: str | None = None  # model whose config and tokenizer ship (merge.donor); None: the engine's choice

    @property
    def donor_label(self) -> str:
        """The donor as `mergeflow merge --donor` names it: base, an expert name, or auto."""
        return "auto" if self.donor is None else ("base" if self.donor == self.base else self.donor)

    @property
    def merge_id(self) -> str:
        # The id hashes only what changes the output, so editing one hyperparameter
        # creates one new id and leaves every other merge (and its evaluations) alone.
        digest = hashlib.blake2b(self.to_json().encode(), digest_size=4).hexdigest()
        return f"{self.method}-{'+'.join(self.experts)}-{digest}"

    @property
    def config_id(self) -> str:
        """The merge id's form over everything but the seed: the seed replicates of one
        configuration (merges[].seeds) share it, and the tables pool them under it."""
        digest = hashlib.blake2b(self.to_json(seed=False).encode(), digest_size=4).hexdigest()
        return f"{self.method}-{'+'.join(self.experts)}-{digest}"

    @property
    def random(self) -> bool:
        """Whether this merge draws random numbers (its seed matters), from the method registry."""
        return _is_random(self.method, self.params, self.experts, self.seed)

    def to_json(self, seed: bool = True) -> str:
        spec = {"method": self.method, "base": self.base, "experts": list(self.experts), "params": self.params}
        if seed:
            spec["seed"] = self.seed
        # dtype and donor change the bytes; unset, they leave the ids of earlier configs as they were
        spec.update({k: v for k, v in (("dtype", self.dtype), ("donor", self.donor)) if v is not None})
        return canonical_json(spec)


def _is_random(method: str, params: dict, experts, seed: int) -> bool:
    from mergeflow.merging.methods import REGISTRY, check_params  # light: no torch

    return bool(REGISTRY[method].random(check_params(method, params, list(experts), seed)))


def merge_seeds(config: dict, merge: dict) -> list[int]:
    """The seeds a merge item asks for: `seeds`, or `n_seeds` counting up from its seed
    (merges[].seed, else the global seed), else that seed alone."""
    start = merge.get("seed", config.get("seed", DEFAULTS["seed"]))
    if "seeds" in merge:
        return list(merge["seeds"])
    return [start + k for k in range(merge.get("n_seeds", 1))]


def _spec_seeds(config: dict, merge: dict, params: dict) -> list[int]:
    """The seeds one grid combination is merged with: every seed of the item for a random
    method, only the item's seed for a deterministic one (its id as without seeds)."""
    start = merge.get("seed", config.get("seed", DEFAULTS["seed"]))
    if "seeds" not in merge and "n_seeds" not in merge:
        return [start]  # no randomness check: configs without seeds read as they always did
    seeds = merge_seeds(config, merge)
    return seeds if _is_random(merge["method"], params, merge["experts"], seeds[0]) else [start]


def seed_notes(config: dict) -> list[str]:
    """One line per merge item whose seeds are ignored because its method is deterministic."""
    notes = []
    for i, merge in enumerate(config.get("merges", [])):
        if "seeds" not in merge and "n_seeds" not in merge:
            continue
        seeds = merge_seeds(config, merge)
        if any(_spec_seeds(config, merge, p) != seeds for p in _expand_grid(merge)):
            notes.append(f"note: merges[{i}] ({merge['method']}) draws no random numbers: merged once, "
                         f"seeds {seeds} ignored (scores.csv: random false)")
    return notes


def _expand_grid(merge: dict) -> list[dict]:
    """A merge item with `grid: {param: [values]}` stands for one merge per combination."""
    grid = merge.get("grid") or {}
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    return [{**merge.get("params", {}), **combo} for combo in combos]


def merge_specs(config: dict) -> dict[str, MergeSpec]:
    """Merge id → spec, in config order: one per grid combination and, for a method that
    draws random numbers, per seed (merges[].seeds / n_seeds); duplicates are an error."""
    specs: dict[str, MergeSpec] = {}
    shared = config.get("merge") or {}
    for i, merge in enumerate(config.get("merges", [])):
        donor = shared.get("donor")
        if donor is not None and donor != merge.get("base", config["base_model"]) and donor not in merge["experts"]:
            raise MergeflowError(f"config key 'merge.donor': '{donor}' is neither the base nor an expert of "
                                 f"merges[{i}]")
        for params, seed in ((p, s) for p in _expand_grid(merge) for s in _spec_seeds(config, merge, p)):
            spec = MergeSpec(
                method=merge["method"],
                base=merge.get("base", config["base_model"]),
                experts=tuple(merge["experts"]),
                params=params,
                seed=seed,
                tag=merge.get("tag"),
                benchmarks=tuple(merge["benchmarks"]) if "benchmarks" in merge else None,
                dtype=shared.get("dtype"),
                donor=donor,
            )
            if spec.merge_id in specs:
                raise MergeflowError(f"config key 'merges[{i}]': same configuration as an earlier merge ({spec.merge_id})")
            specs[spec.merge_id] = spec
    return specs


def eval_models(config: dict, specs: dict[str, MergeSpec] | None = None) -> list[str]:
    """Names of every model to evaluate (`evaluate.models`): base, experts and merge ids."""
    every = [*config["models"], *(merge_specs(config) if specs is None else specs)]
    chosen = config["evaluate"]["models"]
    if chosen == "all":
        return every
    unknown = [m for m in chosen if m not in every]
    if unknown:
        raise MergeflowError(f"config key 'evaluate.models': unknown model(s) {unknown}; known: {every}")
    return list(chosen)


def benchmarks_of(config: dict, model: str, specs: dict[str, MergeSpec] | None = None) -> list[str]:
    """A model's benchmarks: a merge may name its own (e.g. pruning runs: each expert on its task)."""
    spec = (merge_specs(config) if specs is None else specs).get(model)
    return list(spec.benchmarks) if spec is not None and spec.benchmarks is not None else list(
        config["evaluate"]["benchmarks"])


def resolve_generation(config: dict, settings: dict) -> dict:
    """Generation settings as a job gets them: the defaults, the global seed,
    protocol.defaults, then `settings`; a template may name one of protocol.templates or of
    the package, an instruction one of the package's."""
    protocol = config["protocol"]
    resolved = {**GENERATION_DEFAULTS, "seed": config.get("seed", DEFAULTS["seed"]),
                **protocol.get("defaults", {}), **settings}
    resolved["template"] = _templates(config).get(resolved["template"], resolved["template"])
    resolved["instruction"] = _instructions().get(resolved["instruction"], resolved["instruction"])
    return resolved


def _templates(config: dict) -> dict[str, str]:
    """Template names: the package's (mergeflow.generation.templates), then protocol.templates."""
    from mergeflow.generation.templates import TEMPLATES  # light: strings only

    return {**TEMPLATES, **config["protocol"].get("templates", {})}


def _instructions() -> dict[str, str]:
    from mergeflow.generation.templates import INSTRUCTIONS

    return INSTRUCTIONS


def generation_settings(config: dict, benchmark: str) -> dict:
    """The resolved generation settings of one benchmark."""
    return resolve_generation(config, config["protocol"]["benchmarks"][benchmark])


def loglik_mc_settings(config: dict) -> dict:
    """The settings of the log-likelihood multiple-choice jobs: LOGLIK_MC_DEFAULTS, then protocol.loglik_mc."""
    return {**LOGLIK_MC_DEFAULTS, **(config["protocol"].get("loglik_mc") or {})}


def generated_benchmarks(config: dict, model: str, specs: dict[str, MergeSpec] | None = None) -> list[str]:
    """A model's benchmarks that are generated and then scored (rules generate, score)."""
    from mergeflow.benchmarks import get as benchmark

    return [b for b in benchmarks_of(config, model, specs) if benchmark(b).generates]


def loglik_benchmarks_of(config: dict, model: str, specs: dict[str, MergeSpec] | None = None) -> list[str]:
    """A model's benchmarks scored on its log-likelihoods of their choices (rule loglik_mc)."""
    from mergeflow.benchmarks import get as benchmark

    return [b for b in benchmarks_of(config, model, specs) if not benchmark(b).generates]


def livebench_settings(config: dict) -> dict:
    """The resolved generation settings of the LiveBench robustness jobs."""
    return resolve_generation(config, config["robustness"]["livebench"]["generation"])


def source_args(source: dict) -> list[str]:
    """`mergeflow fetch` / `robustness fetch` options of a config source ({path}, {hub,
    revision, subset, split} or {package}): the one translation of a source into a job's
    arguments."""
    key = next(k for k in ("path", "hub", "package") if k in source)
    args = ["--source", str(source[key])]
    for option in ("revision", "subset", "split"):
        if option in source:
            args += [f"--{option}", str(source[option])]
    return args


def aggregate_settings(config: dict) -> dict:
    """The config slice `mergeflow aggregate` reads, config-shaped (a full config or a slice
    gives the same slice): what names and labels merges, the protocol's name, `aggregate`
    and the paper's judges. Passed to the aggregate job as its params, so editing one of
    these reruns the aggregate and nothing else; so does a model's or a benchmark's pinned
    revision (scores.csv records them)."""
    shared = config.get("merge") or {}
    return {
        "base_model": config["base_model"],
        "seed": config.get("seed", DEFAULTS["seed"]),
        "merge": {key: shared.get(key) for key in ("dtype", "donor")},  # they enter merge ids
        "merges": config.get("merges", []),
        "protocol": {"name": (config.get("protocol") or {}).get("name")},
        "aggregate": _deep_defaults(config.get("aggregate") or {}, DEFAULTS["aggregate"]),
        "judge": {"paper": (config.get("judge") or {}).get("paper")},
        # the pinned Hub revisions of models and data, for scores.csv's provenance columns
        "revisions": {
            part: {name: src["revision"] for name, src in (config.get(part) or {}).items()
                   if isinstance(src, dict) and src.get("revision")}
            or (config.get("revisions") or {}).get(part, {})  # a slice already has them
            for part in ("models", "benchmarks")
        },
    }


def parse_settings(text: str | None, what: str = "--settings") -> dict:
    """A stage's `--settings`: a JSON object given inline, or the path of a JSON file.

    Rules pass each job only its own slice of the config this way."""
    if text is None or not text.strip():
        return {}
    source = text
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise MergeflowError(f"{what}: neither a JSON object nor an existing file: {text!r}")
        source = path.read_text(encoding="utf-8")
    try:
        settings = json.loads(source)
    except json.JSONDecodeError as err:
        raise MergeflowError(f"{what}: not valid JSON ({err})") from None
    if not isinstance(settings, dict):
        raise MergeflowError(f"{what}: expected a JSON object, got {type(settings).__name__}")
    return settings
