import numpy as np
import pytest
import torch

from ciard_deploy.data import create_dataset, get_dataset_info, iterate_batches, list_datasets, stratified_indices
from ciard_deploy.data.transforms import augment_batch
from ciard_deploy.errors import CiardError, DataError, UsageError

pytestmark = pytest.mark.unit


def test_registry():
    assert {"digits", "cifar10", "cifar100", "tinyimagenet", "imagefolder"} <= set(list_datasets())


def test_digits_split_is_fixed_disjoint_and_stratified():
    tr, te = create_dataset("digits", "train"), create_dataset("digits", "test")
    assert (len(tr), len(te)) == (1437, 360)
    assert te.labels.bincount().tolist() == [36] * 10
    x, y = tr.tensors()
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # disjoint: no test image equals a train image at the same label more often than chance duplicates
    again = create_dataset("digits", "test")
    assert torch.equal(again.images, te.images)


def test_stratified_subset_is_seeded():
    y = torch.arange(100) % 10
    a, b, c = stratified_indices(y, 30, 1), stratified_indices(y, 30, 1), stratified_indices(y, 30, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert y[a].bincount().tolist() == [3] * 10
    assert len(stratified_indices(y, 200, 0)) == 100


def test_iterate_batches_covers_everything_once():
    ds = create_dataset("digits", "test")
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([y for _, y in iterate_batches(ds, 64, shuffle=True, generator=g)])
    assert len(seen) == 360 and torch.equal(seen.sort().values, ds.labels.sort().values)


def test_augmentation_crops_and_flips_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32)
    out = augment_batch(x, 4, g)
    assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    same = [(torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2))) for i in range(64)]
    assert sum(same) < 20  # most samples moved


def test_cifar_without_files_names_where_and_download(tmp_path):
    with pytest.raises(DataError, match="--download"):
        create_dataset("cifar10", "test", root=str(tmp_path))


def test_imagefolder_needs_root_and_bad_split():
    with pytest.raises(UsageError, match="--data-root"):
        get_dataset_info("imagefolder")
    with pytest.raises(UsageError):
        create_dataset("digits", "validation")
    with pytest.raises(CiardError):
        create_dataset("imagefolder", "train", root="/nonexistent/folder")


def test_imagefolder_reads_real_cifar(cifar_folder):
    info = get_dataset_info("imagefolder", str(cifar_folder))
    assert info.classes[0] == "airplane" and info.num_classes == 10 and info.input_shape == (3, 32, 32)
    te = create_dataset("imagefolder", "test", root=str(cifar_folder))
    assert len(te) == 200 and te.labels.bincount().tolist() == [20] * 10
    x, _ = te.tensors()
    assert x.dtype == torch.float32 and 0.2 < float(x.mean()) < 0.7
    # second load hits the decoded cache and gives identical pixels
    assert torch.equal(create_dataset("imagefolder", "test", root=str(cifar_folder)).images, te.images)


def _tiny_imagenet_layout(root, wnids=("n01443537", "n01629819"), per_class=3):
    """A miniature Tiny-ImageNet-200 folder in the standard layout, with real JPEG files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rows = []
    for ci, w in enumerate(wnids):
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"{w}_{i}.JPEG")
        (root / "val" / "images").mkdir(parents=True, exist_ok=True)
        name = f"val_{ci}.JPEG"
        Image.fromarray(np.full((64, 64, 3), 40 * (ci + 1), dtype=np.uint8)).save(root / "val" / "images" / name)
        rows.append(f"{name}\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")


def test_tinyimagenet_standard_layout(tmp_path):
    _tiny_imagenet_layout(tmp_path)
    info = get_dataset_info("tinyimagenet", str(tmp_path))
    assert info.classes == ("n01443537", "n01629819") and info.input_shape == (3, 64, 64)
    tr = create_dataset("tinyimagenet", "train", root=str(tmp_path))
    assert len(tr) == 6 and tr.labels.bincount().tolist() == [3, 3]
    te = create_dataset("tinyimagenet", "test", root=str(tmp_path))
    x, y = te.tensors()
    assert y.tolist() == [0, 1] and x.shape == (2, 3, 64, 64)
    assert abs(float(x[1].mean()) - 80 / 255) < 0.02  # the val image of class 1 is uniform grey 80
    (tmp_path / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataError, match="val_annotations.txt"):
        create_dataset("tinyimagenet", "test", root=str(tmp_path))


def test_folder_from_tar_keeps_the_first_images_per_class_and_skips_unsafe_names(tmp_path):
    import io
    import tarfile

    from ciard_deploy.data.folders import folder_from_tar

    tar_path = tmp_path / "images.tar.gz"
    names = [f"cifar/{split}/{cls}/{k}.jpg" for split in ("train", "test") for cls in ("cat", "dog") for k in range(4)]
    names += ["cifar/train/../evil.jpg", "cifar/test/cat/../../x.jpg", "README"]
    with tarfile.open(tar_path, "w:gz") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    out = folder_from_tar(tar_path, tmp_path / "out", {"train": 3, "test": 1}, num_classes=2)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["test/cat/0.jpg", "test/dog/0.jpg", "train/cat/0.jpg", "train/cat/1.jpg", "train/cat/2.jpg",
                     "train/dog/0.jpg", "train/dog/1.jpg", "train/dog/2.jpg"]
    assert (out / "train/cat/1.jpg").read_text() == "cifar/train/cat/1.jpg"
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "x.jpg").exists()
