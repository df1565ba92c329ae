"""Mixed precision: measure each layer's sensitivity and give the most sensitive a higher precision.

Sensitivity of a layer in a timestep group = the relative L2 error of the model's output when that layer
alone is quantized (its chosen parameters, everything else in float), on the group's recorded calibration
inputs: ``||f_q(x) - f(x)|| / ||f(x)||``. ViDiT-Q measures sensitivity per layer and keeps the worst in higher
precision; here the choice is automatic and exported.

The unit of a decision is an input tensor: the layers that read one tensor (q, k and v) share one activation
quantizer, so they move together; a group's score is the largest sensitivity of its layers over the timestep
groups. Policies:

* ``--keep-sensitive K``: the K most sensitive inputs' layers move up;
* ``--budget-mb MB``: move up the most sensitive first while the quantized weights stay within MB.

"Up" means the next precision: int4 and FP4 layers become int8 (W8A8), int8 and FP8 layers stay in float.
The moved layers get their parameters anew (the next pass); the manifest and the dump list what was kept and
why.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from ..errors import ConfigError
from ..grouped import get_tensor
from ..pass_manager import GraphPass, PassResult
from ..qspec import ATTENTION_KEY, ATTENTION_PARAMS_KEY, PARAMS_KEY, SPEC_KEY
from ..quantizers import fake_quantize_activation, fake_quantize_weight
from .annotate import bias_form, why_attention_output_not_integer

UPGRADE = {"int4": "int8", "fp4": "int8", "int8": "fp", "float8e4m3fn": "fp"}
BYTES_PER_WEIGHT = {"int4": 0.5, "fp4": 0.5, "int8": 1.0, "float8e4m3fn": 1.0, "fp": 4.0}


class _OneLayerQuantized(fx.Interpreter):
    """Runs the float graph with one linear call replaced by its fake-quantized version."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node):
        super().__init__(gm)
        self.target_node = node
        spec, params = node.meta[SPEC_KEY], node.meta[PARAMS_KEY]
        weight = get_tensor(gm, node.args[1].target)
        self.weight = fake_quantize_weight(weight, params.weight_scale, spec.weight, params.weight_grid)
        self.spec, self.params = spec, params

    def run_node(self, n):
        if n is not self.target_node:
            return super().run_node(n)
        x, _, bias = (self.env[a] if isinstance(a, fx.Node) else a for a in (*n.args, None)[:3])
        if self.spec.activation is not None:
            x = fake_quantize_activation(x, self.params.activation, self.spec.activation)
        return torch.nn.functional.linear(x, self.weight, bias)


def layer_sensitivity(gm: fx.GraphModule, node: fx.Node, inputs: list[tuple], reference: list[torch.Tensor]) -> float:
    interpreter = _OneLayerQuantized(gm, node)
    errors, norms = 0.0, 0.0
    with torch.no_grad():
        for batch, expected in zip(inputs, reference):
            out = interpreter.run(*batch)
            errors += float((out - expected).pow(2).sum())
            norms += float(expected.pow(2).sum())
    return (errors / max(norms, 1e-30)) ** 0.5


class MixedPrecision(GraphPass):
    name = "mixed_precision"
    preserves_semantics = True  # changes specs and drops parameters to be chosen again; the code is unchanged

    def __init__(self, keep_sensitive: int = 0, budget_mb: float | None = None):
        self.keep_sensitive, self.budget_mb = keep_sensitive, budget_mb

    def run(self, module, ctx):
        branches = module.graph_modules()
        inputs_by_group = ctx.check_inputs_by_group(per_group=2)
        sensitivity: dict[str, dict[int, float]] = {}
        for gm, branch in zip(branches, ctx.branches):
            inputs = inputs_by_group.get(branch.index, [])
            with torch.no_grad():
                reference = [gm(*batch) for batch in inputs]
            for node in gm.graph.nodes:
                if SPEC_KEY in node.meta and PARAMS_KEY in node.meta:
                    sensitivity.setdefault(node.meta[SPEC_KEY].layer, {})[branch.index] = \
                        layer_sensitivity(gm, node, inputs, reference)
        specs = {n.meta[SPEC_KEY].layer: n.meta[SPEC_KEY] for n in branches[0].graph.nodes if SPEC_KEY in n.meta}
        units: dict[str, list[str]] = {}
        for layer, spec in specs.items():
            units.setdefault(spec.input_key, []).append(layer)
        score = {key: max(max(sensitivity[layer].values()) for layer in layers) for key, layers in units.items()}
        ranked = sorted(score, key=score.get, reverse=True)
        chosen = self._choose(ranked, units, specs, branches[0])
        moved = []
        for rank, key in enumerate(ranked, start=1):
            if key not in chosen:
                continue
            for layer in units[key]:
                precision = UPGRADE[specs[layer].weight.dtype]
                moved.append({"layer": layer, "precision": precision, "rank": rank,
                              "sensitivity": {str(g): round(v, 6) for g, v in sensitivity[layer].items()},
                              "reason": f"input {key} is the {_ordinal(rank)} most sensitive of {len(ranked)} "
                                        f"(max relative output error {score[key]:.3g} when quantized alone)"})
                for gm in branches:
                    self._move(gm, layer, precision, ctx.config)
        declined = self._decline_attention(branches) if moved else []
        ctx.mixed_precision = {"policy": self._policy(), "kept": moved,
                               "sensitivity": {layer: {str(g): round(v, 6) for g, v in per.items()}
                                               for layer, per in sensitivity.items()}}
        details = [f"{layer}: sensitivity " + ", ".join(f"g{g} {v:.3g}" for g, v in per.items())
                   for layer, per in sorted(sensitivity.items(), key=lambda item: -max(item[1].values()))]
        details += [f"moved {m['layer']} to {m['precision']}: {m['reason']}" for m in moved] + declined
        summary = (f"measured the sensitivity of {len(sensitivity)} layers in {len(branches)} timestep groups; "
                   f"{self._policy()}: moved {len(moved)} layers ({len(chosen)} inputs) up: "
                   + (", ".join(f"{m['layer']} -> {m['precision']}" for m in moved) or "none"))
        return PassResult(module, bool(moved), summary, details)

    def _policy(self) -> str:
        if self.budget_mb is not None:
            return f"weights within {self.budget_mb:g} MB"
        return f"keep the {self.keep_sensitive} most sensitive inputs"

    def _choose(self, ranked, units, specs, gm) -> set[str]:
        if self.budget_mb is None:
            return set(ranked[: self.keep_sensitive])
        sizes = {layer: get_tensor(gm, node.args[1].target).numel() for node in gm.graph.nodes
                 if SPEC_KEY in node.meta for layer in [node.meta[SPEC_KEY].layer]}

        def cost(layer, dtype):
            return sizes[layer] * BYTES_PER_WEIGHT[dtype] / 1e6

        total = sum(cost(layer, spec.weight.dtype) for layer, spec in specs.items())
        if total > self.budget_mb:
            raise ConfigError(f"--budget-mb {self.budget_mb:g}: the quantized weights alone take {total:.3g} MB; "
                              "raise the budget or choose a smaller format")
        chosen = set()
        for key in ranked:
            extra = sum(cost(layer, UPGRADE[specs[layer].weight.dtype]) - cost(layer, specs[layer].weight.dtype)
                        for layer in units[key])
            if total + extra <= self.budget_mb:
                chosen.add(key)
                total += extra
        return chosen

    @staticmethod
    def _decline_attention(branches) -> list[str]:
        """Integer attention needs its output projection's integer input grid (annotate's check): a layer
        moved to fp (or FP8) takes it away, so that attention goes back to float, with the reason."""
        declined = {}
        for gm in branches:
            for node in gm.graph.nodes:
                reason = why_attention_output_not_integer(node) if ATTENTION_KEY in node.meta else None
                if reason:
                    layer = node.meta.pop(ATTENTION_KEY).layer
                    node.meta.pop(ATTENTION_PARAMS_KEY, None)
                    declined[layer] = f"keep fp   {layer} attention ({reason})"
        return list(declined.values())

    @staticmethod
    def _move(gm, layer: str, precision: str, config) -> None:
        for node in gm.graph.nodes:
            spec = node.meta.get(SPEC_KEY)
            if spec is None or spec.layer != layer:
                continue
            node.meta.pop(PARAMS_KEY, None)
            if precision == "fp":
                node.meta.pop(SPEC_KEY)
                continue
            activation, weight = config.activation_spec_for(precision), config.weight_spec_for(precision)
            two_d, has_bias = node.args[0].meta["val"].dim() == 2, len(node.args) > 2 and node.args[2] is not None
            node.meta[SPEC_KEY] = dataclasses.replace(spec, weight=weight, activation=activation,
                                                      bias=bias_form(config, two_d, has_bias, weight, activation))


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
