"""Recipe ``minmax``: quantization parameters straight from the calibrated ranges.

Activations (per tensor, per timestep group ``g``): ``lo = min(0, min_{t in g, c} x_min[t, c])``,
``hi = max(0, max_{t in g, c} x_max[t, c])``, ``scale = (hi - lo) / 255``, ``zero_point = round(-lo / scale)``.
Weights (per output channel ``i``, symmetric): ``scale_i = max_j |W_ij| / 127``.
"""

from __future__ import annotations

from ..errors import PassPreconditionError
from ..pass_manager import GraphPass, PassResult
from ..qspec import PARAMS_KEY, SPEC_KEY, LinearQuantParams, quantize_params_from_range, symmetric_weight_scale


class ChooseMinMaxParams(GraphPass):
    name = "choose_params_minmax"
    preserves_semantics = True  # writes parameters onto nodes; the graph's code is unchanged

    def check_preconditions(self, gm, ctx):
        if ctx.stats is None:
            raise PassPreconditionError(self.name, "no calibration statistics; run calibration first")
        for group in ctx.timestep_groups:
            if not any(group.contains(t) for t in ctx.stats.timesteps):
                raise PassPreconditionError(
                    self.name, f"timestep group {group.start}..{group.end} holds no calibrated timestep; "
                               "raise --calib-steps or use fewer groups")

    def run(self, gm, ctx):
        group_timesteps = [[t for t in ctx.stats.timesteps if g.contains(t)] for g in ctx.timestep_groups]
        details, count = [], 0
        for node in gm.graph.nodes:
            spec = node.meta.get(SPEC_KEY)
            if spec is None:
                continue
            scales, zero_points, ranges = [], [], []
            for timesteps in group_timesteps:
                lo, hi = ctx.stats.get(spec.input_key).range_over(timesteps)
                scale, zero_point = quantize_params_from_range(float(lo.min()), float(hi.max()), spec.activation)
                scales.append(scale)
                zero_points.append(zero_point)
                ranges.append(f"[{float(lo.min()):.4g}, {float(hi.max()):.4g}]")
            weight = gm.get_parameter(node.args[1].target)
            weight_scale = symmetric_weight_scale(weight, spec.weight)
            node.meta[PARAMS_KEY] = LinearQuantParams(tuple(scales), tuple(zero_points), weight_scale, "minmax")
            count += 1
            details.append(f"{spec.layer}: input range per group {', '.join(ranges)} -> scale "
                           f"{', '.join(f'{s:.4g}' for s in scales)}, zero point {', '.join(map(str, zero_points))}")
        return PassResult(gm, modified=count > 0, summary=f"chose minmax parameters for {count} layers x "
                          f"{len(group_timesteps)} timestep groups", details=details)
