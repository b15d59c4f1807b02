"""CLI options derived from the option models (``ciard_deploy.options``): one declaration per option.

``model_option(ExportOptions, "opset")`` is the ``typer.Option`` of a model field: its default and help
come from the field (a list default is written comma-separated, a ``True`` bool gets ``--x/--no-x``).
``gate_options`` adds one ``--min-clean``-style flag per gate of ``options.gates.SPECS`` to a command
and hands their values to it as one mapping, so a gate added to the table is a flag of ``ciard verify``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

import typer
from pydantic import BaseModel

from ciard_deploy.options.gates import SPECS


def _sentence(text: str | None) -> str | None:
    """A field description as CLI help: capitalized (not a tool's name: onnxruntime), ending with a period."""
    if not text:
        return None
    if not text.startswith(("onnx", "ciard")):
        text = text[0].upper() + text[1:]
    return text if text.endswith((".", ")")) and not text.endswith("(fraction)") else f"{text}."


def model_option(model: type[BaseModel], name: str, *decls: str, **kw: Any) -> Any:
    """The ``typer.Option`` of ``model``'s field ``name``: default and help from the field (``kw`` wins).

    ``decls`` default to ``--field-name`` (``--field-name/--no-field-name`` for a bool that defaults to true).
    """
    field = model.model_fields[name]
    default = field.get_default(call_default_factory=True)
    if isinstance(default, (list, tuple)):
        default = ",".join(str(v) for v in default)
    if not decls:
        flag = "--" + name.replace("_", "-")
        decls = (f"{flag}/--no-{flag[2:]}",) if default is True else (flag,)
    kw.setdefault("help", _sentence(field.description))
    return typer.Option(kw.pop("default", default), *decls, **kw)


def gate_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Adds one optional float flag per gate of ``SPECS`` (``--min-clean``, ...) to a Typer command whose
    parameter ``gate_flags`` then receives ``{gate name: value or None}`` (the flags go where that
    parameter is, in ``SPECS`` order)."""
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    at = [p.name for p in params].index("gate_flags")
    gates = [inspect.Parameter(name, params[at].kind, annotation=Optional[float],
                               default=typer.Option(None, spec.flag, help=f"Gate: {spec.description}: "
                                                                          f"{spec.metric} {spec.op} this (0..1)."))
             for name, spec in SPECS.items()]
    new_sig = sig.replace(parameters=params[:at] + gates + params[at + 1:])

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs["gate_flags"] = {name: kwargs.pop(name) for name in SPECS}
        return func(*args, **kwargs)

    wrapper.__signature__ = new_sig  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**{k: v for k, v in func.__annotations__.items() if k != "gate_flags"},
                               **{name: Optional[float] for name in SPECS}}
    return wrapper


__all__ = ["gate_options", "model_option"]
