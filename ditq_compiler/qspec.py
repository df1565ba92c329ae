"""Frozen quantization decisions written onto fx nodes.

The *annotation* pass decides what is quantized and writes a :class:`LinearQuantSpec`; a *recipe*
pass turns calibration statistics into :class:`LinearQuantParams`; the *insertion* pass reads both and
rewrites the graph. Deciding and inserting never happen in the same pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ActivationQuantSpec, WeightQuantSpec

SPEC_KEY = "ditq.quant_spec"
PARAMS_KEY = "ditq.quant_params"
PROVENANCE_KEY = "ditq.provenance"


@dataclass(frozen=True)
class LinearQuantSpec:
    layer: str
    # fx name of the tensor the layer reads: layers reading one tensor (q, k, v) share its Q/DQ pair.
    input_key: str
    weight: WeightQuantSpec
    activation: ActivationQuantSpec


@dataclass(frozen=True)
class LinearQuantParams:
    """Per timestep group ``g``: ``input_scale[g]``, ``input_zero_point[g]``; the weight is shared by all groups."""

    input_scale: tuple[float, ...]
    input_zero_point: tuple[int, ...]
    weight_scale: torch.Tensor  # [out_features], float32
    recipe: str


def quantize_params_from_range(lo: float, hi: float, spec: ActivationQuantSpec) -> tuple[float, int]:
    """Affine uint8 parameters covering ``[lo, hi]``; the range always includes 0 so zero is exact."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-12)
    zero_point = int(round(-lo / scale))
    return scale, min(max(zero_point, 0), 255)


def symmetric_weight_scale(weight: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """Per-output-channel absmax / qmax, kept away from 0 so that a dead row stays representable."""
    absmax = weight.detach().to(torch.float32).abs().amax(dim=1)
    return (absmax / spec.qmax).clamp_min(1e-12)


def quantized_layer_names(gm) -> list[str]:
    """Layers rewritten by Q/DQ insertion, in graph order, read back from the nodes' provenance."""
    names = (node.meta[PROVENANCE_KEY]["layer"] for node in gm.graph.nodes
             if PROVENANCE_KEY in node.meta and node.target is torch.ops.aten.matmul.default)
    return list(dict.fromkeys(names))
