#!/usr/bin/env python
"""The device install, checked for real: a plain `pip install` of the built wheel into a fresh venv.

    python tools/check_device_install.py                      # makes its own chain with `ciard run` (~1 min)
    python tools/check_device_install.py --chain runs/quickstart --json device.json
    python tools/check_device_install.py --work /tmp/dev --keep   # keep the venv to look around

Run it from the development environment (torch installed: it builds the chain to verify) on a machine
that reaches PyPI. It

1. builds the wheel (`pip wheel --no-deps`) from a copy of the source tree (nothing is written in the
   checkout);
2. creates a fresh venv and runs a plain `pip install WHEEL` there: the base dependencies only, from
   PyPI, with what they need; then `pip check`, and `import torch` must fail;
3. measures the venv's site-packages (`du`), with pip's own share apart, and counts its distributions;
4. in the development environment, makes a chain to verify: `ciard run` of a shipped quick digits recipe
   (export/ + pack.npz + verify/ reports), unless `--chain DIR` names one `ciard run` or
   `ciard quickstart` made;
5. in the device venv: `ciard --help`, `ciard verify --help`, `ciard doctor` (torch reported missing),
   `ciard attacks`, `ciard inspect EXPORT_DIR`, and `ciard verify` of every ONNX file in the manifest with
   the chain's pack, the live attacks of the chain's own report and a `--min-clean` gate: exit 0, the JSON,
   JUnit and Markdown reports written, onnxruntime as backend, no torch among the versions; its clean and
   worst-case accuracies are printed beside the ones the chain's report measured with torch installed;
   `ciard verify EXPORT_DIR` must not print a traceback, and `ciard verify CHAIN` (a run folder) must
   judge it (exit 0 or 1);
6. every verb that needs torch (distill, train, eval, export, pack, run, quickstart) must exit 3 with
   exactly one line on stderr, `error: ciard VERB needs PyTorch ... pip install 'ciard-deploy[train]'`,
   no traceback, and write nothing.

Prints one line per check and a summary; exits 1 if a check failed. `--json` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SOURCE = ("pyproject.toml", "README.md", "MANIFEST.in", "ciard_deploy", "recipes")
#: the chain made when --chain is not given: no teachers to train, a robust student (so the worst case
#: is not a trivial 0 %), export FP32 + INT8, a pack with white-box attacks on both, verify
CHAIN_RECIPE = "quick/digits_pgd_at_none_to_tiny_cnn_linf0.15"
#: every verb that needs PyTorch, with arguments that would otherwise get past parsing
TORCH_VERBS = {
    "distill": ["distill", "quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15", "--out", "{out}"],
    "train": ["train", "quick/digits_natural_none_to_tiny_cnn", "--out", "{out}"],
    "eval": ["eval", "{chain}/run", "--attacks", "fgsm", "--n", "10"],
    "export": ["export", "{chain}/run", "--out", "{out}", "--onnx"],
    "pack": ["pack", "{chain}/run", "--out", "{out}.npz", "--n", "10", "--attacks", "fgsm"],
    "run": ["run", "quick/digits_natural_none_to_tiny_cnn", "--out", "{out}"],
    "quickstart": ["quickstart", "--out", "{out}"],
}


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}", flush=True)
        if not ok:
            self.failed.append(what)
        return ok


def run(cmd: list[Any], **kw: Any) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run([str(c) for c in cmd], **kw)


def du_mb(path: Path) -> float:
    out = run(["du", "-sk", path]).stdout.split()
    return int(out[0]) / 1024 if out else float("nan")


def build_wheel(work: Path) -> Path:
    src = work / "src"
    src.mkdir()
    for name in SOURCE:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        elif p.is_file():
            shutil.copy2(p, src / name)
    try:  # the backend installed here: no download; else pip fetches setuptools for an isolated build
        import setuptools.build_meta  # noqa: F401

        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    proc = run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", *isolation, "-w", work / "dist",
                "--disable-pip-version-check", "-q"])
    if proc.returncode != 0:
        raise SystemExit(f"building the wheel failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    (wheel,) = (work / "dist").glob("ciard_deploy-*.whl")
    return wheel


def make_chain(work: Path) -> Path:
    chain = work / "chain"
    ciard = shutil.which("ciard") or "ciard"
    t0 = time.perf_counter()
    proc = run([ciard, "run", CHAIN_RECIPE, "--out", chain, "--threads", "1", "--quiet"])
    print(f"     chain: ciard run {CHAIN_RECIPE} (dev environment) exit {proc.returncode} "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    if proc.returncode not in (0, 1) or not (chain / "export" / "manifest.json").is_file():
        raise SystemExit(f"making the chain failed:\n{proc.stderr[-3000:]}")
    return chain


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chain", type=Path, help="A folder `ciard run`/`ciard quickstart` made (export/, pack.npz, "
                                               f"verify/); default: make one with `ciard run {CHAIN_RECIPE}`.")
    ap.add_argument("--work", type=Path, help="Work folder (new or empty; default: a temporary one).")
    ap.add_argument("--keep", action="store_true", help="Keep the work folder (the venv, the wheel, the reports).")
    ap.add_argument("--json", type=Path, help="Write the measured numbers as JSON.")
    args = ap.parse_args(argv)

    if args.work is not None:
        if args.work.exists() and any(args.work.iterdir()):
            ap.error(f"--work {args.work} is not empty")
        args.work.mkdir(parents=True, exist_ok=True)
        work = args.work.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="ciard-device-"))
    c = Checks()
    rec: dict[str, Any] = {"work": str(work)}
    try:
        t0 = time.perf_counter()
        wheel = build_wheel(work)
        rec["wheel"] = {"name": wheel.name, "kib": round(wheel.stat().st_size / 1024, 1)}
        c.check(True, "wheel built", f"{wheel.name} ({rec['wheel']['kib']} KiB)")

        venv = work / "device"
        proc = run([sys.executable, "-m", "venv", venv])
        if proc.returncode != 0:
            raise SystemExit(f"python -m venv failed: {proc.stderr[-2000:]}")
        py = venv / "bin" / "python"
        ciard = venv / "bin" / "ciard"
        t1 = time.perf_counter()
        proc = run([py, "-m", "pip", "install", "--disable-pip-version-check", wheel])
        rec["install_seconds"] = round(time.perf_counter() - t1, 1)
        if not c.check(proc.returncode == 0, f"pip install {wheel.name} (plain, from PyPI)",
                       f"{rec['install_seconds']} s" if proc.returncode == 0 else proc.stderr[-2000:]):
            return 1
        proc = run([py, "-m", "pip", "check", "--disable-pip-version-check"])
        rec["pip_check"] = (proc.stdout + proc.stderr).strip()
        c.check(proc.returncode == 0, "pip check", rec["pip_check"])
        proc = run([py, "-c", "import torch"])
        c.check(proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, "import torch fails there",
                (proc.stderr.strip().splitlines() or ["imported!"])[-1])
        site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
        freeze = run([py, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"])
        dists = sorted(f"{d['name']}=={d['version']}" for d in json.loads(freeze.stdout))
        tooling = [p for g in ("pip", "pip-*", "setuptools", "setuptools-*", "pkg_resources", "_distutils_hack")
                   for p in site.glob(g)]  # what `python -m venv` puts in every venv
        pip_mb = sum(du_mb(p) for p in tooling)
        rec["size"] = {"site_packages_mb": round(du_mb(site), 1), "venv_tooling_mb": round(pip_mb, 1),
                       "venv_mb": round(du_mb(venv), 1), "distributions": len(dists)}
        rec["distributions"] = dists
        s = rec["size"]
        s["without_tooling_mb"] = round(s["site_packages_mb"] - s["venv_tooling_mb"], 1)
        s["largest_mb"] = dict(sorted(((p.name, round(du_mb(p), 1)) for p in site.iterdir() if p.is_dir()),
                                      key=lambda kv: -kv[1])[:5])
        c.check(True, "device install size",
                f"{s['site_packages_mb']:.0f} MB site-packages, {s['without_tooling_mb']:.0f} MB without the venv's "
                f"own pip/setuptools, {s['distributions']} distributions; largest (MB): {s['largest_mb']}")
        print("     " + ", ".join(dists), flush=True)

        chain = args.chain.resolve() if args.chain is not None else make_chain(work)
        export = chain / "export"
        pack = chain / "pack.npz"
        for label, cmd in (("ciard --help", ["--help"]), ("ciard verify --help", ["verify", "--help"]),
                           ("ciard attacks", ["attacks"]), ("ciard inspect EXPORT_DIR", ["inspect", export])):
            proc = run([ciard, *cmd], env={**os.environ, "COLUMNS": "120"})
            c.check(proc.returncode == 0 and "Traceback" not in proc.stderr, label,
                    f"exit {proc.returncode}" + (f" {proc.stderr.strip()[-300:]}" if proc.returncode else ""))
        proc = run([ciard, "doctor", "--json", work / "doctor.json"])
        doctor = json.loads((work / "doctor.json").read_text()) if (work / "doctor.json").is_file() else {}
        c.check(proc.returncode == 0 and "unavailable" in doctor.get("torch", {}), "ciard doctor reports torch missing",
                str(doctor.get("torch")))

        manifest = json.loads((export / "manifest.json").read_text())
        onnx_files = [a["file"] for a in manifest.get("artifacts", []) if str(a.get("file", "")).endswith(".onnx")]
        rec["verify"] = {}
        reports = work / "reports"
        reports.mkdir()
        for name in onnx_files:
            entry = next(a for a in manifest["artifacts"] if a["file"] == name)
            dev_report_path = chain / "verify" / f"{entry.get('name', Path(name).stem)}.json"  # as `ciard run` names it
            dev = json.loads(dev_report_path.read_text()) if dev_report_path.is_file() else None
            settings = dev["settings"] if dev else {"live_attacks": ["square1000"], "live_n": 200, "seed": 0}
            stem = reports / Path(name).stem
            live = ",".join(settings["live_attacks"]) or "none"
            cmd = [ciard, "verify", export / name, "--pack", pack, "--live", live,
                   "--seed", settings.get("seed", 0), "--threads", "1", "--min-clean", "0.5", "--quiet",
                   "--json", f"{stem}.json", "--junit", f"{stem}.xml", "--markdown", f"{stem}.md"]
            if settings.get("live_n"):
                cmd += ["--live-n", settings["live_n"]]
            t2 = time.perf_counter()
            proc = run(cmd)
            secs = round(time.perf_counter() - t2, 1)
            rep = json.loads(Path(f"{stem}.json").read_text()) if Path(f"{stem}.json").is_file() else {}
            res = rep.get("results", {})
            row = {"exit": proc.returncode, "seconds": secs, "status": rep.get("status"),
                   "clean_acc": res.get("clean_acc"), "worst_case": (res.get("worst_case") or {}).get("acc"),
                   "backend": rep.get("artifact", {}).get("backend"),
                   "torch_in_versions": "torch" in rep.get("versions", {}),
                   "reports": all(Path(f"{stem}{ext}").is_file() for ext in (".json", ".xml", ".md"))}
            if dev:
                row["with_torch"] = {"clean_acc": dev["results"].get("clean_acc"),
                                     "worst_case": (dev["results"].get("worst_case") or {}).get("acc")}
            rec["verify"][name] = row
            ok = (proc.returncode == 0 and row["reports"] and row["backend"] == "onnxruntime"
                  and not row["torch_in_versions"] and "Traceback" not in proc.stderr)
            same = "" if not dev else (" (same as with torch)" if row["with_torch"] == {k: row[k] for k in
                                       ("clean_acc", "worst_case")} else f" (with torch: {row['with_torch']})")
            c.check(ok, f"ciard verify {name}",
                    f"exit {proc.returncode}, {row['status']}, clean {row['clean_acc']}, worst case "
                    f"{row['worst_case']}{same}, {secs} s" + (f"\n{proc.stderr[-2000:]}" if not ok else ""))

        proc = run([ciard, "verify", export, "--pack", pack, "--quiet"])
        first = (proc.stderr.strip().splitlines() or [""])[0]
        rec["verify_export_dir"] = {"exit": proc.returncode, "stderr_first_line": first}
        c.check("Traceback" not in proc.stderr, "ciard verify EXPORT_DIR (no traceback)",
                f"exit {proc.returncode}: {first}")
        if (chain / "workflow.json").is_file():  # a `ciard run` folder: verify takes its export and pack
            proc = run([ciard, "verify", chain, "--quiet"])
            last = (proc.stdout.strip().splitlines() or [""])[-1]
            rec["verify_run_folder"] = {"exit": proc.returncode, "stdout_last_line": last}
            c.check(proc.returncode in (0, 1) and "Traceback" not in proc.stderr,
                    "ciard verify RUN_FOLDER (0 or 1: the recipe's gates)", f"exit {proc.returncode}: {last}")

        rec["torch_verbs"] = {}
        for verb, template in TORCH_VERBS.items():
            out = work / f"out-{verb}"
            cmd = [a.format(out=out, chain=chain) for a in template]
            proc = run([ciard, *cmd], cwd=work, env={**os.environ, "COLUMNS": "400"})
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            rec["torch_verbs"][verb] = {"exit": proc.returncode, "stderr": proc.stderr.strip()}
            ok = (proc.returncode == 3 and len(lines) == 1 and lines[0].startswith("error: ") and "PyTorch" in lines[0]
                  and "ciard-deploy[train]" in lines[0] and not any(out.parent.glob(out.name + "*")))
            c.check(ok, f"ciard {verb} exits 3 with one line", f"exit {proc.returncode}: {proc.stderr.strip()}")
        rec["seconds"] = round(time.perf_counter() - t0, 1)
    finally:
        if args.json is not None:
            rec["failed"] = c.failed
            args.json.write_text(json.dumps(rec, indent=2) + "\n")
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'all checks passed' if not c.failed else 'FAILED: ' + ', '.join(c.failed)} "
          f"({rec.get('seconds', '?')} s{'; kept ' + str(work) if args.keep or args.work else ''})")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
