"""Does ONNX Runtime compute what the torch fake-quant graph computes? The check every compile ends with.

Both sides do the same integer arithmetic, so they differ only by float reassociation (about 1e-7 of the
output's range) and, rarely, by an activation that lands within float rounding of a quantization
midpoint and rounds the other way: a one-step flip in one value, measured at up to 5e-4 of the range in
the output. A wrong kernel is far larger: a u8 x s8 GEMM that saturates its int16 pair sums (CPUs
without VNNI, full-range int8 weights) is off by 5-20%. The tolerance sits between the two:

* relative L2 error ``||ort - torch|| / ||torch|| <= 1e-3``, and
* max error ``max |ort - torch| <= 1e-2 * max |torch|``.

The check runs on calibration inputs (recorded during calibration), a few per timestep group, so every
branch of the artifact is exercised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

REL_L2_TOLERANCE = 1e-3
MAX_ERROR_TOLERANCE = 1e-2


@dataclass
class Agreement:
    rel_l2: float
    max_error: float  # relative to max |reference|

    @property
    def ok(self) -> bool:
        return self.rel_l2 <= REL_L2_TOLERANCE and self.max_error <= MAX_ERROR_TOLERANCE

    def describe(self) -> str:
        return f"relative L2 {self.rel_l2:.2e}, max error {self.max_error:.2e} of the output range"


def agreement(value: np.ndarray, reference: np.ndarray) -> Agreement:
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    if not np.isfinite(value).all():
        return Agreement(float("inf"), float("inf"))
    scale = max(float(np.abs(reference).max()), 1e-12)
    rel_l2 = float(np.linalg.norm(value - reference) / max(float(np.linalg.norm(reference)), 1e-12))
    return Agreement(rel_l2, float(np.abs(value - reference).max()) / scale)


@dataclass
class NumericsReport:
    per_group: dict[int, Agreement]

    @property
    def ok(self) -> bool:
        return all(a.ok for a in self.per_group.values())

    @property
    def worst(self) -> tuple[int, Agreement]:
        return max(self.per_group.items(), key=lambda item: (not item[1].ok, item[1].rel_l2))

    def to_manifest(self) -> dict:
        return {"tolerance": {"relative_l2": REL_L2_TOLERANCE, "max_error": MAX_ERROR_TOLERANCE},
                "groups": {str(g): {"relative_l2": float(f"{a.rel_l2:.3e}"), "max_error": float(f"{a.max_error:.3e}")}
                           for g, a in self.per_group.items()}}


def check_against_torch(session, module, inputs_by_group: dict[int, list[tuple[torch.Tensor, ...]]]) -> NumericsReport:
    """Run ``session`` (ONNX Runtime) and ``module`` (the torch fake-quant graph) on each group's inputs."""
    per_group = {}
    for group, batches in inputs_by_group.items():
        ours, theirs = [], []
        for sample, timestep, labels in batches:
            feeds = {"sample": sample.numpy(), "timestep": timestep.numpy(), "class_labels": labels.numpy()}
            ours.append(session.run(["out"], feeds)[0])
            with torch.no_grad():
                theirs.append(module(sample, timestep, labels).numpy())
        per_group[group] = agreement(np.concatenate(ours), np.concatenate(theirs))
    return NumericsReport(per_group)
