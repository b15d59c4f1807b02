"""A resumable verification: the state file behind ``ciard verify --state`` (torch-free).

``ciard verify`` spends seconds on the pack (clean and transferred images: one forward pass
each) and minutes to an hour on its live attacks (``--live``: query-only attacks such as Square,
which query the runtime live). The state keeps what is expensive: each live attack's per-sample
outcomes, saved after its finished batches; a rerun with a matching ``VerifyKey`` measures the
cheap part again and continues each live attack after its last saved batch, or takes it whole
when it finished.

Why the clean and transfer phase is measured again rather than stored: it costs
``n * (1 + attacks)`` forward passes, less than one query per image of a live attack's budget
(``square1000`` makes up to ~3000 per image); storing its logits would grow the state from a
few kB to megabytes (logits per image, per attack); and measuring it again keeps the report's
parity, determinism check and inference timings about this process's runtime. Its clean flags
are kept (``clean_correct``) only to prove that the saved batches still apply: the live attacks
attack the clean-correct samples of their subset, so if the runtime now classifies them
differently (a non-deterministic runtime) the saved batches are discarded and the live attacks
start over (``StateEvent`` ``"discarded"``).

What must be equal for a state to serve a call: the key (artifact, pack, runtime, the subset, seed,
eps, batch size), and, for each live attack the state holds under the label asked for, its
settings (``Attack.describe()``). Live attacks are records, not key fields: a call with other live
attacks reuses the ones it shares with the state and runs the rest; records it does not ask for
stay in the file.

Each live attack is seeded per batch (batch ``i`` of the attacked samples uses ``seed + i``), so a
batch gives the same outcome whether it runs in the first call or after a resume, and a resumed
report's numbers (per-sample flags, accuracies, worst case, queries) equal an uninterrupted
run's. The key holds every setting that could change them, the batch size included (it decides
the batches).

The file (``kind: ciard.verify_state``, ``schema_version: 2``)::

    {"kind": "ciard.verify_state", "schema_version": 2,
     "key": {"artifact_sha256": "...", "pack_checksum": "sha256:...", "backend": "onnxruntime",
             "provider": "cpu", "n": 200, "eps": 0.15, "live_n": 100, "seed": 0, "batch_size": 256},
     "info": {"artifact": "...", "pack": "...", "threads": null, "created": "...", "updated": "...",
              "versions": {...}},
     "clean_correct": "1101...",            # the runtime's clean flags, one per pack sample
     "attacks": [{"label": "square1000@0.15", "name": "square1000", "eps": 0.15, "settings": {...},
                  "total": 95, "done": 64, "seconds": 812.4, "queries": 151230,
                  "per_sample": "0100...",   # per pack sample; final for the first `done` attacked ones
                  "device": "cpu", "batch_size": 32}]}

Schema 1 (ciard-deploy before live attacks were a list) keyed Square's settings
(``square_queries``, ``square_n``, ``square_p_init``); such a file is read and upgraded on load
(``upgrade``): its Square record continues as the ``square<Q>`` live attack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ciard_deploy.resume import ResumableState, StateKey
from ciard_deploy.verify.live import live_size

VERIFY_STATE_KIND = "ciard.verify_state"
#: 2: live attacks are records checked by their settings, the key holds the subset (``live_n``); 1: Square only
VERIFY_STATE_SCHEMA_VERSION = 2


@dataclass(frozen=True)
class VerifyKey(StateKey):
    """What ``ciard verify`` measures; a state serves another call only if their keys are equal.

    The live attacks themselves are not in the key: the state's records are checked one by one
    against the attacks asked for (``ResumableState.differences``).

    Attributes:
        artifact_sha256: sha256 of the artifact file (for a PyTorch checkpoint: of its weights).
        pack_checksum: the pack's ``"sha256:<hex>"`` checksum over its arrays and metadata.
        backend: ``onnxruntime``, ``tensorrt`` or ``torch``.
        provider: the execution provider or device (``cpu``, ``cuda``, ...; ``None`` where none applies).
        n: pack samples.
        eps: the pack's L-inf budget (the live attacks' too).
        live_n: samples in the live attacks' subset (``min(live_n, n)``; ``n`` when all).
        seed: seed of the subset and of the live attacks' batches (batch ``i`` uses ``seed + i``).
        batch_size: images per runtime call and per live-attack batch.
    """

    artifact_sha256: str
    pack_checksum: str
    backend: str
    provider: str | None
    n: int
    eps: float
    live_n: int
    seed: int
    batch_size: int

    FIELD_NAMES: ClassVar[Mapping[str, str]] = {"artifact_sha256": "artifact sha256", "pack_checksum": "pack checksum",
                                                "live_n": "live n", "batch_size": "batch size"}

    @classmethod
    def create(cls, *, artifact_sha256: str, pack_checksum: str, backend: str, provider: str | None, n: int,
               eps: float, live_n: int | None, seed: int, batch_size: int) -> "VerifyKey":
        """The key of one verification; ``live_n`` as given to ``run`` (None: all samples)."""
        return cls(artifact_sha256=str(artifact_sha256), pack_checksum=str(pack_checksum), backend=str(backend),
                   provider=None if provider is None else str(provider), n=int(n), eps=float(eps),
                   live_n=live_size(int(n), live_n), seed=int(seed), batch_size=int(batch_size))

    def settings_differences(self, **now: Any) -> list[str]:
        """``["seed 0 (file) vs 1 (now)", ...]`` for the fields given in ``now`` (those a caller knows)."""
        other = self.__class__(**{**self.to_dict(), **now})
        return self.differences(other)


@dataclass
class VerifyState(ResumableState):
    """Resumable state of one ``ciard verify``: its ``VerifyKey``, the runtime's clean flags, a record per live attack.

    ``attacks`` holds one record per query-only attack run live, by label. A record's ``total``
    is the number of clean-correct samples in the live subset, ``done`` how many of them (in pack
    order) finished, a whole number of batches until it is finished; ``queries`` counts the
    runtime's forward passes for them.
    """

    key: VerifyKey

    KIND: ClassVar[str] = VERIFY_STATE_KIND
    SCHEMA_VERSION: ClassVar[int] = VERIFY_STATE_SCHEMA_VERSION
    KEY: ClassVar[type[StateKey]] = VerifyKey
    WHAT: ClassVar[str] = "verify"
    SUBJECT: ClassVar[str] = "verification"

    @classmethod
    def upgrade(cls, d: dict[str, Any], version: int) -> dict[str, Any]:
        """A schema-1 file (Square alone, its settings in the key) in schema 2's form.

        ``square_n`` was the subset size when Square ran and 0 when it was off (no records then: the
        subset is taken as the whole pack). Square's record keeps its label and settings and
        continues as that live attack.
        """
        if version != 1:
            raise ValueError(f"verify state schema {version} is not one this ciard-deploy reads "
                             f"({cls.SCHEMA_VERSION}, or 1)")
        key = dict(d.get("key") or {})
        if "live_n" not in key:
            missing = [k for k in ("n", "square_queries", "square_n") if k not in key]
            if missing:
                raise ValueError(f"key lacks {', '.join(missing)}")
            queries, n = int(key.pop("square_queries")), int(key["n"])
            size = int(key.pop("square_n"))
            key.pop("square_p_init", None)
            key["live_n"] = size if queries else n
        return {**d, "key": key, "schema_version": cls.SCHEMA_VERSION}

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


__all__ = ["VERIFY_STATE_KIND", "VERIFY_STATE_SCHEMA_VERSION", "VerifyKey", "VerifyState"]
