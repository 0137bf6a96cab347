"""Small helpers of the generated reports (``analysis``, ``llm``): a Markdown table and the commit."""

from __future__ import annotations

import subprocess

__all__ = ["md_table", "git_commit"]


def md_table(df) -> str:
    """A pandas frame as a GitHub Markdown table (values through ``str``, no index)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in r) + " |")
    return "\n".join(lines)


def git_commit() -> str:
    """Short hash of ``HEAD`` in the working directory, ``"unknown"`` without git or a repository."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001  (git missing: the report still renders)
        return "unknown"
