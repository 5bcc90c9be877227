"""`sqa-search calibrate`: time attention layers here and fit a hardware profile to them.

Parsing and printing only; the work is `sqa_search.speed.calibrate.calibrate_from_measurements`.
``python -m sqa_search.speed.calibrate`` runs this same command.
"""

from __future__ import annotations

import argparse

from ..speed.workload import MODES  # light: no torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="cpu-generic", help="the profile to calibrate (default cpu-generic)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: train,prefill,decode")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration and pass (default 3)")
    parser.add_argument("--passes", type=int, default=3, help="passes over all configurations (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads while timing (default 1)")
    parser.add_argument("--clock", default="auto", choices=("auto", "wall", "thread"),
                        help="auto: this thread's CPU time on a CPU with one thread, else the wall clock")
    parser.add_argument("--save", action="store_true",
                        help="write the calibrated profile to the user profile directory, where it is found first, "
                             "with its timings (raw and speed-corrected) beside it")
    parser.add_argument("--list", action="store_true", help="list the known profiles and exit")


def run(args) -> int:
    # lazy: the calibration times layers with torch, which --help must not import
    from ..speed.calibrate import calibrate_from_measurements
    from ..speed.hardware import list_profiles, load_profile, user_profile_dir

    if args.list:
        for name in list_profiles():
            prof = load_profile(name)
            print(f"{name:14s} {prof.display_name}  [{prof.calibration_label}]")
        return 0
    profile, report, _ = calibrate_from_measurements(
        args.profile, modes=tuple(m for m in args.modes.split(",") if m), dtype=args.dtype, device=args.device,
        repeats=args.repeats, passes=args.passes, threads=args.threads, clock=args.clock, save=args.save)
    print(report.summary())
    if args.save:
        folder = user_profile_dir()
        print(f"saved to {folder / (profile.name + '.yaml')}; the timings it was fitted to (raw and "
              f"speed-corrected seconds, clock, machine reference) in {folder / profile.calibration['timings_file']}")
    return 0
