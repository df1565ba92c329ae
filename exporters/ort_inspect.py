"""What ONNX Runtime actually runs: the optimized graph, and which quantized layers it fused.

A layer counts as fused when the node that reads its quantized weight initializer in ONNX Runtime's
optimized graph is an integer kernel. The initializer's name comes from Q/DQ insertion (recorded per
layer, never guessed from the layer's name); with timestep groups a per-group weight is stored as
``<name>__group<g>`` (the exporter's contract). A layer whose weight reaches a float ``MatMul``/``Gemm``
through a ``DequantizeLinear`` is simulated, not quantized.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx

FUSED_INT8_OPS = frozenset({
    "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeMatMul",
    "QAttention", "MatMulNBits", "QLinearConv",
})

# The kernel each weight format must become on the CPU provider (one table for every format): integer
# and FP4 weights an integer kernel; FP8 weights a float MatMul/Gemm reading the weight ONNX Runtime
# folded from FP8 at load (it has no FP8 GEMM on the CPU, and mis-fuses FP8 Q/DQ; see lowering/cpu.py).
FLOAT_GEMMS = frozenset({"MatMul", "Gemm", "FusedMatMul"})
EXPECTED_KERNELS: dict[str, frozenset] = {
    "int8": FUSED_INT8_OPS,
    "int4": FUSED_INT8_OPS,
    "fp4": FUSED_INT8_OPS,
    "float8e4m3fn": FLOAT_GEMMS,
}


# Block-wise int4 weights (``int4-block64``) run on MatMulNBits only (lowering/cpu_nbits.py).
BLOCK_KERNELS = frozenset({"MatMulNBits"})


def expected_kernels(weight_format: str) -> frozenset:
    if "-block" in weight_format:
        return BLOCK_KERNELS
    return EXPECTED_KERNELS[weight_format.split("-", 1)[0]]


@dataclass
class FusionReport:
    provider: str
    # layer -> op type reading its int8 weight in the optimized graph
    layer_ops: dict[str, str] = field(default_factory=dict)
    op_counts: Counter = field(default_factory=Counter)
    # layer -> how many kernels read its weight (one per timestep-group branch)
    readers: dict[str, int] = field(default_factory=dict)
    # layer -> the kernels it may become (by its weight format)
    expected: dict[str, frozenset] = field(default_factory=dict)

    @property
    def unfused(self) -> dict[str, str]:
        return {layer: op for layer, op in self.layer_ops.items()
                if op not in self.expected.get(layer, FUSED_INT8_OPS)}

    @property
    def all_fused(self) -> bool:
        return bool(self.layer_ops) and not self.unfused

    def to_manifest(self) -> dict:
        return {
            "provider": self.provider,
            "fused_layers": len(self.layer_ops) - len(self.unfused),
            "quantized_layers": len(self.layer_ops),
            "kernels": dict(Counter(self.layer_ops.values())),
            "unfused": self.unfused,
        }


def optimized_model(model_path: str | Path, provider: str = "CPUExecutionProvider") -> onnx.ModelProto:
    """The graph ONNX Runtime runs after all its optimizations, for ``provider``."""
    import onnxruntime as ort

    from ditq_compiler.runtime import quiet_session_options

    with tempfile.TemporaryDirectory(prefix="ditq-ort-") as tmp:
        options = quiet_session_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "optimized.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         str(1 << 20))
        ort.InferenceSession(str(model_path), options, providers=[provider])
        return onnx.load(options.optimized_model_filepath, load_external_data=False)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:  # If / Loop bodies
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            for sub in attribute.graphs:
                yield from _all_nodes(sub)


def fusion_report(model_path: str | Path, layer_weights: dict, provider: str = "CPUExecutionProvider") -> FusionReport:
    """``layer_weights``: layer key -> the name of its quantized weight tensor, or its LayerRecord (whose
    weight format also gives the expected kernel)."""
    optimized = optimized_model(model_path, provider)
    nodes = list(_all_nodes(optimized.graph))
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    report = FusionReport(provider=provider, op_counts=Counter(n.op_type for n in nodes))
    for layer, record in layer_weights.items():
        weight = record if isinstance(record, str) else record.weight
        if not isinstance(record, str):
            report.expected[layer] = expected_kernels(record.weight_format)
        # One reader per timestep-group branch; a weight that differs per group is named <weight>__group<g>.
        names = [name for name in readers if name == weight or name.startswith(f"{weight}__group")]
        ops = []
        for name in names:
            for reader in readers[name]:
                op = reader.op_type
                if op == "DequantizeLinear":  # not fused: follow the float weight to its consumer
                    consumers = [c.op_type for c in readers.get(reader.output[0], [])]
                    op = f"float {consumers[0] if consumers else 'DequantizeLinear'}"
                ops.append(op)
        unfused = [op for op in ops if op not in FUSED_INT8_OPS]
        report.layer_ops[layer] = unfused[0] if unfused else ops[0] if ops else "missing"
        report.readers[layer] = len(ops)
    return report


# QLinearMatMul when the product's output feeds the next quantizer directly (ORT requantizes in the kernel).
INTEGER_ATTENTION_OPS = frozenset({"MatMulIntegerToFloat", "QLinearMatMul"})


def attention_kernels(model_path: str | Path, layers: list[str], provider: str = "CPUExecutionProvider",
                      optimized: onnx.ModelProto | None = None) -> dict[str, dict[str, str]]:
    """For each integer-attention layer, what ONNX Runtime runs ``QK^T`` and ``PV`` as. Found by the scale
    initializers Q/DQ insertion named (``<layer>.q_dequantize_scale``, q's scale as ``QK^T``'s A; ``<layer>.v_scale``,
    ``PV``'s B; per group ``__group<g>``; the exporter renames nodes but keeps initializer names, and these
    values are distinct per layer, unlike the softmax output's 1/255 that ONNX Runtime's constant sharing
    merges): a fused product is an integer kernel reading that scale; a ``DequantizeLinear`` still reading it
    means the product runs in float. The first kernel that is not integer is reported."""
    optimized = optimized or optimized_model(model_path, provider)
    readers: dict[str, list[str]] = {}
    for node in _all_nodes(optimized.graph):
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    report = {}
    for layer in layers:
        kernels = {}
        for product, scale in (("qk", "q_dequantize_scale"), ("pv", "v_scale")):
            base = f"{layer}.{scale}"
            names = [name for name in readers if name == base or name.startswith(f"{base}__group")]
            ops = []
            for name in names:
                found = set(readers[name])
                integer = found & INTEGER_ATTENTION_OPS
                ops.append("float (DequantizeLinear)" if "DequantizeLinear" in found else
                           sorted(integer)[0] if integer else "/".join(sorted(found)))
            kernels[product] = next((op for op in ops if op not in INTEGER_ATTENTION_OPS), ops[0] if ops else "missing")
        report[layer] = kernels
    return report
