"""Rewrite rules: a pattern, a check that explains a refusal, and a rewrite.

A rule is applied at a *site* (for smoothing folds: one quantized input tensor of one branch).

* ``match(site)`` is the pattern: it returns what it found (the nodes the rewrite needs) or ``None``
  when the site is not this rule's shape at all;
* ``check(site, match)`` returns ``None`` to accept, or a short reason to decline
  (``"follows GELU"``, ``"weight shared with transformer_blocks.1.ff.net.0.proj"``);
* ``rewrite(site, match)`` changes the graph and its tensors.

:func:`apply_first` tries rules in order and reports what happened, so a pass can count outcomes per
rule ("folded 24 scale vectors into adaLN rows, 6 into V; skipped 6 fc2 inputs: follows GELU") and a
skipped layer is explained, never silent. Modelled on onnxscript's rewriter (pattern, check, replacement)
and torch.fx's subgraph patterns written as plain functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx


class RewriteRule:
    name: ClassVar[str] = "rule"
    # How an application is counted in a summary, e.g. "into adaLN rows".
    applied_label: ClassVar[str] = ""

    def match(self, site) -> Any | None:
        raise NotImplementedError

    def check(self, site, match) -> str | None:
        return None

    def rewrite(self, site, match) -> None:
        raise NotImplementedError


@dataclass
class RuleOutcome:
    rule: str | None  # the rule that rewrote, or None
    label: str  # its applied_label, or the reason nothing applied
    declined: list[tuple[str, str]]  # (rule, reason) of rules whose pattern matched but whose check declined

    @property
    def applied(self) -> bool:
        return self.rule is not None


def apply_first(rules: list[RewriteRule], site) -> RuleOutcome:
    declined = []
    for rule in rules:
        found = rule.match(site)
        if found is None:
            continue
        reason = rule.check(site, found)
        if reason is not None:
            declined.append((rule.name, reason))
            continue
        rule.rewrite(site, found)
        return RuleOutcome(rule.name, rule.applied_label, declined)
    return RuleOutcome(None, declined[0][1] if declined else "", declined)


# ------------------------------------------------------------------------------------------------
# Small pattern helpers on ATen graphs
# ------------------------------------------------------------------------------------------------

_aten = torch.ops.aten


def is_call(node: Any, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def skip_identities(node: fx.Node) -> fx.Node:
    """Walk up through ops that do not change values: dtype casts to the same dtype, zero-probability
    dropout, ``_assert_tensor_metadata`` is not a producer so it never appears here."""
    while True:
        if is_call(node, _aten.dropout.default) and float(node.args[1]) == 0.0:
            node = node.args[0]
        elif is_call(node, _aten.to.dtype, _aten.clone.default, _aten.contiguous.default) and \
                _same_dtype(node, node.args[0]):
            node = node.args[0]
        else:
            return node


def _same_dtype(a: fx.Node, b: Any) -> bool:
    va, vb = a.meta.get("val"), getattr(b, "meta", {}).get("val")
    return va is not None and vb is not None and va.dtype == vb.dtype


def get_attr_readers(gm: fx.GraphModule, target: str) -> list[fx.Node]:
    """Every node that reads the tensor held at ``target``, through any get_attr of any name that holds
    the same tensor object (tied weights appear under several names)."""
    from ..grouped import get_tensor

    tensor = get_tensor(gm, target)
    readers = []
    for node in gm.graph.nodes:
        if node.op == "get_attr" and (node.target == target or get_tensor(gm, node.target) is tensor):
            readers += list(node.users)
    return readers


def real_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` other than shape assertions, which read metadata, not values."""
    return [user for user in node.users if not is_call(user, _aten._assert_tensor_metadata.default)]
