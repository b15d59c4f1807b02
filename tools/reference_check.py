"""Golden numbers of every training method's step: a short deterministic run per method, in float64.

    python tools/reference_check.py                       # the table, and reference_check.json here
    python tools/reference_check.py --json out.json       # the JSON elsewhere
    python tools/reference_check.py --check               # compare with the goldens in tests/ (exit 1 if off)
    python tools/reference_check.py --write-golden        # rewrite the goldens (after an intended change)

Each case runs 3 student steps of one method (``distill.methods``) as the trainer does (``on_epoch_start``,
``train_step``, ``backward``, SGD step, ``after_student_step``), one step per epoch of a 3-epoch run, so
epoch-indexed behaviour shows in 3 steps: MTARD's milestone shrinks (epochs 2 and 3 of 3, 1-based),
CIARD's robust-teacher steps (its lr is 0 in the last epoch). Everything is fixed: tiny 2-layer
convnets with BatchNorm built here (student and teachers from fixed seeds), one batch of 8 images
3x8x8 drawn from a fixed seed (labels 0..4 of 5 classes), the attack's random start from a seed set
before each step, eps 8/255, 3 attack steps of 2/255, student SGD lr 0.1, momentum 0.9, wd 2e-4.

Per step it records the loss and its terms, the sum of the adversarial batch, and a checksum of the
student (sum and sum of squares of its parameters, sum of its BatchNorm buffers); CIARD adds its
robust teacher's checksum. Values are rounded to 12 significant digits; the test
(tests/unit/distill/test_reference_values.py) recomputes them and compares at relative 1e-9, so a
change to any method's arithmetic fails it.

Cases: each method with the engine's defaults (``<method>``) and, where the CIFAR-10 paper recipe's
``method:`` section differs from them, with that section (``<method>@paper``): the goldens pin the
authors' behaviour that the paper recipes select (the TRADES script's third clean forward, the ARD
script's train-mode attack, MTARD's step order and shrink timing), read from the recipes themselves.
The expected effects, from the scripts' documented behaviour: the TRADES third forward leaves the
first step's loss and parameters unchanged and moves only the BatchNorm buffers, so the steps
after differ; ARD's train-mode attack moves BatchNorm during the attack, so the first step differs;
MTARD's clean-after-attack order changes the attack from the first step (the engine's order lets the
clean forward move BatchNorm's running statistics before the eval-mode attack; the script's attack
sees the previous step's), and its end-of-epoch shrink keeps the second step's weight step unshrunk.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ciard_deploy.config import load_recipe
from ciard_deploy.distill.methods import create_method, make_config

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "unit" / "distill" / "reference_values.json"
PAPER_RECIPES = {  # the CIFAR-10 paper recipe whose method section is each method's paper setting
    "pgd_at": "recipes/cifar10/cifar10_pgd_at_none_to_resnet18_linf8.yaml",
    "trades": "recipes/cifar10/cifar10_trades_none_to_resnet18_linf8.yaml",
    "ard": "recipes/cifar10/cifar10_ard_wrn-34-10_to_resnet18_linf8.yaml",
    "rslad": "recipes/cifar10/cifar10_rslad_wrn-34-10_to_resnet18_linf8.yaml",
    "mtard": "recipes/cifar10/cifar10_mtard_wrn-34-10_to_resnet18_linf8.yaml",
    "ciard": "recipes/cifar10/cifar10_ciard_wrn-34-10_to_resnet18_linf8.yaml",
}
METHOD_NAMES = ("natural", "pgd_at", "trades", "ard", "rslad", "mtard", "ciard")
NUM_CLASSES, STEPS, EPOCHS = 5, 3, 3
BUDGET = {"eps": 8 / 255, "attack_steps": 3, "step_size": 2 / 255}
SIG_DIGITS = 12
REL_TOL = 1e-9
#: the step metrics recorded (by prefix): loss terms, adaptive weights and temperatures, their step sizes, CIARD's
#: push weight and robust-teacher lr
RECORDED = ("loss_", "w_", "tau_", "temp_lr", "weight_lr", "push_weight", "teacher_lr")


class TinyNet(nn.Module):
    """conv(3->w, 3x3)-BN-ReLU, conv(w->2w, 3x3, stride 2)-BN-ReLU, global average pool, linear."""

    def __init__(self, width: int = 4, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def tiny_net(seed: int, width: int) -> nn.Module:
    torch.manual_seed(seed)
    return TinyNet(width).double()


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(20250)
    return torch.rand(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.arange(8) % NUM_CLASSES


def rounded(v: float) -> float:
    return float(f"{float(v):.{SIG_DIGITS - 1}e}")


def checksum(net: nn.Module, prefix: str) -> dict[str, float]:
    """Sum and sum of squares of the parameters, sum of the floating-point buffers (BatchNorm statistics)."""
    with torch.no_grad():
        params = [p.double() for p in net.parameters()]
        buffers = [b.double() for b in net.buffers() if b.is_floating_point()]
        return {f"{prefix}_sum": rounded(sum(p.sum() for p in params)),
                f"{prefix}_sumsq": rounded(sum((p * p).sum() for p in params)),
                f"{prefix}_buffers_sum": rounded(sum(b.sum() for b in buffers))}


def paper_params(method: str) -> dict[str, Any]:
    """The method section of the CIFAR-10 paper recipe (defaults filled in, the name left out)."""
    return dict(load_recipe(ROOT / PAPER_RECIPES[method]).method.params)


def cases() -> dict[str, tuple[str, dict[str, Any]]]:
    """Case name -> (method, params): the engine default, and the paper setting where it differs."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for m in METHOD_NAMES:
        out[m] = (m, {})
        if m in PAPER_RECIPES:
            params = paper_params(m)
            if make_config(m, params) != make_config(m, None):
                out[f"{m}@paper"] = (m, params)
    return out


def run_case(method_name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Three student steps of ``method_name`` with ``params``; the per-step record."""
    student = tiny_net(1, 4)
    teachers = {"clean": tiny_net(2, 6), "robust": tiny_net(3, 6)}
    method = create_method(method_name, params, student, teachers, num_classes=NUM_CLASSES, epochs=EPOCHS,
                           steps_per_epoch=1, **BUDGET)
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    x, y = fixed_batch()
    steps = []
    for epoch in range(STEPS):
        method.on_epoch_start(epoch)
        torch.manual_seed(1000 + epoch)  # the attack's random start
        opt.zero_grad(set_to_none=True)
        res = method.train_step(x, y, epoch)
        res.loss.backward()
        opt.step()
        metrics = {**res.metrics, **method.after_student_step()}
        rec = {"loss": rounded(res.loss.item())}
        rec.update({k: rounded(v) for k, v in sorted(metrics.items()) if k.startswith(RECORDED)})
        rec["x_adv_sum"] = rounded(res.x_adv.sum().item()) if res.x_adv is not None else 0.0
        rec.update(checksum(student, "student"))
        if "robust" in method.trainable_teachers():
            rec.update(checksum(teachers["robust"], "robust_teacher"))
        steps.append(rec)
    return {"method": method_name, "params": params, "steps": steps}


def compute_all() -> dict[str, Any]:
    return {"settings": {"dtype": "float64", "batch": "8 x 3x8x8, torch.rand seed 20250", "num_classes": NUM_CLASSES,
                         "steps": STEPS, "epochs": EPOCHS, **BUDGET, "student_sgd": "lr 0.1 momentum 0.9 wd 2e-4",
                         "sig_digits": SIG_DIGITS},
            "cases": {name: run_case(m, p) for name, (m, p) in cases().items()}}


def differences(got: dict[str, Any], want: dict[str, Any], rel: float = REL_TOL) -> list[str]:
    """Every value of ``want`` that ``got`` lacks or does not match to ``rel`` (relative; 1e-12 absolute near 0)."""
    out = []
    if set(got["cases"]) != set(want["cases"]):
        out.append(f"cases: got {sorted(got['cases'])}, golden {sorted(want['cases'])}")
    for name in sorted(set(got["cases"]) & set(want["cases"])):
        g, w = got["cases"][name], want["cases"][name]
        if g["params"] != w["params"]:
            out.append(f"{name}: params {g['params']} != golden {w['params']}")
        if len(g["steps"]) != len(w["steps"]):
            out.append(f"{name}: {len(g['steps'])} steps, golden {len(w['steps'])}")
        for i, (gs, ws) in enumerate(zip(g["steps"], w["steps"])):
            for k in sorted(set(gs) | set(ws)):
                a, b = gs.get(k), ws.get(k)
                if a is None or b is None or not math.isclose(a, b, rel_tol=rel, abs_tol=1e-12):
                    out.append(f"{name} step {i + 1} {k}: {a} != golden {b}")
    return out


def to_json(result: dict[str, Any]) -> str:
    """The values as JSON, one line per step (the golden file stays short enough to review)."""
    cases = ",\n".join(f' {json.dumps(name)}: {{"method": {json.dumps(c["method"])}, "params": {json.dumps(c["params"])}, '
                       f'"steps": [\n' + ",\n".join(f"  {json.dumps(step)}" for step in c["steps"]) + "]}"
                       for name, c in result["cases"].items())
    return f'{{"settings": {json.dumps(result["settings"])},\n"cases": {{\n{cases}}}}}\n'


def table(result: dict[str, Any]) -> str:
    lines = [f"{'case':<14} {'step':>4} {'loss':>20} {'x_adv_sum':>20} {'student_sum':>20} {'student_sumsq':>20} "
             f"{'student_buffers':>20}"]
    for name, case in result["cases"].items():
        for i, s in enumerate(case["steps"]):
            lines.append(f"{name:<14} {i + 1:>4} {s['loss']:>20.12g} {s['x_adv_sum']:>20.12g} {s['student_sum']:>20.12g} "
                         f"{s['student_sumsq']:>20.12g} {s['student_buffers_sum']:>20.12g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("reference_check.json"), help="where to write the values")
    ap.add_argument("--check", action="store_true", help=f"compare with {GOLDEN.relative_to(ROOT)}")
    ap.add_argument("--write-golden", action="store_true", help=f"rewrite {GOLDEN.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    result = compute_all()
    print(table(result))
    target = GOLDEN if args.write_golden else args.json
    target.write_text(to_json(result))
    print(f"wrote {target}")
    if args.check:
        diffs = differences(result, json.loads(GOLDEN.read_text()))
        print("\n".join(diffs) if diffs else "all values match the goldens")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
