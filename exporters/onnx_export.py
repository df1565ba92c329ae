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

        branches = _export_branches(graphs, signature, inputs)
        return stitch_group_branches(branches, [group.end for group in module.groups], module.tensor_sharing(),
                                     signature, first_timestep=module.groups[0].start)
    return _export_graph(module, signature, inputs)


def _export_branches(graphs: list[fx.GraphModule], signature: Signature, inputs: tuple[torch.Tensor, ...]
                     ) -> list[onnx.ModelProto]:
    """Every group's graph as ONNX. ``torch.onnx.export`` takes seconds per graph and the branches of a grouped
    module are usually one graph over other tensors (each group's activation scales and folded weights), so
    the first branch is exported once and each other branch whose code is the same reuses that export with its
    own tensors put in (:func:`_with_branch_tensors`); a branch that differs is exported on its own."""
    raw = _export_raw(graphs[0], signature, inputs)
    branches = [clean_graph(raw)]
    for gm in graphs[1:]:
        reused = _with_branch_tensors(raw, graphs[0], gm)
        branches.append(clean_graph(reused) if reused is not None else _export_graph(gm, signature, inputs))
    return branches


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _with_branch_tensors(raw: onnx.ModelProto, exported: fx.GraphModule, other: fx.GraphModule
                         ) -> onnx.ModelProto | None:
    """``raw`` (the export of ``exported``, before clean-up) with ``other``'s tensors in place of ``exported``'s, or
    None where that would not be ``other``'s own export. Checked, not assumed: the two graphs' code is the same;
    every ``get_attr`` tensor that differs between them is an initializer named after its target whose bytes are
    ``exported``'s tensor's (so the name maps to that tensor), with ``other``'s of the same dtype and shape; every
    other initializer is a constant of the code, the same for both."""
    from ..grouped import get_tensor

    if exported.code != other.code:
        return None
    initializers = {init.name: init for init in raw.graph.initializer}
    replaced: dict[str, bytes] = {}
    for target in dict.fromkeys(n.target for n in other.graph.nodes if n.op == "get_attr"):
        mine, theirs = get_tensor(exported, target), get_tensor(other, target)
        if theirs is mine:
            continue
        if not (isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor)
                and mine.dtype == theirs.dtype and mine.shape == theirs.shape):
            return None
        init = initializers.get(target)
        if init is None or init.data_location == onnx.TensorProto.EXTERNAL or init.raw_data != _tensor_bytes(mine):
            if torch.equal(mine, theirs):
                continue  # equal values: whatever the exporter made of it is the same for both
            return None
        replaced[target] = _tensor_bytes(theirs)
    model = onnx.ModelProto()
    model.CopyFrom(raw)
    for init in model.graph.initializer:
        if init.name in replaced:
            init.raw_data = replaced[init.name]
    return model


def _export_graph(gm: fx.GraphModule, signature: Signature, inputs: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
    return clean_graph(_export_raw(gm, signature, inputs))


def _export_raw(gm: fx.GraphModule, signature: Signature, inputs: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
    """``torch.onnx.export`` of ``gm``, before :func:`clean_graph`."""
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
    return program.model_proto


def clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.logger import G_LOGGER

    from ditq_compiler.runtime import quiet_onnxruntime_logging

    G_LOGGER.severity = G_LOGGER.ERROR  # its warnings ("colored module is not installed", FP8 has no NumPy type)
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
