"""Trace a diffusers DiT into a torch.fx graph with ``torch.export``.

``torch.fx.symbolic_trace`` fails on diffusers' control flow; ``torch.export`` specialises it away and
gives an ATen-level graph whose ``aten.linear`` nodes carry ``nn_module_stack`` metadata, from which
we recover the names users know (``transformer_blocks.3.attn1.to_q``).

The exported module is turned into a plain ``GraphModule`` with the signature
``forward(sample, timestep, class_labels) -> out`` (the diffusers output's ``.sample``), so that every
pass, the torch reference and the ONNX exporter see the same function and the same input names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

INPUT_NAMES = ("sample", "timestep", "class_labels")
OUTPUT_NAME = "out"
MAX_BATCH = 4096


def example_inputs(model_config: dict, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    channels, size = int(model_config["in_channels"]), int(model_config["sample_size"])
    num_classes = int(model_config["num_embeds_ada_norm"])
    sample = torch.randn((batch, channels, size, size), generator=generator)
    timestep = torch.randint(0, 1000, (batch,), generator=generator, dtype=torch.int64)
    labels = torch.randint(0, num_classes + 1, (batch,), generator=generator, dtype=torch.int64)
    return sample, timestep, labels


def batch_dynamic_shapes() -> dict:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return {name: {0: batch} for name in INPUT_NAMES}


def trace_dit(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """Export ``model`` (a ``DiTTransformer2DModel``) with a dynamic batch into a clean GraphModule."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dynamic = {"hidden_states": {0: batch}, "timestep": {0: batch}, "class_labels": {0: batch}, "return_dict": None}
    with torch.no_grad():
        exported = torch.export.export(
            model.eval(), tuple(inputs), kwargs={"return_dict": False}, dynamic_shapes=dynamic
        )
    unlifted = exported.module()
    graph = unlifted.graph
    # The unlifted module checks its pytree signature and shape guards in hooks; we give the graph a
    # plain signature instead, so drop the guard node and the constant ``return_dict`` placeholder.
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders[len(INPUT_NAMES):]:
        graph.erase_node(node)
    for node, name in zip(placeholders, INPUT_NAMES):
        node.name = node.target = name
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (output.args[0][0],)  # (sample,) -> sample
    graph.set_codegen(fx.graph.CodeGen())
    gm = fx.GraphModule(unlifted, graph)
    gm.graph.lint()
    return gm


def module_name(node: fx.Node) -> str | None:
    """The module a node came from (``transformer_blocks.0.attn1.to_q``), or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]


@dataclass(frozen=True)
class LinearSite:
    """One ``aten.linear`` call: its node, the module it came from, and its operands."""

    node: fx.Node
    layer: str
    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None


def linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            x, weight = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else None
            layer = module_name(node) or str(weight.target).rsplit(".", 1)[0]
            sites.append(LinearSite(node, layer, x, weight, bias))
    return sites
