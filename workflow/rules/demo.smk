# Stage 0 (demo config only): tiny checkpoints and benchmark-shaped data, from a seed.

if CFG["demo"]["enabled"]:
    from mergeflow.demo.data import FAMILIES as DEMO_DATA, validation_file as demo_validation_file  # light
    from mergeflow.demo.models import FINETUNED as DEMO_FINETUNED, FULL as DEMO_SPEC  # light: dataclasses

    # The zoo in steps: the base (with the data and the tokenizer), then each fine-tuned model
    # from it. The fine-tunes are independent and train on one thread each, side by side.
    rule demo_base:
        output:
            base=directory(f"{DEMO_OUT}/models/base"),
            data=[f"{DEMO_OUT}/data/{b}.jsonl" for b in DEMO_DATA],
            # each benchmark's own validation split (benchmarks.<b>.validation), apart from test and training rows
            validation=[f"{DEMO_OUT}/{demo_validation_file(b)}" for b in DEMO_DATA],
            manifest=f"{DEMO_OUT}/demo.json",
        params:
            out=lambda w, output: os.path.dirname(output.manifest),
            seed=CFG["demo"]["seed"],
        log:
            "results/logs/demo/base.log",
        conda:
            "../../envs/demo.yaml"
        threads: DEMO_SPEC.threads
        shell:
            "workflow/scripts/mergeflow demo --out {params.out} --seed {params.seed} --model base > {log} 2>&1"

    rule demo_finetune:
        input:
            base=f"{DEMO_OUT}/models/base",
            manifest=f"{DEMO_OUT}/demo.json",
        output:
            directory(f"{DEMO_OUT}/models/{{name}}"),
        wildcard_constraints:
            name="|".join(DEMO_FINETUNED),
        params:
            out=lambda w, input: os.path.dirname(input.manifest),
            seed=CFG["demo"]["seed"],
        log:
            "results/logs/demo/{name}.log",
        conda:
            "../../envs/demo.yaml"
        threads: DEMO_SPEC.finetune_threads
        shell:
            "workflow/scripts/mergeflow demo --out {params.out} --seed {params.seed} --model {wildcards.name} "
            "> {log} 2>&1"

    # The demo judge's labelled GSM8K judging requests, built from held-out rows: the
    # recorded judgments of judge.agreement.gsm8k. 4 rows give 36 requests.
    rule demo_judge_labels:
        input:
            data=f"{DEMO_OUT}/data/gsm8k.jsonl",
        output:
            f"{DEMO_OUT}/judging/gsm8k_labelled.jsonl",
        params:
            rows=4,
            seed=CFG["demo"]["seed"],
            prompt=CFG["judge"]["gsm8k"]["prompt"],
        log:
            "results/logs/demo_judge_labels.log",
        conda:
            "../../envs/demo.yaml"
        threads: 1
        shell:
            "workflow/scripts/mergeflow demo judge-labels --data {input.data} --rows {params.rows} "
            "--seed {params.seed} --prompt {params.prompt:q} --out {output} > {log} 2>&1"
