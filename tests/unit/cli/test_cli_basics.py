"""CLI wiring: help, version, listings, and every bad input of `ciard eval` -> one line, exit 2 (or 3)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from ciard_deploy import __version__
from ciard_deploy.cli import app
from ciard_deploy.models import create_model

pytestmark = pytest.mark.unit
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(res, code, *needles):
    out = res.output
    assert res.exit_code == code, out
    assert "Traceback" not in out and res.exception is None or isinstance(res.exception, SystemExit), out
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    err = " ".join(lines)
    assert err.startswith("error:"), out
    for n in needles:
        assert n in err, out


def test_version_and_help():
    res = invoke("--version")
    assert res.exit_code == 0 and __version__ in res.output
    res = invoke("--help")
    assert res.exit_code == 0 and "eval" in res.output and "doctor" in res.output


def test_listings():
    res = {verb: invoke(verb) for verb in ("models", "datasets", "attacks")}
    assert all(r.exit_code == 0 and r.exception is None for r in res.values()), {k: r.output for k, r in res.items()}
    assert "wrn-34-10" in res["models"].output and "11.17M" in res["models"].output  # preactresnet18's parameters
    assert "digits" in res["datasets"].output and "imagefolder" in res["datasets"].output
    assert "pgd<K>" in res["attacks"].output and "square<Q>" in res["attacks"].output


def test_doctor_json(tmp_path):
    res = invoke("doctor", "--json", tmp_path / "env.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "env.json").read_text())
    assert "CPUExecutionProvider" in rep["onnxruntime"]["providers"]
    assert "unavailable" in rep["tensorrt"] or "version" in rep["tensorrt"]


def test_eval_runs_on_an_untrained_checkpoint(ckpt, tmp_path):
    res = invoke("-q", "eval", ckpt, "--attacks", "fgsm", "--n", 40, "--eps", "0.1", "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["n"] == 40 and rep["attacks"][0]["label"] == "fgsm@0.1" and 0 <= rep["clean_acc"] <= 1


@pytest.mark.parametrize("args,needles", [
    (["eval", "/no/such/file.safetensors"], ["not found"]),
    (["eval", "{ckpt}", "--attacks", "pgd20,bogus7"], ["unknown attack", "pgd<K>"]),
    (["eval", "{ckpt}", "--eps", "8//255"], ["eps"]),
    (["eval", "{ckpt}", "--eps", "-0.1"], ["eps"]),
    (["eval", "{ckpt}", "--dataset", "mnist"], ["unknown dataset 'mnist'", "digits"]),
    (["eval", "{ckpt}", "--dataset", "cifar10", "--data-root", "{tmp}"], ["--download"]),
    (["eval", "{ckpt}", "--n", "0"], ["--n"]),
    (["eval", "{plain}"], ["--arch and --dataset"]),
    (["eval", "{plain}", "--arch", "resnet-18", "--dataset", "digits"], ["unknown model 'resnet-18'", "resnet18"]),
    (["eval", "{plain}", "--arch", "small_cnn", "--dataset", "digits"], ["does not fit this architecture"]),
    (["eval", "{corrupt}", "--arch", "tiny_cnn", "--dataset", "digits"], ["corrupt"]),
    (["eval", "{ckpt}", "--device", "banana"], ["unknown device"]),
])
def test_eval_bad_input_is_one_line_exit_2(ckpt, tmp_path, args, needles):
    plain = tmp_path / "plain.pt"
    torch.save(create_model("tiny_cnn", 10, 1).net.state_dict(), plain)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02garbage")
    fill = {"{ckpt}": str(ckpt), "{tmp}": str(tmp_path), "{plain}": str(plain), "{corrupt}": str(corrupt)}
    res = invoke(*[fill.get(a, a) for a in args])
    assert_one_line_error(res, 2, *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message; this machine has CUDA")
def test_eval_cuda_without_gpu_is_exit_3(ckpt):
    res = invoke("eval", ckpt, "--device", "cuda")
    assert_one_line_error(res, 3, "no CUDA device")


def test_help_prose_is_reflowed_and_examples_keep_their_lines():
    from ciard_deploy.cli import reflow_help

    doc = """First line.

        A paragraph written
        over three source
        lines.

        Example:
            ciard run RECIPE --out DIR
            ciard quickstart
        """
    assert reflow_help(doc) == ("First line.\n\nA paragraph written over three source lines.\n\n"
                                "\b\nExample:\n    ciard run RECIPE --out DIR\n    ciard quickstart")
    from ciard_deploy.cli import app

    helps = {c.name or c.callback.__name__: c.help for c in app.registered_commands}
    assert "OUT.partial/ beside --out. After Ctrl-C" in helps["pack"]
