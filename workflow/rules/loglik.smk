# Stage 3b: multiple-choice benchmarks scored on the model's log-likelihoods (MergeBench's
# okapi tasks), not on generations. One job per model runs all its loglik_mc benchmarks on one
# model load with lm-eval's own task files and model class, one rule per distinct benchmark
# set (as generate: a rule's outputs cannot depend on a wildcard); `loglik_mc` is the rule of
# evaluate.benchmarks. Each benchmark gets its score file and per-doc samples; log-likelihoods
# are cached per benchmark outside the outputs, so a killed or failed job keeps what it computed.


for _benches, _models in loglik_sets().items():

    rule:
        name:
            loglik_rule_name(_benches)
        input:
            model=model_dir_of,
            data=[data_file(b) for b in _benches],
        output:
            **{b: f"results/scores/{{model}}/{b}.json" for b in _benches},
            **{f"{b}_samples": f"results/scores/{{model}}/{b}.samples.jsonl" for b in _benches},
        params:
            tasks=lambda w, benches=_benches: loglik_tasks(w.model, benches),
            settings=mfconfig.canonical_json(LOGLIK_SETTINGS),
        wildcard_constraints:
            model="|".join(re.escape(m) for m in _models),
        log:
            "results/logs/loglik_mc/{model}.log",
        group:
            "model_{model}"
        priority: BEFORE_MERGES_PRIORITY
        conda:
            LOGLIK_ENV
        threads: GENERATE_THREADS if LOGLIK_ON_VLLM else 1
        resources:
            gpu=CFG["resources"]["generate_gpus"],
            mem_mb=CFG["resources"]["generate_mem_mb"],
        shell:
            "workflow/scripts/mergeflow loglik-mc --model {input.model} {params.tasks} "
            "--settings {params.settings:q} --gpus {resources.gpu} > {log} 2>&1"
