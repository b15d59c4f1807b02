"""The live (query-only) attacks of ``ciard verify --live`` and a recipe's ``deploy.live_attacks``, as options.

Which attacks: any registered attack whose ``requires`` lacks ``gradients`` (today ``square<Q>``),
named by spec on the CLI (``--live square1000,square5000``) or in a recipe
(``deploy.live_attacks: [square1000]``); ``parse_live`` reads and checks both (and the deprecated
``--square-queries N`` / ``square_queries: N``). A white-box spec is refused: it needs gradients, which
a runtime does not give, so it belongs in the pack. Running them is ``verify.live``'s part.

Torch-free and verify-free: recipe validation reads this.
"""

from __future__ import annotations

from typing import Iterable

from ciard_deploy.attacks.base import GRADIENTS, QueryAttack, create_attack, parse_attack_spec, query_only_patterns
from ciard_deploy.errors import CiardError, UsageError

#: the live attacks of ``ciard verify`` and of a recipe's ``deploy:`` when none are given
DEFAULT_LIVE: tuple[str, ...] = ("square1000",)

#: words that turn the live attacks off (``--live none``, ``--live ""``)
NONE_WORDS = ("", "none", "off")

#: where a white-box attack goes instead (the end of the refusal)
PACK_HINT = "white-box attacks belong in the pack (ciard pack --attacks, or --artifact-attacks for the artifact itself)"


def _patterns() -> str:
    return ", ".join(query_only_patterns())


def check_live_spec(spec: str, what: str = "--live", pack_hint: str = PACK_HINT) -> str:
    """One live attack spec, checked and written the way its label names it (``Square1000`` -> ``square1000``).

    ``what`` leads the error messages (the flag or key; ``""``: none), ``pack_hint`` ends the refusal of a
    white-box attack (where it goes instead).

    Raises:
        UsageError: an unknown attack (with the valid names), one that needs gradients (it belongs in
            the pack: one line saying so), or settings the attack refuses (``square1``).
    """
    text = str(spec).strip()
    lead = f"{what}: " if what else ""
    try:
        entry, _ = parse_attack_spec(text)
    except UsageError as e:
        raise UsageError(f"{lead}{e}") from None
    if GRADIENTS in entry.requires:
        raise UsageError(f"{lead}{text} needs gradients, which a runtime does not give, so it cannot run live; "
                         f"{pack_hint}. Live attacks are query-only: {_patterns()}")
    try:
        attack = create_attack(text, 0.0, seed=0, batch_size=1)
    except CiardError as e:
        raise UsageError(f"{lead}{e}") from None
    if not isinstance(attack, QueryAttack):  # a registry entry without the runner's interface: a bug
        raise TypeError(f"{type(attack).__name__} declares no gradients but is no QueryAttack")
    return attack.name


def parse_live(specs: str | Iterable[str] | None, what: str = "--live", pack_hint: str = PACK_HINT) -> list[str]:
    """The live attack specs of ``specs``: a comma-separated string or a list; None: ``DEFAULT_LIVE``.

    ``"none"`` (or ``""``, ``"off"``, an empty list) means no live attack. Each spec is checked by
    ``check_live_spec``; one listed twice is an error.

    Example:
        >>> parse_live("square5000, Square100"), parse_live("none"), parse_live(None)
        (['square5000', 'square100'], [], ['square1000'])
    """
    if specs is None:
        return list(DEFAULT_LIVE)
    parts = specs.split(",") if isinstance(specs, str) else [str(s) for s in specs]
    parts = [p.strip() for p in parts]
    if all(p.lower() in NONE_WORDS for p in parts):
        return []
    out = [check_live_spec(p, what, pack_hint) for p in parts if p]
    twice = sorted({s for s in out if out.count(s) > 1})
    if twice:
        raise UsageError(f"{what + ': ' if what else ''}{', '.join(twice)} listed twice")
    return out


def live_from_square_queries(queries: int, what: str = "--square-queries") -> list[str]:
    """``--square-queries N`` (deprecated) as live specs: ``[square<N>]``, or ``[]`` for 0."""
    if isinstance(queries, bool) or int(queries) != queries or queries < 0 or queries == 1:
        raise UsageError(f"{what} must be 0 (off) or >= 2, got {queries}")
    return [f"square{int(queries)}"] if queries else []


def resolve_live(live: str | Iterable[str] | None = None, live_n: int | None = None, *,
                 square_queries: int | None = None, square_n: int | None = None) -> tuple[list[str], int | None]:
    """The live attacks and subset size asked for, from the new options or their deprecated aliases.

    ``square_queries=N`` means ``live=[square<N>]`` (0: none) and ``square_n`` means ``live_n``; giving
    an option and its alias together is an error, as is a subset size below 1.

    Returns:
        ``(specs, live_n)``: checked specs (``DEFAULT_LIVE`` when neither is given) and the subset size
        (None: every pack sample).
    """
    if square_queries is not None and live is not None:
        raise UsageError("--square-queries is the old spelling of --live: give one of them")
    if square_n is not None and live_n is not None:
        raise UsageError("--square-n is the old spelling of --live-n: give one of them")
    specs = live_from_square_queries(square_queries) if square_queries is not None else parse_live(live)
    size, flag = (square_n, "--square-n") if square_n is not None else (live_n, "--live-n")
    if size is not None and (isinstance(size, bool) or int(size) != size or size < 1):
        raise UsageError(f"{flag} must be >= 1, got {size}")
    return specs, None if size is None else int(size)


__all__ = ["DEFAULT_LIVE", "NONE_WORDS", "PACK_HINT", "check_live_spec", "live_from_square_queries", "parse_live",
           "resolve_live"]
