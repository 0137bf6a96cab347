"""Command-line interface ``vrpo``: subcommands live in ``vrpo_cli/cmd_*.py``."""
