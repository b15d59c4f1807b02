"""Square Attack, query-only: runs on a torch model or on any numpy logits function.

This module imports neither torch nor ART at module level: ``SquareAttack.run_numpy`` is what
``ciard verify`` calls on an edge device that has only numpy, ART and a runtime
(onnxruntime, TensorRT). ``SquareAttack.run`` wraps a torch model into the same numpy path,
so torch and exported runtimes are attacked by exactly the same code.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from ciard_deploy.attacks.base import SCORES, Attack, Budget, _check_positive
from ciard_deploy.errors import EnvironmentMissing, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

PredictFn = Callable[[np.ndarray], np.ndarray]


@contextlib.contextmanager
def _numpy_seed(seed: int | None) -> Iterator[None]:
    """Seeds numpy's global RNG (ART draws from it) and restores the caller's state afterwards."""
    if seed is None:
        yield
        return
    state = np.random.get_state()
    np.random.seed(int(seed) % (2**32))
    try:
        yield
    finally:
        np.random.set_state(state)


def _import_art() -> tuple[Any, Any]:
    try:
        with warnings.catch_warnings():
            # ART warns that PyTorch/TensorFlow are missing on a torch-free device: expected there.
            warnings.simplefilter("ignore")
            from art.attacks.evasion import SquareAttack as ArtSquareAttack
            from art.estimators.classification import BlackBoxClassifierNeuralNetwork
    except ImportError as exc:
        raise EnvironmentMissing(
            f"the Square attack needs adversarial-robustness-toolbox ({exc}); "
            "install it with: pip install adversarial-robustness-toolbox") from None
    return BlackBoxClassifierNeuralNetwork, ArtSquareAttack


class SquareAttack(Attack):
    """Square Attack (Andriushchenko et al., ECCV 2020), L-inf; score-based black-box.

    Threat model: L-inf ball of radius eps, pixels in [0, 1], the attacker sees only the
    logits (or scores) for the images it submits: no gradients, so it runs unchanged on
    onnxruntime and TensorRT. Random search over square-shaped vertical-stripe-initialized
    updates that minimizes the margin ``z_y - max_{j != y} z_j``; a sample stops as soon as
    it is misclassified. Implemented with ART (``BlackBoxClassifierNeuralNetwork`` +
    ``art.attacks.evasion.SquareAttack``, ``norm=np.inf``), batched across images.

    ``queries`` counts candidate evaluations per image as in the paper (the stripe
    initialization plus ``queries - 1`` square updates); ART also re-scores the current point
    of each still-robust image every iteration, so a runtime sees up to ~3x as many forward
    passes. The CIARD black-box column uses ``square100``; AutoAttack's Square uses 5000.

    Args:
        eps: L-inf radius.
        queries: query budget per image (the ``Q`` of ``square<Q>``), at least 2; default 5000.
        p_init: initial fraction of pixels per square (the schedule then shrinks it); default 0.8.
        restarts: ART restarts; default 1.
        seed: seeds numpy's global RNG for the run and restores it afterwards; default 0.
        batch_size: images per call of the logits function; default 256.

    Example:
        >>> attack = SquareAttack(8 / 255, queries=100)
        >>> attack.label
        'square100@8/255'
        >>> x_adv = attack.run_numpy(session_logits, x, y)  # doctest: +SKIP
    """

    requires = frozenset({SCORES})

    def __init__(self, eps: float, queries: int = 5000, p_init: float = 0.8, restarts: int = 1,
                 seed: int | None = 0, batch_size: int = 256) -> None:
        if int(queries) < 2:
            raise ValueError(f"queries must be >= 2, got {queries!r}")
        if not 0.0 < float(p_init) < 1.0:
            raise ValueError(f"p_init must be in (0, 1), got {p_init!r}")
        _check_positive("restarts", restarts)
        _check_positive("batch_size", batch_size)
        self.name = f"square{int(queries)}"
        self.budget = Budget("Linf", float(eps), int(queries), None)
        self.p_init = float(p_init)
        self.restarts = int(restarts)
        self.seed = seed
        self.batch_size = int(batch_size)

    def options(self) -> dict[str, Any]:
        return {"p_init": self.p_init, "restarts": self.restarts, "seed": self.seed}

    # ------------------------------------------------------------------ numpy path (torch-free)
    def run_numpy(self, predict: PredictFn, x: np.ndarray, y: np.ndarray,
                  num_classes: int | None = None) -> np.ndarray:
        """Attacks a plain logits function; needs no torch.

        Args:
            predict: maps a float32 NCHW batch in [0, 1] to logits (or scores) of shape (N, classes).
            x: clean images, float32 NCHW in [0, 1].
            y: integer labels, shape (N,).
            num_classes: number of logits; found with one call of ``predict`` if omitted.

        Returns:
            float32 adversarial images, same shape as ``x``, within eps of ``x`` and in [0, 1].
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.asarray(y).astype(np.int64).reshape(-1)
        if x.ndim != 4:
            raise ValueError(f"images must be NCHW, got shape {x.shape}")
        if len(y) != len(x):
            raise ValueError(f"{len(y)} labels for {len(x)} images")
        if len(x) and (x.min() < 0.0 or x.max() > 1.0):
            raise ValueError("images must lie in [0, 1] (normalization belongs inside the model)")
        eps = self.budget.eps
        if len(x) == 0 or eps == 0:
            return x.copy()
        h, w = x.shape[2], x.shape[3]
        largest = max(int(round(math.sqrt(self.p_init * h * w))), 1)
        if largest >= h or largest >= w:
            raise UsageError(f"attack {self.label}: images of {h}x{w} are too small for squares with "
                             f"p_init={self.p_init}; lower p_init (option p_init) or use larger images")

        def logits_fn(batch: np.ndarray) -> np.ndarray:
            out = np.asarray(predict(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float32)
            if out.ndim != 2 or len(out) != len(batch):
                raise ValueError(f"predict must return (N, classes) logits, got shape {out.shape} for N={len(batch)}")
            return out

        if num_classes is None:
            num_classes = int(logits_fn(x[:1]).shape[1])
        Estimator, ArtSquare = _import_art()
        estimator = Estimator(logits_fn, input_shape=tuple(x.shape[1:]), nb_classes=int(num_classes),
                              channels_first=True, clip_values=(0.0, 1.0))
        attack = ArtSquare(estimator, norm=np.inf, max_iter=self.budget.steps - 1, eps=float(eps),
                           p_init=self.p_init, nb_restarts=self.restarts, batch_size=self.batch_size,
                           verbose=False)
        with _numpy_seed(self.seed):
            x_adv = attack.generate(x, y=y)
        x_adv = np.minimum(np.maximum(np.asarray(x_adv, dtype=np.float32), x - eps), x + eps)
        return np.clip(x_adv, 0.0, 1.0).astype(np.float32, copy=False)

    # ------------------------------------------------------------------ torch models
    def run(self, model: "torch.nn.Module", x: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":
        """Attacks a torch model through its logits only (the same code path as ``run_numpy``)."""
        import torch

        from ciard_deploy.attacks.common import check_inputs, frozen_eval, project_linf

        check_inputs(x, y)
        device = x.device

        def predict(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()

        with frozen_eval(model):
            x_adv = self.run_numpy(predict, x.detach().cpu().numpy(), y.detach().cpu().numpy())
        return project_linf(torch.from_numpy(x_adv).to(device=device, dtype=x.dtype), x.detach(), self.budget.eps)


def numpy_predict_from_session(session: Any, input_name: str | None = None,
                               output_name: str | None = None) -> PredictFn:
    """A logits function over an onnxruntime ``InferenceSession`` (a convenience for tests/tools).

    ``ciard_deploy.runtime`` backends offer the same through ``Backend.predict``.
    """
    input_name = input_name or session.get_inputs()[0].name
    outputs = [output_name] if output_name else None

    def predict(batch: np.ndarray) -> np.ndarray:
        return session.run(outputs, {input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    return predict
