"""The `sqa-search` command. Each subcommand lives in its own module, which is imported only
when that subcommand runs, so `--help` is instant."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Each module has add_arguments(parser) and run(args).
SUBCOMMANDS = {
    "run": ("sqa_search.study", "run (or resume, or extend) a search study from a search-space YAML"),
    "show": ("sqa_search.report", "show a study's trials, Pareto set and hypervolume; write CSV, plots, report"),
    "recommend": ("sqa_search.recommend", "recommend a head configuration for a target hardware, sequence length and workload"),
    "export": ("sqa_search.export", "export a configuration as a standalone PyTorch module, a config and a README"),
    "bench": ("sqa_search.bench", "time the named variants across sequence lengths (the SQA paper's Table 3 for your hardware)"),
    "doctor": ("sqa_search.doctor", "check every attention path, kernel and the timing on this device before a long study"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sqa-search",
        description="Search and auto-tune Sparse Query Attention head configurations for your model and hardware.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # the module's own options are added lazily in main(), once we know it runs
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in SUBCOMMANDS:
        module_name, help_text = SUBCOMMANDS[argv[0]]
        module = importlib.import_module(module_name)
        sub = argparse.ArgumentParser(prog=f"sqa-search {argv[0]}", description=help_text)
        module.add_arguments(sub)
        args = sub.parse_args(argv[1:])
        return int(module.run(args) or 0)
    args = parser.parse_args(argv)
    parser.print_help()
    return 0 if args.command is None else 2


if __name__ == "__main__":
    sys.exit(main())
