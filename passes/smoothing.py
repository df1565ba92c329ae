"""Smoothing folds: make a quantized layer read ``(X - z) / s`` and fold ``s`` and ``z`` into the nodes
before it, so the artifact carries no extra operation.

A recipe pass computes a :class:`SmoothingPlan` (a scale ``s > 0`` and optionally a shift ``z`` per
quantized input tensor, per timestep-group branch); :class:`FoldSmoothing` applies it with the rewrite
rules below. Every fold has two sides:

*Readers* (every quantized linear ``y = X W^T + b`` reading the tensor, e.g. q, k and v together)::

    y = ((X - z)/s) (W diag(s))^T + (b + W z)            so  W <- W diag(s),  b <- b + W z

*Producer*, by rule:

* :class:`AdaLNModulationFold` — the tensor is ``LN(x) * (1 + scale) + shift`` with ``scale`` and
  ``shift`` two chunks of the adaLN modulation linear ``[..] = W_ada c + b_ada``. Then
  ``(X - z)/s = LN(x) * (1 + scale)/s + (shift - z)/s``, so the chunks' rows become::

      W_scale <- W_scale / s        b_scale <- (1 + b_scale)/s - 1
      W_shift <- W_shift / s        b_shift <- (b_shift - z)/s

* :class:`AttentionValueFold` — the tensor is ``softmax(QK^T) V`` with heads merged back, and
  ``V = h W_v^T + b_v``. Scaling V's output channel ``j`` by ``1/s_j`` scales the attention output's
  channel ``j`` (the head reshapes keep channel order), and because every softmax row sums to 1,
  ``P (V - 1 z^T) = P V - 1 z^T``: the shift folds too::

      W_v <- diag(1/s) W_v          b_v <- (b_v - z)/s

* :class:`ExplicitSmoothing` (``--unfoldable mul``) — no exact fold (after GELU or SiLU, nothing linear
  precedes the tensor): insert ``(X - z) * (1/s)`` explicitly. Its cost is an elementwise op per call.

A fold declines, with the reason, when its pattern's nodes or weights are read by something else
(folding would change that reader too), or when a reader has no bias to absorb a shift. The arithmetic
is done in float64 and cast to float32; scales are clamped to ``[SCALE_MIN, SCALE_MAX]`` by the recipes.
The calibration statistics of the tensor are carried through exactly (``TensorStats.transform``) and the
transform is recorded on every reader (``InputSmoothing``) for error analysis.

Sharing across timestep groups: every derived tensor is computed through the pass's :class:`TensorMemo`,
keyed by the identity of its inputs; groups that share the input weights and the scale (a recipe's shared
``s``) therefore share the folded weight, while a per-group shift makes per-group biases.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx

from ..errors import PassPreconditionError
from ..grouped import TensorMemo, get_tensor, set_tensor
from ..pass_manager import BranchPass, BranchResult
from ..qspec import ATTENTION_KEY, SMOOTHING_KEY, SPEC_KEY, InputSmoothing
from .calibrate import input_producers
from .rewrite import RewriteRule, apply_first, get_attr_readers, is_call, real_users, skip_identities

SCALE_MIN, SCALE_MAX = 1e-4, 1e4
_aten = torch.ops.aten


@dataclass
class Smoothing:
    """``X -> (X - shift) / scale`` for one tensor (float64 vectors, ``scale > 0``)."""

    scale: torch.Tensor
    shift: torch.Tensor | None = None
    note: str = ""


@dataclass
class SmoothingPlan:
    recipe: str
    # per branch: input key -> smoothing. The same Smoothing object in several branches = shared.
    per_branch: list[dict[str, Smoothing]] = field(default_factory=list)


def clamp_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scales away from 0 and inf (and NaN from 0/0 mapped to 1), in float64."""
    scale = torch.nan_to_num(scale.to(torch.float64), nan=1.0, posinf=SCALE_MAX, neginf=SCALE_MIN)
    return scale.clamp(SCALE_MIN, SCALE_MAX)


@dataclass
class SmoothingSite:
    gm: fx.GraphModule
    branch: object  # BranchState
    input_key: str
    producer: fx.Node
    readers: list[fx.Node]  # the annotated linears reading the tensor
    smoothing: Smoothing
    memo: TensorMemo

    @property
    def role(self) -> str:
        return self.readers[0].meta[SPEC_KEY].role


def _as_like(old: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    value = value.to(old.dtype)
    return torch.nn.Parameter(value, requires_grad=False) if isinstance(old, torch.nn.Parameter) else value


def update_tensor(site: SmoothingSite, target: str, tag: str, keys: tuple, compute) -> None:
    """Replace the branch's tensor ``target`` by ``compute(old)`` (float64 in, cast back), memoized on
    the identity of ``old`` and ``keys`` so that groups with the same inputs share the result."""
    old = get_tensor(site.gm, target)
    new = site.memo(tag, (old, *keys), lambda: _as_like(old, compute(old.detach().to(torch.float64))))
    set_tensor(site.gm, target, new)


def _sharing_reason(gm: fx.GraphModule, node: fx.Node, target: str) -> str | None:
    others = [user for user in get_attr_readers(gm, target) if user is not node]
    if others:
        return f"a weight is shared with another layer ({target} is also read by {others[0].name})"
    return None


def _readers_reason(site: SmoothingSite) -> str | None:
    """Why the readers' side cannot be folded, or None."""
    for reader in site.readers:
        weight, bias = reader.args[1], reader.args[2] if len(reader.args) > 2 else None
        for tensor_node in (weight, bias):
            if tensor_node is not None:
                reason = _sharing_reason(site.gm, reader, tensor_node.target)
                if reason:
                    return reason
        if bias is None and site.smoothing.shift is not None:
            return f"{reader.meta[SPEC_KEY].layer} has no bias to absorb the shift"
    return None


def fold_into_readers(site: SmoothingSite, rule: str) -> None:
    """``W <- W diag(s)``, ``b <- b + W z`` for every reader; statistics and provenance follow."""
    s, z = site.smoothing.scale, site.smoothing.shift
    for reader in site.readers:
        weight_target = reader.args[1].target
        weight = get_tensor(site.gm, weight_target)
        if z is not None:  # b + W z with the weight before this fold (a key of the memo: it may be per group)
            update_tensor(site, reader.args[2].target, "reader_bias", (s, z, weight),
                          lambda b, w=weight.detach().to(torch.float64): b + w @ z)
        update_tensor(site, weight_target, "reader_weight", (s,), lambda w: w * s[None, :])
        previous = reader.meta.get(SMOOTHING_KEY)
        scale32, shift32 = s.to(torch.float32), None if z is None else z.to(torch.float32)
        reader.meta[SMOOTHING_KEY] = InputSmoothing(scale32, shift32, rule) if previous is None \
            else previous.then(scale32, shift32, rule)
    site.branch.stats.get(site.input_key).transform(s, z)


# ------------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------------

@dataclass
class AdaLNMatch:
    modulated: fx.Node
    ada_linear: fx.Node
    chunk_size: int
    scale_index: int
    shift_index: int
    chain: list[fx.Node]  # nodes between the chunk and the modulation that must have one reader


class AdaLNModulationFold(RewriteRule):
    name = "adaln_rows"
    applied_label = "into adaLN rows"

    def match(self, site):
        x = site.producer
        if not is_call(x, _aten.add.Tensor) or len(x.args) != 2:
            return None
        product, shift_u = x.args
        if is_call(shift_u, _aten.mul.Tensor):
            product, shift_u = shift_u, product
        if not (is_call(product, _aten.mul.Tensor) and is_call(shift_u, _aten.unsqueeze.default)):
            return None
        norm, one_plus = product.args
        if is_call(one_plus, _aten.layer_norm.default):
            norm, one_plus = one_plus, norm
        if not (is_call(norm, _aten.layer_norm.default) and is_call(one_plus, _aten.add.Tensor)):
            return None
        scale_u, one = one_plus.args
        if not isinstance(scale_u, fx.Node):
            scale_u, one = one, scale_u
        if one != 1 or not is_call(scale_u, _aten.unsqueeze.default):
            return None
        scale_item, shift_item = scale_u.args[0], shift_u.args[0]
        if not (is_call(scale_item, operator.getitem) and is_call(shift_item, operator.getitem)):
            return None
        chunk = scale_item.args[0]
        if shift_item.args[0] is not chunk or not is_call(chunk, _aten.chunk.default):
            return None
        ada = chunk.args[0]
        if not is_call(ada, _aten.linear.default):
            return None
        rank = ada.meta["val"].dim()
        dim = chunk.args[2] if len(chunk.args) > 2 else 0
        if dim not in (-1, rank - 1) or scale_u.args[1] != 1 or shift_u.args[1] != 1:
            return None
        chunk_size = ada.meta["val"].shape[-1] // chunk.args[1]
        return AdaLNMatch(x, ada, chunk_size, scale_item.args[1], shift_item.args[1],
                          [scale_item, scale_u, one_plus, shift_item, shift_u, product])

    def check(self, site, match):
        others = [u for u in real_users(match.modulated) if u not in site.readers]
        if others:
            return f"the modulated tensor is also read by {others[0].name}"
        for node in match.chain:
            if len(real_users(node)) != 1:
                return f"{node.name} of the modulation is read elsewhere"
        if len(match.ada_linear.args) < 3 or match.ada_linear.args[2] is None:
            return "the adaLN linear has no bias"
        for tensor_node in match.ada_linear.args[1:3]:
            reason = _sharing_reason(site.gm, match.ada_linear, tensor_node.target)
            if reason:
                return reason
        if site.smoothing.scale.numel() != match.chunk_size:
            return "the smoothing vector does not match the modulation's width"
        return _readers_reason(site)

    def rewrite(self, site, match):
        s, z = site.smoothing.scale, site.smoothing.shift
        size = match.chunk_size
        scale_rows = slice(match.scale_index * size, (match.scale_index + 1) * size)
        shift_rows = slice(match.shift_index * size, (match.shift_index + 1) * size)

        def weight(w):
            w = w.clone()
            w[scale_rows] /= s[:, None]
            w[shift_rows] /= s[:, None]
            return w

        def bias(b):
            b = b.clone()
            b[scale_rows] = (1 + b[scale_rows]) / s - 1
            b[shift_rows] = (b[shift_rows] - (z if z is not None else 0)) / s
            return b

        tag = f"adaln:{match.scale_index}:{match.shift_index}"
        update_tensor(site, match.ada_linear.args[1].target, tag + ":w", (s,), weight)
        update_tensor(site, match.ada_linear.args[2].target, tag + ":b", (s, z), bias)
        fold_into_readers(site, self.name)


@dataclass
class ValueMatch:
    chain: list[fx.Node]  # from the value projection to the tensor, each with one reader
    value_linear: fx.Node


class AttentionValueFold(RewriteRule):
    name = "attention_value"
    applied_label = "into V"

    def match(self, site):
        chain = [site.producer]
        merged = skip_identities(site.producer)
        if merged is not site.producer:
            chain.append(merged)
        if not is_call(merged, _aten.reshape.default, _aten.view.default, _aten._unsafe_view.default):
            return None
        heads_back = merged.args[0]
        if not (is_call(heads_back, _aten.transpose.int) and tuple(heads_back.args[1:]) == (1, 2)):
            return None
        attention = heads_back.args[0]
        if not is_call(attention, _aten.scaled_dot_product_attention.default):
            return None
        value_t = attention.args[2]
        if not (is_call(value_t, _aten.transpose.int) and tuple(value_t.args[1:]) == (1, 2)):
            return None
        split_heads = value_t.args[0]
        if not is_call(split_heads, _aten.view.default, _aten.reshape.default):
            return None
        value_linear = split_heads.args[0]
        if not is_call(value_linear, _aten.linear.default):
            return None
        heads, head_dim = split_heads.meta["val"].shape[-2:]
        if merged.meta["val"].shape[-1] != heads * head_dim:
            return None
        return ValueMatch(chain + [heads_back, attention, value_t, split_heads], value_linear)

    def check(self, site, match):
        others = [u for u in real_users(site.producer) if u not in site.readers]
        if others:
            return f"the attention output is also read by {others[0].name}"
        for node in [*match.chain[1:], match.value_linear]:
            if len(real_users(node)) != 1:
                return f"{node.name} on the value path is read elsewhere"
        attention = match.chain[-3]
        dropout = attention.args[4] if len(attention.args) > 4 else attention.kwargs.get("dropout_p", 0.0)
        if dropout:
            return "attention dropout is on"
        if len(match.value_linear.args) < 3 or match.value_linear.args[2] is None:
            if site.smoothing.shift is not None:
                return "the value projection has no bias to absorb the shift"
        for tensor_node in match.value_linear.args[1:3]:
            if tensor_node is not None:
                reason = _sharing_reason(site.gm, match.value_linear, tensor_node.target)
                if reason:
                    return reason
        return _readers_reason(site)

    def rewrite(self, site, match):
        s, z = site.smoothing.scale, site.smoothing.shift
        update_tensor(site, match.value_linear.args[1].target, "value:w", (s,), lambda w: w / s[:, None])
        if len(match.value_linear.args) > 2 and match.value_linear.args[2] is not None:
            update_tensor(site, match.value_linear.args[2].target, "value:b", (s, z),
                          lambda b: (b - (z if z is not None else 0)) / s)
        fold_into_readers(site, self.name)
        attention = match.chain[-3].meta.get(ATTENTION_KEY)
        if attention is not None and site.branch is not None:  # V itself is quantized: its statistics follow
            site.branch.stats.get(attention.v_key).transform(s, z)


class ExplicitSmoothing(RewriteRule):
    """``--unfoldable mul``: insert ``(X - z) * (1/s)`` before the readers."""

    name = "explicit_mul"
    applied_label = "with an explicit multiply"
    CONTAINER = "ditq_smoothing"

    def match(self, site):
        return True

    def check(self, site, match):
        return _readers_reason(site)

    def rewrite(self, site, match):
        gm, s, z = site.gm, site.smoothing.scale, site.smoothing.shift
        if not hasattr(gm, self.CONTAINER):
            gm.add_submodule(self.CONTAINER, torch.nn.Module())
        container = gm.get_submodule(self.CONTAINER)
        base = site.input_key.replace(".", "_").replace(":", "_").replace("#", "_")
        graph = gm.graph
        first_reader = next(node for node in graph.nodes if node in site.readers)
        with graph.inserting_before(first_reader):
            value = site.producer
            if z is not None:
                shift = site.memo("explicit:shift", (z,), lambda: z.to(torch.float32))
                container.register_buffer(f"{base}_shift", shift)
                value = graph.call_function(_aten.sub.Tensor, (value, graph.get_attr(f"{self.CONTAINER}.{base}_shift")))
            inverse = site.memo("explicit:inv", (s,), lambda: (1.0 / s).to(torch.float32))
            container.register_buffer(f"{base}_inv_scale", inverse)
            value = graph.call_function(_aten.mul.Tensor, (value, graph.get_attr(f"{self.CONTAINER}.{base}_inv_scale")))
        value.meta["val"] = site.producer.meta.get("val")
        for reader in site.readers:
            reader.replace_input_with(site.producer, value)
        fold_into_readers(site, self.name)


EXACT_RULES: tuple[RewriteRule, ...] = (AdaLNModulationFold(), AttentionValueFold())


def why_no_exact_fold(producer: fx.Node) -> str:
    node = skip_identities(producer)
    if is_call(node, _aten.flatten.using_ints) and "ditq.rotation" in getattr(node.args[0], "meta", {}):
        return "follows an online Hadamard rotation"
    if is_call(node, _aten.gelu.default):
        return "follows GELU"
    if is_call(node, _aten.silu.default):
        return "follows SiLU"
    return f"no exact fold after {getattr(node.target, '__name__', node.target)}"


class FoldSmoothing(BranchPass):
    """Apply the recipe's :class:`SmoothingPlan` in every branch; the graph computes the same function."""

    name = "fold_smoothing"
    preserves_semantics = True

    def __init__(self, unfoldable: str = "skip"):
        self.unfoldable = unfoldable
        self.memo = TensorMemo()

    def check_preconditions(self, gm, ctx):
        super().check_preconditions(gm, ctx)
        if ctx.smoothing_plan is None:
            raise PassPreconditionError(self.name, "no smoothing plan; run a smoothing recipe first")

    def run(self, module, ctx):
        result = super().run(module, ctx)
        ctx.smoothing_plan = None  # consumed
        return result

    def run_branch(self, gm, ctx, branch):
        plan: dict[str, Smoothing] = ctx.smoothing_plan.per_branch[branch.index]
        producers = input_producers(gm)
        readers: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            spec = node.meta.get(SPEC_KEY)
            if spec is not None:
                readers.setdefault(spec.input_key, []).append(node)
        counts, details, changed = Counter(), [], False
        for key, smoothing in plan.items():
            site = SmoothingSite(gm, branch, key, producers[key], readers[key], smoothing, self.memo)
            rules = list(EXACT_RULES) + ([ExplicitSmoothing()] if self.unfoldable == "mul" else [])
            outcome = apply_first(rules, site)
            what = "scale and shift" if smoothing.shift is not None else "scale"
            if outcome.applied:
                changed = True
                counts[("applied", outcome.label)] += 1
                details.append(f"{key}: folded {what} {outcome.label} ({outcome.rule}) {smoothing.note}".rstrip())
            else:
                reason = outcome.label or why_no_exact_fold(site.producer)
                counts[("skipped", f"{site.role} inputs: {reason.split(' (')[0]}")] += 1  # specifics: details
                declined = "; ".join(f"{rule} declined: {why}" for rule, why in outcome.declined)
                details.append(f"{key}: not smoothed, {reason}" + (f" ({declined})" if declined else ""))
        if changed:
            gm.graph.lint()
            gm.recompile()
        return BranchResult(changed, counts, details)

    def summarize(self, counts, ctx):
        applied = [(label, n) for (kind, label), n in counts.items() if kind == "applied"]
        skipped = [(label, n) for (kind, label), n in counts.items() if kind == "skipped"]
        parts = []
        if applied:
            first, *rest = applied
            parts.append(f"folded {first[1]} smoothing vectors {first[0]}" +
                         "".join(f", {n} {label}" for label, n in rest))
        if skipped:
            parts.append("skipped " + ", ".join(f"{n} {label}" for label, n in skipped))
        return "; ".join(parts) or "nothing to fold"
