"""BRECQ's block reconstruction (Li et al. 2021, "BRECQ: Pushing the Limit of Post-Training Quantization by
Block Reconstruction"): AdaRound's learned rounding (Nagel et al. 2020, "Up or Down? Adaptive Rounding for
Post-Training Quantization") and LSQ's learned activation step sizes (Esser et al. 2020), trained per DiT block
against the float block's output on cached block inputs. PTQ4DiT runs it; its ablation (W4A8 FID 9.17 with it,
108 without) is why it is here.

Per block, with ``f`` the float block on float inputs and ``f_q`` the fake-quant block on the inputs from the
model quantized so far (``fakequant.py``, soft rounding), the minibatch loss is::

    L = ||f_q(x_q) - f(x)||^2 / ||f(x)||^2  +  lambda * mean_i (1 - |2 h(V_i) - 1|^beta)

``beta`` is annealed from 20 to 2 after a warm-up of 20% of the iterations without the regularizer (AdaRound's
schedule), ``lambda = 0.01 x`` the nearest-rounding loss of the block, so the regularizer is on the scale of
what is being reconstructed. Adam; ``V`` at lr 1e-2, log step sizes at 1e-3, zero points at 1e-2. The hard
rounding (``h >= 1/2``) is evaluated on every row of the block at a few points and at the end; the best
parameters so far (nearest rounding included, so a block never gets worse on its rows) are kept. A time budget
stops the loop between iterations, and the best so far is kept.

Which parameters a method learns is its :class:`MethodSpec` (``BRECQ`` here, ``BKD`` in ``bkd.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ...progress import track
from .blockwise import BlockReport, MethodSpec, Problem
from .fakequant import ActivationQuantizer, WeightQuantizer, annealed_beta, relative_squared_error, set_mode

BRECQ = MethodSpec(
    "brecq", "BRECQ (Li et al. 2021): AdaRound rounding + LSQ activation step sizes, block by block",
    learn_rounding=True, activation_scales="shared", blockwise_training=True)


@dataclass(frozen=True)
class TrainSettings:
    iterations: int
    warmup: float = 0.2
    regularizer: float = 0.01  # lambda, relative to the block's nearest-rounding loss
    rounding_lr: float = 1e-2
    scale_lr: float = 1e-3
    zero_point_lr: float = 1e-2
    evaluations: int = 4  # hard-rounding evaluations on all rows during the loop (plus the final one)


class LossLabel:
    """A progress description whose text follows the loss: ``track`` formats its description each time it
    prints (plain lines) or refreshes (rich), so the bar shows the current loss."""

    def __init__(self, text: str):
        self.text, self.loss = text, None

    def __str__(self) -> str:
        return self.text if self.loss is None else f"{self.text}, loss {self.loss:.3g}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


@dataclass
class TrainOutcome:
    nearest: float  # relative L2 on the problem's rows, nearest rounding
    best: float
    iterations: int
    stopped_by_budget: bool


def _unique(parameters) -> list[torch.nn.Parameter]:
    seen, kept = set(), []
    for parameter in parameters:
        if parameter is not None and id(parameter) not in seen:
            seen.add(id(parameter))
            kept.append(parameter)
    return kept


def trainable_parts(problem: Problem) -> tuple[list[WeightQuantizer], list, list, list]:
    """(rounding quantizers, rounding variables, log scales, zero-point shifts) the problem trains."""
    quantizers, activations = [], []
    for module in problem.modules.values():
        for sub in module.modules():
            if isinstance(sub, WeightQuantizer) and sub.trainable and sub not in quantizers:
                quantizers.append(sub)
            elif isinstance(sub, ActivationQuantizer) and sub not in activations:
                activations.append(sub)
    rounding = _unique(q.rounding for q in quantizers)
    scales = _unique([q.log_scale for q in quantizers] + [a.log_scale for a in activations])
    zeros = _unique(a.zero_shift for a in activations)
    return [q for q in quantizers if q.rounding is not None], rounding, scales, zeros


class BlockData:
    """A block's minibatches: its inputs from the model quantized so far, the float block's outputs."""

    def __init__(self, run, index: int):
        self.run, self.index = run, index

    def chunks(self, group: int) -> int:
        return self.run.chunks[group]

    def batch(self, group: int, chunk: int) -> tuple[list, list]:
        segment = self.run.segments[group][self.index]
        return self.run.read_inputs("q", group, segment, chunk), self.run.read_targets(group, segment, chunk)


class RowData:
    """A layer's minibatches held in memory: ``inputs[group][chunk]`` rows and their float outputs."""

    def __init__(self, inputs: dict[int, list[torch.Tensor]], targets: dict[int, list[torch.Tensor]]):
        self.inputs, self.targets = inputs, targets

    def chunks(self, group: int) -> int:
        return len(self.inputs.get(group, []))

    def batch(self, group: int, chunk: int) -> tuple[list, list]:
        return [self.inputs[group][chunk]], [self.targets[group][chunk]]


def _outputs(value) -> tuple:
    return value if isinstance(value, (tuple, list)) else (value,)


def evaluate(problem: Problem, data) -> float:
    """Relative L2 of the outputs with hard rounding, over every row of the problem's groups."""
    error = norm = 0.0
    for group in problem.groups:
        module = problem.modules[group]
        set_mode(module.modules(), "hard")
        with torch.no_grad():
            for chunk in range(data.chunks(group)):
                inputs, targets = data.batch(group, chunk)
                e, n = relative_squared_error(_outputs(module(*inputs)), targets)
                error, norm = error + float(e), norm + float(n)
    return (error / max(norm, 1e-30)) ** 0.5


def train_problem(problem: Problem, data, settings: TrainSettings, deadline: float | None, label: LossLabel,
                  generator: torch.Generator, nearest: float | None = None) -> TrainOutcome:
    """Train ``problem``; ``nearest``: its error at nearest rounding when the caller measured it already."""
    quantizers, rounding, scales, zeros = trainable_parts(problem)
    parameters = rounding + scales + zeros
    if nearest is None:
        nearest = evaluate(problem, data)  # every parameter at its start: exactly nearest rounding
    if not parameters or settings.iterations == 0 or nearest == 0.0:
        return TrainOutcome(nearest, nearest, 0, False)
    best, best_state = nearest, [p.detach().clone() for p in parameters]
    groups = [{"params": rounding, "lr": settings.rounding_lr}, {"params": scales, "lr": settings.scale_lr},
              {"params": zeros, "lr": settings.zero_point_lr}]
    optimizer = torch.optim.Adam([g for g in groups if g["params"]])
    weight_total = sum(q.rounding.numel() for q in quantizers)
    strength = settings.regularizer * nearest ** 2
    batches = [(group, chunk) for group in problem.groups for chunk in range(data.chunks(group))]
    checkpoints = {round(settings.iterations * (k + 1) / settings.evaluations) for k in range(settings.evaluations)}
    order: list[int] = []
    done, stopped = 0, False
    for step in track(range(settings.iterations), total=settings.iterations, description=label):
        if deadline is not None and time.monotonic() > deadline:
            stopped = True
            break
        if not order:
            order = torch.randperm(len(batches), generator=generator).tolist()
        group, chunk = batches[order.pop()]
        module = problem.modules[group]
        set_mode(module.modules(), "soft")
        inputs, targets = data.batch(group, chunk)
        error, norm = relative_squared_error(_outputs(module(*inputs)), targets)
        reconstruction = error / norm.clamp_min(1e-30)
        loss = reconstruction
        beta = annealed_beta(step, settings.iterations, settings.warmup)
        if beta is not None and quantizers:
            regularizer = sum(q.regularizer(beta) * q.rounding.numel() for q in quantizers) / weight_total
            loss = loss + strength * regularizer
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        label.loss = float(reconstruction.detach())
        if done in checkpoints:
            best, best_state = _keep_best(problem, data, parameters, best, best_state)
    if stopped or done not in checkpoints:
        best, best_state = _keep_best(problem, data, parameters, best, best_state)
    with torch.no_grad():
        for parameter, value in zip(parameters, best_state):
            parameter.copy_(value)
            parameter.requires_grad_(False)
    for module in problem.modules.values():
        set_mode(module.modules(), "hard")
    return TrainOutcome(nearest, best, done, stopped)


def _keep_best(problem, data, parameters, best, best_state):
    error = evaluate(problem, data)
    if error < best:
        return error, [p.detach().clone() for p in parameters]
    return best, best_state


def reconstruct_block_trained(run, index: int, deadline: float | None, settings: TrainSettings) -> BlockReport:
    """Train every problem of block ``index`` (one, or one per group) and report its output error."""
    segment = run.segments[0][index]
    start = time.perf_counter()
    nearest = run.block_error(index, "hard")
    iterations, stopped = 0, False
    problems = run.problems(index)
    if not problems:  # no group has calibration rows for this block: nearest rounding kept
        return BlockReport(segment.name, len(segment.layers), nearest, nearest, 0, False, time.perf_counter() - start)
    for number, problem in enumerate(problems):
        share = None if deadline is None else \
            time.monotonic() + max(deadline - time.monotonic(), 0) / (len(problems) - number)
        groups = "" if len(problems) == 1 else f", group {problem.groups[0]}"
        label = LossLabel(f"{run.method.name}: {segment.name}{groups}")
        # one problem over every group: its rows are the block's, so the block error measured above is its start
        outcome = train_problem(problem, BlockData(run, index), settings, share, label, run.generator,
                                nearest if len(problems) == 1 else None)
        iterations = max(iterations, outcome.iterations)
        stopped |= outcome.stopped_by_budget
    error = outcome.best if len(problems) == 1 else run.block_error(index, "hard")
    return BlockReport(segment.name, len(segment.layers), nearest, error, iterations, stopped,
                       time.perf_counter() - start)
