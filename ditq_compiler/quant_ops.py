"""Quantize / dequantize as torch custom ops, and their ONNX translations.

The graph passes insert these ops into the torch.fx graph, so the same graph is both the torch
"fake-quant" reference (it really rounds to uint8/int8 and back) and what the exporter lowers to ONNX
``QuantizeLinear`` / ``DequantizeLinear``. Scales and zero points are tensors (graph constants), so they
become named initializers in ONNX and the quantized integer dtype is the zero point's dtype, exactly as
in ONNX.

Rounding is round-half-to-even in both (``torch.round`` and ONNX QuantizeLinear), saturation to the
integer dtype's range.
"""

from __future__ import annotations

import torch
from torch.library import custom_op

_INT_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int32: (-(2**31), 2**31 - 1)}


def _broadcast_shape(rank: int, axis: int, length: int) -> list[int]:
    shape = [1] * rank
    shape[axis] = length
    return shape


@custom_op("ditq::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX QuantizeLinear: ``saturate(round(x / scale) + zero_point)`` in ``zero_point``'s dtype.

    A 0-d ``scale`` quantizes per tensor; a 1-d one per slice along ``axis``.
    """
    lo, hi = _INT_RANGES[zero_point.dtype]
    if scale.dim() == 1:
        shape = _broadcast_shape(x.dim(), axis, scale.numel())
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    q = torch.round(x / scale) + zero_point.to(torch.float32)
    return torch.clamp(q, lo, hi).to(zero_point.dtype)


@quantize.register_fake
def _quantize_fake(x, scale, zero_point, axis):
    return torch.empty_like(x, dtype=zero_point.dtype)


@custom_op("ditq::dequantize", mutates_args=())
def dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX DequantizeLinear: ``(x - zero_point) * scale`` in float32."""
    if scale.dim() == 1:
        shape = _broadcast_shape(x.dim(), axis, scale.numel())
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return (x.to(torch.float32) - zero_point.to(torch.float32)) * scale


@dequantize.register_fake
def _dequantize_fake(x, scale, zero_point, axis):
    return torch.empty_like(x, dtype=torch.float32)


def onnx_translation_table() -> dict:
    """Translations of the ditq ops for ``torch.onnx.export(custom_translation_table=...)``."""
    from onnxscript import opset21 as op

    def quantize_linear(x, scale, zero_point, axis: int):
        return op.QuantizeLinear(x, scale, zero_point, axis=axis)

    def dequantize_linear(x, scale, zero_point, axis: int):
        return op.DequantizeLinear(x, scale, zero_point, axis=axis)

    return {
        torch.ops.ditq.quantize.default: quantize_linear,
        torch.ops.ditq.dequantize.default: dequantize_linear,
    }
