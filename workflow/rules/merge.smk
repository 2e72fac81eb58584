# Stage 2: one job per merge configuration; the id encodes every parameter.


rule merge:
    input:
        unpack(merge_inputs),
    output:
        model=merge_output("results/merges/{merge_id}"),
        meta="results/merge_meta/{merge_id}.json",
    params:
        method=lambda w: merge_spec(w).method,
        base=lambda w: model_dir(merge_spec(w).base),
        experts=merge_experts,
        params=lambda w: mfconfig.canonical_json(merge_spec(w).params),
        seed=lambda w: merge_spec(w).seed,
        dtype=lambda w: merge_spec(w).dtype or "auto",
        donor=lambda w: merge_spec(w).donor_label,
        device=CFG["merge"]["device"],
        vocab_policy=CFG["merge"]["vocab_policy"],
    log:
        "results/logs/merge/{merge_id}.log",
    # one group per model (model_{model} in generate.smk, robustness.smk): on a cluster the
    # merge and the jobs reading its checkpoint run as one job (docs/slurm.md)
    group:
        "model_{merge_id}"
    conda:
        "../../envs/merge.yaml"
    threads: 2
    resources:
        gpu=CFG["resources"]["merge_gpus"],
        mem_mb=CFG["resources"]["merge_mem_mb"],
    shell:
        "workflow/scripts/mergeflow merge --method {params.method} --base {params.base:q} "
        "--expert {params.experts:q} --params {params.params:q} --seed {params.seed} --dtype {params.dtype} "
        "--donor {params.donor:q} --device {params.device} --vocab-policy {params.vocab_policy} "
        "--threads {threads} --out {output.model} --metadata-out {output.meta} --gpus {resources.gpu} > {log} 2>&1"
