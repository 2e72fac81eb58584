# Config loading, schema validation and input functions shared by every rule file.
import json
import os
import re
import shlex
import sys

try:  # the package of this checkout, installed into the Python that runs Snakemake
    from mergeflow import benchmarks as mfbenchmarks  # declarations only
    from mergeflow import config as mfconfig  # light: yaml + jsonschema only
    from mergeflow import selection as mfselection  # light: hashlib + json
    from mergeflow.errors import MergeflowError
except ImportError as err:
    raise WorkflowError(f"cannot import mergeflow ({err}): run Snakemake from the project's environment "
                        f"(scripts/setup.sh; `pip install -e .` into {sys.executable})")

if not config:
    raise WorkflowError("no config: pass --configfile FILE (the demo is config/config.yaml, the default of "
                        "Snakemake's default workflow profile, profiles/default, when no --workflow-profile is given)")
try:
    CFG = mfconfig.prepare(config)
except MergeflowError as err:
    raise WorkflowError(str(err))


# --- What Snakemake's public API does not tell a Snakefile: the command line's resources,
# its deployment method, the jobs about to run. Read in these three functions only, each
# with a safe answer when a Snakemake release moves the attribute (min_version pins 9).


def _given_resources():
    """(where, {name: value}) of --set-resources and --default-resources; [] if unknown."""
    settings = getattr(workflow, "resource_settings", None)
    try:
        given = [(f"set-resources {rule}", res) for rule, res in (settings.overwrite_resources or {}).items()]
        given.append(("default-resources", settings.default_resources or {}))
        return [(where, {k: getattr(v, "raw", v) for k, v in dict(res).items()}) for where, res in given]
    except (AttributeError, TypeError):  # the check is then sbatch's own (--gres beside --gpus)
        return []


def _conda_deployment():
    """Whether jobs run in their rules' conda envs (--sdm conda); False if unknown."""
    methods = getattr(getattr(workflow, "deployment_settings", None), "deployment_method", None) or ()
    return any(str(getattr(m, "value", m)).lower() == "conda" for m in methods)


def _planned_jobs():
    """(jobs that need to run, every job of the DAG), or None if unknown (then judge anyway)."""
    dag = getattr(workflow, "dag", None)
    try:
        return list(dag.needrun_jobs()), list(dag.jobs)
    except AttributeError:
        return None


def reject_gpu_gres():
    """GPU rules ask for GPUs with `gpu` (config resources.*_gpus) and `gpu_model`; the SLURM
    plugin would pass a GPU `gres` beside them, and sbatch would get --gres and --gpus both."""
    for where, res in _given_resources():
        if "gres" in res and "gpu" in str(res["gres"]).lower():
            raise WorkflowError(
                f"{where}: gres={res['gres']} asks for GPUs, which this workflow requests with the "
                "`gpu` resource (config resources.*_gpus) and `gpu_model`: use those, not gres")


reject_gpu_gres()

# Without --sdm conda, jobs run with the Python that runs Snakemake (the project's .venv);
# with it, each rule's conda env provides `python`.
if not _conda_deployment():
    shell.prefix(f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:$PATH; ")

try:
    MERGES = mfconfig.merge_specs(CFG)
except MergeflowError as err:
    raise WorkflowError(str(err))
try:  # merge entries with grid + select: their members are scored on validation only
    SWEEPS = mfselection.sweeps(CFG, MERGES)
except MergeflowError as err:
    raise WorkflowError(str(err))
SWEEP_MEMBERS = {m for s in SWEEPS.values() for m in s.members}
# benchmarks split into validation and test (every model's evaluation reads the test rows)
SPLIT_BENCHMARKS = sorted({b for s in SWEEPS.values() for b in s.benchmarks})
for _note in mfconfig.seed_notes(CFG):  # seeds of a deterministic method: merged once, say so
    print(_note, file=sys.stderr)

# vLLM lives in its own env (it pins its own torch): generation uses it when the protocol
# asks for vllm, or for auto on GPU jobs; otherwise the transformers env.
_BACKENDS = {mfconfig.generation_settings(CFG, b)["backend"] for b in CFG["evaluate"]["benchmarks"]
             if mfbenchmarks.get(b).generates}
USES_VLLM = "vllm" in _BACKENDS or ("auto" in _BACKENDS and CFG["resources"]["generate_gpus"] > 0)
GENERATE_ENV = "../../envs/vllm.yaml" if USES_VLLM else "../../envs/generate.yaml"


def _generate_python():
    """The Python of the generate jobs. Under --sdm conda: the rule's env (GENERATE_ENV). Else,
    when generation uses vLLM: vLLM's own virtualenv, as envs/vllm.yaml is on a cluster:
    MERGEFLOW_VLLM_PYTHON if set, else .venv-vllm/bin/python (scripts/setup_vllm.sh) when it
    exists; otherwise, and for hf, the Python that runs Snakemake (PATH, above)."""
    if not USES_VLLM or _conda_deployment():
        return ""
    named = os.environ.get("MERGEFLOW_VLLM_PYTHON")
    if named:
        if not os.access(named, os.X_OK):
            raise WorkflowError(f"MERGEFLOW_VLLM_PYTHON={named}: no such executable (vLLM's Python for generate jobs)")
        return named
    return ".venv-vllm/bin/python" if os.access(".venv-vllm/bin/python", os.X_OK) else ""


# the generate rule hands it to its wrapper (scripts/mergeflow) as MERGEFLOW_PYTHON
GENERATE_PYTHON = _generate_python()
# On GPUs vLLM keeps a CPU busy per process (front end, engine core, one worker per GPU).
GENERATE_THREADS = max(2, CFG["resources"]["generate_gpus"] + 1) if CFG["resources"]["generate_gpus"] else 1
MODELS = CFG["models"]
BASE = CFG["base_model"]
BENCHMARKS = CFG["evaluate"]["benchmarks"]
# Multiple-choice benchmarks scored on each model's log-likelihoods (rule loglik_mc), not generated
LOGLIK_BENCHMARKS = mfbenchmarks.loglik_benchmarks()
LOGLIK_SETTINGS = mfconfig.loglik_mc_settings(CFG)
# lm-eval's vllm model class runs in vLLM's env (lm-eval beside it); hf in the scoring env (lm-eval[hf], CUDA torch)
LOGLIK_ON_VLLM = LOGLIK_SETTINGS["backend"] == "vllm" or (
    LOGLIK_SETTINGS["backend"] == "auto" and CFG["resources"]["generate_gpus"] > 0)
LOGLIK_ENV = "../../envs/vllm.yaml" if LOGLIK_ON_VLLM else "../../envs/score.yaml"
DEMO_OUT = CFG["demo"]["out"]



wildcard_constraints:
    model=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    merge_id=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    benchmark="|".join(mfbenchmarks.NAMES),


def eval_models():
    """Names of every model to evaluate: base, experts and merge ids; a sweep's grid members
    only through its selection (selected_models), never all of them on test."""
    try:
        return [m for m in mfconfig.eval_models(CFG, MERGES) if m not in SWEEP_MEMBERS]
    except MergeflowError as err:
        raise WorkflowError(str(err))


def model_dir(name):
    """Directory of a model: a local path, a fetched Hub snapshot, or a merge output."""
    if name in MERGES:
        return f"results/merges/{name}"
    if name not in MODELS:
        raise WorkflowError(f"unknown model '{name}': not under 'models' and not a merge id")
    source = MODELS[name]
    if "path" in source:
        return source["path"].rstrip("/")
    return f"resources/models/{name}"


def model_dir_of(wildcards):
    return model_dir(wildcards.model)


def data_file(benchmark):
    """The rows a benchmark is evaluated on: its test split when a selecting sweep uses it."""
    if benchmark in SPLIT_BENCHMARKS:
        return f"resources/data/splits/{benchmark}/test.jsonl"
    return f"resources/data/{benchmark}.jsonl"


def local_source(source):
    """A data/model source that is a file or directory in this checkout (an input)."""
    return [source["path"]] if "path" in source else []


def merge_spec(wildcards):
    if wildcards.merge_id not in MERGES:
        raise WorkflowError(f"unknown merge id '{wildcards.merge_id}'")
    return MERGES[wildcards.merge_id]


def merge_input_dirs(name):
    """A merge's base and experts by name (rule merge, and a sweep member's validation job)."""
    spec = MERGES[name]
    return {m: model_dir(m) for m in dict.fromkeys([spec.base, *spec.experts])}


def merge_inputs(wildcards):
    merge_spec(wildcards)  # an unknown id: its error
    return merge_input_dirs(wildcards.merge_id)


def merge_experts(wildcards):
    """`NAME=DIR` of each expert, in the merge's order (list-valued params follow it)."""
    return [f"{e}={model_dir(e)}" for e in merge_spec(wildcards).experts]


def generation_settings(wildcards):
    return mfconfig.canonical_json(mfconfig.generation_settings(CFG, wildcards.benchmark))


JUDGE_LAUNCH = CFG["judge"]["endpoint"].get("launch")
JUDGE_SERVER = (JUDGE_LAUNCH.get("server") or "transformers") if JUDGE_LAUNCH else None
# A vLLM judge runs in vLLM's env (it pins its own torch); every other judge in the judge env.
JUDGE_ON_VLLM = JUDGE_SERVER == "vllm"
JUDGE_ENV = "../../envs/vllm.yaml" if JUDGE_ON_VLLM else "../../envs/judge.yaml"
JUDGE_GPUS = CFG["resources"]["judge_gpus"]
# Benchmarks scored by rule score; AlpacaEval moves to judge_alpaca_eval when a vLLM judge runs it
SCORED_BENCHMARKS = "|".join(b for b in mfbenchmarks.NAMES if mfbenchmarks.get(b).generates
                             and not (JUDGE_ON_VLLM and b == "alpaca_eval"))


def judge_model_dir():
    """The launched judge server's model directory: a local path or a fetched Hub snapshot."""
    if "hub" in JUDGE_LAUNCH:
        return f"resources/judges/{re.sub(r'[^A-Za-z0-9._-]+', '--', JUDGE_LAUNCH['hub'])}"
    return os.path.normpath(JUDGE_LAUNCH["model"])


def judge_settings(kind):
    """Judge settings of one judging job; the API key is named, never included."""
    endpoint = dict(CFG["judge"]["endpoint"])
    if JUDGE_LAUNCH:  # the job is given the directory, however the config names the model
        launch = {k: v for k, v in JUDGE_LAUNCH.items() if k not in ("hub", "revision")}
        endpoint["launch"] = {**launch, "model": judge_model_dir()}
    if kind == "alpaca_eval":
        endpoint.update(CFG["judge"]["alpaca_eval"])
    if kind == "gsm8k":
        endpoint["prompt"] = CFG["judge"]["gsm8k"]["prompt"]
    return mfconfig.canonical_json(endpoint)


def judge_inputs(wildcards):
    return [judge_model_dir()] if JUDGE_LAUNCH else []


def judging_planned(jobs):
    """Whether the jobs about to run include judging (the preflight's condition)."""
    judged = {"judge_gsm8k", "judge_alpaca_eval", "judge_agreement"}
    return any(j.rule.name in judged or (j.rule.name == "score" and j.wildcards.benchmark == "alpaca_eval")
               for j in jobs)


def judge_preflight():
    """Before any job runs: the judge model is served and the key is set (or the launched
    server's executable and model are there). Raises WorkflowError naming the config key."""
    from mergeflow.judge.preflight import preflight

    planned = _planned_jobs()
    if planned is not None and not judging_planned(planned[0]):
        return
    settings = json.loads(judge_settings("gsm8k"))
    built = bool(JUDGE_LAUNCH) and ("hub" in JUDGE_LAUNCH or judge_model_dir() in {
        os.path.normpath(f) for job in (planned[1] if planned is not None else []) for f in job.output})
    try:
        checked = preflight(settings, model_dir_built=built, env_provides_server=_conda_deployment())
        print(f"judge preflight: {checked}", file=sys.stderr)
    except MergeflowError as err:
        raise WorkflowError(f"judge preflight failed (no job was run): {err}") from None


def benchmarks_of(model):
    """A merge may name its own benchmarks (e.g. pruning runs: each expert on its task)."""
    return mfconfig.benchmarks_of(CFG, model, MERGES)


def model_score_files(model):
    benches = benchmarks_of(model)
    files = [f"results/scores/{model}/{b}.json" for b in benches]
    if CFG["evaluate"]["gsm8k_judge"] and "gsm8k" in benches:
        files.append(f"results/scores/{model}/gsm8k_judge.json")
    if CFG["evaluate"]["reference_likelihood"] and likelihood_benchmarks(model):
        files.append(f"results/scores/{model}/reference_likelihood.json")
    return files


def score_files():
    return [f for model in eval_models() for f in model_score_files(model)]


def samples_files(scores):
    """The per-doc results beside each score file (the aggregate's intervals and paired tests
    read them), declared so that remote storage stages them; the likelihood writes none."""
    return [f[: -len(".json")] + ".samples.jsonl" for f in scores if os.path.basename(f) != "reference_likelihood.json"]


def likelihood_benchmarks(model):
    """The model's benchmarks that declare a reference response (all but humaneval)."""
    return [b for b in benchmarks_of(model) if mfbenchmarks.get(b).reference_response is not None]


def likelihood_tasks(wildcards):
    """`--task BENCHMARK DATA SETTINGS` per benchmark: the prompts are the generation prompts."""
    return " ".join(
        f"--task {b} {data_file(b)} {shlex.quote(mfconfig.canonical_json(mfconfig.generation_settings(CFG, b)))}"
        for b in likelihood_benchmarks(wildcards.model)
    )


def _benchmark_sets(benchmarks_of_model):
    """{benchmark set (sorted tuple): models with that set}, in first-seen order; empty sets left out."""
    sets = {}
    for model in eval_models() + sorted(SWEEP_MEMBERS):  # any member may be the one selected
        benches = tuple(sorted(benchmarks_of_model(model)))
        if benches:
            sets.setdefault(benches, []).append(model)
    return sets


def generation_sets():
    """{generated benchmark set: models evaluated on it} (rule generate / generate_<set>)."""
    return _benchmark_sets(lambda m: mfconfig.generated_benchmarks(CFG, m, MERGES))


def generate_rule_name(benches):
    main = tuple(sorted(b for b in BENCHMARKS if b not in LOGLIK_BENCHMARKS))
    return "generate" if benches == main else "generate_" + "_".join(benches)


def loglik_sets():
    """{log-likelihood benchmark set: models evaluated on it} (rule loglik_mc / loglik_mc_<set>)."""
    return _benchmark_sets(lambda m: mfconfig.loglik_benchmarks_of(CFG, m, MERGES))


def loglik_rule_name(benches):
    main = tuple(sorted(b for b in BENCHMARKS if b in LOGLIK_BENCHMARKS))
    return "loglik_mc" if benches == main else "loglik_mc_" + "_".join(benches)


def loglik_tasks(model, benches):
    """`--task BENCHMARK DATA CACHE OUT` per benchmark: its log-likelihoods are cached per model
    outside the outputs, so a failed or killed job keeps what it computed."""
    return " ".join(f"--task {b} {data_file(b)} results/cache/loglik_mc/{model}/{b}.jsonl results/scores/{model}/{b}.json"
                    for b in benches)


def generation_tasks(model, benches, validation=False):
    """`--task BENCHMARK DATA SETTINGS CACHE OUT` per benchmark: its settings are the job's
    params, so editing one reruns the job, and its cache makes the others cost no generation.
    `validation`: a sweep's validation rows, under results/validation/."""
    root = "results/validation" if validation else "results"
    return " ".join(
        f"--task {b} {validation_file(b) if validation else data_file(b)} "
        f"{shlex.quote(mfconfig.canonical_json(mfconfig.generation_settings(CFG, b)))} "
        f"{root}/cache/generations/{model}/{b}.jsonl {root}/generations/{model}/{b}.jsonl"
        for b in benches
    )


def merge_metadata_files():
    """The small copies of each merge's metadata: reading them keeps no checkpoint on disk."""
    return [f"results/merge_meta/{m}.json" for m in eval_models() if m in MERGES]


# Jobs that read a merged checkpoint, and the jobs making their data, go before new merges
# (default priority 0), so a local run keeps at most one checkpoint per running job:
# Snakemake's scheduler sizes a temp directory as its inode and would merge everything first.
BEFORE_MERGES_PRIORITY = 1
# A sweep's validation jobs and its selection go first of all: while the checkpoint select is
# pending, Snakemake defers every temp() deletion (docs/selection.md, "Disk")
VALIDATION_PRIORITY = 2


def merge_output(path):
    """A merged checkpoint lives until its evaluations are done, unless keep_merges;
    group_jobs=True flags it node-local, so storage plugins never upload it."""
    return directory(path) if CFG["keep_merges"] else temp(directory(path), group_jobs=True)


def score_settings(wildcards):
    """Each scoring job gets only its own settings: judge edits rerun only judging jobs,
    sandbox edits only code scoring."""
    if wildcards.benchmark == "alpaca_eval":
        return judge_settings("alpaca_eval")
    if wildcards.benchmark in mfbenchmarks.code_benchmarks():
        return mfconfig.canonical_json(CFG["scoring"]["code"])
    return "{}"


def score_threads(wildcards):
    """Code scoring runs scoring.code.max_workers sandboxed programs at once; the rest one."""
    return CFG["scoring"]["code"]["max_workers"] if wildcards.benchmark in mfbenchmarks.code_benchmarks() else 1


def score_judge_inputs(wildcards):
    return judge_inputs(wildcards) if wildcards.benchmark == "alpaca_eval" else []


# --- judge agreement with recorded judgments (rule judge_agreement) ---

AGREEMENT = CFG["judge"]["agreement"]


def agreement_files():
    return [f"results/judge_agreement/{source}.json" for source in AGREEMENT]


def agreement_recorded(wildcards):
    return AGREEMENT[wildcards.source]["recorded"]


def agreement_limit(wildcards):
    limit = AGREEMENT[wildcards.source].get("limit")
    return f"--limit {int(limit)}" if limit else ""


# --- robustness (M3 OOD and adversarial evaluations; workflow/rules/robustness.smk) ---

ROBUST = CFG.get("robustness") or {}
ROBUST_ON = bool(ROBUST.get("enabled"))
ROBUST_DEMO = f"{DEMO_OUT}/robustness"


def _merges_of_experts(experts):
    """Merge ids whose expert set is `experts` (with and without M3, DARE...); all merges if None."""
    evaluated = set(eval_models())
    return [m for m, spec in MERGES.items()
            if m in evaluated and (experts is None or set(spec.experts) == set(experts))]


def robustness_score_files():
    if not ROBUST_ON:
        return []
    files = []
    for category, spec in (ROBUST.get("livebench", {}).get("categories") or {}).items():
        files += [f"results/scores/{m}/livebench_{category}.json" for m in _merges_of_experts(spec.get("experts"))]
    adv = ROBUST.get("adversarial") or {}
    for task in adv.get("tasks") or {}:
        for experts in adv.get("experts") or [None]:
            files += [f"results/scores/{m}/adv_{task}.json" for m in _merges_of_experts(experts)]
    return list(dict.fromkeys(files))


def _livebench_settings(wildcards):
    return mfconfig.canonical_json(mfconfig.livebench_settings(CFG))


def _mlm_dir():
    mlm = (ROBUST.get("adversarial") or {}).get("mlm") or {}
    return os.path.normpath(mlm["path"]) if "path" in mlm else "resources/models/robustness_mlm"


def _attack_settings(task):
    return mfconfig.attack_settings_of(CFG, task)


def _encoder_dir():
    """BERTAttack's sentence encoder (local path or fetched Hub snapshot); None if unset."""
    enc = (ROBUST.get("adversarial") or {}).get("sentence_encoder")
    if not enc:
        return None
    return os.path.normpath(enc["path"]) if "path" in enc else "resources/models/robustness_encoder"


# --- validation-selected hyperparameters (merges[].select; workflow/rules/selection.smk) ---

VALIDATION = CFG.get("validation") or {}


def own_validation(benchmark):
    """The fetched copy of the dataset's own validation split, if the config names one."""
    source = CFG["benchmarks"][benchmark].get("validation")
    return f"resources/data/validation/{benchmark}.jsonl" if source else None


def split_args(wildcards):
    b = wildcards.benchmark
    args = ["--fraction", VALIDATION.get("fraction", mfselection.SPLIT_DEFAULTS["fraction"]),
            "--seed", VALIDATION.get("seed", CFG.get("seed", mfconfig.DEFAULTS["seed"]))]
    if own_validation(b):
        args = ["--own-validation", own_validation(b), "--seed", 0]  # a recorded split: no fraction, no seed
    return " ".join(shlex.quote(str(a)) for a in args)


def validation_file(benchmark):
    return f"resources/data/splits/{benchmark}/validation.jsonl"


def validation_model_dir(name):
    """A grid member's validation copy (its own merge job), or the base / an expert in place."""
    return f"results/validation/merges/{name}" if name in MERGES else model_dir(name)




def member_merge_args(name):
    """`mergeflow merge` arguments of a grid member, as rule merge passes them."""
    spec = MERGES[name]
    args = ["--method", spec.method, "--base", model_dir(spec.base),
            "--expert", *(f"{e}={model_dir(e)}" for e in spec.experts),
            "--params", mfconfig.canonical_json(spec.params), "--seed", spec.seed,
            "--dtype", spec.dtype or "auto", "--donor", spec.donor_label,
            "--device", CFG["merge"]["device"], "--vocab-policy", CFG["merge"]["vocab_policy"]]
    return " ".join(shlex.quote(str(a)) for a in args)


def validation_score(model, benchmark):
    return f"results/validation/scores/{model}/{benchmark}.json"


def validation_benchmarks():
    """model -> the benchmarks it is scored on for validation (mergeflow.selection)."""
    return mfselection.validation_benchmarks(SWEEPS)


def selection_file(sweep):
    return f"results/selection/{sweep}.json"


def select_inputs(wildcards):
    sweep = SWEEPS[wildcards.sweep]
    scores = [validation_score(m, b) for m in sweep.members + sweep.references for b in sweep.benchmarks]
    return {"scores": scores, "samples": samples_files(scores),
            "splits": [f"results/splits/{b}.json" for b in sweep.benchmarks]}


def select_args(wildcards):
    """The select job's arguments: candidates with their params, every validation score file,
    the split records, the rule; the job's params, so editing a swept value reruns it."""
    sweep = SWEEPS[wildcards.sweep]
    args = ["--sweep", sweep.name, "--grid", mfconfig.canonical_json(sweep.grid), "--rule", sweep.select["rule"],
            "--normalise-by", sweep.select["normalise_by"], "--benchmarks", *sweep.benchmarks,
            "--headline", mfconfig.canonical_json((CFG.get("aggregate") or {}).get("headline") or {})]
    for m in sweep.members:
        args += ["--candidate", m, mfconfig.canonical_json(MERGES[m].params)]
    for m in sweep.references:
        args += ["--reference", m]
    for m in sweep.members + sweep.references:
        for b in sweep.benchmarks:
            args += ["--score", m, b, validation_score(m, b)]
    for b in sweep.benchmarks:
        args += ["--split", b, f"results/splits/{b}.json"]
    return " ".join(shlex.quote(str(a)) for a in args)


def selected_models():
    """Each sweep's selected members (the chosen value, one per seed): known once its
    checkpoint has run (or is up to date)."""
    chosen = []
    for name, sweep in SWEEPS.items():
        with open(checkpoints.select.get(sweep=name).output[0], encoding="utf-8") as fh:
            sel = json.load(fh)
        selected = sel.get("selected_ids", [sel["selected"]])
        # a stale selection (its value edited away) names no current member: the select job
        # reruns, and Snakemake asks again once it has
        if all(m in sweep.members for m in selected):
            chosen += selected
    return chosen


def selected_score_files():
    return [f for m in selected_models() for f in model_score_files(m)]


def selection_files(wildcards):
    return [selection_file(s) for s in SWEEPS]
