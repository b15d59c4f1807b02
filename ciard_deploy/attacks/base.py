"""The attack interface, capabilities and the attack registry (budgets and eps: ``attacks/budget.py``).

This module imports no torch: the registry, ``create_attack`` and the query-only Square path
must work on an edge device that has only numpy and a runtime. Attack classes are loaded
lazily from their modules when ``create_attack`` first needs them.
"""

from __future__ import annotations

import abc
import difflib
import importlib
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from ciard_deploy.attacks.budget import Budget, parse_eps
from ciard_deploy.errors import EnvironmentMissing, UsageError
from ciard_deploy.registry import Registry, unknown_name_message

if TYPE_CHECKING:  # pragma: no cover
    import torch


#: What a model or runtime can give an attack. A torch model gives both; an exported
#: runtime (onnxruntime, TensorRT) gives only scores.
GRADIENTS = "gradients"
SCORES = "scores"
CAPABILITIES = frozenset({GRADIENTS, SCORES})
TORCH_CAPABILITIES = frozenset({GRADIENTS, SCORES})


# --------------------------------------------------------------------------- capabilities

class MissingCapability(UsageError):
    """An attack needs something the model or runtime cannot give (e.g. gradients from ONNX)."""

    def __init__(self, attack_label: str, missing: Iterable[str], available: Iterable[str]) -> None:
        self.attack_label = attack_label
        self.missing = sorted(missing)
        self.available = sorted(available)
        have = ", ".join(self.available) or "nothing"
        hint = (" Run white-box attacks on the torch model, or use a query-only attack (square<Q>) here."
                if GRADIENTS in self.missing else "")
        super().__init__(f"attack {attack_label} needs {' and '.join(self.missing)}, which this model/runtime "
                         f"does not provide (it provides: {have}).{hint}")


# --------------------------------------------------------------------------- the interface

class Attack(abc.ABC):
    """One adversarial attack with a fixed budget.

    Subclasses set ``name`` (e.g. ``"pgd20"``), ``budget`` and ``requires`` and implement
    ``run``. Every image ``run`` returns lies within ``budget.eps`` (L-inf) of its clean image
    and in [0, 1]. ``run`` puts the model in eval mode and restores its train/eval mode and
    each parameter's ``requires_grad`` afterwards.
    """

    name: str
    budget: Budget
    requires: frozenset[str] = frozenset({GRADIENTS})

    @property
    def eps(self) -> float:
        return self.budget.eps

    @property
    def label(self) -> str:
        """Name and budget, e.g. ``"pgd20@8/255"``: robust accuracy always carries it."""
        return f"{self.name}@{self.budget.eps_label}"

    def ensure_capabilities(self, available: Iterable[str]) -> None:
        """Raises ``MissingCapability`` (a ``UsageError``) naming what ``available`` lacks."""
        have = frozenset(available)
        missing = self.requires - have
        if missing:
            raise MissingCapability(self.label, missing, have)

    @abc.abstractmethod
    def run(self, model: "torch.nn.Module", x: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":
        """Returns adversarial images for float32 NCHW ``x`` in [0, 1] and int64 labels ``y``."""

    def options(self) -> dict[str, Any]:
        """The attack's settings beyond its budget (for reports and manifests)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "requires": sorted(self.requires),
                "budget": self.budget.to_dict(), "options": self.options()}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({self.label}{', ' if opts else ''}{opts})"


class QueryAttack(Attack):
    """An attack that needs only a model's scores (no gradients): it runs live on any runtime, torch-free.
    ``ciard verify --live SPEC`` (recipe ``deploy.live_attacks``) runs any registered attack whose
    ``requires`` lacks ``gradients`` through one batched, seeded, resumable runner
    (``verify.live``). Adding a new query-only attack takes two things and nothing else: its own
    module with a subclass of this class, and its ``AttackEntry`` in ``ATTACKS`` below with
    ``requires=frozenset({SCORES})``; the CLI, the recipe, the verify state and the report pick
    it up by its spec (``square1000``) and its ``describe()``.

    What the runner relies on:

    * the constructor takes ``eps`` (and the entry's ``count_arg``), ``seed`` (an int, or None)
      and ``batch_size`` (images per call of the logits function);
    * ``seed`` is a plain attribute read when ``run_numpy`` starts: the runner sets it to
      ``seed + i`` before batch ``i`` (so each batch's outcome depends on its own seed only, and a
      resumed run equals an uninterrupted one) and puts the original back afterwards;
    * ``run_numpy(predict, x, y, num_classes)`` returns images within ``eps`` (L-inf) of ``x``
      and in [0, 1], one per image, using only ``predict`` (float32 NCHW -> logits);
    * ``last_queries`` (optional) counts the images the last call sent to ``predict``; the
      runner counts the queries itself as well;
    * ``describe()`` names every setting that changes its outcome: a resumable verify state
      reuses a record only under an equal ``describe()``. Importing its module must not need torch.
    """

    requires = frozenset({SCORES})
    seed: int | None = 0
    last_queries: int = 0

    @abc.abstractmethod
    def run_numpy(self, predict: Any, x: Any, y: Any, num_classes: int | None = None) -> Any:
        """Adversarial images for float32 NCHW ``x`` in [0, 1] and labels ``y``, through ``predict`` only."""

    def run(self, model: "torch.nn.Module", x: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":
        """Attacks a torch model through its logits only (the same code path as ``run_numpy``)."""
        import torch

        from ciard_deploy.attacks.torch_ops import check_inputs, frozen_eval, project_linf

        check_inputs(x, y)
        device = x.device

        def predict(batch: Any) -> Any:
            with torch.no_grad():
                return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()

        with frozen_eval(model):
            x_adv = self.run_numpy(predict, x.detach().cpu().numpy(), y.detach().cpu().numpy())
        return project_linf(torch.from_numpy(x_adv).to(device=device, dtype=x.dtype), x.detach(), self.budget.eps)


def ensure_capabilities(attacks: Attack | Iterable[Attack], available: Iterable[str]) -> None:
    """Checks one attack or several before any work starts; raises ``MissingCapability`` on the first
    that cannot run (``Attack.ensure_capabilities`` is the one-attack form)."""
    have = frozenset(available)
    for attack in ([attacks] if isinstance(attacks, Attack) else attacks):
        attack.ensure_capabilities(have)


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class AttackEntry:
    """One attack family in the registry.

    Attributes:
        family: the spec's name part (``"pgd"`` in ``"pgd20"``).
        pattern: how users write it (``"pgd<K>"``).
        target: ``"module:Class"`` of the implementation, imported on first use.
        count_arg: constructor argument that receives ``<K>``/``<Q>``; ``None`` if the spec takes no number.
        default_count: used when the spec omits the number (``"pgd"`` means ``"pgd20"``).
        defaults: extra constructor arguments for this family (e.g. the TRADES step size).
        requires: capabilities it needs (known without importing torch).
        description: one line for ``ciard eval --list``.
    """

    family: str
    pattern: str
    target: str
    count_arg: str | None = None
    default_count: int | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    requires: frozenset[str] = frozenset({GRADIENTS})
    description: str = ""

    def load(self) -> type[Attack]:
        """Imports the implementation; a missing dependency (torch on an edge device) is EnvironmentMissing."""
        module, _, attr = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            missing = getattr(exc, "name", None) or str(exc)
            raise EnvironmentMissing(f"attack {self.pattern} needs {missing}, which is not installed here "
                                     f"({exc}); query-only attacks (square<Q>) need only numpy") from None


ATTACKS: Registry[AttackEntry] = Registry("attack")

for _entry in (
    AttackEntry("fgsm", "fgsm", "ciard_deploy.attacks.pgd:FGSM",
                description="FGSM: one signed-gradient step of size eps (Goodfellow et al. 2015)"),
    AttackEntry("pgd", "pgd<K>", "ciard_deploy.attacks.pgd:PGD", "steps", 20,
                description="PGD on cross-entropy, K steps of max(2/255, eps/4), uniform random start (Madry et al. 2018)"),
    AttackEntry("pgdt", "pgdt<K>", "ciard_deploy.attacks.pgd:PGD", "steps", 20,
                {"step_size": 0.003, "prefix": "pgdt"},
                description="PGD-TRADES: PGD on cross-entropy with step 0.003, random start (Zhang et al. 2019)"),
    AttackEntry("cw", "cw<K>", "ciard_deploy.attacks.cw:CWInf", "steps", 30,
                description="CW-inf: K PGD steps of max(2/255, eps/4) on the CW margin loss, confidence 50, zero start"),
    AttackEntry("aa", "aa", "ciard_deploy.attacks.autoattack:AutoAttackAdapter", defaults={"version": "standard"},
                description="AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square (pyautoattack, Croce & Hein 2020)"),
    AttackEntry("aa-fast", "aa-fast", "ciard_deploy.attacks.autoattack:AutoAttackAdapter", defaults={"version": "fast"},
                description="AutoAttack subset: APGD-CE + APGD-T (pyautoattack), a cheaper lower bound on aa"),
    AttackEntry("apgd-ce", "apgd-ce<K>", "ciard_deploy.attacks.autoattack:AutoAttackComponent", "steps", 100,
                {"component": "apgd-ce"},
                description="APGD-CE alone, K iterations (default 100), 1 restart (pyautoattack, AutoAttack's first attack)"),
    AttackEntry("apgd-t", "apgd-t<K>", "ciard_deploy.attacks.autoattack:AutoAttackComponent", "steps", 100,
                {"component": "apgd-t"},
                description="APGD-T alone: targeted DLR, 9 target classes, K iterations (default 100) (pyautoattack)"),
    AttackEntry("fab-t", "fab-t<K>", "ciard_deploy.attacks.autoattack:AutoAttackComponent", "steps", 100,
                {"component": "fab-t"},
                description="FAB-T alone: targeted FAB, 9 target classes, K iterations (default 100) (pyautoattack)"),
    AttackEntry("mtpgd", "mtpgd<K>", "ciard_deploy.attacks.pgd:MultiTargetPGD", "steps", 100,
                description="multi-targeted PGD on the margin z_t - z_y, K steps per target class, 9 targets"),
    # query-only (no GRADIENTS in requires): runs live in `ciard verify --live` too (see QueryAttack)
    AttackEntry("square", "square<Q>", "ciard_deploy.attacks.square:SquareAttack", "queries", 5000,
                requires=frozenset({SCORES}),
                description="Square: score-based random search, Q queries (Andriushchenko et al. 2020), numpy, equal-margin steps accepted"),
):
    ATTACKS.add(_entry.family, _entry)

_SPEC_RE = re.compile(r"^(?P<family>[a-z]+(?:-[a-z]+)*)(?P<count>\d+)?$")


def list_attacks() -> list[str]:
    """The attack spec patterns users can write: ``fgsm``, ``pgd<K>``, ``aa``, ``square<Q>``, ..."""
    return [e.pattern for _, e in ATTACKS.items()]


def _unknown(spec: str) -> UsageError:
    msg = unknown_name_message("attack", spec, list_attacks())
    m = _SPEC_RE.match(spec.strip().lower())
    if m is not None and "Did you mean" not in msg:  # "pdg20" -> "pgd20": match the family, keep the number
        close = difflib.get_close_matches(m["family"], ATTACKS.names(), n=1)
        if close and ATTACKS.get(close[0]).count_arg is not None:
            guess = f"{close[0]}{m['count'] or ''}"
            msg = msg.replace(f"{spec!r}.", f"{spec!r}. Did you mean {guess!r}?", 1)
    return UsageError(msg + " (e.g. fgsm, pgd20, pgdt20, cw30, aa, aa-fast, apgd-ce, apgd-t, fab-t, mtpgd100, square100)")


def parse_attack_spec(spec: str) -> tuple[AttackEntry, int | None]:
    """Splits ``"pgd20"`` into its registry entry and 20; raises UsageError for unknown specs."""
    s = str(spec).strip().lower()
    m = _SPEC_RE.match(s)
    if m is None or m["family"] not in ATTACKS:
        raise _unknown(str(spec))
    entry = ATTACKS.get(m["family"])
    count = int(m["count"]) if m["count"] is not None else None
    if count is not None and entry.count_arg is None:
        raise _unknown(str(spec))
    if count is not None and count < 1:
        raise UsageError(f"attack {spec!r}: the number of steps/queries must be at least 1")
    return entry, count if count is not None else entry.default_count


def attack_requires(spec: str) -> frozenset[str]:
    """Capabilities an attack spec needs, without importing its implementation (or torch)."""
    return parse_attack_spec(spec)[0].requires


def is_query_only(spec: str) -> bool:
    """True when the attack spec needs no gradients (it runs live on a runtime: ``square1000``)."""
    return GRADIENTS not in attack_requires(spec)


def query_only_patterns() -> list[str]:
    """The spec patterns of the registered query-only attacks (``square<Q>``, ...)."""
    return [e.pattern for _, e in ATTACKS.items() if GRADIENTS not in e.requires]


def create_attack(spec: str, eps: float | str, **overrides: Any) -> Attack:
    """Builds an attack from a spec such as ``"pgd20"`` and an L-inf radius.

    Args:
        spec: one of ``list_attacks()`` with its number filled in: ``fgsm``, ``pgd20``, ``pgdt20``,
            ``cw30``, ``aa``, ``aa-fast``, ``square100``. Without a number the family default
            is used (``pgd`` -> ``pgd20``, ``cw`` -> ``cw30``, ``square`` -> ``square5000``).
        eps: radius in [0, 1], a float or a string such as ``"8/255"``.
        **overrides: constructor options of the attack (``step_size``, ``restarts``,
            ``random_start``, ``seed``, ``confidence``, ``p_init``, ``batch_size``, ...).

    Returns:
        the attack.

    Raises:
        UsageError: unknown spec (listing valid names), bad eps, or an option the attack does not take.

    Example:
        >>> create_attack("pgd20", "8/255").label
        'pgd20@8/255'
    """
    entry, count = parse_attack_spec(spec)
    eps_value = parse_eps(eps)
    cls = entry.load()
    kwargs: dict[str, Any] = dict(entry.defaults)
    if entry.count_arg is not None:
        kwargs[entry.count_arg] = count
    params = inspect.signature(cls.__init__).parameters
    accepted = sorted(k for k in params if k not in ("self", "eps", "prefix", "version", "component",
                                                      entry.count_arg))
    bad = sorted(k for k in overrides if k not in accepted)
    if bad:
        raise UsageError(f"attack {spec!r} does not take option(s) {', '.join(bad)}; "
                         f"it takes: {', '.join(accepted) or 'none'}")
    kwargs.update(overrides)
    try:
        return cls(eps=eps_value, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"attack {spec!r}: {exc}") from None


def check_positive(name: str, value: float | int | None, allow_zero: bool = False) -> None:
    """ValueError naming ``name`` unless ``value`` is finite and > 0 (>= 0 with ``allow_zero``); None passes."""
    if value is None:
        return
    if not (value >= 0 if allow_zero else value > 0) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


__all__ = [
    "ATTACKS", "Attack", "AttackEntry", "CAPABILITIES", "GRADIENTS", "MissingCapability",
    "QueryAttack", "SCORES", "TORCH_CAPABILITIES", "attack_requires", "check_positive", "create_attack", "ensure_capabilities",
    "is_query_only", "list_attacks", "parse_attack_spec", "query_only_patterns",
]
