"""`mergeflow aggregate`: score files + merge metadata -> tidy table, tables, plots."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("aggregate", help="tidy scores table, paper-style tables and plots")
    p.add_argument("--scores", nargs="+", required=True, type=Path, help="score JSON files")
    p.add_argument("--merges", nargs="*", default=[], type=Path, help="merge output dirs (or their metadata JSON)")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--config", type=Path, help="the experiment config (YAML)")
    given.add_argument("--settings", help="the config's aggregate slice (mergeflow.config.aggregate_settings) as "
                                          "JSON or a JSON file: what the workflow passes")
    p.add_argument("--agreement", nargs="*", default=[], type=Path,
                   help="judge agreement files (mergeflow judge agreement) for tables/judge_agreement.md")
    p.add_argument("--selection", nargs="*", default=[], type=Path,
                   help="results/selection/<sweep>.json of validation-selected sweeps (tables/selection.md)")
    p.add_argument("--out", required=True, type=Path, help="tidy CSV to write (Parquet goes beside it)")
    p.add_argument("--tables", required=True, type=Path, help="directory for Markdown/LaTeX tables")
    p.add_argument("--plots", type=Path, help="directory for figures (PNG)")
    p.set_defaults(func=run)


def run(args) -> int:
    from mergeflow import config as mfconfig
    from mergeflow.aggregate.agreement import write_agreement_table
    from mergeflow.aggregate.compare import claims_table, load_published, write_comparisons
    from mergeflow.aggregate.della import is_della_layout, table1_claims, write_della_tables
    from mergeflow.aggregate.tables import add_judge_note, judge_note, write_robustness, write_tables
    from mergeflow.aggregate.tidy import tidy_table

    config = mfconfig.aggregate_settings(mfconfig.load(args.config) if args.config
                                         else mfconfig.parse_settings(args.settings))
    frame = tidy_table(args.scores, args.merges, config)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    frame.to_parquet(args.out.with_suffix(".parquet"), index=False)
    from mergeflow.aggregate.uncertainty import score_file_per_doc

    per_doc = {}
    for path in args.scores:
        per_doc.update(score_file_per_doc(path))
    written = write_tables(frame, args.tables, per_doc, config["aggregate"])
    written += write_robustness(frame, args.tables)
    paths = [Path(p) for p in config["aggregate"]["published"]]
    della_paths = [p for p in paths if is_della_layout(p)]  # per-table cells (config/published/README.md)
    published = load_published([p for p in paths if p not in della_paths])
    written += write_comparisons(frame, published, args.tables)
    written += write_della_tables(frame, config, della_paths, args.tables)
    written += write_agreement_table(args.agreement, args.tables)
    if config["aggregate"]["claims"]:
        claims = claims_table(frame, Path(config["aggregate"]["claims"]))
        claims = table1_claims(claims, Path(config["aggregate"]["claims"]), frame, config, della_paths)
        path = args.tables / "claims.md"
        path.write_text("# Abstract-level claims: ours vs published (points)\n\n" + claims.round(2).to_markdown(index=False) + "\n")
        written.append(path)
    add_judge_note(written, judge_note(frame, config["judge"].get("paper")))
    from mergeflow.selection import write_selection_tables

    written += write_selection_tables(args.selection, args.tables)
    if args.plots:
        from mergeflow.aggregate.plots import write_plots

        written += write_plots(frame, args.plots)
    print(f"scores: {args.out} and {args.out.with_suffix('.parquet')} ({len(frame)} rows)")
    for path in written:
        print(f"wrote:  {path}")
    return 0
