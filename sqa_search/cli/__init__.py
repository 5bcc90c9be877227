"""The `sqa-search` command. Each subcommand lives in its own module here (parsing and printing
only), which is imported only when that subcommand runs, so `--help` is instant.

Errors: a user's mistake (a `UserError` from any module, a `SpecError`, a bad flag, a path that
cannot be read or written) is printed as one line, ``sqa-search CMD: error: ...``, and exits 2;
anything else is a bug in sqa-search and says so in one line with exit 1. ``--debug`` (anywhere
on the command line) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Each module has add_arguments(parser) and run(args).
SUBCOMMANDS = {
    "run": ("sqa_search.cli.run", "run (or resume, or extend) a search study from a search-space YAML"),
    "show": ("sqa_search.cli.show", "show a study's trials, Pareto set and hypervolume; write CSV, plots, report"),
    "recommend": ("sqa_search.cli.recommend", "recommend a head configuration for a target hardware, sequence length and workload"),
    "export": ("sqa_search.cli.export", "export a configuration as a standalone PyTorch module, a config and a README"),
    "bench": ("sqa_search.cli.bench", "time the named variants across sequence lengths (the SQA paper's Table 3 for your hardware)"),
    "doctor": ("sqa_search.cli.doctor", "check every attention path, kernel and the timing on this device before a long study"),
    "calibrate": ("sqa_search.cli.calibrate", "time attention layers here and calibrate a cost-model hardware profile"),
}

DEBUG_FLAG = "--debug"
EXIT_USER_ERROR = 2
EXIT_BUG = 1


class _OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one line (which option, which value, where to read what is allowed)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="sqa-search",
        description="Search and auto-tune Sparse Query Attention head configurations for your model and hardware.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show the full traceback of an error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # the module's own options are added lazily in main(), once we know it runs
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..errors import UserError
    from ..layer.spec import SpecError  # a plain ValueError: spec.py is inlined into exported modules

    # OSError: a path the user named cannot be read or written (missing, a folder, no permission).
    return (UserError, SpecError, OSError)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    if not argv or argv[0] not in SUBCOMMANDS:
        parser = build_parser()
        parser.parse_args(argv)  # --help and --version exit here, and so does an unknown command (exit 2)
        parser.print_help()
        return 0

    command = argv[0]
    module_name, help_text = SUBCOMMANDS[command]
    module = importlib.import_module(module_name)
    prog = f"sqa-search {command}"
    sub = _OneLineParser(prog=prog, description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:  # a bug: say so in one line, keep the traceback for --debug
        if debug:
            raise
        print(f"{prog}: internal error (a bug in sqa-search, please report it): {type(exc).__name__}: "
              f"{_one_line(exc)}; rerun with {DEBUG_FLAG} for the traceback", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
