"""Gates: parsing and validation (bad thresholds are exit 2), YAML files, merging, judging."""

from __future__ import annotations

import pytest

from ciard_deploy.errors import UsageError
from ciard_deploy.options.gates import SPECS, Gates
from ciard_deploy.verify.gates import gates_from_mapping, gates_from_recipe, judge, load_gates, unmeasurable

pytestmark = pytest.mark.unit

METRICS = {"clean_acc": 0.95, "worst_case_acc": 0.40, "clean_drop": 0.01, "robust_drop": -0.005,
           "agreement_clean": 1.0, "agreement_adversarial": 0.99}


def test_create_and_items():
    g = Gates.create(min_clean=0.9, max_clean_drop="1%", min_agreement="99.5%")
    assert g.min_clean == 0.9 and g.max_clean_drop == pytest.approx(0.01) and g.min_agreement == pytest.approx(0.995)
    assert [k for k, _ in g.items()] == ["min_clean", "max_clean_drop", "min_agreement"]  # fixed order
    assert bool(g) and not Gates()
    assert Gates.from_dict(g.to_dict()) == g


@pytest.mark.parametrize("kwargs,match", [
    ({"min_clean": 1.5}, r"outside \[0, 1\]"),
    ({"min_clean": 90}, "did you mean 0.9"),
    ({"min_robust": -0.1}, r"outside \[0, 1\]"),
    ({"max_clean_drop": -0.01}, "negative"),
    ({"max_robust_drop": -1}, "negative"),
    ({"min_agreement": 2}, r"outside \[0, 1\]"),
    ({"min_clean": float("nan")}, "finite"),
    ({"min_clean": "lots"}, "must be a number"),
    ({"min_clean": True}, "must be a number"),
    ({"min_cleen": 0.9}, "Did you mean 'min_clean'"),
])
def test_bad_gates_are_usage_errors(kwargs, match):
    with pytest.raises(UsageError, match=match):
        Gates.create(**kwargs)


def test_flag_names_in_messages():
    with pytest.raises(UsageError, match="--max-clean-drop"):
        Gates.create(max_clean_drop=-0.1)
    with pytest.raises(UsageError, match="gates.yaml: min_clean"):
        Gates.create(source="gates.yaml", min_clean=3)


def test_judge_pass_fail_and_tolerance():
    g = Gates.create(min_clean=0.95, min_robust=0.5, max_clean_drop=0.01, max_robust_drop=0.0, min_agreement=0.999,
                     min_agreement_adv=0.99)
    res = {r.name: r for r in judge(g, METRICS)}
    assert res["min_clean"].passed            # 0.95 >= 0.95 exactly
    assert not res["min_robust"].passed and res["min_robust"].measured == 0.40
    assert "0.4000 < required 0.5000" in res["min_robust"].message
    assert res["max_clean_drop"].passed and res["max_robust_drop"].passed and res["min_agreement"].passed
    assert res["min_agreement_adv"].passed
    assert judge(Gates.create(min_clean=0.95), {"clean_acc": 19 / 20})[0].passed  # float rounding
    assert set(SPECS) == set(res)
    missing = judge(Gates.create(min_agreement_adv=0.9), {"agreement_adversarial": None})[0]
    assert not missing.passed and missing.measured is None and "not measured" in missing.message


def test_unmeasurable():
    g = Gates.create(min_robust=0.1, max_robust_drop=0.1, min_clean=0.1)
    assert unmeasurable(g, {"clean_acc": True}) == ["--min-robust needs worst_case_acc",
                                                    "--max-robust-drop needs robust_drop"]


def test_yaml_files(tmp_path):
    f = tmp_path / "gates.yaml"
    f.write_text("# ciard verify m.onnx --pack p.npz --gates gates.yaml\ngates:\n  min_clean: 0.9\n  max_clean_drop: 2%\n")
    assert load_gates(f) == Gates(min_clean=0.9, max_clean_drop=0.02)
    f.write_text("min_robust: 0.3\n")
    assert load_gates(f) == Gates(min_robust=0.3)
    f.write_text("verify:\n  gates:\n    min_agreement: 0.97\n")
    assert load_gates(f) == Gates(min_agreement=0.97)
    f.write_text("")
    assert load_gates(f) == Gates()
    for text, match in (("gates: [1, 2]\n", "must be a mapping"), ("- a\n- b\n", "expected a mapping"),
                        ("gates:\n  min_robust: 2\n", r"gates.yaml: min_robust 2 is outside"),
                        ("gates:\n  min_robustness: 0.2\n", "Did you mean 'min_robust'"),
                        ("gates: {min_clean: [\n", "cannot read gates file")):
        f.write_text(text)
        with pytest.raises(UsageError, match=match):
            load_gates(f)
    with pytest.raises(UsageError, match="not found"):
        load_gates(tmp_path / "none.yaml")


def test_merge_and_recipe():
    base = Gates.create(min_clean=0.9, min_robust=0.3)
    merged = base.merged(Gates.create(min_clean=0.95, min_agreement=0.99))
    assert merged == Gates(min_clean=0.95, min_robust=0.3, min_agreement=0.99)
    assert gates_from_recipe({"verify": {"gates": {"min_clean": 0.8}}}) == Gates(min_clean=0.8)
    assert gates_from_recipe({"kind": "distill"}) == Gates()

    class Recipe:
        verify = {"gates": {"max_robust_drop": 0.02}}

    assert gates_from_recipe(Recipe()) == Gates(max_robust_drop=0.02)
    assert gates_from_mapping(None) == Gates()
