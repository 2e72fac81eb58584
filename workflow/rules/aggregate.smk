# Stage 5: the tidy scores table, paper-style tables (with published figures) and plots.


rule aggregate:
    input:
        scores=score_files() + robustness_score_files(),
        samples=samples_files(score_files() + robustness_score_files()),
        merges=merge_metadata_files(),
        published=CFG["aggregate"]["published"],
        agreement=agreement_files(),
    output:
        csv="results/scores.csv",
        parquet="results/scores.parquet",
        tables=report(
            directory("results/tables"),
            patterns=["{name}.md"],
            category="Tables",
            labels={"table": "{name}"},
        ),
        plots=report(
            directory("results/plots"),
            patterns=["{name}.png"],
            category="Plots",
            labels={"figure": "{name}"},
        ),
    params:
        settings=mfconfig.canonical_json(mfconfig.aggregate_settings(CFG)),
    log:
        "results/logs/aggregate.log",
    conda:
        "../../envs/aggregate.yaml"
    localrule: True
    shell:
        "workflow/scripts/mergeflow aggregate --scores {input.scores} --merges {input.merges} "
        "--settings {params.settings:q} --agreement {input.agreement} --out {output.csv} --tables {output.tables} "
        "--plots {output.plots} > {log} 2>&1"
