# Validation-selected hyperparameters (merges[].grid + merges[].select; docs/selection.md):
# split -> every grid member merged, generated and scored on validation only -> checkpoint
# select (reads validation scores only) -> the selected member evaluated on test by the
# ordinary rules (merge, generate, score), asked for by the aggregate once the selection exists.

if SWEEPS:

    rule fetch_validation_data:
        input:
            lambda w: local_source(CFG["benchmarks"][w.benchmark]["validation"]),
        output:
            "resources/data/validation/{benchmark}.jsonl",
        params:
            source=lambda w: mfconfig.source_args(CFG["benchmarks"][w.benchmark]["validation"]),
        log:
            "results/logs/fetch/validation_data_{benchmark}.log",
        conda:
            "../../envs/fetch.yaml"
        localrule: True
        shell:
            "workflow/scripts/mergeflow fetch data --benchmark {wildcards.benchmark} {params.source:q} --out {output} > {log} 2>&1"

    rule split_data:
        input:
            data="resources/data/{benchmark}.jsonl",
            own=lambda w: [own_validation(w.benchmark)] if own_validation(w.benchmark) else [],
        output:
            validation="resources/data/splits/{benchmark}/validation.jsonl",
            test="resources/data/splits/{benchmark}/test.jsonl",
            record="results/splits/{benchmark}.json",
        params:
            args=split_args,
        log:
            "results/logs/split/{benchmark}.log",
        priority: BEFORE_MERGES_PRIORITY
        localrule: True
        conda:
            "../../envs/fetch.yaml"
        shell:
            "workflow/scripts/mergeflow split --benchmark {wildcards.benchmark} --data {input.data} {params.args} "
            "--validation-out {output.validation} --test-out {output.test} --record-out {output.record} > {log} 2>&1"

    use rule merge as merge_validation with:
        output:
            model=merge_output("results/validation/merges/{merge_id}"),
            meta="results/validation/merge_meta/{merge_id}.json",
        log:
            "results/logs/merge_validation/{merge_id}.log",
        group:
            "validation_{merge_id}"

    _VALIDATION_SETS = {}
    for _model, _benches in validation_benchmarks().items():
        _VALIDATION_SETS.setdefault(_benches, []).append(_model)

    for _benches, _models in _VALIDATION_SETS.items():

        rule:
            name:
                "generate_validation" + ("" if _benches == tuple(sorted(BENCHMARKS)) else "_" + "_".join(_benches))
            input:
                model=lambda w: validation_model_dir(w.model),
                data=[validation_file(b) for b in _benches],
            output:
                **{b: f"results/validation/generations/{{model}}/{b}.jsonl" for b in _benches},
            params:
                tasks=lambda w, benches=_benches: " ".join(
                    f"--task {b} {validation_file(b)} "
                    f"{shlex.quote(mfconfig.canonical_json(mfconfig.generation_settings(CFG, b)))} "
                    f"results/validation/cache/generations/{w.model}/{b}.jsonl "
                    f"results/validation/generations/{w.model}/{b}.jsonl"
                    for b in benches
                ),
                python=GENERATE_PYTHON,
            wildcard_constraints:
                model="|".join(re.escape(m) for m in _models),
            log:
                "results/logs/generate_validation/{model}.log",
            group:
                "validation_{model}"
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

    use rule score as score_validation with:
        input:
            generations="results/validation/generations/{model}/{benchmark}.jsonl",
            data=lambda w: validation_file(w.benchmark),
            judge=score_judge_inputs,
        output:
            score="results/validation/scores/{model}/{benchmark}.json",
            samples="results/validation/scores/{model}/{benchmark}.samples.jsonl",
        log:
            "results/logs/score_validation/{model}/{benchmark}.log",

    checkpoint select:
        input:
            unpack(select_inputs),
        output:
            "results/selection/{sweep}.json",
        params:
            args=select_args,
        wildcard_constraints:
            sweep="|".join(re.escape(s) for s in SWEEPS),
        log:
            "results/logs/select/{sweep}.log",
        localrule: True
        conda:
            "../../envs/aggregate.yaml"
        shell:
            "workflow/scripts/mergeflow select {params.args} --out {output} > {log} 2>&1"
