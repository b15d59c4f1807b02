"""The field reference of ``ciard recipe show``: every recipe key with its type and description."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel

from ciard_deploy.config.recipe import DistillRecipe, TrainRecipe
from ciard_deploy.config.sections import MethodSection


def field_docs(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type, description) of every field, for ``ciard recipe show``."""
    rows: list[tuple[str, str, str]] = []
    if model is None:
        seen: set[str] = set()
        for cls in (DistillRecipe, TrainRecipe):
            for row in field_docs(cls):
                if row[0] not in seen:
                    seen.add(row[0])
                    rows.append(row)
        return rows
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        sub = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None and sub is not MethodSection:
            rows.append((key, "section", f.description or ""))
            rows += field_docs(sub, key + ".")
        else:
            rows.append((key, _type_name(ann), f.description or ""))
    return rows


def _type_name(ann: Any) -> str:
    text = repr(ann) if not isinstance(ann, type) else ann.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


__all__ = ["field_docs"]
