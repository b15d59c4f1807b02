"""Conventions every verb shares: ``--json PATH`` (``-``: the JSON alone on stdout, the table on stderr), no
existing file overwritten without ``--force`` (exit 2, one line, the file left as it was), ``ciard export``
without a format flag, eps written as people write it (``8/255``), ``recipe ls`` columns, ``recipe cp``
headers, shell completion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

CIARD_QUICK = "quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15"


@pytest.mark.parametrize("args", [["models"], ["datasets"], ["attacks"], ["doctor"], ["recipe", "ls"],
                                  ["recipe", "show", CIARD_QUICK], ["export", "--list"]])
def test_json_dash_writes_the_json_alone_to_stdout(args, invoke):
    res = invoke(*args, "--json", "-")
    assert res.exit_code == 0, (res.stdout, res.stderr)
    doc = json.loads(res.stdout)  # nothing but the JSON document
    assert doc and res.stderr.strip()  # the table went to stderr
    if args == ["recipe", "ls"]:
        quick = [r for r in doc if r["name"].startswith("quick/")]
        assert len(quick) == 7 and all(r["deploy"] and r["model"] == "tiny_cnn" and r["dataset"] == "digits"
                                       for r in quick)


def test_json_file_is_not_overwritten_without_force(tmp_path, invoke, assert_one_line_error):
    mine = tmp_path / "models.json"
    mine.write_text("a user's file\n")
    assert_one_line_error(invoke("models", "--json", mine), 2, f"--json {mine} already exists", "--force")
    assert mine.read_text() == "a user's file\n"
    res = invoke("models", "--json", mine, "--force")
    assert res.exit_code == 0 and any(m["name"] == "tiny_cnn" for m in json.loads(mine.read_text()))


def test_eval_json_to_stdout_and_never_over_its_input(ckpt, tmp_path, invoke, assert_one_line_error):
    res = invoke("eval", ckpt, "--attacks", "fgsm", "--n", 20, "--json", "-")
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert json.loads(res.stdout)["attacks"][0]["label"] == "fgsm@0.1" and "worst case" in res.stderr
    before = ckpt.read_bytes()
    assert_one_line_error(invoke("eval", ckpt, "--n", 20, "--json", ckpt, "--force"), 2, "same file as CHECKPOINT")
    assert ckpt.read_bytes() == before


def test_export_without_a_format_flag_is_onnx_fp32_and_eps_reads_as_8_255(ckpt, tmp_path, invoke):
    out = tmp_path / "export"
    res = invoke("export", ckpt, "--out", out, "--n", 32, "--eps", "8/255", "--threads", 1, "--json", "-")
    assert res.exit_code == 0, (res.stdout, res.stderr)
    manifest = json.loads(res.stdout)
    assert [(a["file"], a["precision"]) for a in manifest["artifacts"]] == [("model.onnx", "fp32")]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    assert "eps 8/255" in res.stderr and "0.0313" not in res.stderr and "pgd20@8/255" in res.stderr


def test_recipe_ls_shows_model_dataset_and_deploy(invoke):
    res = invoke("recipe", "ls")
    assert res.exit_code == 0, res.output
    header = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith("name"))
    assert header.split() == ["name", "kind", "method", "model", "dataset", "epochs", "deploy"]
    row = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith(CIARD_QUICK))  # not folded in a pipe
    assert row.split()[1:] == ["distill", "ciard", "tiny_cnn", "digits", "20", "yes"]


def test_recipe_cp_rewrites_the_commands_to_the_copy(tmp_path, invoke, assert_one_line_error):
    dest = tmp_path / "mine.yaml"
    res = invoke("recipe", "cp", CIARD_QUICK, dest)
    assert res.exit_code == 0, res.output
    comments = [ln for ln in dest.read_text().splitlines() if ln.startswith("#")]
    assert comments[0] == f"# ciard distill {dest} --out runs/mine"
    assert f"#   ciard run {dest} --out runs/mine-deploy --threads 1" in comments
    named = [ln for ln in comments if "digits_ciard_small_cnn" in ln]
    assert len(named) == 1 and named[0].startswith("# copied from ")  # only the provenance names the source
    res = invoke("run", dest, "--out", tmp_path / "wf", "--from", "nope")  # the copy is what `ciard run` takes
    assert_one_line_error(res, 2, "--from 'nope' is not a stage")
    before = dest.read_bytes()
    assert_one_line_error(invoke("recipe", "cp", dest, dest, "--force"), 2, "is the recipe being copied")
    assert dest.read_bytes() == before


def test_shell_completion_is_offered(invoke):
    res = invoke("--help")
    assert res.exit_code == 0 and "--install-completion" in res.output and "--show-completion" in res.output


def test_no_eps_message_prints_a_long_decimal():
    from ciard_deploy.attacks.budget import format_eps
    from ciard_deploy.cli.export import _eps

    assert _eps(8 / 255) == format_eps(8 / 255) == "8/255" and _eps(None) == "-"
    root = Path(__file__).resolve().parents[3] / "ciard_deploy"
    for path in root.rglob("*.py"):  # a raw float eps in an f-string message
        text = path.read_text()
        for bad in ("eps {eps:", "eps {pack_eps:", "eps {state.key.eps:", "eps {pack.eps:", "eps {model['eps']}"):
            assert bad not in text, f"{path}: {bad}"
