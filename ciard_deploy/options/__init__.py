"""The option sets of the deploy verbs, one pydantic model each, torch-free and verify-free.

    export.py   ``ExportOptions`` (``ciard export``, a recipe's ``deploy:`` export keys) and the one
                per-precision agreement table ``MIN_AGREEMENT``
    pack.py     ``PackOptions`` (``ciard pack``, a recipe's ``deploy.pack``)
    gates.py    the gate table ``SPECS`` and ``Gates`` (``ciard verify``'s gate flags, a gates file,
                a recipe's ``deploy.gates``)
    live.py     the live (query-only) attack specs of ``ciard verify --live`` / ``deploy.live_attacks``
    methods.py  each training method's hyper-parameter ``Config`` and the teachers it needs

The CLI options (``cli/model_options.py``), the recipe's ``deploy:`` section (``config.deploy``) and
the ``ciard run`` stage fingerprints (``workflow.stage_inputs``) are derived from these models, so an
option is declared once. Nothing here imports torch or ``ciard_deploy.verify``.
"""

from ciard_deploy.options.export import MIN_AGREEMENT, ExportOptions
from ciard_deploy.options.gates import SPECS, Gates, GateSpec
from ciard_deploy.options.pack import PackOptions

__all__ = ["ExportOptions", "GateSpec", "Gates", "MIN_AGREEMENT", "PackOptions", "SPECS"]
