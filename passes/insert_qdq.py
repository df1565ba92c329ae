"""Q/DQ insertion: rewrite every annotated ``aten.linear`` into integer-weight form.

For a layer ``y = x W^T + b`` with parameters from a recipe it emits::

    x_q  = quantize(x, s_x, z_x)                     # uint8, once per input tensor (shared by q/k/v)
    x_dq = dequantize(x_q, s_x, z_x)
    W_dq = dequantize(W_q^T, s_w, 0, axis=1)         # W_q = round(W / s_w) in int8, stored [in, out]
    y    = matmul(x_dq, W_dq) + b

so that ONNX Runtime sees ``DequantizeLinear -> MatMul <- DequantizeLinear(int8 initializer)`` and fuses
it into ``MatMulIntegerToFloat`` (3-d inputs). A 2-d input (the adaLN modulation) becomes a ``Gemm`` in
ONNX Runtime, whose int8 form ``QGemm`` requires an int32 bias: ``b_q = round(b / (s_x s_w))`` with
``DequantizeLinear(b_q, s_x s_w)``. The weight is stored transposed so no Transpose separates it from
the MatMul. The float weight is dropped from the module once nothing reads it.

Buffers follow a naming contract (as ONNX Runtime's quantizer names its tensors), so a debugger can pair
float and quantized tensors of a layer: ``<layer>.weight_quantized``, ``.weight_scale``,
``.weight_zero_point``, ``.bias_quantized``, ``.bias_scale``, ``.bias_zero_point``, ``.input_scale``,
``.input_zero_point``; the Q/DQ nodes are named ``<layer>_input_quantized`` / ``_input_dequantized``.
"""

from __future__ import annotations

import copy

import torch

from ..errors import PassPreconditionError
from ..pass_manager import GraphPass, PassResult
from ..qspec import PARAMS_KEY, PROVENANCE_KEY, SPEC_KEY
from .branches import TimestepGroupedModule

_QUANTIZE = torch.ops.ditq.quantize.default
_DEQUANTIZE = torch.ops.ditq.dequantize.default


def _ident(layer: str) -> str:
    return layer.replace(".", "_")


class InsertQuantDequant(GraphPass):
    """Rewrites the graph; with several timestep groups, one rewritten copy (branch) per group.

    With one group the graph is rewritten in place. With ``G`` groups the annotated graph is copied ``G``
    times and each copy rewritten with its group's parameters; the result is a
    :class:`TimestepGroupedModule` that dispatches every row of a batch to its group's branch (the torch
    reference of the exported ``If`` branches). Weights that are the same in every group are
    deduplicated by the exporter.
    """

    name = "insert_qdq"
    preserves_semantics = False

    def check_preconditions(self, gm, ctx):
        for node in gm.graph.nodes:
            if SPEC_KEY in node.meta and PARAMS_KEY not in node.meta:
                raise PassPreconditionError(
                    self.name, f"{node.meta[SPEC_KEY].layer} is annotated but has no parameters; run a recipe first"
                )

    def run(self, gm, ctx):
        groups = ctx.timestep_groups
        if len(groups) == 1:
            return self._rewrite(gm, ctx, 0)
        branches, details = [], []
        for group in groups:
            branch = copy.deepcopy(gm)
            result = self._rewrite(branch, ctx, group.index)
            branch.graph.lint()
            branch.recompile()
            branches.append(branch)
            details += [f"[group {group.index}: {group.start}..{group.end}] {line}" for line in result.details]
        summary = f"{len(groups)} branches, one per timestep group; each: {result.summary}"
        return PassResult(TimestepGroupedModule(branches, groups), True, summary, details)

    def _rewrite(self, gm, ctx, group: int) -> PassResult:
        graph = gm.graph
        dequantized_inputs: dict[str, torch.fx.Node] = {}
        float_weights: set[str] = set()
        details, rewritten, gemm_form = [], 0, 0
        for node in list(graph.nodes):
            spec = node.meta.get(SPEC_KEY)
            if spec is None:
                continue
            params = node.meta[PARAMS_KEY]
            x, weight_node = node.args[0], node.args[1]
            bias_node = node.args[2] if len(node.args) > 2 else None
            float_parameters = [weight_node.target] + ([bias_node.target] if bias_node is not None else [])
            owner_path = weight_node.target.rsplit(".", 1)[0]
            owner = gm.get_submodule(owner_path)
            provenance = {"pass": self.name, "layer": spec.layer, "group": group}

            def emit(target, args, name=None, _prov=provenance):
                created = graph.create_node("call_function", target, args, name=name)
                created.meta[PROVENANCE_KEY] = dict(_prov)
                return created

            def attr(buffer_name: str, value: torch.Tensor, _owner=owner, _path=owner_path):
                # A module called twice (a shared embedder) sees two inputs: never overwrite a buffer.
                name, suffix = buffer_name, 1
                while hasattr(_owner, name):
                    name, suffix = f"{buffer_name}_{suffix}", suffix + 1
                _owner.register_buffer(name, value)
                created = graph.get_attr(f"{_path}.{name}")
                created.meta[PROVENANCE_KEY] = dict(provenance)
                return created

            with graph.inserting_before(node):
                x_dq = dequantized_inputs.get(x.name)
                if x_dq is None:
                    scale = attr("input_scale", torch.tensor(params.input_scale[group], dtype=torch.float32))
                    zero = attr("input_zero_point", torch.tensor(params.input_zero_point[group], dtype=torch.uint8))
                    x_q = emit(_QUANTIZE, (x, scale, zero, 0), f"{_ident(spec.layer)}_input_quantized")
                    x_dq = emit(_DEQUANTIZE, (x_q, scale, zero, 0), f"{_ident(spec.layer)}_input_dequantized")
                    dequantized_inputs[x.name] = x_dq
                    input_scale = params.input_scale[group]
                else:
                    input_scale = float(gm.get_buffer(x_dq.args[1].target))

                weight = gm.get_parameter(weight_node.target).detach().to(torch.float32)
                weight_scale = params.weight_scale.to(torch.float32)
                qmax = spec.weight.qmax
                weight_q = torch.clamp(torch.round(weight / weight_scale[:, None]), -qmax, qmax).to(torch.int8)
                w_q = attr("weight_quantized", weight_q.t().contiguous())
                w_scale = attr("weight_scale", weight_scale.clone())
                w_zero = attr("weight_zero_point", torch.zeros(weight_scale.shape, dtype=torch.int8))
                w_dq = emit(_DEQUANTIZE, (w_q, w_scale, w_zero, 1), f"{_ident(spec.layer)}_weight_dequantized")
                out = emit(torch.ops.aten.matmul.default, (x_dq, w_dq))
                if bias_node is not None:
                    bias = gm.get_parameter(bias_node.target).detach().to(torch.float32)
                    if x.meta["val"].dim() == 2:
                        bias_scale = input_scale * weight_scale
                        bias_q = torch.round(bias / bias_scale).clamp(-(2**31), 2**31 - 1).to(torch.int32)
                        b_q = attr("bias_quantized", bias_q)
                        b_scale = attr("bias_scale", bias_scale)
                        b_zero = attr("bias_zero_point", torch.zeros(bias_q.shape, dtype=torch.int32))
                        bias_node = emit(_DEQUANTIZE, (b_q, b_scale, b_zero, 0), f"{_ident(spec.layer)}_bias_dequantized")
                        gemm_form += 1
                    out = emit(torch.ops.aten.add.Tensor, (out, bias_node))
            out.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            float_weights.update(float_parameters)  # each dropped only once nothing reads it
            rewritten += 1
            shared = "" if x_dq.args[0].name.startswith(_ident(spec.layer)) else " (shares its input's Q/DQ)"
            details.append(f"{spec.layer}: int8 weight {tuple(weight_q.shape)}, input scale {input_scale:.4g}{shared}")

        dropped = self._drop_unused_float_parameters(gm, float_weights)
        summary = (f"rewrote {rewritten} linears to Q/DQ form ({len(dequantized_inputs)} activation Q/DQ pairs, "
                   f"{gemm_form} with int32 bias for QGemm), dropped {dropped} float parameters")
        return PassResult(gm, modified=rewritten > 0, summary=summary, details=details)

    @staticmethod
    def _drop_unused_float_parameters(gm, targets: set[str]) -> int:
        dropped = 0
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and node.target in targets and not node.users:
                gm.graph.erase_node(node)
        still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for target in targets:
            if target not in still_read:  # a weight something else shares stays
                owner_path, attr_name = target.rsplit(".", 1)
                delattr(gm.get_submodule(owner_path), attr_name)
                dropped += 1
        return dropped
