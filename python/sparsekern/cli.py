"""The `sparsekern` command line: doctor, bench, prune, eval, demo.

Each area adds its subcommands through an `add_commands(subparsers)` function in its own module, listed in
_COMMAND_MODULES; a module that is missing or fails to import is reported, not fatal, so `sparsekern doctor`
always works.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> subcommands it adds
_COMMAND_MODULES = (
    "sparsekern.diagnostics",  # doctor
    "sparsekern.bench.cli",  # bench gemm | overhead | prune
    "sparsekern.pipeline_cli",  # prune | eval | demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsekern", description="2:4 structured sparsity for PyTorch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod_name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            if e.name and mod_name.startswith(e.name):
                continue  # that area is not part of this installation
            raise
        mod.add_commands(sub)
    return parser


class UserError(ValueError):
    """A mistake in what the user asked for (an argument, a path, a plan): one line on stderr, exit status 2."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the request cannot be done as asked" rather than "sparsekern broke": the command
    line reports them as one line and exit status 2; anything else keeps its traceback and exits 1."""
    from ._ext import ExtensionMissingError
    from ._fsutil import FileRefused
    from .convert import SparsifyError
    from .data import DataError
    from .pipeline import PipelineError
    from .policy import PolicyError
    from .quant import QuantUnsupportedError
    from .weight import CheckpointError

    return (UserError, FileRefused, FileExistsError, DataError, PipelineError, CheckpointError, SparsifyError,
            PolicyError, QuantUnsupportedError, ExtensionMissingError)


def main(argv=None) -> int:
    """Run the command line. Exit status: 0 done, 2 a user error (argparse's own, or one of user_error_types(),
    printed as one line), 1 an internal error (with its traceback), 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except user_error_types() as e:
        print(f"sparsekern {getattr(args, 'command', '')}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
