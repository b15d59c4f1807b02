"""What the white-box attacks on an artifact cost: seconds per 100 images, per attack and precision.

    python tools/bench_artifact.py [--run-dir RUN] [--n 200] [--attacks apgd-ce,apgd-t,fab-t,mtpgd100]

Exports the run's student (default: a PGD-AT small_cnn trained here on digits by the quick recipe,
~15 s) to ONNX FP32, FP16 and INT8, builds each artifact's twin, measures its fidelity and runs
``attacks.artifact.attack_artifact`` (twin gradients, every iterate scored on onnxruntime, one
thread) on ``--n`` test images. Prints one row per artifact and attack: images attacked (the
cascade skips samples already broken), images broken, seconds, seconds per 100 attacked images,
runtime queries, and the robust accuracy after the attack. Use ``--threads`` to give torch and
onnxruntime more threads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

RECIPE = "quick/digits_pgd_at_none_to_tiny_cnn_linf0.15"
OVERRIDES = ["model.arch=small_cnn", "train.epochs=6", "train.eval_every=6", "train.final_attacks=[]",
             "attack.steps=5", "attack.step_size=0.06"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, help="a ciard run dir or checkpoint (default: train one on digits)")
    ap.add_argument("--n", type=int, default=200, help="test images")
    ap.add_argument("--eps", type=float, default=None, help="L-inf budget (default: the checkpoint's)")
    ap.add_argument("--attacks", default="apgd-ce,apgd-t,fab-t,mtpgd100")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from ciard_deploy import export
    from ciard_deploy.attacks.artifact import attack_artifact, create_artifact_attacks
    from ciard_deploy.data import load_test_set_for
    from ciard_deploy.model_loader import load_model
    from ciard_deploy.runtime import open_backend
    from ciard_deploy.twin import build_twin
    from ciard_deploy.twin.fidelity import measure_fidelity, random_in_ball
    from ciard_deploy.verify.pack_artifacts import best_twin

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-artifact-"))
    run_dir = args.run_dir
    if run_dir is None:
        from ciard_deploy.config import find_recipe
        from ciard_deploy.distill.trainer import run

        run_dir = work / "run"
        t0 = time.perf_counter()
        run(find_recipe(RECIPE), run_dir, handle_signals=False, overrides=OVERRIDES)
        print(f"trained {RECIPE} (small_cnn) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    _, meta = load_model(run_dir)
    eps = float(args.eps if args.eps is not None else meta.eps)
    res = export.run(run_dir, work / "export", ["onnx", "onnx-fp16", "onnx-int8"], n=64, threads=args.threads)
    _, ds = load_test_set_for(meta, None, None, False, args.n, 0)
    x, y = (t.numpy() for t in ds.tensors())
    print(f"\n{meta.arch} on {meta.dataset}, n={len(y)}, eps {eps:g}, {args.threads} thread(s), "
          f"torch {torch.__version__}\n")
    head = (f"{'artifact':<18} {'attack':<16} {'attacked':>8} {'broken':>6} {'seconds':>8} {'s/100 img':>9} "
            f"{'queries':>9} {'robust after':>12}")
    print(head)
    print("-" * len(head))
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        path = res.out_dir / name
        backend = open_backend(path, threads=args.threads)
        try:
            sets = {"clean": x, "random_in_ball": random_in_ball(x, eps, 0)}
            twin = best_twin(path, build_twin(path), backend.predict, sets)
            fid = measure_fidelity(twin, backend.predict, sets)
            attacks = create_artifact_attacks([a for a in args.attacks.split(",") if a], eps)
            out = attack_artifact(twin, backend.predict, x, y, attacks)
        finally:
            backend.close()
        for r in out.records:
            per100 = 100 * r["seconds"] / r["attacked"] if r["attacked"] else 0.0
            print(f"{name:<18} {r['label']:<16} {r['attacked']:>8} {r['broken']:>6} {r['seconds']:>8.1f} "
                  f"{per100:>9.2f} {r['queries']:>9,} {100 * r['robust_acc_after']:>11.1f}%")
        print(f"{name:<18} {'all':<16} {len(y):>8} {'':>6} {out.seconds:>8.1f} {100 * out.seconds / len(y):>9.2f} "
              f"{'':>9} {100 * out.robust_acc:>11.1f}%   twin agreement {100 * fid.agreement:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
