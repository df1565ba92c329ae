"""The compile IR after timestep grouping: one fx graph per timestep group, sharing their tensors.

Group ``g`` serves timesteps ``start_g..end_g``; the groups tile ``[0, T-1]``. Right after grouping, the
graph is split into one branch per group (:func:`split_into_branches`). Every branch is its own
``GraphModule`` (its own nodes, so parameters written on nodes are per group) but the branches start
out holding the *same tensor objects*. A pass that changes a tensor for some groups gives those branches
a new object with :func:`set_tensor`; a pass that computes one value for every group assigns that one
object to every branch. Sharing is therefore decided by the passes and recorded in the branches
themselves; :meth:`TimestepGroupedModule.tensor_sharing` reads it back for the exporter, which stores a
shared tensor once and a per-group tensor once per group.

At run time a row's group is the number of group ends below its timestep. Rows of one batch may fall in
different groups: each group's branch runs on its own rows and the results are put back in place, so a
mixed batch is as correct as a split one. A timestep outside ``[0, T-1]`` belongs to no group: the torch
module raises, and the exported graph leaves that row's output NaN (``Artifact.denoise`` raises before).
With one group the module is its single branch, called directly (the exported graph has no ``If``).
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import fx

from .errors import TimestepError


class TimestepGroupedModule(torch.nn.Module):
    def __init__(self, branches: list[fx.GraphModule], groups, timestep_index: int):
        """``timestep_index``: the position of the timestep among the inputs (the family signature's)."""
        super().__init__()
        if len(branches) != len(groups):
            raise ValueError("one branch per timestep group")
        self.branches = torch.nn.ModuleList(branches)
        self.groups = list(groups)
        self.timestep_index = timestep_index
        self.register_buffer("group_ends", torch.tensor([g.end for g in self.groups]), persistent=False)

    def graph_modules(self) -> list[fx.GraphModule]:
        return list(self.branches)

    def group_of(self, timestep: torch.Tensor) -> torch.Tensor:
        first, last = self.groups[0].start, self.groups[-1].end
        bad = (timestep < first) | (timestep > last)
        if bool(bad.any()):
            raise TimestepError(f"timestep {timestep[bad][0].item():g} is outside the scheduler's range "
                                f"[{first:g}, {last:g}]")
        return torch.searchsorted(self.group_ends.to(timestep.dtype), timestep.contiguous())

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(self.branches) == 1:
            return self.branches[0](*inputs)
        group = self.group_of(inputs[self.timestep_index])
        out = None
        for index, branch in enumerate(self.branches):
            rows = (group == index).nonzero().flatten()
            if rows.numel() == 0:
                continue
            part = branch(*(value[rows] for value in inputs))
            if out is None:
                out = part.new_full((inputs[0].shape[0], *part.shape[1:]), float("nan"))
            out[rows] = part
        return out

    def tensor_sharing(self) -> dict[str, bool]:
        """For every tensor a branch reads (``get_attr`` target): True when every branch holds the same
        object, False when some group has its own."""
        targets = dict.fromkeys(n.target for b in self.branches for n in b.graph.nodes if n.op == "get_attr")
        sharing = {}
        for target in targets:
            tensors = [get_tensor(branch, target) for branch in self.branches]
            sharing[target] = all(t is tensors[0] for t in tensors[1:])
        return sharing

    @property
    def code(self) -> str:
        return "\n".join(f"# branch {g.index}: timesteps {g.start}..{g.end}\n{b.code}"
                         for g, b in zip(self.groups, self.branches))


def split_into_branches(gm: fx.GraphModule, groups, timestep_index: int) -> TimestepGroupedModule:
    """One copy of ``gm`` per group. The copies have their own modules and nodes (node metadata is
    copied) but hold the very same parameter and buffer objects as ``gm``. ``timestep_index``: the timestep's
    position among the inputs."""
    shared = {id(t): t for t in [*gm.parameters(), *gm.buffers()]}
    branches = []
    for _ in groups:
        memo = dict(shared)
        branches.append(copy.deepcopy(gm, memo))
    return TimestepGroupedModule(branches, groups, timestep_index)


def branches_of(module) -> list[fx.GraphModule]:
    """The fx graphs of a pipeline's module: its branches, or itself before the split."""
    return module.graph_modules() if hasattr(module, "graph_modules") else [module]


def get_tensor(gm: torch.nn.Module, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    return getattr(module, name)


def set_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Point ``target`` of this branch at ``value`` (other branches keep theirs). A parameter stays a
    parameter; pass the same ``value`` object to several branches to keep it shared."""
    owner, _, name = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    if name in module._parameters:
        if not isinstance(value, torch.nn.Parameter):
            raise TypeError(f"{target} is a parameter: wrap the new value once in a Parameter and share that")
        module._parameters[name] = value
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        raise KeyError(f"no tensor {target}")


def iter_get_attr(gm: fx.GraphModule) -> Iterator[fx.Node]:
    return (node for node in gm.graph.nodes if node.op == "get_attr")


class TensorMemo:
    """Compute a derived tensor once per distinct input, so that groups whose inputs are the same
    objects receive the same output object (and stay shared).

    ``memo(key_objects, compute)``: ``key_objects`` are the tensors (or other objects) the result depends
    on, compared by identity; ``compute()`` runs once per distinct combination.
    """

    def __init__(self):
        self._results: dict[tuple, object] = {}
        self._keep_alive: list = []  # identity keys stay valid while the memo lives

    def __call__(self, tag: str, key_objects: tuple, compute):
        key = (tag, *(id(obj) for obj in key_objects))
        if key not in self._results:
            self._results[key] = compute()
            self._keep_alive.append(key_objects)
        return self._results[key]
