"""Square Attack, query-only, in numpy: runs on a torch model or on any numpy logits function.

This module imports nothing but numpy and our own modules at module level:
``SquareAttack.run_numpy`` is what ``ciard verify`` calls on an edge device that has only numpy
and a runtime (onnxruntime, TensorRT). ``SquareAttack.run`` (from ``QueryAttack``) wraps a torch
model into the same numpy path (importing torch inside the method), so torch and exported runtimes
are attacked by exactly the same code. Registered as ``square<Q>`` in ``attacks.base``; that entry
is all ``ciard verify --live`` needs to run it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ciard_deploy.attacks.base import QueryAttack, SCORES, check_positive
from ciard_deploy.attacks.budget import Budget
from ciard_deploy.errors import UsageError

PredictFn = Callable[[np.ndarray], np.ndarray]

#: Iterations at which the reference halves the square fraction ``p``, for a 10,000-query budget;
#: other budgets rescale the iteration index to this scale (Andriushchenko et al., their code).
_P_MILESTONES = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init: float, iteration: int, queries: int) -> float:
    """The fraction of pixels a square covers at ``iteration`` (0-based) of a ``queries`` budget.

    ``p_init`` is halved at each of the reference's milestones (10, 50, 200, ..., 8000 of 10,000
    iterations), rescaled to ``queries``: ``p_init`` for the first 0.1 %, ``p_init / 512`` after 80 %.
    """
    scaled = int(iteration / queries * 10000)
    halvings = sum(scaled > m for m in _P_MILESTONES)
    return p_init / 2 ** halvings


def square_side(p: float, h: int, w: int) -> int:
    """Side of the square for fraction ``p`` of an ``h`` x ``w`` image: ``round(sqrt(p h w))``,
    at least 1 and at most ``min(h, w) - 1``, so that the window always has room to move."""
    return min(max(int(round(math.sqrt(p * h * w))), 1), min(h, w) - 1)


class SquareAttack(QueryAttack):
    """Square Attack (Andriushchenko et al., "Square Attack: a query-efficient black-box
    adversarial attack via random search", ECCV 2020), L-inf, score-based black-box.

    Threat model: L-inf ball of radius ``eps`` around each image, pixels in [0, 1]; the attacker
    sees only the logits (or scores) of the images it submits, no gradients, so it runs unchanged
    on onnxruntime and TensorRT. Written here in numpy (no torch, no ART).

    The algorithm is the paper's: the margin loss ``z_y - max_{j != y} z_j`` is minimized by random
    search. Every image starts at vertical stripes (one random sign per column and channel, each
    pixel at ``x +- eps`` clipped to [0, 1]); then, each iteration, every still-robust image tries a
    square window of side ``s`` at a random position, set to a fresh random ``+-eps`` per channel
    (redrawn when it would leave the image unchanged), projected onto the eps-ball and [0, 1]. The
    square covers a fraction ``p`` of the pixels that starts at ``p_init`` and is halved at the
    reference's milestones (defined for 10,000 queries, rescaled to ``queries``). An image is done
    as soon as it is misclassified (``argmax != y``: margin < 0, or a tie that argmax resolves
    against the label, as robust accuracy is scored); only images not yet done are queried.

    Where it differs from ART's ``SquareAttack`` (which ``ciard verify`` used before):

    * a proposal whose margin is *equal* to the current one is accepted (ART and the reference
      accept only strict improvements). On INT8 models the logits are quantized, large regions of
      the eps-ball give the same margin, and strict acceptance stalls on those plateaus; accepting
      equal margins keeps the search moving (``tools/bench_square.py``, INT8 digits small_cnn, eps
      0.15, 1000 queries: 75.0 % robust left, against 82.0 % with strict acceptance and 85.5 % with
      ART's Square);
    * window offsets are drawn uniformly over every valid position ``0 .. h - s`` (and
      ``0 .. w - s``), so the last row and column are reached (ART and the reference stop at
      ``h - s - 1``, which never touches the last row/column of an 8x8 image after the stripes);
    * ``queries`` counts every forward pass of an image, the stripe initialization included, as the
      reference's ``n_queries`` does; ART re-scores the current point too and spends up to ~3x more.

    Randomness comes from ``np.random.default_rng(seed)`` only (the global RNG is untouched): a
    given seed gives the same result for the same inputs, whatever ``batch_size``. The CIARD
    black-box column uses ``square100``; AutoAttack's Square uses 5000.

    Args:
        eps: L-inf radius in pixel units of [0, 1].
        queries: forward passes per image and restart (the ``Q`` of ``square<Q>``), at least 2;
            default 5000.
        p_init: initial fraction of the pixels a square covers; default 0.8.
        restarts: runs, each from a fresh stripe initialization on the images still robust, each
            with the full ``queries`` budget; default 1.
        seed: seed of ``np.random.default_rng``; ``None`` draws fresh entropy. Default 0.
        batch_size: images per call of the logits function; default 256.

    Attributes:
        last_queries: forward passes of images made by the last ``run_numpy``/``run`` (the sum over
            images; at most ``len(x) * queries * restarts``).

    Example:
        >>> attack = SquareAttack(8 / 255, queries=100)
        >>> attack.label
        'square100@8/255'
        >>> x_adv = attack.run_numpy(session_logits, x, y)  # doctest: +SKIP
        >>> attack.last_queries  # doctest: +SKIP
        5123
    """

    requires = frozenset({SCORES})
    #: ``False`` accepts only strictly lower margins (the reference's rule); tests and benchmarks only.
    _accept_equal = True

    def __init__(self, eps: float, queries: int = 5000, p_init: float = 0.8, restarts: int = 1,
                 seed: int | None = 0, batch_size: int = 256) -> None:
        if int(queries) < 2:
            raise ValueError(f"queries must be >= 2, got {queries!r}")
        if not 0.0 < float(p_init) < 1.0:
            raise ValueError(f"p_init must be in (0, 1), got {p_init!r}")
        check_positive("restarts", restarts)
        check_positive("batch_size", batch_size)
        self.name = f"square{int(queries)}"
        self.budget = Budget("Linf", float(eps), int(queries), None)
        self.p_init = float(p_init)
        self.restarts = int(restarts)
        self.seed = seed
        self.batch_size = int(batch_size)
        self.last_queries = 0

    def options(self) -> dict[str, Any]:
        return {"p_init": self.p_init, "restarts": self.restarts, "seed": self.seed}

    # ------------------------------------------------------------------ numpy path (torch-free)
    def run_numpy(self, predict: PredictFn, x: np.ndarray, y: np.ndarray,
                  num_classes: int | None = None) -> np.ndarray:
        """Attacks a plain logits function; needs no torch.

        Args:
            predict: maps a float32 NCHW batch in [0, 1] to logits (or scores) of shape (N, classes).
            x: clean images, float32 NCHW in [0, 1], shape (N, C, H, W) with H, W >= 2.
            y: integer labels, shape (N,).
            num_classes: number of logits, checked against what ``predict`` returns if given.

        Returns:
            float32 adversarial images, same shape as ``x``, within eps of ``x`` and in [0, 1]: for
            each image the first misclassified point found, else the lowest-margin one.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.asarray(y).astype(np.int64).reshape(-1)
        if x.ndim != 4:
            raise ValueError(f"images must be NCHW, got shape {x.shape}")
        if len(y) != len(x):
            raise ValueError(f"{len(y)} labels for {len(x)} images")
        if len(x) and (x.min() < 0.0 or x.max() > 1.0):
            raise ValueError("images must lie in [0, 1] (normalization belongs inside the model)")
        self.last_queries = 0
        eps = self.budget.eps
        if len(x) == 0 or eps == 0:
            return x.copy()
        h, w = x.shape[2], x.shape[3]
        if min(h, w) < 2:
            raise UsageError(f"attack {self.label}: images of {h}x{w} are too small for squares "
                             "(both sides must be at least 2)")

        def margins(batch: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Margin ``z_y - max_{j != y} z_j`` and misclassified flag per image, in ``batch_size`` calls."""
            out_m = np.empty(len(batch), dtype=np.float64)
            out_f = np.empty(len(batch), dtype=bool)
            for s in range(0, len(batch), self.batch_size):
                part = batch[s:s + self.batch_size]
                z = np.asarray(predict(np.ascontiguousarray(part, dtype=np.float32)))
                if z.ndim != 2 or len(z) != len(part) or (num_classes is not None and z.shape[1] != num_classes):
                    want = f"({len(part)}, {num_classes if num_classes is not None else 'classes'})"
                    raise ValueError(f"predict must return logits of shape {want}, got {z.shape}")
                z = z.astype(np.float64)
                rows = np.arange(len(part))
                lab = labels[s:s + self.batch_size]
                own = z[rows, lab].copy()
                z[rows, lab] = -np.inf
                out_m[s:s + len(part)] = own - z.max(1)
                z[rows, lab] = own
                out_f[s:s + len(part)] = z.argmax(1) != lab
            self.last_queries += len(batch)
            return out_m, out_f

        rng = np.random.default_rng(None if self.seed is None else int(self.seed) % 2**64)
        x_adv = x.copy()
        todo = np.arange(len(x))
        for _ in range(self.restarts):
            x_best, fooled = self._search(margins, x[todo], y[todo], rng)
            x_adv[todo] = x_best
            todo = todo[~fooled]
            if len(todo) == 0:
                break
        return x_adv

    def _search(self, margins: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
                x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One run from a fresh stripe initialization; returns ``(best images, misclassified flags)``."""
        n, c, h, w = x.shape
        eps, budget = self.budget.eps, self.budget.steps
        hi = np.minimum(x + np.float32(eps), np.float32(1.0))  # the two values a pixel can take
        lo = np.maximum(x - np.float32(eps), np.float32(0.0))
        up = np.broadcast_to(rng.random((n, c, 1, w)) < 0.5, x.shape).copy()  # True: at +eps
        x_best = np.where(up, hi, lo)
        margin, fooled = margins(x_best, y)
        channels = np.arange(c)[None, :, None, None]
        for it in range(budget - 1):  # the initialization was the first query
            act = np.flatnonzero(~fooled)
            if len(act) == 0:
                break
            m = len(act)
            s = square_side(p_schedule(self.p_init, it, budget), h, w)
            rows = (rng.integers(0, h - s + 1, size=m)[:, None] + np.arange(s))[:, None, :, None]
            cols = (rng.integers(0, w - s + 1, size=m)[:, None] + np.arange(s))[:, None, None, :]
            img = act[:, None, None, None]
            window = up[img, channels, rows, cols]  # (m, c, s, s) current signs
            n_up = window.sum((2, 3))
            all_up, all_down = n_up == s * s, n_up == 0
            new = rng.random((m, c)) < 0.5
            same = np.all((new & all_up) | (~new & all_down), axis=1)  # would change nothing: redraw
            while same.any():
                redo = np.flatnonzero(same)
                new[redo] = rng.random((len(redo), c)) < 0.5
                same[redo] = np.all((new[redo] & all_up[redo]) | (~new[redo] & all_down[redo]), axis=1)
            signs = np.broadcast_to(new[:, :, None, None], window.shape)
            x_new = x_best[act]
            x_new[np.arange(m)[:, None, None, None], channels, rows, cols] = np.where(
                signs, hi[img, channels, rows, cols], lo[img, channels, rows, cols])
            m_new, f_new = margins(x_new, y[act])
            accept = (m_new <= margin[act]) if self._accept_equal else (m_new < margin[act]) | f_new
            if not accept.any():
                continue
            a = act[accept]
            up[a[:, None, None, None], channels, rows[accept], cols[accept]] = signs[accept]
            x_best[a] = x_new[accept]
            margin[a], fooled[a] = m_new[accept], f_new[accept]
        return x_best, fooled


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
