"""Annotation: decide which linear layers are quantized and how, without touching the graph's code.

For every ``aten.linear`` the pass writes a frozen :class:`LinearQuantSpec` on the node (or records
why the layer stays in floating point). The decision follows ``CompileConfig.select_layers``: the
format's default set, then the user's rules, later rules winning.
"""

from __future__ import annotations

from ..config import DEFAULT_QUANTIZED_PATTERNS
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
        layer_names = list(dict.fromkeys(site.layer for site in sites))
        decision = ctx.config.select_layers(layer_names)
        spec = ctx.config.format_spec
        details, annotated = [], 0
        for site in sites:
            if decision[site.layer]:
                site.node.meta[SPEC_KEY] = LinearQuantSpec(site.layer, site.input.name, spec.weight, spec.activation)
                annotated += 1
                details.append(f"quantize  {site.layer}  (input tensor {site.input.name})")
            else:
                site.node.meta.pop(SPEC_KEY, None)
                details.append(f"keep fp   {site.layer}  ({_why_fp(site.layer, ctx.config)})")
        inputs = {site.node.meta[SPEC_KEY].input_key for site in sites if SPEC_KEY in site.node.meta}
        summary = (f"annotated {annotated} of {len(sites)} linear calls for {spec.name} "
                   f"({len(inputs)} distinct input tensors to quantize)")
        return PassResult(gm, modified=annotated > 0, summary=summary, details=details)


def _why_fp(layer: str, config) -> str:
    import fnmatch

    for rule in reversed(config.layer_rules):
        if fnmatch.fnmatchcase(layer, rule.pattern):
            return f"rule {rule.pattern}=fp"
    if not any(fnmatch.fnmatchcase(layer, p) for p in DEFAULT_QUANTIZED_PATTERNS):
        return "not a block linear: embedders and the final layer stay in FP by default"
    return "excluded"
