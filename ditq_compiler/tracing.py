"""Trace a diffusers transformer into a torch.fx graph with ``torch.export``.

``torch.fx.symbolic_trace`` fails on diffusers' control flow; ``torch.export`` specialises it away and
gives an ATen-level graph whose ``aten.linear`` nodes carry ``nn_module_stack`` metadata, from which
we recover the names users know (``transformer_blocks.3.attn1.to_q``).

The exported module is turned into a plain ``GraphModule`` whose inputs are the model family's signature
(``families/``) and whose output is the diffusers output's ``.sample``, so that every pass, the torch
reference and the ONNX exporter see the same function and the same input names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .families import ModelFamily, Signature

MAX_BATCH = 4096


def batch_dynamic_shapes(signature: Signature, *, by: str = "name") -> dict:
    """``torch.export`` dynamic shapes for a signature: dim 0 of every input is the batch. ``by="name"`` keys them
    by input name (the GraphModule's placeholders), ``by="kwarg"`` by the diffusers forward's keywords."""
    from .families.base import nest

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    if by == "kwarg":  # nested as the keywords are (a dict keyword's entries)
        return nest({spec.kwarg_path: {0: batch} for spec in signature.inputs})
    return {spec.name: {0: batch} for spec in signature.inputs}


def trace_model(model: torch.nn.Module, family: ModelFamily, model_config: dict, inputs: tuple[torch.Tensor, ...], *,
                own_tensors: bool = True) -> fx.GraphModule:
    """Export ``model`` (a diffusers transformer of ``family``) with a dynamic batch into a clean GraphModule
    whose placeholders are the family signature's inputs, in its order, and whose output is the model output's
    ``.sample``; then the family's export clean-ups run on it.

    ``own_tensors=False`` leaves the graph reading the model's own tensors (no copy): only for a caller that
    drops the model right after tracing, so passes that rewrite tensors can corrupt nothing (a compile: the
    copy would double the host memory of the weights, 3 GB more for DiT-XL/2)."""
    signature = family.signature(model_config)
    kwargs = {**signature.kwargs(inputs), "return_dict": False}
    dynamic = {**batch_dynamic_shapes(signature, by="kwarg"), "return_dict": None}
    with torch.no_grad():
        exported = torch.export.export(model.eval(), (), kwargs=kwargs, dynamic_shapes=dynamic)
    unlifted = exported.module()
    graph = unlifted.graph
    # The unlifted module checks its pytree signature and shape guards in hooks; we give the graph a
    # plain signature instead, so drop the guard node and the constant ``return_dict`` placeholder.
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    placeholders = {node.target: node for node in graph.nodes if node.op == "placeholder"}
    exported_names = {spec.exported_name for spec in signature.inputs}
    for target, node in placeholders.items():
        if target not in exported_names:
            graph.erase_node(node)
    ordered = [placeholders[spec.exported_name] for spec in signature.inputs]
    anchor = next(node for node in graph.nodes if node.op != "placeholder")
    for node, spec in zip(ordered, signature.inputs):  # signature order, whatever the forward's order is
        anchor.prepend(node)
        node.name = node.target = spec.name
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (output.args[0][0],)  # (sample,) -> sample
    graph.set_codegen(fx.graph.CodeGen())
    gm = fx.GraphModule(unlifted, graph)
    for cleanup in family.export_cleanups():
        cleanup(gm)
    gm.graph.lint()
    gm.recompile()
    if own_tensors:
        _own_tensors(gm)
    else:  # as the copies would be: constants, so arithmetic on them outside no_grad builds no autograd graph
        for parameter in gm.parameters():
            parameter.requires_grad_(False)
    return gm


def _own_tensors(gm: fx.GraphModule) -> None:
    """Give the graph its own copy of every parameter and buffer.

    ``torch.export`` aliases the traced model's tensors; folds that rewrite weights would otherwise
    corrupt the float model that error analysis uses as its reference. Tensors that the model shares
    (one object under two names) stay shared in the copy.
    """
    copies: dict[int, torch.Tensor] = {}
    for module in gm.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is None:
                    continue
                if id(tensor) not in copies:
                    data = tensor.detach().clone()
                    copies[id(tensor)] = torch.nn.Parameter(data, requires_grad=False) \
                        if isinstance(tensor, torch.nn.Parameter) else data
                store[name] = copies[id(tensor)]


def module_name(node: fx.Node) -> str | None:
    """The module a node came from (``transformer_blocks.0.attn1.to_q``), or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]


@dataclass(frozen=True)
class LinearSite:
    """One ``aten.linear`` call: its node, its layer key, the module it came from, and its operands.

    The layer key is the module name for a module's first call and ``<module>#k`` for its k-th extra
    call (diffusers' DiT runs block 0's embedder twice: for block 0 and for the final layer)."""

    node: fx.Node
    layer: str
    module: str
    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None


def linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    sites, calls = [], {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            x, weight = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else None
            module = module_name(node) or str(weight.target).rsplit(".", 1)[0]
            index = calls[module] = calls.get(module, -1) + 1
            layer = module if index == 0 else f"{module}#{index}"
            sites.append(LinearSite(node, layer, module, x, weight, bias))
    return sites
