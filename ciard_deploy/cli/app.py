"""The Typer application and its global options; verbs live in the sibling modules."""

from __future__ import annotations

import typer

from ciard_deploy import __version__
from ciard_deploy.cli.common import State, console, setup_logging

app = typer.Typer(
    name="ciard",
    help="Distill robust compact classifiers (CIARD), export them, and verify their robustness on the runtime.\n\n"
         "Exit codes: 0 ok, 1 a gate failed, 2 bad input or usage, 3 environment missing (no torch, no GPU, no TensorRT).",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        console.print(f"ciard-deploy {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logs and full tracebacks for errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or info logs (tables and errors still print)."),
) -> None:
    State.verbose = verbose
    State.quiet = quiet
    setup_logging(verbose, quiet)
