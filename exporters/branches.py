"""Stitch per-timestep-group ONNX graphs into one model that selects its group from ``timestep``.

Each group's graph becomes the ``then`` branch of an ``If``; the outer graph computes every row's group
(``sum(timestep > end_g)`` over the groups' ends), gathers the rows of each group, runs that group's
branch on them when there are any, and scatters the results back in place. Rows whose timestep lies
outside ``[0, T-1]`` belong to no group and keep a NaN output.

Which initializers are shared is decided by the passes, not here: for every tensor of the fx graphs
(initializer names are their module paths) ``sharing[name]`` says whether every group holds the same
object. A shared one is stored once in the outer graph, where the branches read it; a per-group one is
stored once per group as ``<name>__group<g>``. Constants the ONNX exporter creates itself (shapes, folded
scalars) are not parameters: they are stored once when equal in every branch, else per group.

Each branch body keeps the exporter's ``value_info`` (the shapes of the tensors it computes), renamed like its
nodes and with the exporter's symbolic batch renamed ``rows`` (a branch sees only its group's rows). ONNX
Runtime needs them: its own shape inference loses the shape of a tensor taken out of a sequence
(``SplitToSequence -> SequenceAt``, the adaLN ``chunk``) and everything downstream, and ``BiasGeluFusion``
(``Add(bias) + Gelu -> FastGelu(x, bias)``) requires the Add's input shapes; without them every branch ran a
separate bias ``Add`` and a plain ``Gelu`` per block (measured, ONNX Runtime 1.31).
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..families import Signature


def _digest(tensor: onnx.TensorProto) -> str:
    return hashlib.sha256(numpy_helper.to_array(tensor).tobytes()).hexdigest()


def _rename_graph(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [mapping.get(name, name) for name in node.input]
        node.output[:] = [mapping.get(name, name) for name in node.output]
        for attribute in node.attribute:  # nested subgraphs read outer names too
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename_graph(attribute.g, mapping)


def _branch_value_info(graph: onnx.GraphProto, mapping: dict[str, str], batch_dim: str) -> list[onnx.ValueInfoProto]:
    """The exporter's value_info of the tensors the branch's nodes compute, under their branch names, with the
    symbolic batch dimension ``batch_dim`` renamed ``rows``."""
    produced = {name for node in graph.node for name in node.output}
    infos = []
    for info in graph.value_info:
        if info.name not in produced:
            continue
        renamed = onnx.ValueInfoProto()
        renamed.CopyFrom(info)
        renamed.name = mapping.get(info.name, info.name)
        for dim in renamed.type.tensor_type.shape.dim:
            if batch_dim and dim.dim_param == batch_dim:
                dim.dim_param = "rows"
        infos.append(renamed)
    return infos


def _shared_initializers(branches: list[onnx.ModelProto], sharing: dict[str, bool]) -> set[str]:
    names = [{t.name for t in b.graph.initializer} for b in branches]
    common = set.intersection(*names)
    shared = {name for name in common if sharing.get(name, False)}
    exporter_made = common - set(sharing)
    digests: dict[str, set[str]] = {}
    for branch in branches:
        for tensor in branch.graph.initializer:
            if tensor.name in exporter_made:
                digests.setdefault(tensor.name, set()).add(_digest(tensor))
    return shared | {name for name, values in digests.items() if len(values) == 1}


def stitch_group_branches(branches: list[onnx.ModelProto], group_ends: list, sharing: dict[str, bool],
                          signature: Signature, first_timestep=0) -> onnx.ModelProto:
    """One model from the groups' models; the group of a row is found from the signature's timestep input,
    compared in its own dtype, and a timestep outside ``[first_timestep, group_ends[-1]]`` leaves NaN."""
    first = branches[0]
    input_names, output_name = signature.names, signature.output
    timestep_dtype = np.dtype(signature.spec("timestep").dtype)
    shared = _shared_initializers(branches, sharing)
    outer_initializers = [t for t in first.graph.initializer if t.name in shared]

    out_type = first.graph.output[0].type.tensor_type
    out_dims = [d.dim_value for d in out_type.shape.dim[1:]]
    batch_dim = first.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the exporter's symbolic batch
    nodes = []
    const = lambda name, array: outer_initializers.append(numpy_helper.from_array(np.asarray(array), name))  # noqa: E731
    const("ditq_group_ends", np.asarray(group_ends[:-1], dtype=timestep_dtype))
    const("ditq_last_timestep", np.asarray(group_ends[-1], dtype=timestep_dtype))
    const("ditq_zero_i64", np.asarray(0, dtype=np.int64))
    first_name = "ditq_zero_i64"  # the same constant where the timesteps start at integer 0 (DiT's)
    if timestep_dtype != np.int64 or first_timestep != 0:
        first_name = "ditq_first_timestep"
        const(first_name, np.asarray(first_timestep, dtype=timestep_dtype))
    const("ditq_minus_one", np.asarray(-1, dtype=np.int64))
    const("ditq_axes_1", np.asarray([1], dtype=np.int64))
    const("ditq_nan", np.asarray(np.nan, dtype=np.float32))
    const("ditq_out_dims", np.asarray(out_dims, dtype=np.int64))
    const("ditq_batch_slice", np.asarray([0], dtype=np.int64))
    const("ditq_batch_slice_end", np.asarray([1], dtype=np.int64))
    sample = input_names[signature.index("latent")]
    timestep = signature.timestep_name
    nodes += [
        helper.make_node("Unsqueeze", [timestep, "ditq_axes_1"], ["ditq_t_col"]),
        helper.make_node("Greater", ["ditq_t_col", "ditq_group_ends"], ["ditq_past_end"]),
        helper.make_node("Cast", ["ditq_past_end"], ["ditq_past_end_i64"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["ditq_past_end_i64", "ditq_axes_1"], ["ditq_group_raw"], keepdims=0),
        helper.make_node("GreaterOrEqual", [timestep, first_name], ["ditq_t_ge0"]),
        helper.make_node("LessOrEqual", [timestep, "ditq_last_timestep"], ["ditq_t_le_last"]),
        helper.make_node("And", ["ditq_t_ge0", "ditq_t_le_last"], ["ditq_t_valid"]),
        helper.make_node("Where", ["ditq_t_valid", "ditq_group_raw", "ditq_minus_one"], ["ditq_group"]),
        helper.make_node("Shape", [sample], ["ditq_sample_shape"]),
        helper.make_node("Slice", ["ditq_sample_shape", "ditq_batch_slice", "ditq_batch_slice_end"], ["ditq_batch"]),
        helper.make_node("Concat", ["ditq_batch", "ditq_out_dims"], ["ditq_out_shape"], axis=0),
        helper.make_node("Expand", ["ditq_nan", "ditq_out_shape"], ["ditq_out_0"]),
    ]
    for g, branch in enumerate(branches):
        graph = branch.graph
        mapping = {name: f"{name}__group{g}" for name in input_names}
        for tensor in graph.initializer:
            if tensor.name not in shared:
                mapping[tensor.name] = f"{tensor.name}__group{g}"
                renamed = onnx.TensorProto()
                renamed.CopyFrom(tensor)
                renamed.name = mapping[tensor.name]
                outer_initializers.append(renamed)
        for node in graph.node:
            for name in node.output:
                mapping[name] = f"group{g}/{name}"
            node.name = f"group{g}/{node.name}"
        value_info = _branch_value_info(graph, mapping, batch_dim)
        _rename_graph(graph, mapping)
        then_graph = helper.make_graph(
            list(graph.node), f"group{g}", [],
            [helper.make_tensor_value_info(mapping[output_name], TensorProto.FLOAT, ["rows", *out_dims])],
            value_info=value_info)
        empty = numpy_helper.from_array(np.zeros([0, *out_dims], dtype=np.float32), f"group{g}/empty_value")
        else_graph = helper.make_graph(
            [helper.make_node("Constant", [], [f"group{g}/empty"], value=empty)], f"group{g}_empty", [],
            [helper.make_tensor_value_info(f"group{g}/empty", TensorProto.FLOAT, [0, *out_dims])])
        rows, prefix = f"ditq_rows_{g}", f"ditq_g{g}"
        const(f"{prefix}_index", np.asarray(g, dtype=np.int64))
        nodes += [
            helper.make_node("Equal", ["ditq_group", f"{prefix}_index"], [f"{prefix}_mask"]),
            helper.make_node("NonZero", [f"{prefix}_mask"], [f"{prefix}_nonzero"]),
            helper.make_node("Transpose", [f"{prefix}_nonzero"], [rows], perm=[1, 0]),
            *(helper.make_node("GatherND", [name, rows], [f"{name}__group{g}"]) for name in input_names),
            helper.make_node("Size", [f"{prefix}_nonzero"], [f"{prefix}_count"]),
            helper.make_node("Greater", [f"{prefix}_count", "ditq_zero_i64"], [f"{prefix}_any"]),
            helper.make_node("If", [f"{prefix}_any"], [f"{prefix}_out"], name=f"group{g}_branch",
                             then_branch=then_graph, else_branch=else_graph),
            helper.make_node("ScatterND", [f"ditq_out_{g}", rows, f"{prefix}_out"], [f"ditq_out_{g + 1}"]),
        ]
    nodes.append(helper.make_node("Identity", [f"ditq_out_{len(branches)}"], [output_name]))
    outer = helper.make_graph(nodes, "ditq_timestep_groups", list(first.graph.input), list(first.graph.output),
                              outer_initializers)
    model = helper.make_model(outer, opset_imports=list(first.opset_import), producer_name="ditq")
    model.ir_version = first.ir_version
    return model
