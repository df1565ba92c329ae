"""Timestep grouping: which denoising timesteps share one set of quantization parameters.

``uniform`` splits the scheduler's range ``[0, T-1]`` into ``G`` equal ranges.

``htg`` (hierarchical timestep grouping, HTG 2025) clusters the calibrated timesteps bottom-up, merging
only neighbours in time. Each timestep ``t`` is described by, for every quantized input tensor, its
per-channel shift ``z_t = (max + min) / 2`` and range ``r_t = max - min``, each divided by that tensor's
overall range so that every tensor weighs alike. A group's descriptor is the mean of its members'; the
adjacent pair of groups whose means are closest (L2) merges, until ``G`` groups remain. Group boundaries
fall midway between the last calibrated timestep of one group and the first of the next, so every
timestep of the scheduler belongs to exactly one group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import GROUPINGS
from ..context import TimestepGroup
from ..errors import ConfigError, PassPreconditionError
from ..pass_manager import GraphPass, PassResult


def uniform_groups(count: int, num_train_timesteps: int) -> list[TimestepGroup]:
    edges = np.linspace(0, num_train_timesteps, count + 1).round().astype(int)
    return [TimestepGroup(i, int(edges[i]), int(edges[i + 1]) - 1) for i in range(count)]


@dataclass
class Merge:
    """One step of the bottom-up clustering, in scipy's linkage convention."""

    left: int
    right: int
    distance: float
    size: int


def htg_cluster(features: np.ndarray, count: int) -> tuple[list[list[int]], list[Merge]]:
    """Cluster rows of ``features`` (ordered by timestep) into ``count`` runs of neighbours.

    Returns the groups (lists of row indices, in order) and the merge history, which scipy's
    ``dendrogram`` can draw (cluster ids follow ``scipy.cluster.hierarchy.linkage``).
    """
    clusters = [[i] for i in range(len(features))]
    ids = list(range(len(features)))
    sums = [features[i].astype(np.float64) for i in range(len(features))]
    history: list[Merge] = []
    next_id = len(features)
    while len(clusters) > count:
        means = [s / len(c) for s, c in zip(sums, clusters)]
        gaps = [float(np.linalg.norm(means[i + 1] - means[i])) for i in range(len(clusters) - 1)]
        i = int(np.argmin(gaps))
        history.append(Merge(ids[i], ids[i + 1], gaps[i], len(clusters[i]) + len(clusters[i + 1])))
        clusters[i:i + 2] = [clusters[i] + clusters[i + 1]]
        sums[i:i + 2] = [sums[i] + sums[i + 1]]
        ids[i:i + 2] = [next_id]
        next_id += 1
    return clusters, history


def timestep_features(stats) -> tuple[list[int], np.ndarray]:
    """Rows: calibrated timesteps in increasing order; columns: normalized shift and range per channel."""
    timesteps = sorted(set(stats.timesteps))
    columns = []
    for tensor in stats.tensors.values():
        lo = torch.stack([tensor.per_timestep[t].channel_min for t in timesteps])
        hi = torch.stack([tensor.per_timestep[t].channel_max for t in timesteps])
        scale = float((hi.amax() - lo.amin()).clamp_min(1e-12))
        columns += [((hi + lo) / 2 / scale).double().numpy(), ((hi - lo) / scale).double().numpy()]
    return timesteps, np.concatenate(columns, axis=1)


def groups_from_clusters(timesteps: list[int], clusters: list[list[int]], num_train_timesteps: int) -> list[TimestepGroup]:
    groups = []
    start = 0
    for index, members in enumerate(clusters):
        if index == len(clusters) - 1:
            end = num_train_timesteps - 1
        else:
            last, first_next = timesteps[members[-1]], timesteps[clusters[index + 1][0]]
            end = (last + first_next) // 2
        groups.append(TimestepGroup(index, start, end))
        start = end + 1
    return groups


class GroupTimesteps(GraphPass):
    """Sets ``ctx.timestep_groups``; the graph is untouched (recipes and branch instantiation read it)."""

    name = "group_timesteps"
    preserves_semantics = True

    def __init__(self, count: int, method: str):
        if method not in GROUPINGS:
            raise ConfigError(f"unknown grouping {method!r}; choose one of {', '.join(GROUPINGS)}")
        if count < 1:
            raise ConfigError(f"--groups must be at least 1, got {count}")
        self.count, self.method = count, method

    def check_preconditions(self, gm, ctx):
        if self.method == "htg" and ctx.stats is None:
            raise PassPreconditionError(self.name, "htg grouping needs calibration statistics; run calibration first")

    def run(self, gm, ctx):
        total = ctx.num_train_timesteps
        if self.count == 1:
            ctx.timestep_groups = [TimestepGroup(0, 0, total - 1)]
            return PassResult(gm, False, "one group: every timestep shares one set of parameters")
        if self.method == "uniform":
            ctx.timestep_groups = uniform_groups(self.count, total)
        else:
            timesteps, features = timestep_features(ctx.stats)
            if len(timesteps) < self.count:
                raise ConfigError(f"--groups {self.count} needs at least as many calibrated timesteps "
                                  f"(got {len(timesteps)}); raise --calib-steps")
            clusters, _ = htg_cluster(features, self.count)
            ctx.timestep_groups = groups_from_clusters(timesteps, clusters, total)
            # The whole tree (greedy merging: its first merges are the ones above), for the dendrogram.
            _, history = htg_cluster(features, 1)
            ctx.grouping_history = {"timesteps": timesteps, "merges": history}
        details = [f"group {g.index}: timesteps {g.start}..{g.end}" for g in ctx.timestep_groups]
        return PassResult(gm, False, f"{self.method}: {len(ctx.timestep_groups)} timestep groups "
                          f"({', '.join(f'{g.start}-{g.end}' for g in ctx.timestep_groups)})", details)
