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
            # split `validation` unless the source names one: not the benchmark's default (MBPP's
            # test ids would filter out a validation file's rows, a Hub source would give test rows)
            source=lambda w: mfconfig.source_args({"split": "validation", **CFG["benchmarks"][w.benchmark]["validation"]}),
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
        priority: VALIDATION_PRIORITY
        localrule: True
        conda:
            "../../envs/fetch.yaml"
        shell:
            "workflow/scripts/mergeflow split --benchmark {wildcards.benchmark} --data {input.data} {params.args} "
            "--validation-out {output.validation} --test-out {output.test} --record-out {output.record} > {log} 2>&1"

    _VALIDATION_SETS = {}
    for _model, _benches in validation_benchmarks().items():
        _VALIDATION_SETS.setdefault(_benches, []).append(_model)

    for _benches, _models in _VALIDATION_SETS.items():
        _suffix = "" if _benches == tuple(sorted(BENCHMARKS)) else "_" + "_".join(_benches)
        _members = [m for m in _models if m in MERGES]
        _references = [m for m in _models if m not in MERGES]

        if _references:

            rule:
                name:
                    f"generate_validation{_suffix}"
                input:
                    model=lambda w: model_dir(w.model),
                    data=[validation_file(b) for b in _benches],
                output:
                    **{b: f"results/validation/generations/{{model}}/{b}.jsonl" for b in _benches},
                params:
                    tasks=lambda w, benches=_benches: generation_tasks(w.model, benches, validation=True),
                    python=GENERATE_PYTHON,
                wildcard_constraints:
                    model="|".join(re.escape(m) for m in _references),
                log:
                    "results/logs/generate_validation/{model}.log",
                group:
                    "validation_{model}"
                priority: VALIDATION_PRIORITY
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

        if _members:

            # A grid member is merged into a scratch directory, generated and removed in one job:
            # a temp() checkpoint would stay on disk until the selection (a checkpoint) has run.
            rule:
                name:
                    f"merge_generate_validation{_suffix}"
                input:
                    unpack(lambda w: merge_input_dirs(w.model)),
                    data=[validation_file(b) for b in _benches],
                output:
                    meta="results/validation/merge_meta/{model}.json",
                    **{b: f"results/validation/generations/{{model}}/{b}.jsonl" for b in _benches},
                params:
                    merge=lambda w: member_merge_args(w.model),
                    scratch=lambda w: validation_model_dir(w.model),
                    # keep_merges keeps the copy too
                    cleanup=lambda w: "" if CFG["keep_merges"] else f" && rm -rf {shlex.quote(validation_model_dir(w.model))}",
                    tasks=lambda w, benches=_benches: generation_tasks(w.model, benches, validation=True),
                    python=GENERATE_PYTHON,
                wildcard_constraints:
                    model="|".join(re.escape(m) for m in _members),
                log:
                    merge="results/logs/merge_validation/{model}.log",
                    generate="results/logs/generate_validation/{model}.log",
                priority: VALIDATION_PRIORITY
                conda:
                    GENERATE_ENV
                threads: GENERATE_THREADS
                resources:
                    gpu=max(CFG["resources"]["merge_gpus"], CFG["resources"]["generate_gpus"]),
                    mem_mb=max(CFG["resources"]["merge_mem_mb"], CFG["resources"]["generate_mem_mb"]),
                shell:
                    "workflow/scripts/mergeflow merge {params.merge} --threads {threads} --out {params.scratch:q} "
                    "--metadata-out {output.meta} --gpus {resources.gpu} > {log.merge} 2>&1 && "
                    "MERGEFLOW_PYTHON={params.python:q} "
                    "workflow/scripts/mergeflow generate --model {params.scratch:q} {params.tasks} "
                    "--gpus {resources.gpu} > {log.generate} 2>&1{params.cleanup}"

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
        priority: VALIDATION_PRIORITY

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
        priority: VALIDATION_PRIORITY
        localrule: True
        conda:
            "../../envs/aggregate.yaml"
        shell:
            "workflow/scripts/mergeflow select {params.args} --out {output} > {log} 2>&1"
