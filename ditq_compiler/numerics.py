"""Does ONNX Runtime compute what the torch fake-quant graph computes? The check every compile ends with.

Both sides do the same integer arithmetic, so they differ only by float reassociation and by what that does
to rounding: an activation within float noise of a quantization midpoint rounds the other way, and in a deep
quantized network one such flip moves later quantizers' inputs across their midpoints too. So "the same"
cannot mean bit-equal: on the reference DiT, ONNX Runtime and torch differ by 2e-7 on some inputs and by
2e-3 (relative L2) on others, for a correct artifact.

What the check compares it with is the graph's own sensitivity to such differences: the group's branch is
run again with the input of every quantizer perturbed by ``1e-5`` relative noise (float differences between
two implementations of LayerNorm, GELU or softmax are of that order). Over the recorded calibration inputs
of each timestep group (up to 8 rows), ONNX Runtime must agree with torch within
``max(floor, 3 x sensitivity)`` in relative L2 and in max error (floors ``1e-3`` and ``1e-2`` of the output
range). Measured on the reference DiT (every group of W8A8 minmax, smoothquant, 4 HTG groups): the ratio
ONNX Runtime disagreement / sensitivity is 0.0 to 0.66 for correct artifacts and 18 for a u8 x s8 kernel
that saturates its int16 pair sums (a CPU without VNNI with full-range int8 weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import quant_ops  # noqa: F401  (registers the torch.ops.ditq ops named below)

REL_L2_TOLERANCE = 1e-3
MAX_ERROR_TOLERANCE = 1e-2
SENSITIVITY_FACTOR = 3.0
PERTURBATION = 1e-5
MAX_ROWS = 8  # per group, spread evenly over its recorded rows (a conditional and an unconditional one per step):
# a wrong kernel or scale shows on any row, and with 16 the check was the longest phase of a DiT-XL/2 compile
BATCH_ROWS = 8  # rows per batch of the check: the batch's activations stay small on DiT-XL/2


@dataclass
class Agreement:
    rel_l2: float
    max_error: float  # relative to max |reference|

    @property
    def ok(self) -> bool:
        return self.within(Agreement(REL_L2_TOLERANCE, MAX_ERROR_TOLERANCE))

    def within(self, tolerance: "Agreement") -> bool:
        return self.rel_l2 <= tolerance.rel_l2 and self.max_error <= tolerance.max_error

    def describe(self) -> str:
        return f"relative L2 {self.rel_l2:.2e}, max error {self.max_error:.2e} of the output range"


def tolerance_for(sensitivity: "Agreement") -> Agreement:
    return Agreement(max(REL_L2_TOLERANCE, SENSITIVITY_FACTOR * sensitivity.rel_l2),
                     max(MAX_ERROR_TOLERANCE, SENSITIVITY_FACTOR * sensitivity.max_error))


def agreement(value: np.ndarray, reference: np.ndarray) -> Agreement:
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    if not np.isfinite(value).all():
        return Agreement(float("inf"), float("inf"))
    scale = max(float(np.abs(reference).max()), 1e-12)
    rel_l2 = float(np.linalg.norm(value - reference) / max(float(np.linalg.norm(reference)), 1e-12))
    return Agreement(rel_l2, float(np.abs(value - reference).max()) / scale)


@dataclass
class GroupCheck:
    agreement: Agreement  # ONNX Runtime vs torch on the probes
    sensitivity: Agreement  # torch vs torch on the probes perturbed by 1e-6
    timesteps: list[int]

    @property
    def tolerance(self) -> Agreement:
        return tolerance_for(self.sensitivity)

    @property
    def ok(self) -> bool:
        return self.agreement.within(self.tolerance)


@dataclass
class NumericsReport:
    per_group: dict[int, GroupCheck]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.per_group.values())

    @property
    def worst(self) -> tuple[int, GroupCheck]:
        return max(self.per_group.items(), key=lambda item: (not item[1].ok, item[1].agreement.rel_l2))

    def to_manifest(self) -> dict:
        def numbers(a: Agreement) -> dict:
            return {"relative_l2": float(f"{a.rel_l2:.3e}"), "max_error": float(f"{a.max_error:.3e}")}

        return {"rule": f"agreement within max(floor, {SENSITIVITY_FACTOR:g} x the torch graph's change under "
                        f"{PERTURBATION:g} input noise) on the least sensitive calibration inputs of each group",
                "floor": numbers(Agreement(REL_L2_TOLERANCE, MAX_ERROR_TOLERANCE)),
                "groups": {str(g): {**numbers(c.agreement), "sensitivity": numbers(c.sensitivity),
                                    "timesteps": c.timesteps} for g, c in self.per_group.items()}}


ROUNDING_OPS = (torch.ops.ditq.quantize.default, torch.ops.ditq.dynamic_quantize.default,
                torch.ops.ditq.round_to_grid.default)


class _PerturbedQuantizers(torch.fx.Interpreter):
    """Runs a branch with the input of every rounding op (calibrated or dynamic quantize, FP4's grid rounding)
    perturbed by ``PERTURBATION`` relative noise."""

    def __init__(self, gm, seed: int):
        super().__init__(gm)
        self.generator = torch.Generator().manual_seed(seed)

    def call_function(self, target, args, kwargs):
        # every op that rounds: quantize, dynamic quantize, and FP4's round_to_grid, whose output the quantize
        # after it maps exactly (perturbing only that quantize's input would never flip an FP4 rounding)
        if target in ROUNDING_OPS:
            x = args[0]
            noise = torch.randn(x.shape, generator=self.generator, dtype=torch.float32)
            args = (x * (1 + PERTURBATION * noise), *args[1:])
        return super().call_function(target, args, kwargs)


def _rows(batches: list[tuple[torch.Tensor, ...]], limit: int) -> list[tuple[torch.Tensor, ...]]:
    """Single-row inputs, at most ``limit``, spread over the recorded timesteps."""
    rows = [tuple(t[i:i + 1] for t in batch) for batch in batches for i in range(batch[0].shape[0])]
    if len(rows) > limit:
        rows = [rows[round(i * (len(rows) - 1) / (limit - 1))] for i in range(limit)]
    return rows


def check_against_torch(session, module, inputs_by_group: dict[int, list[tuple[torch.Tensor, ...]]],
                        signature) -> NumericsReport:
    """Run ``session`` (ONNX Runtime), the group's torch branch, and that branch with perturbed quantizer
    inputs on each group's recorded inputs (in ``signature``'s order); compare within the tolerance the
    sensitivity allows.

    The rows of a group run as batches of up to ``BATCH_ROWS`` (all three computations see the same batch, so
    what is compared is unchanged): the perturbed run interprets the graph node by node in Python, a cost per
    node that a batch pays once instead of once per row (on DiT-XL/2 the check was the longest phase before)."""
    timestep_at = signature.index("timestep")
    per_group = {}
    branches = module.graph_modules() if hasattr(module, "graph_modules") else [module]
    for group, batches in inputs_by_group.items():
        branch = branches[group]
        rows = _rows(batches, MAX_ROWS)
        ours, references, moved = [], [], []
        with torch.no_grad():
            for index, start in enumerate(range(0, len(rows), BATCH_ROWS)):
                inputs = tuple(torch.cat(parts) for parts in zip(*rows[start:start + BATCH_ROWS]))
                references.append(branch(*inputs).numpy())
                moved.append(_PerturbedQuantizers(branch, index).run(*inputs).numpy())
                ours.append(session.run([signature.output], signature.feeds(inputs))[0])
        timesteps = sorted({row[timestep_at][0].item() for row in rows})
        reference = np.concatenate(references)
        per_group[group] = GroupCheck(agreement(np.concatenate(ours), reference),
                                      agreement(np.concatenate(moved), reference), timesteps)
    return NumericsReport(per_group)
