"""Quantized layers outside the DiT blocks (a user's ``--layer 'proj_out_*=int8'``, the embedder's second call)
are reconstructed one layer at a time: their inputs captured on the float branch (``capture.py``) over every
calibration row of the group, the target the float layer's output on them.

* ``gptq``: the Hessian of those rows (summed over the groups that share the weight), as in a block;
* ``brecq`` / ``bkd``: AdaRound's loss on the layer's output, ``||Q(x) W_q^T - x W^T||^2 / ||x W^T||^2`` plus the
  rounding regularizer (the layer-wise objective of AdaRound, eq. 25 with float inputs), with the method's
  activation parameters.

They are done before the block walk, so the quantized stream through the part before the blocks already runs
them with their learned parameters.
"""

from __future__ import annotations

import time

import torch

from ...capture import capture_layer_inputs
from ...grouped import get_tensor
from ...memory import release_freed_memory
from ...qspec import PARAMS_KEY, SPEC_KEY
from .adaround import LossLabel, Problem, RowData, TrainSettings, evaluate, train_problem
from .blockwise import BlockReport
from .gptq import MAX_CAPTURE_ROWS, gptq_integers, hessian_add, output_error


def outside_layers(run) -> dict[tuple, list[tuple[int, torch.fx.Node]]]:
    """weight key -> (branch, node) of every quantized layer that is in no block."""
    found: dict[tuple, list] = {}
    for group, gm in enumerate(run.branches):
        in_block = {node for segment in run.segments[group] if segment.is_block for node in segment.nodes}
        for node in gm.graph.nodes:
            if SPEC_KEY in node.meta and PARAMS_KEY in node.meta and node.name not in in_block:
                key = run.registry.weight_key(group, get_tensor(gm, node.args[1].target))
                found.setdefault(key, []).append((group, node))
    return found


def _captured(run, layers) -> dict[int, dict[str, torch.Tensor]]:
    """group -> input key -> every calibration row's input of the outside layers."""
    keys = {node.meta[SPEC_KEY].input_key for sites in layers.values() for _, node in sites}
    inputs = run.ctx.check_inputs_by_group(per_group=None)
    return {group: capture_layer_inputs(gm, inputs.get(group, []), keys=keys, max_rows=MAX_CAPTURE_ROWS)
            for group, gm in enumerate(run.branches) if inputs.get(group)}


def reconstruct_outside(run, settings: TrainSettings | None, deadline: float | None) -> list[BlockReport]:
    """Layer-wise reconstruction of the quantized layers outside the DiT blocks (the adaLN of the final layer,
    the embedders with ``--quantize-embedders``). Under a time budget each of them is a unit like a block: it
    gets an equal share of the time left, so the blocks that follow keep theirs."""
    layers = {key: sites for key, sites in outside_layers(run).items() if not run.registry.plans[key].frozen_reason}
    if not layers:
        return []
    captured = _captured(run, layers)
    blocks = sum(segment.is_block for segment in run.segments[0])
    reports = []
    for done, (key, sites) in enumerate(layers.items()):
        start = time.perf_counter()
        share = None if deadline is None else \
            time.monotonic() + max(deadline - time.monotonic(), 0) / (len(layers) - done + blocks)
        sites = [(group, node) for group, node in sites if group in captured]
        if settings is None:
            reports.append(_gptq_layer(run, key, sites, captured, share, start))
        else:
            reports.append(_trained_layer(run, key, sites, captured, settings, share, start))
    del captured
    release_freed_memory()  # the captured rows, before the block walk
    return reports


def _rows(captured, group, node) -> torch.Tensor:
    return captured[group][node.meta[SPEC_KEY].input_key]


def _gptq_layer(run, key, sites, captured, deadline, start) -> BlockReport:
    plan = run.registry.plans[key]
    quantizer = run.registry.weight_for(*sites[0])
    hessian = None
    for group, node in sites:
        hessian = hessian_add(hessian, _rows(captured, group, node))
    scale = quantizer.scale0[:, None]
    before = output_error(plan.weight, quantizer.nearest * scale, hessian)
    if deadline is not None and time.monotonic() >= deadline:  # out of time: nearest rounding kept
        return BlockReport(plan.spec.layer, 1, before, before, 0, True, time.perf_counter() - start,
                           [(plan.spec.layer, before, before)])
    integers = gptq_integers(plan.weight, hessian, quantizer.scale0, quantizer.spec, quantizer.grid)
    after = before if integers is None else output_error(plan.weight, integers * scale, hessian)
    if after < before:
        quantizer.fixed = integers
    return BlockReport(plan.spec.layer, 1, before, min(before, after), 1, False, time.perf_counter() - start,
                       [(plan.spec.layer, before, min(before, after))])


def _trained_layer(run, key, sites, captured, settings, deadline, start) -> BlockReport:
    plan = run.registry.plans[key]
    modules, inputs, targets = {}, {}, {}
    for group, node in sites:
        modules[group] = run.registry.linear_for(group)(node)
        rows = _rows(captured, group, node)
        weight = get_tensor(run.branches[group], node.args[1].target)
        bias = get_tensor(run.branches[group], node.args[2].target) \
            if len(node.args) > 2 and node.args[2] is not None else None
        chunks = list(rows.tensor_split(max(run.chunks.get(group, 1), 1)))
        inputs[group] = chunks
        with torch.no_grad():
            targets[group] = [torch.nn.functional.linear(chunk, weight, bias) for chunk in chunks]
    problems = [Problem([g], {g: modules[g]}) for g in modules] if run.weights_per_group else \
        [Problem(list(modules), modules)]
    data = RowData(inputs, targets)
    nearest = evaluate(Problem(list(modules), modules), data)
    iterations, stopped = 0, False
    for problem in problems:
        outcome = train_problem(problem, data, settings, deadline, LossLabel(f"{run.method.name}: {plan.spec.layer}"),
                                run.generator)
        iterations, stopped = max(iterations, outcome.iterations), stopped or outcome.stopped_by_budget
    return BlockReport(plan.spec.layer, 1, nearest, evaluate(Problem(list(modules), modules), data), iterations,
                       stopped, time.perf_counter() - start)
