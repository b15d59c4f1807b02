"""Datasets read from disk: CIFAR-10/100 (torchvision), Tiny-ImageNet and any image folder.

torchvision is imported here only, lazily. Decoded image folders are cached as one .npz next
to the user's cache dir, so a second load of 60k JPEGs is instant.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ciard_deploy.data.base import DATASETS, ArrayDataset, DatasetEntry, DatasetInfo
from ciard_deploy.errors import DataError, UsageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm"}
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def default_root(name: str) -> Path:
    base = os.environ.get("CIARD_DATA", os.path.join(os.path.expanduser("~"), ".cache", "ciard", "data"))
    return Path(base) / name


def cache_dir() -> Path:
    return Path(os.environ.get("CIARD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ciard")))


def folder_from_tar(tar_path: str | Path, out: str | Path, per_split: dict[str, int],
                    num_classes: int | None = None) -> Path:
    """A small image folder ``out/<split>/<class>/<file>`` from a tarball of images laid out as
    ``.../<split>/<class>/<file>`` (the CIFAR-10 JPEG copy): the first ``per_split[split]`` images of
    each class, for tests and benchmarks. With ``num_classes`` it stops reading once every class of every
    split is full. Member names that are not plain names (``..``, ``.``) are skipped."""
    import tarfile

    out = Path(out)
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            parts = Path(m.name).parts
            i = next((k for k, p in enumerate(parts) if p in per_split), None)
            if i is None or len(parts) < i + 3 or {parts[i + 1], parts[-1]} & {"..", "."}:
                continue
            split, cls = parts[i], parts[i + 1]
            if counts.get((split, cls), 0) >= per_split[split]:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            dest = out / split / cls / parts[-1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
            if num_classes is not None and len(counts) == num_classes * len(per_split) \
                    and all(k >= per_split[sp] for (sp, _), k in counts.items()):
                break
    return out


# ---------------------------------------------------------------- CIFAR (torchvision)
def _cifar_info(name: str) -> DatasetInfo:
    if name == "cifar10":
        classes = CIFAR10_CLASSES
    else:
        classes = tuple(f"class_{i}" for i in range(100))
    return DatasetInfo(name, classes, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, "crop_flip", 4,
                       f"{name.upper()} via torchvision (download only with --download)")


def _load_cifar(name: str, split: str, root: str | None, download: bool) -> ArrayDataset:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root_path = Path(root) if root else default_root(name)
    try:
        ds = cls(str(root_path), train=split == "train", download=download)
    except RuntimeError:
        raise DataError(f"{name} files not found under {root_path}: pass --download to fetch them, "
                        f"or --data-root DIR where {cls.base_folder}/ lies") from None
    info = _cifar_info(name)
    if name == "cifar100":
        info = DatasetInfo(name, tuple(ds.classes), info.input_shape, info.mean, info.std, "crop_flip", 4,
                           info.description)
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return ArrayDataset(images, torch.as_tensor(ds.targets, dtype=torch.int64), info, split)


for _name in ("cifar10", "cifar100"):
    DATASETS.add(_name, DatasetEntry(
        _name,
        (lambda n: lambda split, root=None, download=False: _load_cifar(n, split, root, download))(_name),
        (lambda n: lambda root=None: _cifar_info(n))(_name),
        needs_root=False, description=_cifar_info(_name).description))


# ---------------------------------------------------------------- image folders
def _folder_classes(split_dir: Path) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir()))


def _decode_folder(split_dir: Path, classes: tuple[str, ...], size: int | None) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    files = [(f, ci) for ci, c in enumerate(classes) for f in sorted((split_dir / c).rglob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"no images under {split_dir}/<class>/")
    first = Image.open(files[0][0]).convert("RGB")
    w, h = (size, size) if size else first.size
    out = np.empty((len(files), 3, h, w), dtype=np.uint8)
    for i, (f, _) in enumerate(files):
        im = Image.open(f).convert("RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.BILINEAR)
        out[i] = np.asarray(im).transpose(2, 0, 1)
    return out, np.array([ci for _, ci in files], dtype=np.int64)


def _cached_decode(split_dir: Path, classes: tuple[str, ...], size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Decode once, cache as .npz keyed by the folder's path, file count and newest mtime."""
    stat = [(p.stat().st_mtime_ns) for p in split_dir.iterdir()]
    key = hashlib.sha256(f"{split_dir.resolve()}|{classes}|{size}|{max(stat, default=0)}|{len(stat)}".encode()).hexdigest()[:16]
    cache = cache_dir() / "decoded" / f"{split_dir.parent.name}-{split_dir.name}-{key}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return z["x"], z["y"]
    x, y = _decode_folder(split_dir, classes, size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, cache)
    return x, y


def _require_root(name: str, root: str | None) -> Path:
    if not root:
        raise UsageError(f"dataset {name!r} needs --data-root DIR (a folder with train/<class>/ and test/<class>/)")
    p = Path(root)
    if not p.is_dir():
        raise DataError(f"dataset folder not found: {p}")
    return p


def _folder_info(root: str | None, name: str = "imagefolder") -> DatasetInfo:
    p = _require_root(name, root)
    train = p / "train"
    if not train.is_dir():
        raise DataError(f"{p} has no train/<class>/ folders")
    classes = _folder_classes(train)
    from PIL import Image

    sample = next((f for f in (train / classes[0]).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES), None)
    if sample is None:
        raise DataError(f"no images under {train / classes[0]}")
    w, h = Image.open(sample).size
    return DatasetInfo(name, classes, (3, h, w), CIFAR_MEAN, CIFAR_STD, "crop_flip", 4 if h <= 32 else 8,
                       "any folder with train/<class>/* and test/<class>/*")


def _load_folder(split: str, root: str | None = None, download: bool = False) -> ArrayDataset:
    info = _folder_info(root)
    split_dir = Path(root) / split  # type: ignore[arg-type]
    if not split_dir.is_dir():
        raise DataError(f"{Path(root)} has no {split}/<class>/ folders")
    x, y = _cached_decode(split_dir, info.classes, info.input_shape[1])
    return ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), info, split)


DATASETS.add("imagefolder", DatasetEntry("imagefolder", _load_folder, _folder_info, needs_root=True,
                                         description="any folder with train/<class>/* and test/<class>/*"))


# ---------------------------------------------------------------- Tiny-ImageNet
def _tin_info(root: str | None = None) -> DatasetInfo:
    classes: tuple[str, ...] = tuple(f"n{i}" for i in range(200))
    if root and (Path(root) / "wnids.txt").exists():
        classes = tuple((Path(root) / "wnids.txt").read_text().split())
    return DatasetInfo("tinyimagenet", classes, (3, 64, 64), (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262),
                       "crop_flip", 8, "Tiny-ImageNet-200 in its standard layout (train/, val/val_annotations.txt)")


def _load_tin(split: str, root: str | None = None, download: bool = False) -> ArrayDataset:
    from PIL import Image

    p = _require_root("tinyimagenet", root)
    info = _tin_info(root)
    if not (p / "wnids.txt").exists():
        raise DataError(f"{p} is not Tiny-ImageNet: wnids.txt missing")
    if split == "train":
        # train/<wnid>/images/*.JPEG
        x, y = _cached_decode(p / "train", info.classes, 64)
        return ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), info, split)
    ann = p / "val" / "val_annotations.txt"
    if not ann.exists():
        raise DataError(f"{ann} missing (the standard Tiny-ImageNet val layout)")
    index = {c: i for i, c in enumerate(info.classes)}
    rows = [line.split("\t")[:2] for line in ann.read_text().splitlines() if line.strip()]
    x = np.empty((len(rows), 3, 64, 64), dtype=np.uint8)
    for i, (fname, _) in enumerate(rows):
        x[i] = np.asarray(Image.open(p / "val" / "images" / fname).convert("RGB").resize((64, 64))).transpose(2, 0, 1)
    y = np.array([index[w] for _, w in rows], dtype=np.int64)
    return ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), info, split)


DATASETS.add("tinyimagenet", DatasetEntry("tinyimagenet", _load_tin, _tin_info, needs_root=True,
                                          description=_tin_info().description))
