"""CPU lowering: write the integer kernel ONNX Runtime would not form itself.

``FoldBiasIntoIntegerGemm``. ONNX Runtime fuses ``DequantizeLinear -> MatMul <- DequantizeLinear(int8 weight)``
into ``com.microsoft.MatMulIntegerToFloat`` but leaves the bias ``Add`` after it as a separate kernel: its QDQ
replacer moves only the six GEMM inputs, and its one bias fold (``MatMulIntegerToFloatFusion``) matches
``MatMulInteger -> Cast -> Mul -> Add``, a form constant folding destroys first (read in ONNX Runtime's
sources, and measured with 1.31). ``MatMulIntegerToFloat`` has a bias input, so the pass writes the kernel
directly, in the main graph and in every ``If`` branch::

    a_q = QuantizeLinear(x, a_scale, a_zp)                        # kept: it may feed several layers (q, k, v)
    y   = Add(MatMul(DequantizeLinear(a_q, a_scale, a_zp),
                     DequantizeLinear(W, b_scale, b_zp, axis=1)), bias)
 -> y   = com.microsoft.MatMulIntegerToFloat(a_q, W, a_scale, b_scale, a_zp, b_zp, bias)

Algebra: both compute ``sum_k (a_q[.., k] - a_zp) (W[k, n] - b_zp[n]) * a_scale * b_scale[n] + bias[n]``; the
kernel sums the integer products exactly in int32, so the two differ only by float rounding (the QDQ form ONNX
Runtime runs is this very kernel plus the Add). The new node takes the ``Add``'s output name; an activation
``DequantizeLinear`` or weight ``DequantizeLinear`` left without readers is removed. Initializers are read where
they are (per-group ones, ``<name>__group<g>``, in the outer graph), so per-group parameters stay per group.

It declines, and counts why: a MatMul whose output has other readers than one ``Add``; an ``Add`` that feeds a
``Gelu`` (fc1: ONNX Runtime already fuses that bias into ``FastGelu(x, bias)``, and moving it into the GEMM
measured no faster); an ``Add`` whose other input is no float constant ``[N]`` (the adaLN layers' int32 bias,
which ONNX Runtime turns into ``QGemm`` with the bias inside); an input not dequantized per tensor from
uint8/int8; a weight not int8/uint8 ``[K, N]`` dequantized per column (FP8 weights, left to
``Fp8WeightsAsCast``). MatMuls whose second input is no constant (attention's ``QK^T`` and ``PV``, quantized or
not) are no linear layers and not counted. It runs before the 4-bit packing passes, which then replace the
weight constant it reads.

Measured on a 2-core AMD EPYC (AVX2, no VNNI), ONNX Runtime 1.31, 2 threads, random DiT-B/2 at batch 2,
interleaved rounds under load from other jobs: the 60 folds (q, k, v, attention output, fc2) remove 60 of the
149 ``Add`` kernels and made the whole model 3-5% faster (median per-round ratio 0.95-0.97); the bias inside
the kernel costs nothing measurable. Folding fc1's bias too (plain ``Gelu`` after) was no faster than
``FastGelu(x, bias)``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir

from . import LoweringPass, all_nodes

MICROSOFT = "com.microsoft"
_EIGHT_BIT = (ir.DataType.UINT8, ir.DataType.INT8)
GELU_OPS = ("Gelu", "FastGelu", "BiasGelu")
NOT_A_LINEAR = "not a Q/DQ MatMul with a weight"


def producer(value: ir.Value | None, op_type: str, domain: str = "") -> ir.Node | None:
    """The node of type ``op_type`` (in ``domain``, default ONNX's) that produces ``value``, or None."""
    node = value.producer() if value is not None else None
    domains = (domain,) if domain else ("", "ai.onnx")
    return node if node is not None and node.op_type == op_type and (node.domain or "") in domains else None


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


PER_COLUMN_WEIGHT = "weight not int8/uint8 [K, N] dequantized per column"


def per_column_weight(w_dq: ir.Node) -> np.ndarray | None:
    """The constant int8/uint8 ``[K, N]`` weight that ``w_dq`` dequantizes per tensor or per column (constant
    scale and zero point, no blocks): the weight form ONNX Runtime's integer GEMMs take. None otherwise."""
    weight_value, scale = _constant(w_dq.inputs[0]), _constant(_input(w_dq, 1))
    zero_point = _input(w_dq, 2)
    if weight_value is None or weight_value.dtype not in (np.int8, np.uint8) or weight_value.ndim != 2 or \
            scale is None or scale.size not in (1, weight_value.shape[1]) or w_dq.attributes.get_int("block_size", 0) \
            or (scale.size > 1 and w_dq.attributes.get_int("axis", 1) not in (1, -1)) or \
            (zero_point is not None and _constant(zero_point) is None):
        return None
    return weight_value


class BiasFold:
    """One match: the nodes of the pattern and the values the fused kernel reads."""

    def __init__(self, matmul: ir.Node, add: ir.Node, a_dq: ir.Node, w_dq: ir.Node, bias: ir.Value):
        self.matmul, self.add, self.a_dq, self.w_dq, self.bias = matmul, add, a_dq, w_dq, bias

    @property
    def weight(self) -> ir.Value:
        return self.w_dq.inputs[0]


def match_bias_fold(matmul: ir.Node) -> tuple[BiasFold | None, str]:
    """The pattern around a ``MatMul``, or None and the reason it does not fit (pattern + check)."""
    a_dq = producer(_input(matmul, 0), "DequantizeLinear")
    w_dq = producer(_input(matmul, 1), "DequantizeLinear")
    if a_dq is None or w_dq is None or w_dq.inputs[0].const_value is None:  # attention: B is an activation
        return None, NOT_A_LINEAR
    out = matmul.outputs[0]
    users = [node for node, _ in out.uses()]
    if out.is_graph_output() or len(users) != 1 or users[0].op_type != "Add" or users[0].domain not in ("", "ai.onnx"):
        return None, "no single bias Add after the MatMul"
    add = users[0]
    bias = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    a_q, a_scale, a_zp = a_dq.inputs[0], _input(a_dq, 1), _input(a_dq, 2)
    a_scale_value, a_zp_value = _constant(a_scale), _constant(a_zp)
    eight_bit = a_q.dtype in _EIGHT_BIT if a_q.dtype is not None else \
        a_zp_value is not None and a_zp_value.dtype in (np.uint8, np.int8)  # A's type is its zero point's
    if not eight_bit or a_scale_value is None or a_scale_value.size != 1 or \
            (a_zp is not None and (a_zp_value is None or a_zp_value.size != 1)):
        return None, "input not dequantized per tensor from uint8/int8"
    weight_value = per_column_weight(w_dq)
    if weight_value is None:
        return None, PER_COLUMN_WEIGHT
    if any(node.op_type in GELU_OPS for node, _ in add.outputs[0].uses()):
        return None, "feeds Gelu (ONNX Runtime fuses that bias into FastGelu(x, bias))"
    bias_value = _constant(bias)
    if bias_value is None or bias_value.dtype != np.float32:
        return None, "bias not a float constant (int32 bias: ONNX Runtime's QGemm takes it)"
    if bias_value.shape != (weight_value.shape[1],):
        return None, f"bias of shape {list(bias_value.shape)} is not [N] = [{weight_value.shape[1]}]"
    return BiasFold(matmul, add, a_dq, w_dq, bias), ""


def rewrite_bias_fold(fold: BiasFold) -> ir.Node:
    """Replace the matched ``MatMul`` + ``Add`` (and DQs left unread) with one ``MatMulIntegerToFloat``."""
    graph = fold.add.graph
    a_q, a_scale, a_zp = fold.a_dq.inputs[0], fold.a_dq.inputs[1], _input(fold.a_dq, 2)
    b_scale, b_zp = fold.w_dq.inputs[1], _input(fold.w_dq, 2)
    old = fold.add.outputs[0]
    fused = ir.node("MatMulIntegerToFloat", [a_q, fold.weight, a_scale, b_scale, a_zp, b_zp, fold.bias],
                    domain=MICROSOFT, name=f"{old.name}/MatMulIntegerToFloat")  # value names are unique
    graph.insert_before(fold.add, fused)
    new = fused.outputs[0]
    new.type, new.shape = old.type, old.shape
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = f"{name}.unfolded"
    new.name = name
    graph.remove([fold.add, fold.matmul], safe=True)
    for dq in (fold.a_dq, fold.w_dq):
        if not dq.outputs[0].uses() and not dq.outputs[0].is_graph_output():
            dq.graph.remove(dq, safe=True)
    return fused


class FoldBiasIntoIntegerGemm(LoweringPass):
    name = "fold_bias_into_integer_gemm"

    def lower(self, model):
        role_of = {record.weight: record.role for record in self.layers.values()}
        folded, declined = Counter(), Counter()
        for node in list(all_nodes(model.graph)):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.graph is None:
                continue
            fold, reason = match_bias_fold(node)
            weight = producer(_input(node, 1), "DequantizeLinear")
            role = role_of.get(weight.inputs[0].name.split("__group")[0], "other") if weight is not None else "float"
            if fold is None:
                if reason != NOT_A_LINEAR:  # float MatMuls, attention's activation x activation ones
                    declined[f"{role}: {reason}"] += 1
                continue
            rewrite_bias_fold(fold)
            folded[role] += 1
        if folded:
            model.opset_imports.setdefault(MICROSOFT, 1)
        done = ", ".join(f"{count} {role}" for role, count in folded.items()) or "none"
        summary = f"folded {sum(folded.values())} biases into MatMulIntegerToFloat ({done})"
        if declined:
            summary += "; declined " + ", ".join(f"{count} {why}" for why, count in declined.items())
        return bool(folded), summary
