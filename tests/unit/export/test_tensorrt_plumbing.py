"""Plumbing of the TensorRT builder against a recording stand-in for the ``tensorrt`` module.

This checks only which builder calls ``build_engine`` makes (workspace limit, precision flags,
optimization profile, timing cache, parser errors). It produces no engine and says nothing
about TensorRT results: those are tested on a GPU in tests/gpu/test_tensorrt.py.
"""

from __future__ import annotations

import sys
import types

import pytest

from ciard_deploy.errors import ArtifactError

pytestmark = pytest.mark.unit


def recording_tensorrt(calls: list, parse_ok: bool = True) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.x (recording stand-in)"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Cache:
        def serialize(self):
            return b"timing-cache"

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls.append(("profile", name, lo, opt, hi))

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls.append(("pool", pool, size))

        def set_flag(self, flag):
            calls.append(("flag", flag))

        def add_optimization_profile(self, p):
            calls.append(("add_profile",))

        def create_timing_cache(self, blob):
            calls.append(("timing_cache_in", blob))
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", ignore_mismatch))

        def get_timing_cache(self):
            return Cache()

    class Network:
        def get_input(self, i):
            return types.SimpleNamespace(name="input")

    class Builder:
        platform_has_fast_fp16 = platform_has_fast_int8 = True

        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            calls.append(("network_flags", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build",))
            return b"serialized"

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            self.network, self.logger = network, logger

        def parse_from_file(self, path):
            calls.append(("parse", path))
            return parse_ok

        def get_error(self, i):
            return "In node 3 (Conv): unsupported"

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    import ciard_deploy.export.tensorrt as trt_export
    import ciard_deploy.runtime.trt_backend as trt_backend

    calls: list = []

    def install(parse_ok: bool = True):
        monkeypatch.setitem(sys.modules, "tensorrt", recording_tensorrt(calls, parse_ok))
        monkeypatch.setattr(trt_backend, "cuda_device_count", lambda: 1)
        monkeypatch.setattr(trt_export, "cuda_device_info", lambda: {"gpu": "stand-in", "compute_capability": "0.0"})
        return calls

    return install


def test_fp16_dynamic_build_sets_profile_workspace_and_timing_cache(fake_trt, tmp_path):
    from ciard_deploy.export.tensorrt import build_engine

    calls = fake_trt()
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"onnx")
    cache = tmp_path / "timing.cache"
    data, info = build_engine(onnx_file, "fp16", (1, 8, 8), "dynamic", workspace_mb=512, min_batch=1, opt_batch=32,
                              max_batch=256, timing_cache=cache)
    assert data == b"serialized" and cache.read_bytes() == b"timing-cache"
    assert ("pool", "WORKSPACE", 512 << 20) in calls and ("flag", "FP16") in calls and ("flag", "INT8") not in calls
    assert ("profile", "input", (1, 1, 8, 8), (32, 1, 8, 8), (256, 1, 8, 8)) in calls
    assert ("timing_cache_in", b"") in calls and ("set_timing_cache", False) in calls
    assert info["profile"]["max"] == [256, 1, 8, 8] and info["builder_flags"] == ["FP16"]
    assert info["gpu"] == "stand-in" and info["static_batch"] is None


def test_int8_static_build_from_qdq_has_no_profile(fake_trt, tmp_path):
    from ciard_deploy.export.tensorrt import build_engine

    calls = fake_trt()
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    _, info = build_engine(tmp_path / "m.onnx", "int8", (3, 32, 32), 8, timing_cache=tmp_path / "c")
    assert ("flag", "INT8") in calls and not [c for c in calls if c[0] == "profile"]
    assert info["int8"] == "explicit (QDQ)" and info["static_batch"] == 8 and info["profile"] is None


def test_parser_errors_are_reported_in_one_line(fake_trt, tmp_path):
    from ciard_deploy.export.tensorrt import build_engine

    fake_trt(parse_ok=False)
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    with pytest.raises(ArtifactError, match="cannot parse m.onnx: In node 3"):
        build_engine(tmp_path / "m.onnx", "fp32", (1, 8, 8), timing_cache=tmp_path / "c")
