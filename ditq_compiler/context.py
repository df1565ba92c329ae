"""What the passes of one compilation share: the configuration, the model's configs, calibration
statistics and the timestep groups."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .calibration import ActivationStats
from .config import CompileConfig


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

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    def __post_init__(self) -> None:
        if not self.timestep_groups:
            self.timestep_groups = [TimestepGroup(0, 0, self.num_train_timesteps - 1)]
