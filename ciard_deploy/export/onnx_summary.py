"""What any ONNX file holds, for ``ciard inspect``: inputs and outputs (shapes with symbolic dims by name,
element types), opsets, an op histogram, QDQ nodes and the share of weights stored quantized, file and
weight sizes, producer and metadata_props. Works on files ciard did not export.

Read with the ``onnx`` package without loading external weights (their files are checked, never read);
a device install without ``onnx`` gets what onnxruntime tells (inputs, outputs, producer, metadata) and a
note naming what is missing. Torch-free.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from ciard_deploy.errors import ArtifactError
from ciard_deploy.runtime.ort_backend import import_onnxruntime

#: bits per element of each ONNX tensor element type (by ``TensorProto.DataType`` name); STRING has none
BITS = {"FLOAT": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32, "INT64": 64, "BOOL": 8,
        "FLOAT16": 16, "DOUBLE": 64, "UINT32": 32, "UINT64": 64, "COMPLEX64": 64, "COMPLEX128": 128, "BFLOAT16": 16,
        "FLOAT8E4M3FN": 8, "FLOAT8E4M3FNUZ": 8, "FLOAT8E5M2": 8, "FLOAT8E5M2FNUZ": 8, "FLOAT8E8M0": 8, "UINT4": 4,
        "INT4": 4, "FLOAT4E2M1": 4, "UINT2": 2, "INT2": 2, "FLOAT6E2M3": 6, "FLOAT6E3M2": 6}
#: element types that count as quantized weights (what QDQ INT8 exports store: int8/uint8 weights; 4-bit too)
QUANTIZED = ("int8", "uint8", "int4", "uint4")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
DEFAULT_DOMAIN = "ai.onnx"


def summarize_onnx(path: str | Path) -> dict[str, Any]:
    """The summary of one ONNX file as JSON-able data (``ciard inspect --json`` puts it under ``"onnx"``).

    Keys: ``file_bytes``, ``ir_version``, ``producer``, ``model_version``, ``graph``, ``doc``, ``opsets``
    ({domain: version}), ``inputs``/``outputs`` ([{name, type, shape}], a symbolic dim by its name, an
    unknown one as null), ``nodes``, ``ops`` ({op: count}, non-default domains as ``domain:Op``, subgraphs
    included), ``qdq_nodes``, ``weights`` (initializer count, elements, bytes, per element type, the
    quantized share by elements and by bytes), ``external_data`` (files and bytes), ``metadata`` (every
    metadata_props entry), ``source`` (``onnx`` or ``onnxruntime``) and ``notes``.

    Raises:
        ArtifactError: not an ONNX model (truncated, corrupt, another format), or an external-data file it
            names is missing or lies outside its folder.
    """
    p = Path(path)
    try:
        import onnx
    except ImportError:  # a device install: onnxruntime reads the interface, not the graph
        return _from_onnxruntime(p)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # DecodeError and friends for truncated or foreign files
        raise ArtifactError(f"cannot read {p.name} as ONNX: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''} (truncated or corrupt?)") from None
    if model.ir_version < 1 or not model.HasField("graph"):
        raise ArtifactError(f"{p.name} is not an ONNX model (no IR version or graph: another kind of file?)")
    g = model.graph
    ops = Counter(_op_name(n) for n in _nodes(g))
    weights, external = _weights(onnx, g, p)
    init_names = {t.name for t in g.initializer}
    return {
        "source": "onnx", "file_bytes": p.stat().st_size, "ir_version": int(model.ir_version),
        "producer": " ".join(s for s in (model.producer_name, model.producer_version) if s) or None,
        "model_version": int(model.model_version) or None, "domain": model.domain or None,
        "graph": g.name or None, "doc": (model.doc_string or g.doc_string or "")[:500] or None,
        "opsets": {o.domain or DEFAULT_DOMAIN: int(o.version) for o in model.opset_import},
        "inputs": [_value_info(onnx, v) for v in g.input if v.name not in init_names],
        "outputs": [_value_info(onnx, v) for v in g.output],
        "nodes": sum(ops.values()), "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "qdq_nodes": sum(c for op, c in ops.items() if op.rsplit(":", 1)[-1] in QDQ_OPS),
        "weights": weights, "external_data": external,
        "metadata": {e.key: e.value for e in model.metadata_props}, "notes": [],
    }


def _nodes(graph: Any) -> Iterator[Any]:
    """Every node of ``graph`` and of the subgraphs its nodes carry (If, Loop, Scan bodies)."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.HasField("g"):
                yield from _nodes(a.g)
            for sub in a.graphs:
                yield from _nodes(sub)


def _op_name(node: Any) -> str:
    return node.op_type if node.domain in ("", DEFAULT_DOMAIN) else f"{node.domain}:{node.op_type}"


def _value_info(onnx: Any, v: Any) -> dict[str, Any]:
    t = v.type
    kind = t.WhichOneof("value")
    if kind != "tensor_type":
        return {"name": v.name, "type": kind or "unknown", "shape": None}
    tt = t.tensor_type
    dtype = onnx.TensorProto.DataType.Name(tt.elem_type).lower() if tt.elem_type else "unknown"
    shape = None
    if tt.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None
                 for d in tt.shape.dim]
    return {"name": v.name, "type": dtype, "shape": shape}


def _weights(onnx: Any, graph: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Initializer sizes by element type (bytes from dims and type, so external weights need not be read)
    and the external-data files, each checked to exist inside the model's folder."""
    by_type: dict[str, dict[str, int]] = {}
    files: dict[str, int] = {}
    folder = path.parent.resolve()
    for t in graph.initializer:
        name = onnx.TensorProto.DataType.Name(t.data_type) if t.data_type in onnx.TensorProto.DataType.values() \
            else "UNDEFINED"
        n = math.prod(t.dims)
        bits = BITS.get(name)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            nbytes = int(info["length"]) if info.get("length", "").isdigit() else math.ceil(n * (bits or 0) / 8)
            files[_external_file(path, folder, t.name, info.get("location", ""))] = 0
        else:
            nbytes = math.ceil(n * bits / 8) if bits else len(t.raw_data) or sum(len(s) for s in t.string_data)
        row = by_type.setdefault(name.lower(), {"count": 0, "elements": 0, "bytes": 0})
        row["count"] += 1
        row["elements"] += n
        row["bytes"] += nbytes
    total_n = sum(r["elements"] for r in by_type.values())
    total_b = sum(r["bytes"] for r in by_type.values())
    q_n = sum(r["elements"] for k, r in by_type.items() if k in QUANTIZED)
    q_b = sum(r["bytes"] for k, r in by_type.items() if k in QUANTIZED)
    weights = {
        "initializers": sum(r["count"] for r in by_type.values()), "elements": total_n, "bytes": total_b,
        "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["bytes"])),
        "quantized": {"types": list(QUANTIZED), "elements": q_n, "bytes": q_b,
                      "share_of_elements": q_n / total_n if total_n else 0.0,
                      "share_of_bytes": q_b / total_b if total_b else 0.0},
    }
    if not files:
        return weights, None
    sizes = {f: (folder / f).stat().st_size for f in files}
    return weights, {"files": sorted(sizes), "bytes": sum(sizes.values())}


def _external_file(path: Path, folder: Path, tensor: str, location: str) -> str:
    """The external-data file of ``tensor``, relative to the model's folder; ArtifactError (exit 2) when it
    is missing or lies outside that folder (a hostile ``../`` or absolute location is never followed)."""
    where = (folder / location).resolve() if location else folder
    if not location or Path(location).is_absolute() or not where.is_relative_to(folder):
        raise ArtifactError(f"{path.name}: initializer {tensor!r} keeps its data at {location!r}, which is not a "
                            f"file inside {folder}")
    if not where.is_file():
        raise ArtifactError(f"{path.name}: external data file {location} (initializer {tensor!r}) not found in "
                            f"{folder}")
    return where.relative_to(folder).as_posix()


def _from_onnxruntime(p: Path) -> dict[str, Any]:
    ort = import_onnxruntime()
    try:
        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ArtifactError(f"cannot read {p.name} as ONNX: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                            " (truncated, corrupt, or its external data missing?)") from None
    meta = sess.get_modelmeta()

    def io(args: Any) -> list[dict[str, Any]]:
        return [{"name": a.name, "type": str(a.type).removeprefix("tensor(").removesuffix(")"),
                 "shape": None if a.shape is None else [d if isinstance(d, (int, str)) else None for d in a.shape]}
                for a in args]

    return {"source": "onnxruntime", "file_bytes": p.stat().st_size, "ir_version": None,
            "producer": meta.producer_name or None,
            "model_version": meta.version if 0 < meta.version < 2**63 - 1 else None,  # int64 max: none set
            "domain": meta.domain or None, "graph": meta.graph_name or None, "doc": meta.description or None,
            "opsets": None, "inputs": io(sess.get_inputs()), "outputs": io(sess.get_outputs()), "nodes": None,
            "ops": None, "qdq_nodes": None, "weights": None, "external_data": None,
            "metadata": dict(meta.custom_metadata_map),
            "notes": ["opsets, op histogram, QDQ nodes and weight sizes need the onnx package (pip install onnx)"]}


__all__ = ["QUANTIZED", "summarize_onnx"]
