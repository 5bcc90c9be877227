"""`sqa-search doctor`: parsing and printing; the checks are `sqa_search.speed.doctor.run_doctor`."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--dtype", default=None,
                        help="comma-separated dtypes to check (default: CPU float32,bfloat16; "
                             "CUDA float16,bfloat16,float32)")
    parser.add_argument("--quick", action="store_true", help="one case per path, the first dtype only")
    parser.add_argument("--json", metavar="FILE", help="also write every row and the summary as JSON")


def run(args) -> int:
    import torch  # lazy: --help must not import torch

    from ..speed.doctor import TOLERANCES, resolve, run_doctor

    dev, _ = resolve(args.device, args.dtype)  # bad flags fail before anything runs
    if args.json:  # so is a JSON path that cannot be written: not after a whole run
        Path(args.json).open("a").close()
    t0 = time.perf_counter()
    rows = run_doctor(args.device, args.dtype, args.quick,
                      log=lambda r: print(f"  {r.status:4s} {r.check} [{r.dtype} {r.mode}] {r.backend}", flush=True))
    summary = _summary(rows, dev, time.perf_counter() - t0)
    print()
    print(_table(rows))
    print(summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "device": str(dev), "torch": torch.__version__,
                                               "tolerances": TOLERANCES, "rows": [asdict(r) for r in rows]},
                                              indent=1))
    return 1 if any(r.status == "FAIL" for r in rows) else 0


def _table(rows) -> str:
    from tabulate import tabulate

    def fmt(x):
        return "" if x is None else f"{x:.1e}"

    return tabulate([[r.status, r.check, r.spec, r.dtype, r.mode, r.backend, fmt(r.error), fmt(r.tolerance), r.note]
                     for r in rows],
                    headers=["", "check", "spec", "dtype", "mode", "ran", "error", "tol", "note"])


def _summary(rows, device, seconds: float) -> str:
    import torch

    counts = {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "WARN", "SKIP")}
    verdict = "FAILED" if counts["FAIL"] else "ok"
    return (f"doctor {verdict}: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['WARN']} warnings, "
            f"{counts['SKIP']} skipped on {device} (torch {torch.__version__}) in {seconds:.0f} s")
