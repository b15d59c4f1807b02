"""Hostile files (issue 12 items 1, 3, 4, 6): packs, manifests, checkpoint cards and recipes made to mislead
or exhaust the tool. Each is refused through the CLI with exit 2 and one ``error:`` line naming the file and
the problem, no traceback, and every file that existed before is byte-identical after (nothing new written).

Built from the shared ``untrained_digits_onnx`` fixture (an untrained small_cnn's checkpoint, its ONNX export
with manifest.json, and a 64-image fgsm pack at eps 0.1), copied into each test's tmp_path.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ciard_deploy.fingerprint import checksum_arrays

pytestmark = pytest.mark.integration


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (symlinks as their target path), by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = f"-> {p.readlink()}"
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def work(untrained_digits_onnx, tmp_path) -> dict[str, Path]:
    """A private copy: ``run/`` (checkpoint + card), ``export/`` (model.onnx + manifest.json), ``pack.npz``."""
    fx = untrained_digits_onnx
    shutil.copytree(fx["run"], tmp_path / "run")
    shutil.copytree(fx["onnx"].parent, tmp_path / "export")
    shutil.copy(fx["pack"], tmp_path / "pack.npz")
    (tmp_path / "secret.bin").write_bytes(b"outside the export folder")
    return {"root": tmp_path, "run": tmp_path / "run", "card": tmp_path / "run" / "student_best.json",
            "export": tmp_path / "export", "onnx": tmp_path / "export" / "model.onnx",
            "manifest": tmp_path / "export" / "manifest.json", "pack": tmp_path / "pack.npz"}


@pytest.fixture
def refused(invoke, assert_one_line_error):
    """``refused(root, *args, needles=(...))``: the CLI call exits 2 with one error line holding each needle,
    and leaves every file under ``root`` as it was."""

    def check(root: Path, *args: object, needles: tuple[str, ...] = ()) -> str:
        before = snapshot(root)
        res = invoke(*args)
        assert_one_line_error(res, 2, *needles)
        assert snapshot(root) == before
        return res.stderr

    return check


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def rewrite_pack(src: Path, dst: Path, meta_text=None, edit_meta=None, edit_arrays=None) -> Path:
    """``src`` with its metadata (text or an edit of the dict) and arrays changed, checksum recomputed:
    only validation can tell."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"][0]))
    if edit_meta is not None:
        edit_meta(meta)
    if edit_arrays is not None:
        edit_arrays(arrays)
    arrays["meta"] = np.array([meta_text(meta) if meta_text else json.dumps(meta, sort_keys=True)])
    arrays.pop("checksum")
    arrays["checksum"] = np.array([checksum_arrays(arrays)])
    with open(dst, "wb") as f:
        np.savez(f, **arrays)
    return dst


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# --------------------------------------------------------------------------- item 3: manifests point inside their folder
@pytest.mark.parametrize("where", ["relative", "absolute", "symlink"])
def test_manifest_cannot_make_inspect_or_verify_read_outside(where, work, refused, monkeypatch):
    import ciard_deploy.fingerprint

    secret = work["root"] / "secret.bin"
    if where == "symlink":  # a plain name, but the file is a link leaving the folder
        work["onnx"].rename(work["root"] / "model.onnx")
        work["onnx"].symlink_to(secret)
        needles = ("outside the export folder",)
    else:
        target = "../secret.bin" if where == "relative" else str(secret)
        edit_json(work["manifest"], lambda m: m["artifacts"][0].update(file=target))
        needles = ("manifest.json", "artifacts.0.file", "inside the export folder")
    hashed = []
    real = ciard_deploy.fingerprint.sha256_file
    monkeypatch.setattr(ciard_deploy.fingerprint, "sha256_file", lambda p, *a: hashed.append(Path(p)) or real(p, *a))
    refused(work["root"], "inspect", work["export"], needles=needles)
    if where != "symlink":
        refused(work["root"], "verify", work["onnx"], "--pack", work["pack"], "--live", "none", needles=needles)
    assert all(p.resolve() != secret.resolve() for p in hashed), hashed


def test_inspect_exits_2_when_an_artifact_differs_from_its_manifest(work, refused, invoke):
    assert invoke("inspect", work["export"]).exit_code == 0  # intact: the table, exit 0
    edit_json(work["manifest"], lambda m: m["artifacts"][0].update(sha256="0" * 64))
    out = work["root"] / "inspect.json"
    refused(work["root"], "inspect", work["export"], "--json", out, needles=("manifest.json", "model.onnx", "sha256"))
    refused(work["root"], "inspect", work["onnx"], needles=("manifest.json", "model.onnx", "differs"))
    assert not out.exists()


@pytest.mark.parametrize("edit, needles", [
    (lambda m: m["model"].update(num_classes="ten"), ("model.num_classes", "valid integer")),
    (lambda m: m["model"].update(num_classes=10**9), ("model.num_classes", "less than or equal")),
    (lambda m: m.update(thresholds=[0.9]), ("thresholds", "valid dictionary")),
    (lambda m: m["artifacts"][0].update(size="big"), ("artifacts.0.size",)),
    (lambda m: m.update(options=json.loads(deep(100))), ("nests deeper",)),
], ids=["num_classes_str", "num_classes_huge", "thresholds_list", "size_str", "nested"])
def test_manifest_wrong_types_and_nesting(edit, needles, work, refused):
    edit_json(work["manifest"], edit)
    refused(work["root"], "inspect", work["export"], needles=("manifest.json", *needles))
    refused(work["root"], "verify", work["onnx"], "--pack", work["pack"], "--live", "none",
            needles=("manifest.json", *needles))


def test_manifest_nested_past_the_recursion_limit(work, refused):
    text = work["manifest"].read_text()
    work["manifest"].write_text(text[:-2] + ', "deep": ' + deep(100_000) + "}")
    refused(work["root"], "inspect", work["export"], needles=("manifest.json", "nests deeper"))


# --------------------------------------------------------------------------- item 4: resource limits
def _npz_with_member(src: Path, dst: Path, name: str, shape: tuple[int, ...], data_bytes: int, deflate: bool) -> Path:
    """``src``'s members, with ``name`` replaced by a float32 .npy whose header declares ``shape`` and whose
    data is ``data_bytes`` zero bytes (streamed: the test never holds them)."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for i in zin.infolist():
            if i.filename != name:
                zout.writestr(i, zin.read(i))
        with zout.open(info, "w", force_zip64=True) as f:
            f.write(head.getvalue())
            chunk = bytes(1 << 22)
            for _ in range(data_bytes // len(chunk)):
                f.write(chunk)
            f.write(bytes(data_bytes % len(chunk)))
    return dst


@pytest.mark.parametrize("case", ["declared_1e13", "deflate_bomb"])
def test_pack_declaring_huge_arrays_is_refused_without_allocating(case, work, refused):
    bomb = work["root"] / "bomb.npz"
    if case == "declared_1e13":  # the header claims 10^13 float32 (40 TB); the member holds 64 bytes
        _npz_with_member(work["pack"], bomb, "x.npy", (10**13,), 64, deflate=False)
        needles = ("bomb.npz", "'x'", "declares shape")
    else:  # 200 MB of zeros deflated to ~200 KB: the shape is honest, the file is a bomb
        _npz_with_member(work["pack"], bomb, "x.npy", (50_000_000,), 200_000_000, deflate=True)
        assert bomb.stat().st_size < 2 << 20
        needles = ("bomb.npz", "'x'", "zip bomb")
    tracemalloc.start()
    try:
        refused(work["root"], "verify", work["onnx"], "--pack", bomb, "--live", "none", needles=needles)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 << 20, f"peak {peak / 2**20:.0f} MiB"


def test_recipe_extends_cycle_fan_out_and_nesting_are_refused_fast(tmp_path, refused):
    def train(name: str, *needles: str) -> None:  # refused before its --out is made
        refused(tmp_path, "train", tmp_path / name, "--out", tmp_path / "out", needles=needles)

    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    train("a.yaml", "extends itself")
    # each level lists the next one 8 times: 8^6 = 262144 files to read unbounded
    for level in range(6):
        (tmp_path / f"f{level}.yaml").write_text("extends: [" + ", ".join([f"f{level + 1}.yaml"] * 8) + "]\n")
    (tmp_path / "f6.yaml").write_text("kind: train\n")
    t0 = time.perf_counter()
    train("f0.yaml", "f0.yaml", "more than 64 recipe files")
    assert time.perf_counter() - t0 < 5
    (tmp_path / "deep.yaml").write_text("kind: " + deep(5000) + "\n")
    train("deep.yaml", "deep.yaml", "nested too deeply")
    (tmp_path / "laughs.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")))
    train("laughs.yaml", "laughs.yaml", "more than")


# --------------------------------------------------------------------------- item 6 and item 1: the pack's eps and metadata
@pytest.mark.parametrize("case, needles", [
    ("attack_eps_larger", ("above the pack's eps",)),
    ("eps_nan", ("field 'eps'", "finite")),
    ("eps_inf", ("field 'eps'", "finite")),
    ("attack_eps_nan", ("attacks.0.eps", "finite")),
    ("eps_string", ("field 'eps'", "valid number")),
    ("eps_zero", ("field 'eps'", "greater than 0")),
])
def test_pack_eps_edits_are_refused(case, needles, work, refused):
    def edit(m):
        if case == "attack_eps_larger":
            m["attacks"][0]["eps"] = 0.3
        elif case == "attack_eps_nan":
            m["attacks"][0]["eps"] = math.nan
        else:
            value = {"eps_nan": math.nan, "eps_inf": math.inf, "eps_string": "abc", "eps_zero": 0.0}[case]
            m["eps"] = value
            m["attacks"][0]["eps"] = value

    def push(a):  # the adversarial images moved as far as the edited record allows
        if case == "attack_eps_larger":
            x = a["x"]
            a["adv_0"] = np.clip(x + np.float32(0.3) * np.where(x < 0.5, 1, -1), 0, 1).astype(np.float32)

    bad = rewrite_pack(work["pack"], work["root"] / "edited.npz", edit_meta=edit, edit_arrays=push)
    refused(work["root"], "verify", work["onnx"], "--pack", bad, "--live", "none", needles=("edited.npz", *needles))


def test_pack_whose_eps_is_raised_consistently_is_flagged_against_the_artifact(work, invoke):
    """Pack eps, attack eps and images all moved to 0.3 (checksum recomputed): the pack is self-consistent,
    so it loads, but the artifact records eps 0.1: V109 fails verify unless --allow-mismatch."""
    from ciard_deploy.attacks.budget import format_eps

    def edit(m):
        m["eps"], m["eps_label"] = 0.3, format_eps(0.3)
        m["attacks"][0].update(eps=0.3, label="fgsm@0.3")
        m["reference"]["robust_acc"] = {"fgsm@0.3": m["reference"]["robust_acc"]["fgsm@0.1"]}

    def push(a):
        x = a["x"]
        a["adv_0"] = np.clip(x + np.float32(0.3) * np.where(x < 0.5, 1, -1), 0, 1).astype(np.float32)
        a["logits_adv_0"] = a["logits_clean"]  # keep ref_correct consistent with the logits
        a["ref_correct"] = np.stack([a["ref_correct"][0], a["ref_correct"][0]])

    bad = rewrite_pack(work["pack"], work["root"] / "raised.npz", edit_meta=edit, edit_arrays=push)
    res = invoke("verify", work["onnx"], "--pack", bad, "--live", "none")
    assert res.exit_code == 1 and "V109" in res.output and "Traceback" not in res.output, res.output
    assert "eps 0.3" in res.output and "eps 0.1" in res.output


@pytest.mark.parametrize("case, needles", [
    ("num_classes_str", ("model.num_classes", "valid integer")),
    ("num_classes_huge", ("model.num_classes", "less than or equal")),
    ("input_shape_str", ("model.input_shape", "valid list")),
    ("attacks_mapping", ("field 'attacks'", "valid list")),
    ("nested", ("unreadable metadata", "nests deeper")),
    ("nested_past_recursion", ("unreadable metadata", "nests deeper")),
])
def test_pack_metadata_wrong_types_and_nesting(case, needles, work, refused):
    edits = {"num_classes_str": lambda m: m["model"].update(num_classes="ten"),
             "num_classes_huge": lambda m: m["model"].update(num_classes=10**9),
             "input_shape_str": lambda m: m["model"].update(input_shape="a"),
             "attacks_mapping": lambda m: m.update(attacks={"0": m["attacks"][0]}),
             "nested": lambda m: m["versions"].update(deep=json.loads(deep(60)))}
    text = (lambda m: json.dumps(m)[:-1] + ', "deep": ' + deep(100_000) + "}") if case == "nested_past_recursion" \
        else None
    bad = rewrite_pack(work["pack"], work["root"] / "meta.npz", meta_text=text, edit_meta=edits.get(case))
    refused(work["root"], "verify", work["onnx"], "--pack", bad, "--live", "none", needles=("meta.npz", *needles))


# --------------------------------------------------------------------------- item 1: checkpoint cards
@pytest.mark.parametrize("edit, needles", [
    (lambda d: d.update(num_classes=10**9), ("num_classes", "less than or equal")),
    (lambda d: d.update(num_classes="ten"), ("num_classes", "valid integer")),
    (lambda d: d.update(input_shape="a"), ("input_shape", "valid list")),
    (lambda d: d.update(eps="abc"), ("field 'eps'", "valid number")),
    (lambda d: d.update(mean={"r": 0.5}), ("field 'mean'", "valid list")),
    (lambda d: d.update(metrics=json.loads(deep(60))), ("nests deeper",)),
], ids=["num_classes_huge", "num_classes_str", "input_shape_str", "eps_str", "mean_mapping", "nested"])
def test_checkpoint_card_wrong_types_and_nesting(edit, needles, work, refused):
    edit_json(work["card"], edit)
    refused(work["root"], "eval", work["run"], "--attacks", "fgsm", "--n", 8,
            needles=("student_best.json", *needles))


# --------------------------------------------------------------------------- an artifact's own metadata
def test_artifact_metadata_eps_not_a_number_is_v109_and_deep_values_stay_text():
    from ciard_deploy.runtime.metadata import decode_metadata
    from ciard_deploy.verify.checks import metadata_mismatches

    for bad in ("abc", math.nan, math.inf, -0.1, True, [0.1]):
        found = metadata_mismatches({"eps": 0.1, "data": {}, "model": {}}, {"eps": bad})
        assert [f.code for f in found] == ["V109"] and "not a budget" in found[0].message, bad
    assert metadata_mismatches({"eps": 0.1}, {"eps": 0.1}) == []
    nested = deep(100_000)
    assert decode_metadata({"ciard.arch": nested, "ciard.eps": "0.1"}) == {"arch": nested, "eps": 0.1}


@pytest.mark.parametrize("key, value, needles", [
    ("num_classes", '"ten"', ("field 'ciard.num_classes'", "valid integer")),
    ("num_classes", "1000000000", ("field 'ciard.num_classes'",)),
    ("num_classes", "7", ("ciard.num_classes 7", "has 10 classes")),  # well typed, but not what the graph outputs
    ("classes", '{"a": 1}', ("field 'ciard.classes'",)),
    ("normalization", '{"inside_model": true, "mean": "x"}', ("field 'ciard.normalization.mean'",)),
    ("input_spec", "[1, 2]", ("field 'ciard.input_spec'",)),
])
def test_onnx_metadata_of_the_wrong_type_is_refused_naming_the_file_and_key(key, value, needles, work, refused):
    import onnx

    model = onnx.load(work["onnx"])
    props = {p.key: p for p in model.metadata_props}
    if f"ciard.{key}" in props:
        props[f"ciard.{key}"].value = value
    else:
        model.metadata_props.add(key=f"ciard.{key}", value=value)
    edited = work["root"] / "edited.onnx"
    onnx.save(model, edited)
    verbs = [("verify", edited, "--pack", work["pack"], "--live", "none")]
    if value != "7":  # inspect reads the metadata without running the graph: the type check only
        verbs.append(("inspect", edited))
    for verb in verbs:
        refused(work["root"], *verb, needles=("edited.onnx", *needles))
