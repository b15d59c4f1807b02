#!/usr/bin/env python
"""Is `ciard verify`'s worst case honest? An independent attack stack on the same images says.

What it measures: for each exported artifact (ONNX FP32, FP16, INT8), the per-sample worst case
that ``ciard verify`` reports (its headline ``results.worst_case.acc``, whatever tiers produced it:
transferred pack attacks, Square live on the runtime, white-box on a twin of the artifact, ...)
against an independent per-sample worst case from an attack stack the product does not use:
torchattacks' APGD-CE, APGD-T, FAB-T (and optionally APGD-DLR) and Square, on the same pack images
at the same eps. A sample is independently robust when onnxruntime, running the artifact itself,
classifies it correctly on the clean image and on every candidate image every attack returned.

* Gradients come from an ``onnx2torch`` conversion of the artifact (after a semantics-preserving
  clean-up onnx2torch needs: ``Reshape allowzero=1`` with a zero-free constant shape becomes
  ``allowzero=0``, and the graph is moved from opset 18 to 17). Where the artifact does not
  convert (INT8 QDQ: onnx2torch has no QuantizeLinear/DequantizeLinear), the conversion of the
  FP32 graph is the gradient source. The attacked module is a BPDA pair: its forward returns the
  runtime's logits (numpy round trip through onnxruntime), its backward the surrogate's gradient
  (``z_s + (z_rt - z_s).detach()``), so torchattacks' own success checks and step-size control see
  the runtime.
* Square runs on a pure-runtime module (forward = onnxruntime, no gradients) with the reference
  budget (``--square-queries``, default 5000, p_init 0.8, margin loss, 1 restart).
* Attacks run as a cascade (AutoAttack style): each one only on the samples still robust.
  Every returned image is projected onto the eps-ball and [0, 1] and scored on the artifact's
  onnxruntime session; the broken samples' candidates are scored once more at the end.

``verify``'s number comes from the product's library (``ciard_deploy.verify.verification.run``) with
its own defaults (its live Square on all pack images; ``--verify-square-queries``,
``--verify-square-n`` and ``--verify-set NAME=VALUE`` change them). Its per-sample flags are read
generically from ``report.per_sample``: clean AND every attack's bit string there (a string as long
as the pack covers all samples; a shorter one is mapped through the ``*indices`` list of its length),
over the samples every attack covers, so new attack labels and tiers are taken into account
without a change here. Both numbers are compared on exactly those samples.

Target: verify within 1.0 pt of the independent worst case (gap = verify - independent,
positive = verify too optimistic) for FP32, FP16 and INT8. ``union`` is the worst case of both
together (the best lower bound known); ``gap_union`` is verify minus it.

Run (torchattacks and onnx2torch are tool-only, never project dependencies):

    pip install torchattacks onnx2torch
    python tools/bench_fidelity.py --out runs/fidelity            # runs the quickstart recipe there first
    python tools/bench_fidelity.py --run-dir runs/quickstart --skip-cifar --json fidelity.json
    python tools/bench_fidelity.py --run-dir runs/quickstart --cifar-root DIR   # DIR: train/<c>/*, test/<c>/*

Digits: a quickstart output (``DIR/export/*.onnx``, ``DIR/pack.npz``). ``--out DIR`` makes one with
``ciard run quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15 --out DIR --set
deploy.formats=[onnx,onnx-fp16,onnx-int8]`` (the quickstart's recipe, FP16 added, so the pack and
verify treat all three artifacts alike). ``ciard quickstart`` itself exports FP32 and INT8 only: with
``--run-dir`` of such an output the FP16 artifact is exported here from ``DIR/run`` into ``--work``
(default ``DIR/bench_fidelity``), and a pack made before it holds nothing crafted on it.

CIFAR-10 (optional; skipped with a line when the real JPEG copy
``../shared/data/cifar10-jpeg.tar.gz`` is absent, or with ``--skip-cifar``): a small image folder
is extracted from it (or ``--cifar-root``), a small_cnn is TRADES-trained for a few epochs with the
smoke recipe (``ciard train``), exported to FP32/FP16/INT8 (``ciard export``) and packed
(``ciard pack``, pgd20 at 8/255, plus white-box on each artifact where the product's ``ciard pack``
has ``--artifact``: then ``pack-artifacts.npz``); a few minutes to train and pack, then about 3
minutes per artifact for verify and the independent stack on 2 CPU cores.

``--verify-set NAME=VALUE`` passes a keyword to verify's ``run()`` (a new tier's switch, a
Square budget). To measure another revision of the product (e.g. ``git archive HEAD ciard_deploy``
unpacked in DIR), run from outside the checkout with ``PYTHONPATH=DIR``.

Exit codes: 0 every gap within ``--target``; 1 a gap above it; 2 bad usage (an existing
``--json`` without ``--force``, missing inputs); 3 torchattacks / onnx2torch / torch missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CIFAR_TAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
TARGET_PT = 1.0
#: modules the independent stack needs, and what installs them
REQUIRED = {"torch": "torch", "torchattacks": "torchattacks", "onnx2torch": "onnx2torch", "onnx": "onnx",
            "onnxruntime": "onnxruntime"}
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
DEFAULT_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
QUICKSTART = "quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15"
FORMATS = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
EPS_TOL = 1e-6


class Usage(Exception):
    """Bad input: one line, exit 2."""


# =========================================================================== pure helpers (unit-tested)
def missing_modules(required: Mapping[str, str] = REQUIRED,
                    find_spec: Callable[[str], Any] = importlib.util.find_spec) -> list[str]:
    """The pip names of the ``required`` modules that cannot be imported here."""
    missing = []
    for module, pip_name in required.items():
        try:
            found = find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(pip_name)
    return missing


def missing_line(missing: Sequence[str]) -> str:
    return (f"bench_fidelity: missing {', '.join(missing)}: pip install {' '.join(missing)} "
            "(tool-only, not a ciard-deploy dependency)")


def decode_bits(bits: str) -> np.ndarray:
    """``"1101"`` -> bool array (verify's per-sample encoding)."""
    if not isinstance(bits, str) or set(bits) - {"0", "1"}:
        raise ValueError(f"not a per-sample bit string: {str(bits)[:40]!r}")
    return np.frombuffer(bits.encode(), dtype=np.uint8) == ord("1")


def encode_bits(flags: Iterable[bool]) -> str:
    return "".join("1" if f else "0" for f in flags)


@dataclasses.dataclass
class VerifyFlags:
    """verify's per-sample worst case, rebuilt from ``report.per_sample``.

    ``flags[i]``: clean and every attack that covers sample ``i`` left it correct; ``covered[i]``:
    every attack covers it (the samples the worst case is measured on).
    """

    flags: np.ndarray
    covered: np.ndarray
    used: list[str]
    skipped: list[str]

    @property
    def acc(self) -> float | None:
        return float(self.flags[self.covered].mean()) if self.covered.any() else None


def verify_flags(per_sample: Mapping[str, Any], n: int) -> VerifyFlags:
    """Per-sample worst case from a verify report's ``per_sample`` section, for any attack labels.

    Keys: ``clean`` (n bits), any number of attack labels (bit strings), and index lists named
    ``*indices`` (``live_indices``; ``square_indices`` in schema-1 reports: the pack positions a
    subset attack covered, in order). An attack with n bits covers every sample; a shorter one is
    mapped through the one index list of its length; one that fits none is skipped (and named in
    ``skipped``).
    """
    if "clean" not in per_sample:
        raise ValueError("the report's per_sample has no 'clean' flags")
    clean = decode_bits(per_sample["clean"])
    if len(clean) != n:
        raise ValueError(f"per_sample clean has {len(clean)} flags, the pack {n} samples")
    index_lists = {k: np.asarray(v, dtype=np.int64) for k, v in per_sample.items()
                   if k.endswith("indices") and v is not None}
    flags, covered = clean.copy(), np.ones(n, dtype=bool)
    used, skipped = [], []
    for label, bits in per_sample.items():
        if label == "clean" or label.endswith("indices") or not isinstance(bits, str):
            continue
        b = decode_bits(bits)
        if len(b) == n:
            flags &= b
            used.append(label)
            continue
        fits = [idx for idx in index_lists.values() if len(idx) == len(b)]
        if not fits or any(not np.array_equal(fits[0], f) for f in fits[1:]) or \
                (len(fits[0]) and (fits[0].min() < 0 or fits[0].max() >= n)):
            skipped.append(label)
            continue
        idx = fits[0]
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        full = np.ones(n, dtype=bool)
        full[idx] = b
        flags &= full
        covered &= mask
        used.append(label)
    return VerifyFlags(flags, covered, used, skipped)


def report_coverage(results: Mapping[str, Any]) -> dict[str, Any]:
    """What verify's headline covered: its label, its attacks grouped by kind (tier)."""
    wc = results.get("worst_case") or {}
    by_kind: dict[str, list[str]] = {}
    for a in results.get("attacks") or []:
        by_kind.setdefault(str(a.get("kind", "?")), []).append(str(a.get("label", a.get("name", "?"))))
    tiers = wc.get("tiers")
    if not tiers:
        tiers = list(by_kind)
    return {"label": wc.get("label"), "acc": wc.get("acc"), "n": wc.get("n"), "attacks": wc.get("attacks"),
            "tiers": tiers, "by_kind": by_kind}


def compare(verify_acc: float | None, vf: VerifyFlags, independent: np.ndarray) -> dict[str, Any]:
    """verify's headline vs the independent per-sample flags, on the samples verify covered."""
    cov = vf.covered
    k = int(cov.sum())
    if not k:
        return {"n": 0, "independent_acc": None, "union_acc": None, "gap_pt": None, "gap_union_pt": None}
    ind = np.asarray(independent, bool)
    ind_acc = float(ind[cov].mean())
    union_acc = float((ind & vf.flags)[cov].mean())
    headline = verify_acc if verify_acc is not None else vf.acc
    return {"n": k, "verify_acc": headline, "verify_acc_from_flags": vf.acc, "independent_acc": ind_acc,
            "union_acc": union_acc,
            "gap_pt": None if headline is None else round(100 * (headline - ind_acc), 2),
            "gap_union_pt": None if headline is None else round(100 * (headline - union_acc), 2),
            "broken_only_by_independent": int((vf.flags & ~ind)[cov].sum()),
            "broken_only_by_verify": int((~vf.flags & ind)[cov].sum())}


def eps_label(eps: float | None) -> str:
    """``8/255`` where eps is a whole number of 255ths, else ``0.15``."""
    if eps is None:
        return "—"
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-4 and round(k) > 0 else f"{eps:.4g}"


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """``["square_p_init=0.5", "whitebox=true"]`` -> keyword arguments (values read as JSON, else strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise Usage(f"--verify-set {item!r}: expected NAME=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def format_table(rows: Sequence[Mapping[str, Any]], target_pt: float = TARGET_PT) -> str:
    """The people's table: one line per artifact, then what each verify headline covered."""
    head = ["dataset", "artifact", "n", "eps", "verify", "independent", "union", "gap pt", "gap∪ pt",
            "verify s", "indep. s", "within"]
    body = []
    for r in rows:
        gap = r.get("gap_pt")
        body.append([str(r.get("dataset", "")), str(r.get("artifact", "")), str(r.get("n", "")),
                     eps_label(r.get("eps")), _pct(r.get("verify_acc")), _pct(r.get("independent_acc")),
                     _pct(r.get("union_acc")), _num(gap, "+.1f"), _num(r.get("gap_union_pt"), "+.1f"),
                     _num(r.get("verify_s"), ".1f"), _num(r.get("independent_s"), ".1f"),
                     "—" if gap is None else ("yes" if abs(gap) <= target_pt else "NO")])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    left = {0, 1}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
    out.append(f"gap = verify - independent (positive: verify too optimistic); target |gap| <= {target_pt:g} pt; "
               "union = per-sample worst of both")
    for r in rows:
        cov = r.get("verify_coverage") or {}
        kinds = "; ".join(f"{k}: {', '.join(v)}" for k, v in (cov.get("by_kind") or {}).items())
        ind = ", ".join(f"{a['name']} -{a['broke']}" for a in r.get("independent_attacks") or [])
        out.append(f"  {r.get('dataset')}/{r.get('artifact')}: verify {cov.get('label') or '?'} [{kinds}]; "
                   f"independent [{ind}] grad: {(r.get('surrogate') or {}).get('source', '—')}")
        for note in r.get("notes") or []:
            out.append(f"    note: {note}")
    return "\n".join(out)


def check_json_target(path: Path | None, force: bool) -> None:
    if path is None:
        return
    if path.is_dir():
        raise Usage(f"--json {path} is a folder")
    if path.exists() and not force:
        raise Usage(f"--json {path} exists: pass --force to overwrite it")


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    from ciard_deploy.io import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, payload)


# =========================================================================== the runtime
class OrtRuntime:
    """The artifact on onnxruntime (CPU): ``runtime(images float32 NCHW) -> float32 logits``."""

    def __init__(self, path: Path, threads: int, batch: int = 1024) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.float16 if "float16" in inp.type else np.float32
        self.batch = batch
        self.queries = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        outs = [self.session.run(None, {self.input_name: np.ascontiguousarray(x[s:s + self.batch],
                                                                              dtype=self.input_dtype)})[0]
                for s in range(0, len(x), self.batch)]
        self.queries += len(x)
        return np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, 0), np.float32)


# =========================================================================== gradient source: onnx2torch
def onnx2torch_ready(model: Any) -> tuple[Any, list[str]]:
    """A copy of ``model`` that onnx2torch 1.5 converts, with the same semantics, and what changed.

    ``Reshape`` with ``allowzero=1`` and a constant shape without zeros means the same with
    ``allowzero=0`` (onnx2torch refuses the attribute); opset 18's ``ReduceMean`` takes its axes
    as an input, which onnx2torch does not convert: the version converter moves the graph to 17.
    """
    import onnx
    from onnx import numpy_helper, version_converter

    m = onnx.ModelProto()
    m.CopyFrom(model)
    changes = []
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
    for node in m.graph.node:
        if node.op_type != "Reshape":
            continue
        for a in node.attribute:
            if a.name == "allowzero" and a.i == 1:
                shape = consts.get(node.input[1]) if len(node.input) > 1 else None
                if shape is not None and not (np.asarray(shape) == 0).any():
                    a.i = 0
                    changes.append(f"Reshape {node.name or node.output[0]}: allowzero 1 -> 0 (shape has no 0)")
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset > 17:
        m = version_converter.convert_version(m, 17)
        changes.append(f"opset {opset} -> 17")
    return m, changes


def convert_onnx(path: Path) -> tuple[Any, list[str]]:
    import onnx
    import onnx2torch

    model, changes = onnx2torch_ready(onnx.load(str(path)))
    tm = onnx2torch.convert(model).eval()
    for p in tm.parameters():
        p.requires_grad_(False)
    return tm, changes


def build_surrogate(candidates: Sequence[Path], runtime: OrtRuntime, x: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """The first of ``candidates`` onnx2torch converts into a model whose gradients flow and whose
    predictions agree with the runtime on ``x``; its fidelity to the runtime is recorded."""
    import torch

    notes = []
    z_rt = runtime(x)
    for path in candidates:
        try:
            model, changes = convert_onnx(path)
            xt = torch.from_numpy(x[:64].copy()).requires_grad_()
            model(xt).float().sum().backward()
            if xt.grad is None or not torch.isfinite(xt.grad).all():
                raise RuntimeError("no finite input gradient")
            with torch.no_grad():
                z = torch.cat([model(torch.from_numpy(x[s:s + 512])).float() for s in range(0, len(x), 512)]).numpy()
        except Exception as e:  # noqa: BLE001 - any conversion failure means: try the next graph
            notes.append(f"{path.name}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            continue
        agree = float((z.argmax(1) == z_rt.argmax(1)).mean())
        info = {"source": f"onnx2torch({path.name})", "path": str(path), "graph_changes": changes,
                "clean_top1_agreement_with_runtime": round(agree, 4),
                "clean_max_abs_logit_diff": float(np.abs(z - z_rt).max()), "failed_conversions": notes}
        return model, info
    raise RuntimeError(f"no graph converts with onnx2torch: {'; '.join(notes)}")


def _torch_modules() -> tuple[type, type]:
    import torch

    class RuntimeLogits(torch.nn.Module):
        """forward = the runtime's logits (no gradient): what Square queries."""

        def __init__(self, runtime: OrtRuntime) -> None:
            super().__init__()
            self.runtime = runtime
            self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # torchattacks reads the device

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(self.runtime(x.detach().cpu().float().numpy())).to(x.device)

    class Bpda(torch.nn.Module):
        """forward = the runtime's logits, backward = the surrogate's gradient."""

        def __init__(self, runtime: OrtRuntime, surrogate: torch.nn.Module) -> None:
            super().__init__()
            self.runtime = runtime
            self.surrogate = surrogate
            self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z_s = self.surrogate(x).float()
            z_rt = torch.from_numpy(self.runtime(x.detach().cpu().float().numpy())).to(x.device)
            return z_s + (z_rt - z_s).detach()

    return RuntimeLogits, Bpda


def make_attack(name: str, bpda: Any, runtime_module: Any, eps: float, num_classes: int, args: argparse.Namespace
                ) -> tuple[Any, dict[str, Any]]:
    import torchattacks as ta

    s = args.seed
    if name in ("apgd-ce", "apgd-dlr"):
        loss = name.split("-")[1]
        return (ta.APGD(bpda, norm="Linf", eps=eps, steps=args.steps, n_restarts=args.restarts, loss=loss, seed=s),
                {"steps": args.steps, "restarts": args.restarts, "loss": loss, "gradient": "bpda"})
    if name == "apgd-t":
        return (ta.APGDT(bpda, norm="Linf", eps=eps, steps=args.steps, n_restarts=args.restarts, seed=s,
                         n_classes=num_classes),
                {"steps": args.steps, "restarts": args.restarts, "targets": num_classes - 1, "loss": "dlr-targeted",
                 "gradient": "bpda"})
    if name == "fab-t":
        return (ta.FAB(bpda, norm="Linf", eps=eps, steps=args.steps, n_restarts=args.restarts, seed=s,
                       multi_targeted=True, n_classes=num_classes),
                {"steps": args.steps, "restarts": args.restarts, "targets": num_classes - 1, "gradient": "bpda"})
    if name == "square":
        return (ta.Square(runtime_module, norm="Linf", eps=eps, n_queries=args.square_queries, n_restarts=1,
                          p_init=0.8, loss="margin", seed=s),
                {"queries": args.square_queries, "restarts": 1, "p_init": 0.8, "loss": "margin",
                 "gradient": "none (runtime scores only)"})
    raise Usage(f"unknown attack {name!r}; valid: {', '.join(ATTACKS)}")


def independent_worst_case(artifact: Path, fallbacks: Sequence[Path], x: np.ndarray, y: np.ndarray, eps: float,
                           num_classes: int, args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """The torchattacks cascade on ``artifact``, every candidate scored on its onnxruntime session."""
    import torch

    t0 = time.perf_counter()
    runtime = OrtRuntime(artifact, args.threads)
    clean_correct = runtime(x).argmax(1) == y
    surrogate, sinfo = build_surrogate([artifact, *[f for f in fallbacks if f != artifact]], runtime, x)
    RuntimeLogits, Bpda = _torch_modules()
    bpda, rt_module = Bpda(runtime, surrogate).eval(), RuntimeLogits(runtime).eval()
    broken = np.zeros(len(y), dtype=bool)
    cand = np.array(x, copy=True)
    records = []
    for name in args.attacks:
        todo = np.flatnonzero(clean_correct & ~broken)
        attack, settings = make_attack(name, bpda, rt_module, eps, num_classes, args)
        q0, ta0, broke, over = runtime.queries, time.perf_counter(), 0, 0.0
        for s in range(0, len(todo), args.batch_size):
            ids = todo[s:s + args.batch_size]
            xb = torch.from_numpy(x[ids].copy())
            xa = attack(xb, torch.from_numpy(y[ids].astype(np.int64))).detach().cpu().float().numpy()
            over = max(over, float(np.abs(xa - x[ids]).max()) - eps)
            xa = np.clip(np.clip(xa, x[ids] - eps, x[ids] + eps), 0.0, 1.0).astype(np.float32)
            fooled = runtime(xa).argmax(1) != y[ids]
            broken[ids[fooled]] = True
            cand[ids[fooled]] = xa[fooled]
            broke += int(fooled.sum())
        rec = {"name": name, "settings": settings, "attacked": int(len(todo)), "broke": broke,
               "seconds": round(time.perf_counter() - ta0, 2), "runtime_queries": runtime.queries - q0,
               "max_excess_over_eps_before_projection": round(max(over, 0.0), 6)}
        records.append(rec)
        say(f"    {name}: attacked {rec['attacked']}, broke {broke}, {rec['seconds']} s")
    # the broken samples' candidates once more, in one pass: the flags are the runtime's word
    ids = np.flatnonzero(broken)
    unconfirmed = 0
    if len(ids):
        if np.abs(cand[ids] - x[ids]).max() > eps + EPS_TOL or cand.min() < 0 or cand.max() > 1:
            raise RuntimeError("a candidate left the eps-ball or [0, 1] (a bug here)")
        still = runtime(cand[ids]).argmax(1) != y[ids]
        unconfirmed = int((~still).sum())
        broken[ids[~still]] = False
    robust = clean_correct & ~broken
    return {"clean_correct": clean_correct, "robust": robust, "clean_acc": float(clean_correct.mean()),
            "acc": float(robust.mean()), "attacks": records, "surrogate": sinfo, "unconfirmed": unconfirmed,
            "runtime_queries": runtime.queries, "seconds": round(time.perf_counter() - t0, 2)}


# =========================================================================== verify, through the product's library
def run_verify(artifact: Path, pack_path: Path, args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    from ciard_deploy.verify.verification import run as verify_run

    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"seed": args.seed, "threads": args.threads}
    if args.verify_square_queries is not None:
        kwargs["square_queries"] = args.verify_square_queries
    if args.verify_square_n is not None:
        kwargs["square_n"] = args.verify_square_n
    kwargs.update(args.verify_set)
    report = verify_run(str(artifact), str(pack_path), **kwargs)
    seconds = time.perf_counter() - t0
    d = report.to_dict() if hasattr(report, "to_dict") else dataclasses.asdict(report)
    return d, seconds


def measure(dataset: str, fmt: str, artifact: Path, fallbacks: Sequence[Path], pack_path: Path,
            args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    from ciard_deploy.verify.pack_load import load_pack

    pack = load_pack(pack_path)
    x, y = np.ascontiguousarray(pack.x, dtype=np.float32), np.asarray(pack.y, dtype=np.int64)
    say(f"{dataset}/{fmt}: {artifact} (n={pack.n}, eps={pack.eps:.4g})")
    report, verify_s = run_verify(artifact, pack_path, args)
    cov = report_coverage(report.get("results") or {})
    vf = verify_flags(report.get("per_sample") or {}, pack.n)
    say(f"    verify: {_pct(cov['acc'])} ({cov['label']}) in {verify_s:.1f} s")
    ind = independent_worst_case(artifact, fallbacks, x, y, float(pack.eps), pack.num_classes, args, say)
    row: dict[str, Any] = {"dataset": dataset, "artifact": artifact.name, "format": fmt, "path": str(artifact),
                           "pack": str(pack_path), "eps": float(pack.eps), "pack_n": pack.n}
    row.update(compare(cov["acc"], vf, ind["robust"]))
    notes = []
    if vf.acc is not None and cov["acc"] is not None and abs(vf.acc - cov["acc"]) > 1e-9:
        notes.append(f"verify's headline {cov['acc']:.4f} differs from its per-sample flags' {vf.acc:.4f}")
    if vf.skipped:
        notes.append(f"per-sample labels not mapped to pack samples (left out): {', '.join(vf.skipped)}")
    v_clean = decode_bits(report["per_sample"]["clean"])
    if not np.array_equal(v_clean, ind["clean_correct"]):
        notes.append(f"clean flags differ between verify and this session on "
                     f"{int((v_clean != ind['clean_correct']).sum())} samples")
    if ind["unconfirmed"]:
        notes.append(f"{ind['unconfirmed']} candidates did not fool the runtime when scored again (not counted)")
    row.update({"verify_s": round(verify_s, 2), "independent_s": ind["seconds"], "verify_coverage": cov,
                "verify_labels_used": vf.used, "verify_settings": report.get("settings"),
                "verify_clean_acc": (report.get("results") or {}).get("clean_acc"),
                "independent_clean_acc": ind["clean_acc"], "independent_acc_all": ind["acc"],
                "independent_attacks": ind["attacks"], "surrogate": ind["surrogate"],
                "independent_runtime_queries": ind["runtime_queries"], "notes": notes,
                "per_sample": {"verify": encode_bits(vf.flags), "verify_covered": encode_bits(vf.covered),
                               "independent": encode_bits(ind["robust"])}})
    say(f"    independent: {_pct(row['independent_acc'])} (gap {_num(row['gap_pt'], '+.1f')} pt) "
        f"in {ind['seconds']:.1f} s")
    return row


# =========================================================================== inputs
def ciard(*argv: object, threads: int, say: Callable[[str], None], ok: Sequence[int] = (0,)) -> int:
    cmd = [sys.executable, "-m", "ciard_deploy", *map(str, argv)]
    say("  $ ciard " + " ".join(map(str, argv)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode not in ok:
        raise RuntimeError(f"ciard {argv[0]} exited {proc.returncode}:\n{proc.stdout[-3000:]}")
    return proc.returncode


def _recipe(name: str) -> str:
    """``name`` where the product finds it (its recipes, or ``CIARD_RECIPES``), else this checkout's file."""
    from ciard_deploy.config import find_recipe

    try:
        find_recipe(name)
        return name
    except Exception:  # noqa: BLE001 - not found there: this checkout's recipes/ folder
        return str(REPO / "recipes" / f"{name}.yaml")


def _help(verb: str, threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.run([sys.executable, "-m", "ciard_deploy", verb, "--help"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True).stdout


def digits_inputs(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[dict[str, Path], Path, Path]:
    """``({format: artifact}, pack, fp32 artifact)`` of a quickstart output (made first with ``--out``)."""
    run_dir = args.run_dir or args.out
    if args.run_dir is None and not (run_dir / "pack.npz").exists():
        say(f"digits: running the quickstart recipe with FP16 added into {run_dir} (a couple of minutes)")
        ciard("run", _recipe(QUICKSTART), "--out", run_dir, "--set", "deploy.formats=[onnx,onnx-fp16,onnx-int8]",
              "--quiet", "--threads", args.threads, threads=args.threads, say=say, ok=(0, 1))
    export, pack = run_dir / "export", run_dir / "pack.npz"
    if not pack.exists() or not (export / FORMATS["fp32"]).exists():
        raise Usage(f"{run_dir} is not a quickstart output: it needs export/{FORMATS['fp32']} and pack.npz")
    work = args.work or run_dir / "bench_fidelity"
    arts = {}
    for fmt in args.formats:
        p = export / FORMATS[fmt]
        if not p.exists() and fmt == "fp16":
            p = work / "export-fp16" / FORMATS["fp16"]
            if not p.exists():
                say(f"digits: exporting FP16 from {run_dir / 'run'} into {p.parent}")
                from ciard_deploy.verify.pack_load import load_pack

                ciard("export", run_dir / "run", "--out", p.parent, "--fp16", "--n", load_pack(pack).n,
                      threads=args.threads, say=say, ok=(0, 1))
        if p.exists():
            arts[fmt] = p
        else:
            say(f"digits: no {fmt} artifact ({p}): skipped")
    return arts, pack, export / FORMATS["fp32"]


def extract_cifar(tar_path: Path, out: Path, per_class: Mapping[str, int]) -> Path:
    """A small train/test image folder from the CIFAR-10 JPEG tarball (first images of each class)."""
    from ciard_deploy.data.folders import folder_from_tar

    if (out / ".complete").exists():
        return out
    folder_from_tar(tar_path, out, dict(per_class), num_classes=10)
    counts = {f"{split.name}/{cls.name}": len(list(cls.iterdir()))
              for split in sorted(out.iterdir()) if split.is_dir() for cls in sorted(split.iterdir())}
    (out / ".complete").write_text(json.dumps(counts))
    return out


def cifar_inputs(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[dict[str, Path], Path, Path] | None:
    work = (args.work or (args.run_dir or args.out) / "bench_fidelity") / "cifar10"
    if args.cifar_root is not None:
        root = args.cifar_root
        if not (root / "train").is_dir() or not (root / "test").is_dir():
            raise Usage(f"--cifar-root {root} needs train/<class>/* and test/<class>/*")
    elif CIFAR_TAR.exists():
        if not (work / "data" / ".complete").exists():
            say(f"cifar10: extracting {args.cifar_train_per_class}+{args.cifar_test_per_class} images per class "
                f"from {CIFAR_TAR}")
        root = extract_cifar(CIFAR_TAR, work / "data", {"train": args.cifar_train_per_class,
                                                         "test": args.cifar_test_per_class})
    else:
        say(f"cifar10: skipped (no --cifar-root and no real CIFAR-10 copy at {CIFAR_TAR})")
        return None
    run, export = work / "run", work / "export"
    n_train = sum(1 for _ in (root / "train").glob("*/*"))
    if not (run / "student_best.safetensors").exists():
        say(f"cifar10: training a small_cnn (TRADES, {args.cifar_epochs} epochs, {n_train} images)")
        ciard("train", _recipe("smoke/cifar10_trades_small_cnn_wide_linf8_smoke"), "--out", run, "--quiet",
              "--set", f"data.data_root={root}", "--set", "model.arch=small_cnn",
              "--set", f"data.train_subset={n_train}", "--set", f"data.holdout={min(200, n_train // 10)}",
              "--set", f"train.epochs={args.cifar_epochs}", "--set", f"train.eval_every={args.cifar_epochs}",
              "--set", "train.eval_n=200", "--set", "train.final_attacks=[]", "--set", "train.device=cpu",
              threads=args.threads, say=say)
    want = [f"--{f}" for f in args.formats if f != "fp32"]  # FP32 always: the others derive from it
    if not all((export / FORMATS[f]).exists() for f in args.formats):
        ciard("export", run, "--out", export, "--onnx", *want, "--data-root", root, "--n", args.cifar_n,
              "--calib-n", "256", "--force", threads=args.threads, say=say, ok=(0, 1))
    arts = {f: export / FORMATS[f] for f in args.formats if (export / FORMATS[f]).exists()}
    # a product whose pack attacks each exported file white-box (`ciard pack --artifact`) gets them all
    white_box = "--artifact" in _help("pack", args.threads)
    pack = work / ("pack-artifacts.npz" if white_box else "pack.npz")
    if not pack.exists():
        extra = [a for p in arts.values() for a in ("--artifact", p)] if white_box else []
        ciard("pack", run, "--out", pack, "--n", args.cifar_n, "--attacks", args.cifar_pack_attacks, "--eps", "8/255",
              "--data-root", root, "--device", "cpu", "--quiet", *extra, threads=args.threads, say=say)
    return arts, pack, export / FORMATS["fp32"]


# =========================================================================== CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run-dir", type=Path, help="an existing `ciard quickstart` output (export/*.onnx, pack.npz)")
    src.add_argument("--out", type=Path, help="run the quickstart recipe with FP16 added there first "
                                               "(`ciard run`; reused when already there)")
    p.add_argument("--work", type=Path, help="where the FP16 export and the CIFAR part go (default RUN/bench_fidelity)")
    p.add_argument("--formats", default="fp32,fp16,int8", help="artifacts to check: fp32,fp16,int8")
    p.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS), help=f"independent cascade, from {ATTACKS}")
    p.add_argument("--steps", type=int, default=100, help="APGD / APGD-T / FAB iterations")
    p.add_argument("--restarts", type=int, default=1, help="APGD / APGD-T / FAB restarts")
    p.add_argument("--square-queries", type=int, default=5000, help="torchattacks Square queries per image")
    p.add_argument("--batch-size", type=int, default=500, help="images per attack call")
    p.add_argument("--verify-square-queries", type=int, default=None,
                   help="verify's Square budget (default: the product's own default)")
    p.add_argument("--verify-square-n", type=int, default=None,
                   help="verify's Square subset (default: the product's, i.e. all pack images)")
    p.add_argument("--verify-set", action="append", default=[], metavar="NAME=VALUE",
                   help="extra keyword for verify's run() (repeatable; value read as JSON), e.g. a new tier's switch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    p.add_argument("--skip-cifar", action="store_true", help="digits only")
    p.add_argument("--skip-digits", action="store_true", help="CIFAR-10 only (then --work names its folder)")
    p.add_argument("--cifar-root", type=Path, help="a CIFAR-10 image folder (train/<class>/*, test/<class>/*)")
    p.add_argument("--cifar-train-per-class", type=int, default=200)
    p.add_argument("--cifar-test-per-class", type=int, default=30)
    p.add_argument("--cifar-epochs", type=int, default=4)
    p.add_argument("--cifar-n", type=int, default=200, help="CIFAR pack images")
    p.add_argument("--cifar-pack-attacks", default="pgd20",
                   help="the CIFAR pack's transferred attacks (plus white-box on each artifact where `ciard pack` "
                        "has --artifact)")
    p.add_argument("--target", type=float, default=TARGET_PT, help="allowed |gap| in points")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    a.formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    a.attacks = [s.strip() for s in a.attacks.split(",") if s.strip()]
    a.verify_set = parse_settings(a.verify_set)
    if bad := [f for f in a.formats if f not in FORMATS]:
        raise Usage(f"--formats: unknown {', '.join(bad)}; valid: {', '.join(FORMATS)}")
    if bad := [s for s in a.attacks if s not in ATTACKS]:
        raise Usage(f"--attacks: unknown {', '.join(bad)}; valid: {', '.join(ATTACKS)}")
    if a.skip_digits and a.skip_cifar:
        raise Usage("--skip-digits and --skip-cifar leave nothing to measure")
    if a.run_dir is None and a.out is None and not (a.skip_digits and a.work is not None):
        raise Usage("give --run-dir (a quickstart output) or --out (where to run quickstart); "
                    "with --skip-digits, --work is enough")
    if min(a.steps, a.restarts, a.square_queries, a.batch_size, a.threads) < 1:
        raise Usage("--steps, --restarts, --square-queries, --batch-size and --threads must be >= 1")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        check_json_target(args.json, args.force)
        if args.run_dir is not None and not args.run_dir.is_dir() and not args.skip_digits:
            raise Usage(f"--run-dir {args.run_dir} is not a folder")
    except Usage as e:
        print(f"bench_fidelity: {e}", file=sys.stderr)
        return 2
    if missing := missing_modules():
        print(missing_line(missing), file=sys.stderr)
        return 3
    import logging

    import torch

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    rows, skipped = [], []
    try:
        sets = [] if args.skip_digits else [("digits", digits_inputs(args, say))]
        if args.skip_cifar:
            skipped.append("cifar10: --skip-cifar")
        else:
            c = cifar_inputs(args, say)
            if c is None:
                skipped.append(f"cifar10: no --cifar-root and no {CIFAR_TAR}")
            else:
                sets.append(("cifar10", c))
        for dataset, (arts, pack, fp32) in sets:
            for fmt, path in arts.items():
                rows.append(measure(dataset, fmt, path, [path.parent / FORMATS["fp32"], fp32], pack, args, say))
    except Usage as e:
        print(f"bench_fidelity: {e}", file=sys.stderr)
        return 2
    print(format_table(rows, args.target))
    for s in skipped:
        print(f"skipped {s}")
    if args.json is not None:
        write_json(args.json, {"kind": "ciard.bench_fidelity", "target_pt": args.target,
                               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "rows": rows, "skipped": skipped, "seconds": round(time.perf_counter() - t0, 1),
                               "versions": _versions()})
        print(f"wrote {args.json}")
    gaps = [r["gap_pt"] for r in rows if r.get("gap_pt") is not None]
    return 0 if gaps and all(abs(g) <= args.target for g in gaps) else 1


def _versions() -> dict[str, str]:
    from ciard_deploy.io import library_versions

    return library_versions(extra=("torchattacks", "onnx2torch"))


if __name__ == "__main__":
    sys.exit(main())
