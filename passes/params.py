"""Choose quantization parameters per timestep-group branch, from the branch's calibration statistics.

Activations (per tensor, in the branch's group; the statistics are those of the tensor the layer reads
*after* any smoothing fold), ``lo``/``hi`` the range over the group's calibrated timesteps:

* integer (uint8 affine): ``scale = (hi - lo) / (qmax - qmin)``, ``zero_point = qmin - round(lo / scale)``;
* FP8 E4M3: ``scale = max(|lo|, |hi|) / 448``, zero point 0;
* FP4 (HQ-DiT): the grid (E2M1, E3M0, INT4) and the clipping ratio ``c`` with the lowest mean squared error
  ``E[(X - round_to_grid(X, c * absmax / g_max))^2]`` on the tensor's values captured on the group's
  calibration inputs.

Every reader of a tensor gets the same :class:`ActivationParams` object (one quantizer per tensor).

Weights (per output channel ``i``, symmetric), by ``--weight-clip``:

* ``minmax``: ``scale_i = max_j |W_ij| / g_max``;
* ``percentile`` (PTQ4DiT): clip at the ``p``-quantile of ``|W_i|`` for ``p`` in {0.999, 0.9999, 0.99999, 1},
  keep the clip with the lowest error;
* ``mse``: clip at ``c * max_j |W_ij|`` for ``c`` in 1.0, 0.95, ..., 0.5, keep the lowest error.

Block-wise weights (``--weight-block B``) search each block of ``B`` inputs of each row the same way.
Dynamic activations (``--act dynamic``) get no parameters: the kernel quantizes them at run time.

The error of a channel is ``sum_j e_j (W_ij - Q(W)_ij)^2``: plain L2 (``e_j = 1``) for integer formats, and
for FP4, whose grids are coarse, weighted by the input's mean square ``e_j = E[X_j^2]`` over the calibration
inputs of every group — the output error the rounding adds, to a diagonal approximation. FP4 picks the grid
per layer with the lowest total error (HQ-DiT's format selection). Weight parameters depend on the weight
(and on statistics pooled over every group), so groups that share a weight share its parameters.

A layer whose bias is quantized to int32 (``QGemm``) needs ``round(b_i / (s_x s_w_i))`` to fit int32 (the two
DequantizeLinear scales): a dead row (all weights ~0, tiny ``s_w_i``) with a bias would overflow, so that
row's weight scale is raised until it fits (``bias_fitting_weight_scale``), as ONNX Runtime's quantizer does.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from ..capture import capture_layer_inputs
from ..errors import PassPreconditionError
from ..grids import FLOAT8_E4M3_MAX, GRIDS, round_to_grid
from ..grouped import TensorMemo, get_tensor
from ..pass_manager import BranchPass, BranchResult
from ..qspec import (ATTENTION_KEY, ATTENTION_PARAMS_KEY, PARAMS_KEY, SPEC_KEY, ActivationParams,
                     AttentionQuantParams, LinearQuantParams, QuantizerSpec,
                     bias_fitting_weight_scale, grid_max, quantize_params_from_range)
from ..quantizers import activation_qdq, fake_quantize_weight, weight_dequantize_scale

PERCENTILES = (0.999, 0.9999, 0.99999, 1.0)
MSE_CLIPS = tuple(1.0 - 0.05 * i for i in range(11))
ACTIVATION_CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
WEIGHT_CLIPS = ("minmax", "percentile", "mse")


def _clip_candidates(weight: torch.Tensor, method: str) -> torch.Tensor:
    """``[candidates, out]`` clipping values per output channel."""
    magnitude = weight.abs()
    absmax = magnitude.amax(dim=1)
    if method == "minmax":
        return absmax[None]
    if method == "percentile":
        return torch.stack([torch.quantile(magnitude, q, dim=1) if q < 1 else absmax for q in PERCENTILES])
    return torch.stack([c * absmax for c in MSE_CLIPS])


def search_weight_scale(weight: torch.Tensor, spec: QuantizerSpec, method: str, grid: str | None = None,
                        importance: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Per-channel scales by ``method`` and their total (weighted) squared error; for a block spec, the
    search runs on each block of inputs as if it were a layer of its own, giving ``[out, blocks]`` scales."""
    w = weight.detach().to(torch.float32)
    if spec.granularity == "block":
        per_channel = dataclasses.replace(spec, granularity="channel", block_size=None)
        found = [search_weight_scale(w[:, start:start + spec.block_size], per_channel, method, grid,
                                     importance[start:start + spec.block_size] if importance is not None else None)
                 for start in range(0, w.shape[1], spec.block_size)]
        return torch.stack([scale for scale, _ in found], dim=1), sum(error for _, error in found)
    candidates = _clip_candidates(w, method)
    scales = (candidates / grid_max(spec, grid)).clamp_min(1e-12)  # [candidates, out]
    weights = importance.to(torch.float32)[None, :] if importance is not None else 1.0
    errors = torch.stack([((fake_quantize_weight(w, scale, spec, grid) - w) ** 2 * weights).sum(dim=1)
                          for scale in scales])  # [candidates, out]
    best = errors.argmin(dim=0)
    chosen = scales.gather(0, best[None])[0]
    return chosen, float(errors.gather(0, best[None]).sum())


def choose_weight(weight: torch.Tensor, spec: QuantizerSpec, method: str,
                  importance: torch.Tensor | None) -> tuple[torch.Tensor, str | None, str]:
    """(per-channel scale, grid or None, a note) for one layer."""
    if spec.dtype != "fp4":
        scale, _ = search_weight_scale(weight, spec, method)
        return scale, None, method
    results = {grid: search_weight_scale(weight, spec, method, grid, importance) for grid in spec.grids}
    grid = min(results, key=lambda g: results[g][1])
    ranking = ", ".join(f"{g} {results[g][1]:.3g}" for g in sorted(results, key=lambda g: results[g][1]))
    return results[grid][0], grid, f"{method}, grid {grid} (weighted error {ranking})"


def choose_activation(spec: QuantizerSpec, lo: float, hi: float, values: torch.Tensor | None) -> ActivationParams:
    """Parameters of one activation quantizer from its range (and for FP4 its captured values). A dynamic
    quantizer gets no scale (the kernel computes it at run time); its calibrated range is kept for reports."""
    if spec.dynamic:
        return ActivationParams(0.0, 0, min(lo, 0.0), max(hi, 0.0))
    if spec.dtype == "float8e4m3fn":
        absmax = max(-lo, hi, 0.0)
        return ActivationParams(max(absmax / FLOAT8_E4M3_MAX, 1e-12), 0.0, min(lo, 0.0), max(hi, 0.0))
    if spec.dtype != "fp4":
        return quantize_params_from_range(lo, hi, spec)
    absmax = max(-lo, hi, 1e-12)
    best = None
    for grid in spec.grids:
        for clip in ACTIVATION_CLIPS:
            scale = clip * absmax / GRIDS[grid].max
            if values is None:  # nothing captured: the widest grid, unclipped
                return ActivationParams(absmax / GRIDS[spec.grids[0]].max, 128, -absmax, absmax, spec.grids[0])
            error = float(((round_to_grid(values, scale, GRIDS[grid]) - values) ** 2).mean())
            if best is None or error < best[0]:
                best = (error, scale, grid, clip)
    _, scale, grid, clip = best
    return ActivationParams(scale, 128, -clip * absmax, clip * absmax, grid)


class ChooseQuantParams(BranchPass):
    name = "choose_params"
    preserves_semantics = True  # writes parameters onto nodes; the graph's code is unchanged

    def __init__(self, recipe: str, weight_clip: str = "minmax", *, only_missing: bool = False):
        """``only_missing``: choose parameters only for layers that have none (after mixed precision moved
        some layers to another precision)."""
        if weight_clip not in WEIGHT_CLIPS:
            raise ValueError(f"unknown weight clipping {weight_clip}")
        self.recipe, self.weight_clip, self.only_missing = recipe, weight_clip, only_missing
        self.memo = TensorMemo()
        self.captured: list[dict[str, torch.Tensor]] = []
        self.importance: dict[str, torch.Tensor] = {}

    def check_preconditions(self, gm, ctx):
        super().check_preconditions(gm, ctx)
        for branch in ctx.branches:
            if not branch.stats.timesteps:
                raise PassPreconditionError(self.name, f"timestep group {branch.group.start}..{branch.group.end} "
                                                       "has no calibration statistics")

    def begin(self, module, ctx):
        """FP4 needs real values: capture the quantized inputs on each group's calibration inputs, and pool
        the per-channel mean squares over every group (weight choices are made once for all groups)."""
        specs = [n.meta[SPEC_KEY] for n in module.graph_modules()[0].graph.nodes if SPEC_KEY in n.meta]
        if not any(s.weight.dtype == "fp4" or (s.activation and s.activation.dtype == "fp4") for s in specs):
            self.captured = [{} for _ in ctx.branches]
            return
        groups = ctx.check_inputs_by_group(per_group=4)
        self.captured = [capture_layer_inputs(gm, groups.get(branch.index, []))
                         for gm, branch in zip(module.graph_modules(), ctx.branches)]
        keys = set().union(*self.captured)
        for key in keys:
            rows = torch.cat([part[key] for part in self.captured if key in part])
            self.importance[key] = (rows.to(torch.float64) ** 2).mean(dim=0)

    def run_branch(self, gm, ctx, branch):
        activation = {}
        counts, details = Counter(), []
        captured = self.captured[branch.index]
        for node in gm.graph.nodes:
            spec = node.meta.get(SPEC_KEY)
            if spec is None or (self.only_missing and PARAMS_KEY in node.meta):
                continue
            act = None
            if spec.activation is not None:
                if spec.input_key not in activation:
                    lo, hi = branch.stats.get(spec.input_key).range_over()
                    activation[spec.input_key] = choose_activation(spec.activation, float(lo.min()), float(hi.max()),
                                                                   captured.get(spec.input_key))
                act = activation[spec.input_key]
            weight = get_tensor(gm, node.args[1].target)
            importance = self.importance.get(spec.input_key) if spec.weight.dtype == "fp4" else None
            weight_scale, grid, note = self.memo(
                f"weight:{self.weight_clip}:{spec.weight}", (weight, importance),
                lambda: choose_weight(weight, spec.weight, self.weight_clip, importance))
            notes = []
            if spec.bias == "int32":
                weight_scale, raised = self._fit_bias(gm, node, spec, act, weight_scale, grid)
                if raised:
                    notes.append(f"raised the weight scale of {raised} rows so the int32 bias fits")
                    counts["bias-fitted rows"] += raised
            node.meta[PARAMS_KEY] = LinearQuantParams(act, weight_scale, self.recipe, note, notes, grid)
            counts["layers"] += 1
            if grid:
                counts[f"weights on {grid}"] += 1
            input_text = "input in float (weight-only)" if act is None else \
                f"input quantized at run time ({spec.activation.describe()})" if spec.activation.dynamic else \
                f"input range [{act.low:.4g}, {act.high:.4g}] -> scale {act.scale:.4g}, zero point {act.zero_point}" \
                + (f", grid {act.grid}" if act.grid else "")
            details.append(f"{spec.layer}: {input_text}; weight scales {note} "
                           f"(median {float(weight_scale.median()):.3g})" + "".join(f"; {n}" for n in notes))
        for node in gm.graph.nodes:  # attention: q, k, v from their ranges, the softmax output on [0, 1]
            spec = node.meta.get(ATTENTION_KEY)
            if spec is None or (self.only_missing and ATTENTION_PARAMS_KEY in node.meta):
                continue
            ranged = {}
            for name, key in (("q", spec.q_key), ("k", spec.k_key), ("v", spec.v_key)):
                lo, hi = branch.stats.get(key).range_over()
                ranged[name] = quantize_params_from_range(float(lo.min()), float(hi.max()), spec.activation)
            probs = ActivationParams(1.0 / 255.0, 0, 0.0, 1.0)
            node.meta[ATTENTION_PARAMS_KEY] = AttentionQuantParams(ranged["q"], ranged["k"], ranged["v"], probs)
            counts["attention calls"] += 1
            details.append(f"{spec.layer} attention: " + ", ".join(
                f"{name} range [{p.low:.4g}, {p.high:.4g}] -> scale {p.scale:.4g}" for name, p in ranged.items())
                + "; softmax output scale 1/255")
        counts["tensors"] = len(activation)
        for params in activation.values():
            if params.grid:
                counts[f"activations on {params.grid}"] += 1
        return BranchResult(bool(counts["layers"]), counts, details)

    @staticmethod
    def _fit_bias(gm, node, spec, act, weight_scale, grid) -> tuple[torch.Tensor, int]:
        bias = get_tensor(gm, node.args[2].target)
        input_dq = activation_qdq(act, spec.activation)[0]
        dq = weight_dequantize_scale(weight_scale, spec.weight, grid)
        fitted = bias_fitting_weight_scale(bias, input_dq, dq)
        raised = int((fitted > dq).sum())
        if raised:
            weight_scale = (weight_scale.to(torch.float64) * fitted.to(torch.float64) / dq.to(torch.float64))
            weight_scale = weight_scale.to(torch.float32)
        return weight_scale, raised

    def summarize(self, counts, ctx):
        if self.only_missing and not counts["layers"]:
            return "no layer changed precision: nothing to choose"
        text = (f"chose {self.recipe} parameters for {counts['layers']} layers ({counts['tensors']} activation "
                f"quantizers, weight clipping {self.weight_clip})")
        grids = [f"{n} {key}" for key, n in sorted(counts.items()) if key.startswith(("weights on", "activations on"))]
        if grids:
            text += "; " + ", ".join(grids)
        if counts.get("attention calls"):
            text += f"; {counts['attention calls']} attention calls (q, k, v, softmax output)"
        if counts.get("bias-fitted rows"):
            text += f"; raised {counts['bias-fitted rows']} weight rows so their int32 bias fits"
        return text
