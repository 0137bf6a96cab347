"""``vrpo`` console script.

Each subcommand is a module ``vrpo_cli/cmd_<name>.py`` exposing
``register(subparsers)``, which adds its parser and sets ``func`` (called with
the parsed namespace, returning an exit code). Modules are discovered, so a new
subcommand is a new file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import vrpo_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vrpo",
        description="Robust RLHF under preference-model misspecification: variance-reduced BT/DPO estimators, "
        "simulations, theory checks, HH data and LLM fine-tuning.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(vrpo_cli.__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"vrpo_cli.{info.name}").register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError) as e:
        # bad configuration or input: one clear line, not a traceback (VRPOInputError and the
        # loaders' DataFormatError are ValueErrors); VRPO_TRACEBACK=1 shows the traceback
        if os.environ.get("VRPO_TRACEBACK"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"vrpo {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
