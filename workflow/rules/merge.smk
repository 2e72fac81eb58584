# Stage 2: one job per merge configuration; the id encodes every parameter.


rule merge:
    input:
        unpack(merge_inputs),
    output:
        model=merge_output("results/merges/{merge_id}"),
        meta="results/merge_meta/{merge_id}.json",
    params:
        args=merge_args,
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
        "workflow/scripts/mergeflow merge {params.args} --device {params.device} "
        "--vocab-policy {params.vocab_policy} --out {output.model} --metadata-out {output.meta} "
        "--gpus {resources.gpu} > {log} 2>&1"
