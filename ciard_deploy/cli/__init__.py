"""The ``ciard`` command line: thin Typer verbs over library functions.

Each verb module registers its commands on ``app`` when imported.
"""

from __future__ import annotations

from ciard_deploy.cli import info  # noqa: F401  (registers verbs)
from ciard_deploy.cli import evaluate  # noqa: F401
from ciard_deploy.cli import verify  # noqa: F401
from ciard_deploy.cli import export  # noqa: F401
from ciard_deploy.cli import distill  # noqa: F401
from ciard_deploy.cli import recipe  # noqa: F401
from ciard_deploy.cli import plot  # noqa: F401
from ciard_deploy.cli import run  # noqa: F401
from ciard_deploy.cli.app import app


def main() -> None:
    app(prog_name="ciard")


__all__ = ["app", "main"]
