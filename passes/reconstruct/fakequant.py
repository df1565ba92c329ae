"""A trainable fake-quant form of an fx segment: the quantization arithmetic of ``quantizers.py`` with autograd.

ditq's ``ditq::quantize`` / ``ditq::dequantize`` ops have no autograd. The modules here compute exactly the same
values in the forward pass (the same float32 operations in the same order; ``tests/test_reconstruct.py`` checks
them bit for bit against ``quantizers.py``) and let gradients through:

* rounding is straight-through (``round_ste``: forward ``torch.round``, backward the identity; Bengio et al.
  2013), so an activation step size ``s`` gets LSQ's gradient ``round(x/s) - x/s`` inside the range and
  ``qmin - z`` / ``qmax - z`` at the clip (Esser et al. 2020, "Learned Step Size Quantization");
* a weight is ``W_dq = s * q`` with ``q`` on the format's grid (integers ``qmin..qmax``, or an FP4 grid's 15
  values, ``grids.py``), in one of three modes:

  - ``nearest``: the exported arithmetic itself (``quantizers.fake_quantize_weight``);
  - ``soft`` (AdaRound, Nagel et al. 2020): ``q = lo + h(V) (up - lo)`` where ``lo <= W/s0 <= up`` are the
    neighbouring grid values and ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, ``zeta = 1.1``,
    ``gamma = -0.1`` (the rectified sigmoid); ``V`` starts where ``h(V)`` is the fractional position
    ``(W/s0 - lo)/(up - lo)``;
  - ``hard``: ``q = up`` where ``h(V) >= 1/2``, else ``lo``: the integers that materialization stores.

  ``V`` starts so that ``hard`` equals ``nearest`` exactly (ties included). A learned per-channel scale is
  ``s = s0 exp(u)`` with ``u = 0`` at the start, so the initial forward is the exported one bit for bit.
* an activation quantizer is ``QuantizeLinear``/``DequantizeLinear`` with ``s = s0 exp(u)`` (a per-tensor
  ``u``, shared by every timestep group for BRECQ, one per group for BKD) and, for affine grids when asked,
  a zero point ``z = z0 + round(dz)`` (LSQ+, Bhalgat et al. 2020). FP4 activations are first rounded onto
  ``s * grid`` (``grids.round_to_grid``), then quantized exactly with ``s / multiplier`` and zero point 128.
* a linear is ``matmul(x_dq, W_dq^T) + b`` as Q/DQ insertion writes it; an int32 bias (QGemm) is
  ``round(b / (s_x s_w)) * (s_x s_w)`` computed as ``quantize_bias_int32`` computes it (no gradient: its
  rounding is far below the weights').
* an integer attention call (``passes/attention.py``) is decomposed as that pass decomposes it, with its
  parameters fixed and straight-through rounding, so the blocks are trained against what the artifact runs.

Materialization (``materialize.py``) reads ``hard`` integers and the learned scales after training.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from ...grids import GRIDS
from ...qspec import PARAMS_KEY, SPEC_KEY, ActivationParams, QuantizerSpec
from ...quantizers import (FP4_ZERO_POINT, activation_qdq, fake_quantize_activation, fake_quantize_weight,
                           quantize_weight)

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid

from ...qspec import ATTENTION_KEY, ATTENTION_PARAMS_KEY  # integer attention (passes/attention.py)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.round`` (half to even) forward, identity backward."""
    return _RoundSTE.apply(x)


def integer_range(zero_point_dtype: torch.dtype) -> tuple[float, float]:
    """The saturation range of ``ditq::quantize``: the zero point's integer dtype."""
    info = torch.iinfo(zero_point_dtype)
    return float(info.min), float(info.max)


def grid_values(spec: QuantizerSpec, grid: str | None) -> torch.Tensor:
    """Every value a weight may take, in units of its scale, increasing (float32)."""
    if spec.dtype == "fp4":
        return GRIDS[grid].values().to(torch.float32)
    if not spec.is_integer:
        raise ValueError(f"no rounding grid for {spec.dtype}")
    return torch.arange(int(spec.qmin), int(spec.qmax) + 1, dtype=torch.float32)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = h`` for ``h`` in (0, 1); 0 and 1 map to where the clip starts."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def round_to_grid_ste(x: torch.Tensor, scale: torch.Tensor, grid_name: str) -> torch.Tensor:
    """``grids.round_to_grid`` with straight-through rounding (the same float32 operations)."""
    grid = GRIDS[grid_name]
    v = x.to(torch.float32) / scale
    magnitude = v.detach().abs()
    step = torch.full_like(v, grid.binades[0][1])
    for threshold, binade_step in grid.binades[1:]:
        step = torch.where(magnitude >= threshold, torch.tensor(binade_step, dtype=torch.float32), step)
    q = torch.clamp(round_ste(v / step) * step, -grid.max, grid.max)
    return q * scale


class WeightQuantizer(torch.nn.Module):
    """One weight's rounding onto its grid (and, when learned, its per-channel scale). See the module
    docstring for the three modes. ``learn_rounding`` adds AdaRound's ``V``; ``learn_scale`` adds ``u``."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, spec: QuantizerSpec, grid: str | None, *,
                 learn_rounding: bool, learn_scale: bool):
        super().__init__()
        self.spec, self.grid = spec, grid
        self.mode = "nearest"
        self._cached: torch.Tensor | None = None  # the weight under no_grad, until the next set_mode
        self.trainable = True  # False: the registry found a reason to keep nearest rounding
        self.register_buffer("weight", weight.detach().to(torch.float32))
        self.register_buffer("scale0", scale.detach().to(torch.float32).clone())
        nearest = quantize_weight(weight, scale, spec, grid).to(torch.float32)
        if spec.dtype == "fp4":
            nearest = nearest / GRIDS[grid].multiplier  # int8 g * multiplier -> the grid value g
        self.register_buffer("nearest", nearest)
        self.fixed: torch.Tensor | None = None  # integers set by GPTQ (hard mode reads them)
        self.rounding = None
        if learn_rounding:
            values = grid_values(spec, grid)
            v = self.weight / self.scale0[:, None]
            clipped = torch.clamp(v, float(values[0]), float(values[-1]))
            index = (torch.searchsorted(values, clipped.contiguous(), right=True) - 1).clamp(0, values.numel() - 2)
            self.register_buffer("lower", values[index])
            self.register_buffer("upper", values[index + 1])
            fraction = ((clipped - self.lower) / (self.upper - self.lower)).clamp(0.0, 1.0)
            # hard rounding must start exactly at nearest rounding (ties to even included)
            fraction = torch.where((nearest == self.lower) & (fraction >= 0.5), torch.full_like(fraction, 0.499),
                                   fraction)
            fraction = torch.where((nearest == self.upper) & (fraction < 0.5), torch.full_like(fraction, 0.501),
                                   fraction)
            self.rounding = torch.nn.Parameter(inverse_rectified_sigmoid(fraction.clamp(1e-4, 1 - 1e-4)))
        self.log_scale = torch.nn.Parameter(torch.zeros_like(self.scale0)) if learn_scale else None

    @property
    def scale(self) -> torch.Tensor:
        return self.scale0 if self.log_scale is None else self.scale0 * torch.exp(self.log_scale)

    def soft_fraction(self) -> torch.Tensor:
        return rectified_sigmoid(self.rounding)

    def integers(self) -> torch.Tensor:
        """The grid values hard rounding gives (what materialization stores)."""
        if self.fixed is not None:
            return self.fixed
        if self.rounding is None:
            return self.nearest
        return torch.where(self.soft_fraction() >= 0.5, self.upper, self.lower).detach()

    def forward(self) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation: the parameters cannot change until set_mode is called again
            if self._cached is None:
                self._cached = self._dequantized()
            return self._cached
        return self._dequantized()

    def _dequantized(self) -> torch.Tensor:
        if self.mode == "nearest" or (self.rounding is None and self.fixed is None and self.log_scale is None):
            return fake_quantize_weight(self.weight, self.scale0, self.spec, self.grid)
        if self.mode == "soft" and self.rounding is not None:
            q = self.lower + self.soft_fraction() * (self.upper - self.lower)
        else:
            q = self.integers()
        return q * self.scale[:, None]

    def set_mode(self, mode: str) -> None:
        """``nearest``, ``soft`` or ``hard``; forgets the weight cached for evaluation."""
        self.mode, self._cached = mode, None

    def regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's ``sum(1 - |2 h(V) - 1|^beta)`` as a mean over the weights (0 once every h is 0 or 1)."""
        h = self.soft_fraction()
        return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).mean()

    @property
    def learned(self) -> bool:
        return self.rounding is not None or self.log_scale is not None or self.fixed is not None


class ActivationQuantizer(torch.nn.Module):
    """One activation Q/DQ (per tensor) of one timestep group's branch. ``log_scale``: a parameter to learn
    (possibly shared with other groups' quantizers of the same tensor), or None to keep the scale."""

    def __init__(self, params: ActivationParams, spec: QuantizerSpec, log_scale: torch.nn.Parameter | None = None,
                 learn_zero_point: bool = False):
        super().__init__()
        self.params, self.spec = params, spec
        # FP8 and dynamic quantizers: the exported arithmetic, nothing learned
        self.exact_only = getattr(spec, "dynamic", False) or not (spec.is_integer or spec.dtype == "fp4")
        if self.exact_only:
            self.log_scale = self.zero_shift = None
            return
        scale, zero = activation_qdq(params, spec)
        self.multiplier = GRIDS[params.grid].multiplier if spec.dtype == "fp4" else 1
        self.grid = params.grid if spec.dtype == "fp4" else None
        # s0: the float32 scale the graph holds (the grid scale for FP4, the QuantizeLinear scale otherwise)
        self.register_buffer("scale0", torch.tensor(params.scale if self.grid else scale, dtype=torch.float32))
        self.register_buffer("zero0", zero.to(torch.float32))
        self.low, self.high = integer_range(zero.dtype)
        self.log_scale = log_scale
        affine = spec.is_integer and not spec.symmetric
        self.zero_shift = torch.nn.Parameter(torch.zeros(())) if learn_zero_point and affine else None

    @property
    def grid_scale(self) -> torch.Tensor:
        return self.scale0 if self.log_scale is None else self.scale0 * torch.exp(self.log_scale)

    @property
    def qdq_scale(self) -> torch.Tensor:
        """The QuantizeLinear scale: ``s``, or ``s / multiplier`` after FP4's grid rounding."""
        return self.grid_scale if self.multiplier == 1 else self.grid_scale / self.multiplier

    @property
    def zero_point(self) -> torch.Tensor:
        if self.zero_shift is None:
            return self.zero0
        return torch.clamp(self.zero0 + round_ste(self.zero_shift), self.low, self.high)

    @property
    def changed(self) -> bool:
        if self.exact_only:
            return False
        moved = self.log_scale is not None and bool(self.log_scale.detach().ne(0).any())
        return moved or (self.zero_shift is not None and float(torch.round(self.zero_shift.detach())) != 0.0)

    def bias_input_scale(self) -> float:
        """The input scale ``quantize_bias_int32`` multiplies by, computed from the parameters that will be
        materialized exactly as Q/DQ insertion computes it."""
        return activation_qdq(self.materialized(), self.spec)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact_only:  # the exported arithmetic, straight-through
            return x + (fake_quantize_activation(x.detach(), self.params, self.spec) - x).detach()
        if self.grid is not None:
            x = round_to_grid_ste(x, self.grid_scale, self.grid)
        scale, zero = self.qdq_scale, self.zero_point
        q = torch.clamp(round_ste(x / scale) + zero, self.low, self.high)
        return (q - zero) * scale

    def materialized(self) -> ActivationParams:
        """The learned parameters as the ordinary :class:`ActivationParams` (the same form ChooseQuantParams
        writes: the range is what the integers cover)."""
        if not self.changed:
            return self.params
        grid_scale = float(self.grid_scale.detach())
        zero = float(self.zero_point.detach())
        if self.grid is not None:
            grid_max = GRIDS[self.grid].max
            return ActivationParams(grid_scale, FP4_ZERO_POINT, -grid_max * grid_scale, grid_max * grid_scale,
                                    self.grid)
        return ActivationParams(grid_scale, int(zero), (self.low - zero) * grid_scale, (self.high - zero) * grid_scale,
                                self.params.grid)


class FakeQuantLinear(torch.nn.Module):
    """``matmul(Q/DQ(x), W_dq^T) + b`` as Q/DQ insertion writes the layer (int32 bias included)."""

    def __init__(self, layer: str, weight: WeightQuantizer, activation: ActivationQuantizer | None,
                 bias: torch.Tensor | None, int32_bias: bool):
        super().__init__()
        self.layer = layer
        self.weight_quantizer, self.activation = weight, activation
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.int32_bias = int32_bias and bias is not None and activation is not None and not activation.exact_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_dq = self.activation(x) if self.activation is not None else x
        out = torch.matmul(x_dq, self.weight_quantizer().t().contiguous())
        if self.bias is None:
            return out
        return out + (self.quantized_bias() if self.int32_bias else self.bias)

    def quantized_bias(self) -> torch.Tensor:
        """``round(b / (s_x s_w))`` in float64 times the float32 product scale, as ``insert_qdq`` computes it."""
        quantizer = self.weight_quantizer
        weight_scale = quantizer.scale.detach()
        if quantizer.spec.dtype == "fp4":
            weight_scale = (weight_scale.to(torch.float64) / GRIDS[quantizer.grid].multiplier).to(torch.float32)
        input_scale = self.activation.bias_input_scale()
        product = input_scale * weight_scale.to(torch.float64)
        integers = torch.round(self.bias.to(torch.float64) / product).to(torch.int64).to(torch.int32)
        return (integers.to(torch.float32) - 0.0) * product.to(torch.float32)


class FakeQuantAttention(torch.nn.Module):
    """An integer attention call as ``passes/attention.py`` decomposes it, parameters fixed::

        softmax(DQ(Q(q), s_q c) @ DQ(Q(k))^T) -> Q/DQ at 1/255 -> @ DQ(Q(v))
    """

    def __init__(self, spec, params):
        super().__init__()
        self.softmax_scale = float(spec.scale)
        self.params = params

    @staticmethod
    def _qdq(x, params: ActivationParams, dequantize_factor: float = 1.0):
        scale = torch.tensor(params.scale, dtype=torch.float32)
        dq_scale = scale if dequantize_factor == 1.0 else torch.tensor(params.scale * dequantize_factor,
                                                                        dtype=torch.float32)
        zero = torch.tensor(float(int(params.zero_point)), dtype=torch.float32)
        q = torch.clamp(round_ste(x / scale) + zero, 0.0, 255.0)
        return (q - zero) * dq_scale

    def forward(self, q, k, v):
        p = self.params
        scores = torch.matmul(self._qdq(q, p.q, self.softmax_scale), self._qdq(k, p.k).transpose(-2, -1))
        probs = torch.ops.aten._softmax.default(scores, -1, False)
        return torch.matmul(self._qdq(probs, p.probs), self._qdq(v, p.v))


def quantized_linear_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [node for node in gm.graph.nodes if SPEC_KEY in node.meta and PARAMS_KEY in node.meta]


def quantized_attention_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    if ATTENTION_PARAMS_KEY is None:
        return []
    return [node for node in gm.graph.nodes if ATTENTION_PARAMS_KEY in node.meta and ATTENTION_KEY in node.meta]


def make_trainable(gm: fx.GraphModule, linear_for) -> fx.GraphModule:
    """Replace, in ``gm`` (an extracted segment this module owns), every annotated linear by the
    :class:`FakeQuantLinear` that ``linear_for(node)`` returns, and every integer attention call by its
    :class:`FakeQuantAttention`. The rest of the graph (LayerNorm, GELU, the residuals) is untouched."""
    graph = gm.graph
    for index, node in enumerate(quantized_linear_nodes(gm)):
        name = f"ditq_fake_quant_{index}"
        gm.add_submodule(name, linear_for(node))
        with graph.inserting_before(node):
            replacement = graph.call_module(name, (node.args[0],))
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    for index, node in enumerate(quantized_attention_nodes(gm)):
        name = f"ditq_fake_quant_attention_{index}"
        gm.add_submodule(name, FakeQuantAttention(node.meta[ATTENTION_KEY], node.meta[ATTENTION_PARAMS_KEY]))
        with graph.inserting_before(node):
            replacement = graph.call_module(name, tuple(node.args[:3]))
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def set_mode(modules, mode: str) -> None:
    """``nearest``, ``soft`` or ``hard`` for every weight quantizer among ``modules``."""
    for module in modules:
        if isinstance(module, WeightQuantizer):
            module.set_mode(mode)


def relative_squared_error(outputs, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared errors, sum of squared targets) over every tensor output."""
    error = torch.zeros((), dtype=torch.float32)
    norm = torch.zeros((), dtype=torch.float32)
    for out, target in zip(outputs, targets):
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            continue
        error = error + (out - target).pow(2).sum()
        norm = norm + target.pow(2).sum()
    return error, norm


def annealed_beta(step: int, total: int, warmup: float, start: float = 20.0, end: float = 2.0) -> float | None:
    """AdaRound's temperature: None (no regularizer) during the first ``warmup`` of the steps, then linear
    from ``start`` to ``end``."""
    begin = warmup * total
    if step < begin:
        return None
    progress = (step - begin) / max(total - begin, 1)
    return end + (start - end) * max(0.0, 1.0 - progress)


def is_finite_number(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value)
