"""Sanity checks: artifact <-> manifest <-> pack provenance, runtime behaviour, Square vs transfer."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ciard_deploy.export.manifest import ArtifactRecord, Manifest
from ciard_deploy.fingerprint import sha256_file
from ciard_deploy.verify import run
from ciard_deploy.verify.checks import (CHECKS, check_determinism, check_parity, check_probabilities, check_live,
                                        finding, metadata_mismatches, provenance)

pytestmark = pytest.mark.unit


def write_manifest(folder, artifact, sha=None, source_sha="cd" * 32, status="passed"):
    rec = ArtifactRecord(name="onnx", file=artifact.name, format="onnx", precision="fp32", runtime="onnxruntime",
                         sha256=sha or sha256_file(artifact), size=artifact.stat().st_size, status=status)
    Manifest(source={"sha256": source_sha}, model={}, reference={}, thresholds={"fp32": 0.9, "int8": 0.8},
             options={}, artifacts=[rec]).write(folder)


def test_codes_are_unique_and_documented():
    assert len({c.name for c in CHECKS.values()}) == len(CHECKS)
    f = finding("live_beats_transfer", "msg")
    assert f.code == "V101" and f.doc.endswith("-v101") and f.line() == "[V101] msg"
    assert f.to_dict()["title"] == CHECKS["V101"].title
    with pytest.raises(KeyError):
        finding("no_such_check", "x")


def test_provenance_with_a_matching_manifest(tmp_path, linear_onnx):
    art = shutil.copy(linear_onnx, tmp_path / "model.onnx")
    write_manifest(tmp_path, art, source_sha="ab" * 32)
    prov, found, thresholds = provenance(art, {"source_sha256": "ab" * 32}, "ab" * 32)
    assert found == [] and thresholds == {"fp32": 0.9, "int8": 0.8}
    assert prov["manifest"]["listed"] and prov["manifest"]["sha256_matches"] and prov["pack_matches_source"]
    assert prov["sha256"] == sha256_file(art)


def test_provenance_mismatches(tmp_path, linear_onnx):
    art = shutil.copy(linear_onnx, tmp_path / "model.onnx")
    write_manifest(tmp_path, art, sha="0" * 64, source_sha="cd" * 32, status="failed")
    prov, found, _ = provenance(art, {"source_sha256": "ab" * 32}, "ab" * 32)
    codes = [f.code for f in found]
    assert "V103" in codes and "V104" in codes and codes.count("V105") == 2  # failed status + metadata vs manifest
    assert prov["manifest"]["sha256_matches"] is False and prov["pack_matches_source"] is False
    assert prov["source_sha256"] == "cd" * 32  # the manifest wins over the artifact's own metadata
    # not listed / unreadable manifests are findings, not errors
    other = shutil.copy(linear_onnx, tmp_path / "other.onnx")
    _, found, _ = provenance(other, {}, "ab" * 32)
    assert "does not list it" in " ".join(f.message for f in found)
    (tmp_path / "manifest.json").write_text("{broken")
    _, found, _ = provenance(art, {}, "ab" * 32)
    assert [f.code for f in found][0] == "V105"


def test_provenance_unknown(tmp_path, linear_onnx):
    art = shutil.copy(linear_onnx, tmp_path / "bare.onnx")
    prov, found, _ = provenance(art, {}, "ab" * 32)
    assert [(f.code, f.level) for f in found] == [("V106", "info")] and prov["manifest"] is None


def test_runtime_behaviour_checks():
    z = np.random.default_rng(0).normal(size=(8, 10)).astype(np.float32)
    assert check_determinism(z, z.copy()) is None
    noisy = z + 1e-6
    assert check_determinism(z, noisy).level == "info"
    flipped = z.copy()
    flipped[0] = -flipped[0]
    assert check_determinism(z, flipped).level == "warning"
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert check_probabilities(p).code == "V108" and check_probabilities(z) is None
    assert check_parity("clean", 0.99, 1, 100, 0.999).code == "V102"
    assert check_parity("clean", 0.999, 1, 1000, 0.999) is None


def test_live_vs_transfer():
    f = check_live("square100@0.1", 0.30, {"pgd20@0.1": 0.40, "fgsm@0.1": 0.50}, 100)
    assert f.code == "V101" and "pgd20@0.1 40.00%" in f.message
    assert check_live("square100@0.1", 0.45, {"pgd20@0.1": 0.40}, 100) is None
    assert check_live("square100@0.1", 0.10, {}, 100) is None


def test_metadata_mismatches():
    pack_meta = {"eps": 0.1, "data": {"dataset": "digits"}, "model": {"classes": ["a", "b"]}}
    assert metadata_mismatches(pack_meta, {"dataset": "digits", "classes": ["a", "b"], "eps": 0.1}) == []
    found = metadata_mismatches(pack_meta, {"dataset": "cifar10", "classes": ["x", "y"], "eps": 0.2})
    # an eps mismatch is a warning too: the gates would judge another budget than the artifact was made for
    assert [f.code for f in found] == ["V109"] * 3 and {f.level for f in found} == {"warning"}
    assert "eps 0.1" in found[-1].message and "eps 0.2" in found[-1].message


def test_run_warns_when_square_beats_transfer(tmp_path, linear, linear_onnx, test_xy, h):
    """A pack whose 'attack' is a tiny random perturbation transfers nothing; Square on the runtime does better."""
    p = h.noise_pack(linear, *test_xy, tmp_path / "weak.npz")
    rep = run(linear_onnx, p, square_queries=60, square_n=40)
    assert "V101" in {f.code for f in rep.warnings}
    assert rep.metrics["square_acc"] < rep.results["robust_acc"]["noise@0.1"]
