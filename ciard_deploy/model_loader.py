"""Rebuilding a model from a checkpoint: the model registry (``models``) and, for a user's plain state
dict, the dataset registry (``data``) turn a checkpoint's card or ``--arch``/``--dataset`` into a
network, whose weights ``checkpoints.load_weights_into`` loads. Imports torch (through ``models``).
"""

from __future__ import annotations

import os
from typing import Any

from ciard_deploy.checkpoints import (CheckpointMeta, checkpoint_paths, load_weights_into, read_meta,
                                      resolve_checkpoint)
from ciard_deploy.data import get_dataset_info
from ciard_deploy.errors import UsageError
from ciard_deploy.fingerprint import sha256_file
from ciard_deploy.models import create_model


def load_checkpoint(path: str | os.PathLike, device: str = "cpu") -> tuple[Any, CheckpointMeta]:
    """Rebuilds the model named in the metadata and loads its weights (eval mode)."""
    meta = read_meta(path)
    model = create_model(meta.arch, meta.num_classes, meta.input_shape[0], meta.mean, meta.std, stem=meta.stem,
                         activation=meta.activation)
    load_weights_into(model, checkpoint_paths(path)[0])
    return model.to(device).eval(), meta


def load_model(source: str | os.PathLike, arch: str | None = None, dataset: str | None = None,
               data_root: str | None = None, device: str = "cpu") -> tuple[Any, CheckpointMeta]:
    """Loads a ciard checkpoint (metadata says what it is) or, with ``arch`` and ``dataset``,
    a user's plain state dict (.pt/.pth/.safetensors without metadata)."""
    path = resolve_checkpoint(source)
    if checkpoint_paths(path)[1].exists() and path.suffix == ".safetensors":
        model, meta = load_checkpoint(path, device)
        if arch and arch != meta.arch:
            raise UsageError(f"--arch {arch} contradicts the checkpoint's metadata ({meta.arch}); drop --arch")
        return model, meta
    if not arch or not dataset:
        raise UsageError(f"{path.name} has no ciard metadata: pass --arch and --dataset to load it as a plain state dict")
    info = get_dataset_info(dataset, data_root)
    model = create_model(arch, info.num_classes, info.in_chans, info.mean, info.std, input_shape=info.input_shape)
    load_weights_into(model, path)
    meta = CheckpointMeta(arch, info.num_classes, info.input_shape, info.mean, info.std, dataset, info.classes,
                          extra={"source": str(path), "sha256": sha256_file(path)})
    return model.to(device).eval(), meta


__all__ = ["load_checkpoint", "load_model"]
