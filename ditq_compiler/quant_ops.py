"""Quantize / dequantize as torch custom ops, and their ONNX translations.

The graph passes insert these ops into the torch.fx graph, so the same graph is both the torch
"fake-quant" reference (it really rounds to uint8/int8 and back) and what the exporter lowers to ONNX
``QuantizeLinear`` / ``DequantizeLinear``. Scales and zero points are tensors (graph constants), so they
become named initializers in ONNX and the quantized integer dtype is the zero point's dtype, exactly as
in ONNX.

Rounding is round-half-to-even in both (``torch.round`` and ONNX QuantizeLinear), saturation to the
integer dtype's range. ``dequantize_block`` is DequantizeLinear with ``block_size`` (block-wise int4 weights);
``dynamic_quantize`` quantizes with run-time parameters (``--act dynamic``). A float8 (E4M3) zero point quantizes to FP8: ``saturate(x / scale + zp)`` rounded
to nearest even by the cast, as ONNX QuantizeLinear with ``saturate=1`` (checked bit for bit, ties and
subnormals included).

``round_to_grid`` rounds onto a 4-bit grid (``ditq_compiler/grids.py``): FP4 activations are rounded by it,
then quantized exactly to uint8 ``g * multiplier + 128`` so ONNX Runtime's int8 kernels compute the FP4
products. Its ONNX translation is the same elementwise computation (``Div``, ``Abs``, ``Where`` per binade,
``Round``, ``Mul``, ``Clip``, ``Mul``) in the same order, so torch and ONNX Runtime agree bit for bit.
"""

from __future__ import annotations

import torch
from torch.library import custom_op

DITQ_DOMAIN = "ai.ditq"  # markers that only exist between export and lowering
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
    if scale.dim() == 1:
        shape = _broadcast_shape(x.dim(), axis, scale.numel())
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    if zero_point.dtype == torch.float8_e4m3fn:
        from .grids import FLOAT8_E4M3_MAX

        q = x.to(torch.float32) / scale + zero_point.to(torch.float32)
        return torch.clamp(q, -FLOAT8_E4M3_MAX, FLOAT8_E4M3_MAX).to(torch.float8_e4m3fn)
    lo, hi = _INT_RANGES[zero_point.dtype]
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


@custom_op("ditq::dequantize_block", mutates_args=())
def dequantize_block(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
                     block_size: int) -> torch.Tensor:
    """ONNX DequantizeLinear with ``block_size``: ``scale``/``zero_point`` have ``x``'s shape except
    ``ceil(x.shape[axis] / block_size)`` along ``axis``; element ``i`` along ``axis`` uses entry ``i // block_size``
    (the last block may be partial)."""
    length = x.shape[axis]
    scale = scale.repeat_interleave(block_size, dim=axis).narrow(axis, 0, length)
    zero_point = zero_point.repeat_interleave(block_size, dim=axis).narrow(axis, 0, length)
    return (x.to(torch.float32) - zero_point.to(torch.float32)) * scale


@dequantize_block.register_fake
def _dequantize_block_fake(x, scale, zero_point, axis, block_size):
    return torch.empty_like(x, dtype=torch.float32)


@custom_op("ditq::dynamic_quantize", mutates_args=())
def dynamic_quantize(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Quantize-dequantize with parameters computed from ``x`` at run time, exactly as ONNX Runtime's CPU
    kernels compute them (``quantizers.dynamic_fake_quantize``): ``block_size`` 0 is ``DynamicQuantizeLinear``
    (uint8 affine over the whole tensor), ``block_size`` > 0 is ``MatMulNBits``' accuracy level 4 (int8
    symmetric per ``block_size`` inputs of each token)."""
    from .quantizers import dynamic_fake_quantize

    return dynamic_fake_quantize(x, block_size or None)


@dynamic_quantize.register_fake
def _dynamic_quantize_fake(x, block_size):
    return torch.empty_like(x, dtype=torch.float32)


@custom_op("ditq::round_to_grid", mutates_args=())
def round_to_grid(x: torch.Tensor, scale: torch.Tensor, grid: str) -> torch.Tensor:
    """``x`` rounded onto ``scale * grid`` (float32), nearest with ties to even; see ``grids.round_to_grid``."""
    from .grids import GRIDS, round_to_grid as reference

    return reference(x, scale, GRIDS[grid])


@round_to_grid.register_fake
def _round_to_grid_fake(x, scale, grid):
    return torch.empty_like(x, dtype=torch.float32)


def onnx_translation_table() -> dict:
    """Translations of the ditq ops for ``torch.onnx.export(custom_translation_table=...)``."""
    from onnxscript import opset21 as op

    def quantize_linear(x, scale, zero_point, axis: int):
        return op.QuantizeLinear(x, scale, zero_point, axis=axis)

    def dequantize_linear(x, scale, zero_point, axis: int):
        return op.DequantizeLinear(x, scale, zero_point, axis=axis)

    def dequantize_linear_block(x, scale, zero_point, axis: int, block_size: int):
        return op.DequantizeLinear(x, scale, zero_point, axis=axis, block_size=block_size)

    def dynamic_quantize_linear(x, block_size: int):
        if block_size == 0:  # standard ONNX: what DynamicQuantizeMatMul computes, runnable as is
            q, scale, zero_point = op.DynamicQuantizeLinear(x)
            return op.DequantizeLinear(q, scale, zero_point)
        # no ONNX op quantizes per block of a token at run time: a marker the CPU lowering folds into
        # MatMulNBits(accuracy_level=4) (lowering/cpu_nbits.py); no artifact is written with it
        from onnxscript import values

        from onnx import defs

        schema = defs.OpSchema("DynamicQuantizeBlock", DITQ_DOMAIN, 1,
                               inputs=[defs.OpSchema.FormalParameter("x", "tensor(float)")],
                               outputs=[defs.OpSchema.FormalParameter("y", "tensor(float)")],
                               attributes=[defs.OpSchema.Attribute("block_size", defs.OpSchema.AttrType.INT, "")])
        return values.Op(values.Opset(DITQ_DOMAIN, 1), "DynamicQuantizeBlock", schema)(x, block_size=block_size)

    def round_onto_grid(x, scale, grid: str):
        import numpy as np
        import onnx_ir as ir

        from .grids import GRIDS

        def const(value: float):  # float32 scalars (graph clean-up would fold value_float attributes to float64)
            return op.Constant(value=ir.tensor(np.array(value, dtype=np.float32)))

        spec = GRIDS[grid]
        v = op.Div(x, scale)
        magnitude = op.Abs(v)
        step = const(spec.binades[0][1])
        for threshold, binade_step in spec.binades[1:]:
            step = op.Where(op.GreaterOrEqual(magnitude, const(threshold)), const(binade_step), step)
        rounded = op.Mul(op.Round(op.Div(v, step)), step)
        clipped = op.Clip(rounded, const(-spec.max), const(spec.max))
        return op.Mul(clipped, scale)

    return {
        torch.ops.ditq.quantize.default: quantize_linear,
        torch.ops.ditq.dequantize.default: dequantize_linear,
        torch.ops.ditq.dequantize_block.default: dequantize_linear_block,
        torch.ops.ditq.dynamic_quantize.default: dynamic_quantize_linear,
        torch.ops.ditq.round_to_grid.default: round_onto_grid,
    }
