"""The twin of an exported artifact: a torch module that reproduces the runtime's logits, with gradients.

    from ciard_deploy.twin import build_twin, measure_fidelity, random_in_ball
    twin = build_twin("export/model.int8.onnx")       # TwinUnsupported (exit 2) names ops it cannot run
    x_adv = create_attack("pgd20", 0.15).run(twin, x, y)  # white-box on the deployed graph itself

``graph.py`` (torch) builds and runs the twin through the op table of ``ops.py``; ``fidelity.py``
(torch-free at import) measures how well it agrees with the runtime. Importing this package does not
import torch: ``build_twin``, ``OnnxTwin``, ``TwinUnsupported`` and ``SUPPORTED_OPS`` load ``graph.py``
or ``ops.py`` (and torch) on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ciard_deploy._lazy import lazy_attributes
from ciard_deploy.twin.fidelity import (TRUST_THRESHOLD, SetFidelity, TwinFidelity, compare_set, measure_fidelity,
                                        random_in_ball)

if TYPE_CHECKING:  # pragma: no cover
    from ciard_deploy.twin.graph import OnnxTwin, build_twin, check_supported
    from ciard_deploy.twin.ops import SUPPORTED_OPS, TwinUnsupported

_LAZY = {"SUPPORTED_OPS": "ciard_deploy.twin.ops", "TwinUnsupported": "ciard_deploy.twin.ops",
         **{name: "ciard_deploy.twin.graph" for name in ("OnnxTwin", "build_twin", "check_supported")}}
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())

__all__ = ["SUPPORTED_OPS", "TRUST_THRESHOLD", "OnnxTwin", "SetFidelity", "TwinFidelity", "TwinUnsupported",
           "build_twin", "check_supported", "compare_set", "measure_fidelity", "random_in_ball"]
