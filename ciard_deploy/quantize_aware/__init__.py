"""Quantization-aware robust fine-tuning (issue 17): a distilled student, fake-quantized like onnxruntime's
and TensorRT's INT8 QDQ, fine-tuned with its own method's loss against its own adversarial examples, then
exported as an INT8 QDQ ONNX carrying the learned scales.

    fakequant.py  BatchNorm folding, the fake-quant layers, freezing, the scales
    finetune.py   the fine-tuning (the recipe's method and teachers, the trainer's step)
    export.py     the QDQ ONNX with ciard metadata and its manifest, checked in onnxruntime

Imports torch: import the submodules where needed (the CLI imports them inside its command).
"""
