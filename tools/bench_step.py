"""Images/s of one CIARD training step: the trainer's step vs a plain re-implementation of the step
in the reference code's structure (fp32, separate passes, no autocast, no channels_last).

    python tools/bench_step.py                          # small_cnn and resnet18 students, batch 128
    python tools/bench_step.py --device cuda            # adds bf16 autocast + channels_last
    python tools/bench_step.py --students resnet18 --batch 128 --iters 5 --paper-teachers

One step = PGD-10 on the student, the clean and adversarial passes of the student and both
teachers, the student's backward and SGD step, and the robust teacher's CE backward and SGD step.
Both versions run the same models, data and hyper-parameters; the first ``--warmup`` steps are not
timed. Teachers: small_cnn_wide (for small_cnn) and resnet56 + wrn-16-2 (for resnet18) by default,
the paper's resnet56 + wrn-34-10 with ``--paper-teachers`` (very slow on a CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
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
                 channels_last: bool) -> None:
        from ciard_deploy.distill.methods import create_method

        if channels_last:
            for m in (student, clean, robust):
                m.to(memory_format=torch.channels_last)
        self.method = create_method("ciard", {"teacher_start_fraction": 0.0}, student,
                                    {"clean": clean, "robust": robust}, num_classes=10, eps=8 / 255,
                                    attack_steps=10, step_size=2 / 255, epochs=300, steps_per_epoch=391)
        self.opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        self.device, self.amp, self.channels_last = device, amp, channels_last

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        from ciard_deploy.distill.loop import train_step

        return train_step(self.method, self.opt, self.scaler, x, y, 100, self.device, self.amp, self.channels_last)[2]


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


def build(arch: str, device: torch.device, seed: int) -> nn.Module:
    from ciard_deploy.models import create_model

    torch.manual_seed(seed)
    return create_model(arch, 10, 3, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)).to(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--students", nargs="+", default=["small_cnn", "resnet18"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--paper-teachers", action="store_true", help="resnet56 + wrn-34-10 for every student")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    from ciard_deploy.devices import resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    variants: list[tuple[str, str, bool]] = [("ours fp32", "off", False)]
    if device.type == "cuda":
        variants += [("ours bf16+channels_last", "bf16", True), ("ours fp16+channels_last", "fp16", True)]
    else:
        variants += [("ours bf16 autocast", "bf16", False)]
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
        plain = PlainCiardStep(*(copy.deepcopy(m) for m in base))
        plain_ips = time_step(plain, x, y, device, args.warmup, args.iters)
        row = {"student": student_arch, "teachers": f"{clean_arch} + {robust_arch}", "batch": args.batch,
               "device": str(device), "plain fp32": round(plain_ips, 1)}
        for name, amp, cl in variants:
            ours = OurStep(*(copy.deepcopy(m) for m in base), device, amp, cl)
            ips = time_step(ours, x, y, device, args.warmup, args.iters)
            row[name] = round(ips, 1)
            row[f"{name} / plain"] = round(ips / plain_ips, 2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    try:
        from rich.console import Console
        from rich.table import Table

        dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        t = Table(title=f"one CIARD step, batch {args.batch}, images/s ({dev_name}, torch {torch.__version__})")
        for col in ("student", "teachers", "step", "img/s", "vs plain"):
            t.add_column(col, justify="right" if col in ("img/s", "vs plain") else "left")
        for r in rows:
            t.add_row(r["student"], r["teachers"], "plain fp32 (reference structure)", f"{r['plain fp32']:.1f}", "1.00")
            for name, _, _ in variants:
                t.add_row("", "", name, f"{r[name]:.1f}", f"{r[f'{name} / plain']:.2f}")
        Console().print(t)
    except ImportError:
        print(json.dumps(rows, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
