"""A built wheel carries the recipes: `pip install ciard-deploy` (no checkout) can list, find, show and
validate every shipped recipe, teacher recipes and `extends:` chains included.

The wheel is built from a copy of the source tree (no build/ or egg-info left in the checkout), with
the build backend already installed here (`--no-build-isolation`, no network), then unzipped -- which
is what installing a pure-Python wheel amounts to -- and used from a subprocess that cannot see the
checkout: `python -S` (no .pth files, so no editable-install finder), PYTHONPATH = the unzipped wheel
+ this environment's site-packages (for the dependencies), cwd elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
QUICK = "quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15"
SOURCE = ("pyproject.toml", "README.md", "MANIFEST.in", "ciard_deploy", "recipes")

PROBE = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    import ciard_deploy
    from ciard_deploy.config import (DistillRecipe, check_recipe_tree, find_recipe, list_recipes, load_recipe,
                                     recipes_dir)

    quick = load_recipe(find_recipe(sys.argv[1]))
    shipped = list_recipes()
    print("RESULT " + json.dumps({
        "package": ciard_deploy.__file__,
        "recipes_dir": str(recipes_dir()),
        "sys_path": sys.path,
        "quick": {"path": str(quick.source), "teachers": quick.teacher_hashes(),
                  "teacher_paths": [quick.teachers.clean.recipe, quick.teachers.robust.recipe],
                  "epochs": quick.train.epochs},
        "shipped": {name: {"hash": (r := load_recipe(p)).hash, "problems": check_recipe_tree(r),
                           "teacher_hashes": r.teacher_hashes() if isinstance(r, DistillRecipe) else {}}
                    for name, p in shipped.items()},
    }))
''')


def _source_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and not p.name.startswith(".") and p.suffix != ".pyc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("setuptools.build_meta", reason="the build backend (setuptools) is not installed here")
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("pip is not installed in this environment")
    work = tmp_path_factory.mktemp("packaging")
    src = work / "src"
    src.mkdir()
    for name in SOURCE:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif p.is_file():
            shutil.copy2(p, src / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                           "-w", str(work / "dist")], cwd=src, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "is absent from the `packages` configuration" not in proc.stderr, proc.stderr[-4000:]
    (whl,) = (work / "dist").glob("ciard_deploy-*.whl")
    return whl


def test_wheel_carries_every_recipe_and_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = [p.relative_to(REPO / "recipes").as_posix() for p in _source_files(REPO / "recipes")]
    assert len(recipes) > 30
    missing = [r for r in recipes if f"ciard_deploy/recipes/{r}" not in names]
    assert missing == [], f"recipes left out of the wheel: {missing}"
    modules = [p.relative_to(REPO).as_posix() for p in _source_files(REPO / "ciard_deploy")]
    missing = [m for m in modules if m not in names]
    assert missing == [], f"left out of the wheel (a subpackage missing from pyproject's packages?): {missing}"
    assert not any(n.startswith("recipes/") for n in names)  # inside the package, never a top-level folder


def test_recipes_found_and_validated_from_the_installed_wheel_alone(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {k: v for k, v in os.environ.items() if k not in ("CIARD_RECIPES", "PYTHONHOME")}
    env.update(PYTHONPATH=os.pathsep.join([str(site), *deps]), PYTHONNOUSERSITE="1")
    (tmp_path / "probe.py").write_text(PROBE)
    proc = subprocess.run([sys.executable, "-S", str(tmp_path / "probe.py"), QUICK], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    res = json.loads(lines[-1][len("RESULT "):])

    packaged = site / "ciard_deploy" / "recipes"
    assert Path(res["package"]).parent == site / "ciard_deploy"  # the wheel's copy, not the checkout
    assert not any(p and Path(p).resolve() == REPO for p in res["sys_path"])
    assert res["recipes_dir"] == str(packaged)
    quick = res["quick"]
    assert quick["path"] == str(packaged / f"{QUICK}.yaml") and quick["epochs"] > 0  # its extends chain merged
    assert set(quick["teachers"]) == {"clean", "robust"}
    assert all(Path(p).parent == packaged / "teachers" for p in quick["teacher_paths"])

    # every shipped recipe validates there, teacher recipes included, with the hash it has in the
    # checkout: teachers enter the hash by content, so where the files lie does not change it
    from ciard_deploy.config import DistillRecipe, list_recipes, load_recipe

    here = list_recipes()
    assert sorted(res["shipped"]) == sorted(here)
    assert {n: v["problems"] for n, v in res["shipped"].items() if v["problems"]} == {}
    for name, path in here.items():
        r = load_recipe(path)
        assert res["shipped"][name]["hash"] == r.hash, name
        if isinstance(r, DistillRecipe):
            assert res["shipped"][name]["teacher_hashes"] == r.teacher_hashes(), name

    # and the CLI of the installed wheel: `ciard recipe ls` and `ciard recipe validate` over all of them
    ciard = [sys.executable, "-S", "-m", "ciard_deploy"]
    ls = subprocess.run([*ciard, "recipe", "ls"], cwd=cwd, env={**env, "COLUMNS": "200"}, capture_output=True,
                        text=True, timeout=240)
    assert ls.returncode == 0, ls.stderr[-3000:]
    assert str(packaged) in ls.stdout and QUICK in ls.stdout and "invalid" not in ls.stdout
    val = subprocess.run([*ciard, "recipe", "validate", *sorted(here)], cwd=cwd, env={**env, "COLUMNS": "200"},
                         capture_output=True, text=True, timeout=240)
    assert val.returncode == 0, (val.stdout + val.stderr)[-3000:]
    assert val.stdout.count("ok ") == len(here)


def test_sdist_carries_the_recipes_too(wheel):
    """`python -m build` makes the wheel from the sdist: the sdist must hold recipes/ as well."""
    import tarfile

    src = wheel.parent.parent / "src"
    out = wheel.parent.parent / "sdist"
    proc = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                                                 "print('SDIST ' + b.build_sdist(sys.argv[1]))", str(out)],
                          cwd=src, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = next(ln for ln in proc.stdout.splitlines() if ln.startswith("SDIST ")).split(" ", 1)[1]
    with tarfile.open(out / name) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    recipes = [p.relative_to(REPO).as_posix() for p in _source_files(REPO / "recipes")]
    assert [r for r in recipes if r not in members] == []
