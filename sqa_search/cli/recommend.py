"""`sqa-search recommend`: parse the flags, call `sqa_search.decide.recommend.recommend`, print the
recommendation (or its JSON) and, with --export, what was exported."""

from __future__ import annotations

import argparse
import json
import sys

from ..decide.export import export_recommendation
from ..decide.recommend import recommend
from ..speed.workload import MODES, SCOPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hardware", default="local",
                        help="a cost-model profile (h100-sxm, a100-80gb, ...; aliases h100, a100; or a .yaml) or "
                             "'local' for the device at hand (default local)")
    parser.add_argument("--seq-len", default=None, help="sequence length N; k = 1024 (32k). Default: the study's")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="train (forward+backward), prefill (forward) or decode (one token against a cache "
                             "of N). Default: the study's, else prefill")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the study's, else 1)")
    parser.add_argument("--tolerance", default="1%",
                        help="loss increase allowed, relative: 1%% or 0.01 (default 1%%)")
    parser.add_argument("--tolerance-vs", choices=("mha", "best"), default="mha",
                        help="the loss the tolerance is taken against: MHA's (default) or the best candidate's")
    parser.add_argument("--max-kv-cache", default=None, metavar="BYTES",
                        help="KV-cache budget of the whole model at N (e.g. 1073741824, 1GiB, 512MB)")
    parser.add_argument("--max-latency", default=None, metavar="SECONDS",
                        help="latency budget per step (e.g. 0.05, 50ms)")
    parser.add_argument("--study", default=None, help="a study folder to draw losses (and timings) from")
    parser.add_argument("--d-model", type=int, default=None, help="without a study: model width (default 256)")
    parser.add_argument("--heads", type=int, default=None, help="without a study: baseline heads H (default 16)")
    parser.add_argument("--layers", type=int, default=None, help="without a study: layers (default 8)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16, float16 (default: the study's when measured; bfloat16 on GPU "
                             "profiles, float32 on CPU)")
    parser.add_argument("--what", choices=SCOPES, default=None,
                        help="what the speed figures cover (default: the study's, else the whole model)")
    parser.add_argument("--device", default=None, help="with --hardware local: cpu, cuda, cuda:N (default auto)")
    parser.add_argument("--alternatives", type=int, default=3, help="runners-up to list (default 3)")
    parser.add_argument("--json", action="store_true", help="print the structured result as JSON")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="also export the recommended configuration into DIR (see sqa-search export)")


def run(args) -> int:
    result = recommend(
        args.hardware, seq_len=args.seq_len, mode=args.mode, batch=args.batch, tolerance=args.tolerance,
        tolerance_vs=args.tolerance_vs, max_kv_cache_bytes=args.max_kv_cache, max_latency_s=args.max_latency,
        study=args.study, d_model=args.d_model, n_heads=args.heads, n_layers=args.layers, dtype=args.dtype,
        what=args.what, device=args.device, n_alternatives=args.alternatives)
    exported = export_recommendation(result, args.export) if args.export else None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(result.render())
    if exported is not None:
        print(("" if args.json else "\n") + exported.summary(), file=sys.stderr if args.json else sys.stdout)
    return 0
