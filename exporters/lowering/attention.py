"""Fused attention: ONNX Runtime's ``com.microsoft.MultiHeadAttention`` in place of the exported attention.

``FuseMultiHeadAttention`` (lowering, every target): the exported scaled-dot-product attention,
``softmax((q s_q)(k s_k)^T) v`` over heads split by Reshape/Transpose, becomes
``MultiHeadAttention(q, k, v, num_heads, scale = s_q s_k)`` on ``[B, T, hidden]`` tensors. The pattern is the
one ``torch.onnx`` writes; a mismatch declines with the reason. Integer attention (``--quantize-attention``)
is left alone: its softmax output feeds a ``QuantizeLinear``, and ONNX Runtime runs its products on integer
kernels, which MultiHeadAttention would replace by float ones. The nodes the fusion leaves unread are removed
in the same pass.

* CUDA: the kernel picks flash / memory-efficient attention.
* CPU: one kernel for the scores, softmax and mixing, in place of two MatMuls, a Softmax and four head
  Transposes (docs/benchmarks.md measures it against the unfused float attention).

``UnfuseMultiHeadAttention`` (raising, its inverse): ``MultiHeadAttention(q3, k3, v3)`` with ``H`` heads of
width ``D`` and scale ``s`` becomes the form the fusion matches::

    q = Transpose(Reshape(q3, [0, 0, H, D]), [0, 2, 1, 3]) * s      # [B, H, T, D]
    kT = Transpose(Reshape(k3, [0, 0, H, D]), [0, 2, 3, 1])         # [B, H, D, T]
    v = Transpose(Reshape(v3, [0, 0, H, D]), [0, 2, 1, 3])          # [B, H, T, D]
    out3 = Reshape(Transpose(Softmax(q kT, axis=-1) v, [0, 2, 1, 3]), [0, 0, H D])

which is MultiHeadAttention's definition (``softmax(scale q k^T) v`` per head, heads concatenated along the
hidden axis, head h owning channels ``h D .. (h + 1) D - 1``), so fusing it again gives back the same node.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (ir.passes.common: dead-code removal)

from . import LoweringPass, all_nodes, inverse_of
from .shared import add_initializer, constant_array, mark_origin

MS_DOMAIN = "com.microsoft"


def scalar_value(value: ir.Value | None, depth: int = 0) -> float | None:
    """The value of a scalar computed from constants (the exported attention scale chain), else None."""
    if value is None or depth > 12:
        return None
    array = constant_array(value)
    if array is not None:
        return float(array.reshape(-1)[0]) if array.size == 1 else None
    node = value.producer()
    if node is None:
        return None
    args = [scalar_value(v, depth + 1) for v in node.inputs]
    if node.op_type in ("CastLike", "Cast", "Identity") and args and args[0] is not None:
        return args[0]
    if node.op_type == "Sqrt" and args[0] is not None and args[0] >= 0:
        return math.sqrt(args[0])
    if node.op_type == "Reciprocal" and args[0]:
        return 1.0 / args[0]
    if node.op_type in ("Div", "Mul") and len(args) == 2 and None not in args:
        return args[0] / args[1] if node.op_type == "Div" and args[1] else args[0] * args[1]
    return None


def _producer(value: ir.Value | None, op_type: str, perm: list[int] | None = None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type:
        return None
    if perm is not None and list(node.attributes["perm"].as_ints()) != perm:
        return None
    return node


def _strip_scale(value: ir.Value) -> tuple[ir.Value, float | None]:
    """``value = inner * s`` with a constant scalar ``s``: (inner, s); else (value, 1.0)."""
    node = _producer(value, "Mul")
    if node is None:
        return value, 1.0
    for i in (0, 1):
        s = scalar_value(node.inputs[1 - i])
        if s is not None:
            return node.inputs[i], s
    return value, None


def _heads_of(value: ir.Value) -> ir.Value | None:
    """``Transpose(Reshape(x3, [B, T, H, D]), perm=[0, 2, 1, 3])``: x3 (rank 3), else None."""
    transpose = _producer(value, "Transpose", [0, 2, 1, 3])
    reshape = _producer(transpose.inputs[0], "Reshape") if transpose else None
    if reshape is None or reshape.inputs[0].shape is None or len(reshape.inputs[0].shape) != 3:
        return None
    return reshape.inputs[0]


def _keys_transposed(value: ir.Value) -> ir.Value | None:
    """The keys ``[B, H, D, T]``: the exporter's ``Reshape(Transpose(Reshape(heads(k3), [BH, T, D]), [0, 2, 1]))``,
    or ``Transpose(heads(k3), [0, 1, 3, 2])``, or ``Transpose(Reshape(k3), [0, 2, 3, 1])``: k3, else None."""
    outer = _producer(value, "Reshape")
    if outer is not None:
        middle = _producer(outer.inputs[0], "Transpose", [0, 2, 1])
        inner = _producer(middle.inputs[0], "Reshape") if middle else None
        return _heads_of(inner.inputs[0]) if inner else None
    direct = _producer(value, "Transpose", [0, 1, 3, 2])
    if direct is not None:
        return _heads_of(direct.inputs[0])
    split = _producer(value, "Transpose", [0, 2, 3, 1])
    reshape = _producer(split.inputs[0], "Reshape") if split else None
    return reshape.inputs[0] if reshape and reshape.inputs[0].shape is not None and \
        len(reshape.inputs[0].shape) == 3 else None


class FuseMultiHeadAttention(LoweringPass):
    name = "fuse_multi_head_attention"

    def lower(self, model):
        fused, integer, declined = 0, 0, []
        for softmax in list(all_nodes(model.graph)):
            if softmax.op_type != "Softmax" or softmax.graph is None:
                continue
            if any(use.node.op_type == "QuantizeLinear" for use in softmax.outputs[0].uses()):
                integer += 1  # integer attention: ONNX Runtime runs its products on integer kernels
                continue
            match = self._match(softmax)
            if isinstance(match, str):
                declined.append(f"{softmax.name}: {match}")
                continue
            q3, k3, v3, out3, heads, scale = match
            attention = mark_origin(ir.node("MultiHeadAttention", [q3, k3, v3],
                                            {"num_heads": heads, "scale": float(scale)}, domain=MS_DOMAIN,
                                            name=f"{softmax.name}.attention"), self.name)
            output = attention.outputs[0]
            output.dtype, output.shape = out3.dtype or ir.DataType.FLOAT, out3.shape
            softmax.graph.insert_before(softmax, attention)
            name = out3.name
            out3.replace_all_uses_with(output)
            out3.name = f"{name}.unfused"
            output.name = name
            fused += 1
        removed = 0
        self.context.notes["fused_attention"] = fused  # what ORT's optimized graph must run
        if fused:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            before = sum(1 for _ in all_nodes(model.graph))
            ir.passes.common.RemoveUnusedNodesPass()(model)  # the unfused attention, now unread
            removed = before - sum(1 for _ in all_nodes(model.graph))
        summary = (f"fused {fused} attention blocks into com.microsoft.MultiHeadAttention ({removed} nodes removed)"
                   if fused else "fused no attention block")
        if integer:
            summary += f"; left {integer} integer attention blocks as they are"
        if declined:
            summary += f"; declined {len(declined)} ({declined[0]})"
        return fused > 0, summary

    @staticmethod
    def _match(softmax: ir.Node):
        axis = softmax.attributes["axis"].as_int() if "axis" in softmax.attributes else -1
        if axis != -1:
            return f"softmax over axis {axis}, not the keys"
        scores = _producer(softmax.inputs[0], "MatMul")
        uses = list(softmax.outputs[0].uses())
        if scores is None or len(uses) != 1 or uses[0].node.op_type != "MatMul" or uses[0].idx != 0:
            return "not softmax(q k^T) v"
        mixing = uses[0].node
        q_scaled, q_scale = _strip_scale(scores.inputs[0])
        k_scaled, k_scale = _strip_scale(scores.inputs[1])
        if q_scale is None or k_scale is None:
            return "the attention scale is not a constant"
        q3, k3, v3 = _heads_of(q_scaled), _keys_transposed(k_scaled), _heads_of(mixing.inputs[1])
        if q3 is None or k3 is None or v3 is None:
            return "q, k or v is not a [B, T, hidden] tensor split into heads"
        merge = list(mixing.outputs[0].uses())
        transpose = merge[0].node if len(merge) == 1 else None
        if transpose is None or transpose.op_type != "Transpose" or \
                list(transpose.attributes["perm"].as_ints()) != [0, 2, 1, 3]:
            return "the heads are not merged back by Transpose(0, 2, 1, 3)"
        reshape_uses = list(transpose.outputs[0].uses())
        if len(reshape_uses) != 1 or reshape_uses[0].node.op_type != "Reshape":
            return "the heads are not merged back by Reshape"
        out3 = reshape_uses[0].node.outputs[0]
        shape = mixing.inputs[1].shape  # [B, H, T, D]
        if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            return "the head count is not static"
        heads, head_dim = shape[1], shape[3]
        for value in (q3, k3, v3):
            if value.shape is None or value.shape[-1] != heads * head_dim:
                return f"hidden size is not heads x head size ({heads} x {head_dim})"
        return q3, k3, v3, out3, heads, q_scale * k_scale


@inverse_of(FuseMultiHeadAttention.name)
class UnfuseMultiHeadAttention(LoweringPass):
    """Inverse of :class:`FuseMultiHeadAttention` (algebra in the module docstring)."""

    name = "unfuse_multi_head_attention"

    def lower(self, model):
        unfused, declined = 0, []
        shapes: dict[tuple[int, ...], ir.Value] = {}

        def shape_constant(*dims: int) -> ir.Value:  # Reshape targets, one outer initializer per shape
            if dims not in shapes:
                shapes[dims] = add_initializer(model, f"ditq.attention_shape.{'x'.join(map(str, dims))}",
                                               np.array(dims, dtype=np.int64))
            return shapes[dims]

        for node in list(all_nodes(model.graph)):
            if node.op_type != "MultiHeadAttention" or node.domain != MS_DOMAIN:
                continue
            reason = self._check(node)
            if reason:
                declined.append(f"{node.name}: {reason}")
                continue
            q3, k3, v3 = node.inputs[:3]
            heads = node.attributes["num_heads"].as_int()
            width = q3.shape[-1] // heads
            scale = node.attributes["scale"].as_float() if "scale" in node.attributes else 1 / math.sqrt(width)
            batch, tokens = q3.shape[0], q3.shape[1]
            split = shape_constant(0, 0, heads, width)

            def heads_of(x3: ir.Value, perm: list[int], label: str) -> list[ir.Node]:
                reshape = ir.node("Reshape", [x3, split], name=f"{node.name}.{label}_split")
                transpose = ir.node("Transpose", [reshape.outputs[0]], {"perm": perm},
                                    name=f"{node.name}.{label}_heads")
                split_shape = [batch, x3.shape[1], heads, width]
                reshape.outputs[0].shape = ir.Shape(split_shape)
                transpose.outputs[0].shape = ir.Shape([split_shape[p] for p in perm])
                for made in (reshape, transpose):
                    made.outputs[0].dtype = ir.DataType.FLOAT
                return [reshape, transpose]

            q_nodes = heads_of(q3, [0, 2, 1, 3], "q")
            k_nodes = heads_of(k3, [0, 2, 3, 1], "k")
            v_nodes = heads_of(v3, [0, 2, 1, 3], "v")
            scaled = ir.node("Mul", [q_nodes[-1].outputs[0], add_initializer(
                model, f"{node.name}.scale", np.array(scale, dtype=np.float32))], name=f"{node.name}.q_scaled")
            scores = ir.node("MatMul", [scaled.outputs[0], k_nodes[-1].outputs[0]], name=f"{node.name}.scores")
            softmax = ir.node("Softmax", [scores.outputs[0]], {"axis": -1}, name=f"{node.name}.softmax")
            mixing = ir.node("MatMul", [softmax.outputs[0], v_nodes[-1].outputs[0]], name=f"{node.name}.mixing")
            merge = ir.node("Transpose", [mixing.outputs[0]], {"perm": [0, 2, 1, 3]}, name=f"{node.name}.merge")
            out = ir.node("Reshape", [merge.outputs[0], shape_constant(0, 0, heads * width)],
                          name=f"{node.name}.concat_heads")
            head_shape = [batch, heads, tokens, width]
            for made, shape in ((scaled, head_shape), (scores, [batch, heads, tokens, k3.shape[1]]),
                                (softmax, [batch, heads, tokens, k3.shape[1]]), (mixing, head_shape),
                                (merge, [batch, tokens, heads, width])):
                made.outputs[0].shape, made.outputs[0].dtype = ir.Shape(shape), ir.DataType.FLOAT
            made = [*q_nodes, *k_nodes, *v_nodes, scaled, scores, softmax, mixing, merge, out]
            for new in made:
                mark_origin(new, self.name)
                # named: left unnamed inside If branches, ONNX Runtime refused the model as cyclic
                new.outputs[0].name = new.name
            node.graph.insert_before(node, made)
            result = node.outputs[0]
            out.outputs[0].dtype, out.outputs[0].shape = result.dtype, result.shape
            name = result.name
            result.replace_all_uses_with(out.outputs[0])
            node.graph.remove(node, safe=True)
            out.outputs[0].name = name
            unfused += 1
        summary = f"turned {unfused} MultiHeadAttention nodes back into MatMul/Softmax/MatMul attention"
        if declined:
            summary += f"; left {len(declined)} ({declined[0]})"
        return unfused > 0, summary

    @staticmethod
    def _check(node: ir.Node) -> str:
        """Why this node is not the plain form the fusion writes (q, k, v of [B, T, hidden]; no mask, bias,
        past state or extra outputs), or ''."""
        if len(node.inputs) < 3 or any(v is None for v in node.inputs[:3]) or \
                any(v is not None for v in node.inputs[3:]):
            return "it has inputs besides q, k and v (bias, mask or past state)"
        if sum(1 for output in node.outputs if output.uses() or output.is_graph_output()) > 1:
            return "it returns its key/value state too"
        if "num_heads" not in node.attributes:
            return "no num_heads"
        heads = node.attributes["num_heads"].as_int()
        for value in node.inputs[:3]:
            if value.shape is None or len(value.shape) != 3 or not isinstance(value.shape[-1], int) or \
                    value.shape[-1] % heads:
                return f"{value.name} is not [B, T, hidden] with hidden a multiple of {heads} heads"
        if "unidirectional" in node.attributes and node.attributes["unidirectional"].as_int():
            return "it is causal (unidirectional)"
        return ""
