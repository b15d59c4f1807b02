"""Images/s, peak memory and achieved FLOP/s of one CIARD training step: the trainer's step in each
precision and layout, and a plain re-implementation of the step in the reference code's structure (fp32,
separate passes, no autocast, no channels_last).

    python tools/bench_step.py                          # small_cnn and resnet18 students, batch 128
    python tools/bench_step.py --device cuda --students resnet18 --paper-teachers --json bench.json
    python tools/bench_step.py --students small_cnn --iters 3 --threads 2 --json tools/results/bench_step_cpu.json

One step = PGD-10 on the student, the clean and adversarial passes of the student and both
teachers, the student's backward and SGD step, and the robust teacher's CE backward and SGD step.
Both versions run the same models, data and hyper-parameters; the first ``--warmup`` steps are not
timed. Teachers: small_cnn_wide (for small_cnn) and resnet56 + wrn-16-2 (for resnet18) by default,
the paper's resnet56 + wrn-34-10 with ``--paper-teachers`` (very slow on a CPU).

FLOPs of one step are counted once from the models (``torch.utils.flop_counter.FlopCounterMode`` on a
forward, a weight backward and an input backward of each model at the step's shapes) times the passes
CIARD's step makes (:func:`ciard_passes`, read from ``distill/methods/dual_teacher.py`` and ``ciard.py``);
``--check-flops`` also counts one real step under the counter. The achieved fraction of peak divides the
step's FLOPs per second by ``--peak-tflops`` (default from :data:`PEAK_TFLOPS` when the GPU's name matches;
fp32 rows are compared with the TF32 peak, the math cuDNN convolutions use by default). On CPU there is no
peak (n/a unless ``--peak-tflops`` is given) and peak memory is the process's max RSS.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- the plain reference step
class PlainCiardStep:
    """CIARD's step as the released script writes it: fp32, one pass per tensor, nothing fused."""

    def __init__(self, student: nn.Module, clean: nn.Module, robust: nn.Module, eps: float = 8 / 255,
                 step_size: float = 2 / 255, steps: int = 10) -> None:
        self.s, self.tc, self.tr = student, clean, robust
        self.eps, self.alpha, self.steps = eps, step_size, steps
        self.opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
        self.opt_t = torch.optim.SGD(robust.parameters(), lr=1e-4, momentum=0.1, weight_decay=2e-4)
        self.tau_r = self.tau_c = 1.0
        for p in clean.parameters():
            p.requires_grad_(False)
        clean.eval()

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.s.eval()
        x_adv = x.detach() + 0.001 * torch.randn_like(x)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(self.s(x_adv), y)
            grad = torch.autograd.grad(loss, [x_adv])[0]
            x_adv = x_adv.detach() + self.alpha * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0.0, 1.0)
        self.s.train()
        return x_adv

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        kl = nn.KLDivLoss(reduction="none")
        self.s.train()
        self.tr.train()
        s_nat = self.s(x)
        with torch.no_grad():
            t_nat = self.tc(x)
            self.tr(x)
        x_adv = self.attack(x, y)
        s_adv = self.s(x_adv)
        r_adv = self.tr(x_adv)
        with torch.no_grad():
            c_adv = self.tc(x_adv)
        l_rob = kl(F.log_softmax(s_adv, dim=1), F.softmax(r_adv.detach() / self.tau_r, dim=1)).mean()
        l_nat = kl(F.log_softmax(s_nat, dim=1), F.softmax(t_nat / self.tau_c, dim=1)).mean()
        loss = l_rob + l_nat
        fooled = c_adv.argmax(1) != y
        if fooled.any():
            l_push = kl(F.log_softmax(s_adv[fooled] / 5, dim=1), F.softmax(c_adv[fooled], dim=1)).mean()
            mag = lambda v: int(torch.floor(torch.log10(v.detach())).item())  # noqa: E731
            if torch.isfinite(l_push):
                loss = loss - 10.0 ** (min(mag(l_rob), mag(l_nat)) - mag(l_push)) * l_push
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        # temperature step toward equal entropies
        h_r = -(F.softmax(r_adv.detach() / self.tau_r, 1) * F.log_softmax(r_adv.detach() / self.tau_r, 1)).sum(1).mean()
        h_c = -(F.softmax(t_nat / self.tau_c, 1) * F.log_softmax(t_nat / self.tau_c, 1)).sum(1).mean()
        d = float(torch.sign(h_r - h_c))
        self.tau_r = min(max(self.tau_r - 0.001 * d, 1.0), 10.0)
        self.tau_c = min(max(self.tau_c + 0.001 * d, 1.0), 10.0)
        # robust-teacher retraining
        self.opt_t.zero_grad()
        F.cross_entropy(r_adv, y).backward()
        self.opt_t.step()
        return float(loss.detach())


# --------------------------------------------------------------------------- ours
class OurStep:
    """The trainer's own step (``ciard_deploy.distill.loop.train_step``) on the ciard method."""

    def __init__(self, student: nn.Module, clean: nn.Module, robust: nn.Module, device: torch.device, amp: str,
                 channels_last: bool, fused: bool = False, compile: bool = False) -> None:
        from ciard_deploy.distill.methods import create_method

        if channels_last:
            for m in (student, clean, robust):
                m.to(memory_format=torch.channels_last)
        if compile:
            for m in (student, clean, robust):
                m.compile()
        self.method = create_method("ciard", {"teacher_start_fraction": 0.0}, student,
                                    {"clean": clean, "robust": robust}, num_classes=10, eps=8 / 255,
                                    attack_steps=10, step_size=2 / 255, epochs=300, steps_per_epoch=391)
        kw = {"fused": True} if fused else {}
        self.opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4, **kw)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        self.device, self.amp, self.channels_last = device, amp, channels_last

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        from ciard_deploy.distill.loop import train_step

        return train_step(self.method, self.opt, self.scaler, x, y, 100, self.device, self.amp, self.channels_last)[2]


# --------------------------------------------------------------------------- FLOPs
#: dense peak TFLOP/s by device-name match (first match wins) and precision; "fp32" is the TF32 tensor-core
#: peak (cuDNN convolutions run in TF32 unless torch.backends.cudnn.allow_tf32 is turned off)
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
]


def peak_tflops(device_name: str, precision: str, given: float | None) -> float | None:
    """``given``, else the table's peak for the first entry whose name is in ``device_name``, else None."""
    if given is not None:
        return given
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks["fp32" if precision == "off" else precision]
    return None


class _NoModuleTracking:
    """Stands in for FlopCounterMode's module tracker: its backward hooks refuse ``autograd.grad`` on a leaf
    input (every PGD step's gradient), and only the total is needed here."""

    parents = ("Global",)

    def __enter__(self) -> "_NoModuleTracking":
        return self

    def __exit__(self, *args: Any) -> None:
        return None


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the torch ops ``fn`` runs (matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    fc.mod_tracker = _NoModuleTracking()  # type: ignore[assignment]
    with fc:
        fn()
    return int(fc.get_total_flops())


def model_flops(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """FLOPs of one forward, one weight backward (gradients of the parameters only, as the SGD steps
    need) and one input backward (gradient of the input only, as each PGD step needs) of ``model`` on x."""
    model = copy.deepcopy(model).train()
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    fwd = count_flops(lambda: model(x))
    out = model(x)
    weight_bwd = count_flops(lambda: torch.autograd.grad(out.float().sum(), params))
    for p in params:
        p.requires_grad_(False)
    xi = x.clone().requires_grad_(True)
    out = model(xi)
    input_bwd = count_flops(lambda: torch.autograd.grad(out.float().sum(), [xi]))
    return {"forward": fwd, "weight_backward": weight_bwd, "input_backward": input_bwd}


def ciard_passes(attack_steps: int = 10, push_loss: bool = True, teacher_clean_bn_pass: bool = True,
                 teacher_active: bool = True) -> dict[str, dict[str, int]]:
    """How many forwards/backwards of each model one CIARD step makes (``DualTeacherMethod.train_step``,
    ``CIARD.extra_terms``/``teacher_step``, ``losses.pgd_train_attack``):

    student: S(x) and S(x_adv) with graphs, the loss's backward through both (two weight backwards); each PGD step a
    forward and an input backward; clean teacher: Tc(x) and, for the push term, Tc(x_adv), no graphs;
    robust teacher: Tr(x) for its BatchNorm (no graph) and Tr(x_adv) with a graph, its CE weight backward
    once its steps have started."""
    return {
        "student": {"forward": 2 + attack_steps, "weight_backward": 2, "input_backward": attack_steps},
        "clean": {"forward": 1 + int(push_loss), "weight_backward": 0, "input_backward": 0},
        "robust": {"forward": 1 + int(teacher_clean_bn_pass), "weight_backward": int(teacher_active),
                   "input_backward": 0},
    }


def step_flops(models: dict[str, nn.Module], x: torch.Tensor, attack_steps: int = 10) -> tuple[int, dict[str, Any]]:
    """FLOPs of one CIARD step on batch x: per-model counts times :func:`ciard_passes` (the small loss
    terms are not counted)."""
    passes = ciard_passes(attack_steps)
    detail: dict[str, Any] = {}
    total = 0
    for role, model in models.items():
        f = model_flops(model, x)
        n = passes[role]
        t = sum(f[k] * n[k] for k in f)
        detail[role] = {"per_pass": f, "passes": n, "flops": t}
        total += t
    return total, detail


def counted_step_flops(step: Callable[[torch.Tensor, torch.Tensor], float], x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one real step, counted while it runs (a check of :func:`step_flops`)."""
    return count_flops(lambda: step(x, y))


# --------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[torch.Tensor, torch.Tensor], float], x: torch.Tensor, y: torch.Tensor,
              device: torch.device, warmup: int, iters: int) -> float:
    """Images per second of ``step`` on (x, y) after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step(x, y)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step(x, y)
    _sync(device)
    return len(x) * iters / (time.perf_counter() - t0)


def peak_memory_mb(device: torch.device) -> float | None:
    """CUDA: the allocator's peak since the last reset; CPU: None (see :func:`max_rss_mb`)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def max_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def build(arch: str, device: torch.device, seed: int) -> nn.Module:
    from ciard_deploy.models import create_model

    torch.manual_seed(seed)
    return create_model(arch, 10, 3, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)).to(device)


def variants_for(device: torch.device, compile: bool) -> list[dict[str, Any]]:
    """The (name, amp, channels_last, fused, compile) variants measured on ``device``."""
    def v(name: str, amp: str, cl: bool = False, fused: bool = False, comp: bool = False) -> dict[str, Any]:
        return {"name": name, "amp": amp, "channels_last": cl, "fused": fused, "compile": comp}

    if device.type != "cuda":
        return [v("fp32", "off"), v("bf16 autocast", "bf16")]
    out = [v("fp32", "off"), v("fp32+channels_last", "off", True), v("bf16", "bf16"),
           v("bf16+channels_last", "bf16", True), v("fp16+scaler+channels_last", "fp16", True),
           v("bf16+channels_last+fused", "bf16", True, True)]
    if compile:
        out.append(v("bf16+channels_last+fused+compile", "bf16", True, True, True))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--students", nargs="+", default=["small_cnn", "resnet18"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--paper-teachers", action="store_true", help="resnet56 + wrn-34-10 for every student")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak TFLOP/s for every precision (default: the table's, for H100/H200/A100)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain reference step")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile variant (CUDA)")
    ap.add_argument("--check-flops", action="store_true", help="also count one real step under FlopCounterMode")
    ap.add_argument("--flops-only", action="store_true",
                    help="count the step's FLOPs on the meta device (no compute, seconds even for the paper's models)")
    ap.add_argument("--epoch-images", type=int, default=50_000, help="images of the epoch whose time is reported")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    from ciard_deploy.devices import resolve_device

    if args.flops_only:
        return flops_only(args)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if args.peak_tflops is None and peak_tflops(dev_name, "bf16", None) is None:
            print(f"bench_step: no peak FLOP/s known for {dev_name!r}: give --peak-tflops", file=sys.stderr)
            return 2
    variants = variants_for(device, args.compile)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    rows: list[dict[str, Any]] = []
    for student_arch in args.students:
        if args.paper_teachers:
            clean_arch, robust_arch = "resnet56", "wrn-34-10"
        elif student_arch in ("small_cnn", "tiny_cnn"):
            clean_arch, robust_arch = "small_cnn_wide", "small_cnn_wide"
        else:
            clean_arch, robust_arch = "resnet56", "wrn-16-2"
        base = (build(student_arch, device, 0), build(clean_arch, device, 1), build(robust_arch, device, 2))
        flops, detail = step_flops(dict(zip(("student", "clean", "robust"), base)), x)
        row: dict[str, Any] = {"student": student_arch, "teachers": f"{clean_arch} + {robust_arch}",
                               "batch": args.batch, "device": str(device), "flops_per_step": flops,
                               "flops_detail": detail, "variants": []}
        if args.check_flops:
            row["flops_counted_in_a_real_step"] = counted_step_flops(
                OurStep(*(copy.deepcopy(m) for m in base), device, "off", False), x, y)
        plain_ips = None
        if not args.no_plain:
            plain = PlainCiardStep(*(copy.deepcopy(m) for m in base))
            plain_ips = time_step(plain, x, y, device, args.warmup, args.iters)
            row["plain fp32 img_s"] = round(plain_ips, 1)
        for v in variants:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            ours = OurStep(*(copy.deepcopy(m) for m in base), device, v["amp"], v["channels_last"], v["fused"],
                           v["compile"])
            ips = time_step(ours, x, y, device, args.warmup + (2 if v["compile"] else 0), args.iters)
            achieved = flops / args.batch * ips / 1e12
            peak = peak_tflops(dev_name, v["amp"], args.peak_tflops) if device.type == "cuda" else args.peak_tflops
            row["variants"].append({**v, "img_s": round(ips, 1), "epoch_s": round(args.epoch_images / ips, 1),
                                    "vs_plain": round(ips / plain_ips, 2) if plain_ips else None,
                                    "peak_mem_mb": peak_memory_mb(device), "achieved_tflops": round(achieved, 3),
                                    "peak_tflops": peak, "peak_fraction": round(achieved / peak, 4) if peak else None})
            del ours
        row["max_rss_mb"] = max_rss_mb()
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "flops_detail"}), file=sys.stderr, flush=True)
    print_table(rows, args.batch, dev_name)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "device_name": dev_name, "torch": torch.__version__,
                       "epoch_images": args.epoch_images, "rows": rows}, f, indent=2)
    return 0


def flops_only(args: argparse.Namespace) -> int:
    """FLOPs of one step per student, counted on meta tensors; prints and writes them."""
    meta = torch.device("meta")
    x = torch.empty(args.batch, 3, 32, 32, device=meta)
    rows = []
    for student_arch in args.students:
        teachers = ("resnet56", "wrn-34-10") if args.paper_teachers else (
            ("small_cnn_wide",) * 2 if student_arch in ("small_cnn", "tiny_cnn") else ("resnet56", "wrn-16-2"))
        models = dict(zip(("student", "clean", "robust"),
                          (build(a, torch.device("cpu"), i).to(meta) for i, a in enumerate((student_arch, *teachers)))))
        flops, detail = step_flops(models, x)
        epoch = flops / args.batch * args.epoch_images
        rows.append({"student": student_arch, "teachers": " + ".join(teachers), "batch": args.batch,
                     "flops_per_step": flops, "flops_per_image": flops / args.batch, "flops_per_epoch": epoch,
                     "flops_detail": detail})
        print(f"{student_arch} ({' + '.join(teachers)}), batch {args.batch}: {flops / 1e12:.2f} TFLOP per step, "
              f"{flops / args.batch / 1e9:.1f} GFLOP per image, {epoch / 1e15:.2f} PFLOP per "
              f"{args.epoch_images}-image epoch", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": "meta (FLOPs only)", "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


def print_table(rows: list[dict[str, Any]], batch: int, dev_name: str) -> None:
    lines = [f"one CIARD step, batch {batch} ({dev_name}, torch {torch.__version__})",
             "| student (teachers) | GFLOP/step | variant | img/s | CIFAR-10 epoch s | vs plain | peak MB | % of peak |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        who = f"{r['student']} ({r['teachers']})"
        if "plain fp32 img_s" in r:
            lines.append(f"| {who} | {r['flops_per_step'] / 1e9:.1f} | plain fp32 (reference structure) | "
                         f"{r['plain fp32 img_s']:.1f} | {50_000 / r['plain fp32 img_s']:.0f} | 1.00 | | |")
        for v in r["variants"]:
            mem = f"{v['peak_mem_mb']:.0f}" if v["peak_mem_mb"] is not None else f"n/a (RSS {r['max_rss_mb']:.0f})"
            frac = f"{100 * v['peak_fraction']:.1f}" if v["peak_fraction"] is not None else "n/a"
            lines.append(f"| {who} | {r['flops_per_step'] / 1e9:.1f} | {v['name']} | {v['img_s']:.1f} | "
                         f"{v['epoch_s']:.0f} | {v['vs_plain'] if v['vs_plain'] is not None else ''} | {mem} | "
                         f"{frac} |")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
