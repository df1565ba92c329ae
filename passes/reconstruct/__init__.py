"""Reconstruction: learn the weights' rounding (and, where the method says so, quantization parameters) against
the float model, after ChooseQuantParams, and fold the result into the ordinary parameters.

``--reconstruct``:

* ``gptq`` (Frantar et al. 2022, ``gptq.py``): per layer, error-compensating rounding with the Hessian ``X^T X``
  of the layer's inputs, block by block on the inputs from the model quantized so far;
* ``brecq`` (Li et al. 2021, ``adaround.py``): per DiT block, AdaRound's soft rounding plus LSQ activation step
  sizes, trained against the float block's output; PTQ4DiT's W4A8 depends on it (FID 9.17 with it, 108 without);
* ``bkd`` (DilateQuant, ``bkd.py``): per block, the same loss, with every timestep group's own activation scale
  and zero point (the temporal parallel quantizer), the weights' rounding and step sizes.

Layers outside the blocks are reconstructed layer by layer (``layerwise.py``). How it runs (``blockwise.py``):
values between blocks are cached on disk (``cache.py``) and one block's training state is in memory at a time;
``--seed`` fixes the row order (the whole pass is deterministic); ``--time-budget MIN`` splits the time among the
blocks and stops training between iterations, keeping the best parameters so far; ``--reconstruct-iters 0``
(or a zero budget) leaves every layer at nearest rounding and the artifact identical to ``--reconstruct none``.

The learned integers are written back as weights that round to them exactly (``materialize.py``), so Q/DQ
insertion, export and the fused kernels are unchanged. A weight the timestep groups share stays one tensor
object (stored once); ``--reconstruct-weights per-group`` learns each group's own weight instead. The pass
changes the function the float graph computes (its weights become their quantized values), so it does not
declare ``preserves_semantics``; its summary states the block (or layer) output error before and after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ...errors import PassPreconditionError
from ...memory import older_objects_frozen
from ...pass_manager import GraphPass, PassResult
from ...qspec import PARAMS_KEY, SPEC_KEY
from .adaround import BRECQ, TrainSettings, reconstruct_block_trained
from .bkd import BKD
from .blockwise import BlockReport, BlockwiseRun, MethodSpec
from .cache import PeakMemory
from .gptq import reconstruct_block_gptq
from .layerwise import reconstruct_outside
from .materialize import materialize
from .segments import SegmentUnsupported

GPTQ = MethodSpec("gptq", "GPTQ (Frantar et al. 2022): Hessian-based error-compensating rounding, layer by layer")
METHODS: dict[str, MethodSpec] = {m.name: m for m in (GPTQ, BRECQ, BKD)}
WEIGHT_SHARING = ("pooled", "per-group")


@dataclass
class ReconstructionReport:
    """What the pass did, for the summary, the dumps and the benchmark."""

    method: str
    blocks: list[BlockReport] = field(default_factory=list)
    outside: list[BlockReport] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    frozen: dict[str, str] = field(default_factory=dict)
    peak_bytes: int = 0
    start_bytes: int = 0
    seconds: float = 0.0
    cached_bytes: int = 0
    skipped: str | None = None  # why nothing was trained (nearest rounding kept), or None

    @property
    def nearest_error(self) -> float:
        return _mean([b.nearest_error for b in self.blocks])

    @property
    def error(self) -> float:
        return _mean([b.error for b in self.blocks])

    @property
    def layer_errors(self) -> list[tuple[str, float, float]]:
        return [e for b in self.blocks + self.outside for e in b.layer_errors]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class Reconstruct(GraphPass):
    name = "reconstruct"
    preserves_semantics = False  # the float weights become their learned quantized values

    def __init__(self, method: str, iterations: int, time_budget_min: float | None = None, weights: str = "pooled",
                 seed: int = 0, settings: TrainSettings | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown reconstruction method {method}")
        if weights not in WEIGHT_SHARING:
            raise ValueError(f"unknown weight sharing {weights}")
        self.method, self.iterations, self.time_budget_min = METHODS[method], iterations, time_budget_min
        self.weights, self.seed = weights, seed
        self.settings = settings or TrainSettings(iterations)
        self.report: ReconstructionReport | None = None

    def check_preconditions(self, gm, ctx):
        if not hasattr(gm, "graph_modules") or len(ctx.branches) != len(gm.graph_modules()):
            raise PassPreconditionError(self.name, "the graph is not split into timestep-group branches yet")
        for branch in gm.graph_modules():
            for node in branch.graph.nodes:
                if SPEC_KEY in node.meta and PARAMS_KEY not in node.meta:
                    raise PassPreconditionError(self.name, f"{node.meta[SPEC_KEY].layer} has no quantization "
                                                           "parameters yet; choose them first")

    def run(self, module, ctx):
        name = self.method.name
        self.report = ReconstructionReport(name)
        if self.iterations == 0 or self.time_budget_min == 0:
            why = "--reconstruct-iters 0" if self.iterations == 0 else "--time-budget 0"
            self.report.skipped = f"no iterations ({why})"
            return PassResult(module, False, f"{name}: {self.report.skipped}: nearest rounding kept")
        deadline = None if self.time_budget_min is None else time.monotonic() + 60.0 * self.time_budget_min
        note = f"reconstructed by {name}"
        try:
            with older_objects_frozen():  # release_freed_memory() after each block stays fast in a long process
                return self._reconstruct(module, ctx, name, deadline, note)
        except SegmentUnsupported as error:  # a model ditq cannot cut into blocks: one line, not a traceback
            raise PassPreconditionError(self.name, f"{error}; compile with --reconstruct none") from error

    def _reconstruct(self, module, ctx, name: str, deadline: float | None, note: str) -> PassResult:
        with PeakMemory() as memory:
            run = BlockwiseRun(module, ctx, self.method, weights_per_group=self.weights == "per-group", seed=self.seed)
            plans = run.registry.plans.values()
            if all(plan.frozen_reason for plan in plans):
                run.close()
                reasons = sorted({plan.frozen_reason for plan in plans}) or ["no quantized layer"]
                self.report.skipped = f"nothing to learn ({'; '.join(reasons)})"
                return PassResult(module, False, f"{name}: {self.report.skipped}: nearest rounding kept")
            try:
                settings = None if name == "gptq" else self.settings
                self.report.outside = reconstruct_outside(run, settings, deadline)
                block = reconstruct_block_gptq if name == "gptq" else \
                    (lambda r, i, d: reconstruct_block_trained(r, i, d, self.settings))
                self.report.blocks = run.walk(block, deadline=deadline, note=note)
                for segment in run.segments[0]:
                    run.registry.finish(segment.name, note)  # the tail's layer-wise results
                self.report.frozen = run.registry.frozen_reasons
                self.report.cached_bytes = run.store.bytes_written
                counts = materialize(module.graph_modules(), run.registry.learned_weights,
                                     run.registry.learned_activations)
            finally:
                run.close()
        self.report.counts = counts
        # the blocks sample on their own: the true peak is at least the largest sample any of them took
        self.report.peak_bytes = max([memory.peak] + [b.peak_bytes for b in self.report.blocks])
        self.report.start_bytes = memory.start
        self.report.seconds = memory.seconds
        modified = bool(counts["weights"] or counts["activations"])
        return PassResult(module, modified, self._summary(ctx), self._details())

    # reporting ------------------------------------------------------------------------------------------
    def manifest_entry(self) -> dict:
        report = self.report

        def unit(b: BlockReport) -> dict:
            return {"name": b.name, "layers": b.layers, "nearest_error": round(b.nearest_error, 6),
                    "error": round(b.error, 6), "iterations": b.iterations, "stopped_by_budget": b.stopped_by_budget}

        settings = {"method": self.method.name, "paper": self.method.paper, "iterations": self.iterations,
                    "time_budget_min": self.time_budget_min, "weights": self.weights}
        if report.skipped is not None:  # nothing measured: no error figures that would read as zero error
            return {**settings, "skipped": report.skipped}
        return {**settings,
                "block_error": {"nearest": round(report.nearest_error, 6), "reconstructed": round(report.error, 6)},
                "blocks": [unit(b) for b in report.blocks], "outside_blocks": [unit(b) for b in report.outside],
                "learned": dict(report.counts), "kept_nearest": dict(report.frozen)}

    def log_entry(self) -> dict:
        report = self.report
        return {"seconds": round(report.seconds, 2), "peak_host_memory_mb": round(report.peak_bytes / 1e6, 1),
                "memory_over_start_mb": round((report.peak_bytes - report.start_bytes) / 1e6, 1),
                "cached_on_disk_mb": round(report.cached_bytes / 1e6, 2),
                "blocks": [{"name": b.name, "seconds": round(b.seconds, 2),
                            **({"resident_at_start_mb": round(b.start_bytes / 1e6, 1),
                                "peak_mb": round(b.peak_bytes / 1e6, 1)} if b.peak_bytes else {})}
                           for b in report.blocks + report.outside]}

    def _summary(self, ctx) -> str:
        """Deterministic (it goes into the manifest): errors and counts, no times or memory."""
        report, counts = self.report, self.report.counts
        groups = len(ctx.branches)
        layers = sum(b.layers for b in report.blocks)
        parts = [f"{self.method.name}: {layers} layers in {len(report.blocks)} blocks"
                 + (f" and {len(report.outside)} layers outside them (layer-wise)" if report.outside else "")]
        if report.layer_errors:
            before = _mean([e[1] for e in report.layer_errors])
            after = _mean([e[2] for e in report.layer_errors])
            parts.append(f"layer output error {before:.3g} -> {after:.3g} vs nearest rounding (mean over "
                         f"{len(report.layer_errors)} layers)")
        if report.blocks:
            parts.append(f"block output error {report.nearest_error:.3g} -> {report.error:.3g} vs nearest rounding "
                         "(relative L2 on the calibration rows, mean over blocks)")
        if self.method.blockwise_training:
            parts.append(f"{max([b.iterations for b in report.blocks], default=0)} iterations per block")
        stopped = sum(b.stopped_by_budget for b in report.blocks + report.outside)
        if stopped:
            parts.append(f"time budget reached: {stopped} blocks or layers stopped early with their best so far")
        sharing = "per timestep group" if self.weights == "per-group" else \
            (f"pooled over {groups} timestep groups (stored once)" if groups > 1 else "pooled")
        parts.append(f"{counts['weights']} weights {sharing}, {counts['activations']} activation quantizers learned")
        if counts.get("bias-fitted rows"):
            parts.append(f"raised {counts['bias-fitted rows']} weight rows so their int32 bias fits")
        if report.frozen:
            parts.append(f"{len(report.frozen)} layers kept nearest rounding")
        return "; ".join(parts)

    def _details(self) -> list[str]:
        report = self.report
        lines = [f"{b.name}: output error {b.nearest_error:.4g} -> {b.error:.4g} ({b.layers} layers, "
                 f"{b.iterations} iterations{', stopped by the time budget' if b.stopped_by_budget else ''}, "
                 f"{b.seconds:.1f} s)" for b in report.blocks + report.outside]
        lines += [f"{layer}: layer output error {before:.4g} -> {after:.4g}" for layer, before, after
                  in report.layer_errors]
        lines += [f"{layer}: nearest rounding kept: {reason}" for layer, reason in report.frozen.items()]
        lines += [note for b in report.blocks for note in b.notes]
        added = (report.peak_bytes - report.start_bytes) / 1e6
        lines.append(f"peak host memory {report.peak_bytes / 1e6:.0f} MB ({added:+.0f} "
                     f"MB over the pass's start), {report.seconds:.1f} s, {report.cached_bytes / 1e6:.1f} MB of block "
                     "values cached on disk (removed)")
        return lines


def reconstruction_records(passes) -> tuple[dict | None, dict | None]:
    """(the manifest's ``reconstruction`` entry, the compile log's) for the pipeline's passes, or (None, None)
    without a reconstruction. The manifest's is deterministic (errors, iterations, counts); times and memory
    go to the compile log."""
    for graph_pass in passes:
        if isinstance(graph_pass, Reconstruct) and graph_pass.report is not None:
            return graph_pass.manifest_entry(), graph_pass.log_entry()
    return None, None


def reconstruction_passes(config) -> list[GraphPass]:
    """The pass ``pipeline.build_passes`` runs after the parameters are chosen (none for ``--reconstruct none``)."""
    if config.reconstruct == "none":
        return []
    return [Reconstruct(config.reconstruct, config.reconstruct_iters, config.time_budget_min,
                        config.reconstruct_weights, config.calibration.seed)]
