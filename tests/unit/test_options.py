"""One schema per option set: the option models, the recipe's deploy: section and the CLI agree by construction.

Recipe validation imports neither torch nor the verify package; the registries hold exactly the
catalogued names; every deploy key belongs to a `ciard run` stage's fingerprint; the CLI flags take
their defaults from the models and the gate flags come from the gate table.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer

from ciard_deploy.cli import app
from ciard_deploy.config import DeployConfig, recipe_from_dict
from ciard_deploy.options.catalog import DATASET_NAMES, MODEL_NAMES
from ciard_deploy.options.export import MIN_AGREEMENT, ExportOptions
from ciard_deploy.options.gates import SPECS
from ciard_deploy.options.methods import METHOD_CATALOG
from ciard_deploy.options.pack import PackOptions
from ciard_deploy.registry import Registry
from ciard_deploy.verify.checks import DEFAULT_AGREEMENT

pytestmark = pytest.mark.unit


def test_validating_every_shipped_recipe_imports_neither_torch_nor_verify():
    code = ("import sys; from ciard_deploy.config import list_recipes, load_recipe, check_recipe_tree; "
            "names = list_recipes(); assert len(names) > 20, names; "
            "[(load_recipe(p).hash, check_recipe_tree(load_recipe(p))) for p in names.values()]; "
            "bad = [m for m in ('torch', 'ciard_deploy.verify') if m in sys.modules]; "
            "assert not bad, f'imported {bad}'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_registries_hold_exactly_the_catalogued_names():
    from ciard_deploy.data import DATASETS
    from ciard_deploy.distill.methods import METHODS
    from ciard_deploy.models import MODELS

    assert MODELS.names() == sorted(MODEL_NAMES) and DATASETS.names() == sorted(DATASET_NAMES)
    assert METHODS.names() == sorted(METHOD_CATALOG)
    for name, cls in METHODS.items():  # the method class uses the catalogued Config and teachers
        assert cls.Config is METHOD_CATALOG[name].Config and cls.teachers == METHOD_CATALOG[name].teachers, name
    r: Registry[int] = Registry("widget", catalog=("a",))
    r.add("a", 1)
    with pytest.raises(ValueError, match="not in its catalog"):
        r.add("b", 2)


def test_every_deploy_key_is_in_a_stage_fingerprint():
    covered = {k for keys in DeployConfig.STAGE_KEYS.values() for k in keys}
    assert covered == set(DeployConfig.model_fields)
    d = DeployConfig()
    assert set(d.stage_options("export")) == set(DeployConfig.STAGE_KEYS["export"])
    assert set(d.stage_options("pack")) == set(PackOptions.model_fields) | {"seed"}


def test_the_deploy_export_keys_are_the_export_options():
    d = DeployConfig()
    ref = ExportOptions()
    assert (d.opset, d.calib, d.calib_n, d.calib_method, d.parity_n, d.provider, d.seed) == \
        (ref.opset, ref.calib, ref.calib_n, ref.calib_method, ref.n, ref.provider, ref.seed)
    assert DeployConfig.model_fields["opset"].description == ExportOptions.model_fields["opset"].description
    opts = d.export_options("digits", threads=2)
    assert opts.n == d.parity_n and opts.dataset == "digits" and opts.threads == 2
    assert isinstance(DeployConfig.model_fields["pack"].default_factory(), PackOptions)


def test_one_precision_table():
    assert {p: ExportOptions().threshold(p) for p in MIN_AGREEMENT} == MIN_AGREEMENT
    assert {k: v for k, v in DEFAULT_AGREEMENT.items() if k != "unknown"} == MIN_AGREEMENT


def _params(name: str) -> dict:
    cmd = typer.main.get_command(app)
    return {p.name: p for p in cmd.commands[name].params if p.name}


def test_cli_defaults_and_help_come_from_the_models():
    export = _params("export")
    for name in ("opset", "calib", "calib_n", "calib_method", "n", "min_agreement_fp32", "min_agreement_fp16",
                 "min_agreement_int8", "provider", "seed", "workspace_mb", "max_batch", "trt_int8", "simplify"):
        assert export[name].default == ExportOptions.model_fields[name].default, name
        assert export[name].help and export[name].help[:20].lower() == \
            ExportOptions.model_fields[name].description[:20].lower(), name
    pack = _params("pack")
    assert pack["n"].default == PackOptions().n
    assert pack["artifact_attacks"].default == ",".join(PackOptions().artifact_attacks)


def test_the_verify_gate_flags_are_the_gate_table():
    verify = _params("verify")
    for name, spec in SPECS.items():
        assert spec.flag in verify[name].opts and verify[name].default is None
    assert "gate_flags" not in verify


def test_a_recipe_deploy_section_reads_as_before():
    base = {"kind": "train", "model": {"arch": "tiny_cnn"}, "method": {"name": "natural"},
            "train": {"eval_attack": None, "select_by": "clean"}}
    r = recipe_from_dict({**base, "deploy": {"pack": {"eps": "8/255"}, "gates": {"min_clean": "90%"},
                                             "square_queries": 0}})
    assert r.deploy.pack.eps == 8 / 255 and r.deploy.gates.min_clean == 0.9 and r.deploy.live_attacks == []
    assert r.to_dict()["deploy"]["pack"]["eps"] == "8/255"  # written back as people write it
    assert r.deploy.pack.model_dump()["eps"] == 8 / 255  # a number in the fingerprint
