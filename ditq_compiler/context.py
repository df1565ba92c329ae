"""What the passes of one compilation share: the configuration, the model's family and configs,
calibration statistics, the timestep groups and, after the split, each group branch's own state."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .calibration import ActivationStats
from .config import CompileConfig
from .families import DIT, ModelFamily, Signature, TimestepDomain


@dataclass(frozen=True)
class TimestepGroup:
    """Timesteps ``start..end`` (inclusive) share one set of quantization parameters."""

    index: int
    start: int
    end: int

    def contains(self, timestep: int) -> bool:
        return self.start <= timestep <= self.end

    def to_manifest(self) -> dict:
        return {"index": self.index, "start": self.start, "end": self.end}


@dataclass
class BranchState:
    """What belongs to one timestep group's branch: its group and its calibration statistics (restricted
    to the group's timesteps, carried through every fold applied to that branch)."""

    index: int
    group: TimestepGroup
    stats: ActivationStats


@dataclass
class CompileContext:
    config: CompileConfig
    model_config: dict
    scheduler_config: dict
    # Small fixed inputs on which passes that must not change the function are checked.
    check_inputs: tuple[torch.Tensor, ...]
    timestep_groups: list[TimestepGroup] = field(default_factory=list)
    stats: ActivationStats | None = None
    # HTG's calibrated timesteps and merge history (for the dendrogram); empty otherwise.
    grouping_history: dict = field(default_factory=dict)
    # One entry per timestep group once the graph is split into branches.
    branches: list[BranchState] = field(default_factory=list)
    family: ModelFamily = DIT
    # Smoothing vectors computed by a recipe, waiting to be folded (see passes/smoothing.py).
    smoothing_plan: object | None = None
    # What mixed precision measured and moved (passes/mixed.py), for the manifest.
    mixed_precision: dict = field(default_factory=dict)
    # A few denoiser inputs per calibrated timestep (timestep -> (sample, timestep, labels)).
    calibration_inputs: dict = field(default_factory=dict)
    # Recorded transformer calls ``(timestep, inputs in signature order)`` from the user's diffusers pipeline
    # (``recording.py``); when set, calibration replays them instead of running the family's sampling loop.
    recorded_calls: object | None = None  # a recording.Recording, or a list of (timestep, inputs)

    def check_inputs_by_group(self, per_group: int | None = 2) -> dict[int, list]:
        """Up to ``per_group`` recorded calibration inputs for each timestep group, spread over the group
        (all of them with ``per_group=None``)."""
        chosen = {}
        for group in self.timestep_groups:
            timesteps = sorted(t for t in self.calibration_inputs if group.contains(t))
            if not timesteps:
                continue
            if per_group is not None and len(timesteps) > per_group:
                positions = [round(i * (len(timesteps) - 1) / max(per_group - 1, 1)) for i in range(per_group)]
                timesteps = [timesteps[p] for p in sorted(set(positions))]
            chosen[group.index] = [self.calibration_inputs[t] for t in timesteps]
        return chosen

    @property
    def recording_source(self) -> dict | None:
        """What produced the recorded calls (``Recording.source``, for the manifest), where they are a recording."""
        return getattr(self.recorded_calls, "source", None)

    def export_inputs(self) -> tuple[torch.Tensor, ...]:
        """Inputs the ONNX exporter traces with: the family's examples, or (calibrated on recorded pipeline calls,
        whose text length the graph fixes) the check inputs."""
        if self.recorded_calls is not None:
            return self.check_inputs
        return self.family.example_inputs(self.model_config, batch=2)

    @property
    def signature(self) -> Signature:
        return self.family.signature(self.model_config)

    @property
    def timestep_domain(self) -> TimestepDomain:
        return self.family.timestep_domain(self.scheduler_config)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    def __post_init__(self) -> None:
        if not self.timestep_groups:
            self.timestep_groups = [TimestepGroup(0, 0, self.num_train_timesteps - 1)]
