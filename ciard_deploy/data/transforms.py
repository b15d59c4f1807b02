"""Training augmentation on float32 [0, 1] batches: random crop with zero padding + horizontal flip.

Done per sample on the whole batch at once (torchvision's v2 transforms apply one random draw
per call, i.e. per batch); no Normalize here, normalization lives in the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment_batch(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (same size, zero padding ``padding``) and random horizontal flip, per sample."""
    n, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        # drawn on the CPU generator whatever x's device: a batch held on the GPU gets the same crops
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        dev = x.device
        rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])  # n, h
        cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])  # n, w
        x = padded[torch.arange(n, device=dev)[:, None, None, None],
                   torch.arange(x.shape[1], device=dev)[None, :, None, None], rows[:, None, :, None],
                   cols[:, None, None, :]]
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()
