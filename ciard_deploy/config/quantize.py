"""The recipe's ``quantize:`` section: quantization-aware robust fine-tuning of the trained student.

``quantize: {mode: qat, epochs: 5, lr: 0.01}`` fine-tunes the distilled student with INT8 fake
quantization in the loop (``quantize_aware``), with the recipe's own method and teachers, then
exports an INT8 QDQ ONNX carrying the learned scales (``ciard qat``). Like ``deploy``, it is a stage
after training: the recipe hash leaves it out, so adding it never retrains the student.
Torch-free (recipe validation imports no torch).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

from pydantic import Field, ValidationError

from ciard_deploy.errors import UsageError
from ciard_deploy.options.common import OmitsNewDefaults, Options


ActivationScales = Literal["observed", "learned"]
ACTIVATION_SCALES: tuple[str, ...] = get_args(ActivationScales)  # the one list: the field's type, the bench's check


class QuantizeConfig(Options, OmitsNewDefaults):
    OMIT_AT_DEFAULT: ClassVar[frozenset[str]] = frozenset({"activation_scales"})  # the quantize stage's fingerprint
    mode: Literal["qat"] = Field("qat", description="qat: quantization-aware fine-tuning (the post-training path "
                                                    "is deploy.formats onnx-int8 alone)")
    epochs: int = Field(5, gt=0, description="fine-tuning epochs with fake quantization in the loop")
    lr: float = Field(0.01, gt=0, allow_inf_nan=False,
                      description="SGD learning rate of the fine-tuning (cosine to 0 over its steps); momentum and "
                                  "weight decay are the recipe's optim ones")
    calib_batches: int = Field(4, gt=0, description="clean training batches that set the activation ranges "
                                                    "before the first step")
    activation_scales: ActivationScales = Field(
        "observed", description="observed: a moving average of the activations' min/max during fine-tuning; "
                                "learned: started there, then trained by gradient (LSQ)")
    train_subset: int | None = Field(None, gt=0, description="fine-tune on the first this many of the run's "
                                                             "training positions (default: all)")


def quantize_settings(section: QuantizeConfig | None, flags: bool = False, **given: Any) -> QuantizeConfig:
    """``section`` (a recipe's ``quantize:``, None: the defaults) with the values ``given`` (None: not given)
    checked by the section's own rules, before any work.

    Raises:
        UsageError: one line naming the first bad value as a flag (``--epochs 0: ...``, ``flags``) or a
            keyword (``epochs=0: ...``) and the problem.
    """
    base = section or QuantizeConfig()
    values = {k: v for k, v in given.items() if v is not None}
    try:
        return QuantizeConfig.model_validate({**base.model_dump(), **values})
    except ValidationError as e:
        err = e.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "quantize"
        name = f"--{key.replace('_', '-')} {values.get(key)!r}" if flags else f"{key}={values.get(key)!r}"
        raise UsageError(f"QAT: {name}: {err['msg']}") from None
