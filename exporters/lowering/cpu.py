"""Lowering for ONNX Runtime's CPU provider.

``PackInt4Weights``: a weight whose spec is int4 is held in int8 by the fx graph (exact int4 values). The
artifact stores it as an ``INT4`` initializer (two values per byte) behind ``Cast(to=INT8)``, the Cast's output
taking the weight's name. ONNX Runtime folds the Cast when it creates the session and then fuses the
int8 ``DequantizeLinear`` + ``MatMul``/``Gemm`` into ``MatMulIntegerToFloat``/``QGemm`` as before (measured,
also inside ``If`` branches reading outer initializers): 4-bit storage on disk, the int8 kernel at run time,
exact W4 numerics. (``MatMulNBits``, the block-wise 4-bit kernel, was measured slower than float on this
CPU at DiT's token counts; ``--weight-block`` layers run on it, see ``cpu_nbits.py``.)

``PackFp4Weights``: an FP4 weight is held in int8 as ``g * multiplier`` of its grid. The artifact stores the
4-bit sign-magnitude codes as ``UINT4`` and expands them with ``Gather(lookup table, Cast(codes, INT32))``
(16 int8 entries per grid), which ONNX Runtime folds at load like the Cast above, before fusing the int8
kernels. ONNX Runtime has no FP4 Cast or DequantizeLinear on the CPU (``NOT_IMPLEMENTED``, measured), and no
FP4 GEMM anywhere on the CPU; FP4 x FP4 products run exactly on the int8 kernels.

``Fp8WeightsAsCast``: ``DequantizeLinear(fp8 weight, scale, axis=1)`` becomes ``Mul(Cast(weight, FLOAT), scale)``.
ONNX Runtime 1.31's QDQ fusion matches the FP8 pattern into ``MatMulIntegerToFloat``, which then fails type
checking and the session does not load (measured); the Cast/Mul form loads, is folded to a float32 weight at
load, and runs a float ``MatMul`` (FP8 saves disk here, not time). Activations keep FP8 Q/DQ.

``FuseMultiHeadAttention`` (``attention.py``): the float attention (without ``--quantize-attention``) becomes
``com.microsoft.MultiHeadAttention``, one CPU kernel for the scores, softmax and mixing.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from . import LayerRecord, LoweringContext, LoweringPass, initializers_named


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


class PackFp4Weights(LoweringPass):
    name = "pack_fp4_weights"

    def lower(self, model):
        import torch

        from ditq_compiler.grids import GRIDS

        packed, seen, tables = 0, set(), {}
        for record in self.layers.values():
            if not record.weight_format.startswith("fp4-"):
                continue
            for value in initializers_named(model, record.weight):
                if value.name in seen:
                    continue
                seen.add(value.name)
                grid = GRIDS[record.format_of(value.name).split("-", 1)[1]]  # a group's copy has its group's grid
                if grid.name not in tables:  # one lookup table per grid, shared by its weights
                    lut = ir.Value(name=f"ditq.fp4_lookup.{grid.name}", const_value=ir.tensor(
                        grid.lookup_table().numpy(), name=f"ditq.fp4_lookup.{grid.name}"))
                    model.graph.register_initializer(lut)
                    tables[grid.name] = lut
                codes = grid.codes(torch.from_numpy(np.array(value.const_value.numpy()))).numpy().astype(ml_dtypes.uint4)
                stored = ir.Value(name=f"{value.name}.codes", const_value=ir.tensor(codes, name=f"{value.name}.codes"))
                model.graph.register_initializer(stored)
                index = ir.node("Cast", [stored], {"to": ir.DataType.INT32}, name=f"{value.name}.index")
                gather = ir.node("Gather", [tables[grid.name], index.outputs[0]], {"axis": 0},
                                 name=f"{value.name}.unpack")
                replace_initializer_with_node_output(model, value, gather)
                model.graph.insert_before(gather, index)
                packed += 1
        return packed > 0, f"stored {packed} FP4 weight tensors as 4-bit codes expanded by a lookup table at load"


class Fp8WeightsAsCast(LoweringPass):
    """One ``Mul(Cast(w), scale)`` per (weight, scale) pair, in the outer graph when both are outer
    initializers (every group's branch then reads one folded float weight), named ``<w>.dequantized``
    (``__group<g>`` appended when the scale is a group's own)."""

    name = "fp8_weights_as_cast"

    def lower(self, model):
        from . import all_nodes

        fp8_weights = {record.weight: key for key, record in self.layers.items()
                       if record.weight_format == "float8e4m3fn"}
        made: dict[tuple[int, int], ir.Value] = {}
        converted = 0
        for node in list(all_nodes(model.graph)):
            if node.op_type != "DequantizeLinear" or node.inputs[0] is None:
                continue
            weight, scale = node.inputs[0], node.inputs[1]
            if weight.name.split("__group")[0] not in fp8_weights:
                continue
            key = (id(weight), id(scale))
            if key not in made:
                outer = weight.name in model.graph.initializers and scale.name in model.graph.initializers
                graph = model.graph if outer else node.graph
                suffix = f"__group{scale.name.split('__group')[1]}" if "__group" in scale.name else ""
                base = weight.name.split("__group")[0]
                cast = ir.node("Cast", [weight], {"to": ir.DataType.FLOAT}, name=f"{base}.cast{suffix}")
                mul = ir.node("Mul", [cast.outputs[0], scale], name=f"{base}.scale{suffix}")
                mul.outputs[0].name = f"{base}.dequantized{suffix}"
                anchor = graph.node(0) if outer else node
                graph.insert_before(anchor, [cast, mul])
                made[key] = mul.outputs[0]
                self.layers[fp8_weights[base]].weight = f"{base}.dequantized"  # what the MatMul reads after folding
            node.outputs[0].replace_all_uses_with(made[key])
            node.graph.remove(node, safe=True)
            converted += 1
        return converted > 0, (f"rewrote {converted} FP8 weight dequantizations as Cast + Mul ({len(made)} folded to "
                               "float weights at load)")


def passes(layers: dict[str, LayerRecord], context: LoweringContext) -> list[LoweringPass]:
    from .attention import FuseMultiHeadAttention
    from .cpu_kernels import FoldBiasIntoIntegerGemm  # it reads weights as constants, before packing
    from .cpu_nbits import BlockWeightsToMatMulNBits, DynamicInputsToDynamicQuantizeMatMul

    return [BlockWeightsToMatMulNBits(layers), DynamicInputsToDynamicQuantizeMatMul(layers),
            FoldBiasIntoIntegerGemm(layers), PackInt4Weights(layers), PackFp4Weights(layers), Fp8WeightsAsCast(layers),
            FuseMultiHeadAttention(layers, context)]
