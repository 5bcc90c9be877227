"""`sqa-search run`: run (or resume, or extend) a study, then print its front and write its report."""

from __future__ import annotations

from pathlib import Path

DEFAULT_STUDIES_DIR = Path("studies")  # the same as search.studies.DEFAULT_STUDIES_DIR (not imported: --help stays fast)


def add_arguments(parser) -> None:
    parser.add_argument("space", help="a search-space YAML, e.g. search_spaces/quickstart.yaml")
    parser.add_argument("--name", help="study name (default: the YAML's name); studies/<name>/")
    parser.add_argument("--trials", type=int, help="finished trials the study should reach (default: the YAML's)")
    parser.add_argument("--storage", help="an Optuna storage URL (postgresql://..., mysql://..., sqlite:///...); "
                                          "default: SQLite under studies/<name>/ (a journal file with --workers > 1)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this host (default 1)")
    parser.add_argument("--backend", choices=["optuna", "ray"], default="optuna",
                        help="optuna: embedded (default); ray: Ray Tune, on a local instance or a cluster")
    parser.add_argument("--address", help="with --backend ray: HEAD_IP:PORT of an existing Ray cluster")
    parser.add_argument("--cpus-per-trial", type=float, default=1, help="with --backend ray (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=None,
                        help="with --backend ray: default one whole GPU when a trial runs on a GPU; "
                             "fractions are refused for timing trials")
    parser.add_argument("--max-concurrent", type=int, default=None, help="with --backend ray (default: what fits, <= 4)")
    parser.add_argument("--max-retries", type=int, default=2, help="with --backend ray: retries of a crashed trial")
    parser.add_argument("--studies-dir", default=str(DEFAULT_STUDIES_DIR), help="where studies live (default studies/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    # optuna, pandas and ray load here, once the command runs, so `sqa-search run --help` is instant
    from ..search.report import front_columns, pareto_table, study_latency_kind, write_report
    from ..search.storage import StudyError

    if args.backend == "ray":
        if args.workers != 1:
            raise StudyError(f"--workers={args.workers} is not allowed with --backend ray: Ray schedules "
                             f"the trials (use --max-concurrent)")
        from ..search.ray_backend import run_ray_study

        handle = run_ray_study(args.space, name=args.name, trials=args.trials, storage=args.storage,
                               studies_dir=args.studies_dir, address=args.address,
                               cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                               max_concurrent=args.max_concurrent, max_retries=args.max_retries,
                               progress=not args.no_progress)
    else:
        if args.address:
            raise StudyError(f"--address={args.address!r} is only for --backend ray")
        from ..search.engine import run_study

        handle = run_study(args.space, name=args.name, trials=args.trials, storage=args.storage,
                           workers=args.workers, studies_dir=args.studies_dir, progress=not args.no_progress)
    write_report(handle)
    frame, front, hv = pareto_table(handle)
    print(f"\nPareto front of {handle.space.name} (hypervolume {hv:.4g}; latency "
          f"{study_latency_kind(handle) or 'none yet'}):")
    print(front_columns(front, handle.space).to_string(index=False) if not front.empty else "(no complete trial)")
    if handle.space.study.halving is not None:
        from ..search.halving import halving_summary
        from ..search.records import read_records

        print(halving_summary(read_records(handle.study), handle.space))
    print(f"\nreport: {handle.directory / 'report.md'}")
    return 0
