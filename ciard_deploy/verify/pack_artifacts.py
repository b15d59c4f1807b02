"""The white-box sections of a pack: attacks made on each exported artifact, on the machine with torch.

For every artifact given to ``ciard pack --artifact`` (and every format ``ciard run`` exports),
``build_section``:

1. opens the artifact in its runtime and checks that it was exported from the pack's model
   (its recorded source sha256) and fits the pack (input shape, classes);
2. builds its twin from the exported file (``ciard_deploy.twin``): an op the twin cannot
   reproduce gives a *skipped* section that names it (verify then reports the artifact's
   number as an upper bound: transfer and query-only attacks only), never a crash;
3. measures the twin's fidelity against the runtime on the clean images, on adversarial images
   (the pack's first transferred attack) and on random points of the eps ball; below
   ``twin.fidelity.TRUST_THRESHOLD`` top-1 agreement the build stops with exit 2 unless
   ``allow_untrusted_twin`` (then the section says the twin was not trusted);
4. runs the white-box cascade through ``attacks.artifact.attack_artifact``: gradients from the
   twin, every iterate scored on the runtime, the first misclassified image kept per sample.

Imports torch only inside functions (this module sits in the torch-free ``verify`` package, but
only ``build_pack`` calls it).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ciard_deploy.errors import ArtifactError, UsageError
from ciard_deploy.verify.pack import ArtifactSection
from ciard_deploy.attacks.budget import format_eps
from ciard_deploy.fingerprint import sha256_file
from ciard_deploy.runtime import open_backend
from ciard_deploy.twin import fidelity as twin_fidelity
from ciard_deploy.verify import checks

log = logging.getLogger(__name__)

#: Suffixes a twin can be built from (TensorRT engines are opaque: attack their ONNX file).
TWIN_SUFFIXES = (".onnx",)


def check_artifacts(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Refuses, before any work, artifacts that are missing, folders or listed twice."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.is_file():
            raise UsageError(f"--artifact {p}: " + ("a folder, not an exported artifact" if p.is_dir() else "not found"))
        if any(p.resolve() == q.resolve() for q in out):
            raise UsageError(f"--artifact {p} is listed twice")
        out.append(p)
    return out


def preflight(paths: Sequence[Path], *, model_sha256: str, input_shape: Sequence[int], num_classes: int,
              threads: int | None = None, clean: np.ndarray | None = None, eps: float | None = None, seed: int = 0,
              allow_untrusted_twin: bool = False) -> None:
    """Before any attack runs: each artifact opens in its runtime, fits the pack and comes from its model,
    and (given ``clean`` images and ``eps``) its twin agrees with the runtime on them and on random points
    of the eps ball.

    Raises:
        ArtifactError: an artifact that does not open, takes other images, outputs another number
            of classes, records another source checkpoint, or whose twin is below the fidelity
            threshold without ``allow_untrusted_twin`` (exit 2, nothing written).
        BackendUnavailable: its runtime is not installed here (exit 3).
    """

    for path in paths:
        backend = open_backend(path, **({"threads": threads} if threads else {}))
        try:
            checks.check_compatible(tuple(input_shape), num_classes, backend, path)
            _check_source(path.name, (backend.metadata or {}).get("source_sha256"), model_sha256)
            if clean is not None and eps is not None and path.suffix.lower() in TWIN_SUFFIXES:
                twin = _twin_or_none(path)
                if twin is not None:
                    sets = {"clean": clean, "random_in_ball": twin_fidelity.random_in_ball(clean, eps, seed)}
                    twin = best_twin(path, twin, backend.predict, sets)
                    _trusted_or_refuse(path.name, twin, backend.predict, sets, allow_untrusted_twin)
        finally:
            backend.close()


def _twin_or_none(path: Path) -> Any:
    """The artifact's twin, or None (with a log line) where it has an op the twin cannot reproduce."""
    from ciard_deploy.twin import TwinUnsupported, build_twin  # imports torch (twin.graph)

    try:
        return build_twin(path)
    except TwinUnsupported as e:
        log.warning("%s; the pack holds no white-box attack for it", e)
        return None


def best_twin(path: Path, twin: Any, predict: Callable[..., Any], sets: dict[str, np.ndarray],
              batch_size: int = 256) -> Any:
    """For an FP16 graph, the half-precision mode whose twin agrees best with this runtime.

    onnxruntime's CPU provider runs FP16 graphs in float32 on the float16 weights (no float16
    kernels for these ops on x86), CUDA/TensorRT compute in float16: the twin's ``"float32"`` and
    ``"emulate"`` modes reproduce one each, so both are measured on ``sets`` and the closer one
    (agreement first, then the largest logit difference) is kept. Other precisions: ``twin``.
    """
    if getattr(twin, "precision", "") != "fp16":
        return twin
    from ciard_deploy.twin import build_twin  # imports torch (twin.graph)

    fid = twin_fidelity
    candidates = [twin, build_twin(path, half="emulate" if twin.half_mode != "emulate" else "float32")]
    scored = [(fid.measure_fidelity(t, predict, sets, batch_size=batch_size), t) for t in candidates]
    best = max(scored, key=lambda ft: (ft[0].agreement, -ft[0].max_abs_diff))
    log.debug("fp16 twin of %s: %s", path.name, ", ".join(f"{t.half_mode} {f.line()}" for f, t in scored))
    return best[1]


def _trusted_or_refuse(name: str, twin: Any, predict: Callable[..., Any], sets: dict[str, np.ndarray],
                       allow_untrusted: bool, batch_size: int = 256) -> Any:
    """The twin's ``TwinFidelity`` on ``sets``; ArtifactError below ``TRUST_THRESHOLD`` unless allowed."""
    fid_mod = twin_fidelity
    fidelity = fid_mod.measure_fidelity(twin, predict, sets, batch_size=batch_size)
    fidelity.threshold = fid_mod.TRUST_THRESHOLD  # read now: a caller may have changed it
    if not fidelity.trusted and not allow_untrusted:
        raise ArtifactError(f"--artifact {name}: its twin is not faithful to the runtime ({fidelity.line()}); "
                            "white-box attacks through it would not measure this artifact. Pass "
                            "--allow-untrusted-twin to attack through it anyway (reports say so)")
    return fidelity


def _check_source(name: str, source: str | None, model_sha256: str) -> None:
    if source and model_sha256 and source != model_sha256:
        raise ArtifactError(f"--artifact {name} was exported from another model (source sha256 {source[:12]}, "
                            f"the pack's checkpoint {model_sha256[:12]}): build its pack from its own checkpoint")


def section_label(names: Sequence[str], eps: float) -> str:
    """``wb(apgd-ce+apgd-t+fab-t+mtpgd100)@0.15``: white-box on the artifact, by attack and budget."""

    return f"wb({'+'.join(names)})@{format_eps(eps)}"


def build_section(index: int, artifact: Path, x: np.ndarray, y: np.ndarray, *, eps: float, model_sha256: str,
                  num_classes: int, attacks: Sequence[Any], seed: int = 0, batch_size: int = 256, device: str = "cpu",
                  threads: int | None = None, adversarial: np.ndarray | None = None,
                  allow_untrusted_twin: bool = False, progress: Callable[..., None] | None = None) -> ArtifactSection:
    """White-box attacks on one artifact (see the module docstring); returns its pack section.

    Args:
        index: the section's position in the pack.
        artifact: the exported file.
        x, y: the pack's clean images and labels.
        eps: the pack's L-inf budget.
        model_sha256: the pack's source checkpoint; the artifact must have been exported from it.
        num_classes: the pack's classes (the artifact must output as many).
        attacks: white-box attacks (``attacks.artifact.create_artifact_attacks``).
        seed: seed of the random in-ball fidelity images and of every attack.
        batch_size: images per attack and runtime call.
        device: where the twin runs.
        threads: onnxruntime intra-op threads (None: its default).
        adversarial: adversarial images for the fidelity check (e.g. the pack's first transferred attack).
        allow_untrusted_twin: attack through a twin below the fidelity threshold instead of refusing.
        progress: ``callback(done, total, stage=...)``.

    Raises:
        ArtifactError: the artifact was exported from another model, does not fit the pack, or its
            twin is below the fidelity threshold (without ``allow_untrusted_twin``).
    """
    from ciard_deploy.attacks.artifact import attack_artifact

    name = artifact.name
    sha = sha256_file(artifact)
    options = {"threads": threads} if threads else {}
    backend = open_backend(artifact, **options)
    try:
        checks.check_compatible(tuple(x.shape[1:]), num_classes, backend, artifact)
        meta = dict(backend.metadata or {})
        source = meta.get("source_sha256")
        _check_source(name, source, model_sha256)
        if not source:
            log.warning("%s records no source checkpoint; it is assumed to be exported from the pack's model", name)
        runtime = backend.describe()
        record: dict[str, Any] = {"index": index, "name": name, "sha256": sha,
                                  "precision": str(getattr(backend, "precision", "unknown") or "unknown"),
                                  "runtime": {"backend": runtime.get("backend"), "provider": runtime.get("provider"),
                                              "version": runtime.get("version")},
                                  "source_sha256": source or None, "eps": float(eps)}
        if artifact.suffix.lower() not in TWIN_SUFFIXES:
            return ArtifactSection(meta={**record, "skipped": f"no twin can be built from a {artifact.suffix} file; "
                                                             "attack its ONNX file instead"})
        from ciard_deploy.twin import TwinUnsupported, build_twin  # imports torch (twin.graph)

        try:
            twin = build_twin(artifact)
        except TwinUnsupported as e:
            log.warning("%s; the pack holds no white-box attack for it", e)
            return ArtifactSection(meta={**record, "skipped": str(e)})
        sets = {"clean": x}
        if adversarial is not None:
            sets["adversarial"] = adversarial
        sets["random_in_ball"] = twin_fidelity.random_in_ball(x, eps, seed)
        t0 = time.perf_counter()
        twin = best_twin(artifact, twin, backend.predict, {k: sets[k] for k in ("clean", "random_in_ball")},
                         batch_size)
        fidelity = _trusted_or_refuse(name, twin, backend.predict, sets, allow_untrusted_twin, batch_size)
        fid = {**fidelity.to_dict(), "seconds": round(time.perf_counter() - t0, 3)}
        result = attack_artifact(twin, backend.predict, x, y, attacks, seed=seed, batch_size=batch_size,
                                 device=device, progress=progress)
    finally:
        backend.close()
    names = [a.name for a in attacks]
    clean_ok = result.found_by != -2
    record.update({"label": section_label(names, eps), "attacks": result.records,
                   "twin": {"builder": "ciard_deploy.twin (ONNX graph re-executed in torch)",
                            "precision": getattr(twin, "precision", None), "half_mode": getattr(twin, "half_mode", None),
                            "trusted": bool(fidelity.trusted), "fidelity": fid},
                   "clean_acc": float(clean_ok.mean()) if len(y) else 0.0, "robust_acc": result.robust_acc,
                   "seconds": round(result.seconds, 3), "device": str(device),
                   "source": f"white-box on this artifact: gradients from its twin, every iterate scored on "
                             f"{record['runtime']['backend']} ({record['runtime']['provider']})"})
    return ArtifactSection(meta=record, x_adv=result.x_adv, logits=result.logits, logits_clean=result.logits_clean,
                           found_by=result.found_by)


__all__ = ["TWIN_SUFFIXES", "best_twin", "build_section", "check_artifacts", "preflight", "section_label"]
