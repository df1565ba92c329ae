"""After training: the learned integers and scales become ordinary weight tensors and parameters.

Q/DQ insertion stores ``quantize_weight(W, s)`` for every layer. A learned layer's weight is therefore replaced
by ``W' = q * s`` (``q`` the learned grid values, ``s`` the learned or original per-channel scale): rounding
``W' / s`` gives back exactly ``q`` (checked here, for every layer), so insertion, export and the fused kernels
see the learned integers with no change to any of them. Learned activation scales and zero points become the
branch's :class:`ActivationParams` (one object per tensor, shared by its readers). A layer with an int32 bias
gets its weight scale raised where a changed input scale would overflow the bias, as ChooseQuantParams does.

Sharing follows the decisions of the registry: one learned weight that several timestep groups share is one new
tensor object assigned to every branch (stored once in the artifact); a per-group weight is its group's own.
Nothing here runs while training: :func:`learned_weight` copies a quantizer's final state out, and
:func:`materialize` writes the graph once every block is done.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ...grids import GRIDS
from ...grouped import get_tensor, set_tensor
from ...qspec import PARAMS_KEY, SPEC_KEY
from ...quantizers import quantize_weight, weight_dequantize_scale


@dataclass
class LearnedWeight:
    sites: list  # (branch index, weight target, linear node)
    stored: torch.Tensor  # int8 [out, in], as quantize_weight returns it
    scale: torch.Tensor | None  # the learned per-channel scale (float32); None: the layers keep their own
    spec: object
    grid: str | None
    note: str

    def dequantized(self, original_scale: torch.Tensor) -> torch.Tensor:
        scale = self.scale if self.scale is not None else original_scale
        return self.stored.to(torch.float32) * weight_dequantize_scale(scale, self.spec, self.grid)[:, None]


def learned_weight(quantizer, sites: list, note: str) -> LearnedWeight | None:
    """The final state of a weight quantizer, or None when it is nearest rounding at the original scale."""
    if not quantizer.trainable or not quantizer.learned:
        return None
    integers = quantizer.integers()
    scale_changed = quantizer.log_scale is not None and bool(quantizer.log_scale.detach().ne(0).any())
    if torch.equal(integers, quantizer.nearest) and not scale_changed:
        return None
    multiplier = GRIDS[quantizer.grid].multiplier if quantizer.spec.dtype == "fp4" else 1
    stored = torch.round(integers * multiplier).to(torch.int8)
    scale = quantizer.scale.detach().clone() if scale_changed else None
    return LearnedWeight(list(sites), stored, scale, quantizer.spec, quantizer.grid, note)


def materialize(branches, learned_weights: list[LearnedWeight], learned_activations: dict) -> dict[str, int]:
    """Write what was learned into the branches' tensors and parameters; returns counts for the summary."""
    counts = {"weights": 0, "activations": len(learned_activations), "bias-fitted rows": 0}
    new_scale: dict[int, torch.Tensor] = {}  # id(node) -> the learned scale of its weight
    note_of: dict[int, str] = {}
    for learned in learned_weights:
        branch, target, node = learned.sites[0]
        original_scale = node.meta[PARAMS_KEY].weight_scale
        value = learned.dequantized(original_scale)
        check_scale = learned.scale if learned.scale is not None else original_scale
        if not torch.equal(quantize_weight(value, check_scale, learned.spec, learned.grid), learned.stored):
            raise RuntimeError(f"{node.meta[SPEC_KEY].layer}: the materialized weight does not round to the learned "
                               "integers")
        holder = get_tensor(branches[branch], target)
        tensor = torch.nn.Parameter(value, requires_grad=False) if isinstance(holder, torch.nn.Parameter) else value
        for site_branch, site_target, site_node in learned.sites:
            set_tensor(branches[site_branch], site_target, tensor)  # one object for every group that shares it
            if learned.scale is not None:
                new_scale[id(site_node)] = learned.scale
            note_of[id(site_node)] = learned.note
        counts["weights"] += 1
    for index, gm in enumerate(branches):
        for node in gm.graph.nodes:
            spec, params = node.meta.get(SPEC_KEY), node.meta.get(PARAMS_KEY)
            if spec is None or params is None:
                continue
            activation = learned_activations.get((index, spec.input_key), params.activation)
            scale = new_scale.get(id(node), params.weight_scale)
            if activation is params.activation and scale is params.weight_scale:
                continue
            notes = list(params.notes)
            if spec.bias == "int32" and activation is not None:
                from ..params import ChooseQuantParams

                scale, raised = ChooseQuantParams._fit_bias(gm, node, spec, activation, scale, params.weight_grid)
                if raised:
                    notes.append(f"raised the weight scale of {raised} rows so the int32 bias fits")
                    counts["bias-fitted rows"] += raised
            notes.append(note_of.get(id(node), "reconstructed: activation parameters learned"))
            node.meta[PARAMS_KEY] = dataclasses.replace(params, activation=activation, weight_scale=scale, notes=notes)
    return counts
