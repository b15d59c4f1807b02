"""How a recipe's problems are found and worded: pydantic errors as ``key: problem`` lines with near-match
hints, the method's own parameters checked against its ``Config``, rules that span sections.

Every problem of a recipe is collected and reported at once (``recipe.validate_recipe``).
"""

from __future__ import annotations

import difflib
import typing
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from ciard_deploy.config.sections import ROBUSTBENCH_DATASETS, TEACHER_ROLES
from ciard_deploy.options.methods import METHOD_CATALOG

if TYPE_CHECKING:  # pragma: no cover
    from ciard_deploy.config.recipe import Recipe


def problem_message(where: str, problems: list[str]) -> str:
    """One problem on one line, several as a count and an indented list."""
    if len(problems) == 1:
        return f"{where}: {problems[0]}"
    return f"{where}: {len(problems)} problems\n" + "\n".join(f"  {p}" for p in problems)


def validate_method(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A ``method:`` mapping checked against its method's ``Config`` (defaults filled in), and its problems."""
    name = raw["name"]
    names = sorted(METHOD_CATALOG)
    if name not in METHOD_CATALOG:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return raw, [f"method.name: unknown method {name!r}{hint}; valid: {', '.join(names)}"]
    cfg_cls = METHOD_CATALOG[name].Config
    params = {k: v for k, v in raw.items() if k != "name"}
    try:
        cfg = cfg_cls.model_validate(params)
    except ValidationError as e:
        return raw, format_errors(e, cfg_cls, prefix=("method",))
    return {"name": name, **cfg.model_dump(mode="json")}, []


def cross_checks(recipe: "Recipe") -> list[str]:
    """Rules that span sections: the teachers a method needs, the holdout the selection needs."""
    problems = []
    needed = METHOD_CATALOG[recipe.method.name].teachers
    if recipe.kind == "train":
        if needed:
            problems.append(f"method.name: {recipe.method.name!r} distills from teacher(s) "
                            f"{', '.join(needed)}: use kind: distill with a teachers section")
    else:
        for role in TEACHER_ROLES:
            spec = getattr(recipe.teachers, role)
            if role in needed and spec is None:
                problems.append(f"teachers.{role}: required by method {recipe.method.name!r} "
                                f"(give a checkpoint, a recipe or a robustbench ID)")
            elif role not in needed and spec is not None:
                problems.append(f"teachers.{role}: method {recipe.method.name!r} does not use a {role} teacher "
                                f"(remove it or set teachers.{role}: null)")
        problems += robustbench_problems(recipe)
    if recipe.train.selection == "holdout" and recipe.data.holdout == 0:
        problems.append("data.holdout: selection 'holdout' needs a held-out part (or set train.selection: test)")
    if recipe.quantize is not None and recipe.deploy is not None and "onnx-int8" not in recipe.deploy.formats:
        problems.append("quantize: mode qat exports an INT8 QDQ ONNX but deploy.formats has no INT8 target: add "
                        "onnx-int8 (or remove the quantize section)")
    if recipe.optim.schedule == "step" and not recipe.optim.milestones:
        problems.append("optim.milestones: the step schedule needs milestones (epochs)")
    return problems


def robustbench_problems(recipe: "Recipe") -> list[str]:
    """A RobustBench teacher's dataset and threat model against the recipe (its ID is checked at run time,
    against the installed model zoo): the recipe's own dataset, or for an image folder the one named."""
    problems = []
    for role in TEACHER_ROLES:
        spec = getattr(recipe.teachers, role)
        if spec is None or spec.robustbench is None:
            continue
        where, ds = f"teachers.{role}", recipe.data.dataset
        if ds in ROBUSTBENCH_DATASETS and spec.dataset not in (None, ds):
            problems.append(f"{where}.dataset: {spec.dataset!r}, but this recipe trains on {ds!r}")
        elif ds == "imagefolder" and spec.dataset is None:
            problems.append(f"{where}.dataset: required for an imagefolder recipe: the RobustBench dataset the "
                            f"folder holds ({', '.join(ROBUSTBENCH_DATASETS)})")
        elif ds not in ROBUSTBENCH_DATASETS and ds != "imagefolder":
            problems.append(f"{where}.robustbench: RobustBench has models for {', '.join(ROBUSTBENCH_DATASETS)} "
                            f"only, this recipe trains on {ds!r}")
        if role == "robust" and spec.threat_model != "Linf":
            problems.append(f"{where}.threat_model: {spec.threat_model!r}, but the recipe trains against L-inf "
                            f"attacks (attack.eps): a robust teacher must be a RobustBench Linf model")
    return problems


def format_errors(err: ValidationError, model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[str]:
    """pydantic's errors as ``dotted.key: problem`` lines (an unknown key with the closest valid one)."""
    out = []
    for e in err.errors():
        loc = tuple(str(x) for x in e["loc"])
        path = ".".join((*prefix, *loc)) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = valid_keys(model, loc[:-1])
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else (f" (valid: {', '.join(valid)})" if valid else "")
            out.append(f"{path}: unknown key{hint}")
        elif e["type"] == "missing":
            out.append(f"{path}: required")
        else:
            msg = e["msg"]
            for lead in ("Value error, ", "Assertion failed, "):
                msg = msg.removeprefix(lead)
            out.append(f"{path}: {msg}")
    return out


def valid_keys(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """Field names of the (sub)model found by following ``loc`` from ``model``."""
    cur: Any = model
    for part in loc:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return []
        ann = cur.model_fields[part].annotation
        cur = next((a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


__all__ = ["cross_checks", "format_errors", "problem_message", "robustbench_problems", "valid_keys", "validate_method"]
