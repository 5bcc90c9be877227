"""`sqa-search show`: print a study's trials and Pareto set; write its CSV, plots and report."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", help="a study folder, e.g. studies/quickstart")
    parser.add_argument("--out", help="where to write CSV, parquet, plots and report (default: the study folder)")
    parser.add_argument("--all", action="store_true", help="print every trial, not only the Pareto set")


def run(args) -> int:
    # pandas and optuna load here, once the command runs, so `sqa-search show --help` is instant
    import pandas as pd

    from ..search.halving import halving_summary
    from ..search.records import read_records
    from ..search.report import front_columns, pareto_table, write_report
    from ..search.samplers import distinct_configurations
    from ..search.studies import open_study

    handle = open_study(args.study)
    frame, front, hv = pareto_table(handle)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 40):
        if args.all:
            print(frame.drop(columns=["datetime_start"]).to_string(index=False))
            print()
        promotions = int(frame.promoted_from.notna().sum())
        print(f"Pareto set of {handle.space.name} ({(frame.state == 'COMPLETE').sum()} complete trials"
              f"{f' ({promotions} of them halving promotions)' if promotions else ''}, "
              f"{distinct_configurations(read_records(handle.study))} distinct configurations evaluated, "
              f"hypervolume {hv:.4g}):")
        if handle.space.study.halving is not None:
            print(halving_summary(read_records(handle.study), handle.space))
        print(front_columns(front, handle.space).to_string(index=False) if not front.empty else "(no complete trial)")
    written = write_report(handle, Path(args.out) if args.out else None)
    print(f"\nwritten: {', '.join(str(p) for k, v in written.items() for p in (v if isinstance(v, list) else [v]))}")
    return 0
