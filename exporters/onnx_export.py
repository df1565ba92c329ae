"""Lower a (quantized) DiT GraphModule to ONNX.

``torch.onnx.export`` (the dynamo exporter) re-exports the GraphModule; ditq's ``quantize`` /
``dequantize`` ops translate to ``QuantizeLinear`` / ``DequantizeLinear`` (opset 21), and the int8 /
uint8 / int32 buffers become integer initializers with their module paths as names. The exporter's own
optimizer is off: its constant folding would evaluate ``DequantizeLinear`` on constant weights and put
float weights back. onnx-graphsurgeon folds what is constant *except* Q/DQ, removes dead nodes and
sorts the graph. The IR version is capped at 10 so that ONNX Runtime >= 1.20 accepts the file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import fx

from ..quant_ops import onnx_translation_table
from ..families import Signature
from ..tracing import batch_dynamic_shapes

OPSET = 21
IR_VERSION = 10
TWO_GIB = 2**31
_KEEP_OPS = {"QuantizeLinear", "DequantizeLinear"}


def export_onnx(module, signature: Signature, inputs: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
    """Export a graph, or a timestep-grouped module: its single branch as is, several as one ``If``
    branch per group sharing what the passes left shared. The ONNX inputs and output are named as the
    family's ``signature`` says; ``inputs`` (in signature order) are example inputs for the exporter."""
    if hasattr(module, "graph_modules"):
        graphs = module.graph_modules()
        if len(graphs) == 1:
            return _export_graph(graphs[0], signature, inputs)
        from .branches import stitch_group_branches

        branches = [_export_graph(gm, signature, inputs) for gm in graphs]
        return stitch_group_branches(branches, [group.end for group in module.groups], module.tensor_sharing(),
                                     signature, first_timestep=module.groups[0].start)
    return _export_graph(module, signature, inputs)


def _export_graph(gm: fx.GraphModule, signature: Signature, inputs: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
    quiet = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        previous = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # restored below; not library-wide
        try:
            program = torch.onnx.export(
                gm, tuple(inputs), input_names=list(signature.names), output_names=[signature.output],
                dynamic_shapes=batch_dynamic_shapes(signature), opset_version=OPSET, optimize=False,
                custom_translation_table=onnx_translation_table(), verbose=False,
            )
        finally:
            logging.getLogger("torch.onnx").setLevel(previous)
    return clean_graph(program.model_proto)


def clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    from ditq_compiler.runtime import quiet_onnxruntime_logging

    graph = gs.import_onnx(model)
    quiet_onnxruntime_logging()  # fold_constants opens its own ONNX Runtime session, with default options
    graph.fold_constants(should_exclude_node=lambda node: node.op in _KEEP_OPS, error_ok=True)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    cleaned = gs.export_onnx(graph)
    cleaned.ir_version = min(cleaned.ir_version, IR_VERSION)
    del cleaned.opset_import[:]
    cleaned.opset_import.extend(model.opset_import)
    cleaned.producer_name = "ditq"
    return cleaned


def save_onnx(model: onnx.ModelProto, path: str | Path) -> list[str]:
    """Save ``model``; over 2 GB the weights go to ``<name>.data`` beside it. Returns the files written."""
    path = Path(path)
    size = model.ByteSize() if _fits_protobuf(model) else TWO_GIB
    if size < TWO_GIB:
        onnx.save_model(model, str(path))
        return [path.name]
    data_name = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return [path.name, data_name]


def _fits_protobuf(model: onnx.ModelProto) -> bool:
    try:
        return model.ByteSize() < TWO_GIB
    except Exception:  # protobuf refuses to size messages over 2 GB
        return False
