#!/usr/bin/env python
"""PGD-20 throughput (images/s) of the attack suite, per model and precision, on one device.

    python tools/bench_attacks.py                       # small_cnn + resnet18, batch 128, CPU or CUDA
    python tools/bench_attacks.py --device cuda --repeats 5
    python tools/bench_attacks.py --models small_cnn --precisions fp32

Inputs are random 3x32x32 images (CIFAR-sized); the attack is ``ciard_deploy.attacks.PGD``
(L-inf, eps 8/255, step 2/255, random start), i.e. exactly what ``ciard eval`` and the trainers
run. bf16 runs the same attack under ``torch.autocast``; it is skipped where the device has no
bf16 support. Each row is timed after one untimed warm-up run.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ciard_deploy.attacks import PGD
from ciard_deploy.models import MODELS, create_model

PRECISIONS = ("fp32", "bf16")


def bf16_supported(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        return (torch.cuda.is_bf16_supported(), "no bf16 on this GPU")
    if device.type == "cpu":
        return (True, "")
    return (False, f"bf16 autocast not tried on {device.type}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(model_name: str, precision: str, device: torch.device, batch: int, steps: int,
              repeats: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, in_chans=3).to(device).eval()
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    attack = PGD(8 / 255, steps=steps, seed=0)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16"
                else torch.autocast(device_type=device.type, enabled=False))
    with autocast:
        PGD(8 / 255, steps=1, step_size=8 / 255, seed=0).run(model, x, y)  # warm-up: kernels, allocator
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            x_adv = attack.run(model, x, y)
        sync(device)
        seconds = (time.perf_counter() - t0) / repeats
    with torch.no_grad():
        acc = float((model(x_adv).argmax(1) == y).float().mean())
    return {"model": model_name, "params": sum(p.numel() for p in model.parameters()), "precision": precision,
            "batch": batch, "steps": steps, "seconds": seconds, "images_per_s": batch / seconds,
            "acc_after": acc}


def render(rows: list[dict[str, object]], title: str, caption: str) -> None:
    headers = ["model", "params", "precision", "batch", "s / PGD run", "images/s", "fwd+bwd images/s"]

    def cells(r: dict[str, object]) -> list[str]:
        if "skipped" in r:
            return [str(r["model"]), "", str(r["precision"]), "", "skipped", str(r["skipped"]), ""]
        params = int(r["params"])
        size = f"{params / 1e6:.2f}M" if params >= 100_000 else f"{params / 1e3:.1f}k"
        return [str(r["model"]), size, str(r["precision"]), str(r["batch"]),
                f"{float(r['seconds']):.2f}", f"{float(r['images_per_s']):.1f}",
                f"{float(r['images_per_s']) * int(r['steps']):.0f}"]

    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text fallback
        print(title)
        print(caption)
        print(" | ".join(headers))
        for r in rows:
            print(" | ".join(cells(r)))
        return
    table = Table(title=title, caption=caption)
    for h in headers:
        table.add_column(h, justify="left" if h in ("model", "precision") else "right")
    for r in rows:
        table.add_row(*cells(r))
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row (after one warm-up)")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps (20 = the protocol's PGD-20)")
    parser.add_argument("--models", default="small_cnn,resnet18", help="comma-separated model names")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 is often faster on a busy machine")
    args = parser.parse_args(argv)

    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available here", file=sys.stderr)
        return 3
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; valid: {', '.join(MODELS.names())}", file=sys.stderr)
        return 2
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if any(p not in PRECISIONS for p in precisions):
        print(f"error: precisions must be among {', '.join(PRECISIONS)}", file=sys.stderr)
        return 2
    if min(args.batch, args.repeats, args.steps) < 1:
        print("error: --batch, --repeats and --steps must be >= 1", file=sys.stderr)
        return 2

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    rows: list[dict[str, object]] = []
    for model_name in models:
        for precision in precisions:
            ok, why = bf16_supported(device) if precision == "bf16" else (True, "")
            if not ok:
                rows.append({"model": model_name, "precision": precision, "skipped": why})
                continue
            rows.append(bench_one(model_name, precision, device, args.batch, args.steps, args.repeats))
    render(rows, f"PGD-{args.steps} (L-inf 8/255) throughput on {device}",
           f"{name}; torch {torch.__version__}; mean of {args.repeats} timed run(s) after 1 warm-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
