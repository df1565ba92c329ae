"""Lowering: target-specific rewrites of the exported ONNX model, as passes under one manager.

The fx pipeline ends with a *canonical* QDQ model: integer weights held in int8 (int4 and FP4 values too)
feeding per-channel ``DequantizeLinear``, activation ``QuantizeLinear``/``DequantizeLinear`` pairs, int32
biases for ``Gemm``-form layers. Each target then lowers that model into the form its ONNX Runtime provider
runs fast (``cpu``: 4-bit storage behind a ``Cast`` ONNX Runtime folds at load, and so on). Passes are
onnx-ir passes (``onnx_ir.passes.InPlacePass``) that report a summary; the manager runs them, times them,
and writes a dump after each one (``NNN_<pass>.txt``, numbered after the fx passes).

What a pass needs to know about a layer (which weight is int4, which grid an FP4 weight uses) is carried in
:class:`LayerRecord`, built from the annotation's specs, never guessed from tensor names or values. What a
pass needs to know about the run (denoiser inputs to measure value ranges on) and what it hands on (one model
per timestep group, notes for the manifest) is carried in :class:`LoweringContext`.

**Raising.** ``ditq lower`` re-lowers an artifact without recalibrating: the model on disk is lowered for
its own target, so it is first *raised* back to the canonical form by the inverse of every pass that
lowered it, in reverse order (:func:`raise_to_canonical`), then lowered for the new target. A pass's
inverse is registered with :func:`inverse_of` (``canonical.py`` holds those of the CPU passes); a pass
without one (a lowering that drops information, like the CUDA target's removal of activation
quantizers) makes raising refuse with its name.
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

from ...config import TARGETS as TARGET_SPECS
from ...errors import ArtifactError

# One registry of targets (config.TARGETS, validated with the configuration); here what each lowering does.
TARGETS: dict[str, str] = {name: spec.description for name, spec in TARGET_SPECS.items()}


@dataclass
class LayerRecord:
    """One quantized layer, as lowering sees it."""

    weight: str  # the weight tensor's name (what the integer kernel reads)
    weight_format: str  # "int8", "int4", "int4-block64", "fp8", "fp4-e2m1", ...
    bias: str  # "int32" or "float"
    role: str
    activation: str = "static"  # "static" (calibrated Q/DQ, or none) or "dynamic" (quantized by the kernel)
    # each timestep group's weight format where they differ (FP4's grid is chosen per layer and group; such a
    # weight is stored once per group, ``<weight>__group<g>``); empty: every group's is ``weight_format``
    group_formats: tuple[str, ...] = ()

    @classmethod
    def from_manifest(cls, data: dict) -> "LayerRecord":
        return cls(**{key: data[key] for key in ("weight", "weight_format", "bias", "role")},
                   activation=data.get("activation", "static"), group_formats=tuple(data.get("group_formats", ())))

    def to_manifest(self) -> dict:
        record = asdict(self)
        if not self.group_formats:  # the common case: one format, as manifests before per-group formats had
            del record["group_formats"]
        else:
            record["group_formats"] = list(self.group_formats)
        return record

    def format_of(self, initializer: str) -> str:
        """The format of one stored copy of the weight: group g's for ``<weight>__group<g>``, else
        ``weight_format`` (group 0's). A copy stored once holds the same values in every group, group 0's
        among them, so group 0's grid represents it exactly even where the groups chose different grids."""
        if self.group_formats and initializer.startswith(f"{self.weight}__group"):
            return self.group_formats[int(initializer.rsplit("__group", 1)[1])]
        return self.weight_format


@dataclass
class LoweringContext:
    """What lowering passes may need beyond the model and its layers.

    ``probe_inputs``: denoiser inputs (numpy arrays in the model's input order) per timestep group, on which
    a pass may run the model to measure value ranges (the CUDA target's float16 overflow check).
    ``group_models`` is filled by a pass that writes one
    model per timestep group (the TensorRT target); the artifact stores them beside ``model.onnx``."""

    probe_inputs: dict[int, list[tuple]] = field(default_factory=dict)
    group_models: list[ir.Model] = field(default_factory=list)
    notes: dict = field(default_factory=dict)  # what passes decided, for the manifest


class LoweringPass(ir.passes.InPlacePass):
    """A lowering pass: implement :meth:`lower`, returning ``(modified, summary)``. It changes the model in
    place. :meth:`inverse` gives the pass that undoes it (raising), when one is registered."""

    name: ClassVar[str] = "lowering"

    def __init__(self, layers: dict[str, LayerRecord], context: LoweringContext | None = None):
        super().__init__()
        self.layers = layers
        self.context = context or LoweringContext()
        self.summary = ""

    def inverse(self) -> "LoweringPass":
        """The pass that raises this pass's output back to its input form (see :func:`inverse_of`)."""
        raising = INVERSES.get(self.name)
        if raising is None:
            raise ArtifactError(f"lowering pass {self.name} has no inverse (it drops information the canonical "
                                "form needs), so an artifact it lowered cannot be re-lowered; recompile instead")
        return raising(self.layers, self.context)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified, self.summary = self.lower(model)
        return ir.passes.PassResult(model, modified)

    def lower(self, model: ir.Model) -> tuple[bool, str]:
        raise NotImplementedError


# forward pass name -> the pass that undoes it
INVERSES: dict[str, type[LoweringPass]] = {}


def inverse_of(forward_name: str):
    """Class decorator: register a raising pass as the inverse of the lowering pass named ``forward_name``."""
    def register(cls: type[LoweringPass]) -> type[LoweringPass]:
        INVERSES[forward_name] = cls
        return cls
    return register


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
    group_models: list[onnx.ModelProto] = field(default_factory=list)  # one per timestep group (TensorRT)


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
          context: LoweringContext | None = None, dump_dir: str | Path | None = None,
          first_index: int = 1) -> LoweringResult:
    """Run ``target``'s passes over ``model`` (a copy) and return the lowered model with a record per pass."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    context = context or LoweringContext()
    return _run(model, target_passes(target, layers, context), context, dump_dir, first_index)


def raise_to_canonical(model: onnx.ModelProto, pass_names: list[str], layers: dict[str, LayerRecord], *,
                       context: LoweringContext | None = None, dump_dir: str | Path | None = None,
                       first_index: int = 1) -> LoweringResult:
    """Undo the lowering passes named ``pass_names`` (in the order they ran, as the manifest lists them):
    run their inverses in reverse order. ``layers`` is updated to what the canonical model reads."""
    context = context or LoweringContext()
    missing = [name for name in pass_names if name not in INVERSES]
    if missing:
        raise ArtifactError(f"lowering pass {missing[0]} has no inverse (it drops information the canonical form "
                            "needs), so this artifact cannot be re-lowered; recompile it for the new target")
    raising = [INVERSES[name](layers, context) for name in reversed(pass_names)]
    return _run(model, raising, context, dump_dir, first_index)


def _run(model: onnx.ModelProto, passes: list[LoweringPass], context: LoweringContext,
         dump_dir: str | Path | None, first_index: int) -> LoweringResult:
    ir_model = ir.from_proto(model)
    result = LoweringResult(model)
    for index, lowering_pass in enumerate(passes, start=first_index):
        start = time.perf_counter()
        modified = lowering_pass(ir_model).modified
        seconds = time.perf_counter() - start
        result.records.append(LoweringRecord(lowering_pass.name, modified, lowering_pass.summary, seconds))
        if dump_dir is not None:
            _dump(Path(dump_dir), index, lowering_pass, ir_model, modified, seconds)
    result.model = ir.to_proto(ir_model)
    result.group_models = [ir.to_proto(group_model) for group_model in context.group_models]
    return result


def target_passes(target: str, layers: dict[str, LayerRecord],
                  context: LoweringContext | None = None) -> list[LoweringPass]:
    from . import cpu, cuda, tensorrt

    return {"cpu": cpu.passes, "cuda": cuda.passes, "tensorrt": tensorrt.passes}[target](
        layers, context or LoweringContext())


def _dump(dump_dir: Path, index: int, lowering_pass: LoweringPass, model: ir.Model, modified: bool,
          seconds: float) -> None:
    dump_dir.mkdir(parents=True, exist_ok=True)
    histogram = op_histogram(model)
    lines = [f"# {index:03d} {lowering_pass.name} (ONNX lowering)", lowering_pass.summary,
             f"modified: {modified}   time: {seconds:.3f} s", "", "## ops",
             *(f"{count:5d}  {op}" for op, count in sorted(histogram.items()))]
    (dump_dir / f"{index:03d}_{lowering_pass.name}.txt").write_text("\n".join(lines) + "\n")


from . import canonical  # noqa: E402,F401  (registers the inverses of the CPU passes)
from . import cpu_nbits  # noqa: E402,F401  (and of the block-wise and dynamic CPU passes)
from . import attention  # noqa: E402,F401  (and of the attention fusion)
