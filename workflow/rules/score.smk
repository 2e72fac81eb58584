# Stage 4: harness scoring (lm-eval replay, sandboxed execution, alpaca_eval) and the
# GSM8K LLM judge. Only judging jobs receive judge settings, so changing the judge
# reruns judging and nothing else.


rule score:
    input:
        generations="results/generations/{model}/{benchmark}.jsonl",
        data=lambda w: data_file(w.benchmark),
        judge=score_judge_inputs,
    output:
        score="results/scores/{model}/{benchmark}.json",
        samples="results/scores/{model}/{benchmark}.samples.jsonl",
    wildcard_constraints:
        benchmark=SCORED_BENCHMARKS,
    params:
        settings=score_settings,
    log:
        "results/logs/score/{model}/{benchmark}.log",
    conda:
        "../../envs/score.yaml"
    threads: score_threads
    resources:
        gpu=lambda w: JUDGE_GPUS if w.benchmark == "alpaca_eval" else 0,
    shell:
        "workflow/scripts/mergeflow score --benchmark {wildcards.benchmark} --data {input.data} "
        "--generations {input.generations} --settings {params.settings:q} "
        "--out {output.score} --gpus {resources.gpu} > {log} 2>&1"


rule judge_gsm8k:
    input:
        generations="results/generations/{model}/gsm8k.jsonl",
        data=data_file("gsm8k"),
        judge=judge_inputs,
    output:
        score="results/scores/{model}/gsm8k_judge.json",
        samples="results/scores/{model}/gsm8k_judge.samples.jsonl",
    params:
        settings=judge_settings("gsm8k"),
    log:
        "results/logs/judge/{model}/gsm8k.log",
    conda:
        JUDGE_ENV
    threads: 1
    resources:
        gpu=JUDGE_GPUS,
    shell:
        "workflow/scripts/mergeflow judge gsm8k --data {input.data} --generations {input.generations} "
        "--settings {params.settings:q} --out {output.score} --gpus {resources.gpu} > {log} 2>&1"


# A vLLM judge needs vLLM's env, which has no lm-eval or sandbox: AlpacaEval is then judged
# by this rule instead of rule score.
if JUDGE_ON_VLLM:

    rule judge_alpaca_eval:
        input:
            generations="results/generations/{model}/alpaca_eval.jsonl",
            data=data_file("alpaca_eval"),
            judge=judge_inputs,
        output:
            score="results/scores/{model}/alpaca_eval.json",
            samples="results/scores/{model}/alpaca_eval.samples.jsonl",
        params:
            settings=judge_settings("alpaca_eval"),
        log:
            "results/logs/judge/{model}/alpaca_eval.log",
        conda:
            "../../envs/vllm.yaml"
        threads: 1
        resources:
            gpu=JUDGE_GPUS,
        shell:
            "workflow/scripts/mergeflow judge alpaca_eval --data {input.data} --generations {input.generations} "
            "--settings {params.settings:q} --out {output.score} --gpus {resources.gpu} > {log} 2>&1"

if JUDGE_LAUNCH and "hub" in JUDGE_LAUNCH:

    rule fetch_judge_model:
        output:
            directory(judge_model_dir()),
        params:
            source=JUDGE_LAUNCH["hub"],
            revision=JUDGE_LAUNCH.get("revision", "main"),
        log:
            "results/logs/fetch/judge_model.log",
        conda:
            "../../envs/fetch.yaml"
        localrule: True
        shell:
            "workflow/scripts/mergeflow fetch model --source {params.source:q} --revision {params.revision:q} "
            "--out {output} > {log} 2>&1"


# Fails the run before any job when the judge cannot answer; dry runs never call it.
onstart:
    judge_preflight()


# Optional (judge.agreement): re-judges recorded judgments (the paper's judge's, the demo's
# labels) with the configured judge, for results/tables/judge_agreement.md.
rule judge_agreement:
    input:
        recorded=agreement_recorded,
        judge=judge_inputs,
    output:
        "results/judge_agreement/{source}.json",
    wildcard_constraints:
        source="alpaca_eval|gsm8k",
    params:
        settings=lambda w: judge_settings(w.source),
        limit=agreement_limit,
    log:
        "results/logs/judge/agreement_{source}.log",
    conda:
        JUDGE_ENV
    threads: 1
    resources:
        gpu=JUDGE_GPUS,
    shell:
        "workflow/scripts/mergeflow judge agreement --source {wildcards.source} --recorded {input.recorded:q} "
        "{params.limit} --settings {params.settings:q} --out {output} --gpus {resources.gpu} > {log} 2>&1"
