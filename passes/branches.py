"""One quantized graph per timestep group, and the rule that sends each row of a batch to its group.

Group ``g`` serves timesteps ``start_g..end_g``; the groups tile ``[0, T-1]``. A row's group is the number
of group ends below its timestep. Rows of one batch may fall in different groups: each group's branch runs
on its own rows and the results are put back in place, so a mixed batch is as correct as a split one. A
timestep outside ``[0, T-1]`` belongs to no group: the torch module raises, and the exported graph leaves
that row's output NaN rather than silently using a wrong group (``Artifact.denoise`` raises before).
"""

from __future__ import annotations

import torch
from torch import fx

from ..errors import TimestepError


class TimestepGroupedModule(torch.nn.Module):
    def __init__(self, branches: list[fx.GraphModule], groups):
        super().__init__()
        self.branches = torch.nn.ModuleList(branches)
        self.groups = list(groups)
        self.register_buffer("group_ends", torch.tensor([g.end for g in self.groups], dtype=torch.int64),
                             persistent=False)

    def graph_modules(self) -> list[fx.GraphModule]:
        return list(self.branches)

    def group_of(self, timestep: torch.Tensor) -> torch.Tensor:
        bad = (timestep < 0) | (timestep > self.groups[-1].end)
        if bool(bad.any()):
            raise TimestepError(f"timestep {int(timestep[bad][0])} is outside the scheduler's range "
                                f"[0, {self.groups[-1].end}]")
        return torch.searchsorted(self.group_ends, timestep)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        group = self.group_of(timestep)
        out = None
        for index, branch in enumerate(self.branches):
            rows = (group == index).nonzero().flatten()
            if rows.numel() == 0:
                continue
            part = branch(sample[rows], timestep[rows], class_labels[rows])
            if out is None:
                out = part.new_full((sample.shape[0], *part.shape[1:]), float("nan"))
            out[rows] = part
        return out

    @property
    def code(self) -> str:
        return "\n".join(f"# branch {g.index}: timesteps {g.start}..{g.end}\n{b.code}"
                         for g, b in zip(self.groups, self.branches))
