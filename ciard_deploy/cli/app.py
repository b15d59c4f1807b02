"""The Typer application and its global options; verbs live in the sibling modules."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import typer
from rich.markup import escape
from typer.core import TyperGroup

from ciard_deploy import __version__
from ciard_deploy.cli.common import State, console, err_console, setup_logging

try:  # typer >= 0.20 bundles its own click
    from typer._click.exceptions import ClickException
except ImportError:  # older typer: the real click
    from click.exceptions import ClickException


def usage_line(e: Any) -> str:
    """A click usage error (unknown option, missing argument, bad value, unknown command) as one line:
    ``error: No such option: --bogus (see ciard verify -h)``."""
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else "ciard"
    help_flag = ctx.help_option_names[0] if ctx is not None and ctx.help_option_names else "--help"
    message = " ".join(ln.strip() for ln in e.format_message().splitlines() if ln.strip()).rstrip(".")
    return f"error: {message} (see {where} {help_flag})"


@contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """Turns a click usage error into :func:`usage_line` on stderr and exit 2 (typer's own rendering is a
    five-line box). ``no_args_is_help`` (click raises it as a usage error to print the help) passes as it is."""
    try:
        yield
    except ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            raise
        err_console.print(escape(usage_line(e)), highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


class CiardGroup(TyperGroup):
    """The root command: parsing the command line (its own options, then the verb's) and running the verb
    happen inside :func:`one_line_usage_errors`, for the console script and typer's ``CliRunner`` alike."""

    def make_context(self, info_name: Any, args: Any, parent: Any = None, **extra: Any) -> Any:
        with one_line_usage_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with one_line_usage_errors():
            return super().invoke(ctx)

app = typer.Typer(
    name="ciard",
    help="Distill robust compact classifiers (CIARD), export them, and verify their robustness on the runtime.\n\n"
         "Exit codes: 0 ok, 1 a gate failed, 2 bad input or usage, 3 environment missing (no torch, no GPU, no TensorRT).",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    cls=CiardGroup,  # usage errors as one line
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
