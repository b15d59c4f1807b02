"""The fake-quantized student: BatchNorm folded, then INT8 fake quantization in front of every Conv2d/Linear.

Eager-mode ``torch.ao.quantization`` QAT, not PT2E: torch 2.14 no longer ships
``torch.ao.quantization.quantize_pt2e`` (it moved to ``torchao``, not a dependency here). The
arithmetic is what onnxruntime's INT8 QDQ and TensorRT's explicit quantization execute:

* weights: int8 per output channel, symmetric (zero point 0, range [-127, 127]), the scale the
  per-channel min/max of the current weights (so the exported int8 weights are exact);
* activations: int8 per tensor, symmetric (zero point 0, as TensorRT requires), on the input of
  every Conv2d and Linear; the scale either ``observed``: a moving average of the min/max seen during
  fine-tuning (``MovingAverageMinMaxObserver``), or ``learned``: started from the calibration's
  observed value, then a parameter trained by gradient with the weights (LSQ, Esser et al. 2020:
  ``torch._fake_quantize_learnable_per_tensor_affine``, gradient scaled by 1/sqrt(numel * 127),
  no weight decay), in the attacks' passes as well; frozen for export either way;
* biases: on the int32 grid of scale activation scale x weight scale (zero point 0), as onnxruntime's
  QLinearConv, its graph optimizer's rewrite of a float bias after DequantizeLinear inputs, and fbgemm
  add them (``quantize_bias``), so the exported float bias is the value every runtime adds;
* BatchNorm folded into the preceding convolution first (``torch.fx`` conv-bn fusion, eval
  statistics), as onnxruntime's pre-processing does before quantizing, so the quantized weights
  are the ones that run.

A leaf layer with parameters other than Conv2d and Linear (BatchNorm not after a convolution,
ConvTranspose2d, Embedding, ...) is refused with one line naming it (``UsageError``, exit 2).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

from ciard_deploy.errors import UsageError

#: layers without parameters the quantizer leaves in float (they commute with per-tensor scales or
#: run between quantized layers); anything else with parameters is refused
_QUANTIZED = (nn.Conv2d, nn.Linear)


def weight_fake_quant() -> FakeQuantize:
    """Per-output-channel symmetric int8 weights (ranges [-127, 127], zero point 0)."""
    return FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-127, quant_max=127,
                        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0, averaging_constant=1.0)


def activation_fake_quant() -> FakeQuantize:
    """Per-tensor symmetric int8 activations (zero point 0), moving-average min/max."""
    return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
                        qscheme=torch.per_tensor_symmetric, averaging_constant=0.01)


class FakeQuantLayer(nn.Module):
    """A Conv2d or Linear with fake-quantized input and weights (the layer keeps its float weights)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.act_fq = activation_fake_quant()
        self.weight_fq = weight_fake_quant()
        self.frozen = False  # set by ``freeze``: fixed scales in train mode too
        self.act_scale: nn.Parameter | None = None  # set by ``learn_activation_scales``

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_scale is not None and not self.frozen:  # learned (LSQ) activation scale
            a = self.act_fq
            grad_factor = 1.0 / math.sqrt(x[0].numel() * a.quant_max)
            x = torch._fake_quantize_learnable_per_tensor_affine(x, self.act_scale.abs() + 1e-12, self._zero,
                                                                 a.quant_min, a.quant_max, grad_factor)
            w = self.weight_fq(self.layer.weight) if self.training else torch.fake_quantize_per_channel_affine(
                self.layer.weight, self.weight_fq.scale, self.weight_fq.zero_point.to(torch.int32), 0, -128, 127)
        elif self.frozen or not self.training:  # eval (the attacks' forward passes): scales fixed, no observing
            a, q = self.act_fq, self.weight_fq
            x = torch.fake_quantize_per_tensor_affine(x, float(a.scale), int(a.zero_point), a.quant_min, a.quant_max)
            # ONNX's QuantizeLinear saturates to [-128, 127]; with scale max|w| / 127 no weight reaches -128
            w = torch.fake_quantize_per_channel_affine(self.layer.weight, q.scale, q.zero_point.to(torch.int32), 0,
                                                       -128, 127)
        else:
            x = self.act_fq(x)
            w = self.weight_fq(self.layer.weight)
        b = self.layer.bias
        if b is not None:  # on the grid of the scales this pass used
            act = self.act_fq.scale if self.act_scale is None or self.frozen else self.act_scale.abs() + 1e-12
            b = quantize_bias(b, act, self.weight_fq.scale)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, b)
        return F.linear(x, w, b)

    @property
    def _zero(self) -> torch.Tensor:
        return torch.zeros(1, device=self.act_scale.device)


def quantize_bias(bias: torch.Tensor, act_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The bias on the int32 grid of its output channel, ``round(b / s) * s`` with ``s = act_scale * weight_scale``
    (float32, rounding half to even), as integer kernels add it; gradient straight through (the identity).

    onnxruntime's graph optimizer rewrites the float bias of a DequantizeLinear -> Conv/Gemm this way
    (``WeightBiasQuantization``, on the layers it picks), QLinearConv and fbgemm take it in int32, and
    ``export.py`` writes these values: student, artifact and the runtime's rewrite add the same bias.
    """
    s = act_scale.detach().to(bias.dtype).reshape(()) * weight_scale.detach().to(bias.dtype)
    v = bias / s
    return torch.round(v.detach()) * s + (bias - bias.detach())  # value exactly round(v) * s


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval) with every Conv2d -> BatchNorm2d pair folded (``torch.fx``)."""
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).cpu().eval()
    try:
        return fuse(model, inplace=True)
    except Exception as e:  # data-dependent control flow, unsupported Python in forward
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"QAT cannot trace the model with torch.fx to fold its BatchNorm: {first}") from None


def check_quantizable(model: nn.Module) -> None:
    """Refuses (one line naming it) the first leaf layer with parameters the quantizer cannot handle."""
    for name, m in model.named_modules():
        if isinstance(m, (*_QUANTIZED, FakeQuantLayer, FakeQuantize)) or list(m.children()):
            continue
        if any(True for _ in m.parameters(recurse=False)):
            bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
            what = "BatchNorm not after a Conv2d (it cannot be folded)" if bn else "not supported"
            raise UsageError(f"QAT: layer {name!r} ({type(m).__name__}) is {what}; the INT8 quantizer handles "
                             "Conv2d and Linear (BatchNorm2d folded into the Conv2d before it)")
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise UsageError(f"QAT: layer {name!r} (Conv2d) uses padding_mode {m.padding_mode!r}; only 'zeros'")


def prepare_qat(model: nn.Module) -> nn.Module:
    """The fake-quantized copy of a float student: BatchNorm folded, Conv2d/Linear wrapped (train mode)."""
    folded = fold_batchnorm(model)
    check_quantizable(folded)
    for name, m in list(folded.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, _QUANTIZED):
                setattr(m, child_name, FakeQuantLayer(child))
    folded.train()
    return folded


def calibrate(model: nn.Module, batches: Any) -> None:
    """Runs the observers (no gradient) on ``batches`` so the scales start from the data, not from zero."""
    with torch.no_grad():
        for x in batches:
            model(x)


def learn_activation_scales(model: nn.Module) -> list[nn.Parameter]:
    """Turns every layer's calibrated activation scale into a trained parameter (LSQ); returns them (the
    optimizer's no-weight-decay group). The observers stop: the scales move by gradient only."""
    params = []
    for m in fake_quant_layers(model).values():
        m.act_fq.disable_observer()
        m.act_scale = nn.Parameter(m.act_fq.scale.detach().clone().float().reshape(1))
        params.append(m.act_scale)
    return params


def freeze(model: nn.Module) -> nn.Module:
    """Stops the observers (scales fixed; a learned scale written into its fake quantizer) and puts
    ``model`` in eval mode: what the export writes."""
    model.apply(torch.ao.quantization.disable_observer)
    for m in fake_quant_layers(model).values():
        if m.act_scale is not None:
            with torch.no_grad():
                m.act_fq.scale.copy_(m.act_scale.detach().abs().reshape(m.act_fq.scale.shape) + 1e-12)
            m.act_scale = None
        m.frozen = True
    return model.eval()


def fake_quant_layers(model: nn.Module) -> dict[str, FakeQuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLayer)}


def scales(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The learned scales per quantized layer (activation scale, weight scale range), for the manifest."""
    out = {}
    for name, m in fake_quant_layers(model).items():
        w = m.weight_fq.scale.detach()
        out[name] = {"activation_scale": float(m.act_fq.scale.item()),
                     "weight_scale_min": float(w.min()), "weight_scale_max": float(w.max())}
    return out
