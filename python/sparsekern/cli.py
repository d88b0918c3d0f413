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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
