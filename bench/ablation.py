"""Each change of issue 11 measured on its own: the artifact with one change taken back, timed against the full
one in the same interleaved rounds.

Every variant is built the way the change can be taken back without a switch of its own in the compiler:

* integer attention: a compile without ``--quantize-attention`` (ditq's default; the benchmark's full artifact
  opts in);
* ONNX Runtime's fused attention: :func:`fuse_attention` rewrites the full artifact's attention (QK^T, softmax,
  PV and the reshapes, transposes and Q/DQ around them) into one ``com.microsoft.MultiHeadAttention`` on the
  float q, k, v that the integer GEMMs produce;
* the bias fold: the fold's own inverse (``exporters/lowering/canonical.py``, what ``ditq lower`` runs) on the
  full artifact, giving the Q/DQ ``MatMul`` + ``Add`` form ONNX Runtime fuses without the bias;
* deduplication: a compile of the same checkpoint with every block's embedder moved by one ulp
  (:func:`perturb_shared_embedders`), so no two embedders are identical (as in a diffusers-native DiT);
* GELU with its bias inside ``If`` branches: a 4-timestep-group artifact with its branches' ``value_info``
  dropped (:func:`strip_branch_value_info`, what the exporter wrote before it kept them), so ONNX Runtime's
  shape inference loses the shapes ``BiasGeluFusion`` needs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

MICROSOFT = "com.microsoft"
_PASS_THROUGH = {"Transpose", "Reshape", "QuantizeLinear", "DequantizeLinear", "Identity"}


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _scalar_constant(graph: onnx.GraphProto, name: str) -> bool:
    for tensor in graph.initializer:
        if tensor.name == name:
            return int(np.prod(tensor.dims)) == 1
    return False


def _source(graph, producers, name: str) -> str:
    """Walk up from ``name`` through reshapes, transposes, Q/DQ and scalings by a constant scalar (the
    attention scale, which ``MultiHeadAttention`` applies itself) to the tensor the linear layer produced."""
    while name in producers:
        node = producers[name]
        if node.op_type in _PASS_THROUGH or (node.op_type in ("Mul", "Div") and _scalar_constant(graph, node.input[1])):
            name = node.input[0]
        else:
            break
    return name


def fuse_attention(model: onnx.ModelProto, num_heads: int) -> tuple[onnx.ModelProto, int]:
    """Replace each attention of the main graph with ``com.microsoft.MultiHeadAttention(q, k, v)`` (float,
    ONNX Runtime's CPU kernel, scale 1/sqrt(head width) as SDPA's). Returns the new model and the count."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    producers, consumers = _producers(graph), _consumers(graph)
    replaced, new_nodes = 0, {}
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        qk = producers.get(softmax.input[0])
        if qk is None or qk.op_type != "MatMul":
            continue
        q, k = _source(graph, producers, qk.input[0]), _source(graph, producers, qk.input[1])
        # forward: softmax -> (Q/DQ) -> PV MatMul -> Transpose -> (Identity) -> Reshape [B, S, D]
        value, pv = softmax.output[0], None
        while pv is None:
            readers = consumers.get(value, [])
            if len(readers) != 1:
                break
            if readers[0].op_type == "MatMul":
                pv = readers[0]
            elif readers[0].op_type in ("QuantizeLinear", "DequantizeLinear"):
                value = readers[0].output[0]
            else:
                break
        if pv is None:
            continue
        v = _source(graph, producers, pv.input[1])
        out = pv.output[0]
        while len(consumers.get(out, [])) == 1 and consumers[out][0].op_type in ("Transpose", "Identity", "Reshape"):
            out = consumers[out][0].output[0]
        if producers[out].op_type != "Reshape":
            continue
        mha = helper.make_node("MultiHeadAttention", [q, k, v], [out], domain=MICROSOFT, num_heads=num_heads,
                               name=f"{out}/MultiHeadAttention")
        new_nodes[id(producers[out])] = mha  # placed where the attention's last node was
        producers[out].output[0] = f"{out}.unfused"
        replaced += 1
    nodes = [new_nodes.get(id(node), node) for node in graph.node]
    nodes = [n for n in nodes if n.op_type != "Reshape" or not n.output[0].endswith(".unfused")]
    del graph.node[:]
    graph.node.extend(_live(graph, nodes))
    read = {name for node in graph.node for name in node.input} | {
        name for node in graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH
        for n in a.g.node for name in n.input}
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if replaced and not any(op.domain == MICROSOFT for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MICROSOFT, 1))
    return model, replaced


def _live(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose outputs nothing reads (the attention's leftovers)."""
    wanted = {o.name for o in graph.output}
    live = []
    for node in reversed(nodes):
        subgraph_inputs = {name for a in node.attribute if a.type == onnx.AttributeProto.GRAPH
                           for n in a.g.node for name in n.input}
        if any(out in wanted for out in node.output) or node.op_type == "If":
            live.append(node)
            wanted.update(node.input)
            wanted.update(subgraph_inputs)
    return live[::-1]


def strip_branch_value_info(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The model with the ``value_info`` of every ``If`` branch dropped; returns it and how many were."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    dropped = 0
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                dropped += len(attribute.g.value_info)
                del attribute.g.value_info[:]
    return model, dropped


def unfold_biases(artifact) -> onnx.ModelProto:
    """The artifact's model with the bias fold taken back by its registered inverse."""
    from ditq_compiler.exporters.lowering import LayerRecord, raise_to_canonical

    layers = {key: LayerRecord.from_manifest(data) for key, data in artifact.manifest["layers"].items()}
    return raise_to_canonical(onnx.load(artifact.model_path), ["fold_bias_into_integer_gemm"], layers).model


def perturb_shared_embedders(model: torch.nn.Module) -> int:
    """Move every parameter of blocks 1.. 's timestep/class embedder by one ulp (``nextafter``), so no two
    blocks' embedders are identical any more; returns the number of tensors changed."""
    changed = 0
    with torch.no_grad():
        for block in model.transformer_blocks[1:]:
            for parameter in block.norm1.emb.parameters():
                parameter.copy_(torch.nextafter(parameter, torch.full_like(parameter, float("inf"))))
                changed += 1
    return changed


def gelu_kernels(model_path: Path) -> dict[str, int]:
    """GELU kernels in ONNX Runtime's optimized graph (main graph and every branch): ``FastGelu``/``BiasGelu``
    with the bias inside, and a plain ``Gelu`` (or ``FastGelu`` without bias) after a separate bias ``Add``."""
    from ditq_compiler.exporters import optimized_model

    counts = Counter()

    def visit(graph):
        for node in graph.node:
            if node.op_type in ("FastGelu", "BiasGelu"):
                counts["with bias" if len(node.input) > 1 and node.input[1] else "without bias"] += 1
            elif node.op_type == "Gelu":
                counts["without bias"] += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)

    visit(optimized_model(model_path).graph)
    return {"with bias": counts["with bias"], "without bias": counts["without bias"]}
