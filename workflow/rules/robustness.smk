# M3's robustness evaluations (config key `robustness`, off unless enabled):
# LiveBench OOD categories on the merges of the paper's expert pairs, and PromptBench
# prompt attacks (accuracy + PDR) on SST-2 / CoLA. Score files land next to the others in
# results/scores/{model}/ (livebench_{category}.json, adv_{task}.json).

wildcard_constraints:
    lb_category=r"instruction_following|coding|typos",
    adv_task=r"sst2|cola",


if ROBUST_ON:

    if CFG["demo"]["enabled"]:

        rule robustness_demo_data:
            output:
                data=[f"{ROBUST_DEMO}/{n}.jsonl" for n in
                      ("livebench_instruction_following", "livebench_coding", "livebench_typos", "sst2", "cola")],
                mlm=directory(f"{ROBUST_DEMO}/mlm"),
            params:
                out=lambda w, output: os.path.dirname(output.data[0]),
                seed=CFG["demo"]["seed"],
            log:
                "results/logs/robustness/demo_data.log",
            priority: BEFORE_MERGES_PRIORITY
            conda:
                "../../envs/robustness.yaml"
            shell:
                "workflow/scripts/mergeflow robustness demo-data --out {params.out} --seed {params.seed} > {log} 2>&1"

    rule robustness_fetch_livebench:
        input:
            lambda w: local_source(ROBUST["livebench"]["categories"][w.lb_category]["source"]),
        output:
            "resources/data/livebench_{lb_category}.jsonl",
        params:
            source=lambda w: mfconfig.source_args(ROBUST["livebench"]["categories"][w.lb_category]["source"]),
            release=ROBUST.get("livebench", {}).get("release_date", ""),
        log:
            "results/logs/robustness/fetch_livebench_{lb_category}.log",
        priority: BEFORE_MERGES_PRIORITY
        conda:
            "../../envs/robustness.yaml"
        shell:
            "workflow/scripts/mergeflow robustness fetch --dataset livebench_{wildcards.lb_category} {params.source:q} "
            "--release-date {params.release} --out {output} > {log} 2>&1"

    rule robustness_fetch_task:
        input:
            lambda w: local_source(ROBUST["adversarial"]["tasks"][w.adv_task]),
        output:
            "resources/data/{adv_task}.jsonl",
        params:
            source=lambda w: mfconfig.source_args(ROBUST["adversarial"]["tasks"][w.adv_task]),
        log:
            "results/logs/robustness/fetch_{adv_task}.log",
        priority: BEFORE_MERGES_PRIORITY
        conda:
            "../../envs/robustness.yaml"
        shell:
            "workflow/scripts/mergeflow robustness fetch --dataset {wildcards.adv_task} {params.source:q} "
            "--out {output} > {log} 2>&1"

    # BERTAttack's masked LM and sentence encoder, where the config names them on the Hub
    # (local paths are used in place): resources/models/robustness_{mlm,encoder}.
    _ATTACK_MODEL_KEYS = {"mlm": "mlm", "encoder": "sentence_encoder"}
    _HUB_ATTACK_MODELS = [name for name, key in _ATTACK_MODEL_KEYS.items()
                          if "hub" in ((ROBUST.get("adversarial") or {}).get(key) or {})]

    if _HUB_ATTACK_MODELS:

        rule robustness_fetch_attack_model:
            output:
                directory("resources/models/robustness_{attack_model}"),
            wildcard_constraints:
                attack_model="|".join(_HUB_ATTACK_MODELS),
            params:
                source=lambda w: mfconfig.source_args(ROBUST["adversarial"][_ATTACK_MODEL_KEYS[w.attack_model]]),
            log:
                "results/logs/robustness/fetch_{attack_model}.log",
            conda:
                "../../envs/fetch.yaml"
            shell:
                "workflow/scripts/mergeflow fetch model {params.source:q} --out {output} > {log} 2>&1"

        # resources/models/robustness_* also matches fetch_model's resources/models/{model}
        ruleorder: robustness_fetch_attack_model > fetch_model

    rule robustness_livebench:
        input:
            model=model_dir_of,
            data="resources/data/livebench_{lb_category}.jsonl",
        output:
            score="results/scores/{model}/livebench_{lb_category}.json",
            samples="results/scores/{model}/livebench_{lb_category}.samples.jsonl",
            generations="results/generations/{model}/livebench_{lb_category}.jsonl",
        params:
            settings=_livebench_settings,
            sandbox=mfconfig.canonical_json(CFG["scoring"]["code"]),
            cache="results/cache/generations/{model}/livebench_{lb_category}.jsonl",
        log:
            "results/logs/robustness/{model}/livebench_{lb_category}.log",
        group:
            "model_{model}"
        priority: BEFORE_MERGES_PRIORITY
        conda:
            "../../envs/robustness.yaml"
        resources:
            gpu=CFG["resources"]["generate_gpus"],
            mem_mb=CFG["resources"]["generate_mem_mb"],
        shell:
            "workflow/scripts/mergeflow robustness livebench --category {wildcards.lb_category} --model {input.model} "
            "--data {input.data} --settings {params.settings:q} --sandbox {params.sandbox:q} "
            "--generations {output.generations} --cache {params.cache} --out {output.score} "
            "--gpus {resources.gpu} > {log} 2>&1"

    rule robustness_attack:
        input:
            model=model_dir_of,
            data="resources/data/{adv_task}.jsonl",
            mlm=_mlm_dir(),
            encoder=_encoder_dir() or [],
        output:
            score="results/scores/{model}/adv_{adv_task}.json",
            samples="results/scores/{model}/adv_{adv_task}.samples.jsonl",
        params:
            settings=lambda w: mfconfig.canonical_json(_attack_settings(w.adv_task)),
            encoder=lambda w, input: f"--encoder {input.encoder}" if input.encoder else "",
        log:
            "results/logs/robustness/{model}/adv_{adv_task}.log",
        group:
            "model_{model}"
        priority: BEFORE_MERGES_PRIORITY
        conda:
            "../../envs/robustness.yaml"
        resources:
            gpu=CFG["resources"]["generate_gpus"],
            mem_mb=CFG["resources"]["generate_mem_mb"],
        shell:
            "workflow/scripts/mergeflow robustness attack --task {wildcards.adv_task} --model {input.model} "
            "--data {input.data} --mlm {input.mlm} {params.encoder} --settings {params.settings:q} --out {output.score} "
            "--gpus {resources.gpu} > {log} 2>&1"
