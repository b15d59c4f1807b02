"""The step interface every distillation method implements, and the method registry.

The trainer owns the loop, the student optimizer, AMP and checkpoints; a method owns one step::

    method = create_method("ciard", recipe_section, student, {"clean": tc, "robust": tr},
                           num_classes=10, eps=8 / 255, epochs=300, steps_per_epoch=391)
    for epoch in range(epochs):
        method.on_epoch_start(epoch)
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            res = method.train_step(x, y, epoch)        # crafts x_adv, returns the student loss
            res.loss.backward(); opt.step()             # the trainer's part (maybe with a GradScaler)
            metrics = res.metrics | method.after_student_step()   # CIARD: robust-teacher step, etc.

``state_dict()`` plus the weights of ``trainable_teachers()`` is everything needed to resume.
"""

from __future__ import annotations

import abc

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import pydantic
import torch
from torch import nn

from ciard_deploy.errors import RecipeError, UsageError
from ciard_deploy.options.methods import METHOD_CATALOG, MethodConfig
from ciard_deploy.registry import Registry

TEACHER_ROLES = ("clean", "robust")


@dataclass
class StepResult:
    """What one ``train_step`` hands the trainer.

    Attributes:
        loss: the student loss (scalar); its graph reaches the student's parameters only.
        metrics: every loss term and adaptive quantity by name, as python floats.
        x_adv: the adversarial batch used (detached; the clean batch for ``natural``).
    """

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    x_adv: torch.Tensor | None = None


class Method(abc.ABC):
    """One distillation / adversarial-training method on the common step interface.

    Subclasses set ``name``, ``Config`` and ``teachers`` and implement ``train_step``; the ones
    with state (temperatures, adaptive weights, a teacher optimizer) override
    ``after_student_step``, ``state_dict`` and ``load_state_dict``.

    Args:
        cfg: the method's hyper-parameters (an instance of ``Config``).
        student: the model being trained; float NCHW [0, 1] in, logits out.
        teachers: role -> model, with at least the roles in ``teachers``; others are ignored.
        num_classes: number of classes (logit width).
        eps: L-inf budget of the training attack.
        attack_steps: PGD iterations of the training attack.
        step_size: PGD step.
        epochs: length of the run (for milestone and schedule fractions).
        steps_per_epoch: batches per epoch.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    teachers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: MethodConfig, student: nn.Module, teachers: Mapping[str, nn.Module] | None = None, *,
                 num_classes: int, eps: float, attack_steps: int = 10, step_size: float = 2 / 255,
                 epochs: int = 1, steps_per_epoch: int = 1) -> None:
        if not isinstance(cfg, self.Config):
            raise UsageError(f"method {self.name!r} needs a {self.Config.__name__}, got {type(cfg).__name__}")
        teachers = dict(teachers or {})
        missing = [r for r in self.teachers if teachers.get(r) is None]
        if missing:
            need = " and ".join(f"a {r} teacher" for r in self.teachers)
            raise UsageError(f"method {self.name!r} needs {need}; missing: {', '.join(missing)}")
        if eps < 0 or attack_steps < 0 or step_size < 0:
            raise UsageError(f"attack budget must be non-negative (eps={eps}, steps={attack_steps}, step={step_size})")
        if epochs < 1 or steps_per_epoch < 1:
            raise UsageError(f"epochs and steps_per_epoch must be >= 1 (got {epochs}, {steps_per_epoch})")
        self.cfg = cfg
        self.student = student
        self.teacher_nets: dict[str, nn.Module] = {r: teachers[r] for r in self.teachers}
        self.num_classes = int(num_classes)
        self.eps = float(eps)
        self.attack_steps = int(attack_steps)
        self.step_size = float(step_size)
        self.epochs = int(epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        for role, net in self.teacher_nets.items():
            if role not in self.trainable_teachers():
                freeze(net)

    # ------------------------------------------------------------------ the step interface
    def on_epoch_start(self, epoch: int) -> None:
        """Called by the trainer before the first batch of ``epoch`` (0-based)."""

    @abc.abstractmethod
    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> StepResult:
        """Sets the models' modes, crafts ``x_adv`` and computes the student loss.

        Does not call ``backward`` on the student loss nor step the student optimizer.
        """

    def after_student_step(self) -> dict[str, float]:
        """Called after the student optimizer step; returns extra metrics."""
        return {}

    def trainable_teachers(self) -> dict[str, nn.Module]:
        """Teachers whose weights (or BatchNorm statistics) change during the run."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the model weights needed to resume exactly (plain containers only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()``'s output."""

    # ------------------------------------------------------------------ helpers
    @property
    def teacher_roles(self) -> tuple[str, ...]:
        return self.teachers

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg!r})"


def freeze(net: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter: a teacher that never changes."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


METHODS: Registry[type[Method]] = Registry("method", catalog=METHOD_CATALOG)  # names: options.methods


def create_method(name: str, cfg: MethodConfig | Mapping[str, Any] | None, student: nn.Module,
                  teachers: Mapping[str, nn.Module] | None = None, **kw: Any) -> Method:
    """Builds a registered method.

    Args:
        name: a name from ``list_methods()``.
        cfg: the method's ``Config``, or a dict of its fields (validated; unknown keys rejected), or
            None for the defaults.
        student: the model being trained.
        teachers: role -> model for the roles the method needs (``METHODS.get(name).teachers``).
        **kw: ``num_classes``, ``eps`` and the optional ``Method`` arguments.

    Raises:
        UsageError: unknown method name (the message lists the valid ones), missing teacher.
        RecipeError: a field of ``cfg`` that does not validate (every bad field named).
    """
    cls = METHODS.get(name)
    return cls(make_config(name, cfg), student, teachers, **kw)


def make_config(name: str, cfg: MethodConfig | Mapping[str, Any] | None = None) -> MethodConfig:
    """Validates ``cfg`` (a dict, a Config or None) into the named method's ``Config``."""
    cls = METHODS.get(name)
    if cfg is None:
        return cls.Config()
    if isinstance(cfg, MethodConfig):
        if not isinstance(cfg, cls.Config):
            raise UsageError(f"method {name!r} takes a {cls.Config.__name__}, got a {type(cfg).__name__}")
        return cfg
    try:
        return cls.Config.model_validate(dict(cfg))
    except pydantic.ValidationError as e:
        errors = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(config)'}: {err['msg']}"
                           for err in e.errors())
        valid = ", ".join(cls.Config.model_fields) or "(none)"
        raise RecipeError(f"method {name!r}: {errors} (fields: {valid})") from None


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return METHODS.names()
