"""``vrpo`` console script.

Each subcommand is a module ``vrpo_cli/cmd_<name>.py`` (command ``<name>`` with ``_``
as ``-``) exposing ``HELP`` (one line for ``vrpo --help``) and ``register(subparsers)``,
which adds its parser and sets ``func`` (called with the parsed namespace, returning an
exit code). Modules are discovered, so a new subcommand is a new file. Command modules
import only the standard library at module level; only the chosen command's parser is
built in full (its config dataclass imported), so ``vrpo --help`` stays fast.

Errors: see :mod:`vrpo_cli.errors` (user errors: one line, exit 2; Ctrl-C: exit 130;
anything else is a bug and keeps its traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import vrpo_cli

from .errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_USER, UserError, user_message

DESCRIPTION = ("Robust RLHF under preference-model misspecification: variance-reduced BT/DPO estimators, "
               "simulations, theory checks, HH data and LLM fine-tuning. `vrpo COMMAND --help` lists a "
               "command's flags with their defaults.")


def commands() -> dict[str, str]:
    """``{command: module name}`` for every ``cmd_*.py``."""
    return {info.name[4:].replace("_", "-"): info.name
            for info in sorted(pkgutil.iter_modules(vrpo_cli.__path__), key=lambda m: m.name)
            if info.name.startswith("cmd_")}


def build_parser(command: str | None = None, *, full: bool = False) -> argparse.ArgumentParser:
    """The parser; ``command``'s sub-parser (or every one with ``full=True``) is built in full,
    the others are one-line stubs (enough for ``vrpo --help``)."""
    parser = argparse.ArgumentParser(prog="vrpo", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in commands().items():
        mod = importlib.import_module(f"vrpo_cli.{module}")
        if full or name == command:
            mod.register(sub)
        else:
            sub.add_parser(name, help=mod.HELP, add_help=False)
    return parser


def _chosen(argv) -> str | None:
    names = commands()
    for tok in argv:
        if tok in names:
            return tok
        if not tok.startswith("-"):
            return None
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _chosen(argv)
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly, like other Unix tools
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- Python flushes stdout at exit
        except OSError:
            pass
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"\nvrpo {command or ''}: interrupted; resume with the same command".replace("  ", " "),
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 -- sorted into user errors and bugs below
        msg = user_message(e)
        if msg is None:
            raise  # a bug: keep the traceback (exit 1)
        if os.environ.get("VRPO_TRACEBACK"):
            cause = e.__cause__ if isinstance(e, UserError) and e.__cause__ is not None else None
            if cause is not None:
                raise cause
            raise
        print(f"vrpo {command or ''}: error: {msg}".replace("vrpo :", "vrpo:"), file=sys.stderr, flush=True)
        return EXIT_USER


if __name__ == "__main__":
    sys.exit(main())
