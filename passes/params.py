"""Choose quantization parameters per timestep-group branch, from the branch's calibration statistics.

Activations (per tensor, in the branch's group): ``lo = min(0, min_{t, c} x_min[t, c])``,
``hi = max(0, max_{t, c} x_max[t, c])`` over the group's calibrated timesteps, then the spec's grid:
affine ``scale = (hi - lo) / (qmax - qmin)``, ``zero_point = qmin - round(lo / scale)``. The statistics are
those of the tensor the layer reads *after* any smoothing fold. Every reader of a tensor gets the same
:class:`ActivationParams` object (one quantizer per tensor, checked again at insertion).

Weights (per output channel ``i``, symmetric), by method:

* ``absmax``: ``scale_i = max_j |W_ij| / qmax``;
* ``quantile`` (PTQ4DiT): clip at the ``p``-quantile of ``|W_i|`` for ``p`` in {0.999, 0.9999, 0.99999, 1}
  and keep, per channel, the clip with the lowest L2 quantization error ``||W_i - Q(W_i)||``.

A layer whose bias is quantized to int32 (``QGemm``) needs ``round(b_i / (s_x s_w_i))`` to fit int32:
a dead row (all weights ~0, tiny ``s_w_i``) with a bias would overflow, so that row's weight scale is
raised until it fits (``bias_fitting_weight_scale``), as ONNX Runtime's own quantizer does.

Weight scales depend only on the weight, so branches that share a weight share its scale (memoized).
"""

from __future__ import annotations

from collections import Counter

import torch

from ..errors import PassPreconditionError
from ..grouped import TensorMemo, get_tensor
from ..pass_manager import BranchPass, BranchResult
from ..qspec import (PARAMS_KEY, SPEC_KEY, LinearQuantParams, bias_fitting_weight_scale,
                     quantize_params_from_range, symmetric_weight_scale)

QUANTILES = (0.999, 0.9999, 0.99999, 1.0)


def quantile_search_scale(weight: torch.Tensor, spec) -> torch.Tensor:
    """PTQ4DiT's weight clipping: per output channel, the quantile clip with the lowest L2 error."""
    w = weight.detach().to(torch.float32)
    magnitude = w.abs()
    candidates = torch.stack([torch.quantile(magnitude, q, dim=1) if q < 1 else magnitude.amax(dim=1)
                              for q in QUANTILES])  # [candidates, out]
    scales = (candidates / spec.qmax).clamp_min(1e-12)
    q = torch.clamp(torch.round(w[None] / scales[:, :, None]), spec.qmin, spec.qmax)
    errors = ((q * scales[:, :, None] - w[None]) ** 2).sum(dim=2)  # [candidates, out]
    best = errors.argmin(dim=0)
    return scales.gather(0, best[None])[0]


WEIGHT_METHODS = {
    "absmax": symmetric_weight_scale,
    "quantile": quantile_search_scale,
}


class ChooseQuantParams(BranchPass):
    name = "choose_params"
    preserves_semantics = True  # writes parameters onto nodes; the graph's code is unchanged

    def __init__(self, recipe: str, weight_method: str = "absmax"):
        if weight_method not in WEIGHT_METHODS:
            raise ValueError(f"unknown weight method {weight_method}")
        self.recipe, self.weight_method = recipe, weight_method
        self.memo = TensorMemo()

    def check_preconditions(self, gm, ctx):
        super().check_preconditions(gm, ctx)
        for branch in ctx.branches:
            if not branch.stats.timesteps:
                raise PassPreconditionError(self.name, f"timestep group {branch.group.start}..{branch.group.end} "
                                                       "has no calibration statistics")

    def run_branch(self, gm, ctx, branch):
        activation = {}
        counts, details = Counter(), []
        for node in gm.graph.nodes:
            spec = node.meta.get(SPEC_KEY)
            if spec is None:
                continue
            if spec.activation is None:
                act = None
            else:
                if spec.input_key not in activation:
                    lo, hi = branch.stats.get(spec.input_key).range_over()
                    activation[spec.input_key] = quantize_params_from_range(float(lo.min()), float(hi.max()),
                                                                            spec.activation)
                act = activation[spec.input_key]
            weight = get_tensor(gm, node.args[1].target)
            method = WEIGHT_METHODS[self.weight_method]
            weight_scale = self.memo(f"wscale:{self.weight_method}:{spec.weight}", (weight,),
                                     lambda: method(weight, spec.weight))
            notes = []
            if spec.bias == "int32":
                bias = get_tensor(gm, node.args[2].target)
                fitting = bias_fitting_weight_scale(bias, act.scale, weight_scale)
                raised = int((fitting > weight_scale).sum())
                if raised:
                    weight_scale = fitting
                    notes.append(f"raised the weight scale of {raised} rows so the int32 bias fits")
                    counts["bias-fitted rows"] += raised
            node.meta[PARAMS_KEY] = LinearQuantParams(act, weight_scale, self.recipe, self.weight_method, notes)
            counts["layers"] += 1
            input_text = "input in float (weight-only)" if act is None else \
                f"input range [{act.low:.4g}, {act.high:.4g}] -> scale {act.scale:.4g}, zero point {act.zero_point}"
            details.append(f"{spec.layer}: {input_text}; weight scales {self.weight_method} "
                           f"(median {float(weight_scale.median()):.3g})" + "".join(f"; {n}" for n in notes))
        counts["tensors"] = len(activation)
        return BranchResult(bool(counts["layers"]), counts, details)

    def summarize(self, counts, ctx):
        text = (f"chose {self.recipe} parameters for {counts['layers']} layers ({counts['tensors']} activation "
                f"quantizers, weight scales by {self.weight_method})")
        if counts.get("bias-fitted rows"):
            text += f"; raised {counts['bias-fitted rows']} weight rows so their int32 bias fits"
        return text
