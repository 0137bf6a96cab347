"""One dataclass-to-CLI mechanism for every command that takes a configuration dataclass.

:class:`ConfigFlags` turns the fields of a config dataclass (``ExperimentConfig``,
``HHRewardConfig``, ``DemoConfig``, ``LMRegretConfig``) into flags, each with help
text that shows its default; reads a config file (TOML, YAML or JSON; flags override
it); and builds the validated dataclass, so a new field is a new flag without
editing the CLI. Conventions, the same for every command:

- ``--field-name VALUE`` for every field (``_`` becomes ``-``);
- list fields take values separated by spaces or commas: ``--n 250 500`` or ``--n 250,500``;
- booleans: ``--flag`` / ``--no-flag`` (``--flag false`` also works);
- ``progress`` is ``--no-progress``;
- ``--config FILE``: any of the fields (top level or under the command's table), flags win;
- an invalid value or an unknown key is a one-line error naming the field (exit 2).

The dataclass's module is imported only when its subcommand's parser is built, so
``vrpo --help`` does not import NumPy, SciPy or torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import re
from pathlib import Path

from .errors import UserError


def available_cores() -> int:
    """CPU cores this process may use (affinity-aware), at least 1."""
    f = getattr(os, "process_cpu_count", None)  # Python >= 3.13
    if f is not None:
        n = f()
    else:
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count()
    return max(1, int(n or 1))


def parse_bool(s: str) -> bool:
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def float_or_str(s: str):
    try:
        return float(s)
    except ValueError:
        return s


_SCALARS = {"int": int, "float": float, "str": str, "float|str": float_or_str, "str|float": float_or_str}


def _list_type(conv):
    def parse(s: str):
        out = []
        for x in s.split(","):
            if x.strip():
                try:
                    out.append(conv(x.strip()))
                except ValueError:
                    raise argparse.ArgumentTypeError(f"invalid {getattr(conv, '__name__', 'value')} value: "
                                                     f"{x.strip()!r}") from None
        return out

    parse.__name__ = "list"
    return parse


def _field_kind(f, default):
    """(kind, converter): kind is 'bool', 'list' or 'scalar'."""
    s = str(f.type).replace(" ", "").replace("typing.", "")
    s = re.sub(r"\|None$|^None\||Optional\[(.*)\]", r"\1", s)
    if s == "bool":
        return "bool", parse_bool
    m = re.fullmatch(r"tuple(?:\[(\w+),\.\.\.\])?", s)
    if m:
        elem = m.group(1) or (type(default[0]).__name__ if default else "str")
        return "list", _SCALARS.get(elem, str)
    return "scalar", _SCALARS.get(s, str)


def _field_default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _fmt(v) -> str:
    if isinstance(v, (tuple, list)):
        return " ".join(_fmt(x) for x in v) if v else "(none)"
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _comments(cls) -> dict[str, str]:
    """Trailing ``# comments`` of the dataclass's field lines (used as help when none is given)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in src.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def load_config_file(path, section: str | None = None) -> dict:
    """A TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON file as a dict; ``section``:
    a table of that name is used when present (``[experiment]``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml  # the 'yaml' extra; a missing module becomes the install hint

            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"{path}: config must be .toml, .yaml, .yml or .json")
    except UserError:
        raise
    except ModuleNotFoundError:
        raise
    except Exception as e:  # the parsers' own errors (TOMLDecodeError, YAMLError, JSONDecodeError)
        raise UserError(f"{path}: invalid {suffix[1:].upper()}: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a table of settings")
    if section and isinstance(data.get(section), dict):
        data = data[section]
    return data


class ConfigFlags:
    """Flags, config file and construction for one config dataclass.

    ``target``: ``"module:Class"`` (imported when :meth:`add_to` runs). ``skip``: fields
    without a flag. ``helps``: help text per field (else the field's trailing comment,
    else its name). ``cli_defaults``: defaults the CLI uses instead of the dataclass's
    (e.g. ``n_jobs``: the available cores); ``default_text``: how a default is shown.
    """

    def __init__(self, target: str, *, skip=(), helps=None, cli_defaults=None, default_text=None,
                 section: str | None = None, file_help: str | None = None):
        self.target = target
        self.skip = set(skip)
        self.helps = dict(helps or {})
        self.cli_defaults = dict(cli_defaults or {})
        self.default_text = dict(default_text or {})
        self.section = section
        self.file_help = file_help
        self._cls = None

    @property
    def cls(self):
        if self._cls is None:
            mod, _, name = self.target.partition(":")
            self._cls = getattr(importlib.import_module(mod), name)
        return self._cls

    def fields(self):
        return [f for f in dataclasses.fields(self.cls) if f.name not in self.skip and f.init]

    def add_to(self, parser) -> None:
        cls = self.cls
        comments = _comments(cls)
        g = parser.add_argument_group(f"{cls.__name__} fields (flags override --config)")
        parser.add_argument("--config", metavar="FILE",
                            help=self.file_help or f"TOML, YAML or JSON file of {cls.__name__} fields"
                            + (f" (top level or under [{self.section}])" if self.section else "")
                            + "; flags override it (default: none)")
        for f in self.fields():
            default = self.cli_defaults.get(f.name, _field_default(f))
            shown = self.default_text.get(f.name, _fmt(default))
            text = self.helps.get(f.name) or comments.get(f.name) or f"{cls.__name__}.{f.name}"
            if f.name == "progress":
                g.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                               help="hide progress bars (default: shown)")
                continue
            flag = "--" + f.name.replace("_", "-")
            help_ = f"{text} (default: {shown})".replace("%", "%%")
            kind, conv = _field_kind(f, default)
            if kind == "bool":
                g.add_argument(flag, dest=f.name, nargs="?", const=True, default=None, type=parse_bool,
                               metavar="BOOL", help=help_)
                g.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const", const=False,
                               help=f"same as {flag} false")
            elif kind == "list":
                g.add_argument(flag, dest=f.name, nargs="+", type=_list_type(conv), default=None,
                               metavar=f.name.upper(), help=help_)
            else:
                g.add_argument(flag, dest=f.name, type=conv, default=None, metavar=f.name.upper(), help=help_)

    def given(self, args) -> dict:
        """Fields set by flags (lists flattened to tuples)."""
        out = {}
        for f in self.fields():
            v = getattr(args, f.name, None)
            if v is None:
                continue
            if isinstance(v, list):  # nargs="+" of comma-split lists
                v = tuple(x for part in v for x in (part if isinstance(part, list) else [part]))
            out[f.name] = v
        return out

    def from_file(self, args) -> dict:
        path = getattr(args, "config", None)
        if not path:
            return {}
        data = load_config_file(path, self.section)
        known = {f.name for f in dataclasses.fields(self.cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{path}: unknown config key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}

    def build(self, args, factory=None, extra: dict | None = None, drop_defaults=()):
        """The validated dataclass: CLI defaults < config file < flags < ``extra``.
        ``factory`` (default: the class) builds it, e.g. a ``smoke_config``. Errors raised by
        the file's values name the file; any invalid value is a :class:`UserError`."""
        factory = factory or self.cls
        file_vals = self.from_file(args)
        base = {k: v for k, v in self.cli_defaults.items() if k not in drop_defaults}
        flags = {**self.given(args), **(extra or {})}
        try:
            cfg = factory(**{**base, **file_vals})
        except (ValueError, TypeError, KeyError) as e:
            where = f"{args.config}: " if file_vals else ""
            raise UserError(where + _one_line(e)) from e
        try:
            return dataclasses.replace(cfg, **flags) if flags else cfg
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(_one_line(e)) from e


def _one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    return str(msg)
