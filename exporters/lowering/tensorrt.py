"""Lowering for ONNX Runtime's TensorRT provider: explicit symmetric Q/DQ, one model per timestep group.

TensorRT builds its own kernels from an explicitly quantized graph: it fuses ``DequantizeLinear`` on an int8
(or FP8) weight initializer and ``QuantizeLinear``/``DequantizeLinear`` on the activation into an int8 (FP8)
GEMM. Its ONNX parser requires ``x_zero_point == 0`` on ``DequantizeLinear`` and ``y_zero_point == 0`` on
``QuantizeLinear`` and takes int8/FP8/int4 Q/DQ only; it has no ``SplitToSequence``/``SequenceAt``, and
``NonZero`` only on float inputs (onnx-tensorrt ``docs/operators.md``, TensorRT 10). Float precision is left
to TensorRT: the model stays float32 and the provider is started with ``trt_fp16_enable`` (see
``ditq_compiler/runtime.py``), so TensorRT picks float16 where it is faster.

Passes, in order:

1. ``SymmetricActivationQuantizers``: an integer activation quantizer ``(s, z)`` (uint8 affine on the CPU
   target) covers ``[(qmin - z) s, (qmax - z) s]``; the int8 symmetric quantizer covering the same range has
   ``s' = max(|(qmin - z) s|, |(qmax - z) s|) / 127`` and zero point 0. The scale and zero-point initializers
   are rewritten in place (their names stay). A tensorrt-target compile already calibrates int8 symmetric
   quantizers (no-op here); re-lowering a CPU artifact changes the numerics (one range end gets coarser).
   FP8 quantizers are symmetric already.
2. ``DequantizeConstantBiases``, ``SplitSequencesToSplit``, ``RemoveDeadCode`` (``shared.py``).
3. ``CheckTensorrtForm``: every Q/DQ left is int8 or FP8 with a zero point of 0; anything else is an error
   naming the tensor.
4. ``ExtractGroupModels``: with timestep groups, the artifact's ``model.onnx`` selects each row's group with
   ``If``/``NonZero``/``GatherND``/``ScatterND``, which TensorRT cannot take reliably (``NonZero`` on a bool
   mask is outside its parser's support, and ``If`` branches must be shape-compatible engines). The pass writes
   one standalone model per group (``model.group<g>.onnx``): ditq's runtime computes each row's group from
   ``timestep`` and runs that group's model on the group's rows.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...errors import DitqError
from . import LayerRecord, LoweringContext, LoweringPass, all_nodes
from .shared import (DequantizeConstantBiases, RemoveDeadCode, SplitSequencesToSplit, constant_array,
                     split_group_models)

_INTEGER_RANGES = {ir.DataType.UINT8: (0, 255), ir.DataType.INT8: (-128, 127)}
_SYMMETRIC_TYPES = {ir.DataType.INT8, ir.DataType.FLOAT8E4M3FN, ir.DataType.INT4}


def symmetric_int8_scale(scale: float, zero_point: int, qmin: int, qmax: int) -> float:
    """The int8 symmetric scale covering what ``(scale, zero_point)`` on ``[qmin, qmax]`` covers."""
    return max(abs((qmin - zero_point) * scale), abs((qmax - zero_point) * scale)) / 127.0


class SymmetricActivationQuantizers(LoweringPass):
    name = "symmetric_activation_quantizers"

    def lower(self, model):
        converted: dict[int, tuple[float, float]] = {}  # id(scale value) -> (old, new)
        declined = []
        for node in list(all_nodes(model.graph)):
            if node.op_type != "QuantizeLinear" or constant_array(node.inputs[0]) is not None:
                continue
            scale, zero = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
            if zero is None or zero.dtype not in _INTEGER_RANGES:
                continue  # FP8 (symmetric already) or no zero point
            z = constant_array(zero)
            s = constant_array(scale)
            if z is None or s is None or s.size != 1:
                declined.append(f"{node.name}: not a constant per-tensor quantizer")
                continue
            if zero.dtype == ir.DataType.INT8 and int(z.reshape(-1)[0]) == 0:
                continue  # int8 symmetric already
            qmin, qmax = _INTEGER_RANGES[zero.dtype]
            new_scale = np.float32(symmetric_int8_scale(float(s.reshape(-1)[0]), int(z.reshape(-1)[0]), qmin, qmax))
            if id(scale) in converted and converted[id(scale)][1] != float(new_scale):
                raise DitqError(f"{scale.name} is shared by quantizers with different zero points; "
                                "it cannot become one symmetric scale")
            converted[id(scale)] = (float(s.reshape(-1)[0]), float(new_scale))
            scale.const_value = ir.tensor(np.asarray(new_scale, dtype=np.float32).reshape(s.shape), name=scale.name)
            zero.const_value = ir.tensor(np.zeros(z.shape, dtype=np.int8), name=zero.name)
            zero.dtype = ir.DataType.INT8
            node.outputs[0].dtype = ir.DataType.INT8
        ratios = [new / old for old, new in converted.values() if old > 0] or [1.0]
        summary = (f"made {len(converted)} activation quantizers int8 symmetric (zero point 0); numerics change: "
                   f"scales grew by x{min(ratios):.2f}..x{max(ratios):.2f}"
                   if converted else "every activation quantizer is symmetric already")
        if declined:
            summary += f"; declined {len(declined)} ({declined[0]})"
        return bool(converted), summary


class CheckTensorrtForm(LoweringPass):
    name = "check_tensorrt_form"

    def lower(self, model):
        counts = {"QuantizeLinear": 0, "DequantizeLinear": 0}
        for node in all_nodes(model.graph):
            if node.op_type not in counts:
                continue
            counts[node.op_type] += 1
            quantized = node.outputs[0] if node.op_type == "QuantizeLinear" else node.inputs[0]
            zero = node.inputs[2] if len(node.inputs) > 2 else None
            dtype = quantized.dtype if quantized.dtype is not None else (zero.dtype if zero is not None else None)
            if dtype not in _SYMMETRIC_TYPES:
                raise DitqError(f"{node.name} quantizes to {dtype}; TensorRT takes int8/FP8/int4 Q/DQ only")
            z = constant_array(zero) if zero is not None else None
            if z is not None and np.any(z.astype(np.float32) != 0):
                raise DitqError(f"{zero.name} is a non-zero zero point; TensorRT's parser requires 0")
            if node.op_type == "QuantizeLinear" and zero is not None and z is None:
                raise DitqError(f"{node.name}'s zero point is not a constant")
        return False, (f"{counts['QuantizeLinear']} QuantizeLinear and {counts['DequantizeLinear']} DequantizeLinear, "
                       "all int8/FP8 with zero point 0")


class ExtractGroupModels(LoweringPass):
    name = "extract_group_models"

    def lower(self, model):
        groups = split_group_models(ir.to_proto(model))
        self.context.group_models = [ir.from_proto(group_model) for group_model in groups]
        if not groups:
            return False, "one timestep group: model.onnx has no If dispatch, TensorRT takes it as is"
        return False, (f"wrote {len(groups)} per-group models (model.group<g>.onnx): ditq's runtime picks each row's "
                       "group from its timestep; model.onnx keeps the If dispatch for the other providers")


def passes(layers: dict[str, LayerRecord], context: LoweringContext) -> list[LoweringPass]:
    return [SymmetricActivationQuantizers(layers, context), DequantizeConstantBiases(layers, context),
            SplitSequencesToSplit(layers, context), RemoveDeadCode(layers, context),
            CheckTensorrtForm(layers, context), ExtractGroupModels(layers, context)]
