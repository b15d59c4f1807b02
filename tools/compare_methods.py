"""Side-by-side comparison of CIARD and its baselines on one engine, over several seeds.

    python tools/compare_methods.py                       # digits quick recipes, seeds 0 1 2
    python tools/compare_methods.py --cifar-smoke         # the CIFAR-10 CPU smoke setting (slow)
    python tools/compare_methods.py --methods ciard mtard --seeds 0 --attacks pgd20 cw30

Every method trains with the same data, budget, schedule and teachers (teachers are trained once,
cached, and shared by every seed: only the student's seed changes). Each student's best checkpoint
(selected on the held-out split) is then evaluated on the test split with the same attacks
(default pgd20, cw30 and AutoAttack), and a table of mean and spread (sample standard deviation
over seeds) is printed, written as JSON and as a Markdown table for the README.

Digits: the shipped ``recipes/quick/digits_*`` recipes. ``--cifar-smoke``: the shipped
``recipes/smoke/cifar10_ciard_*`` recipe, the baselines derived from it (same data, student,
teachers and schedule; no-teacher methods train the student architecture alone), data from an
image folder of the CIFAR-10 JPEG copy (extracted once from ``--cifar-tar`` when needed).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
METHODS = ["ciard", "mtard", "rslad", "ard", "trades", "pgd_at", "natural"]
DIGITS = {
    "ciard": "quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15",
    "mtard": "quick/digits_mtard_small_cnn_to_tiny_cnn_linf0.15",
    "rslad": "quick/digits_rslad_small_cnn_to_tiny_cnn_linf0.15",
    "ard": "quick/digits_ard_small_cnn_to_tiny_cnn_linf0.15",
    "trades": "quick/digits_trades_none_to_tiny_cnn_linf0.15",
    "pgd_at": "quick/digits_pgd_at_none_to_tiny_cnn_linf0.15",
    "natural": "quick/digits_natural_none_to_tiny_cnn",
}
CIFAR_SMOKE = "smoke/cifar10_ciard_small_cnn_wide_to_small_cnn_linf8_smoke"
TEACHERS = {"ciard": ("clean", "robust"), "mtard": ("clean", "robust"), "rslad": ("robust",), "ard": ("robust",),
            "trades": (), "pgd_at": (), "natural": ()}


def derive(raw: dict[str, Any], method: str) -> dict[str, Any]:
    """The CIARD recipe (merged mapping) turned into ``method``'s: same data, budget, schedule and
    student; only the teachers the method uses; kind train for the no-teacher methods. The KL
    reduction carries over to the other distillation methods; CIARD itself keeps all its options."""
    d = copy.deepcopy(raw)
    if d.get("method", {}).get("name") == method:
        return d  # the source recipe's own method: every one of its options kept (kl_reduction, ...)
    keep = {k: v for k, v in d.get("method", {}).items() if k == "kl_reduction"}
    d["method"] = {"name": method}
    if method in ("mtard", "rslad", "ard") and keep:
        d["method"].update(keep)
    if method == "trades":
        d["method"]["beta"] = 6.0
    if TEACHERS[method]:
        d["teachers"] = {r: v for r, v in d["teachers"].items() if r in TEACHERS[method]}
    else:
        d["kind"] = "train"
        d["model"] = d.pop("student")
        d.pop("teachers", None)
    return d


def ensure_cifar_folder(data_root: Path, tar_path: Path) -> Path:
    if (data_root / "train").is_dir() and (data_root / "test").is_dir():
        return data_root
    if not tar_path.exists():
        sys.exit(f"error: no CIFAR-10 image folder at {data_root} and no archive at {tar_path} (--cifar-tar)")
    print(f"extracting {tar_path} -> {data_root} (once)", file=sys.stderr)
    data_root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(data_root, filter="data")
    return data_root


def evaluate_best(run_dir: Path, attacks: list[str], eps: float, step_size: float | None, n: int | None,
                  dataset: str, data_root: str | None, seed: int) -> dict[str, float]:
    from ciard_deploy.data import create_dataset, stratified_indices
    from ciard_deploy.distill.selection import accuracy_metrics
    from ciard_deploy.model_loader import load_checkpoint

    model, _ = load_checkpoint(run_dir / "student_best")
    test = create_dataset(dataset, "test", data_root)
    idx = stratified_indices(test.labels, n, seed=0) if n else None
    x, y = test.tensors(idx)
    import torch

    return accuracy_metrics(model, x, y, attacks, eps, 500, torch.device("cpu"), seed=seed, step_size=step_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--attacks", nargs="+", default=["pgd20", "cw30", "aa"])
    ap.add_argument("--eval-n", type=int, default=None, help="test images per evaluation (default: all)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "compare", help="run dirs (reused: resumed)")
    ap.add_argument("--cifar-smoke", action="store_true", help="the CIFAR-10 smoke setting instead of digits")
    ap.add_argument("--data-root", type=Path, default=None, help="CIFAR-10 image folder (train/, test/)")
    ap.add_argument("--cifar-tar", type=Path, default=REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for tiny models)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here (default: OUT/results.json)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from ciard_deploy.attacks import format_eps
    from ciard_deploy.config import find_recipe, load_raw, validate_recipe
    from ciard_deploy.distill.trainer import run

    setting = "cifar10-smoke" if args.cifar_smoke else "digits"
    recipes: dict[str, Any] = {}
    overrides: list[str] = []
    if args.cifar_smoke:
        root = args.data_root or Path(os.environ.get("CIARD_CACHE", Path.home() / ".cache" / "ciard")) / "data" / "cifar10-jpeg"
        root = ensure_cifar_folder(root, args.cifar_tar)
        overrides = [f"data.data_root={root}"]
        raw = load_raw(find_recipe(CIFAR_SMOKE))
        for m in args.methods:
            recipes[m] = derive(raw, m)
    else:
        for m in args.methods:
            recipes[m] = load_raw(find_recipe(DIGITS[m]))
        # the undefended model is trained for fewer epochs; every other method shares one schedule

    from ciard_deploy.config import apply_overrides

    results: dict[str, dict[int, dict[str, float]]] = {}
    out = args.out / setting
    t_all = time.perf_counter()
    for m in args.methods:
        results[m] = {}
        for seed in args.seeds:
            recipe = validate_recipe(apply_overrides(recipes[m], [*overrides, f"train.seed={seed}"]))
            run_dir = out / f"{m}-seed{seed}"
            t0 = time.perf_counter()
            summary = run(recipe, run_dir, resume=True)
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ev = evaluate_best(run_dir, args.attacks, recipe.attack.eps, recipe.train.eval_step_size, args.eval_n,
                               recipe.data.dataset, recipe.data.data_root, seed)
            ev["train_s"], ev["eval_s"] = round(train_s, 1), round(time.perf_counter() - t0, 1)
            ev["best_epoch"] = summary["selection"]["best_epoch"]
            results[m][seed] = ev
            print(f"{m:8s} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()
                                                       if isinstance(v, float) and k not in ("train_s", "eval_s"))
                  + f"  ({train_s:.0f} s train, {ev['eval_s']:.0f} s eval)", file=sys.stderr, flush=True)
        eps = recipe.attack.eps

    labels = [k for k in next(iter(next(iter(results.values())).values())) if k not in ("train_s", "eval_s", "best_epoch")]
    table = {}
    for m, per_seed in results.items():
        table[m] = {}
        for lab in labels:
            vals = [per_seed[s][lab] for s in args.seeds]
            table[m][lab] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                             "values": vals}
    payload = {"setting": setting, "eps": eps, "eps_label": format_eps(eps), "seeds": args.seeds,
               "attacks": args.attacks, "eval_n": args.eval_n, "results": results, "table": table,
               "total_s": round(time.perf_counter() - t_all, 1), "torch_threads": args.threads}
    json_path = args.json or out / "results.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")

    head = "| method | " + " | ".join(labels) + " |"
    lines = [head, "|" + "---|" * (len(labels) + 1)]
    for m in args.methods:
        cells = [f"{100 * table[m][lab]['mean']:.1f} ± {100 * table[m][lab]['std']:.1f}" for lab in labels]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    (json_path.with_suffix(".md")).write_text(md + "\n")
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{setting}, eps {format_eps(eps)}, test accuracy % (mean ± std over seeds {args.seeds})")
        t.add_column("method")
        for lab in labels:
            t.add_column(lab, justify="right")
        for m in args.methods:
            t.add_row(m, *(f"{100 * table[m][lab]['mean']:.1f} ± {100 * table[m][lab]['std']:.1f}" for lab in labels))
        Console().print(t)
    except ImportError:
        print(md)
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
