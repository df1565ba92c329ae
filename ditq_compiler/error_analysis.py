"""Where the quantization error comes from: per layer, per timestep.

The FP model is run along a sampling trajectory; at every quantized linear the layer's quantized output
(its input through the layer's Q/DQ, times its int8 weight) is compared with the FP output for the same
input: ``err = ||y_q - y|| / ||y||``. This isolates each layer's own contribution, so a layer that breaks
(an outlier channel at late timesteps, say) is named even when the end-to-end error is small. The
parameters are read back from the quantized graph itself, so what is measured is what is exported:
a layer whose input was smoothed reads ``(X - z)/s`` through its folded weight and bias, and so does its
quantized replica here. A module called several times is hooked per call (``<module>#k``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from .grouped import get_tensor
from .qspec import OUTPUT_ROWS_KEY, PROVENANCE_KEY, ROTATION_KEY, SMOOTHING_KEY, InputSmoothing, OutputRows
from .quant_ops import dequantize, quantize


@dataclass
class LayerQuantization:
    input_scale: torch.Tensor | None  # None: weight-only, the input stays in float
    input_zero_point: torch.Tensor | None
    weight: torch.Tensor  # dequantized int8 weight, [in, out]
    bias: torch.Tensor | None  # the bias the quantized layer adds (folded, dequantized if int32)
    smoothing: InputSmoothing | None
    rotation_block: int | None = None  # the input is Hadamard-rotated first (passes/rotation.py)
    grid: tuple[torch.Tensor, str] | None = None  # fp4: (grid scale, grid) the input is rounded onto first
    dynamic_block: int | None = None  # --act dynamic: quantized at run time (0: per tensor, B: per token block)
    output_rows: OutputRows | None = None  # a fold rescaled the output rows: mapped back to the float layer's

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation_block:
            from .passes.rotation import rotate

            x = rotate(x, self.rotation_block)
        if self.smoothing is not None:
            x = self.smoothing.apply(x)
        if self.grid is not None:
            x = torch.ops.ditq.round_to_grid(x, *self.grid)
        if self.dynamic_block is not None:
            x = torch.ops.ditq.dynamic_quantize(x, self.dynamic_block)
        elif self.input_scale is not None:
            x = dequantize(quantize(x, self.input_scale, self.input_zero_point, 0), self.input_scale,
                           self.input_zero_point, 0)
        y = x @ self.weight
        y = y + self.bias if self.bias is not None else y
        return self.output_rows.undo(y) if self.output_rows is not None else y


def _value(gm, node) -> torch.Tensor:
    """A get_attr node's tensor, or a dequantize of get_attr nodes (the int32 bias)."""
    if node.op == "get_attr":
        return get_tensor(gm, node.target)
    return node.target(*[_value(gm, arg) for arg in node.args[:3]], *node.args[3:])  # dequantize(_block)


def quantized_layers(gm) -> dict[str, LayerQuantization]:
    """Recover each layer's Q/DQ parameters, folded weights and bias from the quantized graph."""
    layers = {}
    for node in gm.graph.nodes:
        provenance = node.meta.get(PROVENANCE_KEY)
        if provenance is None or provenance.get("role") != "matmul":
            continue
        x_dq, w_dq = node.args
        quantized_input = x_dq.meta.get(PROVENANCE_KEY, {}).get("role") == "input_dq"
        scale, zero = (get_tensor(gm, x_dq.args[1].target), get_tensor(gm, x_dq.args[2].target)) \
            if quantized_input else (None, None)
        weight = _value(gm, w_dq)
        adds = [user for user in node.users if user.meta.get(PROVENANCE_KEY, {}).get("role") == "bias_add"]
        bias = _value(gm, adds[0].args[1]) if adds else None
        grid = None
        if quantized_input:
            rounded = x_dq.args[0].args[0]  # DQ <- Q <- round_to_grid, for fp4 inputs
            if rounded.meta.get(PROVENANCE_KEY, {}).get("role") == "input_round":
                grid = (get_tensor(gm, rounded.args[1].target), rounded.args[2])
        dynamic = x_dq.args[1] if x_dq.meta.get(PROVENANCE_KEY, {}).get("role") == "input_dynamic" else None
        layers[provenance["layer"]] = LayerQuantization(scale, zero, weight, bias, node.meta.get(SMOOTHING_KEY),
                                                        node.meta.get(ROTATION_KEY), grid, dynamic,
                                                        node.meta.get(OUTPUT_ROWS_KEY))
    return layers


def measure_layer_errors(model: torch.nn.Module, family, groups, layers_by_group: list[dict[str, LayerQuantization]],
                         scheduler_config: dict, model_config: dict, *, steps: int, samples: int = 2,
                         guidance_scale: float = 4.0, seed: int = 0,
                         recorded_calls=None) -> dict[str, dict[int, float]]:
    """``layers_by_group[g]``: the quantized layers of timestep group ``groups[g]``'s branch; the trajectories
    are ``family``'s sampling loop on ``samples`` conditions spread from ``seed``, or, for a family calibrated
    through its diffusers pipeline, the first ``steps`` recorded calls (the pipeline's first batch of prompts)."""
    errors: dict[str, dict[int, float]] = {name: {} for name in layers_by_group[0]}
    current = {"calls": {}}
    handles = []
    modules = dict(model.named_modules())

    def make_hook(module_name: str):
        def hook(module, inputs, output):
            call = current["calls"].get(module_name, 0)
            current["calls"][module_name] = call + 1
            key = module_name if call == 0 else f"{module_name}#{call}"
            if key not in current["layers"]:
                return
            y_q = current["layers"][key](inputs[0])
            errors[key][current["t"]] = float((y_q - output).norm() / output.norm().clamp_min(1e-12))
        return hook

    for module_name in dict.fromkeys(key.split("#")[0] for key in errors):
        handles.append(modules[module_name].register_forward_hook(make_hook(module_name)))

    signature = family.signature(model_config)
    timestep_at = signature.index("timestep")

    def denoise(*inputs):
        current["t"] = inputs[timestep_at][0].item()  # every row of a sampling batch shares the step's timestep
        current["calls"] = {}
        group = next(g.index for g in groups if g.contains(current["t"]))
        current["layers"] = layers_by_group[group]
        return model(**signature.kwargs(inputs), return_dict=False)[0]

    try:
        with torch.no_grad():
            if recorded_calls is not None:  # a family calibrated through its pipeline: the pipeline's own calls
                for _, inputs in itertools.islice(recorded_calls, steps):
                    denoise(*inputs)
            else:
                conditions = family.spread_conditions(model_config, samples, offset=seed)
                for _ in family.iterate_sampling(denoise, scheduler_config, model_config, conditions, steps=steps,
                                                 guidance_scale=guidance_scale, seed=seed):
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return errors


def layer_error_report(result, dump_dir: Path, top: int = 10) -> str:
    from .pass_manager import graph_modules

    ctx = result.context
    layers_by_group = [quantized_layers(gm) for gm in graph_modules(result.graph_module)]
    errors = measure_layer_errors(result.checkpoint.model, ctx.family, ctx.timestep_groups, layers_by_group,
                                  ctx.scheduler_config, ctx.model_config, steps=ctx.config.calibration.steps,
                                  guidance_scale=ctx.config.calibration.guidance_scale,
                                  seed=ctx.config.calibration.seed, recorded_calls=ctx.recorded_calls)
    timesteps = sorted({t for per_t in errors.values() for t in per_t})
    ranked = sorted(errors, key=lambda name: -sum(errors[name].values()) / max(len(errors[name]), 1))
    groups = ctx.timestep_groups
    header = f"{'layer':<44} {'mean':>8} {'max':>8} {'at t':>5}" + "".join(
        f"  g{g.index}[{g.start}-{g.end}]" for g in groups)
    lines = [header]
    for name in ranked:
        per_t = errors[name]
        worst = max(per_t, key=per_t.get)
        row = f"{name:<44} {sum(per_t.values()) / len(per_t):8.4f} {per_t[worst]:8.4f} {worst:5d}"
        for g in groups:
            inside = [v for t, v in per_t.items() if g.contains(t)]
            row += f"  {sum(inside) / len(inside) if inside else float('nan'):>{len(f'g{g.index}[{g.start}-{g.end}]')}.4f}"
        lines.append(row)
    (dump_dir / "layer_error.txt").write_text(
        "relative L2 error of each quantized layer's output vs FP on the same input, along a sampling "
        "trajectory\n\n" + "\n".join(lines) + "\n")
    _plot(errors, ranked, timesteps, dump_dir / "layer_error.png")
    return "\n".join(lines[: top + 1])


def _plot(errors, ranked, timesteps, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(ranked)
    grid = [[errors[name].get(t, float("nan")) for t in timesteps] for name in order]
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.3 * len(timesteps)), 1.5 + 0.18 * len(order)))
    image = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(order)), order, fontsize=6)
    step = max(1, len(timesteps) // 12)
    ax.set_xticks(range(0, len(timesteps), step), [str(t) for t in timesteps[::step]], fontsize=7)
    ax.set_xlabel("timestep (sampling runs right to left: noise at high t)")
    ax.set_title("per-layer quantization error (relative L2 of the layer output)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
