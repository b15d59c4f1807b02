"""The ``ciard`` command line: thin Typer verbs over library functions.

Each verb module registers its commands on ``app`` when imported.
"""

from __future__ import annotations

import inspect

from ciard_deploy.cli import info  # noqa: F401  (registers verbs)
from ciard_deploy.cli import evaluate  # noqa: F401
from ciard_deploy.cli import verify  # noqa: F401
from ciard_deploy.cli import export  # noqa: F401
from ciard_deploy.cli import distill  # noqa: F401
from ciard_deploy.cli import recipe  # noqa: F401
from ciard_deploy.cli import plot  # noqa: F401
from ciard_deploy.cli import run  # noqa: F401
from ciard_deploy.cli import qat  # noqa: F401
from ciard_deploy.cli.app import app


def reflow_help(doc: str) -> str:
    """A verb's docstring as help text: the lines of a prose paragraph joined (the terminal wraps
    them), indented lines (commands, examples) kept as they are."""
    paragraphs = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines = para.splitlines()
        if any(ln.startswith((" ", "\t")) for ln in lines):
            paragraphs.append("\b\n" + para)  # click/typer: keep this paragraph's line breaks
        else:
            paragraphs.append(" ".join(ln.strip() for ln in lines))
    return "\n\n".join(paragraphs)


for _cmd in app.registered_commands:
    if _cmd.help is None and _cmd.callback is not None and _cmd.callback.__doc__:
        _cmd.help = reflow_help(_cmd.callback.__doc__)


def main() -> None:
    app(prog_name="ciard")


__all__ = ["app", "main"]
