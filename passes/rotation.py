"""Hadamard rotation (HQ-DiT; QuaRot-style): spread outlier channels over many before quantizing.

``H`` is block diagonal, ``I_{C/b} (x) H_b`` with ``H_b`` the normalized Hadamard matrix of size ``b`` (a power
of two dividing the channel count; ``H_b = H_b^T``, ``H_b H_b = I``). For a quantized layer
``y = X W^T + b``::

    y = (X H) (W H)^T + b               so the readers' weights become  W <- W H

and the layer quantizes ``X H``, whose channels are sums of many of ``X``'s, so one outlier channel no longer
sets the scale alone. Where ``X H`` can be produced for free the rotation is folded:

* attention output (``softmax(QK^T) V`` with heads merged): with blocks inside a head (``b`` divides the head
  size), ``P (V H) = (P V) H`` per head, and ``V H = h (H W_v)^T + H b_v``: ``W_v <- H W_v``, ``b_v <- H b_v``.

Elsewhere (the adaLN-modulated q/k/v and fc1 inputs, fc2 after GELU, the adaLN input after SiLU) nothing
linear precedes the tensor, so the rotation runs online: ``X -> unflatten(X, [C/b, b]) @ H_b -> flatten``, a
float MatMul of ``b`` MACs per element (reported by the benchmark). Smoothing recipes compose: an input
rotated online has no exact smoothing fold (the rule declines, "follows an online Hadamard rotation";
``--unfoldable mul`` smooths it explicitly), while the attention output folds both into V.

The pass runs after annotation and before calibration, so the statistics describe the rotated tensors.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..pass_manager import GraphPass, PassResult
from ..qspec import ROTATION_KEY, SPEC_KEY
from .calibrate import input_producers
from .rewrite import is_call
from .smoothing import AttentionValueFold, SmoothingSite, Smoothing, _sharing_reason

MAX_BLOCK = 256
_aten = torch.ops.aten
CONTAINER = "ditq_rotation"


def hadamard(size: int) -> torch.Tensor:
    """The orthonormal Hadamard matrix of ``size`` (a power of two), float64."""
    from scipy.linalg import hadamard as sylvester

    return torch.from_numpy(sylvester(size).astype("float64")) / size ** 0.5


def block_size(channels: int, limit: int = MAX_BLOCK) -> int:
    """The largest power of two that divides ``channels``, at most ``limit``."""
    size = 1
    while size * 2 <= limit and channels % (size * 2) == 0:
        size *= 2
    return size


def block_diagonal(channels: int, block: int) -> torch.Tensor:
    return torch.block_diag(*[hadamard(block)] * (channels // block))


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x @ (I (x) H_b)`` on the last dimension, as the online rotation computes it."""
    channels = x.shape[-1]
    return (x.unflatten(-1, [channels // block, block]) @ hadamard(block).to(x.dtype)).flatten(-2)


class RotateHadamard(GraphPass):
    name = "rotate_hadamard"
    preserves_semantics = True

    def run(self, gm, ctx):
        producers = input_producers(gm)
        readers: dict[str, list] = {}
        for node in gm.graph.nodes:
            spec = node.meta.get(SPEC_KEY)
            if spec is not None:
                readers.setdefault(spec.input_key, []).append(node)
        counts, details = Counter(), []
        for key, nodes in readers.items():
            channels = nodes[0].args[0].meta["val"].shape[-1]
            block = block_size(channels)
            if block < 2:
                details.append(f"{key}: not rotated ({channels} channels have no power-of-two block)")
                counts["not rotated"] += 1
                continue
            reason = next((r for n in nodes for r in [_sharing_reason(gm, n, n.args[1].target)] if r), None)
            if reason:
                details.append(f"{key}: not rotated, {reason}")
                counts["not rotated"] += 1
                continue
            folded_block = self._fold_into_value(gm, key, producers[key], nodes)
            folded = folded_block is not None
            if folded:
                block = folded_block
            else:
                self._rotate_online(gm, key, producers[key], nodes, block)
            for node in nodes:  # what the layer's input went through, for error analysis
                node.meta[ROTATION_KEY] = block
            rotation = block_diagonal(channels, block)
            for node in nodes:  # W <- W H
                weight = gm.get_parameter(node.args[1].target) if node.args[1].target in dict(gm.named_parameters()) \
                    else gm.get_buffer(node.args[1].target)
                with torch.no_grad():
                    weight.copy_((weight.detach().to(torch.float64) @ rotation).to(weight.dtype))
            where = "folded into V" if folded else "online"
            counts[where] += 1
            details.append(f"{key}: rotated with {channels // block} Hadamard blocks of {block}, {where}")
        gm.graph.lint()
        gm.recompile()
        parts = [f"{n} {what}" for what, n in counts.items()]
        return PassResult(gm, bool(counts["online"] or counts["folded into V"]),
                          f"Hadamard-rotated quantized inputs: {', '.join(parts)}", details)

    @staticmethod
    def _fold_into_value(gm, key, producer, nodes) -> int | None:
        """Fold the rotation into V when the tensor is an attention output; returns the block size used (the
        largest power of two dividing the head size), or None."""
        site = SmoothingSite(gm, None, key, producer, nodes, Smoothing(torch.ones(1)), None)
        match = AttentionValueFold().match(site)
        if match is None or AttentionValueFold().check(site, match) is not None:
            return None
        head_dim = match.chain[-1].meta["val"].shape[-1]
        block = block_size(head_dim)
        if block < 2:
            return None
        value = match.value_linear
        channels = value.meta["val"].shape[-1]
        rotation = block_diagonal(channels, block)
        with torch.no_grad():  # V H = h (H W_v)^T + H b_v   (H symmetric)
            weight = gm.get_parameter(value.args[1].target)
            weight.copy_((rotation @ weight.detach().to(torch.float64)).to(weight.dtype))
            if len(value.args) > 2 and value.args[2] is not None:
                bias = gm.get_parameter(value.args[2].target)
                bias.copy_((rotation @ bias.detach().to(torch.float64)).to(bias.dtype))
        return block

    @staticmethod
    def _rotate_online(gm, key, producer, nodes, block) -> None:
        if not hasattr(gm, CONTAINER):
            gm.add_submodule(CONTAINER, torch.nn.Module())
        name = key.replace(".", "_").replace(":", "_").replace("#", "_")
        gm.get_submodule(CONTAINER).register_buffer(name, hadamard(block).to(torch.float32))
        graph = gm.graph
        first = next(node for node in graph.nodes if node in nodes)
        channels = producer.meta["val"].shape[-1]
        with graph.inserting_before(first):
            matrix = graph.get_attr(f"{CONTAINER}.{name}")
            blocks = graph.call_function(_aten.unflatten.int, (producer, -1, [channels // block, block]))
            rotated = graph.call_function(_aten.matmul.default, (blocks, matrix))
            merged = graph.call_function(_aten.flatten.using_ints, (rotated, -2, -1))
        merged.meta["val"] = producer.meta.get("val")
        rotated.meta["ditq.rotation"] = {"input_key": key, "block": block}
        for node in nodes:
            node.replace_input_with(producer, merged)


def is_online_rotation(node) -> bool:
    return is_call(node, _aten.flatten.using_ints) and "ditq.rotation" in getattr(node.args[0], "meta", {})
