"""Evaluation protocols: a paper's whole table of attacks as one preset (``ciard eval --protocol NAME``),
each attack under the paper's column name.

``ciard`` is the table of the CIARD paper (Lu et al., ICCV 2025; /work/shared/CIARD.md "Evaluation protocol"):
clean, FGSM, PGD-20 of step 2/255 ("PGD-SAT"), PGD-20 of step 0.003 ("PGD-TRADES"), CW-inf (30 PGD steps
on the CW margin, step 2/255), AutoAttack standard, and black-box: PGD-20 and CW-inf crafted on the
original robust teacher with step 0.003 and transferred, and Square with 100 queries. The black-box
column names are ours (the published table read here has only the white-box columns).

Torch-free: building the attacks imports nothing heavy; running them does.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from ciard_deploy.attacks.base import Attack, create_attack, parse_attack_spec
from ciard_deploy.attacks.transfer import TransferAttack
from ciard_deploy.errors import UsageError
from ciard_deploy.registry import unknown_name_message

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class ProtocolColumn:
    """One column of a paper's table: its name there, the attack spec and the options that make it the paper's."""

    column: str
    spec: str
    options: Mapping[str, Any] = field(default_factory=dict)
    transfer: bool = False  #: crafted on the ``--transfer-from`` model, evaluated on the checkpoint


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    columns: tuple[ProtocolColumn, ...]

    @property
    def needs_transfer(self) -> bool:
        return any(c.transfer for c in self.columns)


CIARD = Protocol(
    "ciard", "the CIARD paper's table: clean, FGSM, PGD-SAT, PGD-TRADES, CW-inf, AutoAttack, black-box "
             "transfer from the robust teacher (PGD, CW) and Square-100",
    (ProtocolColumn("FGSM", "fgsm"),
     ProtocolColumn("PGD-SAT", "pgd20", {"step_size": 2 / 255}),
     ProtocolColumn("PGD-TRADES", "pgdt20", {"step_size": 0.003}),
     ProtocolColumn("CW-inf", "cw30", {"step_size": 2 / 255}),
     ProtocolColumn("AA", "aa"),
     ProtocolColumn("BB-PGD", "pgdt20", {"step_size": 0.003}, transfer=True),
     ProtocolColumn("BB-CW", "cw30", {"step_size": 0.003}, transfer=True),
     ProtocolColumn("Square", "square100")))

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (CIARD,)}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; UsageError naming the known ones otherwise."""
    key = str(name).strip().lower()
    if key not in PROTOCOLS:
        raise UsageError(unknown_name_message("protocol", name, sorted(PROTOCOLS)))
    return PROTOCOLS[key]


def build_attacks(protocol: Protocol, eps: float | str, source: "torch.nn.Module | None" = None,
                  source_ref: Mapping[str, Any] | None = None, seed: int = 0) -> list[Attack]:
    """The protocol's attacks at ``eps``, in column order; transfer columns are crafted on ``source``.

    Every attack that takes a ``seed`` gets ``seed`` (PGD's random start would otherwise draw from the global
    RNG), so a protocol's table is reproducible and a transfer crafted on the model itself equals its
    white-box column.

    Raises:
        UsageError: a transfer column and no ``source``.
    """
    if protocol.needs_transfer and source is None:
        cols = ", ".join(c.column for c in protocol.columns if c.transfer)
        raise UsageError(f"--protocol {protocol.name}: the black-box columns ({cols}) are crafted on the original "
                         "robust teacher: give --transfer-from CHECKPOINT (a ciard checkpoint or run dir, a plain "
                         "state dict with --transfer-arch, or robustbench:ID)")
    out: list[Attack] = []
    for c in protocol.columns:
        attack = create_attack(c.spec, eps, **{**_seed_option(c.spec, seed), **c.options})
        out.append(TransferAttack(attack, source, source_ref or {}) if c.transfer else attack)
    return out


def _seed_option(spec: str, seed: int) -> dict[str, int]:
    params = inspect.signature(parse_attack_spec(spec)[0].load().__init__).parameters  # loads the class
    return {"seed": seed} if "seed" in params else {}


def protocol_table(protocol: Protocol, attacks: list[Attack], clean_acc: float,
                   robust_acc: Mapping[str, float]) -> list[dict[str, Any]]:
    """The paper's row: ``[{"column": "Clean", "label": "clean", "accuracy": ...}, {"column": "PGD-SAT", ...}]``."""
    rows = [{"column": "Clean", "label": "clean", "accuracy": clean_acc}]
    for c, a in zip(protocol.columns, attacks):
        rows.append({"column": c.column, "label": a.label, "accuracy": robust_acc[a.label]})
    return rows


__all__ = ["CIARD", "PROTOCOLS", "Protocol", "ProtocolColumn", "build_attacks", "get_protocol", "protocol_table"]
