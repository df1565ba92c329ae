"""Quantization decisions as typed data, written onto fx nodes and read by every later stage.

* :class:`QuantizerSpec` says how one tensor is quantized (dtype, granularity, range, symmetry). The
  format preset and the target build it once (``config.py``); passes and the exporter only read it.
* The *annotation* pass writes a frozen :class:`LinearQuantSpec` on each linear it quantizes: the layer's
  key, its family role, the key of the tensor it reads, and the specs of its weight, input and bias.
* A *recipe* turns calibration statistics into :class:`LinearQuantParams` (per timestep-group branch:
  each branch has its own nodes, so parameters are per group by construction).
* Smoothing folds record the transform they applied to a layer's input as :class:`InputSmoothing`, so
  error analysis can feed the quantized layer what it really sees.
* The *insertion* pass reads specs and parameters and rewrites the graph. Deciding and inserting never
  happen in the same pass.

Keys (``LinearQuantSpec.layer`` and ``.input_key``) are strings fixed at annotation time. They survive
node insertion and renaming, unlike fx node names: a layer key is the module name (``...attn1.to_q``),
with ``#k`` appended for the k-th extra call of a module that runs more than once; an input key is
``<first reader's layer key>:in``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import quant_ops  # noqa: F401  (registers torch.ops.ditq: every module that builds quantized graphs imports qspec)

SPEC_KEY = "ditq.quant_spec"
PARAMS_KEY = "ditq.quant_params"
PROVENANCE_KEY = "ditq.provenance"
SMOOTHING_KEY = "ditq.input_smoothing"
LAYER_KEY = "ditq.layer_key"
ROTATION_KEY = "ditq.input_rotation"  # Hadamard block size a layer's input was rotated with
OUTPUT_ROWS_KEY = "ditq.output_rows"  # how a fold rescaled a layer's output rows (OutputRows)
ATTENTION_KEY = "ditq.attention_spec"
ATTENTION_PARAMS_KEY = "ditq.attention_params"

from .quantizer_spec import QuantizerSpec  # noqa: E402,F401  (torch-free: config imports it from there)


@dataclass(frozen=True)
class LinearQuantSpec:
    """What annotation decided for one linear call."""

    layer: str  # layer key: module name, "#k" for the k-th extra call
    module: str  # the nn.Module the call belongs to
    role: str  # the family's name for the layer's job: qkv, attn_out, fc1, fc2, adaln, other
    input_key: str  # stable key of the tensor it reads; readers of one tensor share its Q/DQ
    weight: QuantizerSpec
    activation: QuantizerSpec | None  # None: weight-only (the input stays in float)
    # "int32": the bias is quantized with scale s_x * s_w (the form ONNX Runtime's QGemm takes);
    # "float": added in float after the integer GEMM.
    bias: str = "float"


@dataclass(frozen=True)
class AttentionQuantSpec:
    """Integer attention for one ``scaled_dot_product_attention`` call: q, k and v quantized per tensor
    before ``QK^T`` and ``PV``, the softmax output too (PTQ4DiT's attention quantization).

    ``v_key`` is observed at the value projection's output (``[B, T, heads * head_dim]``): a smoothing fold
    into V transforms its statistics exactly, channel by channel. ``scale`` is the softmax scale
    (``1/sqrt(head_dim)`` unless the call gives one); it is folded into q's dequantize scale."""

    layer: str
    q_key: str
    k_key: str
    v_key: str
    activation: QuantizerSpec
    scale: float


@dataclass(frozen=True)
class AttentionQuantParams:
    q: "ActivationParams"
    k: "ActivationParams"
    v: "ActivationParams"
    probs: "ActivationParams"  # softmax output in [0, 1]: scale 1/255, zero point 0


@dataclass(frozen=True)
class ActivationParams:
    """One quantizer of an input tensor (in its timestep group's branch).

    Integer and FP8 quantizers are ``QuantizeLinear(scale, zero_point)``. An FP4 quantizer first rounds onto
    ``scale * grid`` and then quantizes exactly to uint8 with scale ``scale / multiplier`` and zero point 128."""

    scale: float
    zero_point: float
    low: float  # the calibrated range the parameters cover
    high: float
    grid: str | None = None  # fp4: the chosen grid


@dataclass
class LinearQuantParams:
    """Parameters of one layer in one branch. ``activation`` is shared by every reader of the tensor."""

    activation: ActivationParams | None  # None for weight-only layers
    weight_scale: torch.Tensor  # [out_features] float32 (per channel), [out_features, blocks] (per block)
    recipe: str
    weight_method: str = "absmax"
    notes: list[str] = field(default_factory=list)
    weight_grid: str | None = None  # fp4: the grid chosen for this layer's weights


@dataclass(frozen=True)
class InputSmoothing:
    """The layer reads ``(X - shift) / scale`` instead of ``X``; its weight became ``W diag(scale)``
    and its bias ``b + W shift``. ``rule`` names the fold that did it."""

    scale: torch.Tensor  # [channels], float32
    shift: torch.Tensor | None
    rule: str

    def then(self, scale: torch.Tensor, shift: torch.Tensor | None, rule: str) -> "InputSmoothing":
        """Compose with a second smoothing applied on top: ``((X - z1)/s1 - z2)/s2 = (X - (z1 + s1 z2))/(s1 s2)``."""
        total_shift = self.shift
        if shift is not None:
            added = self.scale * shift
            total_shift = added if total_shift is None else total_shift + added
        return InputSmoothing(self.scale * scale, total_shift, f"{self.rule}+{rule}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift if self.shift is not None else x) / self.scale


@dataclass(frozen=True)
class OutputRows:
    """A fold rescaled the layer's output rows: it now computes ``y' = y * gain + offset`` (per output channel)
    where the float layer computed ``y`` (the V fold and the producer fold: ``(y - z)/s``; an adaLN fold on its
    scale rows ``(1 + y)/s - 1`` and shift rows ``(y - z)/s``). The fold applies it to the weight and bias
    (``passes/smoothing.rescale_output_rows``) and error analysis maps the quantized layer's output back with
    :meth:`undo` to compare it with the float layer's."""

    gain: torch.Tensor  # [out_features], float64
    offset: torch.Tensor  # [out_features], float64

    @classmethod
    def on_rows(cls, size: int, *changes: tuple[slice, torch.Tensor, torch.Tensor | float]) -> "OutputRows":
        """``y * gain + offset`` on each change's rows (``(rows, gain, offset)``), ``y`` on the others."""
        gain, offset = torch.ones(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
        for rows, row_gain, row_offset in changes:
            gain[rows] = row_gain.to(torch.float64)
            offset[rows] = row_offset.to(torch.float64) if isinstance(row_offset, torch.Tensor) else row_offset
        return cls(gain, offset)

    def then(self, later: "OutputRows") -> "OutputRows":
        """This change followed by ``later``: ``(y g1 + o1) g2 + o2``."""
        return OutputRows(self.gain * later.gain, self.offset * later.gain + later.offset)

    def undo(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.offset.to(y.dtype)) / self.gain.to(y.dtype)


def quantize_params_from_range(lo: float, hi: float, spec: QuantizerSpec) -> ActivationParams:
    """Affine parameters covering ``[lo, hi]`` on ``spec``'s grid; the range always includes 0 so zero
    is exact. Symmetric specs get zero point 0 and ``scale = max(|lo|, |hi|) / qmax``."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if spec.symmetric:
        scale = max(max(-lo, hi) / spec.qmax, 1e-12)
        return ActivationParams(scale, 0, lo, hi)
    scale = max((hi - lo) / spec.levels, 1e-12)
    zero_point = int(round(spec.qmin - lo / scale))
    return ActivationParams(scale, min(max(zero_point, spec.qmin), spec.qmax), lo, hi)


def symmetric_weight_scale(weight: torch.Tensor, spec: QuantizerSpec, grid: str | None = None) -> torch.Tensor:
    """Per-output-channel absmax / (the grid's largest value), kept away from 0 so that a dead row stays
    representable."""
    absmax = weight.detach().to(torch.float32).abs().amax(dim=1)
    return (absmax / grid_max(spec, grid)).clamp_min(1e-12)


def grid_max(spec: QuantizerSpec, grid: str | None = None) -> float:
    """The largest magnitude of the spec's grid, in units of the scale."""
    if spec.dtype == "fp4":
        from .grids import GRIDS

        return GRIDS[grid or spec.grids[0]].max
    return float(spec.qmax)


INT32_MAX = 2**31 - 1


def bias_fitting_weight_scale(bias: torch.Tensor, input_scale: float, weight_scale: torch.Tensor) -> torch.Tensor:
    """The smallest weight scales, no smaller than ``weight_scale``, for which ``round(b / (s_x s_w))``
    fits int32 — as ONNX Runtime's quantizer does for a bias whose scale is too small.

    Computed in float64: in float32, ``2^31 - 1`` rounds to ``2^31`` and the cast wraps to ``INT32_MIN``.
    A margin of 1% keeps the rounded value clear of the limit.
    """
    needed = bias.detach().to(torch.float64).abs() / (float(input_scale) * (INT32_MAX * 0.99))
    return torch.maximum(weight_scale.to(torch.float64), needed).to(torch.float32)


def quantize_bias_int32(bias: torch.Tensor, input_scale: float, weight_scale: torch.Tensor) -> torch.Tensor:
    """``round(b / (s_x s_w))`` computed in int64 and checked to fit int32 (never clamped or wrapped)."""
    bias_scale = float(input_scale) * weight_scale.to(torch.float64)
    quantized = torch.round(bias.detach().to(torch.float64) / bias_scale).to(torch.int64)
    if bool((quantized.abs() > INT32_MAX).any()):
        raise ValueError("int32 bias overflow: raise the weight scale with bias_fitting_weight_scale first")
    return quantized.to(torch.int32)


def attention_tensors(gm) -> dict[str, tuple[object, str]]:
    """key -> (the node producing the tensor, the attention layer) for every annotated attention call."""
    tensors = {}
    for node in gm.graph.nodes:
        spec = node.meta.get(ATTENTION_KEY)
        if spec is None:
            continue
        value = node.args[2]
        while value.op == "call_function" and value.target is not torch.ops.aten.linear.default:
            value = value.args[0]  # transpose(view(linear_v)) -> linear_v
        tensors[spec.q_key] = (node.args[0], spec.layer)
        tensors[spec.k_key] = (node.args[1], spec.layer)
        tensors[spec.v_key] = (value, spec.layer)
    return tensors


def layer_specs(gm) -> list[LinearQuantSpec]:
    """The annotated layers of a graph, in graph order."""
    return [node.meta[SPEC_KEY] for node in gm.graph.nodes if SPEC_KEY in node.meta]


def quantized_layer_weights(gm) -> dict[str, str]:
    """Layer key -> the name of its quantized weight tensor, for every layer Q/DQ insertion rewrote,
    in graph order, read back from the provenance insertion recorded."""
    return {node.meta[PROVENANCE_KEY]["layer"]: node.meta[PROVENANCE_KEY]["weight"] for node in gm.graph.nodes
            if node.meta.get(PROVENANCE_KEY, {}).get("role") == "matmul"}


def layer_records(branches: list) -> dict:
    """Layer key -> :class:`LayerRecord` (what ONNX lowering needs), from insertion's provenance in every
    timestep group's graph (``branches``, in group order). A layer's weight format can differ between groups
    (FP4 picks its grid per layer and group); the record then lists each group's (``group_formats``)."""
    from .exporters.lowering import LayerRecord

    formats: dict[str, list[str]] = {}
    records: dict[str, LayerRecord] = {}
    for gm in branches:
        for p in (node.meta.get(PROVENANCE_KEY, {}) for node in gm.graph.nodes):
            if p.get("role") != "matmul":
                continue
            formats.setdefault(p["layer"], []).append(p["weight_format"])
            records.setdefault(p["layer"], LayerRecord(p["weight"], p["weight_format"], p["bias"], p["module_role"],
                                                       p.get("activation", "static")))
    for layer, record in records.items():
        if len(set(formats[layer])) > 1:
            record.group_formats = tuple(formats[layer])
    return records


def quantized_layer_names(gm) -> list[str]:
    return list(quantized_layer_weights(gm))
