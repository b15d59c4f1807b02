"""The checked Backend base: validation once, batch splitting/padding, timing, context manager."""

from __future__ import annotations

import numpy as np
import pytest

from ciard_deploy.errors import UsageError
from ciard_deploy.runtime import Backend, InputSpec
from ciard_deploy.runtime.base import BaseBackend

pytestmark = pytest.mark.unit


class SumBackend(BaseBackend):
    """Logits = per-image pixel sums times class index: easy to check, records chunk sizes."""

    name = "sum"

    def __init__(self, batch="dynamic", max_batch=None):
        super().__init__("fake")
        self._spec = InputSpec(shape=(1, 2, 2), batch=batch, max_batch=max_batch)
        self.chunks: list[int] = []
        self.opened = self.closed = 0

    def _open(self):
        self.opened += 1
        self.input_spec = self._spec

    def _close(self):
        self.closed += 1

    def _predict(self, images):
        if self.input_spec.static_batch is not None:
            assert len(images) == self.input_spec.static_batch
        self.chunks.append(len(images))
        s = images.reshape(len(images), -1).sum(1, keepdims=True)
        return s * np.arange(3, dtype=np.float32)


def expected(x):
    return x.reshape(len(x), -1).sum(1, keepdims=True) * np.arange(3, dtype=np.float32)


def test_protocol_and_context_manager():
    b = SumBackend()
    assert isinstance(b, Backend)
    with b as opened:
        assert opened is b and b.opened == 1
        b.open()
        assert b.opened == 1  # idempotent
    assert b.closed == 1


def test_static_batch_is_split_and_padded():
    x = np.random.default_rng(0).random((10, 1, 2, 2), dtype=np.float32)
    b = SumBackend(batch=4)
    out = b.predict(x)
    assert b.chunks == [4, 4, 4]  # last chunk of 2 padded to 4
    np.testing.assert_allclose(out, expected(x), rtol=1e-6)
    assert b.stats.images == 10 and b.stats.calls == 3 and b.stats.seconds > 0


def test_dynamic_batch_respects_max_and_request():
    x = np.random.default_rng(1).random((7, 1, 2, 2), dtype=np.float32)
    b = SumBackend(max_batch=3)
    np.testing.assert_allclose(b.predict(x), expected(x), rtol=1e-6)
    assert b.chunks == [3, 3, 1]
    b2 = SumBackend()
    b2.predict(x, batch_size=5)
    assert b2.chunks == [5, 2]
    assert b2.predict(x[:0]).shape == (0, 3)


@pytest.mark.parametrize("bad, needle", [
    ([[0.0]], "numpy array"),
    (np.zeros((2, 1, 2, 2), np.float64), "float32"),
    (np.zeros((1, 2, 2), np.float32), "NCHW"),
    (np.zeros((2, 3, 2, 2), np.float32), "shape (1, 2, 2)"),
    (np.full((2, 1, 2, 2), 1.5, np.float32), "[0, 1]"),
    (np.full((2, 1, 2, 2), np.nan, np.float32), "[0, 1]"),
])
def test_validation_errors_are_one_line_usage_errors(bad, needle):
    b = SumBackend()
    with pytest.raises(UsageError) as exc:
        b.predict(bad)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    assert b.chunks == []


def test_input_spec_round_trip():
    for spec in (InputSpec((3, 32, 32)), InputSpec((1, 8, 8), batch=16), InputSpec((3, 4, 4), max_batch=256)):
        assert InputSpec.from_dict(spec.to_dict()) == spec
    assert InputSpec((1, 8, 8)).to_dict()["shape"] == ["dynamic", 1, 8, 8]


class ImageOut(SumBackend):
    """A graph that is not a classifier: it returns its input images (N, C, H, W)."""

    def _predict(self, images):
        return images


class Collapsed(SumBackend):
    """A graph whose batch dimension collapses: one row whatever N."""

    def _predict(self, images):
        return np.zeros((1, 3), np.float32)


@pytest.mark.parametrize("backend, shape", [(ImageOut, "(4, 1, 2, 2)"), (Collapsed, "(1, 3)")])
def test_outputs_that_are_not_logits_are_bad_input_naming_the_file(backend, shape):
    from ciard_deploy.errors import ArtifactError

    with pytest.raises(ArtifactError, match=r"^fake: not a classifier: .*shape " + shape.replace("(", r"\(").replace(")", r"\)")) as e:
        backend().predict(np.full((4, 1, 2, 2), 0.5, np.float32))
    assert e.value.exit_code == 2
