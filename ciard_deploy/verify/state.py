"""A resumable verification: the state file behind ``ciard verify --state`` (torch-free).

``ciard verify`` spends seconds on the pack (clean and transferred images: one forward pass
each) and minutes to an hour on Square, which queries the runtime live. The state keeps what
is expensive: Square's per-sample outcomes, saved after its finished batches; a rerun with a
matching ``VerifyKey`` measures the cheap part again and continues Square after its last saved
batch, or takes it whole when it finished.

Why the clean and transfer phase is measured again rather than stored: it costs
``n * (1 + attacks)`` forward passes, less than one query per image of Square's budget
(``square1000`` makes up to ~3000 per image); storing its logits would grow the state from a
few kB to megabytes (logits per image, per attack); and measuring it again keeps the report's
parity, determinism check and inference timings about this process's runtime. Its clean flags
are kept (``clean_correct``) only to prove that Square's saved batches still apply: Square
attacks the clean-correct samples of its subset, so if the runtime now classifies them
differently (a non-deterministic runtime) the saved batches are discarded and Square starts
over (``StateEvent`` ``"discarded"``).

Square is seeded per batch (batch ``i`` of the attacked samples uses ``seed + i``), so a batch
gives the same outcome whether it runs in the first call or after a resume, and a resumed
report's numbers (per-sample flags, accuracies, worst case, queries) equal an uninterrupted
run's. The key holds every setting that could change them, the batch size included (it decides
the batches).

The file (``kind: ciard.verify_state``)::

    {"kind": "ciard.verify_state", "schema_version": 1,
     "key": {"artifact_sha256": "...", "pack_checksum": "sha256:...", "backend": "onnxruntime",
             "provider": "cpu", "n": 200, "eps": 0.15, "square_queries": 1000, "square_n": 100,
             "square_p_init": 0.8, "seed": 0, "batch_size": 256},
     "info": {"artifact": "...", "pack": "...", "threads": null, "created": "...", "updated": "...",
              "versions": {...}},
     "clean_correct": "1101...",            # the runtime's clean flags, one per pack sample
     "attacks": [{"label": "square1000@0.15", "name": "square1000", "eps": 0.15, "settings": {...},
                  "total": 95, "done": 64, "seconds": 812.4, "queries": 151230,
                  "per_sample": "0100...",   # per pack sample; final for the first `done` attacked ones
                  "device": "cpu", "batch_size": 32}]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ciard_deploy.attacks.state import ResumableState, StateKey

VERIFY_STATE_KIND = "ciard.verify_state"
VERIFY_STATE_SCHEMA_VERSION = 1


def square_size(n: int, square_queries: int, square_n: int | None) -> int:
    """How many pack samples Square's subset holds: 0 when Square is off, else ``min(square_n, n)`` (all if None)."""
    if not square_queries:
        return 0
    return n if square_n is None else min(int(square_n), n)


@dataclass(frozen=True)
class VerifyKey(StateKey):
    """What ``ciard verify`` measures; a state serves another call only if their keys are equal.

    Attributes:
        artifact_sha256: sha256 of the artifact file (for a PyTorch checkpoint: of its weights).
        pack_checksum: the pack's ``"sha256:<hex>"`` checksum over its arrays and metadata.
        backend: ``onnxruntime``, ``tensorrt`` or ``torch``.
        provider: the execution provider or device (``cpu``, ``cuda``, ...; ``None`` where none applies).
        n: pack samples.
        eps: the pack's L-inf budget (Square's too).
        square_queries: Square's query budget per image (0: Square off).
        square_n: samples in Square's subset (0 when off).
        square_p_init: Square's initial square size.
        seed: seed of Square's subset and of its batches (batch ``i`` uses ``seed + i``).
        batch_size: images per runtime call and per Square batch.
    """

    artifact_sha256: str
    pack_checksum: str
    backend: str
    provider: str | None
    n: int
    eps: float
    square_queries: int
    square_n: int
    square_p_init: float
    seed: int
    batch_size: int

    FIELD_NAMES: ClassVar[Mapping[str, str]] = {"artifact_sha256": "artifact sha256", "pack_checksum": "pack checksum",
                                                "square_queries": "Square queries", "square_n": "Square n",
                                                "square_p_init": "Square p_init", "batch_size": "batch size"}

    @classmethod
    def create(cls, *, artifact_sha256: str, pack_checksum: str, backend: str, provider: str | None, n: int,
               eps: float, square_queries: int, square_n: int | None, square_p_init: float, seed: int,
               batch_size: int) -> "VerifyKey":
        """The key of one verification; ``square_n`` as given to ``run`` (None: all samples)."""
        return cls(artifact_sha256=str(artifact_sha256), pack_checksum=str(pack_checksum), backend=str(backend),
                   provider=None if provider is None else str(provider), n=int(n), eps=float(eps),
                   square_queries=int(square_queries), square_n=square_size(n, square_queries, square_n),
                   square_p_init=float(square_p_init), seed=int(seed), batch_size=int(batch_size))

    def settings_differences(self, **now: Any) -> list[str]:
        """``["seed 0 (file) vs 1 (now)", ...]`` for the fields given in ``now`` (those a caller knows)."""
        other = self.__class__(**{**self.to_dict(), **now})
        return self.differences(other)


@dataclass
class VerifyState(ResumableState):
    """Resumable state of one ``ciard verify``: its ``VerifyKey``, the runtime's clean flags, Square's record.

    ``attacks`` holds one record per query-only attack run live (today: Square). A record's
    ``total`` is the number of clean-correct samples in Square's subset, ``done`` how many of
    them (in pack order) finished, a whole number of batches until it is finished; ``queries``
    counts the runtime's forward passes for them.
    """

    key: VerifyKey

    KIND: ClassVar[str] = VERIFY_STATE_KIND
    SCHEMA_VERSION: ClassVar[int] = VERIFY_STATE_SCHEMA_VERSION
    KEY: ClassVar[type[StateKey]] = VerifyKey
    WHAT: ClassVar[str] = "verify"
    SUBJECT: ClassVar[str] = "verification"

    def validate(self) -> None:
        super().validate()
        clean = int(self.clean_correct.sum()) if self.clean_correct is not None else 0
        batch = self.key.batch_size
        if batch < 1:
            raise ValueError(f"batch_size {batch} must be >= 1")
        for a in self.attacks:
            if a.total > clean:
                raise ValueError(f"{a.label}: total {a.total} is more than the {clean} clean-correct samples")
            if not a.finished and a.done % batch:
                raise ValueError(f"{a.label}: done {a.done} is not a whole number of batches of {batch}")
            if a.queries is None:
                raise ValueError(f"{a.label}: no query count")


__all__ = ["VERIFY_STATE_KIND", "VerifyKey", "VerifyState", "square_size"]
