"""Raising: the inverse of every CPU lowering pass, back to the canonical form the fx exporter writes.

``ditq lower ART --target X`` re-lowers an artifact without recalibrating. Its ``model.onnx`` is lowered for
its own target, so it is first raised by these passes (in the reverse order of the lowering the manifest
records), then lowered for ``X``. Each pass is pattern + check + rewrite, and each is exact: raising a CPU
model and lowering it for the CPU again gives the same model.

| CPU lowered form (``cpu.py``) | canonical form | pass |
|---|---|---|
| ``INT4 <w>.int4 -> Cast(to=INT8) -> <w>`` | ``INT8`` initializer ``<w>`` (values in [-8, 7]) | ``UnpackInt4Weights`` |
| ``UINT4 <w>.codes -> Cast(to=INT32) -> Gather(lut int8[16], axis=0) -> <w>`` | ``INT8`` initializer ``<w> = lut[codes]`` | ``UnpackFp4Weights`` |
| ``Mul(Cast(<w> fp8, to=FLOAT), <scale>)`` | ``DequantizeLinear(<w>, <scale>, axis=1)`` per reader | ``Fp8CastToDequantize`` |
| ``QuantizeLinear -> MatMulIntegerToFloat(A, <w>, s_a, s_w, z_a, z_w, bias)`` | ``Q -> DQ -> MatMul <- DQ(<w>)``, ``Add(bias)`` | ``UnfoldMatMulIntegerToFloat`` |
| ``com.microsoft.MultiHeadAttention(q, k, v)`` | heads split by Reshape/Transpose, ``MatMul``, ``Softmax``, ``MatMul`` | ``UnfuseMultiHeadAttention`` (in ``attention.py`` beside the fusion) |

The weight tensors a layer reads are recorded in its :class:`LayerRecord`; a rewrite touches only recorded
weights, and restores the record (``Fp8WeightsAsCast`` points it at the folded weight).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from . import LoweringPass, all_nodes, inverse_of
from .shared import add_initializer, constant_array, layer_of_weight, mark_origin

MS_DOMAIN = "com.microsoft"


def _drop_if_unused(model: ir.Model, value: ir.Value) -> None:
    if not value.uses() and value.name in model.graph.initializers:
        model.graph.initializers.pop(value.name)


def _replace_node_by_initializer(model: ir.Model, node: ir.Node, array: np.ndarray) -> ir.Value:
    """``node``'s single output becomes an initializer of the same name holding ``array``."""
    output = node.outputs[0]
    name = output.name
    output.name = f"{name}.raised"
    value = add_initializer(model, name, array)
    output.replace_all_uses_with(value)
    node.graph.remove(node, safe=True)
    return value


@inverse_of("pack_int4_weights")
class UnpackInt4Weights(LoweringPass):
    name = "unpack_int4_weights"

    def lower(self, model):
        unpacked, declined = 0, []
        for node in list(all_nodes(model.graph)):
            if node.op_type != "Cast" or node.attributes["to"].as_int() != ir.DataType.INT8:
                continue
            stored = node.inputs[0]
            if stored is None or stored.dtype != ir.DataType.INT4 or constant_array(stored) is None:
                continue
            if layer_of_weight(self.layers, node.outputs[0].name) is None:
                declined.append(f"{node.outputs[0].name}: no recorded layer reads it")
                continue
            _replace_node_by_initializer(model, node, constant_array(stored).astype(np.int8))
            _drop_if_unused(model, stored)
            unpacked += 1
        summary = f"unpacked {unpacked} int4 weights to int8 initializers"
        if declined:
            summary += f"; left {len(declined)} ({declined[0]})"
        return unpacked > 0, summary


@inverse_of("pack_fp4_weights")
class UnpackFp4Weights(LoweringPass):
    name = "unpack_fp4_weights"

    def lower(self, model):
        unpacked, declined = 0, []
        for node in list(all_nodes(model.graph)):
            if node.op_type != "Gather":
                continue
            table, index = node.inputs[0], node.inputs[1]
            cast = index.producer() if index is not None else None
            if cast is None or cast.op_type != "Cast" or cast.inputs[0] is None or \
                    cast.inputs[0].dtype != ir.DataType.UINT4:
                continue
            codes, lut = constant_array(cast.inputs[0]), constant_array(table)
            axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
            if lut is None or codes is None or lut.dtype != np.int8 or lut.shape != (16,) or axis != 0:
                declined.append(f"{node.outputs[0].name}: not a 16-entry int8 lookup on axis 0")
                continue
            if layer_of_weight(self.layers, node.outputs[0].name) is None:
                declined.append(f"{node.outputs[0].name}: no recorded layer reads it")
                continue
            stored = cast.inputs[0]
            _replace_node_by_initializer(model, node, lut[codes.astype(np.int64)])
            if not cast.outputs[0].uses():
                cast.graph.remove(cast, safe=True)
            _drop_if_unused(model, stored)
            _drop_if_unused(model, table)
            unpacked += 1
        summary = f"unpacked {unpacked} FP4 weights (lookup of their 4-bit codes) to int8 initializers"
        if declined:
            summary += f"; left {len(declined)} ({declined[0]})"
        return unpacked > 0, summary


@inverse_of("fp8_weights_as_cast")
class Fp8CastToDequantize(LoweringPass):
    name = "fp8_cast_to_dequantize"

    def lower(self, model):
        raised, readers = 0, 0
        for node in list(all_nodes(model.graph)):
            if node.op_type != "Mul":
                continue
            match = self._match(node)
            if match is None:
                continue
            cast, weight, scale = match
            # the record points at the folded weight (the Mul's output), or, for a later group, back at <w>
            layer = layer_of_weight(self.layers, node.outputs[0].name) or layer_of_weight(self.layers, weight.name)
            if layer is None:
                continue
            for use in list(node.outputs[0].uses()):
                reader = use.node
                dq = mark_origin(ir.node("DequantizeLinear", [weight, scale], {"axis": 1},
                                         name=f"{weight.name}.dequantize.{readers}"), self.name, layer)
                dq.outputs[0].dtype = ir.DataType.FLOAT
                dq.outputs[0].name = dq.name
                reader.graph.insert_before(reader, dq)
                reader.replace_input_with(use.idx, dq.outputs[0])
                readers += 1
            node.graph.remove(node, safe=True)
            if not cast.outputs[0].uses():
                cast.graph.remove(cast, safe=True)
            self.layers[layer].weight = weight.name.split("__group")[0]
            raised += 1
        return raised > 0, f"turned {raised} FP8 Cast + Mul weights back into {readers} DequantizeLinear readers"

    @staticmethod
    def _match(mul: ir.Node):
        for i in (0, 1):
            cast = mul.inputs[i].producer() if mul.inputs[i] is not None else None
            scale = mul.inputs[1 - i]
            if cast is None or cast.op_type != "Cast" or cast.attributes["to"].as_int() != ir.DataType.FLOAT:
                continue
            weight = cast.inputs[0]
            if weight is not None and weight.dtype == ir.DataType.FLOAT8E4M3FN and \
                    constant_array(weight) is not None and constant_array(scale) is not None:
                return cast, weight, scale
        return None


@inverse_of("fold_bias_into_integer_gemm")
class UnfoldMatMulIntegerToFloat(LoweringPass):
    """Inverse of ``cpu_kernels.FoldBiasIntoIntegerGemm``: the readers of one quantized input share one
    activation ``DequantizeLinear`` again (per graph), and the MatMul gets back the name the fold derived the
    kernel's from (``<matmul>.with_bias``)."""

    name = "unfold_matmul_integer_to_float"

    def lower(self, model):
        activations: dict[tuple[int, int, int, int], ir.Value] = {}
        raised, declined = 0, []
        for node in list(all_nodes(model.graph)):
            if node.op_type != "MatMulIntegerToFloat" or node.domain != MS_DOMAIN:
                continue
            inputs = list(node.inputs) + [None] * (7 - len(node.inputs))
            a, b, a_scale, b_scale, a_zero, b_zero, bias = inputs[:7]
            layer = layer_of_weight(self.layers, b.name) if b is not None else None
            if layer is None:
                declined.append(f"{node.name}: its weight belongs to no recorded layer")
                continue
            graph = node.graph
            key = (id(a), id(a_scale), id(a_zero), id(graph))
            if key not in activations:
                x_dq = mark_origin(ir.node("DequantizeLinear", [a, a_scale, a_zero], {"axis": 0},
                                           name=f"{node.name}.input_dequantize"), self.name, layer)
                x_dq.outputs[0].dtype = ir.DataType.FLOAT
                x_dq.outputs[0].name = x_dq.name
                graph.insert_before(node, x_dq)
                activations[key] = x_dq.outputs[0]
            w_dq = mark_origin(ir.node("DequantizeLinear", [b, b_scale, b_zero], {"axis": 1},
                                       name=f"{node.name}.weight_dequantize"), self.name, layer)
            matmul_name = node.name[:-len(".with_bias")] if node.name.endswith(".with_bias") else f"{node.name}.matmul"
            matmul = mark_origin(ir.node("MatMul", [activations[key], w_dq.outputs[0]], name=matmul_name),
                                 self.name, layer)
            new_nodes = [w_dq, matmul]
            result = matmul.outputs[0]
            if bias is not None:
                add = mark_origin(ir.node("Add", [result, bias], name=f"{node.name}.bias"), self.name, layer)
                new_nodes.append(add)
                result = add.outputs[0]
            for created in new_nodes:
                created.outputs[0].dtype = ir.DataType.FLOAT
                created.outputs[0].name = created.name
            graph.insert_before(node, new_nodes)
            name = node.outputs[0].name
            result.shape = node.outputs[0].shape  # what later passes match on (the attention's [B, T, hidden])
            node.outputs[0].replace_all_uses_with(result, replace_graph_outputs=True)
            node.outputs[0].name = f"{name}.folded"
            graph.remove(node, safe=True)
            result.name = name
            raised += 1
        summary = f"unfolded {raised} MatMulIntegerToFloat kernels into Q/DQ + MatMul + Add"
        if declined:
            summary += f"; left {len(declined)} ({declined[0]})"
        return raised > 0, summary
