"""Smoothing recipes: each computes a :class:`SmoothingPlan` (a scale ``s > 0``, and for HTG a shift ``z``,
per quantized input tensor and timestep group) from calibration statistics and weights. Folding the plan
(``FoldSmoothing``) and choosing parameters (``ChooseQuantParams``) are shared passes, so a recipe is a
short composition (:func:`recipe_passes`). Notation: ``X_t`` the tensor at calibrated timestep ``t``,
``W`` the weights of every layer reading it stacked by rows (q, k and v together: one joint vector),
``w_j = max_i |W_ij|``; all arithmetic in float64, scales clamped to ``[1e-4, 1e4]``.

* ``smoothquant`` (Xiao et al. 2023): ``s_j = max_t |X_t,j|^a / w_j^(1-a)``.
* ``ptq4dit`` (Wu et al., NeurIPS 2024): per timestep ``a_t,j = max |X_t,j|``; Spearman-guided salience
  calibration ``rho_t = spearman(a_t, w)``, ``tau = softmax(-rho)``, ``a_j = sum_t tau_t a_t,j``; channel-wise
  salience balancing ``s_j = sqrt(a_j / w_j)``; on qkv, attention out and fc1. Weights are then clipped by
  the quantile search (``ChooseQuantParams(weight_method="quantile")``).
* ``htg`` (HTG, 2025; the paper leaves ``s`` open, this is the public re-implementations' reading): per
  timestep shift ``z_t = (max_t + min_t)/2``, group shift ``z_g = mean_{t in g} z_t``; scale from an EMA over
  timesteps taken from ``t = T`` down, ``m_t = 0.99 m_{t+1} + 0.01 max|X_t - z_g(t)|`` (``m`` starts at the
  first value), ``s = sqrt(m / w)``. The layer reads ``(X - z_g)/s``; shift and scale fold into the adaLN
  rows or V, so only biases differ per group while ``s`` is shared (``--smooth-scales per-group``: ``m``
  over the group's own timesteps).
* ``vidit`` (ViDiT-Q, ICLR 2025): ``act`` an EMA (momentum 0.9) of the per-step maxima ``max|X_t|`` in
  sampling order, kept per timestep group; ``s_j = act_j^a / w_j^(1-a)``.
* ``dilate`` (DilateQuant's weight dilation): ``s_k = max(1, min_i (max_j |W_ij|) / |W_ik|)``: the largest
  factor that scales input channel ``k``'s weights up without widening any output channel's range; the
  activation is divided by it. Depends on weights only, so it is the same for every group.

``--smooth-scales shared`` computes one scale from all groups' statistics (every group then keeps the same
folded weights); ``per-group`` computes each group's from its own timesteps.

The model family says what else the scales must satisfy (``ctx.family``; DiT says nothing):

* ``smoothing_companions``: the recipes name the roles of DiT's block (``RecipeSpec.roles_for``); a family adds
  its own roles to them (PixArt smooths the cross-attention inputs with qkv);
* ``smoothing_shared_by_blocks``: roles whose inputs, one per block, must share one vector (PixArt's adaLN-single
  modulation rows are read by every block). The recipe's formula then runs once on the pooled statistics
  (per channel and timestep, the max over the blocks' ranges) and the joint weight of every reader of every
  block (:meth:`ComputeSmoothing.smooth_joint`); HTG keeps a shift per block;
* ``smoothing_timestep_invariant``: roles whose input is the same at every timestep (PixArt's projected
  caption): one Smoothing for every group, from the statistics of all groups' timesteps pooled, whatever
  ``--smooth-scales`` says.
"""

from __future__ import annotations

import math

import torch

from ..calibration import TensorStats
from ..config import CompileConfig
from ..grouped import get_tensor
from ..pass_manager import GraphPass, PassResult
from ..qspec import SPEC_KEY
from .params import ChooseQuantParams
from .smoothing import FoldSmoothing, Smoothing, SmoothingPlan, clamp_scale


def smoothing_targets(gm, roles: tuple[str, ...]) -> dict[str, list]:
    """input key -> its reader nodes, for the tensors whose readers' role is one of ``roles``."""
    readers: dict[str, list] = {}
    for node in gm.graph.nodes:
        spec = node.meta.get(SPEC_KEY)
        if spec is not None and spec.role in roles:
            readers.setdefault(spec.input_key, []).append(node)
    return readers


def joint_weight(gm, readers) -> torch.Tensor:
    """The weights of every reader stacked by rows, ``[sum of outputs, channels]``, float64."""
    return torch.cat([get_tensor(gm, reader.args[1].target).detach().to(torch.float64) for reader in readers])


def _ordered(tensor_stats) -> list[int]:
    """Calibrated timesteps in sampling order (from T down)."""
    return sorted(tensor_stats.timesteps, reverse=True)


def _absmax(entry) -> torch.Tensor:
    return torch.maximum(entry.channel_min.abs(), entry.channel_max.abs()).to(torch.float64)


class ComputeSmoothing(GraphPass):
    """Base of the recipes' smoothing passes: runs :meth:`smooth` per target tensor and writes the plan.

    ``smooth(stats_per_branch, weight, shared)`` gets the tensor's statistics in each branch and the
    readers' stacked weights, and returns one :class:`Smoothing` per branch (the same object for every
    branch when the result is shared). Smoothing comes before anything that makes weights differ per
    group, so every branch holds the same weights here (checked)."""

    preserves_semantics = True  # computes vectors; folding them is the next pass
    recipe = ""

    def __init__(self, config: CompileConfig):
        self.config = config
        self.roles = config.recipe_spec.smoothed_roles
        self.alpha = config.effective_alpha
        self.shared = config.effective_scale_sharing == "shared"

    @property
    def name(self):  # noqa: D401 - a pass name per recipe, for the dumps
        return f"smoothing_{self.recipe}"

    def run(self, module, ctx):
        branches = module.graph_modules()
        roles = self.config.recipe_spec.roles_for(ctx.family)
        by_blocks, invariant = ctx.family.smoothing_shared_by_blocks, ctx.family.smoothing_timestep_invariant
        targets = smoothing_targets(branches[0], roles)
        role_of = {key: readers[0].meta[SPEC_KEY].role for key, readers in targets.items()}
        plan = SmoothingPlan(self.recipe, [{} for _ in branches])
        details = []
        computed: dict[str, list[Smoothing]] = {}
        for key, readers in targets.items():
            role = role_of[key]
            members = [k for k in targets if role_of[k] == role] if role in by_blocks else [key]
            if key not in computed:
                weights = [joint_weight(gm, [gm_node(gm, r) for m in members for r in targets[m]]) for gm in branches]
                if any(not torch.equal(w, weights[0]) for w in weights[1:]):
                    raise RuntimeError(f"{key}: smoothing expects the same weights in every group")
                if len(members) == 1 and role not in invariant:
                    stats = [branch.stats.get(key) for branch in ctx.branches]
                    computed[key] = self.smooth(stats, weights[0], self.shared)
                else:
                    computed.update(self._smooth_members(members, weights[0], ctx, pool_groups=role in invariant))
            results = computed[key]
            for index, smoothing in enumerate(results):
                plan.per_branch[index][key] = smoothing
            scale = results[0].scale
            details.append(f"{key}: s in [{float(scale.min()):.3g}, {float(scale.max()):.3g}]"
                           + (", with shift" if results[0].shift is not None else "")
                           + ("" if len({id(r) for r in results}) == 1 else " (per group)")
                           + (f" (one scale for the {len(members)} blocks' {role} inputs)" if len(members) > 1 else "")
                           + (" (pooled over every timestep group: the same at every timestep)"
                              if role in invariant else ""))
        ctx.smoothing_plan = plan
        mode = "shared by every group" if self.shared else "per timestep group"
        summary = (f"{self.recipe}: smoothing vectors for {len(targets)} tensors ({', '.join(roles)} inputs), "
                   f"scales {mode}")
        return PassResult(module, False, summary, details)

    def _smooth_members(self, members, weight, ctx, pool_groups: bool) -> dict[str, list[Smoothing]]:
        per_branch = {key: [branch.stats.get(key) for branch in ctx.branches] for key in members}
        if not pool_groups:
            return self.smooth_joint(per_branch, weight, self.shared)
        pooled = {key: [TensorStats.merged(key, parts)] for key, parts in per_branch.items()}  # disjoint timesteps
        return {key: results * len(ctx.branches) for key, results in self.smooth_joint(pooled, weight, True).items()}

    def smooth(self, stats, weight, shared) -> list[Smoothing]:
        raise NotImplementedError

    def smooth_joint(self, members: dict[str, list], weight, shared) -> dict[str, list[Smoothing]]:
        """One scale for several tensors (``members``: key -> its statistics per branch; ``weight``: every
        reader's of every member). By default :meth:`smooth` on the pooled statistics, and the very same
        Smoothing objects for every member (the folds then see one vector)."""
        count = len(next(iter(members.values())))
        merged = [TensorStats.merged("+".join(members), [parts[i] for parts in members.values()]) for i in range(count)]
        results = self.smooth(merged, weight, shared)
        return {key: results for key in members}

    # helpers ------------------------------------------------------------------------------------
    @staticmethod
    def pooled(stats) -> list:
        """The per-timestep entries of all branches (shared) as one list in sampling order."""
        entries = []
        for tensor_stats in stats:
            entries += [(t, tensor_stats.per_timestep[t]) for t in _ordered(tensor_stats)]
        return sorted(entries, key=lambda item: -item[0])

    def per_branch_or_shared(self, stats, shared, compute) -> list[Smoothing]:
        """``compute(list_of_TensorStats) -> Smoothing``, once over all branches or once per branch."""
        if shared:
            result = compute(stats)
            return [result] * len(stats)
        return [compute([s]) for s in stats]


def gm_node(gm, node):
    """The node of ``gm`` with ``node``'s name (branches are copies with the same node names)."""
    if node.graph is gm.graph:
        return node
    return next(n for n in gm.graph.nodes if n.name == node.name)


class SmoothQuantScales(ComputeSmoothing):
    recipe = "smoothquant"

    def smooth(self, stats, weight, shared):
        w = weight.abs().amax(dim=0)

        def compute(parts):
            x = torch.stack([_absmax(e) for _, e in self.pooled(parts)]).amax(dim=0)
            s = clamp_scale(x.pow(self.alpha) / w.pow(1 - self.alpha))
            return Smoothing(s, None, f"alpha {self.alpha}")
        return self.per_branch_or_shared(stats, shared, compute)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    value = spearmanr(a.numpy(), b.numpy()).statistic
    return 0.0 if value is None or not math.isfinite(float(value)) else float(value)


class PTQ4DiTScales(ComputeSmoothing):
    recipe = "ptq4dit"

    def smooth(self, stats, weight, shared):
        w = weight.abs().amax(dim=0)

        def compute(parts):
            salience = torch.stack([_absmax(e) for _, e in self.pooled(parts)])  # [timesteps, C]
            rho = torch.tensor([spearman(row, w) for row in salience], dtype=torch.float64)
            tau = torch.softmax(-rho, dim=0)
            a = (tau[:, None] * salience).sum(dim=0)
            s = clamp_scale(torch.sqrt(a / w))
            return Smoothing(s, None, f"spearman rho in [{float(rho.min()):.2f}, {float(rho.max()):.2f}]")
        return self.per_branch_or_shared(stats, shared, compute)


class HTGScales(ComputeSmoothing):
    recipe = "htg"
    DECAY = 0.99

    @staticmethod
    def group_shift(part) -> torch.Tensor:
        """z_g: mean over the group's timesteps of (max_t + min_t) / 2."""
        centres = [(e.channel_max.to(torch.float64) + e.channel_min.to(torch.float64)) / 2
                   for e in part.per_timestep.values()]
        return torch.stack(centres).mean(dim=0)

    def smooth_joint(self, members, weight, shared):
        """A shift per member (block) and group; one scale from the EMA of the per-timestep max over the members
        of ``max|X - z|``."""
        w = weight.abs().amax(dim=0)
        shifts = {key: [self.group_shift(part) for part in parts] for key, parts in members.items()}
        count = len(next(iter(members.values())))

        def ema_scale(indices):
            by_timestep: dict[int, torch.Tensor] = {}
            for key, parts in members.items():
                for i in indices:
                    z = shifts[key][i]
                    for t, entry in parts[i].per_timestep.items():
                        value = torch.maximum((entry.channel_min.to(torch.float64) - z).abs(),
                                              (entry.channel_max.to(torch.float64) - z).abs())
                        known = by_timestep.get(t)
                        by_timestep[t] = value if known is None else torch.maximum(known, value)
            m = None
            for t in sorted(by_timestep, reverse=True):
                m = by_timestep[t] if m is None else self.DECAY * m + (1 - self.DECAY) * by_timestep[t]
            return clamp_scale(torch.sqrt(m / w))

        scales = [ema_scale(range(count))] * count if shared else [ema_scale([i]) for i in range(count)]
        return {key: [Smoothing(s, z, f"shift |z| <= {float(z.abs().max()):.3g}") for s, z in zip(scales, shifts[key])]
                for key in members}

    def smooth(self, stats, weight, shared):
        return self.smooth_joint({"": stats}, weight, shared)[""]  # one member: its timesteps in sampling order


class ViDiTScales(ComputeSmoothing):
    recipe = "vidit"
    MOMENTUM = 0.9

    def smooth(self, stats, weight, shared):
        w = weight.abs().amax(dim=0)

        def compute(parts):
            act = None
            for _, entry in self.pooled(parts):  # sampling order: from T down
                value = _absmax(entry)
                act = value if act is None else self.MOMENTUM * act + (1 - self.MOMENTUM) * value
            s = clamp_scale(act.pow(self.alpha) / w.pow(1 - self.alpha))
            return Smoothing(s, None, f"alpha {self.alpha}")
        return self.per_branch_or_shared(stats, shared, compute)


class DilationScales(ComputeSmoothing):
    recipe = "dilate"

    def smooth(self, stats, weight, shared):  # from the weights alone: the same for every group
        s = dilation_scale(weight)
        return [Smoothing(s, None, f"{int((s > 1).sum())} of {s.numel()} channels dilated")] * len(stats)


def dilation_scale(weight: torch.Tensor) -> torch.Tensor:
    """``s_k = max(1, min_i max_j |W_ij| / |W_ik|)`` for ``W`` ``[out, in]``, float64."""
    magnitude = weight.abs()
    row_max = magnitude.amax(dim=1, keepdim=True)
    ratio = torch.where(magnitude > 0, row_max / magnitude, torch.full_like(magnitude, float("inf")))
    return clamp_scale(ratio.amin(dim=0).clamp_min(1.0))


SMOOTHING_PASSES = {"smoothquant": SmoothQuantScales, "ptq4dit": PTQ4DiTScales, "htg": HTGScales,
                    "vidit": ViDiTScales, "dilate": DilationScales}


def recipe_passes(config: CompileConfig) -> list[GraphPass]:
    """A recipe as passes: compute smoothing (if any), fold it, choose parameters."""
    from .mixed import MixedPrecision

    passes: list[GraphPass] = []
    if config.recipe in SMOOTHING_PASSES:
        passes += [SMOOTHING_PASSES[config.recipe](config), FoldSmoothing(config.unfoldable)]
    passes.append(ChooseQuantParams(config.recipe, config.effective_weight_clip))
    if config.keep_sensitive or config.budget_mb is not None:
        passes += [MixedPrecision(config.keep_sensitive, config.budget_mb),
                   ChooseQuantParams(config.recipe, config.effective_weight_clip, only_missing=True)]
    return passes
