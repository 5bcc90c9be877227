"""The cost model's peak-memory prediction against the timing's measured peak, on this machine.

    python benchmarks/memory_model.py [--seq-lens 1024,4096] [--d-model 256] [--heads 16]

Prints one row per (mode, scope, variant, N): measured peak (the timing harness's figure), predicted
(`sqa_search.speed.cost.peak_memory` on the path the layer took) and the relative error, then the
median and largest absolute error. The timing is measured with a tiny time budget: only its memory
figure is used here."""

from __future__ import annotations

import argparse
import statistics

from sqa_search.layer.spec import AttentionSpec
from sqa_search.speed.cost import peak_memory
from sqa_search.speed.timing import time_spec
from sqa_search.speed.workload import Workload


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="1024,4096")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--variants", default="mha,sqa,xsmqa")
    parser.add_argument("--layers", type=int, default=2, help="blocks of the proxy model for the model scope")
    args = parser.parse_args(argv)
    errors = []
    print(f"{'mode':8} {'scope':6} {'variant':18} {'N':>6} {'measured':>12} {'predicted':>12} {'error':>7}  backend")
    for mode in ("prefill", "train", "decode"):
        for scope in ("layer", "model"):
            for variant in args.variants.split(","):
                spec = AttentionSpec.variant(variant, d_model=args.d_model, n_heads=args.heads)
                for n in map(int, args.seq_lens.split(",")):
                    workload = Workload(mode, n, scope=scope, n_layers=args.layers, threads=1)
                    result = time_spec(spec, workload, budget_s=0.05, use_cache=False)
                    path = "sdpa-masked" if (result.backend or "").startswith("sdpa-masked") else "sdpa"
                    predicted = peak_memory(spec, workload, path=path)
                    error = predicted / result.peak_mem_bytes - 1
                    errors.append(abs(error))
                    print(f"{mode:8} {scope:6} {spec.label:18} {n:>6} {result.peak_mem_bytes / 2**20:>10.1f}MB "
                          f"{predicted / 2**20:>10.1f}MB {error:>+7.0%}  {result.backend}")
    print(f"absolute error over {len(errors)} points: median {statistics.median(errors):.0%}, "
          f"largest {max(errors):.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
