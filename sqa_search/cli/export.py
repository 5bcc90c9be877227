"""`sqa-search export`: parse the flags, export a study's trial (`export_trial`) or a spec given
directly (`export_layer`), print what was written."""

from __future__ import annotations

import argparse

from ..decide.errors import ExportError
from ..decide.export import export_layer, export_trial
from ..decide.layer_source import DEFAULT_MODULE
from ..decide.load import WEIGHTS_FILE
from ..decide.parse import PICK_HELP, parse_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("which configuration (one of --trial, --pick, --spec)")
    what.add_argument("--study", help="a study folder, e.g. studies/quickstart (with --trial or --pick)")
    what.add_argument("--trial", type=int, help="the study's trial number to export")
    # argparse %-formats help strings: the rule's "X%" must be escaped or --help crashes
    what.add_argument("--pick", help=f"a rule over the study's complete trials: {PICK_HELP.replace('%', '%%')}")
    what.add_argument("--spec", help="a spec given directly: a variant name (sqa, ssqa, swsqa, ...), "
                                     "'q/kv[/W[/G]]', or a JSON object of AttentionSpec fields")
    spec = parser.add_argument_group("with --spec")
    spec.add_argument("--d-model", type=int, default=None, help="model width (default 256, the SQA paper's)")
    spec.add_argument("--heads", type=int, default=None, help="baseline heads H (default 16)")
    spec.add_argument("--window", type=int, default=None, help="sliding window W")
    spec.add_argument("--n-global", type=int, default=None, help="learned global tokens (with a window)")
    spec.add_argument("--bidirectional", action="store_true", help="an encoder layer (default causal)")
    spec.add_argument("--bias", action="store_true", help="projections with biases")
    spec.add_argument("--no-rope", action="store_true", help="no rotary position embedding")
    parser.add_argument("--out", required=True, help="folder to write the module, config, weights and README into")
    parser.add_argument("--module-name", default=DEFAULT_MODULE, help=f"module file name (default {DEFAULT_MODULE})")
    w = parser.add_argument_group("weights")
    w.add_argument("--weights", action="store_true",
                   help=f"write {WEIGHTS_FILE}: freshly initialised (--seed), since studies do not save weights")
    w.add_argument("--weights-from", metavar="FILE", help="write the weights from this state_dict file (a layer's, "
                                                          "or a whole model's with --weights-prefix)")
    w.add_argument("--weights-prefix", help="key prefix of the layer in --weights-from, e.g. blocks.0.attn.")
    w.add_argument("--seed", type=int, default=0, help="seed of fresh weights (default 0)")


def run(args) -> int:
    chosen = [name for name in ("trial", "pick", "spec") if getattr(args, name) is not None]
    if len(chosen) != 1:
        raise ExportError("choose the configuration with exactly one of --study S --trial N, "
                          "--study S --pick RULE or --spec SPEC" + (f" (got {', '.join('--' + c for c in chosen)})"
                                                                    if chosen else ""))
    kwargs = dict(weights=args.weights_from, weights_prefix=args.weights_prefix,
                  with_weights=args.weights, seed=args.seed, module_name=args.module_name)
    if args.spec is not None:
        if args.study:
            raise ExportError("--spec is given directly: drop --study (or use --trial / --pick with it)")
        spec = parse_spec(args.spec, d_model=args.d_model, n_heads=args.heads, window=args.window,
                          n_global=args.n_global, causal=False if args.bidirectional else None,
                          bias=True if args.bias else None, rope=False if args.no_rope else None)
        result = export_layer(spec, args.out, **kwargs)
    else:
        if not args.study:
            raise ExportError(f"--{chosen[0]} needs --study S (a study folder)")
        result = export_trial(args.study, args.out, trial=args.trial, pick=args.pick, **kwargs)
    print(result.summary())
    print(f"  chosen: {result.source.get('chosen_by', result.source.get('origin'))}")
    if result.weights_path is None:
        print("  no weights written (add --weights or --weights-from FILE)")
    return 0
