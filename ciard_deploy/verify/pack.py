"""The robustness pack: what a device needs to re-measure a model's robustness on its runtime.

Built on the machine with PyTorch (``build_pack``), checked and read anywhere (``load_pack``,
numpy only). One ``.npz`` file, written atomically, never pickled::

    x                float32 (N, C, H, W) in [0, 1]   clean test images (seeded, class-stratified)
    y                int64   (N,)                     labels
    logits_clean     float32 (N, K)                   the PyTorch model's logits on x
    adv_<i>          float32 (N, C, H, W)             attack i's images, crafted on the PyTorch model,
                                                      each within eps_i (L-inf) of its clean image
    logits_adv_<i>   float32 (N, K)                   the PyTorch model's logits on adv_<i>
    ref_correct      bool    (1 + A, N)               row 0: clean correct; row 1 + i: correct on clean
                                                      and on adv_<i> (AutoAttack's per-sample flags)
    art_<j>_adv      float32 (N, C, H, W)             (schema 2) white-box attacks on exported artifact j: per sample
                                                      the first image its runtime misclassified (else the clean one)
    art_<j>_logits   float32 (N, K)                   that runtime's logits on art_<j>_adv when the pack was built
    art_<j>_logits_clean float32 (N, K)               that runtime's logits on x
    art_<j>_found_by int8    (N,)                     index of the attack that broke the sample; -1 robust, -2 clean wrong
    meta             <U      (1,)                     JSON metadata (below)
    checksum         <U      (1,)                     "sha256:<hex>" over every other array

``meta`` holds: ``format``, ``schema_version``, ``tool``, ``created``; ``model`` (source,
checkpoint, sha256, metadata_sha256, arch, recipe_hash, role, num_classes, classes,
input_shape, dataset, eps); ``data`` (dataset, split, n, seed, sampling, indices); ``eps``,
``eps_label``; ``attacks`` (index, name, label, eps, settings, seconds, source);
``reference`` (backend, device, precision, clean_acc, robust_acc by label,
worst_case_label, worst_case_acc); ``versions``; (schema 2) ``artifacts``: one record per
exported artifact the pack attacked white-box (``name``, ``sha256``, ``precision``, ``runtime``,
``eps``, ``label``, ``attacks`` with per-attack records, ``twin`` with its measured fidelity,
``clean_acc``, ``robust_acc``, ``seconds``; a record with ``skipped`` says why no white-box
attack was possible, e.g. an op the twin cannot reproduce). Schema 1 packs are still read.
Attack ``i`` is ``adv_<i>``: labels such as ``pgd20@8/255`` hold a ``/`` and are not used as array names.

Reading a pack (bounded, validated): ``verify/pack_load.py``; the partial results of a resumable
build: ``verify/pack_partial.py``; the builder (torch): ``verify/pack_build.py``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ciard_deploy.errors import UsageError
from ciard_deploy.fingerprint import checksum_arrays, sha256_file
from ciard_deploy.io import atomic_path
from ciard_deploy.attacks.budget import EpsChoice
from ciard_deploy.verify.report import check_writable

log = logging.getLogger(__name__)

FORMAT = "ciard-robustness-pack"
SCHEMA_VERSION = 2
#: slack on the L-inf budget for float32 rounding of ``x +- eps`` (as in attacks.cascade)
EPS_TOLERANCE = 1e-6

Progress = Callable[..., None]


def top1_correct(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per image: whether its top-1 class is its label."""
    return np.asarray(logits).argmax(1) == y


def reference_flags(y: np.ndarray, logits_clean: np.ndarray, logits_adv: Sequence[np.ndarray]) -> np.ndarray:
    """(1 + A, N) bool: clean correct, then correct on clean *and* under each attack."""
    clean = top1_correct(logits_clean, y)
    rows = [clean] + [clean & top1_correct(la, y) for la in logits_adv]
    return np.stack(rows).astype(bool) if rows else np.zeros((1, len(y)), bool)


@dataclass
class RobustnessPack:
    """A pack in memory: images, labels, the reference logits and the metadata.

    Attributes:
        x: clean images, float32 NCHW in [0, 1].
        y: int64 labels.
        logits_clean: the PyTorch model's logits on ``x``.
        adv: one array of adversarial images per attack, in ``meta["attacks"]`` order.
        logits_adv: the PyTorch model's logits on each ``adv`` array.
        meta: the metadata dict (see the module docstring).
        path: the file it was loaded from or saved to.
        checksum: ``"sha256:<hex>"`` of the arrays and metadata (set by ``save_pack``/``load_pack``).
    """

    x: np.ndarray
    y: np.ndarray
    logits_clean: np.ndarray
    adv: list[np.ndarray]
    logits_adv: list[np.ndarray]
    meta: dict[str, Any]
    path: Path | None = None
    checksum: str = ""
    file_sha256: str = field(default="", repr=False)
    artifacts: list["ArtifactSection"] = field(default_factory=list)

    # ---------------------------------------------------------------- views
    @property
    def n(self) -> int:
        return int(len(self.y))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(self.meta["model"]["num_classes"])

    @property
    def eps(self) -> float:
        return float(self.meta["eps"])

    @property
    def attacks(self) -> list[dict[str, Any]]:
        return list(self.meta["attacks"])

    @property
    def attack_labels(self) -> list[str]:
        return [a["label"] for a in self.meta["attacks"]]

    @property
    def model_sha256(self) -> str:
        return str(self.meta["model"].get("sha256") or "")

    @property
    def reference(self) -> dict[str, Any]:
        return dict(self.meta["reference"])

    @property
    def ref_flags(self) -> np.ndarray:
        """(1 + A, N) bool per-sample reference flags (clean correct; robust under each attack)."""
        return reference_flags(self.y, self.logits_clean, self.logits_adv)

    def artifact_for(self, sha256: str | None) -> "ArtifactSection | None":
        """The white-box section made for the artifact with this sha256 (None: the pack has none)."""
        if not sha256:
            return None
        return next((a for a in self.artifacts if a.sha256 == sha256), None)

    def summary(self) -> dict[str, Any]:
        """Everything but the arrays: for reports (path, hashes, sample, model, attacks, reference)."""
        return {"path": str(self.path) if self.path else None, "file_sha256": self.file_sha256 or None,
                "checksum": self.checksum or None, "format": self.meta.get("format"),
                "schema_version": self.meta.get("schema_version"), "n": self.n, "eps": self.eps,
                "eps_label": self.meta.get("eps_label"), **self._training_eps(),
                "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "model": self.meta["model"],
                "data": {k: v for k, v in self.meta["data"].items() if k != "indices"},
                "attacks": self.attacks, "artifacts": list(self.meta.get("artifacts", [])),
                "reference": self.reference, "versions": self.meta.get("versions", {}),
                "created": self.meta.get("created"), "tool": self.meta.get("tool")}

    def _training_eps(self) -> dict[str, Any]:
        """``training_eps`` (what the source checkpoint records, or None) and ``eps_warning`` when the
        pack's budget differs from it."""

        recorded = (self.meta.get("model") or {}).get("eps")
        choice = EpsChoice(self.eps, None if recorded is None else float(recorded), True)
        return {"training_eps": choice.training_eps, "eps_warning": choice.warning}

    # ---------------------------------------------------------------- arrays
    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays as stored (without ``checksum``)."""
        out: dict[str, np.ndarray] = {"x": self.x, "y": self.y, "logits_clean": self.logits_clean}
        for i, (a, la) in enumerate(zip(self.adv, self.logits_adv)):
            out[f"adv_{i}"] = a
            out[f"logits_adv_{i}"] = la
        out["ref_correct"] = self.ref_flags
        for sec in self.artifacts:
            if sec.x_adv is not None:
                out.update(sec.arrays())
        out["meta"] = np.array([json.dumps(self.meta, sort_keys=True)])
        return out


@dataclass
class ArtifactSection:
    """White-box attacks made for one exported artifact (``meta["artifacts"][index]``, arrays ``art_<index>_*``).

    Attributes:
        meta: the record (name, sha256, precision, runtime, eps, label, attacks, twin, ...; or ``skipped``).
        x_adv: per sample the first image the artifact's runtime misclassified (else the clean one); None
            when the section is ``skipped``.
        logits: the runtime's logits on ``x_adv`` when the pack was built.
        logits_clean: the runtime's logits on the clean images then.
        found_by: int8 per sample: the attack index that broke it, -1 robust, -2 clean already wrong.
    """

    meta: dict[str, Any]
    x_adv: np.ndarray | None = None
    logits: np.ndarray | None = None
    logits_clean: np.ndarray | None = None
    found_by: np.ndarray | None = None

    @property
    def index(self) -> int:
        return int(self.meta["index"])

    @property
    def sha256(self) -> str:
        return str(self.meta.get("sha256") or "")

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or "")

    @property
    def skipped(self) -> str | None:
        """Why no white-box attack was made for the artifact (None: it was)."""
        return self.meta.get("skipped") or None

    def arrays(self) -> dict[str, np.ndarray]:
        j = self.index
        return {f"art_{j}_adv": self.x_adv, f"art_{j}_logits": self.logits,  # type: ignore[dict-item]
                f"art_{j}_logits_clean": self.logits_clean, f"art_{j}_found_by": self.found_by}


ARTIFACT_ARRAYS = ("adv", "logits", "logits_clean", "found_by")


# --------------------------------------------------------------------------- save
def check_output(path: str | os.PathLike, force: bool = False, flag: str = "--out") -> Path:
    """Refuses an output path that exists (without ``force``), is a folder, or cannot be written."""

    p = Path(path)
    if p.exists() and not p.is_dir() and not force:
        raise UsageError(f"{flag} {p} already exists; pass --force to overwrite it")
    check_writable(p, flag)
    return p


def save_pack(pack: RobustnessPack, path: str | os.PathLike, force: bool = False) -> Path:
    """Writes ``pack`` to ``path`` atomically (temp file + rename; plain ``.npz``, no pickle).

    Raises:
        UsageError: ``path`` exists and ``force`` is false, or cannot be written.
    """

    p = check_output(path, force)
    arrays = pack.arrays()
    arrays["checksum"] = np.array([checksum_arrays(arrays)])
    with atomic_path(p) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)
    pack.path, pack.checksum, pack.file_sha256 = p, str(arrays["checksum"][0]), sha256_file(p)
    return p


__all__ = ["ARTIFACT_ARRAYS", "ArtifactSection", "EPS_TOLERANCE", "FORMAT", "SCHEMA_VERSION", "RobustnessPack",
           "check_output", "reference_flags", "save_pack", "top1_correct"]
