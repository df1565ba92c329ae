"""Lowering for ONNX Runtime's CPU provider.

``PackInt4Weights``: a weight whose spec is int4 is held in int8 by the fx graph (exact int4 values). The
artifact stores it as an ``INT4`` initializer (two values per byte) behind ``Cast(to=INT8)``, the Cast's output
taking the weight's name. ONNX Runtime folds the Cast when it creates the session and then fuses the
int8 ``DequantizeLinear`` + ``MatMul``/``Gemm`` into ``MatMulIntegerToFloat``/``QGemm`` as before (measured,
also inside ``If`` branches reading outer initializers): 4-bit storage on disk, the int8 kernel at run time,
exact W4 numerics. (``MatMulNBits``, the block-wise 4-bit kernel, was measured slower than float on this
CPU at DiT's token counts.)
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from . import LayerRecord, LoweringPass, initializers_named


def replace_initializer_with_node_output(model: ir.Model, value: ir.Value, node: ir.Node) -> None:
    """Make ``node``'s single output take ``value``'s place (and name): consumers, subgraphs included, read
    the node's output instead of the initializer, which is removed."""
    graph = model.graph
    name = value.name
    output = node.outputs[0]
    value.replace_all_uses_with(output)
    graph.initializers.pop(name)
    output.name = name
    graph.insert_before(graph.node(0), node) if len(graph) else graph.append(node)


class PackInt4Weights(LoweringPass):
    name = "pack_int4_weights"

    def lower(self, model):
        packed, saved = 0, 0
        seen: set[str] = set()
        for record in self.layers.values():
            if record.weight_format != "int4":
                continue
            for value in initializers_named(model, record.weight):
                if value.name in seen:  # one tensor read by several layers (a module called twice)
                    continue
                seen.add(value.name)
                array = value.const_value.numpy()
                if array.dtype != np.int8 or array.min() < -8 or array.max() > 7:
                    raise ValueError(f"{value.name} is not int4 data held in int8")
                stored = ir.Value(name=f"{value.name}.int4",
                                  const_value=ir.tensor(array.astype(ml_dtypes.int4), name=f"{value.name}.int4"))
                model.graph.register_initializer(stored)
                cast = ir.node("Cast", [stored], {"to": ir.DataType.INT8}, name=f"{value.name}.unpack")
                replace_initializer_with_node_output(model, value, cast)
                packed += 1
                saved += array.size - (array.size + 1) // 2
        summary = f"packed {packed} int4 weight tensors into 4 bits behind Cast(int4 -> int8), {saved / 1e6:.2f} MB saved"
        return packed > 0, summary


def passes(layers: dict[str, LayerRecord]) -> list[LoweringPass]:
    return [PackInt4Weights(layers)]
