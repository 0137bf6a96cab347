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


def add_publish_flag(p) -> None:
    """``--publish`` for a command that writes a figure and a report fragment."""
    p.add_argument("--publish", action="store_true",
                   help=f"write the figure and report fragment into {PUBLISH_DIR}/ (tracked in git)")


def redraw_dir(args, results_json: str) -> str:
    """Where a redraw from a saved ``results.json`` goes (its folder, or ``paper_figures``
    with ``--publish``), checked to exist and be writable before any work."""
    from pathlib import Path

    from .errors import check_writable

    if not Path(results_json).is_file():
        raise UserError(f"results file not found: {results_json}")
    dest = output_dir(args.publish, args.fig_dir, str(Path(results_json).parent), "--fig-dir")
    check_writable(dest, "figure directory")
    return dest


def exploratory_notice(command: str, publish: bool) -> None:
    """One line after an exploratory run saying how to write the published set."""
    if not publish:
        print(f"exploratory run; `vrpo {command} --publish` (same flags) writes the published figure and section "
              f"into {PUBLISH_DIR}/")
