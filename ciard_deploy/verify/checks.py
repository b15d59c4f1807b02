"""Sanity checks of a verify run: findings a reader must not miss, each with a stable code.

Every finding names its check, a short code CI logs can grep (``V101``), a one-line message
with the numbers, and the README section that explains it (``flags_doc.md`` style). The
compatibility check is different: a pack for another input shape or class count cannot be
evaluated at all, so it raises ``ArtifactError`` (exit 2) before any work.

numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from ciard_deploy import fingerprint
from ciard_deploy.errors import ArtifactError
from ciard_deploy.options.export import MIN_AGREEMENT
from ciard_deploy.attacks.budget import format_eps
from ciard_deploy.export.manifest import ManifestInvalid, load_manifest

Level = Literal["warning", "info"]
DOCS = "README.md#verify-warnings"


@dataclass(frozen=True)
class CheckInfo:
    code: str
    name: str
    title: str
    explanation: str


#: every check verify runs: code -> what it means (README's "verify warnings" section mirrors this)
CHECKS: dict[str, CheckInfo] = {c.code: c for c in (
    CheckInfo("V101", "live_beats_transfer", "A query-only attack on the runtime beats every transferred attack",
              "A query-only attack run live on the runtime itself (--live, e.g. Square) found more adversarial "
              "examples than every white-box attack crafted on the PyTorch model and transferred. The transferred "
              "numbers overstate robustness: a transfer gap (common for INT8/FP16: FP32 attacks transfer poorly to "
              "quantized models) or gradient masking in the reference. Trust the worst case, which includes the "
              "live attacks."),
    CheckInfo("V102", "parity_below_threshold", "Top-1 agreement with PyTorch below threshold",
              "The runtime's predictions differ from the PyTorch reference on more images than the precision "
              f"allows (FP32 {MIN_AGREEMENT['fp32']:g}, FP16 {MIN_AGREEMENT['fp16']:g}, INT8 {MIN_AGREEMENT['int8']:g} "
              "unless the manifest or --min-agreement says otherwise). "
              "Check the export (opset, quantization calibration) before trusting any accuracy."),
    CheckInfo("V103", "artifact_hash_mismatch", "Artifact differs from its manifest",
              "The artifact's sha256 is not the one manifest.json beside it records: the file was replaced or "
              "modified after export, so the manifest's provenance and parity numbers do not describe it."),
    CheckInfo("V104", "pack_model_mismatch", "Pack built for another model",
              "The pack's reference (adversarial images, logits) was made from a checkpoint whose sha256 differs "
              "from the one this artifact was exported from. Transfer numbers and parity then compare two "
              "different models; rebuild the pack from the artifact's source checkpoint."),
    CheckInfo("V105", "manifest_problem", "Manifest does not vouch for the artifact",
              "manifest.json beside the artifact does not list it, marks it failed at export, or cannot be read."),
    CheckInfo("V106", "provenance_unknown", "Cannot tell which model the artifact came from",
              "Neither a manifest nor the artifact's metadata records the source checkpoint's sha256, so verify "
              "cannot check that the pack belongs to this model."),
    CheckInfo("V107", "nondeterministic", "The runtime is not deterministic",
              "The same images gave different logits on two calls. Accuracies may move between runs; parity "
              "numbers include this noise."),
    CheckInfo("V108", "probability_outputs", "The artifact outputs probabilities, not logits",
              "Every output row is non-negative and sums to 1: the graph ends in a softmax. Accuracies are still "
              "right, but logit differences against the reference are not comparable and score-based attacks "
              "see a saturated signal."),
    CheckInfo("V109", "metadata_mismatch", "Pack and artifact metadata disagree",
              "The pack was built on another dataset, other class names, or at a different eps than the artifact "
              "records. The numbers are measured correctly but are not the ones the artifact was made for; verify "
              "fails on it unless --allow-mismatch."),
    CheckInfo("V110", "no_adversarial_evaluation", "No attack was run",
              "The pack holds no attacks and no live attack ran (--live none): only clean accuracy and parity "
              "were measured."),
    CheckInfo("V111", "whitebox_beats_transfer", "White-box attacks on the artifact beat the transferred ones",
              "The pack's attacks crafted on this artifact itself (through its twin, scored on its runtime) leave "
              "clearly fewer samples robust than the attacks crafted on the PyTorch model and transferred. The "
              "transferred numbers overstate this artifact's robustness (quantization and half precision misalign "
              "gradients); the worst case includes the white-box tier."),
    CheckInfo("V112", "upper_bound_only", "No white-box attack on this artifact: the worst case is an upper bound",
              "The pack holds no attack crafted on this artifact (it was built without --artifact for it, for another "
              "artifact, or the artifact's twin could not reproduce an op). Transferred and query-only attacks give "
              "an upper bound on its robust accuracy, not the number itself. Rebuild the pack with "
              "`ciard pack ... --artifact THIS_FILE`."),
    CheckInfo("V113", "twin_untrusted", "The artifact's twin is not faithful to the runtime",
              "The torch twin the pack's white-box attacks used agreed with the runtime on fewer than 99.5 % of "
              "images (--allow-untrusted-twin). Every candidate image was still scored on the runtime, so the "
              "white-box number is a valid upper bound, but the attacks followed misleading gradients."),
    CheckInfo("V114", "non_finite_logits", "The artifact returns NaN or infinite logits",
              "For some images the runtime returned a NaN or infinite logit: the artifact is broken (an overflow in "
              "half precision, a bad quantization scale, corrupted weights). Its predictions on those images mean "
              "nothing, so verify fails whatever the gates, --allow-mismatch or --strict say (exit 1); fix the export. "
              "Parity and determinism numbers are computed over the finite images only."),
)}
_BY_NAME = {c.name: c for c in CHECKS.values()}


@dataclass(frozen=True)
class Finding:
    """One warning or note of a verify run."""

    check: str
    level: Level
    message: str

    @property
    def code(self) -> str:
        return _BY_NAME[self.check].code

    @property
    def doc(self) -> str:
        return f"{DOCS}-{self.code.lower()}"

    def line(self) -> str:
        return f"[{self.code}] {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "check": self.check, "level": self.level, "message": self.message,
                "title": _BY_NAME[self.check].title, "doc": self.doc}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Finding":
        return cls(check=d["check"], level=d.get("level", "warning"), message=d["message"])


def finding(check: str, message: str, level: Level = "warning") -> Finding:
    if check not in _BY_NAME:
        raise KeyError(f"unknown check {check!r}")
    return Finding(check, level, message)


# --------------------------------------------------------------------------- compatibility (errors)
def check_compatible(pack_shape: Sequence[int], pack_classes: int, backend: Any, artifact: str | Path) -> int:
    """Raises ArtifactError when the artifact cannot take the pack's images or gives another class count.

    Returns the artifact's number of classes (one image is run when neither the graph nor the
    metadata says).
    """
    name = Path(artifact).name
    spec = backend.input_spec
    if spec is not None and tuple(spec.shape) != tuple(pack_shape):
        raise ArtifactError(f"the pack holds images of shape {tuple(pack_shape)} (C, H, W) but {name} takes "
                            f"{tuple(spec.shape)}: the pack was built for another model")
    k = backend.num_classes or (backend.metadata or {}).get("num_classes")
    if not k:
        k = int(backend.predict(np.zeros((1, *pack_shape), np.float32)).shape[1])
    if int(k) != int(pack_classes):
        raise ArtifactError(f"the pack has {pack_classes} classes but {name} outputs {int(k)}: "
                            "the pack was built for another model")
    return int(k)


# --------------------------------------------------------------------------- provenance
def provenance(artifact: str | Path, metadata: Mapping[str, Any], pack_model_sha256: str
               ) -> tuple[dict[str, Any], list[Finding], dict[str, float]]:
    """Artifact <-> manifest <-> pack hashes.

    Returns:
        (a report section, findings, the manifest's agreement thresholds by precision or {}).
    """

    p = Path(artifact)
    findings: list[Finding] = []
    digest = fingerprint.sha256_file(p) if p.is_file() else None
    out: dict[str, Any] = {"sha256": digest, "size": p.stat().st_size if p.is_file() else None, "manifest": None,
                           "metadata_source_sha256": metadata.get("source_sha256"),
                           "pack_model_sha256": pack_model_sha256 or None, "source_sha256": None,
                           "pack_matches_source": None}
    thresholds: dict[str, float] = {}
    manifest_file = (p.parent if p.is_file() else p) / "manifest.json"
    source_sha = metadata.get("source_sha256")
    if p.is_file() and manifest_file.is_file():
        section: dict[str, Any] = {"path": str(manifest_file), "listed": False, "expected_sha256": None,
                                   "sha256_matches": None, "status": None, "source_sha256": None}
        out["manifest"] = section

        try:
            manifest = load_manifest(manifest_file)
        except ManifestInvalid:
            raise  # a ciard manifest that does not validate (a wrong type, a file outside its folder): exit 2
        except Exception as e:  # noqa: BLE001  an unreadable manifest is a warning here, not a stop
            findings.append(finding("manifest_problem", f"{manifest_file.name} beside {p.name} cannot be read "
                                                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"))
        else:
            section["source_sha256"] = manifest.source.get("sha256")
            source_sha = section["source_sha256"] or source_sha
            thresholds = {k: float(v) for k, v in (manifest.thresholds or {}).items()}
            record = next((a for a in manifest.artifacts if a.file == p.name), None)
            if record is None:
                findings.append(finding("manifest_problem", f"{manifest_file.name} beside {p.name} does not list it "
                                                            f"(it lists {', '.join(a.file for a in manifest.artifacts) or 'nothing'})"))
            else:
                section.update(listed=True, expected_sha256=record.sha256, sha256_matches=record.sha256 == digest,
                               status=record.status)
                if record.sha256 != digest:
                    findings.append(finding("artifact_hash_mismatch",
                                            f"{p.name} has sha256 {str(digest)[:12]}... but {manifest_file.name} "
                                            f"records {str(record.sha256)[:12]}...: modified or replaced after export"))
                if record.status == "failed":
                    findings.append(finding("manifest_problem", f"{manifest_file.name} marks {p.name} as failed at "
                                                                "export (parity below its threshold)"))
            if metadata.get("source_sha256") and section["source_sha256"] \
                    and metadata["source_sha256"] != section["source_sha256"]:
                findings.append(finding("manifest_problem", f"{p.name}'s own metadata names source "
                                                            f"{str(metadata['source_sha256'])[:12]}... but the manifest "
                                                            f"{str(section['source_sha256'])[:12]}..."))
    out["source_sha256"] = source_sha
    if source_sha and pack_model_sha256:
        out["pack_matches_source"] = source_sha == pack_model_sha256
        if source_sha != pack_model_sha256:
            findings.append(finding("pack_model_mismatch",
                                    f"the pack was built from checkpoint {pack_model_sha256[:12]}... but {p.name} was "
                                    f"exported from {source_sha[:12]}...: transfer and parity compare two models"))
    elif pack_model_sha256:
        findings.append(finding("provenance_unknown", f"no manifest beside {p.name} and no source hash in its metadata: "
                                                      "cannot check that the pack belongs to this model", "info"))
    return out, findings, thresholds


def metadata_mismatches(pack_meta: Mapping[str, Any], metadata: Mapping[str, Any]) -> list[Finding]:
    """Dataset, class names and eps of the pack vs what the artifact records (warnings, not errors: the
    report's policy decides whether they fail it)."""
    out = []
    model = pack_meta.get("model", {})
    ds_pack, ds_art = pack_meta.get("data", {}).get("dataset"), metadata.get("dataset")
    if ds_pack and ds_art and ds_pack != ds_art:
        out.append(finding("metadata_mismatch", f"the pack samples {ds_pack} but the artifact was made for {ds_art}"))
    cls_pack, cls_art = model.get("classes"), metadata.get("classes")
    if cls_pack and cls_art and list(cls_pack) != list(cls_art):
        out.append(finding("metadata_mismatch", "the pack's class names differ from the artifact's"))
    eps_art = metadata.get("eps")
    if eps_art is None:
        return out

    # the pack's eps is finite and > 0 (load_pack); the artifact's is what its metadata says, maybe anything
    if isinstance(eps_art, bool) or not isinstance(eps_art, (int, float)) or not math.isfinite(eps_art) or eps_art < 0:
        out.append(finding("metadata_mismatch", f"the artifact records eps {str(eps_art)[:40]!r}, not a budget: the "
                                                "pack's eps cannot be checked against it"))
    elif abs(float(eps_art) - float(pack_meta.get("eps", eps_art))) > 1e-9:
        out.append(finding("metadata_mismatch", f"the pack's attacks use eps {format_eps(float(pack_meta['eps']))}, "
                                                f"the artifact records eps {format_eps(float(eps_art))}: the gates "
                                                "judge another budget than the artifact was made for"))
    return out


# --------------------------------------------------------------------------- runtime behaviour
def check_determinism(first: np.ndarray, second: np.ndarray) -> Finding | None:
    """Compares logits of two identical calls (NaN/inf in the same places count as equal: V114 reports
    them; the difference is over the rows finite in both calls, never a NaN)."""
    if first.shape == second.shape and np.array_equal(first, second, equal_nan=True):
        return None
    if first.shape != second.shape:
        return finding("nondeterministic", f"two calls on the same {len(first)} images gave outputs of shapes "
                                           f"{first.shape} and {second.shape}")
    a, b = first.astype(np.float64), second.astype(np.float64)
    finite = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    diff = float(np.abs(a[finite] - b[finite]).max()) if finite.any() else 0.0
    flips = int((first.argmax(1) != second.argmax(1)).sum())
    odd = int((~finite).sum())
    level: Level = "warning" if flips or odd else "info"
    where = f" of the rows finite in both (NaN/inf in {odd} rows of one call or both)" if odd else ""
    return finding("nondeterministic", f"two calls on the same {len(first)} images differ by up to {diff:.3g} in the "
                                       f"logits{where} ({flips} top-1 changes)", level)


def check_finite(logits: Mapping[str, np.ndarray]) -> Finding | None:
    """V114: the images (clean and each attack's, by label) for which the runtime returned a NaN or an
    infinite logit; such a warning fails verify whatever the policy (``gates.DEFECT_CODES``)."""
    counts = {label: (int((~np.isfinite(np.asarray(x, np.float64)).all(axis=1)).sum()), len(x))
              for label, x in logits.items() if len(x)}
    bad = {label: c for label, c in counts.items() if c[0]}
    if not bad:
        return None
    total, n = sum(c[0] for c in bad.values()), sum(c[1] for c in counts.values())
    parts = ", ".join(f"{label} {k}/{m}" for label, (k, m) in bad.items())
    return finding("non_finite_logits", f"the artifact returns NaN/inf logits for {total} of {n} images ({parts})")


def check_probabilities(logits: np.ndarray) -> Finding | None:
    """Flags outputs that look like softmax probabilities (non-negative rows summing to 1)."""
    if len(logits) < 2 or logits.min() < 0:
        return None
    if np.allclose(logits.sum(axis=1), 1.0, atol=1e-3):
        return finding("probability_outputs", "every output row is non-negative and sums to 1: the graph ends in a "
                                              "softmax; export logits instead")
    return None


def check_live(live_label: str, live_acc: float, transfer: Mapping[str, float], n: int) -> Finding | None:
    """The strongest live (query-only) attack beats every transferred attack on the same images (V101).

    Args:
        live_label: the live attack that left the fewest samples robust (``square1000@8/255``).
        live_acc: its robust accuracy on the live subset.
        transfer: each transferred attack's robust accuracy on the same subset.
        n: samples in the subset.
    """
    if not transfer:
        return None
    best_label, best = min(transfer.items(), key=lambda kv: kv[1])
    if live_acc < best:
        return finding("live_beats_transfer",
                       f"{live_label} on the runtime leaves {live_acc:.2%} robust, below every transferred attack "
                       f"(best: {best_label} {best:.2%}) on the same {n} images: the transferred numbers overstate "
                       "robustness (transfer gap or gradient masking)")
    return None


#: points by which the white-box tier must beat every transferred attack before V111 fires
WHITEBOX_GAP = 0.02


def check_whitebox(wb_label: str, wb_acc: float, transfer: Mapping[str, float], n: int) -> Finding | None:
    """The artifact's own white-box attacks beat every transferred attack by ``WHITEBOX_GAP`` or more."""
    if not transfer:
        return None
    best_label, best = min(transfer.items(), key=lambda kv: kv[1])
    if best - wb_acc >= WHITEBOX_GAP - 1e-12:
        return finding("whitebox_beats_transfer",
                       f"{wb_label} on this artifact leaves {wb_acc:.2%} robust, {100 * (best - wb_acc):.1f} pt below "
                       f"the best transferred attack ({best_label} {best:.2%}) on the same {n} images: transfer "
                       "overstates this artifact's robustness")
    return None


def check_coverage(worst_case: Mapping[str, Any] | None, section: Any) -> list[Finding]:
    """V112 when the worst case is only an upper bound; V113 when the white-box tier used an untrusted twin."""
    out: list[Finding] = []
    if worst_case and worst_case.get("upper_bound"):
        out.append(finding("upper_bound_only", f"{worst_case.get('upper_bound_reason')}: the worst case "
                                               f"{worst_case.get('acc', 0):.2%} is an upper bound on this artifact's "
                                               "robust accuracy (rebuild the pack with --artifact for it)"))
    twin = (section.meta.get("twin") or {}) if section is not None and not section.skipped else {}
    if twin and not twin.get("trusted", True):
        agreement = (twin.get("fidelity") or {}).get("agreement")
        out.append(finding("twin_untrusted", f"the twin behind {section.meta.get('label')} agreed with the runtime on "
                                             f"{agreement:.2%} of images, below 99.5 %" if isinstance(agreement, float)
                           else f"the twin behind {section.meta.get('label')} was not trusted"))
    return out


def check_parity(label: str, agreement: float, flips: int, n: int, threshold: float) -> Finding | None:
    if agreement + 1e-12 >= threshold:
        return None
    return finding("parity_below_threshold", f"top-1 agreement with PyTorch on {label} images is {agreement:.2%} "
                                             f"({flips}/{n} flipped), below {threshold:.2%}")


#: agreement below which verify warns, by precision: export's table (a manifest's own thresholds win); a
#: precision the artifact does not record is held to the loosest, INT8's
DEFAULT_AGREEMENT = {**MIN_AGREEMENT, "unknown": MIN_AGREEMENT["int8"]}


def agreement_threshold(precision: str, manifest_thresholds: Mapping[str, float], gate: float | None) -> float:
    if gate is not None:
        return float(gate)
    if precision in manifest_thresholds:
        return float(manifest_thresholds[precision])
    return DEFAULT_AGREEMENT.get(precision, DEFAULT_AGREEMENT["unknown"])


__all__ = ["CHECKS", "CheckInfo", "DEFAULT_AGREEMENT", "Finding", "agreement_threshold", "check_compatible",
           "check_determinism", "check_finite", "check_live", "check_parity", "check_probabilities", "finding",
           "metadata_mismatches", "provenance"]
