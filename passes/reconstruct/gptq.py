"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): error-compensating rounding, one input column at a time, onto the format's own grid.

For a linear ``y = x W^T`` whose inputs on the calibration rows are ``X`` (``[n, in]``), the output error of a
quantized ``Q`` is ``tr((W - Q) H (W - Q)^T)`` with the Hessian ``H = X^T X``. GPTQ quantizes column ``j``, then
spreads its error over the columns not yet quantized so that this error stays minimal (Optimal Brain Surgeon's
update, restricted to the remaining columns)::

    H <- H + lambda I,  lambda = 1% of mean(diag H)        (dampening; an input never active gets H_jj = 1)
    U = chol(H^-1)^T   (upper: row j of U is the inverse Hessian of columns j.. after j-1 columns are fixed)
    for j in 0..in-1:  q_j = round_grid(w_j),  e_j = (w_j - q_j) / U_jj,  w_{j..} -= e_j U_{j, j..}

with the updates to later columns applied lazily, ``block`` columns at a time (``W[:, i2:] -= E U[i1:i2, i2:]``),
which is the same arithmetic. ``round_grid`` is :func:`quantizers.quantize_weight` on one column with the
weight's own per-channel scales from ChooseQuantParams, so int4, int8 and FP4 grids are rounded exactly as
they are exported. The Hessian comes from the layer's inputs captured (``capture.py``) in its block, run on the
block's inputs from the model quantized so far; with several timestep groups it sums every group's rows that
share the weight (``pooled``, one weight stored once) or is each group's own (``per-group``).
"""

from __future__ import annotations

import torch

from ...capture import capture_layer_inputs
from ...grids import GRIDS
from ...qspec import SPEC_KEY
from ...quantizers import quantize_weight

DAMPING = 0.01
COLUMN_BLOCK = 128
MAX_CAPTURE_ROWS = 1 << 40  # everything a chunk holds: the chunk bounds the memory


def hessian_add(hessian: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """``H + X^T X`` in float64 (``rows``: ``[n, in]``)."""
    x = rows.to(torch.float64)
    update = x.T @ x
    return update if hessian is None else hessian + update


def grid_column(column: torch.Tensor, scale: torch.Tensor, spec, grid: str | None) -> torch.Tensor:
    """The grid values (units of the scale) of one column rounded as the exporter rounds it."""
    stored = quantize_weight(column.to(torch.float32)[:, None], scale, spec, grid)[:, 0].to(torch.float64)
    return stored / GRIDS[grid].multiplier if spec.dtype == "fp4" else stored


def _inverse_cholesky(hessian: torch.Tensor) -> torch.Tensor | None:
    """``U`` with ``U^T U = H^-1`` (upper triangular), raising the dampening until ``H`` is positive definite."""
    damping = DAMPING * float(torch.diagonal(hessian).mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex(hessian + damping * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        damping *= 10
    return None


def gptq_integers(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, spec, grid: str | None,
                  *, column_block: int = COLUMN_BLOCK) -> torch.Tensor | None:
    """GPTQ's grid values ``[out, in]`` (float32, units of ``scale``), or None when ``H`` cannot be inverted."""
    w = weight.detach().to(torch.float64).clone()
    h = hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    upper = _inverse_cholesky(h)
    if upper is None:
        return None
    s = scale.to(torch.float64)[:, None]
    columns = w.shape[1]
    integers = torch.zeros_like(w)
    for i1 in range(0, columns, column_block):
        i2 = min(i1 + column_block, columns)
        block = w[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        u = upper[i1:i2, i1:i2]
        for j in range(i2 - i1):
            column = block[:, j]
            q = grid_column(column, scale, spec, grid)
            integers[:, i1 + j] = q
            error = (column - q * s[:, 0]) / u[j, j]
            block[:, j:] -= error[:, None] * u[j, j:][None, :]
            errors[:, j] = error
        w[:, i2:] -= errors @ upper[i1:i2, i2:]
    return integers.to(torch.float32)


def output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative L2 error of the layer's output on the captured rows: ``sqrt(tr(D H D^T) / tr(W H W^T))``."""
    w = weight.detach().to(torch.float64)
    d = w - dequantized.to(torch.float64)
    return (float(((d @ hessian) * d).sum()) / max(float(((w @ hessian) * w).sum()), 1e-30)) ** 0.5


def block_hessians(run, index: int) -> dict[tuple, torch.Tensor]:
    """weight key -> ``X^T X`` of the layer's inputs in block ``index``, run (in float) on the block's inputs
    from the model quantized so far, summed over the groups that share the weight."""
    registry = run.registry
    hessians: dict[tuple, torch.Tensor] = {}
    for group, count in run.chunks.items():
        segment = run.segments[group][index]
        module = run.float_module(group, index)
        readers = [node for node in module.graph.nodes if SPEC_KEY in node.meta]
        keys = {node.meta[SPEC_KEY].input_key for node in readers}
        weight_keys = {node.name: registry.weight_key(group, _weight_of(module, node)) for node in readers}
        for chunk in range(count):
            captured = capture_layer_inputs(module, [tuple(run.read_inputs("q", group, segment, chunk))], keys=keys,
                                            max_rows=MAX_CAPTURE_ROWS)
            for node in readers:
                key = weight_keys[node.name]
                hessians[key] = hessian_add(hessians.get(key), captured[node.meta[SPEC_KEY].input_key])
    return hessians


def _weight_of(module, node) -> torch.Tensor:
    from ...grouped import get_tensor

    return get_tensor(module, node.args[1].target)


def reconstruct_block_gptq(run, index: int, deadline: float | None):
    """GPTQ for every learnable weight of block ``index``; a layer keeps nearest rounding where GPTQ's output
    error on the captured rows is not lower (or its Hessian cannot be inverted)."""
    import time

    from ...progress import track
    from .blockwise import BlockReport

    start = time.perf_counter()
    segment = run.segments[0][index]
    nearest = run.block_error(index, "hard")  # builds the block's quantizers, all at nearest rounding
    hessians = block_hessians(run, index)
    layer_errors, notes, stopped = [], [], False
    for key in track(list(hessians), total=len(hessians), description=f"gptq: {segment.name}"):
        plan = run.registry.plans[key]
        if plan.frozen_reason:
            continue
        if deadline is not None and time.monotonic() > deadline:
            stopped = True
            break
        quantizer = run.registry.weights[key]
        integers = gptq_integers(plan.weight, hessians[key], quantizer.scale0, quantizer.spec, quantizer.grid)
        scale = quantizer.scale0[:, None]
        before = output_error(plan.weight, quantizer.nearest * scale, hessians[key])
        if integers is None:
            notes.append(f"{plan.spec.layer}: the Hessian is not positive definite even dampened; nearest rounding")
            continue
        after = output_error(plan.weight, integers * scale, hessians[key])
        if after < before:
            quantizer.fixed = integers
        layer_errors.append((plan.spec.layer, before, min(before, after)))
    return BlockReport(segment.name, len(segment.layers), nearest, run.block_error(index, "hard"),
                       1 if layer_errors else 0, stopped, time.perf_counter() - start, layer_errors, notes)
