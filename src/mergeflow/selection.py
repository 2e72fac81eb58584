"""Validation-selected hyperparameters: `mergeflow split` and `mergeflow select`.

A benchmark that a selecting sweep (merges[].grid with merges[].select) is evaluated on is
split into validation and test: the dataset's own validation split where the config names
one (benchmarks.<name>.validation), else a seeded split of the benchmark's rows. The sweep's
grid members are scored on validation only; a declared rule picks one member per merge
entry; only that one is evaluated on test. Light on purpose (no pandas, no torch): the
Snakefile imports it for the sweeps' names and members.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mergeflow import atomic
from mergeflow.errors import MergeflowError

RULES = ("mean", "mean_normalised")
NORMALISERS = ("base", "experts")
SELECT_DEFAULTS = {"on": "validation", "rule": "mean_normalised", "normalise_by": "base"}
SPLIT_DEFAULTS = {"fraction": 0.2}  # its seed: validation.seed, else the global seed


# --- the split ---------------------------------------------------------------------------


def _rank(seed: int, doc_id: str) -> str:
    # a keyed hash, not a shuffle: a doc's side survives reordering, added rows and `limit`
    return hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).hexdigest()


def seeded_split(doc_ids: list[str], fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """(validation ids, test ids): the round(fraction * n) docs of smallest keyed hash go to
    validation (at least one, and at least one doc left for test)."""
    if not 0 < fraction < 1:
        raise MergeflowError(f"validation.fraction must lie in (0, 1), got {fraction}")
    if len(doc_ids) < 2:
        raise MergeflowError(f"cannot split {len(doc_ids)} doc(s) into validation and test")
    n_val = validation_size(len(doc_ids), fraction)
    ranked = sorted(doc_ids, key=lambda d: (_rank(seed, d), d))
    return set(ranked[:n_val]), set(ranked[n_val:])


def _write_rows(path: Path, rows: list[dict]) -> None:
    atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def split_benchmark(benchmark: str, data: Path, validation_out: Path, test_out: Path, record_out: Path,
                    fraction: float, seed: int, own_validation: Path | None = None) -> dict:
    """Write the validation and test files of one benchmark and the split's record (doc ids,
    seed, source), and return the record."""
    from mergeflow import benchmarks

    spec = benchmarks.get(benchmark)
    rows = spec.load(data)
    ids = [spec.doc_id(r) for r in rows]
    if own_validation is not None:  # the dataset's own validation split: test is the whole benchmark
        val_rows = spec.load(own_validation)
        val_ids = [spec.doc_id(r) for r in val_rows]
        shared = sorted(set(val_ids) & set(ids))
        if shared:
            raise MergeflowError(f"{own_validation}: {len(shared)} validation doc(s) also in the benchmark's "
                                 f"evaluation data {data} (e.g. doc_id {shared[0]!r})")
        test_rows, source = rows, {"kind": "dataset", "validation_data": str(own_validation)}
    else:
        val, _ = seeded_split(ids, fraction, seed)
        val_rows = [r for r, d in zip(rows, ids) if d in val]
        test_rows = [r for r, d in zip(rows, ids) if d not in val]
        source = {"kind": "seeded", "fraction": fraction, "seed": seed}
    record = {
        "benchmark": benchmark,
        "data": str(data),
        "data_sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest(),
        "source": source,
        "validation": [spec.doc_id(r) for r in val_rows],
        "test": [spec.doc_id(r) for r in test_rows],
    }
    _write_rows(Path(validation_out), val_rows)
    _write_rows(Path(test_out), test_rows)
    atomic.write_text(Path(record_out), json.dumps(record, indent=1) + "\n")
    return record


# --- sweeps: which merge entries select, their members -----------------------------------


@dataclass(frozen=True)
class Sweep:
    """One merge entry with `grid` and `select`: its grid members, scored on validation."""

    name: str
    index: int  # merges[index]
    members: tuple[str, ...]  # merge ids, grid order (ties go to the first)
    grid: dict
    select: dict
    base: str
    experts: tuple[str, ...]
    benchmarks: tuple[str, ...]

    @property
    def references(self) -> tuple[str, ...]:
        """The models whose validation scores normalise the members' (none for rule mean)."""
        if self.select["rule"] == "mean":
            return ()
        return (self.base,) if self.select["normalise_by"] == "base" else self.experts


def sweep_name(merge: dict) -> str:
    """A selecting entry's name: its method, experts and a digest of the entry with the grid's
    keys but not its values, so editing one swept value keeps the name (and the selection file)."""
    entry = {k: v for k, v in merge.items() if k not in ("grid", "tag")}
    entry["grid"] = sorted(merge.get("grid") or {})
    digest = hashlib.blake2b(json.dumps(entry, sort_keys=True).encode(), digest_size=4).hexdigest()
    return f"sweep-{merge['method']}-{'+'.join(merge['experts'])}-{digest}"


def sweeps(config: dict, specs: dict) -> dict[str, Sweep]:
    """name -> Sweep of every merge entry with `select`, members from `specs` (merge_specs)."""
    from mergeflow.config import _expand_grid, _spec_seeds  # one expansion for ids and sweeps

    out = {}
    for i, merge in enumerate(config.get("merges", [])):
        if "select" not in merge:
            continue
        if not merge.get("grid"):
            raise MergeflowError(f"config key 'merges[{i}].select': needs a grid (merges[{i}].grid) to select from")
        select = {**SELECT_DEFAULTS, **merge["select"]}
        base = merge.get("base", config["base_model"])
        members = []
        for params in _expand_grid(merge):
            for spec in specs.values():
                if (spec.method == merge["method"] and spec.params == params and spec.base == base
                        and spec.experts == tuple(merge["experts"])
                        and spec.seed in _spec_seeds(config, merge, params) and spec.merge_id not in members):
                    members.append(spec.merge_id)
        benches = tuple(merge.get("benchmarks") or config["evaluate"]["benchmarks"])
        sweep = Sweep(sweep_name(merge), i, tuple(members), dict(merge["grid"]), select, base,
                      tuple(merge["experts"]), benches)
        if sweep.name in out:
            raise MergeflowError(f"config key 'merges[{i}]': same sweep as merges[{out[sweep.name].index}]")
        out[sweep.name] = sweep
    return out


def validation_benchmarks(sweeps_: dict[str, Sweep]) -> dict[str, tuple[str, ...]]:
    """model -> the benchmarks it is scored on for validation: each grid member its sweep's,
    each reference model (base or experts) the union over the sweeps it normalises."""
    out: dict[str, set] = {}
    for sweep in sweeps_.values():
        for model in sweep.members + sweep.references:
            out.setdefault(model, set()).update(sweep.benchmarks)
    return {m: tuple(sorted(b)) for m, b in out.items()}


def validation_size(n: int, fraction: float) -> int:
    """Docs a seeded split puts on validation out of n (seeded_split's count)."""
    return min(max(1, round(fraction * n)), n - 1)


# --- the selection -----------------------------------------------------------------------


def _headline_value(score_file: Path, benchmark: str, headline: dict | None) -> float:
    """The headline metric of a score file, as a fraction (win rates are percentages)."""
    from mergeflow import benchmarks

    score = json.loads(Path(score_file).read_text(encoding="utf-8"))
    values = {r["metric"]: r["value"] for r in score.get("rows", [])}
    wanted = ([headline[benchmark]] if headline and benchmark in headline else []) + list(
        benchmarks.get(benchmark).headline)
    metric = next((m for m in wanted if m in values), None)
    if metric is None:
        raise MergeflowError(f"{score_file}: none of the headline metrics {wanted} (has {sorted(values)})")
    value = float(values[metric])
    return value / 100.0 if "win" in metric else value


def _scored_doc_ids(score_file: Path) -> set[str]:
    from mergeflow.scoring.results import samples_path

    path = samples_path(score_file)
    if not path.is_file():
        raise MergeflowError(f"{path}: no per-doc results beside {score_file} (needed to check its docs)")
    return {json.loads(line)["doc_id"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def select(candidates: list[tuple[str, dict]], scores: dict[tuple[str, str], Path], references: list[str],
           benchmarks: list[str], rule: str, splits: dict[str, Path] | None = None,
           headline: dict | None = None) -> dict:
    """Pick one grid value by `rule` from validation score files {(model, benchmark): path}.
    Candidates are (merge id, params); candidates with equal params are the seed replicates of
    one value (merges[].seeds), and a value's objective is the mean of theirs. mean: the mean
    over benchmarks of the headline score; mean_normalised: the mean over benchmarks of score /
    reference, the reference being the best of `references` on that benchmark (one model: the
    base; several: the experts), benchmarks with a zero reference left out. Ties go to the
    first value. `selected_ids` are the chosen value's merge ids (one per seed). With `splits`
    ({benchmark: split record}), a score file holding any doc outside that benchmark's
    validation ids is refused: the selection never reads a test-set number."""
    if rule not in RULES:
        raise MergeflowError(f"select rule {rule!r}: expected one of {', '.join(RULES)}")
    if not candidates:
        raise MergeflowError("select: no candidates")
    if rule == "mean_normalised" and not references:
        raise MergeflowError("select rule mean_normalised: no reference model to normalise by")
    opened = []
    allowed = {}
    for bench, path in (splits or {}).items():
        allowed[bench] = set(json.loads(Path(path).read_text(encoding="utf-8"))["validation"])
        opened.append(str(path))

    def value(model: str, bench: str) -> float:
        path = scores.get((model, bench))
        if path is None:
            raise MergeflowError(f"select: no validation score of {model} on {bench}")
        if bench in allowed:
            outside = _scored_doc_ids(path) - allowed[bench]
            if outside:
                raise MergeflowError(f"{path}: {len(outside)} doc(s) not in {bench}'s validation split "
                                     f"(e.g. {sorted(outside)[0]!r}): a selection reads validation scores only")
        opened.append(str(path))
        return _headline_value(path, bench, headline)

    refs = {b: max(value(m, b) for m in references) for b in benchmarks} if references else {}
    used = [b for b in benchmarks if rule == "mean" or refs[b] > 0]
    skipped = [b for b in benchmarks if b not in used]
    rows = []
    for merge_id, params in candidates:
        per_bench = {b: value(merge_id, b) for b in benchmarks}
        parts = [per_bench[b] / refs[b] if rule == "mean_normalised" else per_bench[b] for b in used]
        rows.append({"merge_id": merge_id, "params": params, "scores": per_bench,
                     "objective": sum(parts) / len(parts) if parts else None})
    values: dict[str, dict] = {}  # canonical params -> the value's seed replicates, grid order
    for r in rows:
        key = json.dumps(r["params"], sort_keys=True)
        values.setdefault(key, {"params": r["params"], "merge_ids": [], "objectives": []})
        values[key]["merge_ids"].append(r["merge_id"])
        values[key]["objectives"].append(r["objective"])
    for v in values.values():
        objs = v.pop("objectives")
        v["objective"] = None if None in objs else sum(objs) / len(objs)
    scored = [v for v in values.values() if v["objective"] is not None]
    if not scored:
        raise MergeflowError(f"select rule {rule}: every reference score is 0 on {skipped}; nothing to normalise "
                             "(use rule: mean)")
    best = max(scored, key=lambda v: v["objective"])  # max keeps the first of equal objectives
    return {"rule": rule, "references": {m: {b: value(m, b) for b in benchmarks} for m in references},
            "normaliser": refs, "skipped_benchmarks": skipped, "benchmarks": list(benchmarks),
            "candidates": rows, "values": list(values.values()), "selected": best["merge_ids"][0],
            "selected_ids": best["merge_ids"], "selected_params": best["params"],
            "opened": list(dict.fromkeys(opened))}


# --- CLI ---------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    if "split" in subparsers.choices:  # one module, two STAGES entries (cli.py)
        return
    p = subparsers.add_parser(
        "split", help="split a benchmark into validation and test (seeded, or its own validation data)",
        description="Writes the validation and test rows of one benchmark and a record of the split "
        "(seed, source, the doc ids of each side).")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--data", type=Path, required=True, help="the benchmark's rows (resources/data/<b>.jsonl)")
    p.add_argument("--own-validation", type=Path, help="the dataset's own validation rows (else a seeded split)")
    p.add_argument("--fraction", type=float, default=SPLIT_DEFAULTS["fraction"],
                   help="share of rows for validation in a seeded split")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--validation-out", type=Path, required=True)
    p.add_argument("--test-out", type=Path, required=True)
    p.add_argument("--record-out", type=Path, required=True, help="the split's record (JSON: seed, doc ids)")
    p.set_defaults(func=run_split)

    s = subparsers.add_parser(
        "select", help="pick one grid member of a sweep from validation scores",
        description="Reads validation score files only (checked against the splits' validation doc ids) and "
        "writes the selection: the rule, every candidate's objective, the selected merge id and params.")
    s.add_argument("--sweep", required=True, help="the sweep's name (recorded)")
    s.add_argument("--grid", default="{}", help="the swept grid as JSON (recorded)")
    s.add_argument("--candidate", nargs=2, action="append", required=True, metavar=("MERGE_ID", "PARAMS_JSON"))
    s.add_argument("--score", nargs=3, action="append", required=True, metavar=("MODEL", "BENCHMARK", "FILE"),
                   help="a validation score file")
    s.add_argument("--reference", action="append", default=[], help="a model normalising the scores")
    s.add_argument("--split", nargs=2, action="append", default=[], metavar=("BENCHMARK", "RECORD"),
                   help="a split record: score files must hold validation docs only")
    s.add_argument("--benchmarks", nargs="+", required=True)
    s.add_argument("--rule", default=SELECT_DEFAULTS["rule"], choices=RULES)
    s.add_argument("--normalise-by", default=SELECT_DEFAULTS["normalise_by"], choices=NORMALISERS)
    s.add_argument("--headline", default="{}", help="aggregate.headline as JSON: benchmark -> metric")
    s.add_argument("--out", type=Path, required=True)
    s.set_defaults(func=run_select)


def run_split(args) -> int:
    rec = split_benchmark(args.benchmark, args.data, args.validation_out, args.test_out, args.record_out,
                          args.fraction, args.seed, args.own_validation)
    print(f"{args.benchmark}: {len(rec['validation'])} validation, {len(rec['test'])} test docs "
          f"({rec['source']['kind']})")
    return 0


def run_select(args) -> int:
    from mergeflow.config import parse_settings

    candidates = [(m, parse_settings(p, "--candidate PARAMS_JSON")) for m, p in args.candidate]
    scores = {(m, b): Path(f) for m, b, f in args.score}
    result = select(candidates, scores, args.reference, args.benchmarks, args.rule,
                    {b: Path(f) for b, f in args.split}, parse_settings(args.headline, "--headline"))
    result = {"sweep": args.sweep, "grid": parse_settings(args.grid, "--grid"), "normalise_by":
              args.normalise_by if args.rule != "mean" else None, **result}
    atomic.write_text(args.out, json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"{args.sweep}: selected {' '.join(result['selected_ids'])} "
          f"{json.dumps(result['selected_params'], sort_keys=True)}")
    return 0


# --- tables ------------------------------------------------------------------------------


def _values(params: dict, grid: dict) -> str:
    return ", ".join(f"{k} = {params.get(k)}" for k in grid)


def write_selection_tables(selection_files: list[Path], out_dir: Path) -> list[Path]:
    """results/tables/selection.md (per sweep: the grid, the rule, each value's validation
    objective, the selected one), and a line under the merge table of the sweep's experts
    (merges_<experts>.md, when it exists) saying which value was selected from which grid."""
    if not selection_files:
        return []
    out_dir = Path(out_dir)
    lines = ["# Validation-selected hyperparameters", "",
             "Each sweep's members were scored on the validation split only; the rule picked one, and only it was "
             "evaluated on the test split (the other tables). Source: results/selection/*.json.", ""]
    notes: dict[Path, list[str]] = {}
    for path in selection_files:
        sel = json.loads(Path(path).read_text(encoding="utf-8"))
        rule = sel["rule"] + (f" (normalised by {sel['normalise_by']})" if sel.get("normalise_by") else "")
        grid = "; ".join(f"{k} ∈ {v}" for k, v in sel["grid"].items())
        lines += [f"## {sel['sweep']}", "", f"Grid: {grid}. Rule: {rule}, over {', '.join(sel['benchmarks'])}"
                  + (f"; left out (reference 0): {', '.join(sel['skipped_benchmarks'])}" if sel["skipped_benchmarks"]
                     else "") + ".", "",
                  "| value | merge id | " + " | ".join(f"{b} (val.)" for b in sel["benchmarks"])
                  + " | objective | value's objective (mean over seeds) | selected |",
                  "|---|---|" + "---|" * len(sel["benchmarks"]) + "---|---|---|"]
        chosen = set(sel.get("selected_ids", [sel["selected"]]))
        of_value = {m: v["objective"] for v in sel.get("values", []) for m in v["merge_ids"]}
        for cand in sel["candidates"]:
            obj = "—" if cand["objective"] is None else f"{cand['objective']:.4f}"
            vobj = of_value.get(cand["merge_id"], cand["objective"])
            lines.append(f"| {_values(cand['params'], sel['grid'])} | {cand['merge_id']} | "
                         + " | ".join(f"{100 * cand['scores'][b]:.1f}" for b in sel["benchmarks"])
                         + f" | {obj} | {'—' if vobj is None else f'{vobj:.4f}'} | "
                         + f"{'✓' if cand['merge_id'] in chosen else ''} |")
        lines.append("")
        # a merge id is <method>-<experts joined by +>-<digest>; method names have no "-"
        experts = sel["selected"].rsplit("-", 1)[0].split("-", 1)[-1]
        target = out_dir / f"merges_{experts.replace('+', '_')}.md"
        if target.is_file():
            notes.setdefault(target, []).append(
                f"Validation-selected: {', '.join(sorted(chosen))} ({_values(sel['selected_params'], sel['grid'])}) from grid "
                f"{grid}, rule {rule}; no other grid value was evaluated on test (selection.md).")
    path = out_dir / "selection.md"
    atomic.write_text(path, "\n".join(lines))
    for target, extra in notes.items():
        atomic.write_text(target, target.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + "\n".join(extra) + "\n")
    return [path]
