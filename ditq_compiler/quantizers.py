"""The quantizer arithmetic of every format, driven by :class:`QuantizerSpec` and the chosen parameters.

One place answers, for any spec: how a weight is stored (dtype, values) and dequantized, and what a
quantized activation looks like. Q/DQ insertion, parameter search, sensitivity analysis and error analysis
all call these functions, so what is searched is what is exported.

=============  ==============================================  ===========================================
spec dtype     weight stored as (per output channel scale s)   activation (per tensor)
=============  ==============================================  ===========================================
int8 / int4    ``clamp(round(W/s), qmin, qmax)`` in int8       uint8 affine ``QuantizeLinear(s, z)``
float8e4m3fn   ``fp8(W/s)`` (saturating, nearest even)         ``QuantizeLinear(s, 0 as fp8)``
fp4            ``g * m`` in int8, dequantized with ``s / m``   round onto ``s * grid``, then uint8
               (``g`` the grid value, ``m`` its multiplier)    ``g * m + 128`` with scale ``s / m``
=============  ==============================================  ===========================================
"""

from __future__ import annotations

import torch

from .grids import GRIDS, grid_integers, quantize_float8, round_to_grid
from .qspec import ActivationParams, QuantizerSpec

FP4_ZERO_POINT = 128


def _per_row(scale: torch.Tensor) -> torch.Tensor:
    return scale.to(torch.float32)[:, None]


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, spec: QuantizerSpec,
                    grid: str | None = None) -> torch.Tensor:
    """The stored weight ``[out, in]`` in ``spec.torch_dtype`` (see the table above)."""
    w = weight.detach().to(torch.float32)
    if spec.dtype == "float8e4m3fn":
        return quantize_float8(w, _per_row(scale))
    if spec.dtype == "fp4":
        return grid_integers(w, scale.to(torch.float32), GRIDS[grid], axis=0)
    return torch.clamp(torch.round(w / _per_row(scale)), spec.qmin, spec.qmax).to(spec.torch_dtype)


def weight_dequantize_scale(scale: torch.Tensor, spec: QuantizerSpec, grid: str | None = None) -> torch.Tensor:
    """The scale of the weight's DequantizeLinear: ``s``, or ``s / multiplier`` for fp4's int8 form."""
    if spec.dtype == "fp4":
        return (scale.to(torch.float64) / GRIDS[grid].multiplier).to(torch.float32)
    return scale.to(torch.float32)


def fake_quantize_weight(weight: torch.Tensor, scale: torch.Tensor, spec: QuantizerSpec,
                         grid: str | None = None) -> torch.Tensor:
    """The weight as the quantized layer sees it, float32 ``[out, in]``."""
    stored = quantize_weight(weight, scale, spec, grid)
    return stored.to(torch.float32) * _per_row(weight_dequantize_scale(scale, spec, grid))


def activation_qdq(params: ActivationParams, spec: QuantizerSpec) -> tuple[float, torch.Tensor]:
    """The (scale, zero point tensor) of the activation's QuantizeLinear/DequantizeLinear pair."""
    if spec.dtype == "fp4":
        return params.scale / GRIDS[params.grid].multiplier, torch.tensor(FP4_ZERO_POINT, dtype=torch.uint8)
    if spec.dtype == "float8e4m3fn":
        return params.scale, torch.tensor(0.0).to(torch.float8_e4m3fn)
    return params.scale, torch.tensor(int(params.zero_point), dtype=spec.torch_dtype)


def fake_quantize_activation(x: torch.Tensor, params: ActivationParams, spec: QuantizerSpec) -> torch.Tensor:
    """``x`` as the quantized layer sees it (the same ops as the graph, so the same numbers)."""
    from .quant_ops import dequantize, quantize

    if spec.dtype == "fp4":
        x = round_to_grid(x, torch.tensor(params.scale, dtype=torch.float32), GRIDS[params.grid])
    scale, zero = activation_qdq(params, spec)
    scale_t = torch.tensor(scale, dtype=torch.float32)
    return dequantize(quantize(x, scale_t, zero, 0), scale_t, zero, 0)
