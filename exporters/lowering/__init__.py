"""Lowering: target-specific rewrites of the exported ONNX model, as passes under one manager.

The fx pipeline ends with a *canonical* QDQ model: integer weights held in int8 (int4 and FP4 values too)
feeding per-channel ``DequantizeLinear``, activation ``QuantizeLinear``/``DequantizeLinear`` pairs, int32
biases for ``Gemm``-form layers. Each target then lowers that model into the form its ONNX Runtime provider
runs fast (``cpu``: 4-bit storage behind a ``Cast`` ONNX Runtime folds at load, and so on). Passes are
onnx-ir passes (``onnx_ir.passes.InPlacePass``) that report a summary; the manager runs them, times them,
and writes a dump after each one (``NNN_<pass>.txt``, numbered after the fx passes).

What a pass needs to know about a layer (which weight is int4, which grid an FP4 weight uses) is carried in
:class:`LayerRecord`, built from the annotation's specs, never guessed from tensor names or values.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

import onnx
import onnx_ir as ir
from onnx_ir.traversal import RecursiveGraphIterator

TARGETS: dict[str, str] = {
    "cpu": "ONNX Runtime's CPU provider: fused int8 kernels (MatMulIntegerToFloat, QGemm)",
}


@dataclass
class LayerRecord:
    """One quantized layer, as lowering sees it."""

    weight: str  # the weight tensor's name (what the integer kernel reads)
    weight_format: str  # "int8", "int4", "fp8", "fp4-e2m1", ...
    bias: str  # "int32" or "float"
    role: str

    @classmethod
    def from_manifest(cls, data: dict) -> "LayerRecord":
        return cls(**{key: data[key] for key in ("weight", "weight_format", "bias", "role")})

    def to_manifest(self) -> dict:
        return asdict(self)


class LoweringPass(ir.passes.InPlacePass):
    """A lowering pass: implement :meth:`lower`, returning ``(modified, summary)``."""

    name: ClassVar[str] = "lowering"

    def __init__(self, layers: dict[str, LayerRecord]):
        super().__init__()
        self.layers = layers
        self.summary = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified, self.summary = self.lower(model)
        return ir.passes.PassResult(model, modified)

    def lower(self, model: ir.Model) -> tuple[bool, str]:
        raise NotImplementedError


@dataclass
class LoweringRecord:
    name: str
    modified: bool
    summary: str
    seconds: float


@dataclass
class LoweringResult:
    model: onnx.ModelProto
    records: list[LoweringRecord] = field(default_factory=list)


def all_nodes(graph: ir.Graph) -> Iterator[ir.Node]:
    """Every node of ``graph`` and of its subgraphs (``If`` branches): the one recursion helper."""
    return iter(RecursiveGraphIterator(graph))


def initializers_named(model: ir.Model, base: str) -> list[ir.Value]:
    """The initializers holding tensor ``base``: itself, or one per timestep group (``base__group<g>``,
    the stitcher's naming contract) in the outer graph."""
    return [value for name, value in model.graph.initializers.items()
            if name == base or name.startswith(f"{base}__group")]


def op_histogram(model: ir.Model) -> Counter:
    return Counter(f"{node.domain + '.' if node.domain else ''}{node.op_type}" for node in all_nodes(model.graph))


def lower(model: onnx.ModelProto, target: str, layers: dict[str, LayerRecord], *,
          dump_dir: str | Path | None = None, first_index: int = 1) -> LoweringResult:
    """Run ``target``'s passes over ``model`` (a copy) and return the lowered model with a record per pass."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    ir_model = ir.from_proto(model)
    result = LoweringResult(model)
    for index, lowering_pass in enumerate(target_passes(target, layers), start=first_index):
        start = time.perf_counter()
        modified = lowering_pass(ir_model).modified
        seconds = time.perf_counter() - start
        result.records.append(LoweringRecord(lowering_pass.name, modified, lowering_pass.summary, seconds))
        if dump_dir is not None:
            _dump(Path(dump_dir), index, lowering_pass, ir_model, modified, seconds)
    result.model = ir.to_proto(ir_model)
    return result


def target_passes(target: str, layers: dict[str, LayerRecord]) -> list[LoweringPass]:
    from . import cpu

    return {"cpu": cpu.passes}[target](layers)


def _dump(dump_dir: Path, index: int, lowering_pass: LoweringPass, model: ir.Model, modified: bool,
          seconds: float) -> None:
    dump_dir.mkdir(parents=True, exist_ok=True)
    histogram = op_histogram(model)
    lines = [f"# {index:03d} {lowering_pass.name} (ONNX lowering)", lowering_pass.summary,
             f"modified: {modified}   time: {seconds:.3f} s", "", "## ops",
             *(f"{count:5d}  {op}" for op, count in sorted(histogram.items()))]
    (dump_dir / f"{index:03d}_{lowering_pass.name}.txt").write_text("\n".join(lines) + "\n")
