"""Calibration statistics: per tensor, per timestep, per channel running min / max.

The timestep is an explicit key: an observer placed in the graph receives the ``timestep`` input next
to the activation and files every row of the batch under its own timestep, so statistics never depend
on call order. Only running reductions are kept (two vectors of channel width per tensor and timestep),
never activations, so memory stays bounded however long calibration runs.

Phases: *collect* (observers in the graph, see ``passes/calibrate.py``), then *compute* (recipes read
``range_over`` for the timesteps of a group).

After the graph is split into timestep-group branches, each branch holds its own copy of the statistics,
restricted to its group's timesteps (:meth:`ActivationStats.restricted_to`). A fold that makes a layer read
``(X - z) / s`` instead of ``X`` carries the statistics through exactly (:meth:`TensorStats.transform`):
for ``s > 0`` the per-channel min and max of ``(X - z)/s`` are ``(min - z)/s`` and ``(max - z)/s``, so no
recipe re-runs calibration and the next pass sees the ranges of the tensor it will quantize.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import CalibrationError


@dataclass
class TimestepStats:
    channel_min: torch.Tensor
    channel_max: torch.Tensor
    rows: int


@dataclass
class TensorStats:
    """Statistics of one quantized input tensor, keyed by timestep."""

    key: str
    consumers: list[str]
    per_timestep: dict[int, TimestepStats] = field(default_factory=dict)

    def update(self, x: torch.Tensor, timestep: torch.Tensor) -> None:
        x = x.detach().to(torch.float32)
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # [batch, tokens, channels]
        row_min, row_max = rows.amin(dim=1), rows.amax(dim=1)
        # a NaN anywhere makes its channel's min and max NaN, an inf makes one of them inf: checking the
        # extremes finds every non-finite value without another pass over the whole activation
        if not (torch.isfinite(row_min).all() and torch.isfinite(row_max).all()):
            raise CalibrationError(
                f"non-finite activation (NaN or inf) at the input of {', '.join(self.consumers)} "
                f"at timestep(s) {sorted(set(timestep.tolist()))}; check the checkpoint's weights"
            )
        for t in torch.unique(timestep).tolist():
            mask = timestep == t
            lo, hi = row_min[mask].amin(dim=0), row_max[mask].amax(dim=0)
            entry = self.per_timestep.get(int(t))
            if entry is None:
                self.per_timestep[int(t)] = TimestepStats(lo.clone(), hi.clone(), int(mask.sum()))
            else:
                torch.minimum(entry.channel_min, lo, out=entry.channel_min)
                torch.maximum(entry.channel_max, hi, out=entry.channel_max)
                entry.rows += int(mask.sum())

    @property
    def timesteps(self) -> list[int]:
        return sorted(self.per_timestep)

    @staticmethod
    def merged(key: str, parts: list["TensorStats"]) -> "TensorStats":
        """The statistics of several tensors read as one: per timestep, the per-channel min and max over
        ``parts`` (timesteps missing from a part are taken from the others)."""
        merged = TensorStats(key, [c for part in parts for c in part.consumers])
        for part in parts:
            for t, entry in part.per_timestep.items():
                known = merged.per_timestep.get(t)
                merged.per_timestep[t] = TimestepStats(entry.channel_min.clone(), entry.channel_max.clone(),
                                                       entry.rows) if known is None else \
                    TimestepStats(torch.minimum(known.channel_min, entry.channel_min),
                                  torch.maximum(known.channel_max, entry.channel_max), known.rows + entry.rows)
        return merged

    def transform(self, scale: torch.Tensor, shift: torch.Tensor | None) -> None:
        """The statistics of ``(X - shift) / scale`` (``scale > 0`` per channel), from those of ``X``."""
        if not bool((scale > 0).all()):
            raise ValueError(f"{self.key}: smoothing scales must be positive")
        s = scale.to(torch.float64)
        z = shift.to(torch.float64) if shift is not None else torch.zeros_like(s)
        for entry in self.per_timestep.values():
            entry.channel_min = ((entry.channel_min.to(torch.float64) - z) / s).to(torch.float32)
            entry.channel_max = ((entry.channel_max.to(torch.float64) - z) / s).to(torch.float32)

    def absmax_per_timestep(self, timesteps: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
        """``[len(timesteps), channels]``: max |X_j| at each calibrated timestep (all when None)."""
        chosen = self.timesteps if timesteps is None else [t for t in timesteps if t in self.per_timestep]
        rows = [torch.maximum(self.per_timestep[t].channel_min.abs(), self.per_timestep[t].channel_max.abs())
                for t in chosen]
        return chosen, torch.stack(rows)

    def range_over(self, timesteps: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (min, max) over the given timesteps (all when None)."""
        chosen = self.timesteps if timesteps is None else [t for t in timesteps if t in self.per_timestep]
        if not chosen:
            raise CalibrationError(f"no calibration statistics for {self.key} at the requested timesteps")
        lo = torch.stack([self.per_timestep[t].channel_min for t in chosen]).amin(dim=0)
        hi = torch.stack([self.per_timestep[t].channel_max for t in chosen]).amax(dim=0)
        return lo, hi


@dataclass
class ActivationStats:
    tensors: dict[str, TensorStats] = field(default_factory=dict)
    # Trajectory description, recorded in the manifest (sampling order, with repeats across samples).
    timesteps: list[int] = field(default_factory=list)

    def get(self, key: str) -> TensorStats:
        if key not in self.tensors:
            raise CalibrationError(f"no calibration statistics recorded for tensor {key}")
        return self.tensors[key]

    def restricted_to(self, keep) -> "ActivationStats":
        """A deep copy holding only the timesteps for which ``keep(t)`` is true."""
        copy = ActivationStats(timesteps=[t for t in self.timesteps if keep(t)])
        for key, tensor in self.tensors.items():
            entries = {t: TimestepStats(e.channel_min.clone(), e.channel_max.clone(), e.rows)
                       for t, e in tensor.per_timestep.items() if keep(t)}
            copy.tensors[key] = TensorStats(key, list(tensor.consumers), entries)
        return copy

    @staticmethod
    def union(parts: list["ActivationStats"]) -> "ActivationStats":
        """Statistics of several branches side by side (their timesteps are disjoint)."""
        merged = ActivationStats(timesteps=[t for part in parts for t in part.timesteps])
        for part in parts:
            for key, tensor in part.tensors.items():
                target = merged.tensors.setdefault(key, TensorStats(key, list(tensor.consumers)))
                target.per_timestep.update(tensor.per_timestep)
        return merged


class ActivationObserver(torch.nn.Module):
    """Identity on ``x``; records ``x``'s statistics under each row's timestep."""

    def __init__(self, stats: TensorStats):
        super().__init__()
        self.stats = stats

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.stats.update(x, timestep)
        return x
