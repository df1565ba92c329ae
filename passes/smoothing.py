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

* :class:`AdaLNSingleFold` — adaLN-single (PixArt): the tensor is ``LN(x) * (1 + scale) + shift`` with
  ``(.., shift, scale, ..) = (T[None] + t6.reshape(B, n, D)).chunk(n, dim=1)``, where ``t6 = W_ada c + b_ada``
  is computed once and read by *every* block and ``T`` is the block's own ``[n, D]`` table. With one ``s``
  for every block that reads those rows (``z`` may differ per block)::

      (X - z)/s = LN(x) * (1 + T_scale + t_scale)/s + (T_shift + t_shift - z)/s

  so the shared rows take ``1/s`` once per branch and each block's table takes the rest::

      W_scale <- W_scale / s        b_scale <- b_scale / s        T_scale <- (1 + T_scale)/s - 1
      W_shift <- W_shift / s        b_shift <- b_shift / s        T_shift <- (T_shift - z)/s

  The rule checks every sibling site (each block's tensor modulated by the same rows) before folding any:
  it declines when a block reads the rows unsmoothed or with another scale, since a per-block scale does
  not fold into rows that all blocks share.

* :class:`AttentionValueFold` — the tensor is ``softmax(QK^T + M) V`` with heads merged back (``M`` an
  optional additive mask), and ``V = h W_v^T + b_v``. Scaling V's output channel ``j`` by ``1/s_j``
  scales the attention output's channel ``j`` (the head reshapes keep channel order), and because every
  softmax row sums to 1, ``P (V - 1 z^T) = P V - 1 z^T``: the shift folds too::

      W_v <- diag(1/s) W_v          b_v <- (b_v - z)/s

* :class:`ProducerLinearFold` — the tensor is a linear's output ``h W_p^T + b_p``, possibly through a
  reshape that keeps the channels last (PixArt's caption projection, read by every block's cross-attention
  K and V)::

      W_p <- diag(1/s) W_p          b_p <- (b_p - z)/s

* :class:`ModulationMul` (``--unfoldable mul``) — adaLN-single with per-block scales: multiply the small
  ``[B, 1, D]`` modulation vectors instead of the ``[B, N, D]`` activations:
  ``(1 + scale) <- (1 + scale) * (1/s)``, ``shift <- (shift - z) * (1/s)``.

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
from ..qspec import ATTENTION_KEY, OUTPUT_ROWS_KEY, PROVENANCE_KEY, SMOOTHING_KEY, SPEC_KEY, InputSmoothing, OutputRows
from ..tracing import module_name
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
class BranchSites:
    """Every site of one branch's plan, so that a rule can look at a site's siblings (tensors whose folds
    write the same shared rows) before it folds any of them."""

    gm: fx.GraphModule
    branch: object  # BranchState
    plan: dict[str, Smoothing]
    producers: dict[str, fx.Node]  # input key -> the node producing it
    readers: dict[str, list[fx.Node]]  # input key -> the annotated linears reading it
    memo: TensorMemo
    # Decisions about shared rows, made once for all their sites (what -> the reason to decline, or None),
    # and the shared rewrites already applied in this branch.
    decisions: dict = field(default_factory=dict)
    done: set = field(default_factory=set)

    def site(self, key: str) -> "SmoothingSite":
        return SmoothingSite(self.gm, self.branch, key, self.producers[key], self.readers[key], self.plan[key],
                             self.memo, self)


@dataclass
class SmoothingSite:
    gm: fx.GraphModule
    branch: object  # BranchState
    input_key: str
    producer: fx.Node
    readers: list[fx.Node]  # the annotated linears reading the tensor
    smoothing: Smoothing
    memo: TensorMemo
    sites: BranchSites | None = None  # the branch's other sites (rules that look at siblings need it)

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


def _output_rows_reason(site: SmoothingSite, linear: fx.Node, what: str) -> str | None:
    """Why ``linear``'s output rows cannot take ``diag(1/s)`` (and ``-z``), or None: a shift needs a bias, and the
    weight and bias must be the layer's own."""
    has_bias = len(linear.args) > 2 and linear.args[2] is not None
    if not has_bias and site.smoothing.shift is not None:
        return f"{what} has no bias to absorb the shift"
    for tensor_node in linear.args[1:3]:
        if tensor_node is not None:
            reason = _sharing_reason(site.gm, linear, tensor_node.target)
            if reason:
                return reason
    return _readers_reason(site)


def rescale_output_rows(site: SmoothingSite, linear: fx.Node, tag: str, change: OutputRows, *,
                        offset_uses_shift: bool = True) -> None:
    """``linear``'s output rows ``y -> y * gain + offset``: ``W <- diag(gain) W``, ``b <- gain * b + offset`` (the
    rules check that a linear given an offset has its own bias). ``change`` is made of the site's smoothing: the
    weight is memoized on its scale (groups sharing the scale share the weight, whatever their shifts), the bias
    on the scale and, where the offset is made of it, the shift. Recorded on the node (composed with earlier
    changes) for error analysis."""
    s, z = site.smoothing.scale, site.smoothing.shift
    update_tensor(site, linear.args[1].target, f"{tag}:w", (s,), lambda w: w * change.gain[:, None])
    if len(linear.args) > 2 and linear.args[2] is not None:
        update_tensor(site, linear.args[2].target, f"{tag}:b", (s, z) if offset_uses_shift else (s,),
                      lambda b: b * change.gain + change.offset)
    previous = linear.meta.get(OUTPUT_ROWS_KEY)
    linear.meta[OUTPUT_ROWS_KEY] = change if previous is None else previous.then(change)


def fold_into_output_rows(site: SmoothingSite, linear: fx.Node, tag: str, rule: str) -> None:
    """``W <- diag(1/s) W``, ``b <- (b - z)/s`` on ``linear`` (the producer side), then the readers' side."""
    s, z = site.smoothing.scale, site.smoothing.shift
    change = OutputRows.on_rows(s.numel(), (slice(None), 1 / s, 0.0 if z is None else -z / s))
    rescale_output_rows(site, linear, tag, change)
    fold_into_readers(site, rule)


# ------------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------------

def _modulation_parts(x: fx.Node):
    """``LN(h) * (1 + a) + b`` (either operand order) -> ``(product, one_plus, a, b)``, or None."""
    if not is_call(x, _aten.add.Tensor) or len(x.args) != 2:
        return None
    product, shift = x.args
    if is_call(shift, _aten.mul.Tensor):
        product, shift = shift, product
    if not (is_call(product, _aten.mul.Tensor) and isinstance(shift, fx.Node)):
        return None
    norm, one_plus = product.args
    if is_call(one_plus, _aten.layer_norm.default):
        norm, one_plus = one_plus, norm
    if not (is_call(norm, _aten.layer_norm.default) and is_call(one_plus, _aten.add.Tensor)):
        return None
    scale, one = one_plus.args
    if not isinstance(scale, fx.Node):
        scale, one = one, scale
    if one != 1 or not isinstance(scale, fx.Node):
        return None
    return product, one_plus, scale, shift


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
        parts = _modulation_parts(x)
        if parts is None:
            return None
        product, one_plus, scale_u, shift_u = parts
        if not (is_call(shift_u, _aten.unsqueeze.default) and is_call(scale_u, _aten.unsqueeze.default)):
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

        # scale rows (1 + y)/s - 1 = y/s + (1/s - 1); shift rows (y - z)/s
        rows = get_tensor(site.gm, match.ada_linear.args[1].target).shape[0]
        change = OutputRows.on_rows(rows, (scale_rows, 1 / s, 1 / s - 1),
                                    (shift_rows, 1 / s, 0.0 if z is None else -z / s))
        rescale_output_rows(site, match.ada_linear, f"adaln:{match.scale_index}:{match.shift_index}", change)
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
        mask = attention.args[3] if len(attention.args) > 3 else attention.kwargs.get("attn_mask")
        mask_value = mask.meta.get("val") if isinstance(mask, fx.Node) else None
        if mask_value is not None and mask_value.dtype == torch.bool:  # an additive mask keeps row sums at 1
            return "a boolean attention mask can empty a softmax row"
        return _output_rows_reason(site, match.value_linear, "the value projection")

    def rewrite(self, site, match):
        s, z = site.smoothing.scale, site.smoothing.shift
        fold_into_output_rows(site, match.value_linear, "value", self.name)
        attention = match.chain[-3].meta.get(ATTENTION_KEY)
        if attention is not None and site.branch is not None:  # V itself is quantized: its statistics follow
            site.branch.stats.get(attention.v_key).transform(s, z)


_RESHAPES = (_aten.reshape.default, _aten.view.default, _aten._unsafe_view.default)


@dataclass
class AdaLNSingleMatch:
    modulated: fx.Node
    ada_linear: fx.Node  # the shared linear: t6 = W_ada c + b_ada
    table: fx.Node  # get_attr of the block's [n, D] table
    chunk: fx.Node
    chunk_size: int
    scale_index: int
    shift_index: int
    chain: list[fx.Node]  # scale item, 1 + scale, the product, shift item: each read once
    rows_path: list[fx.Node]  # table[None], t6.reshape(B, n, D), their sum: each read once

    @property
    def rows(self) -> tuple:
        """What identifies the shared rows: the linear and the two chunks."""
        return self.ada_linear, self.scale_index, self.shift_index


def match_adaln_single(x: fx.Node) -> AdaLNSingleMatch | None:
    """``LN(h) * (1 + scale) + shift`` with ``(.., shift, scale, ..) = (T[None] + t6.reshape(B, n, D)).chunk(n, 1)``."""
    parts = _modulation_parts(x)
    if parts is None:
        return None
    product, one_plus, scale_item, shift_item = parts
    if not (is_call(scale_item, operator.getitem) and is_call(shift_item, operator.getitem)):
        return None
    chunk = scale_item.args[0]
    if shift_item.args[0] is not chunk or not is_call(chunk, _aten.chunk.default):
        return None
    summed = chunk.args[0]
    if not is_call(summed, _aten.add.Tensor) or len(summed.args) != 2 or summed.meta["val"].dim() != 3:
        return None
    dim = chunk.args[2] if len(chunk.args) > 2 else 0
    if dim not in (1, -2):
        return None
    table_read, rows = summed.args
    if not is_call(table_read, _aten.unsqueeze.default):
        table_read, rows = rows, table_read
    if not (is_call(table_read, _aten.unsqueeze.default) and table_read.args[1] == 0
            and isinstance(table_read.args[0], fx.Node) and table_read.args[0].op == "get_attr"):
        return None
    if not (is_call(rows, *_RESHAPES) and is_call(rows.args[0], _aten.linear.default)):
        return None
    ada, table = rows.args[0], table_read.args[0]
    n, size = summed.meta["val"].shape[-2:]
    if chunk.args[1] != n or ada.meta["val"].shape[-1] != n * size or tuple(table.meta["val"].shape) != (n, size):
        return None
    return AdaLNSingleMatch(x, ada, table, chunk, int(size), scale_item.args[1], shift_item.args[1],
                            [scale_item, one_plus, product, shift_item], [table_read, rows, summed])


def _modulated_reason(site: SmoothingSite, match) -> str | None:
    others = [u for u in real_users(match.modulated) if u not in site.readers]
    if others:
        return f"the modulated tensor is also read by {others[0].name}"
    for node in match.chain:
        if len(real_users(node)) != 1:
            return f"{node.name} of the modulation is read elsewhere"
    return None


class AdaLNSingleFold(RewriteRule):
    name = "adaln_single_rows"
    applied_label = "into adaLN-single rows and block tables"
    PER_BLOCK = "a per-block scale does not fold exactly into the shared adaLN-single rows"

    def match(self, site):
        return match_adaln_single(site.producer)

    def _local_reason(self, site, match) -> str | None:
        reason = _modulated_reason(site, match)
        if reason:
            return reason
        for node in match.rows_path:
            if len(real_users(node)) != 1:
                return f"{node.name} of the adaLN-single modulation is read elsewhere"
        reason = _sharing_reason(site.gm, match.rows_path[0], match.table.target)
        if reason:
            return reason
        if site.smoothing.scale.numel() != match.chunk_size:
            return "the smoothing vector does not match the modulation's width"
        return _readers_reason(site)

    def siblings(self, site, match) -> tuple[list[tuple[SmoothingSite, AdaLNSingleMatch]], str | None]:
        """Every planned site modulated by the same shared rows, or why the rows cannot take one ``1/s``."""
        sites = site.sites
        found = []
        for key in sites.plan:
            other = match_adaln_single(sites.producers[key])
            if other is not None and other.rows == match.rows:
                found.append((sites.site(key), other))
        covered = {node for _, other in found for node in (other.chain[0], other.chain[3])}
        for user in real_users(match.ada_linear):  # each block: t6.reshape(B, n, D) + T[None], chunked
            readers = real_users(user) if is_call(user, *_RESHAPES) else []
            summed = readers[0] if len(readers) == 1 and is_call(readers[0], _aten.add.Tensor) else None
            chunks = real_users(summed) if summed is not None else []
            chunk = chunks[0] if len(chunks) == 1 and is_call(chunks[0], _aten.chunk.default) else None
            if chunk is None:
                return [], f"the adaLN-single output is also read by {user.name}"
            for item in real_users(chunk):
                if item.args[1] in (match.scale_index, match.shift_index) and item not in covered:
                    where = module_name(item) or item.name
                    return [], f"{where} reads the same adaLN-single rows unsmoothed"
        return found, None

    def check(self, site, match):
        """Decided once per branch for all the sites of the shared rows (checked before any is folded), so that
        either every block's tensor folds or none does."""
        if site.sites is None:
            return "the branch's other sites are unknown"
        if match.rows not in site.sites.decisions:
            site.sites.decisions[match.rows] = self._group_reason(site, match)
        return site.sites.decisions[match.rows]

    def _group_reason(self, site, match) -> str | None:
        reason = self._local_reason(site, match)
        if reason:
            return reason
        ada = match.ada_linear
        if len(ada.args) < 3 or ada.args[2] is None:
            return "the adaLN-single linear has no bias"
        for tensor_node in ada.args[1:3]:
            reason = _sharing_reason(site.gm, ada, tensor_node.target)
            if reason:
                return reason
        siblings, reason = self.siblings(site, match)
        s = site.smoothing.scale
        for other, _ in siblings:
            if other.smoothing.scale is not s and not torch.equal(other.smoothing.scale, s):
                return f"{self.PER_BLOCK} ({other.input_key} has its own)"
        if reason:
            return reason
        for other, other_match in siblings:
            reason = self._local_reason(other, other_match)
            if reason:
                return f"{reason} (at {other.input_key}, which shares the adaLN-single rows)"
        return None

    def rewrite(self, site, match):
        s, z = site.smoothing.scale, site.smoothing.shift
        size = match.chunk_size
        scale_rows = slice(match.scale_index * size, (match.scale_index + 1) * size)
        shift_rows = slice(match.shift_index * size, (match.shift_index + 1) * size)
        tag = f"adaln_single:{match.scale_index}:{match.shift_index}"
        if (tag, match.ada_linear) not in site.sites.done:  # the shared rows: once per branch
            site.sites.done.add((tag, match.ada_linear))

            rows = get_tensor(site.gm, match.ada_linear.args[1].target).shape[0]
            change = OutputRows.on_rows(rows, (scale_rows, 1 / s, 0.0), (shift_rows, 1 / s, 0.0))
            rescale_output_rows(site, match.ada_linear, tag, change, offset_uses_shift=False)  # the table takes z

        def table(t):
            t = t.clone()
            t[match.scale_index] = (1 + t[match.scale_index]) / s - 1
            t[match.shift_index] = (t[match.shift_index] - (z if z is not None else 0)) / s
            return t
        update_tensor(site, match.table.target, tag + ":table", (s, z), table)
        fold_into_readers(site, self.name)


@dataclass
class ProducerMatch:
    linear: fx.Node
    chain: list[fx.Node]  # from the tensor up to the linear's output: channel-keeping reshapes and identities


class ProducerLinearFold(RewriteRule):
    name = "producer_rows"
    applied_label = "into the producing linear"

    def match(self, site):
        node, chain = site.producer, []
        while True:
            up = skip_identities(node)
            if up is not node:
                chain.append(node)
                node = up
            elif is_call(node, *_RESHAPES) and node.meta["val"].shape[-1] == node.args[0].meta["val"].shape[-1]:
                chain.append(node)  # keeps the channels last: element [.., j] stays channel j
                node = node.args[0]
            else:
                break
        return ProducerMatch(node, chain) if is_call(node, _aten.linear.default) else None

    def check(self, site, match):
        others = [u for u in real_users(site.producer) if u not in site.readers]
        if others:
            return f"the tensor is also read by {others[0].name}"
        for node in [*match.chain[1:], match.linear] if match.chain else []:
            if len(real_users(node)) != 1:
                return f"{node.name} between the producing linear and its readers is read elsewhere"
        if match.linear.meta["val"].shape[-1] != site.smoothing.scale.numel():
            return "the smoothing vector does not match the producing linear's width"
        return _output_rows_reason(site, match.linear, "the producing linear")

    def rewrite(self, site, match):
        fold_into_output_rows(site, match.linear, "producer", self.name)


def _buffer_base(key: str) -> str:
    return key.replace(".", "_").replace(":", "_").replace("#", "_")


def _smoothing_container(gm: fx.GraphModule) -> torch.nn.Module:
    """The submodule holding the explicit smoothing ops' buffers (``--unfoldable mul``), created on first use."""
    if not hasattr(gm, ExplicitSmoothing.CONTAINER):
        gm.add_submodule(ExplicitSmoothing.CONTAINER, torch.nn.Module())
    return gm.get_submodule(ExplicitSmoothing.CONTAINER)


class ModulationMul(RewriteRule):
    """``--unfoldable mul`` where :class:`AdaLNSingleFold` declines (per-block scales): ``(1 + scale) * (1/s)``
    and ``(shift - z) * (1/s)`` on the ``[B, 1, D]`` modulation vectors, not on the activations."""

    name = "modulation_mul"
    applied_label = "with multiplies on the adaLN-single modulation"

    def match(self, site):
        return match_adaln_single(site.producer)

    def check(self, site, match):
        return _modulated_reason(site, match) or _readers_reason(site)

    def rewrite(self, site, match):
        gm, s, z = site.gm, site.smoothing.scale, site.smoothing.shift
        container = _smoothing_container(gm)
        base = _buffer_base(site.input_key)
        graph = gm.graph
        provenance = {"pass": FoldSmoothing.name, "rule": self.name, "layer": site.readers[0].meta[SPEC_KEY].layer,
                      "group": getattr(site.branch, "index", 0)}

        def emit(target, args, like, role):
            node = graph.call_function(target, args)
            node.meta["val"] = like.meta.get("val")
            node.meta[PROVENANCE_KEY] = {**provenance, "role": role}
            return node

        def buffer(name, value):
            container.register_buffer(name, value)
            node = graph.get_attr(f"{ExplicitSmoothing.CONTAINER}.{name}")
            node.meta[PROVENANCE_KEY] = {**provenance, "role": name}
            return node

        _, one_plus, product, shift_item = match.chain
        inverse = site.memo("explicit:inv", (s,), lambda: (1.0 / s).to(torch.float32))
        with graph.inserting_before(product):
            inverse_node = buffer(f"{base}_mod_inv_scale", inverse)
            scaled = emit(_aten.mul.Tensor, (one_plus, inverse_node), one_plus, "modulation_scale")
        product.replace_input_with(one_plus, scaled)
        with graph.inserting_before(match.modulated):
            shifted = shift_item
            if z is not None:
                shift = site.memo("explicit:shift", (z,), lambda: z.to(torch.float32))
                shifted = emit(_aten.sub.Tensor, (shifted, buffer(f"{base}_mod_shift", shift)), shift_item,
                               "modulation_shift")
            shifted = emit(_aten.mul.Tensor, (shifted, inverse_node), shift_item, "modulation_shift_scale")
        match.modulated.replace_input_with(shift_item, shifted)
        fold_into_readers(site, self.name)


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
        container = _smoothing_container(gm)
        base = _buffer_base(site.input_key)
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


# Tried in order; a rule whose pattern does not match a site is not mentioned in its outcome.
EXACT_RULES: tuple[RewriteRule, ...] = (AdaLNModulationFold(), AttentionValueFold(), AdaLNSingleFold(),
                                        ProducerLinearFold())


def why_no_exact_fold(producer: fx.Node) -> str:
    node = skip_identities(producer)
    if is_call(node, _aten.flatten.using_ints) and "ditq.rotation" in getattr(node.args[0], "meta", {}):
        return "follows an online Hadamard rotation"
    if is_call(node, _aten.gelu.default):
        return "follows GELU"
    if is_call(node, _aten.silu.default):
        return "follows SiLU"
    if node.op == "placeholder":
        return f"reads the model input {node.name} (nothing before it to fold into)"
    if is_call(node, _aten.add.Tensor) and _is_residual_sum(node):
        return "reads the residual stream (a sum of two paths, with no norm or modulation after it)"
    return f"no exact fold after {getattr(node.target, '__name__', node.target)}"


def _is_residual_sum(node: fx.Node) -> bool:
    """An add of two full-size activations (no broadcast operand): a residual connection."""
    shape = node.meta.get("val").shape if isinstance(node.meta.get("val"), torch.Tensor) else None
    return shape is not None and len(node.args) == 2 and all(
        isinstance(arg, fx.Node) and isinstance(arg.meta.get("val"), torch.Tensor) and arg.meta["val"].shape == shape
        for arg in node.args)


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
        sites = BranchSites(gm, branch, plan, producers, readers, self.memo)
        counts, details, changed = Counter(), [], False
        for key, smoothing in plan.items():
            site = sites.site(key)
            rules = list(EXACT_RULES) + ([ModulationMul(), ExplicitSmoothing()] if self.unfoldable == "mul" else [])
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
