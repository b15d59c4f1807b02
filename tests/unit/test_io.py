import json
import os

import pytest
import torch

from ciard_deploy.errors import ArtifactError, UsageError
from ciard_deploy.checkpoints import CheckpointMeta, load_weights_into, read_state_dict, save_checkpoint
from ciard_deploy.fingerprint import sha256_file
from ciard_deploy.io import atomic_write_text
from ciard_deploy.model_loader import load_checkpoint, load_model
from ciard_deploy.models import create_model

pytestmark = pytest.mark.unit


def _model(name="tiny_cnn", seed=0):
    torch.manual_seed(seed)
    return create_model(name, 10, 1, [0.3], [0.4]).eval()


def _meta(arch="tiny_cnn"):
    return CheckpointMeta(arch, 10, (1, 8, 8), (0.3,), (0.4,), "digits", tuple(map(str, range(10))), eps=0.1,
                          recipe_hash="abc", metrics={"clean": 0.9})


def test_round_trip_preserves_outputs_and_metadata(tmp_path):
    m = _model()
    w = save_checkpoint(tmp_path / "student", m, _meta())
    assert w.name == "student.safetensors" and (tmp_path / "student.json").exists()
    m2, meta = load_checkpoint(tmp_path / "student.safetensors")
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(m(x), m2(x))
    assert meta.arch == "tiny_cnn" and meta.eps == 0.1 and meta.metrics == {"clean": 0.9}
    assert meta.input_shape == (1, 8, 8) and "torch" in meta.versions
    assert json.loads((tmp_path / "student.json").read_text())["weights_sha256"] == sha256_file(w)
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "net"])
def test_dataparallel_pth_with_module_prefix_loads(tmp_path, wrap):
    src = _model(seed=1)
    sd = {f"module.{k}": v for k, v in torch.nn.DataParallel(src.net).module.state_dict().items()}
    obj = sd if wrap == "plain" else {wrap: sd, "epoch": 3}
    torch.save(obj, tmp_path / "dp.pth")
    dst = _model(seed=2)
    load_weights_into(dst, tmp_path / "dp.pth")
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(src(x), dst.eval()(x))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"weights": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ArtifactError, match="pickled code"):
        read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_architecture_mismatch_names_keys(tmp_path):
    save_checkpoint(tmp_path / "a", _model(), _meta())
    with pytest.raises(ArtifactError, match="does not fit this architecture: shape mismatch at net"):
        load_weights_into(create_model("small_cnn", 10, 1), tmp_path / "a.safetensors")
    with pytest.raises(ArtifactError, match="missing .* keys"):
        load_weights_into(create_model("resnet18_tiny", 10, 1), tmp_path / "a.safetensors")


def test_trades_sub_block1_keys_are_ignored(tmp_path):
    torch.manual_seed(0)
    wrn = create_model("wrn-16-2", 10, 3).eval()
    sd = dict(wrn.net.state_dict())
    sd.update({f"sub_block1.{k[len('block1.'):]}": v for k, v in sd.items() if k.startswith("block1.")})
    torch.save(sd, tmp_path / "trades.pt")
    dst = create_model("wrn-16-2", 10, 3)
    load_weights_into(dst, tmp_path / "trades.pt")
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(wrn(x), dst.eval()(x))


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ArtifactError, match="corrupt"):
        read_state_dict(tmp_path / "bad.pt")
    with pytest.raises(ArtifactError, match="corrupt"):
        read_state_dict(tmp_path / "bad.safetensors")
    with pytest.raises(ArtifactError, match="not found"):
        read_state_dict(tmp_path / "nope.pt")
    save_checkpoint(tmp_path / "c", _model(), _meta())
    (tmp_path / "c.json").write_text("{broken")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_checkpoint(tmp_path / "c.safetensors")


def test_plain_state_dict_needs_arch_and_dataset(tmp_path):
    torch.save(_model().net.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(UsageError, match="--arch and --dataset"):
        load_model(tmp_path / "plain.pt")
    model, meta = load_model(tmp_path / "plain.pt", arch="tiny_cnn", dataset="digits")
    assert meta.num_classes == 10 and meta.input_shape == (1, 8, 8)
    assert model(torch.rand(1, 1, 8, 8)).shape == (1, 10)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")

    with pytest.raises(TypeError):
        atomic_write_text(p, None)  # type: ignore[arg-type]
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["f.txt"]
