"""Where a command's figure and report fragment go: exploratory runs under ``results/``,
the published set in ``paper_figures/`` only with ``--publish`` (so it changes on purpose)."""

from __future__ import annotations

from .errors import UserError

PUBLISH_DIR = "paper_figures"


def output_dir(publish: bool, given: str | None, default: str, flag: str) -> str:
    """``paper_figures`` with ``--publish`` (an explicit ``flag`` naming another place is a
    user error), else the explicit value of ``flag``, else ``default``."""
    if publish:
        if given and given.rstrip("/") != PUBLISH_DIR:
            raise UserError(f"--publish writes {PUBLISH_DIR}/; drop {flag} {given} or --publish")
        return PUBLISH_DIR
    return given or default
