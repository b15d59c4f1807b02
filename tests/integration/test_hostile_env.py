"""A hostile environment (issue 12 items 2, 5 and the battery of "What must exist"): every verb that writes,
driven through the CLI with output paths that are inputs of the same command, existing files, a read-only
folder, a full disk (a 64 KiB tmpfs), long and unicode names, dangling symlinks and symlinks onto inputs,
and refused training runs. For each: the exit code, one ``error:`` line, no traceback, and every file and
folder under the test's folder as it was (names and bytes; nothing new left behind).

Built from the shared ``untrained_digits_onnx`` fixture (an untrained small_cnn's checkpoint, its ONNX
export with manifest.json, a 64-image fgsm pack at eps 0.1) and copies of the shipped quick recipes; no
case trains or attacks: each is refused before the work.
"""

from __future__ import annotations

import hashlib
import errno
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from ciard_deploy.config import find_recipe

pytestmark = pytest.mark.integration


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` by relative path: a file's sha256, a folder as ``dir``, a symlink as its
    target (a link is never followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"-> {os.readlink(p)}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def work(untrained_digits_onnx, tmp_path) -> dict[str, Path]:
    """A private copy: ``run/`` (checkpoint + card), ``export/`` (model.onnx + manifest.json), ``pack.npz``,
    ``recipes/`` (the shipped quick and teacher recipes), an existing ``old.json``."""
    fx = untrained_digits_onnx
    shutil.copytree(fx["run"], tmp_path / "run")
    shutil.copytree(fx["onnx"].parent, tmp_path / "export")
    shutil.copy(fx["pack"], tmp_path / "pack.npz")
    shipped = find_recipe("quick/digits_natural_none_to_tiny_cnn").parent.parent
    for sub in ("quick", "teachers"):
        shutil.copytree(shipped / sub, tmp_path / "recipes" / sub)
    (tmp_path / "old.json").write_text('{"made": "by the user"}\n')
    r = tmp_path / "recipes" / "quick"
    return {"root": tmp_path, "run": tmp_path / "run", "ckpt": tmp_path / "run" / "student_best.safetensors",
            "card": tmp_path / "run" / "student_best.json", "export": tmp_path / "export",
            "onnx": tmp_path / "export" / "model.onnx", "manifest": tmp_path / "export" / "manifest.json",
            "pack": tmp_path / "pack.npz", "old": tmp_path / "old.json", "new": tmp_path / "new",
            "natural": r / "digits_natural_none_to_tiny_cnn.yaml",
            "ard": r / "digits_ard_small_cnn_to_tiny_cnn_linf0.15.yaml"}


@pytest.fixture
def refused(invoke) -> Callable[..., str]:
    """``refused(root, *args, code=2, needles=(...))``: the CLI call exits ``code`` with exactly one line on
    stderr, an ``error:`` line (the last; ``ciard run`` may say which stage started before it) holding each
    needle, no traceback, and leaves every entry under ``root`` as it was."""

    def check(root: Path, *args: object, code: int = 2, needles: tuple[str, ...] = ()) -> str:
        before = snapshot(root)
        res = invoke(*args)
        assert res.exit_code == code, (res.stdout, res.stderr)
        assert "Traceback" not in res.output, res.output
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and res.stderr.strip().splitlines()[-1].startswith("error:"), res.stderr
        text = " ".join(res.stderr.strip().splitlines()[-1:])
        for n in needles:
            assert n in res.stderr, res.stderr
        assert snapshot(root) == before
        return text

    return check


# --------------------------------------------------------------------------- item 2: outputs vs inputs
CHEAP = ("--n", 8, "--attacks", "fgsm")
#: (case, the CLI arguments): an output path onto an input of the same command, refused even with --force
ONTO_INPUTS = {
    "train --json RECIPE": lambda w: ["train", w["natural"], "--out", w["new"], "--json", w["natural"], "--force"],
    "distill --json RECIPE": lambda w: ["distill", w["ard"], "--out", w["new"], "--json", w["ard"], "--force"],
    "train --out RECIPE": lambda w: ["train", w["natural"], "--out", w["natural"]],
    "eval --json checkpoint": lambda w: ["eval", w["ckpt"], *CHEAP, "--json", w["ckpt"], "--force"],
    "eval --json card": lambda w: ["eval", w["run"], *CHEAP, "--json", w["card"], "--force"],
    "eval --state checkpoint": lambda w: ["eval", w["ckpt"], *CHEAP, "--state", w["ckpt"]],
    "eval --state card": lambda w: ["eval", w["run"], *CHEAP, "--state", w["card"]],
    "eval --json = --state": lambda w: ["eval", w["run"], *CHEAP, "--state", w["old"], "--json", w["old"], "--force"],
    "export --json card": lambda w: ["export", w["run"], "--out", w["new"], "--json", w["card"], "--force"],
    "export --json checkpoint": lambda w: ["export", w["ckpt"], "--out", w["new"], "--json", w["ckpt"], "--force"],
    "export --out checkpoint": lambda w: ["export", w["ckpt"], "--out", w["ckpt"], "--force"],
    "inspect --json manifest": lambda w: ["inspect", w["export"], "--json", w["manifest"], "--force"],
    "inspect --json model.onnx": lambda w: ["inspect", w["onnx"], "--json", w["onnx"], "--force"],
    "pack --out checkpoint": lambda w: ["pack", w["ckpt"], *CHEAP, "--out", w["ckpt"], "--force"],
    "pack --out card": lambda w: ["pack", w["run"], *CHEAP, "--out", w["card"], "--force"],
    "pack --out artifact": lambda w: ["pack", w["run"], *CHEAP, "--artifact", w["onnx"], "--out", w["onnx"],
                                      "--force"],
    "pack --json card": lambda w: ["pack", w["run"], *CHEAP, "--out", w["root"] / "p.npz", "--json", w["card"],
                                   "--force"],
    "pack --json = --out": lambda w: ["pack", w["run"], *CHEAP, "--out", w["old"], "--json", w["old"], "--force"],
    "verify --json pack": lambda w: ["verify", w["onnx"], "--pack", w["pack"], "--json", w["pack"], "--force"],
    "verify --json model.onnx": lambda w: ["verify", w["onnx"], "--pack", w["pack"], "--json", w["onnx"], "--force"],
    "verify --junit manifest": lambda w: ["verify", w["onnx"], "--pack", w["pack"], "--junit", w["manifest"],
                                          "--force"],
    "verify --markdown model.onnx": lambda w: ["verify", w["onnx"], "--pack", w["pack"], "--markdown", w["onnx"],
                                               "--force"],
    "verify --state pack": lambda w: ["verify", w["onnx"], "--pack", w["pack"], "--state", w["pack"]],
    "verify --state manifest": lambda w: ["verify", w["onnx"], "--pack", w["pack"], "--state", w["manifest"]],
    "plot --out card": lambda w: ["plot", w["run"], "--out", w["card"]],
    "run --json RECIPE": lambda w: ["run", w["natural"], "--out", w["new"], "--json", w["natural"], "--force"],
    "run --out RECIPE": lambda w: ["run", w["natural"], "--out", w["natural"]],
    "recipe cp onto itself": lambda w: ["recipe", "cp", w["natural"], w["natural"], "--force"],
    "recipe show --json RECIPE": lambda w: ["recipe", "show", w["natural"], "--json", w["natural"], "--force"],
}


@pytest.mark.parametrize("case", list(ONTO_INPUTS))
def test_an_output_onto_an_input_is_refused_even_with_force(case, work, refused):
    refused(work["root"], *ONTO_INPUTS[case](work))


#: (case, the CLI arguments): an output that exists (``old.json``), refused without --force
ONTO_EXISTING = {
    "doctor --json": lambda w: ["doctor", "--json", w["old"]],
    "models --json": lambda w: ["models", "--json", w["old"]],
    "datasets --json": lambda w: ["datasets", "--json", w["old"]],
    "attacks --json": lambda w: ["attacks", "--json", w["old"]],
    "recipe ls --json": lambda w: ["recipe", "ls", "--json", w["old"]],
    "recipe show --json": lambda w: ["recipe", "show", w["natural"], "--json", w["old"]],
    "recipe cp": lambda w: ["recipe", "cp", w["natural"], w["old"]],
    "train --json": lambda w: ["train", w["natural"], "--out", w["new"], "--json", w["old"]],
    "distill --json": lambda w: ["distill", w["ard"], "--out", w["new"], "--json", w["old"]],
    "eval --json": lambda w: ["eval", w["run"], *CHEAP, "--json", w["old"]],
    "export --json": lambda w: ["export", w["run"], "--out", w["new"], "--json", w["old"]],
    "export --list --json": lambda w: ["export", "--list", "--json", w["old"]],
    "inspect --json": lambda w: ["inspect", w["export"], "--json", w["old"]],
    "pack --out": lambda w: ["pack", w["run"], *CHEAP, "--out", w["old"]],
    "pack --json": lambda w: ["pack", w["run"], *CHEAP, "--out", w["root"] / "p.npz", "--json", w["old"]],
    "verify --json": lambda w: ["verify", w["onnx"], "--pack", w["pack"], "--json", w["old"]],
    "verify --junit": lambda w: ["verify", w["onnx"], "--pack", w["pack"], "--junit", w["old"]],
    "verify --markdown": lambda w: ["verify", w["onnx"], "--pack", w["pack"], "--markdown", w["old"]],
    "run --json": lambda w: ["run", w["natural"], "--out", w["new"], "--json", w["old"]],
    "quickstart --json": lambda w: ["quickstart", "--out", w["new"], "--json", w["old"]],
}


@pytest.mark.parametrize("case", list(ONTO_EXISTING))
def test_an_existing_output_is_refused_without_force(case, work, refused):
    refused(work["root"], *ONTO_EXISTING[case](work), needles=("already exists",))


# --------------------------------------------------------------------------- item 5: a refused run leaves nothing
#: (case, --set values): each refused after the checks of the recipe itself, where the run folder was made
REFUSED_RUNS = {
    "train: a dataset whose files are not there": ("train", "natural", ["data.dataset=cifar10",
                                                                        "data.data_root={root}/nowhere"]),
    "distill: a teacher checkpoint that is not there": ("distill", "ard", [
        "teachers.robust.recipe=null", "teachers.robust.checkpoint={root}/no.safetensors"]),
    "distill: a teacher checkpoint that is not one": ("distill", "ard", ["teachers.robust.recipe=null",
                                                                         "teachers.robust.checkpoint={root}/old.json"]),
    "run: a dataset whose files are not there": ("run", "natural", ["data.dataset=cifar10",
                                                                    "data.data_root={root}/nowhere"]),
}


@pytest.mark.parametrize("case", list(REFUSED_RUNS))
@pytest.mark.parametrize("out_exists", [False, True], ids=["new --out", "empty --out"])
def test_a_refused_run_leaves_nothing_behind(case, out_exists, work, refused):
    verb, recipe, sets = REFUSED_RUNS[case]
    out = work["root"] / "out"
    if out_exists:
        out.mkdir()  # the user's own (empty) folder stays, empty
    args = [a for s in sets for a in ("--set", s.format(root=work["root"]))]
    refused(work["root"], verb, work[recipe], "--out", out, *args)
    assert out.is_dir() == out_exists


# --------------------------------------------------------------------------- the battery: the file system fights back
def _mount_tmpfs(where: Path, options: str) -> None:
    """A tmpfs at ``where`` (``mount -t tmpfs -o OPTIONS``); skips the test, with the reason, where mounting is
    not permitted (not root, no CAP_SYS_ADMIN, no mount binary)."""
    where.mkdir()
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs here ({type(e).__name__}: {e})")
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")


def _umount(where: Path) -> None:
    """Unmounts ``where``; lazily (``-l``) if a file is still open there, so no mount outlives the test."""
    if subprocess.run(["umount", str(where)], capture_output=True, timeout=20).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=20)


@pytest.fixture
def readonly(tmp_path) -> Path:
    """A folder no file can be written into: chmod 0555 for a user, or (as root, whom permissions do not
    stop) a tmpfs mounted read-only (EROFS); a skip with the reason where neither works."""
    d = tmp_path / "readonly"
    if os.geteuid() != 0:
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    _mount_tmpfs(d, "ro,size=64k")
    yield d
    _umount(d)


@pytest.fixture
def full_disk(tmp_path) -> Path:
    """A 64 KiB tmpfs filled up by ``filler.bin`` (a file that must stay as it is): every write is ENOSPC."""
    d = tmp_path / "full"
    _mount_tmpfs(d, "size=64k")
    try:
        with open(d / "filler.bin", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\xa5" * 4096)
                    f.flush()
            except OSError as e:  # the end of the loop: the tmpfs is full, nothing else
                assert e.errno == errno.ENOSPC, f"filling the tmpfs failed otherwise: {e}"
        yield d
    finally:
        _umount(d)


#: the verbs that write a file or folder, each given ``target`` as its output
WRITERS = {
    "inspect --json": lambda w, t: ["inspect", w["export"], "--json", t],
    "verify --json": lambda w, t: ["verify", w["onnx"], "--pack", w["pack"], "--json", t],
    "verify --junit": lambda w, t: ["verify", w["onnx"], "--pack", w["pack"], "--junit", t],
    "pack --out": lambda w, t: ["pack", w["run"], *CHEAP, "--out", t],
    "export --out": lambda w, t: ["export", w["run"], "--out", t, "--n", 16],
    "train --out": lambda w, t: ["train", w["natural"], "--out", t],
}


@pytest.mark.parametrize("verb", list(WRITERS))
def test_a_read_only_folder(verb, work, readonly, refused):
    refused(work["root"], *WRITERS[verb](work, readonly / "out.x"))


@pytest.mark.parametrize("verb", ["inspect --json", "verify --junit", "pack --out", "export --out", "train --out"])
def test_a_full_disk(verb, work, full_disk, refused):
    refused(work["root"], *WRITERS[verb](work, full_disk / "out.x"), needles=("full/out.x", "(ENOSPC)"))


@pytest.mark.parametrize("verb", list(WRITERS))
def test_a_name_too_long(verb, work, refused):
    refused(work["root"], *WRITERS[verb](work, work["root"] / ("n" * 300)), needles=("too long",))


@pytest.mark.parametrize("verb", ["inspect --json", "pack --out"])
def test_a_dangling_symlink_is_refused_never_written_through(verb, work, refused):
    link = work["root"] / "link.out"
    link.symlink_to(work["root"] / "elsewhere" / "target.out")
    refused(work["root"], *WRITERS[verb](work, link), needles=("symbolic link",))
    assert not (work["root"] / "elsewhere").exists()


@pytest.mark.parametrize("verb", ["export --out", "train --out"])
def test_a_dangling_symlink_as_out_folder(verb, work, refused):
    link = work["root"] / "link.out"
    link.symlink_to(work["root"] / "elsewhere")
    refused(work["root"], *WRITERS[verb](work, link), needles=("symbolic link",))
    assert not (work["root"] / "elsewhere").exists()


@pytest.mark.parametrize("case", ["eval --json -> card", "inspect --json -> manifest", "pack --out -> checkpoint",
                                  "verify --markdown -> pack"])
def test_a_symlink_output_onto_an_input(case, work, refused):
    link = work["root"] / "link.out"
    verb, target = case.split(" -> ")
    link.symlink_to({"card": work["card"], "manifest": work["manifest"], "checkpoint": work["ckpt"],
                     "pack": work["pack"]}[target])
    args = {"eval --json": ["eval", work["run"], *CHEAP, "--json", link],
            "inspect --json": ["inspect", work["export"], "--json", link],
            "pack --out": ["pack", work["run"], *CHEAP, "--out", link],
            "verify --markdown": ["verify", work["onnx"], "--pack", work["pack"], "--markdown", link]}[verb]
    refused(work["root"], *args, "--force", needles=("same file",))


@pytest.mark.parametrize("name", ["résumé-模型 ✓.json", "ünï cödé/報告.json"])
def test_unicode_names_are_written(name, work, invoke):
    target = work["root"] / name
    res = invoke("inspect", work["export"], "--json", target)
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert '"manifest"' in target.read_text(encoding="utf-8")


def test_a_unicode_pack_path(work, invoke):
    target = work["root"] / "pâck 模型.npz"
    res = invoke("pack", work["run"], *CHEAP, "--out", target, "--json", work["root"] / "pâck.json")
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert target.is_file() and (work["root"] / "pâck.json").is_file()
    res = invoke("verify", work["onnx"], "--pack", target, "--json", work["root"] / "vérify.json")
    assert res.exit_code == 0, res.output
