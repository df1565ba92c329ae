"""Cut a branch's fx graph into segments that run on their own: the part before the first DiT block, each
block, and the rest.

A block is the run of nodes, in graph order, from the first node of module ``transformer_blocks.<i>`` up to
(not including) the first node of block ``i + 1``; the last block ends at its last node. So a module called
again later (diffusers' DiT calls block 0's embedder a second time for the final layer) belongs to the tail,
not to block 0. A segment reads *external* values (computed before it: the hidden state, the deduplicated
timestep embedding, the graph's inputs) and produces the values read after it.

:func:`extract` builds a standalone ``GraphModule`` of a segment: one placeholder per external tensor value,
the segment's nodes copied with their metadata (quantization specs and parameters included), and its
outputs. Parameters are the branch's own tensor objects (nothing is copied). The batch size, which the graph
carries as a symbol (``sym_size``), is read again from the segment's first batched input, so a segment runs
on any number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from ...qspec import SPEC_KEY
from ...tracing import module_name



class SegmentUnsupported(Exception):
    """The segment reads something it cannot be cut from (an integer that is not the batch size)."""


@dataclass
class Segment:
    name: str  # "prefix", "transformer_blocks.3", "tail"
    is_block: bool
    nodes: list[str]  # call_function nodes, in graph order
    inputs: list[str] = field(default_factory=list)  # external tensor values
    outputs: list[str] = field(default_factory=list)  # values read after the segment
    layers: list[str] = field(default_factory=list)  # quantized layer keys inside


def _block_of(node: fx.Node, family) -> str | None:
    return family.block_of(module_name(node) or "")


def batch_symbol(gm: fx.GraphModule):
    sample = next(node for node in gm.graph.nodes if node.op == "placeholder")
    return sample.meta["val"].shape[0]


def is_batched(node: fx.Node, batch) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and str(value.shape[0]) == str(batch)


def is_batch_size(node: fx.Node, batch) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.SymInt) and str(value) == str(batch)


def partition(gm: fx.GraphModule, family) -> list[Segment]:
    """prefix, block 0, ..., block N-1, tail: every call_function node in exactly one segment. The blocks are
    ``family``'s (``ModelFamily.block_of``), in the order the graph first enters them."""
    calls = [node for node in gm.graph.nodes if node.op == "call_function"]
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for position, node in enumerate(calls):
        block = _block_of(node, family)
        if block is not None:
            first.setdefault(block, position)
    blocks = sorted(first, key=first.get)
    if not blocks:
        return [_describe(gm, Segment("all", False, [n.name for n in calls]), calls)]
    for index, block in enumerate(blocks):
        end = first[blocks[index + 1]] if index + 1 < len(blocks) else len(calls)
        inside = [p for p in range(first[block], end) if _block_of(calls[p], family) == block]
        last[block] = inside[-1]
    spans = [("prefix", False, 0, first[blocks[0]])]
    for index, block in enumerate(blocks):
        end = first[blocks[index + 1]] if index + 1 < len(blocks) else last[block] + 1
        spans.append((block, True, first[block], end))
    spans.append(("tail", False, last[blocks[-1]] + 1, len(calls)))
    return [_describe(gm, Segment(name, is_block, [n.name for n in calls[start:end]]), calls)
            for name, is_block, start, end in spans]


def _describe(gm: fx.GraphModule, segment: Segment, calls) -> Segment:
    batch = batch_symbol(gm)
    by_name = {node.name: node for node in gm.graph.nodes}
    members = set(segment.nodes)
    inputs: dict[str, None] = {}
    outputs: dict[str, None] = {}
    for name in segment.nodes:
        node = by_name[name]
        for arg in node.all_input_nodes:
            if arg.name in members or arg.op == "get_attr" or is_batch_size(arg, batch):
                continue
            inputs.setdefault(arg.name)
        if any(user.name not in members for user in node.users) and not is_batch_size(node, batch):
            outputs.setdefault(name)
        spec = node.meta.get(SPEC_KEY)
        if spec is not None:
            segment.layers.append(spec.layer)
    segment.inputs, segment.outputs = list(inputs), list(outputs)
    return segment


def extract(gm: fx.GraphModule, segment: Segment) -> fx.GraphModule:
    """A standalone GraphModule computing ``segment``'s outputs (a tuple) from its inputs."""
    batch = batch_symbol(gm)
    by_name = {node.name: node for node in gm.graph.nodes}
    graph = fx.Graph()
    env: dict[str, object] = {}
    first_batched = None
    for name in segment.inputs:
        placeholder = graph.placeholder(name)
        placeholder.meta.update(by_name[name].meta)
        env[name] = placeholder
        if first_batched is None and is_batched(by_name[name], batch):
            first_batched = placeholder

    def lookup(node: fx.Node):
        if node.name in env:
            return env[node.name]
        if node.op == "get_attr":
            env[node.name] = graph.get_attr(node.target)
            return env[node.name]
        if is_batch_size(node, batch):
            if first_batched is None:
                raise SegmentUnsupported(f"{segment.name} reads the batch size but no batched tensor")
            env[node.name] = graph.call_function(torch.ops.aten.sym_size.int, (first_batched, 0))
            return env[node.name]
        raise SegmentUnsupported(f"{segment.name} reads {node.name}, which it cannot take as an input")

    for name in segment.nodes:
        env[name] = graph.node_copy(by_name[name], lookup)
    graph.output(tuple(env[name] for name in segment.outputs))
    module = fx.GraphModule(gm, graph)
    module.graph.lint()
    return module
