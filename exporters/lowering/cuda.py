"""Lowering for ONNX Runtime's CUDA provider: float16 compute, weight-only ``MatMulNBits``, fused attention.

Why this form (RESEARCH.md, "ONNX Runtime facts"): ONNX Runtime's CUDA provider has no integer GEMM for Q/DQ
graphs (its QDQ transformer makes ``QLinearMatMul``/``MatMulIntegerToFloat`` only for the CPU), so a W8A8 Q/DQ
graph would run Q, DQ and a float MatMul as separate kernels, slower than float16. What the provider runs
fast is float16, ``com.microsoft.MatMulNBits`` (weights in 4 or 8 bits, float16 activations) and
``com.microsoft.MultiHeadAttention``. Activation quantization does not apply: a cuda-target compile annotates
no activation quantizer (``TargetSpec.activations == "none"``), and re-lowering a CPU artifact drops them.

Passes, in order:

1. ``DropActivationQuantizers``: ``x -> QuantizeLinear -> DequantizeLinear -> y`` becomes ``x`` (no-op for a
   cuda-target compile; re-lowering changes the numerics to the weight-only ones, and has no inverse).
2. ``DequantizeConstantBiases``, ``SplitSequencesToSplit`` (``shared.py``).
3. ``MarkFloat32Islands``: decides which nodes stay float32 and records it on the node (``ditq.precision``,
   with the reason). Structural: a sinusoid's argument (the timestep embedding ``t * f``, t up to 999: float16's
   spacing there is 0.5, so ``sin`` would be noise) and the sinusoid. Measured: the model runs in float32 on
   the given denoiser inputs (calibration inputs of every timestep group) and a node whose output, or for the
   numerically fragile ops (LayerNormalization, Softmax, the adaLN modulation) whose input, exceeds
   ``FP16_LIMIT`` = 65504 / 4 in magnitude stays float32: float16's largest finite value with a 4x headroom
   for inputs beyond those seen. (ONNX Runtime's float16 LayerNormalization and Softmax accumulate in float32,
   so what can overflow is the tensors themselves.)
4. ``FuseMultiHeadAttention`` (``attention.py``): the exported scaled-dot-product attention becomes
   ``com.microsoft.MultiHeadAttention`` (the CUDA kernel picks flash / memory-efficient attention).
5. ``WeightsToMatMulNBits``: ``MatMul(x, DequantizeLinear(W_q [K, N], s [N], 0, axis=1))`` becomes
   ``MatMulNBits(x, B, scales, K, N, bits, block_size)``. Algebra: MatMulNBits computes
   ``y[n] = sum_k x[k] (B[n, k] - z) scales[n, k // block]`` with the default zero point ``z = 2^(bits-1)``;
   storing ``B[n, k] = W_q[k, n] + 2^(bits-1)`` and repeating each output channel's scale over its
   ``ceil(K / block)`` blocks gives exactly ``x W_q diag(s)``. Padding rows of the last block hold ``z``
   (zero after subtraction). Block size: 128, or the smallest power of two >= max(16, K) for small K (a power
   of two >= 16; <= 256 for ONNX Runtime's fusion). bits: 4 for int4 weights, 8 for int8 and FP4 weights (held
   in int8). FP8 weights keep ``DequantizeLinear`` (no FP8 MatMulNBits).
6. ``ConvertToFloat16``: every node not marked float32 computes in float16: float initializers it alone reads
   are stored in float16, ``Cast`` nodes are inserted where a float32 tensor meets a float16 node and back,
   the interface stays ``sample`` float32 in, ``out`` float32 out.
7. ``RemoveDeadCode``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (ir.passes.common: shape inference, dead-code removal)

from . import LayerRecord, LoweringContext, LoweringPass, all_nodes
from .attention import FuseMultiHeadAttention
from .shared import (DequantizeConstantBiases, RemoveDeadCode, SplitSequencesToSplit, add_initializer,
                     constant_array, mark_origin, probe_ranges)

PRECISION_KEY = "ditq.precision"
PRECISION_REASON_KEY = "ditq.precision_reason"
FP16_MAX = 65504.0
FP16_HEADROOM = 4.0
FP16_LIMIT = FP16_MAX / FP16_HEADROOM
FRAGILE_OPS = ("LayerNormalization", "Softmax")
MS_DOMAIN = "com.microsoft"
BLOCK_SIZE = 128
# ONNX Runtime (float16) against the torch weight-only fake-quant graph (float32): float16 rounds each op's
# result to 2^-11 = 4.9e-4 relative; measured on the tiny test DiT: relative L2 4.7e-4, max error 7e-4 of the
# output's range. The tolerance allows the error to grow ten-fold with depth; a wrong kernel (a transposed or
# mis-scaled weight, a wrong attention scale) is off by O(1).
FLOAT16_REL_L2_TOLERANCE = 5e-3
FLOAT16_MAX_ERROR_TOLERANCE = 2e-2


def subgraphs_of(graph: ir.Graph):
    """``graph`` and every graph nested in its nodes' attributes."""
    yield graph
    for node in graph:
        for attribute in node.attributes.values():
            if attribute.type == ir.AttributeType.GRAPH:
                yield from subgraphs_of(attribute.as_graph())
            elif attribute.type == ir.AttributeType.GRAPHS:
                for sub in attribute.as_graphs():
                    yield from subgraphs_of(sub)


def infer_types(model: ir.Model) -> None:
    """Give every value a dtype (ONNX shape inference; ops it does not know keep what was set)."""
    ir.passes.common.ShapeInferencePass(strict_mode=False)(model)


class DropActivationQuantizers(LoweringPass):
    name = "drop_activation_quantizers"

    def lower(self, model):
        dropped, declined = 0, []
        for node in list(all_nodes(model.graph)):
            if node.op_type != "QuantizeLinear" or constant_array(node.inputs[0]) is not None:
                continue
            readers = [use.node for use in node.outputs[0].uses()]
            if not readers or any(r.op_type != "DequantizeLinear" for r in readers):
                declined.append(f"{node.name}: read by something other than DequantizeLinear")
                continue
            for reader in readers:
                reader.outputs[0].replace_all_uses_with(node.inputs[0])
                reader.graph.remove(reader, safe=True)
            node.graph.remove(node, safe=True)
            dropped += 1
        summary = f"dropped {dropped} activation Q/DQ pairs (the CUDA target quantizes weights only)"
        if declined:
            summary += f"; kept {len(declined)} ({declined[0]})"
        return dropped > 0, summary


class MarkFloat32Islands(LoweringPass):
    name = "mark_float32_islands"

    def lower(self, model):
        from onnx_ir import to_proto

        infer_types(model)
        ranges = probe_ranges(to_proto(model), self.context.probe_inputs) if self.context.probe_inputs else {}
        marked: dict[str, int] = {}

        def mark(node: ir.Node, reason: str) -> None:
            if PRECISION_KEY not in node.metadata_props:
                node.metadata_props[PRECISION_KEY] = "float32"
                node.metadata_props[PRECISION_REASON_KEY] = reason
                marked[reason.split(":")[0]] = marked.get(reason.split(":")[0], 0) + 1

        nodes = list(all_nodes(model.graph))
        for node in nodes:
            if node.op_type in ("Sin", "Cos"):
                for island in _sinusoid_argument(node):
                    mark(island, "sinusoid argument: float16 spacing at t ~ 1000 is 0.5 rad")
        fragile_peaks: dict[str, float] = {}
        adaln_weights = {record.weight for record in self.layers.values() if record.role == "adaln"}
        for node in nodes:
            outputs = [ranges.get(v.name, 0.0) for v in node.outputs if v is not None]
            inputs = [ranges.get(v.name, 0.0) for v in node.inputs if v is not None]
            family = node.op_type if node.op_type in FRAGILE_OPS else \
                "adaLN modulation" if _reads_weight(node, adaln_weights) else None
            if family:
                fragile_peaks[family] = max(fragile_peaks.get(family, 0.0), *inputs, *outputs, 0.0)
            peak_out = max(outputs, default=0.0)
            peak_in = max(inputs, default=0.0)
            if peak_out > FP16_LIMIT:
                mark(node, f"overflow risk: output max |x| {peak_out:.4g} > {FP16_LIMIT:.4g}")
            elif family and peak_in > FP16_LIMIT:
                mark(node, f"overflow risk: {family} input max |x| {peak_in:.4g} > {FP16_LIMIT:.4g}")
        self.context.notes["float16"] = {
            "limit": FP16_LIMIT,
            "probed_tensors": len(ranges),
            "fragile_max_abs": {k: float(f"{v:.4g}") for k, v in sorted(fragile_peaks.items())},
            "float32_nodes": dict(sorted(marked.items())),
        }
        checked = (f"ranges of {len(ranges)} tensors measured on {sum(map(len, self.context.probe_inputs.values()))} "
                   "input batches" if ranges else "no denoiser inputs given: ranges NOT checked")
        peaks = ", ".join(f"{k} max |x| {v:.3g}" for k, v in sorted(fragile_peaks.items()))
        kept = ", ".join(f"{n} for {reason}" for reason, n in marked.items()) or "none"
        return bool(marked), f"float32 islands: {kept}; {checked}; {peaks}"


def _reads_weight(node: ir.Node, weights: set[str]) -> bool:
    """Whether a MatMul reads (through its weight's DequantizeLinear) one of ``weights``."""
    if node.op_type != "MatMul" or node.inputs[1] is None or node.inputs[1].producer() is None:
        return False
    dq = node.inputs[1].producer()
    return dq.op_type == "DequantizeLinear" and dq.inputs[0] is not None and \
        dq.inputs[0].name.split("__group")[0] in weights


_ARGUMENT_OPS = {"Mul", "Div", "Add", "Sub", "Unsqueeze", "Reshape", "Cast", "Expand", "Concat", "Slice",
                 "Identity", "Squeeze"}


def _sinusoid_argument(sinusoid: ir.Node) -> list[ir.Node]:
    """The sinusoid and the float nodes computing its argument, back to a cast from an integer (the
    timestep), initializers or graph inputs."""
    found, stack = [sinusoid], [v for v in sinusoid.inputs if v is not None]
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        producer = value.producer()
        if producer is None or id(producer) in seen or producer.op_type not in _ARGUMENT_OPS:
            continue
        if value.dtype not in (ir.DataType.FLOAT, None):
            continue
        seen.add(id(producer))
        found.append(producer)
        if producer.op_type == "Cast":
            continue  # the timestep's int -> float cast: the argument starts here
        stack.extend(v for v in producer.inputs if v is not None)
    return found


def block_size_for(k: int) -> int:
    """128, or for small K the smallest power of two >= max(16, K)."""
    if k >= BLOCK_SIZE:
        return BLOCK_SIZE
    return max(16, 1 << (k - 1).bit_length())


def pack_nbits(weight: np.ndarray, bits: int, block: int) -> np.ndarray:
    """``W_q [K, N]`` (signed, symmetric) -> MatMulNBits' ``B [N, ceil(K / block), block * bits / 8]`` uint8,
    offset by the default zero point ``2^(bits-1)``; 4-bit pairs pack the lower k into the low nibble."""
    k, n = weight.shape
    blocks = -(-k // block)
    offset = 1 << (bits - 1)
    codes = np.full((n, blocks * block), offset, dtype=np.uint8)
    codes[:, :k] = (weight.T.astype(np.int16) + offset).astype(np.uint8)
    if bits == 4:
        codes = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return codes.reshape(n, blocks, block * bits // 8)


class WeightsToMatMulNBits(LoweringPass):
    name = "weights_to_matmul_nbits"

    def lower(self, model):
        packed: dict[tuple[int, int], tuple[ir.Value, ir.Value, int, int, int]] = {}
        rewritten, declined = {4: 0, 8: 0}, []
        layer_of = {record.weight: key for key, record in self.layers.items()}  # before any record moves
        now_reads: dict[str, str] = {}
        for node in list(all_nodes(model.graph)):
            if node.op_type != "MatMul" or node.inputs[1] is None:
                continue
            dq = node.inputs[1].producer()
            if dq is None or dq.op_type != "DequantizeLinear" or constant_array(dq.inputs[0]) is None:
                continue
            weight, scale = dq.inputs[0], dq.inputs[1]
            layer = layer_of.get(weight.name.split("__group")[0])
            reason = self._check(dq, layer)
            if reason:
                declined.append(f"{layer or weight.name}: {reason}")
                continue
            record: LayerRecord = self.layers[layer]
            bits = 4 if record.weight_format == "int4" else 8
            key = (id(weight), id(scale))
            if key not in packed:
                packed[key] = self._pack(model, weight, scale, bits)
            b, scales, k, n, block = packed[key]
            kernel = mark_origin(ir.node("MatMulNBits", [node.inputs[0], b, scales],
                                         {"K": k, "N": n, "bits": bits, "block_size": block}, domain=MS_DOMAIN,
                                         name=f"{node.name}.nbits"), self.name, layer)
            out = kernel.outputs[0]
            out.dtype, out.shape = node.outputs[0].dtype or ir.DataType.FLOAT, node.outputs[0].shape
            node.graph.insert_before(node, kernel)
            name = node.outputs[0].name
            node.outputs[0].replace_all_uses_with(out)
            node.graph.remove(node, safe=True)
            out.name = name
            now_reads[layer] = b.name.split("__group")[0]
            rewritten[bits] += 1
        for layer, weight_name in now_reads.items():  # what each kernel reads (the fusion check follows it)
            self.layers[layer].weight = weight_name
        if packed:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        summary = (f"rewrote {rewritten[8]} layers as 8-bit and {rewritten[4]} as 4-bit MatMulNBits "
                   f"({len(packed)} packed weights, per-channel scales repeated over blocks)")
        if declined:
            summary += f"; kept {len(declined)} as DequantizeLinear + MatMul ({declined[0]})"
        return bool(packed), summary

    def _check(self, dq: ir.Node, layer: str | None) -> str | None:
        if layer is None:
            return "its weight belongs to no recorded quantized layer"
        weight = constant_array(dq.inputs[0])
        if weight.dtype != np.int8 or weight.ndim != 2:
            return f"{weight.dtype} weight (MatMulNBits takes 4- and 8-bit integers)"
        axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
        scale = constant_array(dq.inputs[1])
        if scale is None or scale.ndim != 1 or axis != 1:
            return "not per-output-channel scales on axis 1"
        zero = constant_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
        if zero is not None and np.any(zero != 0):
            return "non-zero weight zero points"
        bits = 4 if self.layers[layer].weight_format == "int4" else 8
        if weight.min() < -(1 << (bits - 1)) or weight.max() >= (1 << (bits - 1)):
            return f"values outside the {bits}-bit range"
        return None

    def _pack(self, model, weight: ir.Value, scale: ir.Value, bits: int):
        array = constant_array(weight)
        k, n = array.shape
        block = block_size_for(k)
        blocks = -(-k // block)
        base, _, group = weight.name.partition("__group")
        suffix = f"__group{group}" if group else ""
        b = add_initializer(model, f"{base}.nbits{suffix}", pack_nbits(array, bits, block))
        repeated = np.repeat(constant_array(scale).astype(np.float32), blocks)
        scale_base, _, scale_group = scale.name.partition("__group")
        scales = add_initializer(model, f"{scale_base}.blocks" + (f"__group{scale_group}" if scale_group else ""),
                                 repeated)
        return b, scales, k, n, block


_NO_FLOAT_INPUTS = {"Shape", "Size", "Cast"}  # inputs of any type: no Cast in front of them


class ConvertToFloat16(LoweringPass):
    name = "convert_to_float16"

    def lower(self, model):
        F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
        nodes = list(all_nodes(model.graph))
        graphs = list(subgraphs_of(model.graph))
        float_values = {id(v) for g in graphs for v in [*g.inputs, *g.initializers.values()]
                        if (v.dtype or (v.const_value.dtype if v.const_value is not None else None)) == F32}
        float_values |= {id(v) for node in nodes for v in node.outputs if v.dtype == F32}

        def precision(node: ir.Node) -> ir.DataType:
            return F32 if node.metadata_props.get(PRECISION_KEY) == "float32" else F16

        counts = {"float16 nodes": 0, "float32 nodes": 0, "casts": 0, "float16 initializers": 0}
        for node in nodes:  # what each node produces
            p = precision(node)
            counts["float16 nodes" if p == F16 else "float32 nodes"] += 1
            if p == F16 and node.op_type == "Cast" and node.attributes["to"].as_int() == F32:
                node.attributes["to"] = ir.AttrInt64("to", F16)
            if p == F16 and node.op_type == "Constant" and "value" in node.attributes:
                tensor = node.attributes["value"].as_tensor()
                if tensor.dtype == F32:
                    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(tensor.numpy().astype(np.float16),
                                                                                name=tensor.name))
            for out in node.outputs:
                if id(out) in float_values:
                    out.dtype = p
        for graph in graphs:  # float initializers read only by float16 nodes are stored in float16
            for value in list(graph.initializers.values()):
                if id(value) in float_values and value.uses() and all(precision(u.node) == F16 for u in value.uses()):
                    value.const_value = ir.tensor(value.const_value.numpy().astype(np.float16), name=value.name)
                    value.dtype = F16
                    counts["float16 initializers"] += 1
        casts: dict[tuple[int, int, int], ir.Value] = {}

        def cast(value: ir.Value, dtype, graph: ir.Graph, before: ir.Node | None) -> ir.Value:
            key = (id(value), int(dtype), id(graph))
            if key not in casts:
                node = mark_origin(ir.node("Cast", [value], {"to": dtype},
                                           name=f"{value.name}.to_{'float16' if dtype == F16 else 'float32'}"),
                                   self.name)
                node.outputs[0].dtype, node.outputs[0].shape = dtype, value.shape
                node.outputs[0].name = node.name
                if before is None:
                    graph.append(node)
                else:
                    graph.insert_before(before, node)
                casts[key] = node.outputs[0]
                counts["casts"] += 1
            return casts[key]

        for node in nodes:  # where a tensor meets a node of the other precision
            if node.op_type in _NO_FLOAT_INPUTS:
                continue
            p = precision(node)
            for index, value in enumerate(node.inputs):
                if value is not None and id(value) in float_values and value.dtype != p:
                    node.replace_input_with(index, cast(value, p, node.graph, node))
        for node in nodes:  # subgraph outputs take their If's precision
            for attribute in node.attributes.values():
                if attribute.type == ir.AttributeType.GRAPH:
                    self._fix_outputs(attribute.as_graph(), precision(node), float_values, cast)
        self._fix_outputs(model.graph, F32, float_values, cast)  # the interface: out stays float32
        summary = ", ".join(f"{n} {what}" for what, n in counts.items())
        return counts["float16 nodes"] > 0, f"float16 compute: {summary}"

    @staticmethod
    def _fix_outputs(graph: ir.Graph, dtype, float_values: set[int], cast) -> None:
        for index, value in enumerate(list(graph.outputs)):
            if id(value) not in float_values or value.dtype == dtype:
                continue
            name = value.name
            value.name = f"{name}.{'float16' if dtype == ir.DataType.FLOAT else 'float32'}_result"
            converted = cast(value, dtype, graph, None)
            converted.name = name
            graph.outputs[index] = converted


def passes(layers: dict[str, LayerRecord], context: LoweringContext) -> list[LoweringPass]:
    return [DropActivationQuantizers(layers, context), DequantizeConstantBiases(layers, context),
            SplitSequencesToSplit(layers, context), MarkFloat32Islands(layers, context),
            FuseMultiHeadAttention(layers, context), WeightsToMatMulNBits(layers, context),
            ConvertToFloat16(layers, context), RemoveDeadCode(layers, context)]
