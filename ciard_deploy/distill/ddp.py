"""DistributedDataParallel plumbing for the trainer: process group, shards, syncing teachers.

``torchrun --nproc_per_node N -m ciard_deploy distill RECIPE --out DIR`` sets ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``; :func:`init_from_env` turns them into a :class:`DistContext`
(NCCL on CUDA, gloo on CPU). Every rank runs the same trainer loop on its shard of each epoch;
rank 0 alone logs and writes. The student is wrapped in ``DistributedDataParallel``; a teacher
that a method keeps training (CIARD's robust teacher) gets its gradients averaged across ranks
by hooks, and its BatchNorm statistics averaged at epoch ends, so every rank holds the same
teacher. Multi-node: run torchrun on every node with ``--nnodes``, ``--node_rank`` and
``--rdzv_endpoint``; the run dir and the teacher cache must be on a filesystem all nodes share.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ciard_deploy.fingerprint import checksum_arrays

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this context initialized the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank tears its connections down while another still uses them
            torch.distributed.destroy_process_group()
            self.owns_group = False


def init_from_env(device_type: str) -> DistContext:
    """A DistContext from torchrun's environment; initializes the process group if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    dist = torch.distributed
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        owns = True
        log.debug("rank %d/%d: process group up (%s)", rank, world, backend)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       owns_group=owns)


def shard(order: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's part of an epoch's order: every ``world``-th index, all shards of equal length
    (the tail that does not divide evenly is dropped, as DistributedSampler(drop_last=True))."""
    if not ctx.enabled:
        return order
    n = (len(order) // ctx.world_size) * ctx.world_size
    return order[:n][ctx.rank::ctx.world_size]


def wrap_student(model: nn.Module, ctx: DistContext, device: torch.device, sync_bn: bool) -> nn.Module:
    """DDP-wrapped student (optionally with SyncBatchNorm); the model itself when not distributed."""
    if not ctx.enabled:
        return model
    if sync_bn and device.type != "cuda":
        log.warning("train.sync_bn ignored: SyncBatchNorm needs CUDA devices (this run is on %s)", device.type)
    elif sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index if device.index is not None else ctx.local_rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def average_gradients_of(module: nn.Module, ctx: DistContext) -> list[Any]:
    """Hooks that all-reduce (average) each parameter's gradient as backward computes it.

    For a teacher that a method trains itself (its own optimizer, its own backward): every rank
    then steps with the same averaged gradient and the teacher stays identical across ranks.
    Returns the hook handles.
    """
    if not ctx.enabled:
        return []
    handles = []
    world = float(ctx.world_size)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad.div_(world)

    for p in module.parameters():
        was = p.requires_grad
        p.requires_grad_(True)  # a hook can only be registered on a tensor that requires grad
        handles.append(p.register_hook(hook))
        p.requires_grad_(was)
    return handles


def average_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Averages floating-point buffers (BatchNorm running statistics) across ranks."""
    if not ctx.enabled:
        return
    for b in module.buffers():
        if b.is_floating_point():
            torch.distributed.all_reduce(b)
            b.div_(ctx.world_size)


def broadcast_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Copies rank 0's buffers to every rank."""
    if not ctx.enabled:
        return
    for b in module.buffers():
        torch.distributed.broadcast(b, src=0)


def all_reduce_sums(values: dict[str, float], ctx: DistContext, device: torch.device) -> dict[str, float]:
    """Sums a dict of floats over ranks (same keys on every rank)."""
    if not ctx.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (used for stop requests)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (picklable python objects)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def state_digest(module: nn.Module) -> str:
    """``fingerprint.checksum_arrays`` of a module's state dict (names, dtypes, shapes and bytes): equal
    digests, equal weights (compared across ranks, never stored; bfloat16 is read as float32)."""
    arrays = {}
    for k, v in module.state_dict().items():
        t = v.detach().cpu()
        arrays[k] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return checksum_arrays(arrays)
