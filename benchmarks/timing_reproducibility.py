"""Do separate runs of `sqa-search bench` agree? Runs it several times, each in its own process.

    python benchmarks/timing_reproducibility.py --runs 3 --seq-lens 1024,4096 \
        --variants mha,gqa,sqa,xsqa --mode prefill --out benchmarks/<date>-cpu-reproducibility

For every point it prints the median of each run, corrected (what the bench reports) and raw
(what the clock said), their spread (largest / smallest - 1) and whether the variants kept the
same order in every run; it writes that table as CSV beside each run's own bench output.
Extra arguments after ``--`` go to the bench unchanged (e.g. ``-- --no-speed-correction``).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path


def _run_bench(i: int, out: Path, args, extra: list[str]) -> Path:
    run_dir = out / f"run{i}"
    cmd = [sys.executable, "-m", "sqa_search.cli", "bench", "--mode", args.mode, "--seq-lens", args.seq_lens,
           "--variants", args.variants, "--threads", str(args.threads), "--no-cache", "--no-progress",
           "--out", str(run_dir), *extra]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (out / f"run{i}.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"run {i} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    print(f"run {i}: {time.time() - started:.0f} s", file=sys.stderr)
    (csv_path,) = run_dir.glob("bench-*.csv")
    return csv_path


def _spread(values: list[float]) -> float:
    return max(values) / min(values) - 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mode", default="prefill", choices=("prefill", "train", "decode"))
    parser.add_argument("--seq-lens", default="1024,4096")
    parser.add_argument("--variants", default="mha,gqa,sqa,xsqa")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="directory for each run's bench output and the summary")
    parser.add_argument("--reuse", action="store_true", help="summarise the runs already in --out, run nothing")
    args = parser.parse_args(argv)
    if args.runs < 2:
        parser.error(f"--runs: {args.runs} is not allowed: need at least 2 runs to compare")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def run_csv(i: int) -> Path:
        if args.reuse:
            (found,) = (out / f"run{i}").glob("bench-*.csv")
            return found
        return _run_bench(i, out, args, extra)

    runs = [list(csv.DictReader(open(run_csv(i + 1)))) for i in range(args.runs)]
    rows, orders = [], {}
    for j, point in enumerate(runs[0]):
        seconds = [float(run[j]["seconds"]) for run in runs]
        raw = [float(run[j]["raw_seconds"]) for run in runs]
        rows.append({"seq_len": int(point["seq_len"]), "label": point["label"], "mode": point["mode"],
                     **{f"run{i + 1}_s": s for i, s in enumerate(seconds)}, "spread": _spread(seconds),
                     **{f"run{i + 1}_raw_s": s for i, s in enumerate(raw)}, "raw_spread": _spread(raw)})
    for n in sorted({r["seq_len"] for r in rows}):
        at_n = [(j, p) for j, p in enumerate(runs[0]) if int(p["seq_len"]) == n]
        orders[n] = [tuple(p["label"] for _, p in sorted(at_n, key=lambda jp: -float(run[jp[0]]["seconds"])))
                     for run in runs]

    runs_head = "  ".join(f"{f'run{i + 1}':>8s}" for i in range(args.runs))
    print(f"{'N':>6}  {'variant':13s}  {runs_head}  spread | raw: {runs_head}  spread   (milliseconds per step)")
    for r in rows:
        runs_s = "  ".join(f"{r[f'run{i + 1}_s'] * 1e3:8.4g}" for i in range(args.runs))
        raw_s = "  ".join(f"{r[f'run{i + 1}_raw_s'] * 1e3:8.4g}" for i in range(args.runs))
        print(f"{r['seq_len']:>6}  {r['label']:13s}  {runs_s}  {r['spread']:6.1%} | raw: {raw_s}  {r['raw_spread']:6.1%}")
    worst = max(rows, key=lambda r: r["spread"])
    print(f"largest spread of the reported medians: {worst['spread']:.1%} ({worst['label']}, N={worst['seq_len']}); "
          f"raw: {max(r['raw_spread'] for r in rows):.1%}")
    for n, per_run in orders.items():
        same = all(o == per_run[0] for o in per_run)
        print(f"N={n}: order slowest->fastest {' > '.join(per_run[0])}: "
              f"{'the same in every run' if same else 'CHANGED: ' + ' | '.join(' > '.join(o) for o in per_run)}")
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out / 'summary.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
