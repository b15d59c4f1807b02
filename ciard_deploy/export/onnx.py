"""ONNX FP32 and FP16 exporters.

FP32: ``torch.onnx.export`` with the torch.export-based ("dynamo") exporter, falling back to
the TorchScript exporter with a warning when it fails; one self-contained file, input
``input`` (float32 NCHW in [0, 1], normalization inside the graph), output ``logits``, a
dynamic or fixed batch dimension. The opset in the saved file is checked against the one
asked for: the dynamo exporter only writes opset >= 18 (and may silently keep 18), so a
lower opset is produced with ``onnx.version_converter`` (or, if that fails, the TorchScript
exporter), and a mismatch that cannot be fixed is an error, never a silent substitute.
Then onnxslim/onnxsim if installed, the ciard metadata in ``metadata_props`` and
``onnx.checker.check_model(full_check=True)``.

FP16: onnxruntime's own converter (``onnxruntime.transformers.float16``) with float32 input
and output kept, so callers feed the same float32 images.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ciard_deploy.errors import ArtifactError
from ciard_deploy.export.base import FormatSpec
from ciard_deploy.export.manifest import set_onnx_metadata
from ciard_deploy.checkpoints import unwrap_model
from ciard_deploy.runtime.base import INPUT_NAME, OUTPUT_NAME

if TYPE_CHECKING:  # pragma: no cover
    from ciard_deploy.export.pipeline import ExportContext

log = logging.getLogger(__name__)
DYNAMO_MIN_OPSET = 18


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for one-line warnings and errors."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def default_opset(model: Any) -> int | None:
    """The ai.onnx opset a ModelProto imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def prune_opset_imports(model: Any) -> None:
    """Drops opset imports of domains no node uses (onnxruntime's quantizer adds a dozen)."""
    used = {n.domain for n in model.graph.node} | {"", "ai.onnx"}
    keep = [(i.domain, i.version) for i in model.opset_import if i.domain in used]
    del model.opset_import[:]
    for domain, version in keep:
        entry = model.opset_import.add()
        entry.domain, entry.version = domain, version


def topological_sort(model: Any) -> None:
    """Reorders ``model.graph.node`` so every node comes after its producers (Kahn's algorithm).

    onnxruntime's float16 converter appends its input casts at the end of the node list, which
    the ONNX checker rejects.
    """
    graph = model.graph
    nodes = list(graph.node)
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    ordered, pending = [], nodes
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:  # a cycle or an input produced nowhere: leave the rest for the checker to name
            ordered += pending
            break
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
        for n in ready:
            ordered.append(n)
            available.update(n.output)
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def strip_debug_info(model: Any) -> None:
    """Drops node doc strings and per-node metadata (the exporter's stack traces, which hold the
    build machine's file paths): smaller files whose hash does not depend on where they were built."""
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    model.graph.doc_string = ""


def _torchscript_export(model: Any, example: Any, path: Path, opset: int, dynamic: bool) -> None:
    import torch

    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice: we log our own
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes,
                          do_constant_folding=True)


def _dynamo_export(model: Any, example: Any, path: Path, opset: int, dynamic: bool) -> None:
    import torch

    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset, external_data=False,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=shapes,
                          optimize=True, verbose=False, report=False)


def _simplify(model: Any, warn: Callable[[str], None]) -> tuple[Any, str | None]:
    """onnxslim, else onnxsim, when installed; a failure keeps the graph as is, with a warning."""
    from importlib.metadata import version

    try:
        import onnxslim  # type: ignore[import-not-found]
    except ImportError:
        onnxslim = None
    try:
        if onnxslim is not None:
            return onnxslim.slim(model), f"onnxslim {version('onnxslim')}"
        try:
            import onnxsim  # type: ignore[import-not-found]
        except ImportError:
            return model, None
        simplified, ok = onnxsim.simplify(model)
        return (simplified, f"onnxsim {version('onnxsim')}") if ok else (model, None)
    except OSError:  # the file system's failure (a full disk), not the simplifier's: exit 2 naming the file
        raise
    except Exception as e:
        warn(f"graph simplification failed ({first_line(e)}); keeping the exported graph")
        return model, None


def export_fp32(model: Any, workdir: Path, input_shape: tuple[int, int, int], opset: int = 18,
                batch: int | str = "dynamic", simplify: bool = True,
                warn: Callable[[str], None] = log.warning) -> tuple[Any, dict[str, Any]]:
    """Exports a [0, 1]-input torch model to an ``onnx.ModelProto`` at exactly ``opset``.

    Args:
        model: the torch module (copied and put in eval mode; the original is not touched).
        workdir: a folder for the exporter's intermediate file.
        input_shape: (C, H, W).
        opset: the ai.onnx opset the file must declare.
        batch: ``"dynamic"`` or a fixed batch size.
        simplify: run onnxslim/onnxsim if installed.
        warn: receives warnings (exporter fallback, simplifier failure).

    Returns:
        (model proto, details for the manifest: exporter, opset conversion, simplifier).

    Raises:
        ArtifactError: no exporter could produce a valid graph at ``opset``.
    """
    import onnx
    import torch


    net = copy.deepcopy(unwrap_model(model)).cpu().eval()
    dynamic = batch == "dynamic"
    example = torch.rand(2 if dynamic else int(batch), *input_shape, generator=torch.Generator().manual_seed(0))
    raw = Path(workdir) / ".export.raw.onnx"
    details: dict[str, Any] = {"requested_opset": opset}
    try:
        _dynamo_export(net, example, raw, max(opset, DYNAMO_MIN_OPSET), dynamic)
        details["tool"] = f"torch.onnx (torch.export-based) torch {torch.__version__}"
    except OSError:  # a full disk or an unwritable folder is no reason to try another exporter
        raise
    except Exception as e:
        warn(f"the torch.export-based ONNX exporter failed ({first_line(e)}); falling back to the TorchScript exporter")
        details["dynamo_error"] = first_line(e)
        try:
            _torchscript_export(net, example, raw, opset, dynamic)
        except OSError:
            raise
        except Exception as e2:
            raise ArtifactError(f"ONNX export failed with both exporters: {first_line(e2)}") from None
        details["tool"] = f"torch.onnx (TorchScript) torch {torch.__version__}"
    proto = onnx.load(str(raw))
    raw.unlink(missing_ok=True)
    got = default_opset(proto)
    if got != opset:
        try:
            converted = onnx.version_converter.convert_version(proto, opset)
            onnx.checker.check_model(converted, full_check=True)  # the converter can leave invalid attributes
            proto = converted
            details["opset_converted_from"] = got
        except OSError:
            raise
        except Exception as e:
            warn(f"onnx.version_converter could not take the graph from opset {got} to {opset} ({first_line(e)}); "
                 "exporting with the TorchScript exporter at that opset instead")
            try:
                _torchscript_export(net, example, raw, opset, dynamic)
                proto = onnx.load(str(raw))
                raw.unlink(missing_ok=True)
                details["tool"] = f"torch.onnx (TorchScript) torch {torch.__version__}"
            except OSError:
                raise
            except Exception as e2:
                raise ArtifactError(f"cannot produce ONNX opset {opset}: the exporter wrote opset {got}, conversion "
                                    f"failed ({first_line(e)}) and so did the TorchScript exporter "
                                    f"({first_line(e2)}); use --opset {got}") from None
    if simplify:
        proto, details["simplifier"] = _simplify(proto, warn)
    else:
        details["simplifier"] = None
    if default_opset(proto) != opset:
        raise ArtifactError(f"the exported graph declares opset {default_opset(proto)}, not the requested {opset}")
    ins, outs = [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]
    if ins != [INPUT_NAME] or outs != [OUTPUT_NAME]:
        raise ArtifactError(f"exported graph has inputs {ins} and outputs {outs}; expected ['input'] and ['logits']")
    return proto, details


def save_onnx(proto: Any, dest: Path, metadata: dict[str, Any], expect_opset: int) -> dict[str, Any]:
    """Writes one self-contained file with ciard metadata, then runs the full ONNX checker on it."""
    import onnx

    prune_opset_imports(proto)
    strip_debug_info(proto)
    set_onnx_metadata(proto, metadata)
    if proto.ByteSize() >= 2**31:
        raise ArtifactError("the model is over 2 GB: it cannot be one self-contained ONNX file")
    onnx.save_model(proto, str(dest), save_as_external_data=False)
    try:
        onnx.checker.check_model(str(dest), full_check=True)
    except OSError:
        raise
    except Exception as e:
        raise ArtifactError(f"{dest.name} fails the ONNX checker: {first_line(e)}") from None
    saved = onnx.load(str(dest), load_external_data=False)
    got = default_opset(saved)
    if got != expect_opset:
        raise ArtifactError(f"{dest.name} declares opset {got}, not the requested {expect_opset}")
    return {"opset": got, "ir_version": int(saved.ir_version)}


class OnnxExporter:
    """FP32 ONNX from the PyTorch student (see the module docstring)."""

    def __init__(self, spec: FormatSpec) -> None:
        self.spec = spec

    def export(self, ctx: "ExportContext", dest: Path) -> dict[str, Any]:
        o = ctx.options
        proto, details = export_fp32(ctx.model, dest.parent, ctx.input_shape, o.opset, o.batch, o.simplify, ctx.warn)
        info = save_onnx(proto, dest, ctx.artifact_metadata(self.spec, o.opset), o.opset)
        return {"exporter": details, **info}


class Fp16Exporter:
    """FP16 ONNX from the FP32 ONNX with onnxruntime's float16 converter (float32 I/O kept)."""

    def __init__(self, spec: FormatSpec) -> None:
        self.spec = spec

    def export(self, ctx: "ExportContext", dest: Path) -> dict[str, Any]:
        import onnx
        from onnxruntime import __version__ as ort_version
        from onnxruntime.transformers.float16 import convert_float_to_float16

        src = ctx.path_of("onnx")
        proto = onnx.load(str(src))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            half = convert_float_to_float16(proto, keep_io_types=True)
        topological_sort(half)
        clipped = [str(w.message) for w in caught if "truncated" in str(w.message).lower()]
        if clipped:
            ctx.warn(f"FP16 conversion clipped {len(clipped)} weight tensor(s) to the float16 range")
        info = save_onnx(half, dest, ctx.artifact_metadata(self.spec, ctx.options.opset), ctx.options.opset)
        details = {"tool": f"onnxruntime.transformers.float16 (onnxruntime {ort_version})", "keep_io_types": True}
        return {"exporter": details, "derived_from": src.name, **info}
