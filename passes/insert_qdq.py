"""Q/DQ insertion: rewrite every annotated ``aten.linear`` of every branch into integer-weight form.

For a layer ``y = x W^T + b`` with its branch's parameters it emits::

    x_q  = quantize(x, s_x, z_x)                     # activation spec (uint8 affine), once per input tensor
    x_dq = dequantize(x_q, s_x, z_x)
    W_dq = dequantize(W_q^T, s_w, 0, axis=1)         # W_q = clamp(round(W / s_w), qmin, qmax), stored [in, out]
    y    = matmul(x_dq, W_dq) + b

so that ONNX Runtime sees ``DequantizeLinear -> MatMul <- DequantizeLinear(int8 initializer)`` and fuses
it into ``MatMulIntegerToFloat`` (3-d inputs). A layer whose spec asks for an int32 bias (2-d input, the
adaLN modulation, which ONNX Runtime turns into ``QGemm``) gets ``b_q = round(b / (s_x s_w))`` computed in
int64 (the parameter pass already raised weight scales so that it fits) with ``DequantizeLinear(b_q, s_x s_w)``.
The weight is stored transposed so no Transpose separates it from the MatMul.

A block-wise int4 weight (``--weight-block B``) is dequantized along the stored weight's input axis with
``DequantizeLinear(block_size=B)`` (scales ``[blocks, out]``); a dynamic input (``--act dynamic``) goes through
``ditq.dynamic_quantize`` instead of a calibrated Q/DQ pair. The CPU lowering turns both into the kernels
that compute them (``exporters/lowering/cpu_nbits.py``).

Every reader of one tensor (q, k, v) shares one Q/DQ pair; the pass checks that they were given the same
activation parameters instead of assuming it. Tensors are shared across branches exactly when their
inputs are (the same float weight and weight-scale objects give the same int8 weight object), so a
weight that no pass made per-group is stored once in the artifact.

Buffers follow a naming contract (as ONNX Runtime's quantizer names its tensors), so a debugger can pair
float and quantized tensors of a layer: ``<layer>.weight_quantized``, ``.weight_scale``,
``.weight_zero_point``, ``.bias_quantized``, ``.bias_scale``, ``.bias_zero_point``, ``.input_scale``,
``.input_zero_point``, where ``<layer>`` is the layer key (``<module>#k`` for a module's k-th extra call,
which gets its own container module so that no call overwrites another's tensors). These are the ONNX
initializer names too (the exporter keeps tensor names; it renames nodes, so the fx node names given to the
Q/DQ calls below hold in the fx dumps only). The name of each layer's weight tensor is recorded in its
provenance, so later stages never derive it.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..errors import PassPreconditionError
from ..grouped import TensorMemo, get_tensor
from ..pass_manager import BranchPass, BranchResult
from ..qspec import (OUTPUT_ROWS_KEY, PARAMS_KEY, PROVENANCE_KEY, ROTATION_KEY, SMOOTHING_KEY, SPEC_KEY,
                     quantize_bias_int32)
from ..quantizers import activation_qdq, quantize_weight, weight_dequantize_scale

_QUANTIZE = torch.ops.ditq.quantize.default
_DEQUANTIZE = torch.ops.ditq.dequantize.default
_ROUND_TO_GRID = torch.ops.ditq.round_to_grid.default
_DEQUANTIZE_BLOCK = torch.ops.ditq.dequantize_block.default
_DYNAMIC = torch.ops.ditq.dynamic_quantize.default


def _ident(layer: str) -> str:
    return layer.replace(".", "_").replace("#", "_call")


def layer_owner(gm, layer: str, module: str) -> tuple[torch.nn.Module, str]:
    """The module that holds a layer's quantized tensors, and its path: the layer's own module for its
    first call, a sibling container ``<module>#k`` for its k-th extra call."""
    if layer == module:
        return gm.get_submodule(module), module
    parent, _, atom = module.rpartition(".")
    parent_module = gm.get_submodule(parent) if parent else gm
    name = f"{atom}#{layer.rsplit('#', 1)[1]}"
    if not hasattr(parent_module, name):
        parent_module.add_module(name, torch.nn.Module())
    return getattr(parent_module, name), f"{parent}.{name}" if parent else name


class InsertQuantDequant(BranchPass):
    name = "insert_qdq"
    preserves_semantics = False

    def __init__(self):
        self.memo = TensorMemo()

    def check_preconditions(self, gm, ctx):
        super().check_preconditions(gm, ctx)
        for branch in gm.graph_modules():
            for node in branch.graph.nodes:
                if SPEC_KEY in node.meta and PARAMS_KEY not in node.meta:
                    raise PassPreconditionError(
                        self.name, f"{node.meta[SPEC_KEY].layer} is annotated but has no parameters; run a recipe first")

    def run_branch(self, gm, ctx, branch):
        graph = gm.graph
        group = branch.index
        names: dict[int, str] = {}  # one name per tensor object in a branch (a module called twice reuses it)
        dequantized_inputs: dict[str, tuple[torch.fx.Node, object]] = {}
        float_tensors: set[str] = set()
        counts, details = Counter(), []
        for node in list(graph.nodes):
            spec = node.meta.get(SPEC_KEY)
            if spec is None:
                continue
            params = node.meta[PARAMS_KEY]
            x, weight_node = node.args[0], node.args[1]
            bias_node = node.args[2] if len(node.args) > 2 else None
            float_tensors.add(weight_node.target)
            if spec.bias == "int32" and bias_node is not None:
                float_tensors.add(bias_node.target)
            owner, owner_path = layer_owner(gm, spec.layer, spec.module)
            provenance = {"pass": self.name, "layer": spec.layer, "group": group}

            def emit(target, args, name=None, role="", _prov=provenance):
                created = graph.create_node("call_function", target, args, name=name)
                created.meta[PROVENANCE_KEY] = {**_prov, "role": role}
                return created

            def attr(buffer_name: str, value: torch.Tensor, _owner=owner, _path=owner_path, _prov=provenance):
                if id(value) not in names:
                    if hasattr(_owner, buffer_name):
                        raise RuntimeError(f"{_path}.{buffer_name} already exists: two layers share a key")
                    _owner.register_buffer(buffer_name, value)
                    names[id(value)] = f"{_path}.{buffer_name}"
                created = graph.get_attr(names[id(value)])
                created.meta[PROVENANCE_KEY] = {**_prov, "role": buffer_name}
                return created

            with graph.inserting_before(node):
                act = params.activation
                shared_note = ""
                if act is None:  # weight-only: the input stays in float
                    x_dq = x
                    shared_note = " (weight-only)"
                elif spec.activation.dynamic:  # quantized by the kernel at run time; readers of one kernel share it
                    key = f"{spec.input_key}:dynamic{spec.activation.block_size or 0}"
                    if key not in dequantized_inputs:
                        dequantized_inputs[key] = (emit(_DYNAMIC, (x, spec.activation.block_size or 0),
                                                        f"{_ident(spec.layer)}_input_dynamic", "input_dynamic"), act)
                    x_dq = dequantized_inputs[key][0]
                    shared_note = " (dynamic input)"
                elif spec.input_key in dequantized_inputs:
                    x_dq, first_params = dequantized_inputs[spec.input_key]
                    if (first_params.scale, first_params.zero_point) != (act.scale, act.zero_point):
                        raise RuntimeError(f"{spec.layer} reads {spec.input_key} with other activation parameters "
                                           f"than its first reader; one tensor has one quantizer")
                    shared_note = " (shares its input's Q/DQ)"
                else:
                    qdq_scale, qdq_zero = activation_qdq(act, spec.activation)
                    scale = attr("input_scale", torch.tensor(qdq_scale, dtype=torch.float32))
                    zero = attr("input_zero_point", qdq_zero)
                    if act.grid is not None:  # fp4: round onto the grid, then quantize exactly
                        grid_scale = attr("input_grid_scale", torch.tensor(act.scale, dtype=torch.float32))
                        x = emit(_ROUND_TO_GRID, (x, grid_scale, act.grid), f"{_ident(spec.layer)}_input_rounded",
                                 "input_round")
                    x_q = emit(_QUANTIZE, (x, scale, zero, 0), f"{_ident(spec.layer)}_input_quantized", "input_q")
                    x_dq = emit(_DEQUANTIZE, (x_q, scale, zero, 0), f"{_ident(spec.layer)}_input_dequantized",
                                "input_dq")
                    dequantized_inputs[spec.input_key] = (x_dq, act)

                weight = get_tensor(gm, weight_node.target)
                weight_scale, grid = params.weight_scale, params.weight_grid
                weight_q = self.memo(f"weight_q:{grid}", (weight, weight_scale), lambda: quantize_weight(
                    weight, weight_scale, spec.weight, grid).t().contiguous())
                w_q = attr("weight_quantized", weight_q)
                dq_scale = self.memo(f"weight_scale:{grid}", (weight_scale,),
                                     lambda: weight_dequantize_scale(weight_scale, spec.weight, grid).t().contiguous()
                                     if weight_scale.dim() == 2 else
                                     weight_dequantize_scale(weight_scale, spec.weight, grid).clone())
                w_scale = attr("weight_scale", dq_scale)
                w_zero = attr("weight_zero_point", self.zeros(spec.layer, dq_scale.shape, spec.weight.torch_dtype))
                if spec.weight.block_size:  # scales [blocks, out] along the stored weight's input axis
                    w_dq = emit(_DEQUANTIZE_BLOCK, (w_q, w_scale, w_zero, 0, spec.weight.block_size),
                                f"{_ident(spec.layer)}_weight_dequantized", "weight_dq")
                else:
                    w_dq = emit(_DEQUANTIZE, (w_q, w_scale, w_zero, 1), f"{_ident(spec.layer)}_weight_dequantized",
                                "weight_dq")
                out = emit(torch.ops.aten.matmul.default, (x_dq, w_dq), role="matmul")
                weight_format = f"fp4-{grid}" if spec.weight.dtype == "fp4" else \
                    f"{spec.weight.dtype}-block{spec.weight.block_size}" if spec.weight.block_size else spec.weight.dtype
                out.meta[PROVENANCE_KEY].update(weight=w_q.target, weight_format=weight_format, bias=spec.bias,
                                                module_role=spec.role,
                                                activation="dynamic" if act is not None and spec.activation.dynamic
                                                else "static")
                # what the layer's input went through and how a fold rescaled its output rows, for error analysis
                for key in (ROTATION_KEY, SMOOTHING_KEY, OUTPUT_ROWS_KEY):
                    if key in node.meta:
                        out.meta[key] = node.meta[key]
                if bias_node is not None:
                    if spec.bias == "int32":
                        # the bias's scale is the product of the two DequantizeLinear scales (QGemm's contract)
                        bias = get_tensor(gm, bias_node.target)
                        input_dq_scale = activation_qdq(act, spec.activation)[0]
                        bias_q = self.memo(f"bias_q:{input_dq_scale!r}", (bias, dq_scale),
                                           lambda: quantize_bias_int32(bias, input_dq_scale, dq_scale))
                        bias_scale = self.memo(f"bias_scale:{input_dq_scale!r}", (dq_scale,),
                                               lambda: (input_dq_scale * dq_scale.to(torch.float64)).to(torch.float32))
                        b_q = attr("bias_quantized", bias_q)
                        b_scale = attr("bias_scale", bias_scale)
                        b_zero = attr("bias_zero_point", self.zeros(spec.layer, bias_q.shape, torch.int32))
                        bias_node = emit(_DEQUANTIZE, (b_q, b_scale, b_zero, 0),
                                         f"{_ident(spec.layer)}_bias_dequantized", "bias_dq")
                        counts["int32 bias"] += 1
                    out = emit(torch.ops.aten.add.Tensor, (out, bias_node), role="bias_add")
            out.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            counts["layers"] += 1
            details.append(f"{spec.layer}: {spec.weight.dtype} weight {tuple(weight_q.shape)}"
                           + (", input quantized at run time" if spec.activation is not None and spec.activation.dynamic
                              else f", input scale {act.scale:.4g}" if act is not None else "") + shared_note)
        counts["activation quantizers"] = sum(1 for key in dequantized_inputs if ":dynamic" not in key)
        counts["dynamic activations"] = len(dequantized_inputs) - counts["activation quantizers"]
        counts["dropped float tensors"] = self._drop_unused(gm, float_tensors)
        return BranchResult(counts["layers"] > 0, counts, details)

    def zeros(self, layer: str, shape, dtype) -> torch.Tensor:
        """A layer's zero points of a symmetric quantizer: one tensor shared by every group."""
        return self.memo(f"zeros:{layer}:{tuple(shape)}:{dtype}", (), lambda: torch.zeros(shape, dtype=dtype))

    def summarize(self, counts, ctx):
        dynamic = f", {counts['dynamic activations']} inputs quantized at run time" \
            if counts.get("dynamic activations") else ""
        return (f"rewrote {counts['layers']} linears to Q/DQ form ({counts['activation quantizers']} activation "
                f"Q/DQ pairs{dynamic}, {counts['int32 bias']} with int32 bias for QGemm), dropped "
                f"{counts['dropped float tensors']} float parameters")

    @staticmethod
    def _drop_unused(gm, targets: set[str]) -> int:
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
