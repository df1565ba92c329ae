"""Split the graph into one branch per timestep group, right after grouping.

Every later pass runs on the branches (through :class:`BranchPass`), so any parameter may differ per
group: activation scales, smoothing shifts, folded weights. The branches start out sharing every tensor
object (see ``ditq_compiler/grouped.py``); what a later pass changes for one group becomes that group's
own, what it leaves or computes once stays shared and is stored once in the artifact. Each branch also
gets its own copy of the calibration statistics, restricted to its group's timesteps.
"""

from __future__ import annotations

from ..context import BranchState
from ..errors import PassPreconditionError
from ..grouped import split_into_branches
from ..pass_manager import GraphPass, PassResult


class SplitTimestepGroups(GraphPass):
    name = "split_groups"
    preserves_semantics = True  # every branch computes the graph it was copied from (checked per branch)

    def check_preconditions(self, gm, ctx):
        if hasattr(gm, "graph_modules"):
            raise PassPreconditionError(self.name, "the graph is already split into branches")
        if ctx.stats is None:
            raise PassPreconditionError(self.name, "no calibration statistics to hand to the branches")
        for group in ctx.timestep_groups:
            if not any(group.contains(t) for t in ctx.stats.timesteps):
                raise PassPreconditionError(
                    self.name, f"timestep group {group.start}..{group.end} holds no calibrated timestep; "
                               "raise --calib-steps or use fewer groups")

    def run(self, gm, ctx):
        module = split_into_branches(gm, ctx.timestep_groups, ctx.signature.index("timestep"))
        ctx.branches = [BranchState(g.index, g, ctx.stats.restricted_to(g.contains)) for g in ctx.timestep_groups]
        details = [f"branch {b.index}: timesteps {b.group.start}..{b.group.end}, calibrated at "
                   f"{sorted(set(b.stats.timesteps))}" for b in ctx.branches]
        count = len(ctx.branches)
        summary = (f"{count} branch{'es' if count > 1 else ''}, one per timestep group; every tensor shared "
                   f"until a pass gives a group its own")
        return PassResult(module, True, summary, details)
