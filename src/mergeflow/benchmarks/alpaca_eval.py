"""AlpacaEval (tatsu-lab/alpaca_eval): instruction, output (reference), generator, dataset.

The Hub dataset is loaded by a script that `datasets` >= 4 no longer runs, so `fetch`
downloads the subset's JSON file from the dataset repo instead."""

from __future__ import annotations

from mergeflow.benchmarks.base import Benchmark, HubSource

BENCHMARK = Benchmark(
    name="alpaca_eval",
    scorer="alpaca_eval",
    headline=("length_controlled_winrate", "win_rate"),
    schema={"instruction": str, "output": str},
    optional={"generator": str, "dataset": str},
    hub=HubSource("tatsu-lab/alpaca_eval", ("alpaca_eval",), "eval", file="{subset}.json"),
    sizes={"": 805, "alpaca_eval_gpt4_baseline": 805},  # the same 805 instructions, other references
    # the reference model's answer, after the Vicuna template's "ASSISTANT:"
    reference_response=lambda doc: f" {doc['output']}",
)
