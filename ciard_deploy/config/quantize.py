"""The recipe's ``quantize:`` section: quantization-aware robust fine-tuning of the trained student.

``quantize: {mode: qat, epochs: 5, lr: 0.01}`` fine-tunes the distilled student with INT8 fake
quantization in the loop (``quantize_aware``), with the recipe's own method and teachers, then
exports an INT8 QDQ ONNX carrying the learned scales (``ciard qat``). Like ``deploy``, it is a stage
after training: the recipe hash leaves it out, so adding it never retrains the student.
Torch-free (recipe validation imports no torch).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ciard_deploy.options.common import OmitsNewDefaults, Options


ACTIVATION_SCALES: tuple[str, ...] = ("observed", "learned")


class QuantizeConfig(Options, OmitsNewDefaults):
    OMIT_AT_DEFAULT: ClassVar[frozenset[str]] = frozenset({"activation_scales"})  # the quantize stage's fingerprint
    mode: Literal["qat"] = Field("qat", description="qat: quantization-aware fine-tuning (the post-training path "
                                                    "is deploy.formats onnx-int8 alone)")
    epochs: int = Field(5, gt=0, description="fine-tuning epochs with fake quantization in the loop")
    lr: float = Field(0.01, gt=0, description="SGD learning rate of the fine-tuning (cosine to 0 over its steps); "
                                              "momentum and weight decay are the recipe's optim ones")
    calib_batches: int = Field(4, gt=0, description="clean training batches that set the activation ranges "
                                                    "before the first step")
    activation_scales: Literal["observed", "learned"] = Field(
        "observed", description="observed: a moving average of the activations' min/max during fine-tuning; "
                                "learned: started there, then trained by gradient (LSQ)")
    train_subset: int | None = Field(None, gt=0, description="fine-tune on the first this many of the run's "
                                                             "training positions (default: all)")
