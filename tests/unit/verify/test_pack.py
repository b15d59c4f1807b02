"""Robustness packs: atomic, pickle-free round trip, and every way a damaged pack is refused (exit 2)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from ciard_deploy.errors import ArtifactError, UsageError
from ciard_deploy.attacks.results import worst_case_label
from ciard_deploy.fingerprint import checksum_arrays
from ciard_deploy.verify.pack import FORMAT, SCHEMA_VERSION, RobustnessPack, reference_flags, save_pack
from ciard_deploy.verify.pack_load import load_pack

pytestmark = pytest.mark.unit


def resave(src, dst, edit, fix_checksum=True):
    """Loads the raw arrays of ``src``, applies ``edit(arrays)``, saves to ``dst`` (checksum recomputed)."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    if fix_checksum:
        arrays["checksum"] = np.array([checksum_arrays(arrays)])
    with open(dst, "wb") as f:
        np.savez(f, **arrays)
    return dst


def test_round_trip(pack_file, linear, test_xy, h):
    pack = load_pack(pack_file)
    x, y = test_xy
    assert isinstance(pack, RobustnessPack) and pack.n == len(y) == 120
    np.testing.assert_array_equal(pack.x, x)
    np.testing.assert_array_equal(pack.y, y)
    assert pack.x.dtype == np.float32 and pack.y.dtype == np.int64
    assert pack.attack_labels == ["pgd10@0.1", "fgsm@0.1"] and pack.eps == 0.1
    assert pack.input_shape == (1, 8, 8) and pack.num_classes == 10 and pack.model_sha256 == h.source_sha
    assert pack.checksum.startswith("sha256:") and len(pack.file_sha256) == 64
    np.testing.assert_allclose(pack.logits_clean, h.logits(linear, x), rtol=0, atol=0)
    ref = pack.reference
    assert ref["clean_acc"] == pytest.approx(float((h.logits(linear, x).argmax(1) == y).mean()))
    assert ref["worst_case_label"] == "worst(pgd10+fgsm)@0.1"
    assert ref["worst_case_acc"] <= min(ref["robust_acc"].values()) <= ref["clean_acc"]
    # plain arrays only: loads without pickle, metadata is a JSON string
    with np.load(pack_file, allow_pickle=False) as z:
        assert set(z.files) == {"x", "y", "logits_clean", "adv_0", "logits_adv_0", "adv_1", "logits_adv_1",
                                "ref_correct", "meta", "checksum"}
        meta = json.loads(str(z["meta"][0]))
    assert meta["format"] == FORMAT and meta["schema_version"] == SCHEMA_VERSION and "versions" in meta
    summary = pack.summary()
    assert summary["n"] == 120 and "indices" not in summary["data"] and summary["checksum"] == pack.checksum


def test_reference_flags_and_labels():
    y = np.array([0, 1, 1])
    lc = np.eye(2, dtype=np.float32)[[0, 1, 0]]          # correct, correct, wrong
    la = np.eye(2, dtype=np.float32)[[1, 1, 1]]          # wrong, correct, correct
    flags = reference_flags(y, lc, [la])
    assert flags.tolist() == [[True, True, False], [False, True, False]]
    assert worst_case_label([{"name": "pgd20", "label": "pgd20@8/255", "eps": 8 / 255},
                             {"name": "fgsm", "label": "fgsm@8/255", "eps": 8 / 255}]) == "worst(pgd20+fgsm)@8/255"
    assert worst_case_label([{"name": "a", "label": "a@0.1", "eps": 0.1},
                             {"name": "b", "label": "b@0.2", "eps": 0.2}]) == "worst(a@0.1+b@0.2)"


def test_save_refuses_to_overwrite_and_is_atomic(tmp_path, pack_file):
    pack = load_pack(pack_file)
    out = tmp_path / "p.npz"
    out.write_text("mine")
    with pytest.raises(UsageError, match="--force"):
        save_pack(pack, out)
    assert out.read_text() == "mine"
    save_pack(pack, out, force=True)
    assert load_pack(out).checksum == pack.checksum
    assert [p.name for p in tmp_path.iterdir()] == ["p.npz"]  # no temp files left
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        save_pack(pack, blocker / "p.npz")


def test_missing_and_unreadable(tmp_path, pack_file):
    with pytest.raises(ArtifactError, match="not found"):
        load_pack(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"definitely not a zip file")
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        load_pack(junk)
    cut = tmp_path / "cut.npz"
    data = pack_file.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        load_pack(cut)


def test_checksum_catches_edits(tmp_path, pack_file):
    def bump(a):
        a["logits_clean"] = a["logits_clean"] + np.float32(0.5)

    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_pack(resave(pack_file, tmp_path / "edited.npz", bump, fix_checksum=False))


def test_adversarial_outside_eps_is_refused(tmp_path, pack_file):
    def push(a):
        x = a["x"]
        a["adv_0"] = np.clip(x + np.float32(0.1 + 0.01) * np.where(x < 0.5, 1, -1), 0, 1).astype(np.float32)

    with pytest.raises(ArtifactError, match=r"outside eps 0\.1 .*pgd10@0\.1|pgd10@0\.1 image\(s\) lie outside eps"):
        load_pack(resave(pack_file, tmp_path / "far.npz", push))


def test_eps_slack_is_1e6(tmp_path, pack_file):
    def nudge(a):
        a["adv_1"] = np.clip(a["x"] + np.float32(0.1 + 5e-7), 0, 1).astype(np.float32)

    load_pack(resave(pack_file, tmp_path / "edge.npz", nudge))  # within the 1e-6 float32 slack


@pytest.mark.parametrize("edit,match", [
    (lambda a: a.__setitem__("x", a["x"].astype(np.float64)), "float32"),
    (lambda a: a.__setitem__("y", a["y"] + 10), "labels outside"),
    (lambda a: a.__setitem__("adv_1", np.full_like(a["adv_1"], np.nan)), "NaN"),
    (lambda a: a.__setitem__("x", a["x"] * 2), r"outside \[0, 1\]"),
    (lambda a: a.__setitem__("logits_adv_1", a["logits_adv_1"][:, :5]), "logits_adv_1 must be"),
    (lambda a: a.pop("adv_1"), "no adv_1"),
    (lambda a: a.__setitem__("adv_7", a["adv_0"]), "does not list"),
    (lambda a: a.__setitem__("ref_correct", ~a["ref_correct"]), "flags disagree"),
])
def test_structural_problems(tmp_path, pack_file, edit, match):
    with pytest.raises(ArtifactError, match=match):
        load_pack(resave(pack_file, tmp_path / "bad.npz", edit))


def test_metadata_problems(tmp_path, pack_file):
    def meta_edit(fn):
        def edit(a):
            m = json.loads(str(a["meta"][0]))
            fn(m)
            a["meta"] = np.array([json.dumps(m)])
        return edit

    with pytest.raises(ArtifactError, match="newer"):
        load_pack(resave(pack_file, tmp_path / "v9.npz", meta_edit(lambda m: m.update(schema_version=9))))
    with pytest.raises(ArtifactError, match="not a ciard robustness pack"):
        load_pack(resave(pack_file, tmp_path / "fmt.npz", meta_edit(lambda m: m.update(format="other"))))
    with pytest.raises(ArtifactError, match=r"metadata says \(3, 8, 8\)"):
        load_pack(resave(pack_file, tmp_path / "shape.npz",
                         meta_edit(lambda m: m["model"].update(input_shape=[3, 8, 8]))))
    with pytest.raises(ArtifactError, match="lacks"):
        load_pack(resave(pack_file, tmp_path / "lacks.npz", meta_edit(lambda m: m.pop("attacks"))))


def test_pickled_objects_are_refused(tmp_path, pack_file):
    def objectify(a):
        a["meta"] = np.array([{"evil": 1}], dtype=object)

    bad = tmp_path / "pickled.npz"
    with np.load(pack_file, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    objectify(arrays)
    with open(bad, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ArtifactError, match="pickled"):
        load_pack(bad)
    assert zipfile.is_zipfile(bad)
