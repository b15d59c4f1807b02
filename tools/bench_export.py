#!/usr/bin/env python
"""Export benchmark: CPU throughput and file size per precision, and INT8 calibration choices.

Part 1 (random weights, 3x32x32 inputs): images/s at batch 1 and 64 for torch eager and
onnxruntime FP32 / FP16 / INT8 (the project's own exporters, the checked Backend API), and
the file sizes, for small_cnn, resnet18 and mobilenetv2.

Part 2 (a small_cnn PGD-trained on digits here by the trainer from the shipped quick PGD-AT
recipe, eps 0.1, all 360 test images): for
INT8 calibrated on clean, adversarial (PGD-20 against the FP32 student) or mixed training
images, with each onnxruntime calibration method: clean accuracy, pgd20 accuracy (the
adversarial images crafted on the PyTorch FP32 student, i.e. transferred to the INT8
artifact), and top-1 agreement with FP32 on clean and on adversarial inputs.

    python tools/bench_export.py                 # both parts, Markdown tables on stdout
    python tools/bench_export.py --part speed --models small_cnn --seconds 0.5
    python tools/bench_export.py --json bench.json

Numbers depend on the CPU and its load: the header prints both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ciard_deploy.export.onnx import export_fp32, save_onnx, topological_sort
from ciard_deploy.export.parity_gate import compare_logits
from ciard_deploy.export.quantize import build_calibration_set, quantize_qdq
from ciard_deploy.models import create_model
from ciard_deploy.runtime.ort_backend import OrtBackend
from ciard_deploy.runtime.parity_metrics import accuracy


# --------------------------------------------------------------------------- helpers
def images_per_second(fn, batch: int, seconds: float, repeats: int = 3) -> float:
    """Best of ``repeats`` windows of about ``seconds / repeats`` each (after one warm-up call).

    The best window is the least disturbed by other processes on a shared machine.
    """
    fn()
    best = 0.0
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while n < 1 or time.perf_counter() - t0 < seconds / repeats:
            fn()
            n += 1
        best = max(best, n * batch / (time.perf_counter() - t0))
    return best


def export_all(model: torch.nn.Module, folder: Path, shape: tuple[int, int, int], calib: np.ndarray) -> dict[str, Path]:
    """FP32, FP16 and INT8 ONNX files of ``model`` with the project's exporters."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    paths = {p: folder / f"model.{p}.onnx" for p in ("fp32", "fp16", "int8")}
    proto, _ = export_fp32(model, folder, shape, opset=18)
    save_onnx(proto, paths["fp32"], {"precision": "fp32"}, 18)
    half = convert_float_to_float16(onnx.load(str(paths["fp32"])), keep_io_types=True)
    topological_sort(half)
    save_onnx(half, paths["fp16"], {"precision": "fp16"}, 18)
    raw = folder / "int8.raw.onnx"
    quantize_qdq(paths["fp32"], raw, calib, "minmax", symmetric=True)
    save_onnx(onnx.load(str(raw)), paths["int8"], {"precision": "int8"}, 18)
    raw.unlink()
    return paths


# --------------------------------------------------------------------------- part 1
def bench_speed(models: list[str], seconds: float, threads: int) -> list[dict]:
    rows = []
    shape = (3, 32, 32)
    rng = np.random.default_rng(0)
    calib = rng.random((64, *shape), dtype=np.float32)
    for name in models:
        torch.manual_seed(0)
        model = create_model(name, 10, 3).eval()
        with tempfile.TemporaryDirectory() as tmp:
            paths = export_all(model, Path(tmp), shape, calib)
            sizes = {p: paths[p].stat().st_size for p in paths}
            row = {"model": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                   "size_fp32": sizes["fp32"], "size_fp16": sizes["fp16"], "size_int8": sizes["int8"]}
            for batch in (1, 64):
                x = rng.random((batch, *shape), dtype=np.float32)
                xt = torch.from_numpy(x)

                def eager() -> None:
                    with torch.inference_mode():
                        model(xt)

                row[f"torch_b{batch}"] = images_per_second(eager, batch, seconds)
                for p in ("fp32", "fp16", "int8"):
                    backend = OrtBackend(paths[p], threads=threads).open()
                    row[f"ort_{p}_b{batch}"] = images_per_second(lambda: backend.predict(x), batch, seconds)
                    backend.close()
            rows.append(row)
            print(f"  measured {name}", file=sys.stderr)
    return rows


# --------------------------------------------------------------------------- part 2
def train_digits_student(eps: float, epochs: int = 12, seed: int = 0) -> torch.nn.Module:
    """small_cnn PGD-AT (Madry) on digits at ``eps``: the shipped quick PGD-AT recipe, run by the trainer."""
    from ciard_deploy.config import find_recipe
    from ciard_deploy.distill.trainer import run
    from ciard_deploy.model_loader import load_model

    with tempfile.TemporaryDirectory() as tmp:
        run(find_recipe("quick/digits_pgd_at_none_to_tiny_cnn_linf0.15"), Path(tmp) / "run", handle_signals=False,
            overrides=["model.arch=small_cnn", f"attack.eps={eps}", f"attack.step_size={eps / 4}", "attack.steps=7",
                       f"train.epochs={epochs}", f"train.eval_every={epochs}", "train.final_attacks=[]",
                       f"train.seed={seed}"])
        model, _ = load_model(Path(tmp) / "run")
    return model.eval()


def bench_calibration(eps: float, calib_n: int, threads: int) -> dict:
    from ciard_deploy.attacks.base import create_attack
    from ciard_deploy.data import create_dataset

    model = train_digits_student(eps)
    x, y = create_dataset("digits", "test").tensors()
    attack = create_attack("pgd20", eps, seed=0)
    x_adv = attack.run(model, x, y)
    with torch.no_grad():
        ref, ref_adv = model(x).numpy(), model(x_adv).numpy()
    ys, xs, xas = y.numpy(), x.numpy(), x_adv.numpy()
    out = {"eps": eps, "attack": attack.label, "n_test": len(ys), "calib_n": calib_n,
           "fp32_torch": {"clean": accuracy(ref, ys), "robust": accuracy(ref_adv, ys)}, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        proto, _ = export_fp32(model, folder, (1, 8, 8), opset=18)
        fp32 = folder / "model.onnx"
        save_onnx(proto, fp32, {"precision": "fp32"}, 18)
        with OrtBackend(fp32, threads=threads) as b:
            out["fp32_onnx"] = {"clean": accuracy(b.predict(xs), ys), "robust": accuracy(b.predict(xas), ys)}
        for source in ("clean", "adversarial", "mixed"):
            images, info = build_calibration_set(model, "digits", source, calib_n, 0, eps, "pgd20")
            for method in ("minmax", "entropy", "percentile"):
                path = folder / f"int8-{source}-{method}.onnx"
                quantize_qdq(fp32, path, images, method, symmetric=True)
                with OrtBackend(path, threads=threads) as b:
                    lc, la = b.predict(xs), b.predict(xas)
                out["rows"].append({
                    "calib": source, "method": method, "calib_sha256": info["sha256"][:12],
                    "clean": accuracy(lc, ys), "robust": accuracy(la, ys),
                    "agree_clean": compare_logits(ref, lc).top1_agreement,
                    "agree_adv": compare_logits(ref_adv, la).top1_agreement})
                print(f"  calibrated {source}/{method}", file=sys.stderr)
    return out


# --------------------------------------------------------------------------- printing
def kib(n: int) -> str:
    return f"{n / 1024:,.0f}"


def print_speed(rows: list[dict]) -> None:
    print("\n### Throughput on this CPU (images/s, 3x32x32 input, random weights)\n")
    print("| model | params | batch | torch eager | ORT FP32 | ORT FP16 | ORT INT8 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        for b in (1, 64):
            print(f"| {r['model']} | {r['params_M']:.2f}M | {b} | {r[f'torch_b{b}']:,.0f} | "
                  f"{r[f'ort_fp32_b{b}']:,.0f} | {r[f'ort_fp16_b{b}']:,.0f} | {r[f'ort_int8_b{b}']:,.0f} |")
    print("\n### File sizes (KiB)\n")
    print("| model | FP32 | FP16 | INT8 | FP32/INT8 |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {kib(r['size_fp32'])} | {kib(r['size_fp16'])} | {kib(r['size_int8'])} | "
              f"{r['size_fp32'] / r['size_int8']:.2f}x |")


def print_calibration(c: dict) -> None:
    print(f"\n### INT8 calibration of a PGD-trained digits small_cnn (eps {c['eps']}, {c['n_test']} test images, "
          f"{c['calib_n']} calibration images)\n")
    print(f"PyTorch FP32: clean {c['fp32_torch']['clean']:.4f}, {c['attack']} {c['fp32_torch']['robust']:.4f}; "
          f"ONNX FP32: clean {c['fp32_onnx']['clean']:.4f}, {c['attack']} {c['fp32_onnx']['robust']:.4f}\n")
    print(f"| calibration | method | clean acc | {c['attack']} acc (transfer) | agree clean | agree adv |")
    print("|---|---|---:|---:|---:|---:|")
    for r in c["rows"]:
        print(f"| {r['calib']} | {r['method']} | {r['clean']:.4f} | {r['robust']:.4f} | {r['agree_clean']:.4f} | "
              f"{r['agree_adv']:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "speed", "calibration"), default="all")
    ap.add_argument("--models", default="small_cnn,resnet18,mobilenetv2")
    ap.add_argument("--seconds", type=float, default=1.5, help="time per throughput measurement")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for torch and onnxruntime alike (default 1: stable numbers on a shared "
                         "machine, where a 2-thread OpenMP pool stalls whenever another process takes a core)")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--calib-n", type=int, default=512)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import onnxruntime as ort

    torch.set_num_threads(args.threads)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"bench_export: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"load average {load:.1f}; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}; {args.threads} intra-op thread(s) for torch and onnxruntime; "
          f"best of 3 windows per number")
    result: dict = {}
    if args.part in ("all", "speed"):
        result["speed"] = bench_speed([m.strip() for m in args.models.split(",") if m.strip()], args.seconds,
                                      args.threads)
        print_speed(result["speed"])
    if args.part in ("all", "calibration"):
        result["calibration"] = bench_calibration(args.eps, args.calib_n, args.threads)
        print_calibration(result["calibration"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
