"""White-box attacks on each exported artifact, end to end on real digits artifacts.

The session's PGD-trained small_cnn (tests/conftest.py ``digits_robust_run``, eps 0.15) exported to
FP32, FP16 and INT8 ONNX; one pack of 120 test images with pgd20 crafted on PyTorch and white-box
sections for the FP32 and INT8 files (apgd-ce + a short multi-targeted PGD through each twin, every
iterate scored on onnxruntime); the FP16 file deliberately left out. Then ``ciard verify`` of each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ciard_deploy.verify.verification import run as verify
from ciard_deploy.verify.pack import save_pack
from ciard_deploy.verify.pack_load import load_pack
from ciard_deploy.verify.pack_build import build_pack

pytestmark = pytest.mark.integration

N = 120
EPS = 0.15
ART_ATTACKS = ["apgd-ce", "mtpgd20"]


@pytest.fixture(scope="session")
def artifact_pack(digits_robust_run: Path, digits_robust_exports: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifact_pack") / "pack.npz"
    pack = build_pack(digits_robust_run, n=N, attacks=["pgd20"], eps=EPS, step_size=0.04,
                      artifacts=[digits_robust_exports / "model.onnx", digits_robust_exports / "model.int8.onnx"],
                      artifact_attacks=ART_ATTACKS, threads=1)
    save_pack(pack, out)
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_pack_holds_a_section_per_artifact_with_a_faithful_twin(artifact_pack, digits_robust_exports):
    from ciard_deploy.fingerprint import sha256_file

    pack = load_pack(artifact_pack)
    assert [s.name for s in pack.artifacts] == ["model.onnx", "model.int8.onnx"]
    for sec in pack.artifacts:
        assert sec.sha256 == sha256_file(digits_robust_exports / sec.name)
        assert sec.meta["twin"]["trusted"] and sec.meta["twin"]["fidelity"]["agreement"] >= 0.995
        assert [a["label"] for a in sec.meta["attacks"]] == ["apgd-ce@0.15", "mtpgd20@0.15"]
        assert float(np.abs(sec.x_adv - pack.x).max()) <= EPS + 1e-6
        broken = sec.found_by >= 0  # every kept image is misclassified by the runtime, as stored
        assert (sec.logits[broken].argmax(1) != pack.y[broken]).all()
        assert sec.meta["label"] == "wb(apgd-ce+mtpgd20)@0.15"
    assert pack.artifact_for(sha256_file(digits_robust_exports / "model.fp16.onnx")) is None


def test_int8_white_box_on_the_artifact_is_at_most_its_transferred_number(artifact_pack, digits_robust_exports):
    rep = verify(digits_robust_exports / "model.int8.onnx", artifact_pack, square_queries=0, threads=1)
    by_kind = {a["kind"]: a for a in rep.results["attacks"]}
    wb, tr = by_kind["whitebox"], by_kind["transfer"]
    assert wb["robust_acc"] <= tr["robust_acc"]
    # the runtime here scores the stored images exactly as the pack machine's runtime did
    assert wb["robust_acc"] == pytest.approx(wb["reference_acc"], abs=1e-9)
    wc = rep.results["worst_case"]
    assert wc["upper_bound"] is False and wc["tiers"]["whitebox"] == ["wb(apgd-ce+mtpgd20)@0.15"]
    assert "white-box on this artifact" in wc["covers"] and "transferred from PyTorch" in wc["covers"]
    assert wc["acc"] <= min(wb["robust_acc"], tr["robust_acc"]) + 1e-9
    assert rep.metrics["whitebox_acc"] == wb["robust_acc"]
    assert not any(f.code == "V112" for f in rep.warnings)


def test_a_pack_without_the_artifacts_attacks_reports_an_upper_bound(artifact_pack, digits_robust_exports, tmp_path):
    rep = verify(digits_robust_exports / "model.fp16.onnx", artifact_pack, square_queries=0, threads=1)
    wc = rep.results["worst_case"]
    assert wc["upper_bound"] is True and "no white-box attack made on this artifact" in wc["upper_bound_reason"]
    assert [f.code for f in rep.warnings if f.code == "V112"] == ["V112"]
    md = rep.write_markdown(tmp_path / "r.md", chart=False).read_text()
    assert "(upper bound)" in md and "**Upper bound**" in md


def test_cli_pack_and_verify_show_each_tier(digits_robust_run, digits_robust_exports, invoke, tmp_path):
    out = tmp_path / "p.npz"
    res = invoke("pack", str(digits_robust_run), "--out", str(out), "--n", "40", "--attacks", "fgsm",
                 "--eps", "0.15", "--artifact", str(digits_robust_exports / "model.int8.onnx"),
                 "--artifact-attacks", "apgd-ce20", "--threads", "1", "--quiet", "--json", str(tmp_path / "p.json"))
    assert res.exit_code == 0, res.output
    assert "white-box on each artifact" in res.stdout
    (sec,) = json.loads((tmp_path / "p.json").read_text())["artifacts"]
    assert sec["name"] == "model.int8.onnx" and sec["label"] == "wb(apgd-ce20)@0.15" and sec["twin"]["trusted"]
    assert not (tmp_path / "p.npz.partial").exists()
    res = invoke("verify", str(digits_robust_exports / "model.int8.onnx"), "--pack", str(out), "--square-queries", "0",
                 "--threads", "1", "--json", str(tmp_path / "r.json"), "--quiet")
    assert res.exit_code == 0, res.output
    assert "white-box on this artifact" in res.stdout and "transferred from PyTorch" in res.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["results"]["worst_case"]["upper_bound"] is False


def test_an_interrupted_pack_reuses_finished_artifact_sections(digits_robust_run, digits_robust_exports, tmp_path):
    art = [digits_robust_exports / "model.int8.onnx"]
    kw = dict(n=30, attacks=["fgsm"], eps=EPS, artifacts=art, artifact_attacks=["apgd-ce10"], threads=1,
              resume_dir=tmp_path / "partial")
    first = build_pack(digits_robust_run, **kw)
    events = []
    again = build_pack(digits_robust_run, on_state=events.append, **kw)
    assert {(e.kind, e.stage.split()[0]) for e in events} == {("reused", "fgsm@0.15"), ("reused", "artifact")}
    for a, b in zip(first.artifacts, again.artifacts):
        assert np.array_equal(a.x_adv, b.x_adv) and np.array_equal(a.found_by, b.found_by)
        assert a.meta == b.meta


def _with_op_the_twin_lacks(src: Path, dst: Path) -> Path:
    """The FP32 graph with ``logits + 0 * Sign(logits)`` at the end: the same function on onnxruntime,
    an op the twin does not reproduce; metadata (the source checkpoint) kept."""
    import onnx
    from onnx import helper

    m = onnx.load(str(src))
    g = m.graph
    out = g.output[0].name
    for node in g.node:
        node.output[:] = [f"{o}__pre" if o == out else o for o in node.output]
    zero = helper.make_tensor("zero__", onnx.TensorProto.FLOAT, [], [0.0])
    g.initializer.append(zero)
    g.node.extend([helper.make_node("Sign", [f"{out}__pre"], ["sign__"]),
                   helper.make_node("Mul", ["sign__", "zero__"], ["zeroed__"]),
                   helper.make_node("Add", [f"{out}__pre", "zeroed__"], [out])])
    onnx.save(m, str(dst))
    return dst


def test_an_op_the_twin_cannot_reproduce_falls_back_and_is_flagged(digits_robust_run, digits_robust_exports,
                                                                   tmp_path, invoke):
    odd = _with_op_the_twin_lacks(digits_robust_exports / "model.onnx", tmp_path / "odd.onnx")
    out = tmp_path / "p.npz"
    res = invoke("pack", str(digits_robust_run), "--out", str(out), "--n", "30", "--attacks", "fgsm", "--eps", "0.15",
                 "--artifact", str(odd), "--artifact-attacks", "apgd-ce10", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert "Sign" in res.output  # the notice names the op
    (sec,) = load_pack(out).artifacts
    assert sec.skipped and "Sign" in sec.skipped and sec.x_adv is None
    rep = verify(odd, out, square_queries=0, threads=1)
    wc = rep.results["worst_case"]
    assert wc["upper_bound"] is True and "Sign" in wc["upper_bound_reason"]


def test_an_artifact_of_another_model_is_refused_before_any_work(digits_robust_exports, untrained_digits_onnx,
                                                                  tmp_path, invoke, assert_one_line_error):
    untrained = untrained_digits_onnx["checkpoint"] if "checkpoint" in untrained_digits_onnx else None
    if untrained is None:
        pytest.skip("the untrained digits fixture has no checkpoint")
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "p.npz").write_bytes(b"user data")
    before = _files(keep)
    res = invoke("pack", str(untrained), "--out", str(keep / "p.npz"), "--force", "--n", "20", "--attacks", "fgsm",
                 "--eps", "0.15", "--artifact", str(digits_robust_exports / "model.onnx"))
    assert_one_line_error(res, 2, "model.onnx", "exported from another model")
    assert _files(keep) == before


def test_an_untrusted_twin_is_refused_unless_allowed(digits_robust_run, digits_robust_exports, tmp_path, invoke,
                                                     assert_one_line_error, monkeypatch):
    from ciard_deploy.twin import fidelity

    monkeypatch.setattr(fidelity, "TRUST_THRESHOLD", 1.01)  # no twin can pass: the refusal path itself
    out = tmp_path / "p.npz"
    args = ["pack", str(digits_robust_run), "--out", str(out), "--n", "20", "--attacks", "fgsm", "--eps", "0.15",
            "--artifact", str(digits_robust_exports / "model.int8.onnx"), "--artifact-attacks", "apgd-ce5",
            "--threads", "1"]
    res = invoke(*args)
    assert_one_line_error(res, 2, "model.int8.onnx", "twin is not faithful", "--allow-untrusted-twin")
    assert not out.exists()
    res = invoke(*args, "--allow-untrusted-twin")
    assert res.exit_code == 0, res.output
    rep = verify(digits_robust_exports / "model.int8.onnx", out, square_queries=0, threads=1)
    assert any(f.code == "V113" for f in rep.warnings)


def test_a_tampered_artifact_section_is_refused(artifact_pack, tmp_path):
    from ciard_deploy.errors import ArtifactError
    from ciard_deploy.fingerprint import checksum_arrays

    with np.load(artifact_pack, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for key, edit, needle in (("art_1_found_by", lambda a: np.where(a == -1, 0, a).astype(np.int8), "found_by"),
                              ("art_1_adv", lambda a: np.clip(a + 0.3, 0, 1).astype(np.float32), "outside eps")):
        bad = dict(arrays)
        bad[key] = edit(bad[key])
        bad.pop("checksum")
        bad["checksum"] = np.array([checksum_arrays(bad)])
        path = tmp_path / f"{key}.npz"
        with open(path, "wb") as f:
            np.savez(f, **bad)
        with pytest.raises(ArtifactError, match=needle):
            load_pack(path)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_the_fp16_twin_follows_what_the_cpu_runtime_computes(digits_robust_exports):
    """onnxruntime's CPU provider runs an FP16 graph in float32 on float16 weights: of the twin's half
    modes, ``float32`` reproduces it (max logit difference ~1e-6, against ~1e-2 when emulating float16)."""
    from ciard_deploy.data.digits import load_digits_split
    from ciard_deploy.runtime import open_backend
    from ciard_deploy.twin import build_twin
    from ciard_deploy.twin.fidelity import measure_fidelity, random_in_ball
    from ciard_deploy.verify.pack_artifacts import best_twin

    path = digits_robust_exports / "model.fp16.onnx"
    x = load_digits_split("test").tensors()[0][:64].numpy()
    sets = {"clean": x, "random_in_ball": random_in_ball(x, EPS, 0)}
    backend = open_backend(path, threads=1)
    try:
        for start in ("float32", "emulate"):
            twin = best_twin(path, build_twin(path, half=start), backend.predict, sets)
            assert twin.half_mode == "float32"
            assert measure_fidelity(twin, backend.predict, sets).max_abs_diff < 1e-4
    finally:
        backend.close()
