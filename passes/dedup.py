"""Compute and store identical subgraphs once, right after tracing.

diffusers' DiT gives every block its own timestep/class embedder, and a converted original DiT checkpoint
(``families.dit_original.convert_original_dit_state_dict``) fills all of them with the one embedder of the original model:
in DiT-XL/2, 28 copies of 2.8 M parameters (11 MB each, ~300 MB), computed 28 times per call from the same
``timestep`` and ``class_labels``. The pass finds such subgraphs by value and keeps one:

1. **Tensors equal by value** (same dtype, shape and every element, checked with ``torch.equal`` after a cheap
   fingerprint) are one tensor: the ``get_attr`` of a duplicate reads the first one's name.
2. **Value numbering** (a CSE over the graph in topological order): a node whose target and arguments (after
   numbering) equal an earlier node's is that node. Only pure nodes merge (ATen ops whose schema mutates
   nothing and that draw no random numbers, and ``getitem``); placeholders and the output never do.
3. **Two calls of one module never merge**: a node is never numbered as an earlier node of the *same* module.
   diffusers' DiT calls block 0's embedder again for the final layer; that call keeps its nodes and its layer
   key ``<module>#1`` (see ``qspec.py``), so a user who quantizes the embedder still gets one quantizer per
   call. Blocks 1..N-1's embedders are other modules and merge into block 0's first call.
4. **A tensor merge is kept only where it merges computation**: if a reader of a duplicate tensor does not
   become an earlier node (equal zero biases of layers whose weights differ, say), that tensor keeps its own
   name, and numbering runs again until nothing changes. So later passes that rewrite one layer's tensors
   (smoothing folds) never find a tensor they used to own shared with an unrelated layer.

The merged nodes are removed and the duplicate tensors deleted from the graph's modules (the traced graph owns
its tensors, see ``tracing._own_tensors``: the float model error analysis runs is untouched). The function is
unchanged: every merged node computed the value of the node it became (checked numerically by the pass
manager). A consequence worth knowing: layers that now read one tensor (the adaLN linears of every block read
one ``SiLU(embedding)``) share one input quantizer, as q, k and v do; their calibration statistics were equal
anyway.
"""

from __future__ import annotations

import operator
import re
from collections import defaultdict

import torch
from torch import fx

from ..grouped import get_tensor
from ..pass_manager import GraphPass, PassResult
from ..tracing import module_name

_PURE_BUILTINS = (operator.getitem,)


class _Unhashable(Exception):
    pass


def is_pure(node: fx.Node) -> bool:
    """A call whose result depends only on its arguments: no mutation, no random numbers."""
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags
    return target in _PURE_BUILTINS


def equal_tensor_classes(gm: fx.GraphModule) -> dict[str, str]:
    """``get_attr`` target -> the first target (in graph order) holding a tensor equal by value."""
    buckets: dict[tuple, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    classes: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in classes:
            continue
        tensor = get_tensor(gm, node.target)
        if not isinstance(tensor, torch.Tensor):
            classes[node.target] = node.target
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64]
        key = (tensor.dtype, tuple(tensor.shape), tuple(sample.tolist()))
        for target, other in buckets[key]:
            if other is tensor or torch.equal(other, tensor):
                classes[node.target] = target
                break
        else:
            buckets[key].append((node.target, tensor))
            classes[node.target] = node.target
    return classes


def _argument_key(value, canonical: dict[fx.Node, fx.Node]):
    if isinstance(value, fx.Node):
        return ("node", id(canonical[value]))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_argument_key(v, canonical) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _argument_key(v, canonical)) for k, v in sorted(value.items())))
    if isinstance(value, slice):
        return ("slice", *(_argument_key(v, canonical) for v in (value.start, value.stop, value.step)))
    if isinstance(value, float) and value != value:
        raise _Unhashable  # NaN equals nothing
    try:
        hash(value)
    except TypeError:
        raise _Unhashable from None
    return (type(value).__name__, value)  # the type keeps 1, 1.0 and True apart


def number_values(gm: fx.GraphModule, classes: dict[str, str]) -> dict[fx.Node, fx.Node]:
    """node -> the earliest node computing the same value (itself when none), under ``classes``."""
    canonical: dict[fx.Node, fx.Node] = {}
    first: dict[tuple, fx.Node] = {}
    for node in gm.graph.nodes:
        canonical[node] = node
        if node.op == "get_attr":
            key = ("get_attr", classes.get(node.target, node.target))
        elif is_pure(node):
            try:
                key = ("call", node.target, _argument_key(node.args, canonical),
                       _argument_key(node.kwargs, canonical))
            except _Unhashable:
                continue
        else:
            continue
        earlier = first.setdefault(key, node)
        if earlier is node:
            continue
        module = module_name(node)
        if module is not None and module == module_name(earlier):
            continue  # another call of the same module stays a call of its own (its layer key)
        canonical[node] = earlier
    return canonical


def plan_merges(gm: fx.GraphModule) -> tuple[dict[fx.Node, fx.Node], dict[str, str]]:
    """The merges to make and the tensor classes they rely on (step 4 of the module docstring)."""
    classes = equal_tensor_classes(gm)
    readers: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers[node.target] += list(node.users)
    while True:
        canonical = number_values(gm, classes)
        idle = {target for target, first in classes.items()
                if target != first and any(canonical[user] is user for user in readers[target])}
        if not idle:
            return canonical, classes
        for target in idle:
            classes[target] = target


class DeduplicateSubgraphs(GraphPass):
    name = "dedup_subgraphs"
    preserves_semantics = True  # every merged node computed its survivor's value (checked by the pass manager)

    def run(self, gm, ctx):
        canonical, classes = plan_merges(gm)
        merged = [node for node in gm.graph.nodes if canonical[node] is not node]
        components = _components(merged, canonical)
        phrases, component_details = _describe(components, canonical, module_node_counts(gm))
        for node in merged:
            node.replace_all_uses_with(canonical[node])
        for node in reversed(merged):
            gm.graph.erase_node(node)
        freed, tensors = _delete_unread_duplicates(gm, classes)
        if not merged:
            return PassResult(gm, False, "no identical subgraphs")
        summary = (f"merged {len(components)} identical subgraph{'s' if len(components) != 1 else ''} "
                   f"({'; '.join(phrases)}), {freed / 1e6:.1f} MB stored once")
        details = [f"{len(merged)} nodes merged, {tensors} duplicate tensors deleted", *component_details]
        return PassResult(gm, True, summary, details)


def _delete_unread_duplicates(gm: fx.GraphModule, classes: dict[str, str]) -> tuple[int, int]:
    """Delete every duplicate tensor no node reads any more; returns (bytes freed, tensors deleted)."""
    still_read = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    kept = {id(get_tensor(gm, target)) for target in still_read}
    freed, deleted, seen = 0, 0, set()
    for target, first in classes.items():
        if target == first or target in still_read:
            continue
        tensor = get_tensor(gm, target)
        owner, _, name = target.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, name)
        deleted += 1
        if id(tensor) not in kept and id(tensor) not in seen:
            seen.add(id(tensor))
            freed += tensor.numel() * tensor.element_size()
    return freed, deleted


def _components(merged: list[fx.Node], canonical: dict[fx.Node, fx.Node]) -> list[list[fx.Node]]:
    """The merged nodes in connected pieces (a node and the merged nodes it reads or that read it); a merged
    tensor belongs to the piece of its readers, which merged too (step 4)."""
    parent = {node: node for node in merged}

    def root(node):
        while parent[node] is not node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for node in merged:
        for source in node.all_input_nodes:
            if source in parent:
                parent[root(source)] = root(node)
    pieces: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in merged:
        pieces[root(node)].append(node)
    return [piece for piece in pieces.values() if any(n.op != "get_attr" for n in piece)]


def _prefixes(module: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b", "a.b.c"]``, outermost first."""
    if not module:
        return []
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def module_node_counts(gm: fx.GraphModule) -> dict[str, int]:
    """module path -> the number of graph nodes under it (its submodules' included)."""
    counts: dict[str, int] = defaultdict(int)
    for node in gm.graph.nodes:
        for prefix in _prefixes(module_name(node) or ""):
            counts[prefix] += 1
    return counts


def _labels(component: list[fx.Node], canonical: dict[fx.Node, fx.Node],
            totals: dict[str, int]) -> list[tuple[str, str]]:
    """(merged module, the module it became) for the outermost modules whose every node merged; a module only
    some of whose nodes merged is labelled ``(part)``."""
    counts: dict[str, int] = defaultdict(int)
    for node in component:
        for prefix in _prefixes(module_name(node) or ""):
            counts[prefix] += 1
    labels: dict[str, str] = {}
    for node in component:
        module = module_name(node)
        if not module:
            continue
        whole = [prefix for prefix in _prefixes(module) if counts[prefix] == totals[prefix]]
        label = whole[0] if whole else module
        kept = module_name(canonical[node]) or ""
        suffix = module[len(label):]
        if suffix and kept.endswith(suffix):
            kept = kept[: -len(suffix)]
        part = "" if whole else " (part)"
        labels.setdefault(label + part, kept + part)
    # a module of which only glue merged (a cast around a whole submodule that merged) is named by that submodule
    wholes = [label for label in labels if not label.endswith(" (part)")]
    return sorted((label, kept) for label, kept in labels.items()
                  if not (label.endswith(" (part)") and any(w.startswith(label[:-7] + ".") for w in wholes)))


def _side(labels: list[str]) -> str:
    """Module paths as one pattern: ``a.b.{emb, silu}`` when they share a parent."""
    if not labels:
        return "the model's own ops"
    if len(labels) == 1:
        return labels[0]
    parent = labels[0].rsplit(".", 1)[0]
    if all(label.rsplit(".", 1)[0] == parent for label in labels):
        return f"{parent}.{{{', '.join(label.rsplit('.', 1)[1] for label in labels)}}}"
    return " + ".join(labels)


def _describe(components: list[list[fx.Node]], canonical: dict[fx.Node, fx.Node],
              totals: dict[str, int]) -> tuple[list[str], list[str]]:
    """One phrase per kind of merge (``transformer_blocks.{1..27}.norm1.{emb, silu} = transformer_blocks.0...``)
    and one detail line per component."""
    grouped: dict[tuple[str, str], list[int]] = defaultdict(list)
    phrases, details = [], []
    for component in components:
        pairs = _labels(component, canonical, totals)
        removed, kept = _side([a for a, _ in pairs]), _side([b for _, b in pairs])
        details.append(f"{removed} -> {kept}: {len(component)} nodes")
        found = re.search(r"(?<=\.)\d+(?=\.|$)", removed)
        if found is None:
            phrases.append(f"{removed} = {kept}")
            continue
        grouped[(removed[:found.start()] + "{}" + removed[found.end():], kept)].append(int(found.group()))
    phrases = [template.replace("{}", _ranges(sorted(indices)), 1) + f" = {kept}"
               for (template, kept), indices in grouped.items()] + phrases
    return phrases, details


def _ranges(indices: list[int]) -> str:
    if len(indices) == 1:
        return str(indices[0])
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"{{{indices[0]}..{indices[-1]}}}"
    return "{" + ", ".join(map(str, indices)) + "}"
