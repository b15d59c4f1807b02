"""Pictures: training curves of a run dir, and the accuracy chart of verify reports (PNG).

    from ciard_deploy.plots import accuracy_chart, rows_from_reports, training_curves
    paths = training_curves("runs/digits-ciard")              # -> runs/digits-ciard/plots/*.png
    accuracy_chart(rows_from_reports([report_dict]), "verify.png")

matplotlib is imported lazily, inside the functions, and drives its Agg canvas directly
(``Figure`` + ``FigureCanvasAgg``, no pyplot): importing this module costs nothing, needs
neither matplotlib nor torch, and never changes the caller's matplotlib backend or state.
Every PNG is written atomically (temp file + rename).

How ``metrics.jsonl`` keys become panels is decided by the rules in ``PANEL_RULES`` and
``_eval_values`` below, not by a fixed list of names: a method that logs a new ``loss_*`` term
or a new attack gets it plotted without a change here.

Kept as one file: a little over the usual size, because it is one thing: the key rules, the reading of
``metrics.jsonl`` and the figures those rules drive change together (a new panel is a rule and its
drawing), and nothing else in the package imports its parts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ciard_deploy.errors import ArtifactError, CiardError, EnvironmentMissing
from ciard_deploy.io import atomic_path

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
DEFAULT_SUBDIR = "plots"
DPI = 110

# --------------------------------------------------------------------------- key-matching rules
# One metrics.jsonl line (distill/loop.py ``_end_epoch``) is flat per-epoch averages plus a nested
# ``eval`` dict on evaluation epochs, e.g. for CIARD:
#   {"epoch": 3, "lr": 0.025, "loss": .., "loss_rob": .., "loss_nat": .., "loss_push": .., "loss_teacher": ..,
#    "w_rob": .., "w_nat": .., "tau_robust": .., "tau_clean": .., "entropy_robust": .., "entropy_clean": ..,
#    "push_weight": .., "push_n": .., "clean_fooled": .., "acc_adv": .., "teacher_lr": .., "temp_lr": ..,
#    "weight_lr": .., "images": 270, "time_s": .., "images_per_s": ..,
#    "eval": {"clean": 0.93, "pgd20@0.15": 0.61, "score": 0.77}}
EPOCH_KEY = "epoch"
EVAL_KEY = "eval"  # nested {"clean": acc, "<attack>@<eps>": acc, "worst(a+b)@<eps>": acc, "score": s}
EVAL_PREFIXES = ("eval/", "eval.")  # the same values as flat keys ("eval/clean"), if a writer flattens them
CLEAN_KEY = "clean"
ROBUST = re.compile(r"^.+@.+$")  # robust accuracy always names attack and budget: pgd20@8/255, worst(..)@0.15
IGNORED_EVAL_KEYS = frozenset({"score"})  # the model-selection score is a mix of the two, not an accuracy

LOSS = re.compile(r"^loss(?!_teacher)(_.+)?$")  # loss (student total), loss_rob, loss_nat, loss_push, loss_kd
TEACHER_LOSS = re.compile(r"^loss_teacher(_.+)?$")  # CIARD's robust-teacher retraining (CE: another scale)
TRAIN_ACC = re.compile(r"^acc(_.+)?$")  # acc, acc_adv: running accuracy on the training batches
TEMPERATURE = re.compile(r"^tau_.+$")  # tau_robust, tau_clean: CIARD/MTARD adaptive temperatures
ENTROPY = re.compile(r"^entropy_.+$")  # entropy_robust, entropy_clean: what the temperatures equalize
WEIGHT = re.compile(r"^w_.+$")  # w_rob, w_nat: weights of the distillation terms
TERM_WEIGHT = re.compile(r"^.+_weight$")  # push_weight: CIARD's push-term weight (another scale than w_*)
LEARNING_RATE = re.compile(r"^(lr|.+_lr)$")  # lr (student), teacher_lr, temp_lr, weight_lr


@dataclass(frozen=True)
class Panel:
    """One axes of a figure: every numeric key matching ``pattern`` is a line."""

    title: str
    pattern: re.Pattern[str]
    ylabel: str
    log_y: bool = False


@dataclass(frozen=True)
class FigureRule:
    """One PNG: its file name and panels; panels whose keys are absent are left out, and a
    figure with no panel left is not written. ``kind="accuracy"`` is the accuracy figure, whose
    lines come from the eval dict (:func:`_eval_values`) and the ``TRAIN_ACC`` keys."""

    filename: str
    title: str
    panels: tuple[Panel, ...] = ()
    kind: str = "lines"


PANEL_RULES: tuple[FigureRule, ...] = (
    FigureRule("losses.png", "training losses (epoch means)", (
        Panel("student loss terms", LOSS, "loss"),
        Panel("robust-teacher loss (retraining)", TEACHER_LOSS, "cross-entropy"),
    )),
    FigureRule("accuracy.png", "accuracy", kind="accuracy"),
    FigureRule("temperatures_weights.png", "CIARD temperatures and weights", (
        Panel("temperatures", TEMPERATURE, "tau"),
        Panel("teacher entropies", ENTROPY, "entropy (nats)"),
        Panel("term weights", WEIGHT, "weight"),
        Panel("push-term weight", TERM_WEIGHT, "weight"),
    )),
    FigureRule("learning_rates.png", "learning rates", (
        Panel("learning rates (log; zeros not drawn)", LEARNING_RATE, "learning rate", log_y=True),
    )),
)


# --------------------------------------------------------------------------- reading
def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a run dir or the file), one per epoch, sorted by epoch.

    A line that is not JSON (a write cut short by a crash) is skipped with a warning; when an
    epoch appears twice the later line wins (a resumed run).

    Raises:
        ArtifactError: no such run dir or file, or no readable record in it.
    """
    p = Path(path)
    f = p / METRICS_FILE if p.is_dir() else p
    if not p.exists():
        raise ArtifactError(f"run dir not found: {p}")
    if not f.is_file():
        raise ArtifactError(f"{p} has no {METRICS_FILE}: not a `ciard distill`/`ciard train` run dir "
                            f"(or no epoch has finished yet)")
    by_epoch: dict[Any, dict[str, Any]] = {}
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"cannot read {f}: {e}") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON; skipped", f, i)
            continue
        if not isinstance(rec, dict):
            log.warning("%s line %d is not a JSON object; skipped", f, i)
            continue
        epoch = rec.get(EPOCH_KEY)
        by_epoch[epoch if _is_number(epoch) else f"line{i}"] = rec
    if not by_epoch:
        raise ArtifactError(f"{f} has no epoch records")
    records = list(by_epoch.values())
    for i, rec in enumerate(records, 1):  # records without an epoch number get their position
        if not _is_number(rec.get(EPOCH_KEY)):
            rec[EPOCH_KEY] = i
    return sorted(records, key=lambda r: r[EPOCH_KEY])


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _eval_values(rec: Mapping[str, Any]) -> dict[str, float]:
    """The evaluation accuracies of one record: ``clean`` and every ``attack@eps`` label."""
    out: dict[str, float] = {}
    nested = rec.get(EVAL_KEY)
    if isinstance(nested, Mapping):
        out.update({str(k): v for k, v in nested.items() if _is_number(v)})
    for k, v in rec.items():
        for prefix in EVAL_PREFIXES:
            if k.startswith(prefix) and _is_number(v):
                out[k[len(prefix):]] = v
    return {k: float(v) for k, v in out.items()
            if k not in IGNORED_EVAL_KEYS and (k == CLEAN_KEY or ROBUST.match(k))}


Series = dict[str, tuple[list[float], list[float]]]  # key -> (epochs, values)


def _series(records: Sequence[Mapping[str, Any]], pattern: re.Pattern[str]) -> Series:
    """``{key: (epochs, values)}`` for every top-level numeric key matching ``pattern``, in first-seen order."""
    out: Series = {}
    for rec in records:
        for k, v in rec.items():
            if k == EPOCH_KEY or not _is_number(v) or not pattern.match(k):
                continue
            xs, ys = out.setdefault(k, ([], []))
            xs.append(float(rec[EPOCH_KEY]))
            ys.append(float(v))
    return out


def _display_order(labels: Sequence[str] | Mapping[str, Any]) -> list[str]:
    """``clean`` first, then the attacks as first seen, then the worst cases (``worst(...)@eps``)."""
    seen = list(labels)
    return sorted(seen, key=lambda k: (k != CLEAN_KEY, k.startswith("worst"), seen.index(k)))


def _title(run_dir: Path) -> str:
    """``<run dir name>: <method> <arch> on <dataset>`` from summary.json or recipe metadata when present."""
    summary = run_dir / "summary.json"
    try:
        s = json.loads(summary.read_text()) if summary.is_file() else {}
    except (OSError, ValueError):
        s = {}
    parts = [str(s[k]) for k in ("method", "arch") if isinstance(s, dict) and s.get(k)]
    if isinstance(s, dict) and s.get("dataset"):
        parts.append(f"on {s['dataset']}")
    return f"{run_dir.name}: {' '.join(parts)}" if parts else run_dir.name


# --------------------------------------------------------------------------- matplotlib (lazy)
def _new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.2, height: float = 3.8) -> Any:
    """A Figure on an Agg canvas (no pyplot, so no global backend switch and no figure registry);
    ``width``/``height`` are per panel."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise EnvironmentMissing(f"plots need matplotlib ({e}); pip install matplotlib "
                                 "(or 'ciard-deploy[train]')") from None
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
    return path


def _style_axes(ax: Any, title: str, ylabel: str, xlabel: str = "epoch") -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _plot_lines(ax: Any, series: Mapping[str, tuple[list[float], list[float]]], log_y: bool = False,
                emphasize: str | None = None) -> None:
    for key, (xs, ys) in series.items():
        marker = "o" if len(xs) <= 30 else None
        label = key
        if log_y:
            ys = [y if y > 0 and math.isfinite(y) else math.nan for y in ys]
            if all(math.isnan(y) for y in ys):
                label = f"{key} (all 0)"
        ax.plot(xs, ys, marker=marker, markersize=3.5, label=label,
                linewidth=2.2 if key == emphasize else 1.4)
    if log_y and any(y > 0 for _, ys in series.values() for y in ys if math.isfinite(y)):
        ax.set_yscale("log")
    ax.legend(fontsize=8, loc="best")


# --------------------------------------------------------------------------- training curves
def curve_keys(records: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Which keys :func:`training_curves` draws in which file, by the same rules: ``{file: [key, ...]}``
    (files with no key left out). For tests and for checking a new method's metric names."""
    out: dict[str, list[str]] = {}
    for rule in PANEL_RULES:
        if rule.kind == "accuracy":
            keys = _display_order({k: None for rec in records for k in _eval_values(rec)})
            keys += list(_series(records, TRAIN_ACC))
        else:
            keys = [k for p in rule.panels for k in _series(records, p.pattern)]
        if keys:
            out[rule.filename] = keys
    return out


def training_curves(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Writes the training curves of a run as PNGs and returns their paths.

    From ``RUN_DIR/metrics.jsonl`` (``run_dir`` may also be that file): ``losses.png`` (every
    ``loss*`` term), ``accuracy.png`` (evaluation clean accuracy and robust accuracy per attack
    label such as ``pgd20@8/255``, plus the running accuracy on training batches),
    ``temperatures_weights.png`` (``tau_*``, ``entropy_*``, ``w_*``, ``*_weight``: CIARD/MTARD)
    and ``learning_rates.png`` (``lr`` and every ``*_lr``, e.g. ``teacher_lr``). A figure whose
    keys are all absent (a TRADES run has no temperatures) is not written.

    Args:
        run_dir: a ``ciard distill``/``ciard train`` run dir, or its metrics.jsonl.
        out_dir: where the PNGs go (default: ``RUN_DIR/plots``); created if needed.

    Returns:
        The written paths, in the order above.

    Raises:
        ArtifactError: no run dir, no metrics.jsonl or nothing plottable in it.
        EnvironmentMissing: matplotlib is not installed.
    """
    src = Path(run_dir)
    records = read_metrics(src)
    base = src.parent if src.is_file() else src
    out = Path(out_dir) if out_dir is not None else base / DEFAULT_SUBDIR
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output folder {out} is a file")
    title = _title(base)
    written: list[Path] = []
    for rule in PANEL_RULES:
        fig = (_accuracy_figure(records) if rule.kind == "accuracy" else _lines_figure(records, rule.panels))
        if fig is None:
            continue
        fig.suptitle(f"{title}: {rule.title}", fontsize=11)
        written.append(_save(fig, out / rule.filename))
    if not written:
        raise ArtifactError(f"{base / METRICS_FILE} has nothing to plot (no loss*, eval, tau_*, w_* or lr keys)")
    return written


def _lines_figure(records: Sequence[Mapping[str, Any]], panels: Sequence[Panel]) -> Any | None:
    """One axes per panel that has at least one matching key; None when none has."""
    present = [(p, s) for p in panels if (s := _series(records, p.pattern))]
    if not present:
        return None
    ncols = min(len(present), 2)
    nrows = math.ceil(len(present) / ncols)
    fig = _new_figure(ncols, nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(present):]:
        ax.set_visible(False)
    for ax, (panel, series) in zip(axes, present):
        _plot_lines(ax, series, log_y=panel.log_y, emphasize="loss" if panel.pattern is LOSS else None)
        _style_axes(ax, panel.title, panel.ylabel)
    return fig


def _accuracy_figure(records: Sequence[Mapping[str, Any]]) -> Any | None:
    """Evaluation accuracies (solid, one line per label) and training-batch accuracies (dashed)."""
    evals: Series = {}
    for rec in records:
        for k, v in _eval_values(rec).items():
            xs, ys = evals.setdefault(k, ([], []))
            xs.append(float(rec[EPOCH_KEY]))
            ys.append(v)
    train = _series(records, TRAIN_ACC)
    if not evals and not train:
        return None
    order = _display_order(evals)
    fig = _new_figure(width=6.4, height=4.2)
    ax = fig.subplots()
    for k in order:
        xs, ys = evals[k]
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=2.0 if k == CLEAN_KEY else 1.6, label=k)
    for k, (xs, ys) in train.items():
        ax.plot(xs, ys, linestyle="--", linewidth=1.2, alpha=0.8, label=f"{k} (training batches)")
    ax.set_ylim(0.0, 1.02)
    from matplotlib.ticker import PercentFormatter

    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    _style_axes(ax, "clean and robust accuracy (model-selection subset)", "accuracy")
    ax.legend(fontsize=8, loc="best")
    return fig


def safe_training_curves(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """:func:`training_curves` for the end of a training run: a problem is logged, never raised
    (a missing matplotlib or an odd metrics file must not fail a finished run)."""
    try:
        return training_curves(run_dir, out_dir)
    except CiardError as e:
        log.warning("training curves not written: %s", e)
    except Exception as e:  # noqa: BLE001 - plotting is a by-product; the run's own outputs are safe
        log.warning("training curves not written (%s: %s)", type(e).__name__, e)
    return []


# --------------------------------------------------------------------------- accuracy chart
def accuracy_chart(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path:
    """A grouped bar chart of clean and robust accuracy per attack, one bar per model (PNG).

    Args:
        rows: one mapping per model, e.g. ``{"model": "pytorch", "clean": 0.91, "pgd20@8/255": 0.52}``,
            ``{"model": "model.int8.onnx", "clean": 0.90, "pgd20@8/255": 0.50, "square1000@8/255": 0.55}``.
            ``model`` names the bar; every other numeric key is an accuracy (a fraction in [0, 1]) and
            becomes a group (``clean`` first, then the labels in first-seen order); a key a model
            lacks (PyTorch has no live Square result) leaves its bar out. Non-numeric values
            (``None``, strings) are ignored.
        path: the PNG to write (atomically).
        title: figure title (default: "clean and robust accuracy").

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: no rows, a row without ``model``, no accuracy at all, or a value outside [0, 1].
        EnvironmentMissing: matplotlib is not installed.
    """
    if not rows:
        raise ValueError("accuracy_chart: no rows")
    models: list[str] = []
    labels: list[str] = []
    for row in rows:
        if "model" not in row:
            raise ValueError(f"accuracy_chart: row without 'model': {dict(row)}")
        models.append(str(row["model"]))
        for k, v in row.items():
            if k == "model" or not _is_number(v):
                continue
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"accuracy_chart: {row['model']} {k} = {v} is not a fraction in [0, 1]")
            if k not in labels:
                labels.append(k)
    if not labels:
        raise ValueError("accuracy_chart: the rows hold no accuracy values")
    labels = _display_order(labels)
    n_models = len(models)
    width = 0.8 / n_models
    fig = _new_figure(width=max(5.5, 1.1 + len(labels) * (0.55 + 0.35 * n_models)), height=4.3)
    ax = fig.subplots()
    from matplotlib.ticker import PercentFormatter

    for i, (row, name) in enumerate(zip(rows, models)):
        xs, ys = [], []
        for j, k in enumerate(labels):
            v = row.get(k)
            if _is_number(v):
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(float(v))
        bars = ax.bar(xs, ys, width * 0.92, label=name, color=f"C{i % 10}")
        ax.bar_label(bars, labels=[f"{100 * y:.1f}" for y in ys], fontsize=7, padding=1.5)
        for j, k in enumerate(labels):
            if not _is_number(row.get(k)):  # not measured for this model (PyTorch has no live Square)
                ax.text(j - 0.4 + width * (i + 0.5), 0.01, "n/a", ha="center", va="bottom", fontsize=6.5,
                        color="0.45")
    tilt = len(labels) > 3
    ax.set_xticks(range(len(labels)), labels, rotation=15 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylim(0.0, 1.1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("accuracy")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(n_models, 4), loc="upper right")
    ax.set_title(title or "clean and robust accuracy", fontsize=11)
    return _save(fig, Path(path))


def rows_from_reports(reports: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows for :func:`accuracy_chart` from verify reports (``VerifyReport.to_dict()`` or the JSON file).

    The first row is the PyTorch reference stored in the pack (clean, each transferred attack,
    the transferred worst case); then one row per report: the runtime's clean accuracy, every
    attack (transferred and live Square) and the worst cases. Reports built from different packs
    get one PyTorch row per pack (``pytorch (pack 1a2b3c4d)``).
    """
    refs: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for rep in reports:
        res = rep.get("results") or {}
        art = rep.get("artifact") or {}
        checksum = str((rep.get("pack") or {}).get("checksum") or "")
        if checksum not in refs:
            ref: dict[str, Any] = {"clean": res.get("reference_clean_acc")}
            for a in res.get("attacks") or []:
                if a.get("reference_acc") is not None:
                    ref[a["label"]] = a["reference_acc"]
            wt = res.get("worst_case_transfer") or {}
            if wt.get("label") and wt.get("reference_acc") is not None:
                ref[wt["label"]] = wt["reference_acc"]
            refs[checksum] = ref
        row: dict[str, Any] = {"model": art.get("name") or Path(str(art.get("path", "artifact"))).name,
                               "clean": res.get("clean_acc")}
        for a in res.get("attacks") or []:
            row[a["label"]] = a.get("robust_acc")
        for key in ("worst_case_transfer", "worst_case"):
            w = res.get(key) or {}
            if w.get("label"):
                row[w["label"]] = w.get("acc")
        rows.append(row)
    many = len(refs) > 1
    head = [{"model": f"pytorch (pack {c.split(':')[-1][:8]})" if many else "pytorch", **ref}
            for c, ref in refs.items()]
    return head + rows


__all__ = ["PANEL_RULES", "accuracy_chart", "curve_keys", "read_metrics", "rows_from_reports", "safe_training_curves",
           "training_curves"]
