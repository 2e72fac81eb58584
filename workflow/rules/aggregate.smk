# Stage 5: the tidy scores table, paper-style tables (with published figures) and plots.


rule aggregate:
    input:
        scores=score_files() + robustness_score_files(),
        samples=samples_files(score_files() + robustness_score_files()),
        merges=merge_metadata_files(),
        # a sweep's selected member (merges[].select) is known once its selection has run
        selected_scores=lambda w: selected_score_files(),
        selected_samples=lambda w: samples_files(selected_score_files()),
        selected_merges=lambda w: [f"results/merge_meta/{m}.json" for m in selected_models()],
        selections=selection_files,
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
        "workflow/scripts/mergeflow aggregate --scores {input.scores} {input.selected_scores} "
        "--merges {input.merges} {input.selected_merges} "
        "--settings {params.settings:q} --agreement {input.agreement} --selection {input.selections} "
        "--out {output.csv} --tables {output.tables} "
        "--plots {output.plots} > {log} 2>&1"
