"""Real-data study on CPU: CIARD vs MTARD, RSLAD and PGD-AT on CIFAR-10, distilled, attacked, exported, verified.

    python tools/cifar10_cpu_study.py --data-root DIR     # the sizes of tools/results/cifar10_cpu_study.md (~15 min, 2 cores)
    python tools/cifar10_cpu_study.py --train-subset 10000 --epochs 20 --aa aa --aa-n 1000   # more time

Pipeline (one process, every stage timed):

1. the CIFAR-10 image folder (``train/<class>``, ``test/<class>``), extracted once from ``--tar`` when
   ``--data-root`` has none;
2. two small teachers from the shipped CIFAR-10 smoke teacher recipes (natural ``small_cnn_wide`` and
   TRADES ``small_cnn_wide``), resized to this study's subset and epochs, trained once and cached by
   recipe hash under ``$CIARD_CACHE/teachers`` (a second run reuses them);
3. one student (``small_cnn``, 66 k parameters) per method, from the shipped CIARD smoke recipe and the
   baselines ``tools/compare_methods.py`` derives from it (same data, split, student, schedule, epochs,
   seed and teachers; PGD-AT trains the student alone); best checkpoint selected on a held-out part
   of the training subset;
4. white-box evaluation on the test split: pgd20 and cw30 on ``--eval-n`` images, AutoAttack
   (``--aa aa`` standard, or ``aa-fast``: APGD-CE + APGD-T only) on ``--aa-n`` images together with
   pgd20/cw30 on those same images for the per-sample worst case over all three;
5. export to ONNX FP32 and INT8 (static QDQ, clean calibration from the training split);
6. one robustness pack per student (each holds its student's reference logits; every pack is built
   with the same attacks, n and seed), and ``verify`` of both artifacts on onnxruntime against it,
   with Square (``--square-queries``) on ``--square-n`` pack images as the runtime's black-box attack.

Results: a Markdown table (printed, and written to ``--results``.md) and the full JSON (``.json``),
rewritten after every finished student so an interrupted study still leaves what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

import compare_methods as cm  # noqa: E402  (same recipes and method derivation as the comparison tool)

STUDY_METHODS = ["ciard", "mtard", "rslad", "pgd_at"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = Path(os.environ.get("CIARD_CACHE", Path.home() / ".cache" / "ciard"))
    ap.add_argument("--data-root", type=Path, default=cache / "data" / "cifar10-jpeg",
                    help="CIFAR-10 image folder (train/<class>, test/<class>); extracted from --tar when empty")
    ap.add_argument("--tar", type=Path, default=REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz",
                    help="the CIFAR-10 JPEG archive")
    ap.add_argument("--methods", nargs="+", default=STUDY_METHODS, choices=cm.METHODS)
    ap.add_argument("--train-subset", type=int, default=2000, help="class-stratified training images (incl. holdout)")
    ap.add_argument("--holdout", type=int, default=200, help="of those, held out for model selection")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of every student")
    ap.add_argument("--teacher-epochs", type=int, default=4, help="epochs of the robust (TRADES) teacher")
    ap.add_argument("--clean-teacher-epochs", type=int, default=16, help="epochs of the clean (natural) teacher: "
                    "natural training is ~10x cheaper than TRADES, so it gets more (default 16)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every student (teachers: the recipe's, 0)")
    ap.add_argument("--eval-n", type=int, default=1000, help="test images for clean, pgd20 and cw30")
    ap.add_argument("--aa", default="aa-fast", choices=["aa", "aa-fast", "none"],
                    help="AutoAttack version (aa: standard; aa-fast: APGD-CE + APGD-T only)")
    ap.add_argument("--aa-n", type=int, default=1000, help="test images for AutoAttack (and the worst case)")
    ap.add_argument("--export-n", type=int, default=500, help="test images of the export parity check")
    ap.add_argument("--calib-n", type=int, default=512, help="INT8 calibration images (training split)")
    ap.add_argument("--pack-n", type=int, default=1000, help="test images in each robustness pack")
    ap.add_argument("--pack-attacks", nargs="+", default=["pgd20", "cw30"], help="white-box attacks of the packs")
    ap.add_argument("--square-queries", type=int, default=100, help="Square queries per image on the runtime")
    ap.add_argument("--square-n", type=int, default=200, help="pack images Square attacks")
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "cifar10-cpu-study", help="run dirs (resumed)")
    ap.add_argument("--results", type=Path, default=REPO / "tools" / "results" / "cifar10_cpu_study",
                    help="results path without suffix (.md and .json written)")
    return ap.parse_args(argv)


class Timer:
    def __init__(self) -> None:
        self.t = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.t, 1)


def common_overrides(args: argparse.Namespace, epochs: int) -> list[str]:
    return [f"data.data_root={json.dumps(str(args.data_root))}", f"data.train_subset={args.train_subset}",
            f"data.holdout={args.holdout}", f"train.epochs={epochs}", f"train.eval_n={args.holdout}",
            "train.final_attacks=[]", "train.device=cpu", "train.eval_every=1"]


def train_teachers(args: argparse.Namespace, raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The smoke teacher recipes at this study's sizes: written under OUT/recipes, trained once (cached)."""
    from ciard_deploy.config import apply_overrides, load_raw, validate_recipe
    from ciard_deploy.distill.trainer import train_teacher
    from ciard_deploy.model_loader import load_checkpoint

    out: dict[str, dict[str, Any]] = {}
    (args.out / "recipes").mkdir(parents=True, exist_ok=True)
    for role in ("clean", "robust"):
        epochs = args.clean_teacher_epochs if role == "clean" else (args.teacher_epochs or args.epochs)
        data = apply_overrides(load_raw(raw["teachers"][role]["recipe"]), common_overrides(args, epochs))
        path = args.out / "recipes" / f"teacher_{role}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        recipe = validate_recipe(data, path)
        t = Timer()
        run_dir, trained_now = train_teacher(recipe, role, "cpu")
        seconds = t()
        _, meta = load_checkpoint(run_dir / "student_best")
        recorded = json.loads((run_dir / "summary.json").read_text()).get("train_time_s")
        out[role] = {"arch": recipe.model.arch, "method": recipe.method.name, "epochs": recipe.train.epochs,
                     "run_dir": str(run_dir), "recipe": str(path), "recipe_hash": recipe.short_hash,
                     "trained_now": trained_now, "train_s": seconds, "train_time_s": recorded,
                     "holdout_metrics": meta.metrics}
        print(f"{role} teacher {recipe.method.name} {recipe.model.arch}: "
              f"{'trained' if trained_now else 'cached'} in {seconds:.0f} s ({run_dir})", file=sys.stderr, flush=True)
    return out


def student_recipe(args: argparse.Namespace, raw: dict[str, Any], method: str, teachers: dict[str, Any]) -> Any:
    from ciard_deploy.config import apply_overrides, validate_recipe

    d = cm.derive(raw, method)
    for role in list(d.get("teachers", {})):
        d["teachers"][role] = {"checkpoint": str(Path(teachers[role]["run_dir"]) / "student_best.safetensors")}
    d = apply_overrides(d, [*common_overrides(args, args.epochs), f"train.seed={args.seed}"])
    path = args.out / "recipes" / f"student_{method}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return validate_recipe(d, path)


def evaluate_resumably(run_dir: Path, attacks: list[str], n: int, state: str, **common: Any) -> dict[str, Any]:
    """``ciard eval``'s library call with an evaluation state in the run dir: a second invocation on the
    same student reuses every finished attack (a retrained student's state is discarded)."""
    from ciard_deploy import checkpoint_eval
    from ciard_deploy.resume import StateMismatch

    try:
        return checkpoint_eval.run(str(run_dir), attacks, n=n, state_path=run_dir / state, **common)
    except StateMismatch as e:
        print(f"{run_dir.name}: {state}: {e}; evaluating afresh", file=sys.stderr, flush=True)
        return checkpoint_eval.run(str(run_dir), attacks, n=n, state_path=run_dir / state, fresh=True, **common)


def evaluate_student(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    common = dict(eps=8 / 255, data_root=str(args.data_root), dataset="imagefolder", device="cpu", seed=0)
    res: dict[str, Any] = {}
    same = args.aa != "none" and args.aa_n == args.eval_n
    attacks = ["pgd20", "cw30"] + ([args.aa] if same else [])
    t = Timer()
    main = evaluate_resumably(run_dir, attacks, args.eval_n, "eval.state.json", **common)
    res["eval_wall_s"] = t()  # ~0 when every attack was reused from the state
    res["whitebox_s"] = round(sum(a["seconds"] for a in main["attacks"]), 1)  # as measured when each ran
    res["attack_s"] = {a["label"]: round(a["seconds"], 1) for a in main["attacks"]}
    res["n"] = main["n"]
    res["clean"] = main["clean_acc"]
    res["pgd20"] = main["robust_acc"]["pgd20@8/255"]
    res["cw30"] = main["robust_acc"]["cw30@8/255"]
    res["worst_pgd_cw"] = main["worst_case_acc"] if not same else None
    if args.aa == "none":
        res.update(aa=None, aa_n=0, worst=main["worst_case_acc"], worst_n=main["n"], aa_s=0.0)
    elif same:
        res.update(aa=main["robust_acc"][f"{args.aa}@8/255"], aa_n=main["n"], worst=main["worst_case_acc"],
                   worst_n=main["n"], aa_s=0.0)
    else:
        sub = evaluate_resumably(run_dir, ["pgd20", "cw30", args.aa], args.aa_n, "eval_aa.state.json", **common)
        res.update(aa=sub["robust_acc"][f"{args.aa}@8/255"], aa_n=sub["n"], worst=sub["worst_case_acc"],
                   worst_n=sub["n"], aa_clean=sub["clean_acc"],
                   aa_s=round(sum(a["seconds"] for a in sub["attacks"]), 1))
    return res


def export_and_verify(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    from ciard_deploy import export, verify

    res: dict[str, Any] = {}
    t = Timer()
    ex = export.run(str(run_dir), run_dir / "export", ["onnx", "onnx-int8"], n=args.export_n, calib_n=args.calib_n,
                    data_root=str(args.data_root), force=True, check=False, threads=args.threads)
    res["export_s"] = t()
    res["export_parity"] = {a.name: a.parity.get("clean", {}).get("top1_agreement") for a in ex.manifest.artifacts}
    res["artifacts"] = {a.name: {"file": str(run_dir / "export" / a.file), "size": a.size, "status": a.status}
                        for a in ex.manifest.artifacts}
    t = Timer()
    pack = verify.build_pack(str(run_dir), dataset="imagefolder", n=args.pack_n, attacks=args.pack_attacks,
                             eps="8/255", seed=0, data_root=str(args.data_root), device="cpu")
    pack_path = verify.save_pack(pack, run_dir / "pack.npz", force=True)
    res["pack_s"] = t()
    res["pack"] = {"path": str(pack_path), "n": args.pack_n, "attacks": args.pack_attacks, "seed": 0}
    res["runtime"] = {}
    for name in ("onnx", "onnx-int8"):
        t = Timer()
        rep = verify.run(ex.path(name), pack_path, square_queries=args.square_queries, square_n=args.square_n,
                         threads=args.threads, seed=0)
        d = rep.to_dict()
        (run_dir / f"verify_{name}.json").write_text(json.dumps(d, indent=2, default=str) + "\n")
        m = d["metrics"]
        res["runtime"][name] = {"clean": m["clean_acc"], "worst": m["worst_case_acc"],
                                "worst_label": d["results"]["worst_case"].get("label"),
                                "worst_n": d["results"]["worst_case"].get("n"),
                                "worst_transfer": m.get("worst_case_transfer_acc"), "square": m.get("square_acc"),
                                "agreement_clean": m.get("agreement_clean"),
                                "agreement_adversarial": m.get("agreement_adversarial"),
                                "reference_clean": m.get("reference_clean_acc"),
                                "reference_worst": m.get("reference_worst_case_acc"), "verify_s": t()}
    return res


def pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def render(payload: dict[str, Any]) -> str:
    a = payload["args"]
    aa = a["aa"]
    teachers = payload.get("teachers", {})
    lines = [
        f"CIFAR-10 (JPEG copy, image-folder loader), eps 8/255, seed {a['seed']}, student small_cnn (66 k params); "
        f"train subset {a['train_subset']} images ({a['holdout']} held out for selection), {a['epochs']} epochs "
        f"per student, clean teacher {a['clean_teacher_epochs']} epochs, robust teacher "
        f"{a['teacher_epochs'] or a['epochs']} epochs; CPU {payload['cpu']}, "
        f"{a['threads']} torch threads.",
        "",
        f"White-box (PyTorch, test split): clean / pgd20 / cw30 on {a['eval_n']} images; "
        + (f"**AutoAttack column = `{aa}`** on {a['aa_n']} images"
           + (" (`aa-fast` = APGD-CE + APGD-T only, no FAB-T/Square: weaker than standard AA)" if aa == "aa-fast" else "")
           + f"; worst case = per-sample worst over pgd20, cw30 and {aa} on those {a['aa_n']} images."
           if aa != "none" else "no AutoAttack; worst case over pgd20 and cw30."),
        f"Runtime (onnxruntime CPU): each student's own pack ({a['pack_n']} test images, attacks "
        f"{', '.join(a['pack_attacks'])} transferred from PyTorch, seed 0) + Square {a['square_queries']} queries on "
        f"{a['square_n']} of them; runtime worst case = per-sample worst over the pack's attacks and Square. "
        f"INT8 agreement = top-1 agreement of the INT8 model with PyTorch on the pack's clean images.",
        "",
        f"| method | clean | pgd20 | cw30 | {aa} (n={a['aa_n']}) | worst case | FP32 rt clean / worst | "
        "INT8 rt clean / worst | INT8 agreement | train s* | eval s | export s | pack+verify s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in payload["students"].items():
        ev, rt = r.get("eval", {}), r.get("deploy", {}).get("runtime", {})
        f32, i8 = rt.get("onnx", {}), rt.get("onnx-int8", {})
        dep = r.get("deploy", {})
        pv = (dep.get("pack_s", 0) + f32.get("verify_s", 0) + i8.get("verify_s", 0)) if dep else None
        lines.append(
            f"| {m} | {pct(ev.get('clean'))} | {pct(ev.get('pgd20'))} | {pct(ev.get('cw30'))} | {pct(ev.get('aa'))} | "
            f"{pct(ev.get('worst'))} | {pct(f32.get('clean'))} / {pct(f32.get('worst'))} | "
            f"{pct(i8.get('clean'))} / {pct(i8.get('worst'))} | {pct(i8.get('agreement_clean'))} | "
            f"{r.get('train_time_s', r.get('train_s', '–'))} | {round(ev.get('whitebox_s', 0) + ev.get('aa_s', 0), 1) if ev else '–'} | "
            f"{dep.get('export_s', '–')} | {round(pv, 1) if pv is not None else '–'} |")
    lines.append("")
    for role, t in teachers.items():
        hm = t.get("holdout_metrics") or {}
        hm_txt = ", ".join(f"{k} {pct(v)}" for k, v in hm.items() if isinstance(v, float) and k != "score")
        lines.append(f"- {role} teacher: {t['method']} {t['arch']}, {t['epochs']} epochs, "
                     + (f"trained in {t['train_s']} s" if t["trained_now"]
                        else f"cached (trainer-recorded training time {t.get('train_time_s')} s)")
                     + (f" (holdout: {hm_txt})" if hm_txt else ""))
    lines.append("- *train s: the trainer's recorded training time (`train_time_s` in summary.json; a "
                 "student already trained by an earlier invocation is reused, not retrained)")
    lines.append(f"- total wall time: {payload.get('total_s')} s" + ("" if payload.get("complete")
                                                                    else " (**incomplete run**)"))
    lines.append(f"- command: `{payload['command']}`")
    return "\n".join(lines)


def write(payload: dict[str, Any], results: Path) -> str:
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md = render(payload)
    results.with_suffix(".md").write_text("# CIFAR-10 CPU study: CIARD vs MTARD, RSLAD, PGD-AT\n\n" + md + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from ciard_deploy import __version__
    from ciard_deploy.config import find_recipe, load_raw
    from ciard_deploy.distill.trainer import run

    total = Timer()
    args.data_root = cm.ensure_cifar_folder(args.data_root, args.tar).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    raw = load_raw(find_recipe(cm.CIFAR_SMOKE))
    payload: dict[str, Any] = {
        "study": "cifar10_cpu_study", "tool_version": __version__, "torch": torch.__version__,
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO)) if Path(sys.argv[0]).is_absolute()
                                         and REPO in Path(sys.argv[0]).parents else sys.argv[0], *sys.argv[1:]]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "base_recipe": cm.CIFAR_SMOKE, "students": {}, "complete": False,
    }
    payload["teachers"] = train_teachers(args, raw)
    payload["teachers_s"] = round(sum(t["train_s"] for t in payload["teachers"].values()), 1)
    write(payload, args.results)
    for m in args.methods:
        r: dict[str, Any] = {}
        payload["students"][m] = r
        recipe = student_recipe(args, raw, m, payload["teachers"])
        run_dir = args.out / m
        t = Timer()
        summary = run(recipe, run_dir, resume=True, handle_signals=False)
        r["train_s"] = t()
        r["run_dir"] = str(run_dir)
        r["recipe_hash"] = recipe.short_hash
        r["best_epoch"] = summary.get("selection", {}).get("best_epoch")
        r["train_time_s"] = summary.get("train_time_s")  # the trainer's own record (also when resumed done)
        print(f"{m}: trained in {r['train_s']:.0f} s (best epoch {r['best_epoch']})", file=sys.stderr, flush=True)
        r["eval"] = evaluate_student(args, run_dir)
        print(f"{m}: eval {json.dumps({k: v for k, v in r['eval'].items()})}", file=sys.stderr, flush=True)
        payload["total_s"] = total()
        write(payload, args.results)
        r["deploy"] = export_and_verify(args, run_dir)
        print(f"{m}: runtime {json.dumps(r['deploy']['runtime'])}", file=sys.stderr, flush=True)
        payload["total_s"] = total()
        write(payload, args.results)
    payload["complete"] = True
    payload["total_s"] = total()
    md = write(payload, args.results)
    print(md)
    print(f"wrote {args.results.with_suffix('.md')} and {args.results.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
