"""``ciard inspect``: what an export folder, a manifest or one artifact says about itself, checked
against the manifest that records it (a file that differs is a mismatch; the CLI makes it exit 2).

Any ONNX file, ciard's or not, also gets its graph summarized (``onnx_summary``: inputs, outputs, opsets,
ops, QDQ nodes, quantized share, sizes, metadata).

Torch-free: reads ONNX metadata_props (``onnx`` or ``onnxruntime``), engine sidecars and hashes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ciard_deploy import fingerprint
from ciard_deploy.errors import ArtifactError, UsageError
from ciard_deploy.export.manifest import MANIFEST_NAME, ManifestInvalid, check_files, load_manifest, manifest_path
from ciard_deploy.export.onnx_summary import summarize_onnx
from ciard_deploy.runtime import BACKENDS, backend_for
from ciard_deploy.runtime.metadata import check_metadata


def inspect_artifact(path: str | Path) -> dict[str, Any]:
    """What ``ciard inspect`` shows, as data.

    - a folder or ``manifest.json``: ``{"kind": "manifest", "path", "manifest", "problems", "mismatches"}``
      where problems lists files missing or differing from their recorded size or sha256;
    - an ``.onnx`` file: ``{"kind": "onnx", "path", "sha256", "size", "metadata", "other_props",
      "manifest_entry", "onnx", "problems", "mismatches"}`` (the entry of a manifest beside it, if one lists
      the file; ``onnx``: :func:`~ciard_deploy.export.onnx_summary.summarize_onnx`, for any ONNX file);
    - an ``.engine``/``.plan`` file: the same with the JSON sidecar as metadata (each runtime's
      ``read_metadata`` says where its files keep it), ``onnx`` None.

    ``mismatches`` are the problems that say a file is not what its manifest records
    (``raise_mismatches`` makes them an error); the others (no ciard metadata) are notes.

    Raises:
        ManifestInvalid: the manifest (or the one beside the file) does not validate, or lists a file
            outside its folder: nothing outside is read or hashed.
        ArtifactError: nothing at ``path``, or a file that is not what its suffix says (a truncated or
            foreign ``.onnx``, one whose external data file is missing).
    """

    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"nothing to inspect at {p}")
    if p.is_dir() or p.name == MANIFEST_NAME:
        m = load_manifest(p)
        folder = p if p.is_dir() else p.parent
        problems = check_files(m, folder)
        return {"kind": "manifest", "path": str(manifest_path(p)), "manifest": m.to_dict(),
                "problems": problems, "mismatches": list(problems)}
    try:
        read = backend_for(p).read_metadata
    except UsageError:
        read = None
    if read is None:
        *first, last = [s for _, e in BACKENDS.items() if e.read_metadata is not None for s in e.suffixes]
        raise UsageError(f"cannot inspect {p.name}: expected an export folder, manifest.json, {', '.join(first)} or {last}")
    kind, meta, other, where = read(p)
    check_metadata(meta, where)  # keys of the wrong type: exit 2, one line
    summary = summarize_onnx(p) if kind == "onnx" else None
    digest = fingerprint.sha256_file(p)
    entry, mismatches = None, []
    beside = p.parent / MANIFEST_NAME
    if beside.is_file():
        try:
            rec = load_manifest(beside).artifact(p.name)
            entry = rec.to_dict()
            if rec.sha256 != digest:
                mismatches.append(f"{p.name}: sha256 {digest[:12]}... differs from the manifest's "
                                  f"{rec.sha256[:12]}...")
        except ManifestInvalid:
            raise
        except ArtifactError:
            entry = None
    problems = list(mismatches)
    if not meta:
        problems.append(f"{p.name} carries no ciard metadata (not exported by ciard export?)")
    return {"kind": kind, "path": str(p), "sha256": digest, "size": p.stat().st_size, "metadata": meta,
            "other_props": other, "manifest_entry": entry, "onnx": summary, "problems": problems,
            "mismatches": mismatches}


def raise_mismatches(rep: dict[str, Any]) -> None:
    """ArtifactError (exit 2) when ``inspect_artifact`` found files that are not what their manifest
    records (missing, another size or sha256): the export cannot be trusted as it is."""
    found = rep.get("mismatches") or []
    if found:
        where = rep["path"] if rep["kind"] == "manifest" else str(Path(rep["path"]).parent / MANIFEST_NAME)
        raise ArtifactError(f"{where}: {len(found)} file(s) differ from what it records: {'; '.join(found)}")


__all__ = ["inspect_artifact", "raise_mismatches"]
