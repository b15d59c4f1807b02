"""FP32 vs post-training INT8 vs quantization-aware INT8, each measured by `ciard verify` white-box on the artifact.

    python tools/bench_qat.py [--run-dir RUN] [--qat-epochs 2] [--qat-lr 0.01] [--n 360] [--live]

Digits: trains the quick CIARD recipe (tiny_cnn student, teachers from the cache or trained first, ~1 min
on one core) unless ``--run-dir`` names a run, then

* FP32 and PTQ INT8: ``export.run`` (``ciard export --int8``: onnxruntime ``quantize_static``, the
  recipe's ``deploy.calib`` calibration set);
* QAT INT8: ``quantize_aware.finetune`` (the recipe's method and teachers, adversarial examples crafted
  against the fake-quantized student) and ``quantize_aware.export.export_qat``;
* one pack (``api.pack``) on ``--n`` test images with the recipe's transferred attacks and, on each of
  the three ONNX files, the recipe's white-box artifact attacks (``deploy.pack.artifact_attacks``);
* ``api.verify`` of each file (query-only live attacks only with ``--live``).

Prints one table: clean accuracy, worst-case robust accuracy (white-box on the artifact included),
top-1 agreement with the FP32 PyTorch student (clean), file size, and the median single-image CPU
latency on onnxruntime (one thread). The CIFAR-10 row of issue 17 is not run here (not done).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

RECIPE = "quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15"


def latency_ms(path: Path, shape: tuple[int, ...], runs: int = 300) -> float:
    """Median single-image latency of ``path`` on onnxruntime's CPU provider, one thread."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    name = sess.get_inputs()[0].name
    for _ in range(20):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, help="a ciard run dir (default: train the quick CIARD digits recipe)")
    ap.add_argument("--work", type=Path, help="folder for the run, exports and pack (default: a temp folder)")
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--qat-lr", type=float, default=0.01)
    ap.add_argument("--n", type=int, default=360, help="test images of the pack (digits has 360)")
    ap.add_argument("--live", action="store_true", help="also the recipe's query-only live attacks (slow)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from ciard_deploy import api, export
    from ciard_deploy.config import find_recipe
    from ciard_deploy.quantize_aware.export import export_qat
    from ciard_deploy.quantize_aware.finetune import finetune, run_recipe

    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-qat-"))
    work.mkdir(parents=True, exist_ok=True)
    run_dir = args.run_dir
    if run_dir is None:
        from ciard_deploy.distill.trainer import run

        run_dir = work / "run"
        t0 = time.perf_counter()
        run(find_recipe(RECIPE), run_dir, resume=True, handle_signals=False)
        print(f"trained {RECIPE} in {time.perf_counter() - t0:.1f} s -> {run_dir}", file=sys.stderr)
    recipe = run_recipe(run_dir)
    d = recipe.deploy
    calib = {"calib": d.calib, "calib_n": d.calib_n} if d is not None else {}
    t0 = time.perf_counter()
    res = export.run(run_dir, work / "export", ["onnx", "onnx-int8"], n=args.n, threads=args.threads, force=True,
                     check=False, **calib)
    print(f"exported FP32 and PTQ INT8 in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    t0 = time.perf_counter()
    qres = finetune(run_dir, recipe=recipe, epochs=args.qat_epochs, lr=args.qat_lr,
                    progress=lambda line: print(f"qat {line}", file=sys.stderr))
    export_qat(qres, work / "qat", n=args.n, force=True, threads=args.threads)
    print(f"QAT fine-tuned and exported in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    files = {"FP32": res.path("onnx"), "PTQ INT8": res.path("onnx-int8"),
             "QAT INT8": work / "qat" / "model.qat.int8.onnx"}
    pack_attacks = list(d.pack.attacks) if d is not None else ["apgd-ce", "apgd-t"]
    art_attacks = list(d.pack.artifact_attacks) if d is not None else ["apgd-ce", "apgd-t", "mtpgd100"]
    t0 = time.perf_counter()
    pack = api.pack(run_dir, work / "pack.npz", n=args.n, attacks=pack_attacks, artifacts=list(files.values()),
                    artifact_attacks=art_attacks, threads=args.threads, force=True)
    print(f"pack ({', '.join(pack_attacks)} transferred; {', '.join(art_attacks)} white-box on each file) in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    live = (list(d.live_attacks) if d is not None else None) if args.live else []
    rows = []
    for name, path in files.items():
        rep = api.verify(path, pack, live=live, threads=args.threads)
        m = rep.metrics
        rows.append((name, m["clean_acc"], m["worst_case_acc"], m["agreement_clean"], path.stat().st_size,
                     latency_ms(path, pack.input_shape)))
    print(f"\ndigits, {RECIPE}, eps {pack.eps:g}, {pack.n} test images; QAT {args.qat_epochs} epoch(s), lr "
          f"{args.qat_lr}, method {recipe.method.name}")
    print("| artifact | clean | worst-case robust (white-box on the artifact) | agreement with FP32 | size | "
          "CPU latency (1 image, 1 thread) |")
    print("|---|---|---|---|---|---|")
    for name, clean, worst, agree, size, lat in rows:
        print(f"| {name} | {clean:.2%} | {worst:.2%} | {agree:.2%} | {size / 1024:.1f} KiB | {lat:.3f} ms |")
    fp32 = rows[0]
    for name, clean, worst, *_ in rows[1:]:
        print(f"{name}: clean {100 * (clean - fp32[1]):+.2f} pt, worst-case {100 * (worst - fp32[2]):+.2f} pt vs FP32")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
