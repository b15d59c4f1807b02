#!/usr/bin/env python
"""Throughput of `ciard verify`: the transfer phase against raw onnxruntime, and Square per 100 images.

    python tools/bench_verify.py                                  # small_cnn 1x8x8 + resnet18_tiny 3x32x32
    python tools/bench_verify.py --models small_cnn --n 4096 --batch-size 512
    python tools/bench_verify.py --artifact export/model.onnx --pack pack.npz   # your own files

For each model a seeded, untrained network is exported to ONNX (FP32, dynamic batch) with the
project's exporter, and a pack of ``--n`` random images with two "attacks" (sign noise at
eps 8/255) is assembled with reference logits from onnxruntime itself. Then:

* raw: ``InferenceSession.run`` over the clean and adversarial arrays in chunks of
  ``--batch-size`` (what any script would do), best of ``--repeats``;
* verify: ``ciard_deploy.verify.evaluate_runtime`` with Square off, i.e. the whole transfer
  phase as ``ciard verify`` runs it (input validation, chunking, per-sample flags, parity),
  best of ``--repeats``; the ratio verify/raw is the number the issue targets (>= 0.8);
* Square: ``--square-queries`` queries on ``--square-n`` images through the same backend.
  The bench model's last layer is biased towards class 0 and the labels are 0, so no image
  ever breaks and every image uses its full query budget: the time is an upper bound.

Both paths use the same onnxruntime threads (``--threads``, default: onnxruntime's choice).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EPS = 8 / 255


def make_artifact(model_name: str, shape: tuple[int, int, int], folder: Path) -> Path:
    """A seeded untrained model whose prediction is always class 0, exported with ciard's ONNX exporter."""
    import torch

    from ciard_deploy.export.onnx import export_fp32, save_onnx
    from ciard_deploy.models import create_model

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, in_chans=shape[0]).eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias[0] += 1e3  # every image stays class 0: Square never succeeds and spends all its queries
    proto, _ = export_fp32(model, folder, shape, opset=18, batch="dynamic", simplify=False)
    path = folder / f"{model_name}.onnx"
    save_onnx(proto, path, {"arch": model_name, "num_classes": 10, "precision": "fp32", "format": "onnx"}, 18)
    return path


def make_pack(artifact: Path, shape: tuple[int, int, int], n: int, folder: Path, threads: int | None) -> Path:
    from ciard_deploy.runtime import open_backend
    from ciard_deploy.verify.pack import save_pack
    from ciard_deploy.verify.pack_build import pack_from_arrays

    rng = np.random.default_rng(0)
    x = rng.random((n, *shape), dtype=np.float32)
    advs = [np.clip(x + np.float32(EPS) * np.sign(rng.normal(size=x.shape)), 0, 1).astype(np.float32)
            for _ in range(2)]
    y = np.zeros(n, dtype=np.int64)
    with open_backend(artifact, **({"threads": threads} if threads else {})) as b:
        lc, la = b.predict(x), [b.predict(a) for a in advs]
    records = [{"name": f"noise{i}", "label": f"noise{i}@8/255", "eps": EPS} for i in range(2)]
    pack = pack_from_arrays(x, y, lc, records, advs, la, model={"sha256": "", "num_classes": 10,
                                                                 "input_shape": list(shape)},
                            data={"dataset": "random", "seed": 0}, eps=EPS)
    return save_pack(pack, folder / f"{artifact.stem}.pack.npz", force=True)


def bench(artifact: Path, pack_path: Path, batch: int, repeats: int, square_queries: int, square_n: int,
          threads: int | None) -> dict[str, object]:
    import onnxruntime as ort

    from ciard_deploy.runtime import open_backend
    from ciard_deploy.verify import evaluate_runtime, load_pack

    t0 = time.perf_counter()
    pack = load_pack(pack_path)
    load_s = time.perf_counter() - t0
    arrays = [pack.x, *pack.adv]
    images = sum(len(a) for a in arrays)

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(artifact), sess_options=so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def raw_pass() -> float:
        t0 = time.perf_counter()
        for a in arrays:
            for s in range(0, len(a), batch):
                sess.run(None, {name: a[s:s + batch]})
        return time.perf_counter() - t0

    opts = {"threads": threads} if threads else {}
    raw, ours = [], []
    with open_backend(artifact, **opts) as backend:
        sess.run(None, {name: arrays[0][:batch]})  # warm-up both
        backend.predict(arrays[0][:batch])
        for _ in range(repeats):  # interleaved, so load from other processes hits both alike
            raw.append(raw_pass())
            ev = evaluate_runtime(backend, pack, square_queries=0, batch_size=batch)
            ours.append(ev.timings["inference_s"])
        sq = None
        if square_queries:
            ev = evaluate_runtime(backend, pack, square_queries=square_queries, square_n=square_n, batch_size=batch)
            sq = ev.query[0]
    del sess
    raw_rate, our_rate = images / min(raw), images / min(ours)
    return {"artifact": artifact.name, "shape": "x".join(str(v) for v in pack.input_shape), "images": images,
            "batch": batch, "raw_img_s": raw_rate, "verify_img_s": our_rate, "ratio": our_rate / raw_rate,
            "pack_load_s": load_s, "square": sq.label if sq else "-", "square_n": sq.n if sq else 0,
            "square_queries_served": sq.queries if sq else 0,
            "square_s_per_100": (100 * sq.seconds / sq.n) if sq else None}


def print_table(rows: list[dict[str, object]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        for r in rows:
            print(r)
        return
    t = Table(title="ciard verify throughput (onnxruntime CPU)")
    for col in ("artifact", "input", "images", "batch", "raw img/s", "verify img/s", "verify/raw", "pack load s",
                "square", "square n", "queries served", "square s / 100 img"):
        t.add_column(col, justify="left" if col in ("artifact", "input", "square") else "right", no_wrap=True)
    for r in rows:
        sq = r["square_s_per_100"]
        t.add_row(str(r["artifact"]), str(r["shape"]), str(r["images"]), str(r["batch"]), f"{r['raw_img_s']:,.0f}",
                  f"{r['verify_img_s']:,.0f}", f"{r['ratio']:.2f}", f"{r['pack_load_s']:.2f}", str(r["square"]),
                  str(r["square_n"]), f"{r['square_queries_served']:,}", "-" if sq is None else f"{sq:.1f}")
    Console(width=200).print(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small_cnn:1x8x8,resnet18_tiny:3x32x32",
                    help="comma-separated name:CxHxW (default: %(default)s)")
    ap.add_argument("--artifact", type=Path, help="bench this ONNX file (with --pack) instead of built ones")
    ap.add_argument("--pack", type=Path, help="the pack for --artifact")
    ap.add_argument("--n", type=int, default=2048, help="images per pack (clean; 3x that are inferred)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10, help="timed repeats, best taken")
    ap.add_argument("--square-queries", type=int, default=1000)
    ap.add_argument("--square-n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads for both paths")
    args = ap.parse_args(argv)

    rows = []
    if args.artifact:
        if not args.pack:
            ap.error("--artifact needs --pack")
        rows.append(bench(args.artifact, args.pack, args.batch_size, args.repeats, args.square_queries,
                          args.square_n, args.threads))
    else:
        with tempfile.TemporaryDirectory(prefix="bench_verify_") as tmp:
            folder = Path(tmp)
            for spec in args.models.split(","):
                name, _, dims = spec.partition(":")
                shape = tuple(int(v) for v in (dims or "3x32x32").split("x"))
                artifact = make_artifact(name, shape, folder)  # type: ignore[arg-type]
                pack = make_pack(artifact, shape, args.n, folder, args.threads)  # type: ignore[arg-type]
                rows.append(bench(artifact, pack, args.batch_size, args.repeats, args.square_queries,
                                  args.square_n, args.threads))
                print(f"done: {spec}", file=sys.stderr)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
