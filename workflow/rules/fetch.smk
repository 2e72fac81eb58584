# Stage 1: checkpoints and benchmark data. Hub ids are downloaded at a pinned revision;
# local paths are used in place (models) or copied after a schema check (data).


localrules:
    fetch_model,
    fetch_data,


rule fetch_model:
    output:
        directory("resources/models/{model}"),
    params:
        source=lambda w: MODELS[w.model]["hub"],
        revision=lambda w: MODELS[w.model].get("revision", "main"),
    log:
        "results/logs/fetch/model_{model}.log",
    conda:
        "../../envs/fetch.yaml"
    shell:
        "workflow/scripts/mergeflow fetch model --source {params.source:q} --revision {params.revision:q} --out {output} > {log} 2>&1"


rule fetch_data:
    input:
        lambda w: local_source(CFG["benchmarks"][w.benchmark]),
    output:
        "resources/data/{benchmark}.jsonl",
    params:
        source=lambda w: mfconfig.source_args(CFG["benchmarks"][w.benchmark]),
    log:
        "results/logs/fetch/data_{benchmark}.log",
    priority: BEFORE_MERGES_PRIORITY
    conda:
        "../../envs/fetch.yaml"
    shell:
        "workflow/scripts/mergeflow fetch data --benchmark {wildcards.benchmark} {params.source:q} --out {output} > {log} 2>&1"
