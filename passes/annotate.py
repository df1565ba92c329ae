"""Annotation: decide which linear layers are quantized and how, without touching the graph's code.

For every ``aten.linear`` the pass writes a frozen :class:`LinearQuantSpec` on the node (or records why
the layer stays in floating point). The decision follows ``CompileConfig.select_layers``: the family's
default set, then the user's rules, later rules winning. The spec carries everything later stages need:

* the layer key (``<module>`` or ``<module>#k`` for a module's k-th extra call) and the family role;
* the input key, ``<first reader>:in``, shared by every quantized layer that reads the same tensor
  (q, k and v), which therefore get one activation quantizer and one joint smoothing vector;
* the weight and activation quantizer specs of the format (read from the configuration, never assumed);
* the bias form: on the CPU target, layers whose input is 2-d (the adaLN modulation) become ``Gemm`` in ONNX
  Runtime, whose integer kernel ``QGemm`` needs an int32 bias quantized with ``s_x * s_w``; the other
  targets keep a float bias (``TargetSpec.int32_bias``), and so do layers whose kernel is not ``QGemm``
  (block-wise int4 weights run as ``MatMulNBits``; dynamic activations as ``DynamicQuantizeMatMul``).
"""

from __future__ import annotations

import fnmatch

from ..errors import PassPreconditionError
from ..pass_manager import GraphPass, PassResult
from ..qspec import SPEC_KEY, LinearQuantSpec
from ..tracing import linear_sites


class AnnotateLinearQuantization(GraphPass):
    name = "annotate_quantization"
    preserves_semantics = True

    def check_preconditions(self, gm, ctx):
        if not linear_sites(gm):
            raise PassPreconditionError(self.name, "the graph has no aten.linear node to quantize")

    def run(self, gm, ctx):
        sites = linear_sites(gm)
        modules = list(dict.fromkeys(site.module for site in sites))
        decision = ctx.config.select_layers(modules, ctx.family)
        config = ctx.config
        details, annotated = [], 0
        input_keys: dict[str, str] = {}  # fx input node -> stable key (first reader's layer key)
        for site in sites:
            precision = decision[site.module]
            if precision is None:
                site.node.meta.pop(SPEC_KEY, None)
                details.append(f"keep fp   {site.layer}  ({_why_fp(site.module, ctx)})")
                continue
            input_key = input_keys.setdefault(site.input.name, f"{site.layer}:in")
            two_d = site.input.meta["val"].dim() == 2
            activation = config.activation_spec_for(precision)
            weight = config.weight_spec_for(precision)
            spec = LinearQuantSpec(
                layer=site.layer, module=site.module, role=ctx.family.role_of(site.module), input_key=input_key,
                weight=weight, activation=activation,
                bias=bias_form(config, two_d, site.bias is not None, weight, activation),
            )
            site.node.meta[SPEC_KEY] = spec
            annotated += 1
            details.append(f"quantize  {site.layer}  {precision}, role {spec.role}, input {input_key}, weight "
                           f"{spec.weight.describe()}, input "
                           f"{spec.activation.describe() if spec.activation else 'float (weight-only)'}, bias {spec.bias}")
        attention = annotate_attention(gm, ctx, details) if config.attention_spec is not None else 0
        summary = (f"annotated {annotated} of {len(sites)} linear calls for {config.format} "
                   f"({len(set(input_keys.values()))} distinct input tensors to quantize)"
                   + (f" and {attention} attention calls (q, k, v, softmax output in uint8)" if attention else ""))
        return PassResult(gm, modified=annotated > 0, summary=summary, details=details)


def bias_form(config, two_d: bool, has_bias: bool, weight, activation) -> str:
    """"int32" where the layer becomes ``QGemm`` (CPU target, 2-d input: the adaLN modulation), whose bias is
    quantized with ``s_x * s_w`` and so needs a static integer input scale; "float" for every other kernel
    (weight-only, FP8, block-wise int4 on ``MatMulNBits``, dynamic activations, the GPU targets)."""
    integer_gemm = (config.target_spec.int32_bias and two_d and has_bias and activation is not None
                    and not activation.dynamic and activation.dtype != "float8e4m3fn" and weight.block_size is None)
    return "int32" if integer_gemm else "float"


def annotate_attention(gm, ctx, details: list[str]) -> int:
    """Write an :class:`AttentionQuantSpec` on every ``scaled_dot_product_attention`` call that can be
    decomposed exactly (no mask, no dropout, not causal) and whose V comes from a linear through the heads
    reshape; say why for the others."""
    import math

    import torch

    from ..qspec import ATTENTION_KEY, AttentionQuantSpec
    from ..tracing import module_name
    from .rewrite import is_call

    aten = torch.ops.aten
    count = 0
    for node in gm.graph.nodes:
        if not is_call(node, aten.scaled_dot_product_attention.default):
            continue
        layer = module_name(node) or node.name
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
        value = node.args[2]
        chain_ok = is_call(value, aten.transpose.int) and is_call(value.args[0], aten.view.default, aten.reshape.default) \
            and is_call(value.args[0].args[0], aten.linear.default)
        reason = ("it has a mask" if mask is not None else "it has dropout" if dropout else "it is causal" if causal
                  else None if chain_ok else "V does not come from a linear through the heads reshape")
        reason = reason or why_attention_output_not_integer(node)
        if reason:
            details.append(f"keep fp   {layer} attention ({reason})")
            continue
        scale = node.kwargs.get("scale") or 1.0 / math.sqrt(node.args[0].meta["val"].shape[-1])
        node.meta[ATTENTION_KEY] = AttentionQuantSpec(layer, f"{layer}:q", f"{layer}:k", f"{layer}:v",
                                                      ctx.config.attention_spec, float(scale))
        details.append(f"quantize  {layer} attention: q, k, v per tensor and the softmax output, uint8")
        count += 1
    return count


def why_attention_output_not_integer(sdpa) -> str | None:
    """PV runs on ``QLinearMatMul`` only when its output is requantized to an integer grid, which is the
    output projection's static input quantizer. Say why not when that projection stays in float, takes FP8
    (no integer kernel), or quantizes its input at run time."""
    import torch

    from .rewrite import is_call

    aten = torch.ops.aten
    node = sdpa
    for _ in range(6):  # transpose, the heads reshape and dtype casts, between the call and its output projection
        users = [user for user in node.users if not is_call(user, aten._assert_tensor_metadata.default)]
        if len(users) != 1:
            return "its output is read by several nodes"
        node = users[0]
        if is_call(node, aten.linear.default):
            break
    else:
        return "its output does not reach a linear through the heads reshape"
    spec = node.meta.get(SPEC_KEY)
    activation = spec.activation if spec is not None else None
    if activation is None:
        return "its output projection keeps a float input"
    if activation.dynamic or activation.dtype == "float8e4m3fn":
        return (f"its output projection takes {'a run-time quantized' if activation.dynamic else 'an FP8'} input, "
                "so PV has no integer output grid")
    return None


def _why_fp(module: str, ctx) -> str:
    for rule in reversed(ctx.config.layer_rules):
        if fnmatch.fnmatchcase(module, rule.pattern):
            return f"rule {rule.pattern}=fp"
    role = ctx.family.role_of(module)
    if not ctx.family.quantized_by_default(module):
        return f"role {role}: embedders and the final layer stay in FP by default"
    return "excluded"
