"""Lowering passes and helpers the GPU targets share (``cuda.py``, ``tensorrt.py``).

``DequantizeConstantBiases``: ``DequantizeLinear(int32 bias, s_x * s_w, 0)`` reads only initializers, so it is a
constant: ``b = b_q * (s_x s_w)``, computed here in float32 exactly as ONNX Runtime computes it at run time
(the same float32 product), stored as a float initializer. The int32 bias exists for the CPU's ``QGemm``;
TensorRT's ``DequantizeLinear`` takes int8/FP8/int4 only (onnx-tensorrt ``docs/operators.md``) and
``MatMulNBits`` adds a float bias.

``SplitSequencesToSplit``: ``torch.chunk`` exports as ``SplitToSequence`` + ``SequenceAt``; TensorRT's parser
supports neither (onnx-tensorrt ``docs/operators.md``: "SequenceAt N", "SplitToSequence N") and ONNX Runtime's
CUDA provider runs sequence ops on the CPU. With a constant chunk size, a static axis length and constant
positions it is exactly ``Split`` with equal parts.

``RemoveDeadCode``: onnx-ir's dead-code elimination (nodes and initializers nothing reads), so that rewritten
patterns leave no unused weights in the artifact.

Helpers: :func:`probe_ranges` runs a model in ONNX Runtime (CPU, float32) on denoiser inputs and returns the
largest magnitude of every float tensor; :func:`split_group_models` turns a timestep-grouped model (one ``If``
branch per group) into one standalone model per group.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (ir.passes.common: shape inference, dead-code removal)
from onnx import helper

from . import LoweringPass, all_nodes

PASS_KEY = "ditq.pass"  # node metadata: the lowering pass that created the node
LAYER_KEY = "ditq.layer"  # node metadata: the quantized layer it belongs to, when it belongs to one


def mark_origin(node: ir.Node, pass_name: str, layer: str | None = None) -> ir.Node:
    """Record on ``node`` which pass created it (and for which layer): carried into the ONNX file."""
    node.metadata_props[PASS_KEY] = pass_name
    if layer:
        node.metadata_props[LAYER_KEY] = layer
    return node


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's data when it is a constant (an initializer), else None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def add_initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    """Register a new initializer (with its dtype and shape set, as the model's own are)."""
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor)
    model.graph.register_initializer(value)
    return value


def layer_of_weight(layers: dict, name: str) -> str | None:
    """The layer key whose recorded weight tensor is ``name`` (or one group's copy of it, ``<w>__group<g>``)."""
    base = name.split("__group")[0]
    for key, record in layers.items():
        if record.weight == base:
            return key
    return None


class DequantizeConstantBiases(LoweringPass):
    name = "dequantize_constant_biases"

    def lower(self, model):
        made: dict[tuple[int, int, int], ir.Value] = {}
        rewritten = 0
        for node in list(all_nodes(model.graph)):
            if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
                continue
            x, scale = node.inputs[0], node.inputs[1]
            zero = node.inputs[2] if len(node.inputs) > 2 else None
            if x is None or x.dtype != ir.DataType.INT32 or constant_array(x) is None or constant_array(scale) is None:
                continue  # not a constant int32 bias: weights and activations keep their Q/DQ
            key = (id(x), id(scale), id(zero))
            if key not in made:
                q = constant_array(x).astype(np.float32)
                z = constant_array(zero).astype(np.float32) if zero is not None else np.float32(0)
                s = constant_array(scale).astype(np.float32)
                bias = ((q - z) * s).astype(np.float32)  # DequantizeLinear's arithmetic, in float32
                made[key] = add_initializer(model, f"{x.name}.dequantized", bias)
            node.outputs[0].replace_all_uses_with(made[key])
            node.graph.remove(node, safe=True)
            rewritten += 1
        return rewritten > 0, (f"folded {rewritten} int32 bias dequantizations into {len(made)} float bias "
                               "initializers (b = b_q * s_x * s_w, float32)")


class SplitSequencesToSplit(LoweringPass):
    name = "split_sequences_to_split"

    def lower(self, model):
        rewritten, declined = 0, []
        for node in list(all_nodes(model.graph)):
            if node.op_type != "SplitToSequence":
                continue
            reason = self._check(node)
            if reason:
                declined.append(f"{node.name}: {reason}")
                continue
            x, axis, parts, positions = self._plan(node)
            split_sizes = add_initializer(model, f"{node.name}.split_sizes",
                                          np.full(parts, x.shape[axis] // parts, dtype=np.int64))
            split = mark_origin(ir.node("Split", [x, split_sizes], {"axis": axis}, num_outputs=parts,
                                        name=f"{node.name}.split"), self.name)
            node.graph.insert_before(node, split)
            for reader, position in positions:
                out = split.outputs[position]
                out.dtype, out.shape = reader.outputs[0].dtype, reader.outputs[0].shape
                reader.outputs[0].replace_all_uses_with(out)
                name = reader.outputs[0].name
                reader.graph.remove(reader, safe=True)
                out.name = name
            node.graph.remove(node, safe=True)
            rewritten += 1
        summary = f"rewrote {rewritten} SplitToSequence/SequenceAt chunks as Split"
        if declined:
            summary += f"; declined {len(declined)} ({declined[0]})"
        return rewritten > 0, summary

    @staticmethod
    def _check(node: ir.Node) -> str | None:
        x = node.inputs[0]
        split = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
        keepdims = node.attributes["keepdims"].as_int() if "keepdims" in node.attributes else 1
        if split is None or split.ndim != 0:
            return "the chunk size is not a constant scalar"
        if not keepdims:
            return "keepdims=0"
        if x.shape is None or not isinstance(x.shape[axis], int):
            return "the split axis has no static length"
        if x.shape[axis] % int(split):
            return "the axis length is not a multiple of the chunk size"
        readers = [use.node for use in node.outputs[0].uses()]
        if not readers or any(r.op_type != "SequenceAt" or constant_array(r.inputs[1]) is None for r in readers):
            return "the sequence is read by something other than SequenceAt at a constant position"
        return None

    @staticmethod
    def _plan(node: ir.Node):
        x = node.inputs[0]
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
        axis = axis % len(x.shape)
        parts = x.shape[axis] // int(constant_array(node.inputs[1]))
        positions = [(use.node, int(constant_array(use.node.inputs[1])) % parts) for use in node.outputs[0].uses()]
        return x, axis, parts, positions


class RemoveDeadCode(LoweringPass):
    name = "remove_dead_code"

    def lower(self, model):
        before = sum(1 for _ in all_nodes(model.graph)), len(model.graph.initializers)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        after = sum(1 for _ in all_nodes(model.graph)), len(model.graph.initializers)
        removed = (before[0] - after[0], before[1] - after[1])
        return removed != (0, 0), f"removed {removed[0]} unused nodes and {removed[1]} unused initializers"


# ---------------------------------------------------------------------------------------------
# Timestep groups: one standalone model per If branch
# ---------------------------------------------------------------------------------------------

def _outer_references(graph: onnx.GraphProto) -> list[str]:
    """Names a (sub)graph reads that it does not produce itself (nested subgraphs included)."""
    produced = {name for node in graph.node for name in node.output} | {t.name for t in graph.initializer} | \
        {i.name for i in graph.input}
    seen: list[str] = []
    for node in graph.node:
        names = list(node.input)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                names += _outer_references(attribute.g)
        for name in names:
            if name and name not in produced and name not in seen:
                seen.append(name)
    return seen


def group_branches(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, dict[str, str]]]:
    """The ``If`` nodes of a timestep-grouped model, in group order, each with the map from the outer tensors
    its branch reads as its inputs (``GatherND`` of a graph input: that group's rows) to the input's name.
    Empty for a model without groups. Structural, from ``exporters/branches.py``'s graph: one ``If`` per group,
    in order, whose ``then`` branch reads the rows ``GatherND`` selected from the graph's inputs."""
    graph = model.graph
    graph_inputs = {i.name for i in graph.input}
    gathered = {node.output[0]: node.input[0] for node in graph.node
                if node.op_type == "GatherND" and node.input[0] in graph_inputs}
    branches = []
    for node in graph.node:
        if node.op_type != "If":
            continue
        then_graph = next(a.g for a in node.attribute if a.name == "then_branch")
        inputs = {name: gathered[name] for name in _outer_references(then_graph) if name in gathered}
        if inputs:
            branches.append((node, inputs))
    return branches


def split_group_models(model: onnx.ModelProto) -> list[onnx.ModelProto]:
    """One model per timestep group: the group's ``then`` branch with the initializers it reads, its row
    inputs renamed back to the graph's input names and its output to the graph's output name. Each computes
    what the grouped model computes for rows of its group."""
    outer_initializers = {t.name: t for t in model.graph.initializer}
    models = []
    for if_node, inputs in group_branches(model):
        then_graph = onnx.GraphProto()
        then_graph.CopyFrom(next(a.g for a in if_node.attribute if a.name == "then_branch"))
        rename = dict(inputs)
        rename[then_graph.output[0].name] = model.graph.output[0].name
        _rename(then_graph, rename)
        used = [name for name in _outer_references(then_graph) if name in outer_initializers]
        graph = helper.make_graph(list(then_graph.node), then_graph.name,
                                  list(model.graph.input),
                                  [model.graph.output[0]], [outer_initializers[name] for name in used])
        group_model = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="ditq")
        group_model.ir_version = model.ir_version
        models.append(group_model)
    return models


def _rename(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [mapping.get(name, name) for name in node.input]
        node.output[:] = [mapping.get(name, name) for name in node.output]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename(attribute.g, mapping)


# ---------------------------------------------------------------------------------------------
# Value ranges: run the model on denoiser inputs
# ---------------------------------------------------------------------------------------------

_OUTPUTS_PER_RUN = 256  # intermediate tensors fetched per ONNX Runtime run, to bound memory on large models


def probe_ranges(model: onnx.ModelProto, inputs_by_group: dict[int, list[tuple]]) -> dict[str, float]:
    """max |x| of every float tensor of ``model`` over the given inputs, by tensor name. A grouped model is
    probed branch by branch (each group's own model on its own inputs), since ONNX Runtime returns no
    tensor from inside an ``If``."""
    ranges: dict[str, float] = defaultdict(float)
    groups = split_group_models(model) or [model]
    for index, group_model in enumerate(groups):
        batches = inputs_by_group.get(index, []) if len(groups) > 1 else \
            [b for batches in inputs_by_group.values() for b in batches]
        for name, value in _probe_one(group_model, batches).items():
            ranges[name] = max(ranges[name], value)
    return dict(ranges)


def model_feeds(model: onnx.ModelProto, inputs) -> dict[str, np.ndarray]:
    """ONNX Runtime's feeds for denoiser ``inputs`` given in the model's input order, each in its input's dtype
    (the model's inputs are the family signature's, as the exporter named them)."""
    graph_inputs = list(model.graph.input)
    if len(inputs) != len(graph_inputs):
        raise ValueError(f"{len(inputs)} inputs for a model of {len(graph_inputs)}")
    return {info.name: np.ascontiguousarray(value, dtype=helper.tensor_dtype_to_np_dtype(
        info.type.tensor_type.elem_type)) for info, value in zip(graph_inputs, inputs)}


def _probe_one(model: onnx.ModelProto, batches: list[tuple]) -> dict[str, float]:
    import onnxruntime as ort

    from ditq_compiler.runtime import quiet_session_options

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    names = [info.name for info in inferred.graph.value_info if info.type.tensor_type.elem_type in float_types]
    names += [o.name for o in model.graph.output]
    ranges: dict[str, float] = {}
    options = quiet_session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    for start in range(0, len(names), _OUTPUTS_PER_RUN):
        chunk = names[start:start + _OUTPUTS_PER_RUN]
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in chunk)
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for inputs in batches:
            feeds = model_feeds(model, inputs)
            for name, array in zip(chunk, session.run(chunk, feeds)):
                array = np.asarray(array)
                if array.size and np.issubdtype(array.dtype, np.floating):
                    finite = np.abs(array[np.isfinite(array)])
                    peak = float(finite.max()) if finite.size else 0.0
                    if not np.isfinite(array).all():
                        peak = float("inf")
                    ranges[name] = max(ranges.get(name, 0.0), peak)
    return ranges
