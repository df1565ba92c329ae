"""Each change of issue 11 measured on its own: the artifact with one change taken back, timed against the full
one in the same interleaved rounds.

Every variant is built the way the change can be taken back without a switch of its own in the compiler:

* integer attention: a compile without ``--quantize-attention`` (ditq's default; the benchmark's full artifact
  opts in);
* ONNX Runtime's fused attention (the default's float attention as ``com.microsoft.MultiHeadAttention``):
  :func:`unfuse_attention`, the fusion's own inverse, on the default artifact, giving back the MatMul, Softmax,
  MatMul attention with its head reshapes and transposes;
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

import onnx
import torch


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
    return _take_back(artifact, "fold_bias_into_integer_gemm")


def unfuse_attention(artifact) -> onnx.ModelProto:
    """The artifact's model with the attention fusion (``MultiHeadAttention``) taken back by its registered
    inverse."""
    return _take_back(artifact, "fuse_multi_head_attention")


def _take_back(artifact, lowering_pass: str) -> onnx.ModelProto:
    from ditq_compiler.exporters.lowering import LayerRecord, raise_to_canonical

    layers = {key: LayerRecord.from_manifest(data) for key, data in artifact.manifest["layers"].items()}
    return raise_to_canonical(onnx.load(artifact.model_path), [lowering_pass], layers).model


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
