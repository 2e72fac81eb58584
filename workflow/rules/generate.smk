# Stage 3: generations. One job per model loads it once for all its benchmarks (issue 21):
# one rule per distinct benchmark set (a merge may list its own benchmarks; a rule's outputs
# cannot depend on a wildcard), its `model` wildcard restricted to the models with that set.
# The rule of evaluate.benchmarks is `generate`; another set's is `generate_<its benchmarks>`.
# Outputs stay one file per benchmark; finished prompts are cached per benchmark outside the
# outputs, so a killed job resumes where it stopped and a job rerun for one benchmark's
# settings generates only that benchmark's prompts (the others come from the cache).


for _benches, _models in generation_sets().items():

    rule:
        name:
            generate_rule_name(_benches)
        input:
            model=model_dir_of,
            data=[data_file(b) for b in _benches],
        output:
            **{b: f"results/generations/{{model}}/{b}.jsonl" for b in _benches},
        params:
            tasks=lambda w, benches=_benches: generation_tasks(w.model, benches),
            python=GENERATE_PYTHON,  # vLLM's virtualenv, or "" (the job's python): common.smk
        wildcard_constraints:
            model="|".join(re.escape(m) for m in _models),
        log:
            "results/logs/generate/{model}.log",
        group:
            "model_{model}"
        priority: BEFORE_MERGES_PRIORITY
        conda:
            GENERATE_ENV
        threads: GENERATE_THREADS
        resources:
            gpu=CFG["resources"]["generate_gpus"],
            mem_mb=CFG["resources"]["generate_mem_mb"],
        shell:
            "MERGEFLOW_PYTHON={params.python:q} "
            "workflow/scripts/mergeflow generate --model {input.model} {params.tasks} "
            "--gpus {resources.gpu} > {log} 2>&1"


rule likelihood:
    input:
        model=model_dir_of,
        data=lambda w: [data_file(b) for b in likelihood_benchmarks(w.model)],
    output:
        "results/scores/{model}/reference_likelihood.json",
    params:
        tasks=likelihood_tasks,
    log:
        "results/logs/likelihood/{model}.log",
    group:
        "model_{model}"
    priority: BEFORE_MERGES_PRIORITY
    conda:
        "../../envs/generate.yaml"
    threads: 1
    resources:
        gpu=CFG["resources"]["generate_gpus"],
        mem_mb=CFG["resources"]["generate_mem_mb"],
    shell:
        "workflow/scripts/mergeflow likelihood --model {input.model} {params.tasks} --out {output} "
        "--gpus {resources.gpu} > {log} 2>&1"
