"""The Python API (``ciard_deploy.api``): README's "Python API" block run as it is (distill, export, pack,
verify on digits with a tiny budget), the callable subpackages, torch modules as models, the errors."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ciard_deploy as cd
from ciard_deploy.fingerprint import sha256_file
from ciard_deploy.errors import ArtifactError, CiardError, GateFailed, RecipeError, UsageError

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TINY = {"kind": "train", "model": {"arch": "tiny_cnn"}, "method": {"name": "natural"},
        "data": {"dataset": "digits", "train_subset": 120, "holdout": 20, "batch_size": 40},
        "train": {"epochs": 1, "device": "cpu", "eval_attack": None, "select_by": "clean", "eval_n": 20,
                  "final_eval_n": 40, "final_attacks": []},
        "attack": {"eps": 0.1}}


def readme_block() -> str:
    """The one ``python`` code block of README's "Python API" section."""
    section = (REPO / "README.md").read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```python\n")[1:]
    assert len(blocks) == 1, "README's Python API section has one python block"
    return blocks[0].split("```", 1)[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ciard_cache) -> dict:
    """README's block executed in a fresh folder; its namespace, its stdout and the folder."""
    d = tmp_path_factory.mktemp("api")
    ns: dict = {"__name__": "readme"}
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(d)
        mp.setenv("CIARD_CACHE", str(ciard_cache))  # module fixtures start before conftest's per-test cache
        exec(compile(readme_block(), "README.md (Python API)", "exec"), ns)
    return {**ns, "stdout": out.getvalue(), "dir": d}


def test_readme_example_runs_and_prints_its_numbers(demo, ciard_cache):
    run, teacher, exported, pack, report = (demo[k] for k in ("run", "teacher", "exported", "pack", "report"))
    assert isinstance(run, cd.DistillResult) and isinstance(exported, cd.ExportResult)
    assert isinstance(pack, cd.RobustnessPack) and isinstance(report, cd.VerifyReport)
    # paths are absolute (the notebook may change folders) and hold what they name
    assert run.run_dir == demo["dir"] / "api-demo" / "student" and run.checkpoint.is_file()
    assert teacher.summary["kind"] == "train" and teacher.summary["arch"] == "small_cnn"
    assert run.status == "complete" and run.summary["method"] == "ciard" and run.best_epoch == 3
    assert run.best["clean"] >= 0.85 and 0.1 <= run.best["fgsm@0.15"] < run.best["clean"]
    # the clean teacher was a torch module, saved to the model cache; the same weights as the robust one's file
    teachers = json.loads((run.run_dir / "teachers.json").read_text())
    assert Path(teachers["clean"]["path"]).parent.parent == ciard_cache / "models"
    assert teachers["robust"]["path"] == str(teacher.checkpoint)
    assert teachers["clean"]["sha256"] == teachers["robust"]["sha256"] == sha256_file(teacher.checkpoint)
    assert exported.passed and exported.path("onnx-int8").is_file() and exported.out_dir.is_absolute()
    assert pack.path == demo["dir"] / "api-demo" / "pack.npz" and pack.path.is_file() and pack.n == 200
    assert pack.attack_labels == ["pgd20@0.15"] and pack.reference["clean_acc"] >= 0.85
    assert report.status == "passed" and report.metrics["clean_acc"] >= 0.85
    assert 0 <= report.metrics["worst_case_acc"] <= pack.reference["clean_acc"]
    lines = demo["stdout"].splitlines()
    assert lines[0].startswith("student on PyTorch: {'clean': ") and "pgd20@0.15" in lines[0]
    assert lines[1] == (f"INT8 on onnxruntime: passed {report.metrics['clean_acc']} "
                        f"{report.metrics['worst_case_acc']}")


def test_a_module_is_saved_exported_and_verified(demo, tmp_path):
    """A trained student as a torch.nn.Module: saved as a checkpoint (its architecture found), exported,
    and verified on PyTorch against the pack built from its run, with the pack's own numbers."""
    import torch

    model = demo["run"].model()
    weights = cd.save_model(model, tmp_path / "student", dataset="digits", eps="0.15")
    card = cd.api.read_meta(weights)
    assert (card.arch, card.dataset, card.eps, card.num_classes) == ("tiny_cnn", "digits", 0.15, 10)
    model.net.train()
    bare = cd.save_model(model.net, tmp_path / "bare", dataset="digits")  # no normalization: mean 0, std 1
    assert cd.api.read_meta(bare).mean == (0.0,) and model.net.training  # its mode as it was
    model.eval()
    report = cd.verify(model, demo["pack"], live=[])
    assert report.status == "not_gated" and not report.warnings, report.warning_lines()
    assert report.metrics["clean_acc"] == demo["pack"].reference["clean_acc"]
    exported = cd.export(model, tmp_path / "export", dataset="digits", n=64, reference_attack=None)
    assert exported.passed and exported.path("onnx").is_file()
    assert model.training is False and isinstance(model, torch.nn.Module)


def test_the_verbs_are_the_subpackages_made_callable():
    """Either order: ``cd.distill`` before or after ``import ciard_deploy.distill``; nothing imports torch."""
    script = textwrap.dedent("""
        import sys
        import ciard_deploy.verify as v
        import ciard_deploy as cd
        assert cd.verify is v and callable(v) and v.run and v.Gates
        assert callable(cd.distill) and cd.distill is sys.modules["ciard_deploy.distill"] and cd.distill.TrainEvent
        from ciard_deploy import export
        assert export is cd.export and callable(export) and export.FORMATS
        assert cd.pack.__module__ == cd.train.__module__ == cd.save_model.__module__ == "ciard_deploy.api"
        assert {"distill", "export", "verify", "pack", "train", "DistillResult"} <= set(dir(cd))
        assert "torch" not in sys.modules, "importing the API imported torch"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_verify_runs_without_torch_and_distill_says_what_to_install(demo, tmp_path, run_torch_hidden):
    body = """
        import ciard_deploy as cd
        from ciard_deploy.errors import EnvironmentMissing
        onnx, pack = json.loads(sys.argv[1])
        report = cd.verify(onnx, pack, gates={"min_clean": 0.5}, live=[])
        try:
            cd.distill("quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15", "run")
            error = None
        except EnvironmentMissing as e:
            error = [str(e), e.exit_code]
        print("RESULT " + json.dumps({"status": report.status, "clean": report.metrics["clean_acc"],
                                      "error": error, "torch": ATTEMPTS}))
    """
    res, _ = run_torch_hidden(body, tmp_path, [demo["exported"].path("onnx-int8"), demo["pack"].path])
    assert res["status"] == "passed" and res["clean"] == demo["report"].metrics["clean_acc"]
    assert res["error"][1] == 3 and "ciard_deploy.distill needs PyTorch" in res["error"][0]
    assert "pip install 'ciard-deploy[train]'" in res["error"][0]


def test_a_dict_recipe_with_overrides(tmp_path):
    res = cd.train(TINY, tmp_path / "run", overrides={"train.seed": 3, "data.batch_size": 60})
    import yaml

    assert res.status == "complete" and res.summary["seed"] == 3 and set(res.best) == {"clean"}
    assert yaml.safe_load((res.run_dir / "recipe.yaml").read_text())["data"]["batch_size"] == 60
    assert cd.train(TINY, tmp_path / "run", overrides=["train.seed=3", "data.batch_size=60"], resume=True).best \
        == res.best  # a finished run: its summary


@pytest.mark.parametrize("call, error, needle", [
    (lambda d: cd.train(TINY, d / "r", overrides={"train.epochz": 2}), RecipeError,
     "train.epochz: unknown key (did you mean 'epochs'?)"),
    (lambda d: cd.train(TINY, d / "r", overrides={"train.epochs.x": 2}), RecipeError, "train.epochs is a value"),
    (lambda d: cd.train(TINY, d / "r", overrides="train.epochs=2"), UsageError, "wrap it in a list"),
    (lambda d: cd.train("quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15", d / "r"), UsageError,
     "is a kind 'distill' recipe: run it with ciard_deploy.distill(...)"),
    (lambda d: cd.distill("quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15", d / "r", teachers={"teacher": "x"}),
     UsageError, "unknown role 'teacher'"),
    (lambda d: cd.distill("quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15", d / "r",
                          teachers={"robust": d / "nothing"}), ArtifactError, "checkpoint not found"),
    (lambda d: cd.distill("no/such_recipe", d / "r"), RecipeError, "recipe not found: no/such_recipe"),
    (lambda d: cd.export(_linear(), d / "e"), UsageError, "needs dataset=..."),
    (lambda d: cd.save_model(_linear(), d / "m", dataset="digits"), UsageError,
     "none of the registered architectures"),
    (lambda d: cd.save_model(_small_cnn(), d / "m", dataset="digits", arch="tiny_cnn"), ArtifactError,
     "does not fit this architecture"),
    (lambda d: cd.save_model(_doubled(), d / "m", dataset="digits"), UsageError,
     "rebuilt as tiny_cnn for digits it computes other logits than the module"),
    (lambda d: cd.verify(d / "model.onnx", d / "pack.npz"), ArtifactError, "robustness pack not found"),
])
def test_bad_input_raises_the_clis_errors(call, error, needle, tmp_path):
    with pytest.raises(error) as e:
        call(tmp_path)
    assert needle in str(e.value) and e.value.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_bad_gates_a_missing_artifact_and_an_existing_pack_are_refused(demo, tmp_path):
    with pytest.raises(CiardError, match="missing.onnx") as e:
        cd.verify(tmp_path / "missing.onnx", demo["pack"])
    assert e.value.exit_code == 2
    with pytest.raises(UsageError, match="min_clen.*min_clean"):
        cd.verify(demo["exported"].path("onnx"), demo["pack"], gates={"min_clen": 0.9})
    with pytest.raises(UsageError, match="already exists; pass --force"):
        cd.pack(demo["run"], demo["pack"].path)


def test_gates_from_a_file_and_check_raising_gate_failed(demo, tmp_path):
    gates = tmp_path / "gates.yaml"
    gates.write_text("gates: {min_clean: 0.999}\n")
    onnx = demo["exported"].path("onnx")
    report = cd.verify(onnx, demo["pack"].path, gates=gates, live=[])
    assert report.status == "failed" and report.gates == {"min_clean": 0.999}
    with pytest.raises(GateFailed, match="min_clean") as e:
        cd.verify(onnx, demo["pack"], gates=gates, live=[], check=True)
    assert e.value.exit_code == 1


def test_a_pack_attacks_the_artifacts_of_an_export(demo, tmp_path):
    pack = cd.pack(demo["run"], tmp_path / "pack.npz", n=20, attacks=["fgsm"], artifacts=demo["exported"],
                   artifact_attacks=["fgsm"])
    made = {a.sha256: a.meta.get("skipped") for a in pack.artifacts}
    exported = {sha256_file(demo["exported"].path(name)) for name in ("onnx", "onnx-int8")}
    assert set(made) == exported and not any(made.values()), made
    assert not (tmp_path / "pack.npz.partial").exists()


def _linear():
    import torch

    return torch.nn.Linear(64, 10)


def _small_cnn():
    from ciard_deploy.models import create_model

    return create_model("small_cnn", 10, 1)


def _doubled():
    """A tiny_cnn whose forward is not tiny_cnn's: its weights fit, its logits are twice the architecture's."""
    from ciard_deploy.models import Normalized, create_model

    class Doubled(Normalized):
        def forward(self, x):
            return 2 * super().forward(x)

    model = create_model("tiny_cnn", 10, 1)
    return Doubled(model.net, [0.0], [1.0])
