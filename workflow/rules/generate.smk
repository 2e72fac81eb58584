# Stage 3: generations per model x benchmark. Finished prompts are cached outside the
# declared outputs so a killed job resumes where it stopped.


rule generate:
    input:
        model=model_dir_of,
        data=lambda w: data_file(w.benchmark),
    output:
        "results/generations/{model}/{benchmark}.jsonl",
    params:
        settings=generation_settings,
        cache="results/cache/generations/{model}/{benchmark}.jsonl",
        python=GENERATE_PYTHON,  # vLLM's virtualenv, or "" (the job's python): common.smk
    log:
        "results/logs/generate/{model}/{benchmark}.log",
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
        "workflow/scripts/mergeflow generate --model {input.model} --benchmark {wildcards.benchmark} "
        "--data {input.data} --settings {params.settings:q} --cache {params.cache} "
        "--out {output} --gpus {resources.gpu} > {log} 2>&1"


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
