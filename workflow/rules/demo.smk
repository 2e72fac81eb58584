# Stage 0 (demo config only): tiny checkpoints and benchmark-shaped data, from a seed.

if CFG["demo"]["enabled"]:
    from mergeflow.demo.data import FAMILIES as DEMO_DATA  # light: the demo's data files, by benchmark

    rule demo_assets:
        output:
            models=[directory(f"{DEMO_OUT}/models/{name}") for name in ("base", "lm", "math", "code", "judge")],
            data=[f"{DEMO_OUT}/data/{b}.jsonl" for b in DEMO_DATA],
        params:
            out=lambda w, output: os.path.dirname(os.path.dirname(output.models[0])),
            seed=CFG["demo"]["seed"],
        log:
            "results/logs/demo_assets.log",
        conda:
            "../../envs/demo.yaml"
        threads: 2
        shell:
            "workflow/scripts/mergeflow demo --out {params.out} --seed {params.seed} > {log} 2>&1"

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
