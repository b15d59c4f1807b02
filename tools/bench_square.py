#!/usr/bin/env python
"""Strength and speed of ciard's numpy Square against ART's and the reference (pyautoattack).

    python tools/bench_square.py                          # trains a small digits model (~15 s), then benches
    python tools/bench_square.py --run RUN_DIR --queries 100 1000 --n 200

Without ``--run`` a robust small_cnn is trained on digits (the quick PGD-AT recipe with the test
suite's overrides: 6 epochs, PGD-5, eps 0.15). It is exported with ``ciard_deploy.export.run`` to
ONNX FP32 and INT8 (QDQ, mixed calibration on 128 images), and each artifact runs in an
onnxruntime session on ``--threads`` threads. On the first ``--n`` digits test images (the ones
the artifact classifies correctly are attacked), for each query budget:

* ours: ``ciard_deploy.attacks.square.SquareAttack`` (equal-margin steps accepted, every window
  offset reachable), what ``ciard verify`` runs;
* ours-strict: the same with strict acceptance (the reference's rule), to show what the plateaus
  of quantized logits cost;
* ART: ``art.attacks.evasion.SquareAttack`` on ``BlackBoxClassifierNeuralNetwork`` configured as
  ciard used it before (``norm=inf``, ``max_iter=queries - 1``, ``p_init``), numpy's global RNG
  seeded with ``--seed``;
* pyautoattack: the reference Square of AutoAttack (``pyautoattack.square.SquareAttack``,
  margin loss, ``n_queries=queries``, which spends one more query on its initialization) on the
  torch model, so only in the FP32 rows.

Robust accuracy is over all ``--n`` images (a clean error counts as not robust); ``s/100`` is wall
time per 100 attacked images. ART and pyautoattack are optional: their columns show ``-`` when
they are not installed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

RECIPE = "quick/digits_pgd_at_none_to_tiny_cnn_linf0.15"
OVERRIDES = ["model.arch=small_cnn", "train.epochs=6", "train.eval_every=6", "train.final_attacks=[]",
             "attack.steps=5", "attack.step_size=0.06"]  # tests/conftest.py DIGITS_ROBUST_OVERRIDES


def train(out: Path) -> Path:
    from ciard_deploy.config import find_recipe
    from ciard_deploy.distill.trainer import run

    run(find_recipe(RECIPE), out, handle_signals=False, overrides=OVERRIDES)
    return out


def export_artifacts(run_dir: Path, out: Path) -> dict[str, Path]:
    from ciard_deploy import export

    res = export.run(run_dir, out, ["onnx", "onnx-int8"], n=64, calib="mixed", calib_n=128, threads=1)
    return {"fp32": res.out_dir / "model.onnx", "int8": res.out_dir / "model.int8.onnx"}


def session_predict(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    from ciard_deploy.attacks.square import numpy_predict_from_session

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = threads
    return numpy_predict_from_session(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))


def ours(predict: Callable, x: np.ndarray, y: np.ndarray, eps: float, queries: int, seed: int,
         strict: bool = False) -> np.ndarray:
    from ciard_deploy.attacks.square import SquareAttack

    attack = SquareAttack(eps, queries=queries, seed=seed)
    attack._accept_equal = not strict
    return attack.run_numpy(predict, x, y)


def art_square(predict: Callable, x: np.ndarray, y: np.ndarray, eps: float, queries: int, seed: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from art.attacks.evasion import SquareAttack as ArtSquare
        from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    classes = int(predict(x[:1]).shape[1])
    est = BlackBoxClassifierNeuralNetwork(lambda b: predict(b.astype(np.float32)), input_shape=tuple(x.shape[1:]),
                                          nb_classes=classes, channels_first=True, clip_values=(0.0, 1.0))
    attack = ArtSquare(est, norm=np.inf, max_iter=queries - 1, eps=eps, p_init=0.8, nb_restarts=1, batch_size=256,
                       verbose=False)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        x_adv = attack.generate(x, y=y)
    finally:
        np.random.set_state(state)
    return np.clip(np.clip(x_adv, x - eps, x + eps), 0, 1).astype(np.float32)


def reference_square(model: Any, x: np.ndarray, y: np.ndarray, eps: float, queries: int, seed: int) -> np.ndarray:
    import torch
    from pyautoattack.square import SquareAttack as RefSquare

    attack = RefSquare(model, norm="Linf", n_queries=queries, eps=eps, p_init=0.8, n_restarts=1, seed=seed,
                       loss="margin", resc_schedule=True, device=torch.device("cpu"))
    with torch.no_grad():
        return attack.perturb(torch.from_numpy(x), torch.from_numpy(y)).numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a digits run dir (default: train one, ~15 s)")
    ap.add_argument("--queries", type=int, nargs="+", default=[100, 1000, 5000])
    ap.add_argument("--n", type=int, default=200, help="test images (default 200)")
    ap.add_argument("--eps", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", nargs="*", default=[], choices=["ours-strict", "art", "pyautoattack"])
    args = ap.parse_args(argv)

    import torch

    from ciard_deploy.data.digits import load_digits_split
    from ciard_deploy.model_loader import load_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run or train(Path(tmp) / "run")
        artifacts = export_artifacts(run_dir, Path(tmp) / "export")
        model, _ = load_model(run_dir)
        model.eval()
        xt, yt = load_digits_split("test").tensors()
        x_all, y_all = xt[:args.n].numpy(), yt[:args.n].numpy()
        have_art = have_ref = True
        try:
            import art  # noqa: F401
        except ImportError:
            have_art = False
        try:
            import pyautoattack  # noqa: F401
        except ImportError:
            have_ref = False

        rows = []
        for precision, path in artifacts.items():
            predict = session_predict(path, args.threads)
            correct = predict(x_all).argmax(1) == y_all
            x, y = x_all[correct], y_all[correct]
            methods: dict[str, Callable[[int], np.ndarray] | None] = {
                "ours": lambda q: ours(predict, x, y, args.eps, q, args.seed),
                "ours-strict": None if "ours-strict" in args.skip else
                lambda q: ours(predict, x, y, args.eps, q, args.seed, strict=True),
                "ART": None if "art" in args.skip or not have_art else
                lambda q: art_square(predict, x, y, args.eps, q, args.seed),
                "pyautoattack": None if precision != "fp32" or "pyautoattack" in args.skip or not have_ref else
                lambda q: reference_square(model, x, y, args.eps, q, args.seed),
            }
            for q in args.queries:
                row = {"artifact": precision, "queries": q, "clean": float(correct.mean())}
                for name, fn in methods.items():
                    if fn is None:
                        row[name] = None
                        continue
                    t0 = time.perf_counter()
                    x_adv = fn(q)
                    sec = time.perf_counter() - t0
                    assert np.abs(x_adv - x).max() <= args.eps + 1e-5 and x_adv.min() >= 0 and x_adv.max() <= 1
                    robust = (predict(x_adv).argmax(1) == y).sum() / len(x_all)
                    row[name] = (float(robust), 100 * sec / max(len(x), 1))
                    print(f"  {precision} q={q} {name}: {robust:.1%} ({sec:.1f} s)", file=sys.stderr, flush=True)
                rows.append(row)

    names = ["ours", "ours-strict", "ART", "pyautoattack"]
    head = "| artifact | queries | clean | " + " | ".join(f"{n} robust | {n} s/100" for n in names) + " |"
    print(f"\nSquare at eps {args.eps} on {args.n} digits test images, seed {args.seed}, {args.threads} thread(s)\n")
    print(head)
    print("|" + "---|" * (3 + 2 * len(names)))
    for r in rows:
        cells = [r["artifact"], str(r["queries"]), f"{r['clean']:.1%}"]
        for n in names:
            cells += [f"{r[n][0]:.1%}", f"{r[n][1]:.2f}"] if r[n] else ["-", "-"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
