# mergeflow: fetch -> merge -> generate (or loglik_mc) -> score -> aggregate.
# Only includes rule files; logic lives in the mergeflow package (src/mergeflow).

# The config: --configfile FILE...; without one, Snakemake's default workflow profile
# (profiles/default) names the demo, config/config.yaml, which a --configfile replaces.
from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/loglik.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/robustness.smk"
include: "workflow/rules/selection.smk"
include: "workflow/rules/aggregate.smk"


rule all:
    input:
        rules.aggregate.output.csv,
    default_target: True
