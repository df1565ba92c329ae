"""Low-bit number grids: which values a quantized tensor may take, and exact rounding onto them.

A 4-bit grid here is sign-magnitude: 8 magnitudes ``0 = g_0 < g_1 < ... < g_7`` and their negatives. The
grids HQ-DiT chooses between per layer (all 4-bit: 1 sign bit, 3 bits of exponent and mantissa):

==========  =================================================  ==========
grid        magnitudes (in units of the scale)                 multiplier
==========  =================================================  ==========
``int4``    0 1 2 3 4 5 6 7 (E0M3; E1M2 has this same grid)     1
``e2m1``    0 0.5 1 1.5 2 3 4 6 (OCP FP4)                       2
``e3m0``    0 0.25 0.5 1 2 4 8 16                               4
==========  =================================================  ==========

Every magnitude times the grid's *multiplier* is an integer no larger than 64, so a value on any of these
grids is held exactly in int8 as ``g * multiplier``. That is how FP4 runs on ONNX Runtime's int8 kernels:
weights are stored as 4-bit codes and expanded at load to ``int8 = g * multiplier`` with a dequantize scale
of ``scale / multiplier``; activations are rounded onto the grid by elementwise ops and then quantized to
uint8 ``g * multiplier + 128`` with the same kind of scale, exactly.

Rounding onto a grid is round-to-nearest, ties to even, done the way both torch and ONNX compute it so the
two agree bit for bit: within a binade ``[t_k, t_{k+1})`` the grid is uniform with step ``d_k``, so with
``v = x / scale`` and ``d = d_k`` chosen by ``|v|``, the rounded value is ``clip(round(v / d) * d, -g_7, g_7)``
(``round`` is half-to-even in both). The top of each binade is a grid point, so this is the nearest grid
value; a tie goes to the point whose ``v / d`` is even.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    name: str
    magnitudes: tuple[float, ...]  # 8 values, g_0 = 0, increasing
    multiplier: int
    # binades: (threshold, step): step applies for |v| >= threshold (the first threshold is 0)
    binades: tuple[tuple[float, float], ...]

    @property
    def max(self) -> float:
        return self.magnitudes[-1]

    def values(self) -> torch.Tensor:
        """All 15 distinct values, increasing."""
        positive = torch.tensor(self.magnitudes, dtype=torch.float64)
        return torch.cat([-positive.flip(0)[:-1], positive])

    def lookup_table(self) -> torch.Tensor:
        """int8 value of each 4-bit sign-magnitude code (bit 3 = sign): ``code -> g * multiplier``."""
        magnitudes = [round(g * self.multiplier) for g in self.magnitudes]
        return torch.tensor(magnitudes + [-m for m in magnitudes], dtype=torch.int8)

    def codes(self, integers: torch.Tensor) -> torch.Tensor:
        """Sign-magnitude 4-bit codes (uint8 0..15) of int8 values ``g * multiplier``."""
        table = self.lookup_table().to(torch.int16)
        matches = integers.to(torch.int16)[..., None] == table
        if not bool(matches.any(dim=-1).all()):
            raise ValueError(f"values off the {self.name} grid")
        return matches.to(torch.uint8).argmax(dim=-1).to(torch.uint8)


def _binades(magnitudes: tuple[float, ...]) -> tuple[tuple[float, float], ...]:
    """Uniform runs of the grid: (start, step) for each run of equal gaps."""
    gaps = [b - a for a, b in zip(magnitudes, magnitudes[1:])]
    runs = [(0.0, gaps[0])]
    for start, gap in zip(magnitudes[1:], gaps[1:]):
        if gap != runs[-1][1]:
            runs.append((start, gap))
    return tuple(runs)


def _grid(name: str, magnitudes: tuple[float, ...], multiplier: int) -> Grid:
    return Grid(name, magnitudes, multiplier, _binades(magnitudes))


GRIDS: dict[str, Grid] = {g.name: g for g in (
    _grid("int4", (0, 1, 2, 3, 4, 5, 6, 7), 1),
    _grid("e2m1", (0, 0.5, 1, 1.5, 2, 3, 4, 6), 2),
    _grid("e3m0", (0, 0.25, 0.5, 1, 2, 4, 8, 16), 4),
)}


def round_to_grid(x: torch.Tensor, scale: torch.Tensor | float, grid: Grid) -> torch.Tensor:
    """``x`` rounded onto ``scale * grid`` (float32, exactly as the ONNX translation computes it):
    ``v = x / scale``; ``d`` = the step of ``|v|``'s binade; ``clip(round(v / d) * d, -max, max) * scale``."""
    x = x.to(torch.float32)
    scale = torch.as_tensor(scale, dtype=torch.float32)
    v = x / scale
    magnitude = v.abs()
    step = torch.full_like(v, grid.binades[0][1])
    for threshold, binade_step in grid.binades[1:]:
        step = torch.where(magnitude >= threshold, torch.tensor(binade_step, dtype=torch.float32), step)
    q = torch.clamp(torch.round(v / step) * step, -grid.max, grid.max)
    return q * scale


def grid_integers(x: torch.Tensor, scale: torch.Tensor, grid: Grid, axis: int = 0) -> torch.Tensor:
    """int8 ``g * multiplier`` of ``x`` rounded onto the grid; ``scale`` per tensor or per slice of ``axis``."""
    if scale.dim() == 1:
        shape = [1] * x.dim()
        shape[axis] = scale.numel()
        scale = scale.reshape(shape)
    v = round_to_grid(x, scale, grid) / scale
    return torch.round(v * grid.multiplier).to(torch.int8)


# FP8 E4M3 (OCP, "fn": no infinities): the largest finite value. torch's cast and ONNX QuantizeLinear with
# saturate=1 agree bit for bit after clamping to it (round to nearest even; checked on every tie).
FLOAT8_E4M3_MAX = 448.0


def quantize_float8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x.to(torch.float32) / scale, -FLOAT8_E4M3_MAX, FLOAT8_E4M3_MAX).to(torch.float8_e4m3fn)
