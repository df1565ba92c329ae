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
  targets keep a float bias (``TargetSpec.int32_bias``).
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
        decision = ctx.config.select_layers(modules)
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
            spec = LinearQuantSpec(
                layer=site.layer, module=site.module, role=ctx.family.role_of(site.module), input_key=input_key,
                weight=config.weight_spec_for(precision), activation=activation,
                # QGemm's int32 bias (CPU target only) needs an integer input scale; weight-only and FP8
                # layers, and the other targets' kernels, keep a float bias
                bias="int32" if config.target_spec.int32_bias and two_d and site.bias is not None
                and activation is not None
                and activation.dtype != "float8e4m3fn" else "float",
            )
            site.node.meta[SPEC_KEY] = spec
            annotated += 1
            details.append(f"quantize  {site.layer}  {precision}, role {spec.role}, input {input_key}, weight "
                           f"{spec.weight.describe()}, input "
                           f"{spec.activation.describe() if spec.activation else 'float (weight-only)'}, bias {spec.bias}")
        summary = (f"annotated {annotated} of {len(sites)} linear calls for {config.format} "
                   f"({len(set(input_keys.values()))} distinct input tensors to quantize)")
        return PassResult(gm, modified=annotated > 0, summary=summary, details=details)


def _why_fp(module: str, ctx) -> str:
    for rule in reversed(ctx.config.layer_rules):
        if fnmatch.fnmatchcase(module, rule.pattern):
            return f"rule {rule.pattern}=fp"
    role = ctx.family.role_of(module)
    if not ctx.family.quantized_by_default(module):
        return f"role {role}: embedders and the final layer stay in FP by default"
    return "excluded"
