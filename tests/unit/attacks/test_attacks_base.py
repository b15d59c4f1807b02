"""eps parsing, labels, the attack registry, capabilities and the result round trip (no attack runs)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ciard_deploy.attacks import (
    ATTACKS,
    AttackEntry,
    AttackResult,
    Budget,
    EvalResult,
    MissingCapability,
    attack_requires,
    create_attack,
    ensure_capabilities,
    format_eps,
    list_attacks,
    parse_eps,
)
from ciard_deploy.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EnvironmentMissing, UsageError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text, expected", [
    ("8/255", 8 / 255), ("8/255.0", 8 / 255), (" 4 / 255 ", 4 / 255), ("0.03", 0.03), ("0", 0.0),
    ("1", 1.0), ("1e-2", 0.01), (".5", 0.5), (0.25, 0.25), (np.float32(0.5), 0.5),
])
def test_parse_eps_accepts(text, expected):
    assert parse_eps(text) == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize("text, words", [
    ("-1", "negative"), ("-8/255", "negative"), ("1.5", "<= 1"), ("8", "8/255"), ("abc", "8/255 or 0.03"),
    ("8/0", "zero"), ("", "expected"), ("nan", "expected"), ("inf", "expected"), ("8/255/2", "expected"),
    (float("nan"), "finite"), (-0.1, "negative"), (True, "expected"),
])
def test_parse_eps_rejects_with_one_line(text, words):
    with pytest.raises(UsageError) as info:
        parse_eps(text)
    msg = str(info.value)
    assert words in msg and "\n" not in msg
    assert info.value.exit_code == EXIT_BAD_INPUT


@pytest.mark.parametrize("eps, text", [
    (8 / 255, "8/255"), (16 / 255, "16/255"), (2 / 255, "2/255"), (0.1, "0.1"), (0.2, "0.2"), (0.03, "0.03"),
    (0.0314, "0.0314"), (0.0, "0"), (1.0, "1"), (1 / 3, "85/255"), (0.123456789, "0.1235"),
])
def test_format_eps(eps, text):
    assert format_eps(eps) == text


@pytest.mark.parametrize("spec, label", [
    ("fgsm", "fgsm@8/255"), ("pgd20", "pgd20@8/255"), ("pgd", "pgd20@8/255"), ("pgdt20", "pgdt20@8/255"),
    ("cw30", "cw30@8/255"), ("cw", "cw30@8/255"), ("aa", "aa@8/255"), ("aa-fast", "aa-fast@8/255"),
    ("square100", "square100@8/255"), ("PGD10", "pgd10@8/255"),
])
def test_labels_name_attack_and_budget(spec, label):
    assert create_attack(spec, "8/255").label == label


def test_create_attack_defaults_follow_the_protocol():
    pgd = create_attack("pgd10", 8 / 255)
    assert pgd.budget == Budget("Linf", 8 / 255, 10, 2 / 255)
    assert pgd.random_start and pgd.restarts == 1 and pgd.requires == {"gradients"}
    assert create_attack("pgdt20", 8 / 255).budget.step_size == 0.003
    fgsm = create_attack("fgsm", 0.1)
    assert (fgsm.budget.steps, fgsm.budget.step_size) == (1, 0.1)
    cw = create_attack("cw", 8 / 255)
    assert (cw.name, cw.confidence, cw.random_start, cw.budget.step_size) == ("cw30", 50.0, False, 2 / 255)
    aa, fast = create_attack("aa", 0.1), create_attack("aa-fast", 0.1)
    assert aa.options()["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert fast.options()["attacks"] == ["apgd-ce", "apgd-t"]
    square = create_attack("square300", 0.1)
    assert square.budget.steps == 300 and square.requires == {"scores"} and square.budget.step_size is None


def test_create_attack_overrides():
    pgd = create_attack("pgd5", "4/255", step_size=1 / 255, restarts=3, random_start=False, seed=7)
    assert (pgd.budget.step_size, pgd.restarts, pgd.random_start, pgd.seed) == (1 / 255, 3, False, 7)
    assert create_attack("cw10", 0.1, confidence=0).confidence == 0.0
    assert create_attack("square50", 0.1, p_init=0.3).p_init == 0.3
    for family in ATTACKS.names():  # every attack takes a seed, so callers can pass one uniformly
        assert create_attack(family, 0.1, seed=3).seed == 3


@pytest.mark.parametrize("spec, hint", [
    ("pdg20", "Did you mean 'pgd20'?"), ("fgsm3", "Did you mean 'fgsm'?"), ("aa-fastt", "Did you mean 'aa-fast'?"),
    ("autoattack", "Valid:"), ("pgd-20", "Valid:"), ("", "Valid:"),
])
def test_unknown_attack_lists_valid_names(spec, hint):
    with pytest.raises(UsageError) as info:
        create_attack(spec, 0.1)
    msg = str(info.value)
    assert hint in msg and "\n" not in msg
    for pattern in ("fgsm", "pgd<K>", "pgdt<K>", "cw<K>", "aa", "aa-fast", "square<Q>"):
        assert pattern in msg


def test_create_attack_rejects_bad_options_and_values():
    with pytest.raises(UsageError, match="does not take option.*foo.*it takes:.*step_size"):
        create_attack("pgd20", 0.1, foo=1)
    with pytest.raises(UsageError, match="steps/queries must be at least 1"):
        create_attack("pgd0", 0.1)
    with pytest.raises(UsageError, match="step_size must be > 0"):
        create_attack("pgd10", 0.1, step_size=-1.0)
    with pytest.raises(UsageError, match="queries must be >= 2"):
        create_attack("square1", 0.1)
    with pytest.raises(UsageError, match="eps"):
        create_attack("fgsm", "2")


def test_registry_lists_every_family():
    assert list_attacks() == ["aa", "aa-fast", "apgd-ce<K>", "apgd-t<K>", "cw<K>", "fab-t<K>", "fgsm", "mtpgd<K>",
                              "pgd<K>", "pgdt<K>", "square<Q>"]
    assert set(ATTACKS.names()) == {"aa", "aa-fast", "apgd-ce", "apgd-t", "cw", "fab-t", "fgsm", "mtpgd", "pgd", "pgdt",
                                   "square"}
    assert all(entry.description for _, entry in ATTACKS.items())
    assert attack_requires("square100") == {"scores"} and attack_requires("aa") == {"gradients"}
    for family, entry in ATTACKS.items():  # the registry knows what each attack needs without importing it
        assert create_attack(family, 0.1).requires == entry.requires


def test_capabilities_fail_early_naming_what_is_missing():
    pgd = create_attack("pgd20", 8 / 255)
    with pytest.raises(MissingCapability) as info:
        pgd.ensure_capabilities({"scores"})
    msg = str(info.value)
    assert "pgd20@8/255" in msg and "needs gradients" in msg and "provides: scores" in msg
    assert isinstance(info.value, UsageError) and info.value.missing == ["gradients"]
    square = create_attack("square100", 8 / 255)
    square.ensure_capabilities({"scores"})  # an ORT/TRT runtime is enough
    pgd.ensure_capabilities({"gradients", "scores"})
    with pytest.raises(MissingCapability, match="square100@8/255 needs scores"):
        ensure_capabilities([pgd, square], {"gradients"})
    with pytest.raises(MissingCapability, match="provides: nothing"):
        ensure_capabilities(pgd, set())


def test_missing_dependency_is_an_environment_error():
    entry = AttackEntry("ghost", "ghost", "ciard_deploy_no_such_module:Ghost")
    with pytest.raises(EnvironmentMissing, match="ghost needs ciard_deploy_no_such_module") as info:
        entry.load()
    assert info.value.exit_code == EXIT_ENVIRONMENT


def test_registry_square_and_results_import_no_torch():
    """The numpy Square path and the registry must run on a torch-free edge device."""
    code = ("import sys; import ciard_deploy.attacks as A; a = A.create_attack('square100', '8/255'); "
            "A.parse_eps('8/255'); A.EvalResult; import ciard_deploy.attacks.square; "
            "assert 'torch' not in sys.modules, 'torch imported'; assert 'art' not in sys.modules, 'ART imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _result() -> EvalResult:
    clean = np.array([1, 1, 1, 0, 1], dtype=bool)
    fgsm = np.array([1, 1, 0, 0, 1], dtype=bool)
    pgd = np.array([1, 0, 0, 0, 1], dtype=bool)
    attacks = [AttackResult("fgsm", "fgsm@8/255", 8 / 255, 0.6, 0.1, fgsm),
               AttackResult("pgd20", "pgd20@8/255", 8 / 255, 0.4, 0.5, pgd)]
    return EvalResult(n=5, clean_acc=0.8, attacks=attacks, worst_case_acc=0.4, clean_correct=clean)


def test_eval_result_json_round_trip():
    res = _result()
    d = res.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["robust_acc"] == {"fgsm@8/255": 0.6, "pgd20@8/255": 0.4}
    assert d["worst_case_label"] == "worst(fgsm+pgd20)@8/255" and d["worst_case_acc"] == 0.4
    assert "per_sample" not in d["attacks"][0] and "clean_correct" not in d
    back = EvalResult.from_dict(d)
    assert back.n == 5 and back["pgd20@8/255"].robust_acc == 0.4 and back["fgsm"].seconds == 0.1
    assert back.clean_correct is None and back.worst_case is None

    full = EvalResult.from_dict(json.loads(json.dumps(res.to_dict(per_sample=True))))
    np.testing.assert_array_equal(full.attacks[1].per_sample, res.attacks[1].per_sample)
    np.testing.assert_array_equal(full.worst_case, [1, 0, 0, 0, 1])
    assert full.accuracies() == {"clean": 0.8, "fgsm@8/255": 0.6, "pgd20@8/255": 0.4,
                                 "worst(fgsm+pgd20)@8/255": 0.4}
    with pytest.raises(KeyError, match="have: fgsm@8/255, pgd20@8/255"):
        res["aa"]
    with pytest.raises(ValueError, match="not an attack evaluation"):
        EvalResult.from_dict({**d, "kind": "other"})
    with pytest.raises(ValueError, match="newer"):
        EvalResult.from_dict({**d, "schema_version": 99})


def test_worst_case_label_keeps_mixed_budgets():
    res = _result()
    res.attacks[1] = AttackResult("pgd20", "pgd20@4/255", 4 / 255, 0.4, 0.5)
    assert res.worst_case_label == "worst(fgsm@8/255+pgd20@4/255)"
