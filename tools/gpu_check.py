"""The GPU path proven in one call: every check on a CUDA machine, one line each, all results in one JSON file.

    python tools/gpu_check.py --out gpu_check.json              # ~8 minutes at most (--budget-s)
    python tools/gpu_check.py --out gpu_check.json --no-bench   # without the paper-scale benchmark

Checks, in order, each in its own subprocess with its own timeout, all within the total budget:

1. ``env``: the device, torch/CUDA/cuDNN/NCCL versions, onnxruntime's providers;
2. ``train:<method>`` for every method: a tiny run on digits (fresh tiny_cnn teachers, ``teacher_start_fraction``
   0 so CIARD's robust teacher steps) in fp32, bf16 autocast, fp16 with the GradScaler, and bf16 +
   channels_last + the training set on the GPU + fused SGD; each must give finite losses, and a run stopped
   mid-epoch and resumed must end with the same weights as the uninterrupted run (``train.deterministic``;
   where a CUDA kernel has no deterministic version, within 10x the difference of two uninterrupted runs);
3. ``ddp-nccl``: ``torchrun --nproc_per_node 2`` CIARD distill on NCCL with SyncBatchNorm (2+ GPUs only);
4. ``ort-cuda``: export the fp32 CIARD student, build a small pack, ``ciard verify --provider cuda``
   (when onnxruntime has the CUDA provider);
5. ``pytest-gpu``: ``pytest -m gpu tests`` with the first GPU visible (tests/gpu);
6. ``bench``: ``tools/bench_step.py --device cuda --paper-teachers`` (ResNet-18 <- ResNet-56 + WRN-34-10,
   batch 128, PGD-10) in each precision and layout: img/s, peak memory, fraction of peak FLOP/s, epoch time;
7. ``compile``: CIARD with ``train.compile: true`` in bf16 (finite losses, close to the eager run), last:
   its compile time is the least predictable.

Without CUDA it prints one line and exits 3. Exit 0: every check passed or was skipped; 1: one failed.
The JSON is rewritten after each check, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
EXIT_NO_CUDA = 3
METHODS = ("natural", "pgd_at", "trades", "ard", "rslad", "mtard", "ciard")
#: name -> train-section overrides of one precision/layout (channels_last is on by default in recipes)
CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": {"amp": "off", "channels_last": False},
    "bf16": {"amp": "bf16", "channels_last": False},
    "fp16+scaler": {"amp": "fp16", "channels_last": False},
    "bf16+channels_last+fast": {"amp": "bf16", "channels_last": True, "data_on_device": "true",
                                "fused_optimizer": True},
}


# --------------------------------------------------------------------------- recipes of the tiny runs
def make_teachers(folder: Path) -> dict[str, str]:
    """Fresh tiny_cnn clean and robust teachers as ciard checkpoints (weights do not matter for these checks)."""
    import torch

    from ciard_deploy.checkpoints import CheckpointMeta, save_checkpoint
    from ciard_deploy.data import get_dataset_info
    from ciard_deploy.models import create_model

    info = get_dataset_info("digits")
    out = {}
    for i, role in enumerate(("clean", "robust")):
        path = folder / f"teacher_{role}"
        if not path.with_suffix(".safetensors").exists():
            torch.manual_seed(i)
            m = create_model("tiny_cnn", 10, 1, info.mean, info.std)
            save_checkpoint(path, m, CheckpointMeta("tiny_cnn", 10, info.input_shape, info.mean, info.std, "digits"))
        out[role] = str(path.with_suffix(".safetensors"))
    return out


def tiny_recipe(method: str, teachers: dict[str, str], device: str, epochs: int = 2, **train: Any) -> dict[str, Any]:
    """A 2-epoch, 4-steps-per-epoch run of ``method`` on digits, as a recipe dict."""
    from ciard_deploy.distill.methods import METHODS as REGISTRY

    roles = REGISTRY.get(method).teachers
    params: dict[str, Any] = {"teacher_start_fraction": 0.0} if method == "ciard" else {}
    r: dict[str, Any] = {
        "method": {"name": method, **params},
        "data": {"dataset": "digits", "train_subset": 160, "holdout": 32, "batch_size": 32},
        "attack": {"eps": 0.15, "steps": 3, "step_size": 0.06},
        "optim": {"lr": 0.05, "schedule": "cosine"},
        "train": {"epochs": epochs, "device": device, "eval_attack": None, "select_by": "clean", "eval_n": 32,
                  "final_eval_n": 32, "final_attacks": [], **train},
    }
    if roles:
        r.update(kind="distill", student={"arch": "tiny_cnn"}, teachers={k: {"checkpoint": teachers[k]} for k in roles})
    else:
        r.update(kind="train", model={"arch": "tiny_cnn"})
    return r


def _weights(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "student_last.safetensors"))


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def train_worker(method: str, device: str, work: Path, configs: list[str]) -> dict[str, Any]:
    """Runs ``method`` in each config: uninterrupted, then stopped at epoch 2 step 2 and resumed; returns
    per config the losses, whether they are finite, the largest weight difference (and, when it is not 0,
    the run-to-run difference of two uninterrupted runs it must stay within) and the time."""
    import torch

    from ciard_deploy.config import recipe_from_dict
    from ciard_deploy.distill.events import RunControl, TrainEvent, TrainingInterrupted
    from ciard_deploy.distill.trainer import run

    teachers = make_teachers(work)
    out: dict[str, Any] = {}
    for name in configs:
        t0 = time.perf_counter()
        recipe = recipe_from_dict(tiny_recipe(method, teachers, device, deterministic=True, **CONFIGS[name]))
        base = work / f"{method}-{name}"
        full, part = base / "full", base / "resumed"
        run(recipe, full, handle_signals=False)

        def stop_mid_epoch(ev: TrainEvent) -> None:
            if ev.kind == "step" and ev.epoch == 2 and ev.step == 2 and ev.control is not None:
                ev.control.request_stop("gpu_check: mid-epoch stop")

        try:
            run(recipe, part, callbacks=stop_mid_epoch, control=RunControl(), handle_signals=False)
            interrupted = False
        except TrainingInterrupted:
            interrupted = True
        run(recipe, part, resume=True, handle_signals=False)
        wa, wb = _weights(full), _weights(part)
        diff = _max_diff(wa, wb)
        noise = None
        if diff > 0:  # some CUDA backward kernels (adaptive avg-pool) have no deterministic version: a second
            # uninterrupted run measures that run-to-run noise, and the resumed run must stay within it
            run(recipe, base / "full-again", handle_signals=False)
            noise = _max_diff(wa, _weights(base / "full-again"))
        losses = _losses(full)
        out[name] = {"losses": losses, "finite": all(math.isfinite(v) for v in losses), "interrupted": interrupted,
                     "resume_max_abs_diff": diff, "run_to_run_max_abs_diff": noise,
                     "resume_equal": list(wa) == list(wb) and (diff == 0.0 or (noise is not None and 0 < noise
                                                                                and diff <= 10 * noise)),
                     "resumed_losses": _losses(part), "seconds": round(time.perf_counter() - t0, 2)}
    if device.startswith("cuda"):
        out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def compile_worker(device: str, work: Path) -> dict[str, Any]:
    """CIARD in bf16, eager and with train.compile: true; the epoch losses of both."""
    from ciard_deploy.config import recipe_from_dict
    from ciard_deploy.distill.trainer import run

    teachers = make_teachers(work)
    res = {}
    for flag in (False, True):
        t0 = time.perf_counter()
        r = recipe_from_dict(tiny_recipe("ciard", teachers, device, amp="bf16", compile=flag))
        run(r, work / f"compile-{flag}", handle_signals=False)
        res["compiled" if flag else "eager"] = {"losses": _losses(work / f"compile-{flag}"),
                                                "seconds": round(time.perf_counter() - t0, 2)}
    return res


# --------------------------------------------------------------------------- the checks
class Checker:
    """Runs checks within one total budget, prints a line per check, rewrites the JSON after each."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.budget, self.t0 = out, budget_s, time.perf_counter()
        self.report: dict[str, Any] = {"tool": "tools/gpu_check.py", "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                       "budget_s": budget_s, "checks": []}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def check(self, name: str, timeout: float, fn: Callable[[float], tuple[str, str, dict[str, Any]]]) -> None:
        """``fn(timeout)`` returns (status pass|fail|skip, one-line detail, data)."""
        t = min(timeout, self.left())
        t0 = time.perf_counter()
        if t < 10:
            status, detail, data = "skip", f"total budget spent ({self.budget:.0f} s)", {}
        else:
            try:
                status, detail, data = fn(t)
            except subprocess.TimeoutExpired:
                status, detail, data = "fail", f"timed out after {t:.0f} s", {}
            except Exception as e:  # a check's own bug must not hide the others
                status, detail, data = "fail", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", {}
        secs = round(time.perf_counter() - t0, 1)
        self.report["checks"].append({"name": name, "status": status, "seconds": secs, "detail": detail, **data})
        self.report["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.out.write_text(json.dumps(self.report, indent=2))
        print(f"{status.upper():4}  {name:<28} {secs:7.1f} s  {detail}", flush=True)

    @property
    def failed(self) -> bool:
        return any(c["status"] == "fail" for c in self.report["checks"])


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def _tail(p: subprocess.CompletedProcess, n: int = 1500) -> str:
    return (p.stdout + p.stderr)[-n:]


def _worker(args: list[str], timeout: float) -> dict[str, Any]:
    p = _run([sys.executable, __file__, "--worker", *args], timeout,
             env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONPATH": str(REPO)})
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"worker exit {p.returncode}: {_tail(p, 600)}")
    return json.loads(lines[-1])


def env_info() -> tuple[str, str, dict[str, Any]]:
    import torch

    d: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                         "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                         "capability": list(torch.cuda.get_device_capability(0)),
                         "bf16": torch.cuda.is_bf16_supported(), "nccl": torch.distributed.is_nccl_available()}
    try:
        import onnxruntime as ort

        d["onnxruntime"], d["ort_providers"] = ort.__version__, ort.get_available_providers()
    except ImportError:
        d["onnxruntime"], d["ort_providers"] = None, []
    return "pass", f"{len(d['gpus'])} x {d['gpus'][0]}, torch {d['torch']}, CUDA {d['cuda']}", d


def pytest_gpu(timeout: float) -> tuple[str, str, dict[str, Any]]:
    p = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], timeout,
             env={"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0",
                  "PYTHONPATH": str(REPO)})
    last = (p.stdout.strip().splitlines() or [""])[-1]
    status = "pass" if p.returncode == 0 else ("skip" if p.returncode == 5 else "fail")
    return status, last.strip("= "), {"returncode": p.returncode, "tail": _tail(p, 3000)}


def train_check(method: str, work: Path, timeout: float) -> tuple[str, str, dict[str, Any]]:
    res = _worker(["train", "--method", method, "--work", str(work)], timeout)
    bad = [f"{c}: {'losses not finite' if not r['finite'] else 'resume differs by %.2g' % r['resume_max_abs_diff']}"
           for c, r in res.items() if isinstance(r, dict) and (not r["finite"] or not r["resume_equal"])]
    ok = "finite losses, resumed == uninterrupted in " + ", ".join(c for c in CONFIGS)
    return ("fail", "; ".join(bad), res) if bad else ("pass", ok, res)


def compile_check(work: Path, timeout: float) -> tuple[str, str, dict[str, Any]]:
    res = _worker(["compile", "--work", str(work)], timeout)
    e, c = res["eager"]["losses"], res["compiled"]["losses"]
    close = all(math.isfinite(b) and abs(a - b) <= 0.05 * abs(a) + 1e-3 for a, b in zip(e, c))
    return ("pass" if close else "fail"), f"losses eager {e} vs compiled {c}", res


def ddp_check(work: Path, timeout: float) -> tuple[str, str, dict[str, Any]]:
    import torch
    import yaml

    if torch.cuda.device_count() < 2:
        return "skip", f"{torch.cuda.device_count()} GPU: DDP needs 2", {}
    r = tiny_recipe("ciard", make_teachers(work), "cuda", sync_bn=True, amp="bf16")
    path, out = work / "ddp.yaml", work / "ddp-run"
    path.write_text(yaml.safe_dump(r))
    p = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
              "ciard_deploy", "distill", str(path), "--out", str(out)], timeout, env={"PYTHONPATH": str(REPO)})
    if p.returncode != 0:
        return "fail", f"torchrun exit {p.returncode}", {"tail": _tail(p)}
    s = json.loads((out / "summary.json").read_text())
    ok = s.get("world_size") == 2 and s.get("ranks", {}).get("in_sync")
    return ("pass" if ok else "fail"), f"world_size {s.get('world_size')}, ranks in sync: {ok}", {"ranks": s.get("ranks")}


def ort_check(work: Path, timeout: float) -> tuple[str, str, dict[str, Any]]:
    try:
        import onnxruntime as ort
    except ImportError:
        return "skip", "onnxruntime not installed", {}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "skip", f"no CUDAExecutionProvider in {ort.get_available_providers()}", {}
    run_dir = work / "ciard-fp32" / "full"
    if not (run_dir / "student_last.safetensors").exists():
        return "skip", "no trained CIARD student (train:ciard did not finish)", {}
    exp, pack, rep = work / "export", work / "pack.npz", work / "verify.json"
    t_end = time.perf_counter() + timeout
    cli = [sys.executable, "-m", "ciard_deploy", "-q"]
    steps = [cli + ["export", str(run_dir), "--out", str(exp), "--onnx", "--n", "64", "--provider", "cuda"],
             cli + ["pack", str(run_dir), "--out", str(pack), "--n", "64", "--attacks", "pgd20"]]
    for cmd in steps:
        p = _run(cmd, max(t_end - time.perf_counter(), 1), env={"PYTHONPATH": str(REPO)})
        if p.returncode != 0:
            return "fail", f"{cmd[4]} exit {p.returncode}", {"tail": _tail(p)}
    onnx = sorted(exp.rglob("*.onnx"))[0]
    p = _run(cli + ["verify", str(onnx), "--pack", str(pack), "--provider", "cuda", "--live", "none", "--json",
                    str(rep), "--force"], max(t_end - time.perf_counter(), 1), env={"PYTHONPATH": str(REPO)})
    text = rep.read_text() if rep.exists() else ""
    on_cuda = "CUDAExecutionProvider" in text or '"cuda"' in text
    status = "pass" if p.returncode in (0, 1) and on_cuda else "fail"
    return status, f"verify exit {p.returncode} on {onnx.name}, CUDA provider recorded: {on_cuda}", {"tail": _tail(p)}


def bench_check(work: Path, timeout: float) -> tuple[str, str, dict[str, Any]]:
    out = work / "bench_step.json"
    p = _run([sys.executable, str(REPO / "tools" / "bench_step.py"), "--device", "cuda", "--students", "resnet18",
              "--paper-teachers", "--warmup", "2", "--iters", "5", "--no-plain", "--json", str(out)], timeout,
             env={"PYTHONPATH": str(REPO)})
    if p.returncode != 0 or not out.exists():
        return "fail", f"bench_step exit {p.returncode}", {"tail": _tail(p)}
    rows = json.loads(out.read_text())
    best = max((v for r in rows["rows"] for v in r["variants"]), key=lambda v: v["img_s"])
    return "pass", (f"best {best['name']}: {best['img_s']:.0f} img/s, CIFAR-10 epoch {best['epoch_s']:.1f} s, "
                    f"{100 * (best['peak_fraction'] or 0):.1f} % of peak"), {"bench": rows}


# --------------------------------------------------------------------------- entry points
def worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["train", "compile"])
    ap.add_argument("--method", default="ciard")
    ap.add_argument("--work", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res = train_worker(a.method, a.device, work, a.configs) if a.kind == "train" else compile_worker(a.device, work)
    print(json.dumps(res), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json", help="the JSON report")
    ap.add_argument("--work", default=None, help="scratch folder (default: <out>.work beside the report)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="total time of all checks")
    ap.add_argument("--no-bench", action="store_true", help="skip the paper-scale bench_step run")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu_check: torch is not installed: nothing checked", flush=True)
        return EXIT_NO_CUDA
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, built for CUDA {torch.version.cuda}): "
              f"nothing checked", flush=True)
        return EXIT_NO_CUDA
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out.with_suffix(".work")
    work.mkdir(parents=True, exist_ok=True)
    c = Checker(out, args.budget_s)
    c.check("env", 30, lambda t: env_info())
    for method in METHODS:
        c.check(f"train:{method}", 75, lambda t, m=method: train_check(m, work, t))
    c.check("ddp-nccl", 120, lambda t: ddp_check(work, t))
    c.check("ort-cuda", 90, lambda t: ort_check(work, t))
    c.check("pytest-gpu", 120, pytest_gpu)
    if not args.no_bench:
        c.check("bench", 180, lambda t: bench_check(work, t))
    c.check("compile", 150, lambda t: compile_check(work, t))
    n = {s: sum(ch["status"] == s for ch in c.report["checks"]) for s in ("pass", "fail", "skip")}
    print(f"gpu_check: {n['pass']} passed, {n['fail']} failed, {n['skip']} skipped in {c.report['elapsed_s']:.0f} s; "
          f"report {out}", flush=True)
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
