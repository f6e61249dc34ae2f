"""The command line's one error style, shared by ``kegnet compress`` (kegnet/cli.py) and the HTTP client's
commands (kegnet/client.py): one line ``error: ...`` on stderr, then exit 2 (bad options or input) or 1 (a
failed run or job)."""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: <message>`` (white space folded to one line) on stderr and exit with ``code``."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(code)
