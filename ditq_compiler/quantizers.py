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

Block-wise weights (``--weight-block B``, int4): ``s`` is ``[out, ceil(in / B)]``, input ``j`` of row ``i``
uses ``s[i, j // B]`` (the last block may be partial). Dynamic activations (``--act dynamic``) have no
calibrated parameters; :func:`dynamic_fake_quantize` computes them from the tensor as ONNX Runtime does.
"""

from __future__ import annotations

import torch

from .grids import GRIDS, grid_integers, quantize_float8, round_to_grid
from .qspec import ActivationParams, QuantizerSpec

FP4_ZERO_POINT = 128


def _per_row(scale: torch.Tensor, in_features: int | None = None, block_size: int | None = None) -> torch.Tensor:
    """The scale broadcast over ``[out, in]``: ``[out, 1]`` per channel, ``[out, in]`` per block."""
    scale = scale.to(torch.float32)
    if scale.dim() == 2:
        return scale.repeat_interleave(block_size, dim=1)[:, :in_features]
    return scale[:, None]


def blocks(in_features: int, block_size: int) -> int:
    return -(-in_features // block_size)


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, spec: QuantizerSpec,
                    grid: str | None = None) -> torch.Tensor:
    """The stored weight ``[out, in]`` in ``spec.torch_dtype`` (see the table above)."""
    w = weight.detach().to(torch.float32)
    if spec.dtype == "float8e4m3fn":
        return quantize_float8(w, _per_row(scale))
    if spec.dtype == "fp4":
        return grid_integers(w, scale.to(torch.float32), GRIDS[grid], axis=0)
    row_scale = _per_row(scale, w.shape[1], spec.block_size)
    return torch.clamp(torch.round(w / row_scale), spec.qmin, spec.qmax).to(spec.torch_dtype)


def weight_dequantize_scale(scale: torch.Tensor, spec: QuantizerSpec, grid: str | None = None) -> torch.Tensor:
    """The scale of the weight's DequantizeLinear: ``s``, or ``s / multiplier`` for fp4's int8 form."""
    if spec.dtype == "fp4":
        return (scale.to(torch.float64) / GRIDS[grid].multiplier).to(torch.float32)
    return scale.to(torch.float32)


def fake_quantize_weight(weight: torch.Tensor, scale: torch.Tensor, spec: QuantizerSpec,
                         grid: str | None = None) -> torch.Tensor:
    """The weight as the quantized layer sees it, float32 ``[out, in]``."""
    stored = quantize_weight(weight, scale, spec, grid)
    return stored.to(torch.float32) * _per_row(weight_dequantize_scale(scale, spec, grid), stored.shape[1],
                                               spec.block_size)


def activation_qdq(params: ActivationParams, spec: QuantizerSpec) -> tuple[float, torch.Tensor]:
    """The (scale, zero point tensor) of the activation's QuantizeLinear/DequantizeLinear pair."""
    if spec.dynamic:
        raise ValueError("a dynamic activation quantizer has no calibrated scale (the kernel computes it)")
    if spec.dtype == "fp4":
        return params.scale / GRIDS[params.grid].multiplier, torch.tensor(FP4_ZERO_POINT, dtype=torch.uint8)
    if spec.dtype == "float8e4m3fn":
        return params.scale, torch.tensor(0.0).to(torch.float8_e4m3fn)
    return params.scale, torch.tensor(int(params.zero_point), dtype=spec.torch_dtype)


def fake_quantize_activation(x: torch.Tensor, params: ActivationParams, spec: QuantizerSpec) -> torch.Tensor:
    """``x`` as the quantized layer sees it (the same ops as the graph, so the same numbers)."""
    from .quant_ops import dequantize, quantize

    if spec.dynamic:
        return dynamic_fake_quantize(x, spec.block_size)
    if spec.dtype == "fp4":
        x = round_to_grid(x, torch.tensor(params.scale, dtype=torch.float32), GRIDS[params.grid])
    scale, zero = activation_qdq(params, spec)
    scale_t = torch.tensor(scale, dtype=torch.float32)
    return dequantize(quantize(x, scale_t, zero, 0), scale_t, zero, 0)


def dynamic_fake_quantize(x: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """``x`` quantized and dequantized with parameters computed from ``x`` itself, in float32 with the
    operations ONNX Runtime's CPU kernels use (matched to float rounding of the GEMM: ``tests/test_formats.py``).

    * ``block_size`` None, ``DynamicQuantizeLinear`` / ``DynamicQuantizeMatMul``, over the whole tensor:
      ``lo = min(min x, 0)``, ``hi = max(max x, 0)``, ``s = (hi - lo) / 255`` (1 if ``hi == lo``),
      ``z = round(clip(-lo / s, 0, 255))``, ``q = clip(round(x / s) + z, 0, 255)``, ``x' = (q - z) s``.
      The whole tensor means the whole batch: one row's parameters depend on the rows run with it.
    * ``block_size`` B, ``MatMulNBits`` at accuracy level 4 (MLAS's int8 path), per token and per B inputs
      (a partial last block is padded with zeros, which change no maximum): ``s = max |x_b| / 127``,
      ``q = round(x_b * (1 / s))`` (0 where ``s`` is 0), ``x' = q s``.

    ``round`` is half to even on both sides."""
    x = x.to(torch.float32)
    if block_size is None:
        lo = torch.clamp(x.min(), max=0.0)
        hi = torch.clamp(x.max(), min=0.0)
        scale = torch.where(hi == lo, torch.ones((), dtype=torch.float32), (hi - lo) / 255.0)
        zero = torch.round(torch.clamp(-lo / scale, 0.0, 255.0))
        q = torch.clamp(torch.round(x / scale) + zero, 0.0, 255.0)
        return (q - zero) * scale
    k = x.shape[-1]
    pad = blocks(k, block_size) * block_size - k
    padded = torch.nn.functional.pad(x, (0, pad)) if pad else x
    grouped = padded.reshape(*x.shape[:-1], -1, block_size)
    scale = grouped.abs().amax(dim=-1, keepdim=True) / 127.0
    inverse = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, torch.ones_like(scale)),
                          torch.zeros_like(scale))
    q = torch.round(grouped * inverse)
    return (q * scale).reshape(padded.shape)[..., :k]
